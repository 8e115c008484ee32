"""``auto``, the default: an in-run range test, then a cruise that holds, corrects and anneals.

1. **Range test** (Smith 2017, "Cyclical learning rates for training neural networks", done
   inside the run).  The rate grows by ``ramp`` per step while the averaged hypergradient cosine
   ρ (see :mod:`~selftune.controllers.hypergradient`) says the steps do not overshoot.  When ρ
   falls below ``−overshoot`` the rate has passed the greedy optimum; the average lags a few
   steps, so the rate settles at ``settle`` times the value there.  If the smoothed loss instead
   blows up (``blowup`` times its best), it settles at a quarter.  A rate that starts clearly too
   high (ρ below ``−deadband`` at the first look) shrinks by ``shrink`` per step instead, until
   the evidence is no longer clearly negative.
2. **Cruise**.  One-step hypergradients are biased towards short steps under gradient noise
   (Wu et al. 2018, "Understanding short-horizon bias in stochastic meta-optimization"): followed
   blindly they anneal far too early.  So the cruise *holds* the rate while |ρ| is within
   ``deadband`` (the noise-dominated zone), follows the hypergradient only on clear evidence, and
   anneals by halving when the smoothed loss stops falling by more than its own noise
   (:class:`~selftune.controllers.evidence.PlateauDetector`) or on a loss spike.

Momentum and β1 are left where the user set them: the evidence tried for them (buffer alignment)
lengthened the memory whenever the rate was small, which trades one knob for the other.
"""

from __future__ import annotations

import math
from typing import Any

from selftune.controllers.base import Knobs, Proposal
from selftune.controllers.evidence import RatioEMA
from selftune.controllers.hypergradient import REVERSAL, HypergradientController
from selftune.controllers.stability import StabilityController
from selftune.signals import Signals


class AutoController:
    """Range test, then hold / correct / anneal on evidence."""

    name = "auto"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal

    def __init__(
        self,
        ramp: float = 1.2,
        settle: float = 0.5,
        blowup: float = 2.0,
        min_ramp_steps: int = 3,
        overshoot: float = 0.1,
        deadband: float = 0.2,
        cruise_gain: float = 0.05,
        strong: float = 0.5,
        shrink: float = 0.7,
    ) -> None:
        self.shrink = shrink
        self.strong = strong
        self.ramp, self.settle, self.blowup = ramp, settle, blowup
        self.min_ramp_steps, self.overshoot, self.deadband = min_ramp_steps, overshoot, deadband
        self.cruise_gain = cruise_gain
        self.hyper = HypergradientController(gain=cruise_gain, decay=0.9)
        self.stability = StabilityController()
        self._phase: list[str] = []  # "ramp" | "shrink" | "cruise" per group
        self._ramp_ema: list[RatioEMA] = []  # faster evidence for the range test
        self._ramp_steps: list[int] = []
        self._best_loss = math.inf
        self._backed_off = False  # the guard cut the rate: no range test after that
        # per group, a plateau cut on trial: [rate before, slow loss EMA, loss sd, age] or None
        self._trial: list[list[float] | None] = []

    def _ensure(self, n: int) -> None:
        while len(self._phase) < n:
            self._phase.append("cruise" if self._backed_off else "ramp")
            self._ramp_ema.append(RatioEMA(0.7))
            self._ramp_steps.append(0)
            self._trial.append(None)

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        self._ensure(len(knobs))
        if signals.loss_ema is not None:
            self._best_loss = min(self._best_loss, signals.loss_ema)
        out: list[Proposal] = []
        for i, k in enumerate(knobs):
            g = signals.groups[i]
            rho_fast = self._ramp_ema[i].update(g.dot_update, g.grad_norm * g.update_norm)
            rho, _ = self.hyper.evidence(signals, i)  # every average stays current
            trouble = self.stability.trouble(signals, i)
            if g.update_norm == 0.0:
                continue
            if self._phase[i] != "cruise":
                out.extend(self._range_test(signals, i, k, rho_fast))
            elif trouble is not None and trouble[0] == "spike":
                out.append(self.stability.cut_proposal(i, k["lr"], trouble, signals.step))
            elif trouble is not None and trouble[0] == "plateau":
                out.append(self._plateau(signals, i, k["lr"], rho, trouble))
            elif (undo := self._judge_trial(signals, i, k["lr"])) is not None:
                out.append(undo)
            elif rho > self.deadband or rho < -self.strong or g.cos_update < REVERSAL:
                out.append(self.hyper.lr_proposal(i, k["lr"], rho, g.cos_update, self.cruise_gain))
        return out

    def _plateau(
        self, s: Signals, i: int, lr: float, rho: float, trouble: tuple[str, str]
    ) -> Proposal:
        """A flat loss: bouncing at the noise floor (ρ < 0: cut) or steps too short (grow).

        A cut is a trial: if the smoothed loss has not fallen significantly by the time the next
        plateau check could fire, :meth:`_judge_trial` undoes it.
        """
        if rho >= 0:
            why = f"plateau with steps still too short (cos {rho:+.3f}); grow x2"
            return Proposal(i, "lr", lr * 2.0, why)
        self._trial[i] = [lr, s.loss_ema_slow or 0.0, s.loss_std or 0.0, 0]
        return self.stability.cut_proposal(i, lr, trouble, s.step)

    def _judge_trial(self, s: Signals, i: int, lr: float) -> Proposal | None:
        trial = self._trial[i]
        if trial is None or s.loss_ema_slow is None:
            return None
        trial[3] += 1
        if trial[3] < self.stability.warmup * 2:
            return None
        self._trial[i] = None
        before, loss, std, _ = trial
        if loss - s.loss_ema_slow >= 0.2 * std:
            return None  # the cut helped: keep it
        why = "the last plateau cut did not lower the loss: not a noise floor; undo it"
        return Proposal(i, "lr", max(before, lr), why)

    def _range_test(self, s: Signals, i: int, k: dict[str, float], rho: float) -> list[Proposal]:
        """One step of the in-run range test for group ``i``; moves to "cruise" when done."""
        self._ramp_steps[i] += 1
        n, lr, phase = self._ramp_steps[i], k["lr"], self._phase[i]

        def to_cruise(factor: float, why: str) -> list[Proposal]:
            self._phase[i] = "cruise"
            return [Proposal(i, "lr", lr * factor, f"range test: {why}")] if factor != 1 else []

        if phase == "ramp" and n >= self.min_ramp_steps and s.loss_ema is not None:
            ratio = s.loss_ema / self._best_loss if self._best_loss > 0 else 1.0
            if ratio > self.blowup:
                return to_cruise(0.25, f"loss rose {ratio:.2f}x above its best at lr {lr:.3g}")
        if n < self.min_ramp_steps:
            return []
        if n == self.min_ramp_steps and rho < -self.deadband:
            phase = self._phase[i] = "shrink"  # started above the edge: come down first
        if phase == "shrink":
            if rho >= -self.deadband:
                return to_cruise(1.0, "")
            why = f"rate too high (cos {rho:+.3f}); shrink"
            return [Proposal(i, "lr", lr * self.shrink, f"range test: {why}")]
        if rho < -self.overshoot:
            return to_cruise(
                self.settle, f"steps began to overshoot at lr {lr:.3g} (cos {rho:+.3f})"
            )
        why = f"steps not yet overshooting (cos {rho:+.3f}); grow"
        return [Proposal(i, "lr", lr * self.ramp, f"range test: {why}")]

    def on_backoff(self, step: int) -> None:
        self._backed_off = True
        self._phase = ["cruise"] * len(self._phase)
        self.hyper.on_backoff(step)
        self.stability.on_backoff(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": list(self._phase),
            "ramp_ema": [e.state() for e in self._ramp_ema],
            "ramp_steps": list(self._ramp_steps),
            "best_loss": self._best_loss,
            "backed_off": self._backed_off,
            "trial": [None if t is None else list(t) for t in self._trial],
            "hyper": self.hyper.state_dict(),
            "stability": self.stability.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._phase = list(state["phase"])
        self._ramp_ema = [RatioEMA(**e) for e in state["ramp_ema"]]
        self._ramp_steps = list(state["ramp_steps"])
        self._best_loss = state["best_loss"]
        self._backed_off = state["backed_off"]
        self._trial = [None if t is None else list(t) for t in state["trial"]]
        self.hyper.load_state_dict(state["hyper"])
        self.stability.load_state_dict(state["stability"])
