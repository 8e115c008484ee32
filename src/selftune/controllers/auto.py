"""``auto``, the default: an in-run range test, then hypergradient cruising with stability cuts.

1. **Range test** (Smith 2017, "Cyclical learning rates", done inside the run): the rate grows by
   ``ramp`` per step while the averaged hypergradient cosine says steps are still too short.  When
   it turns negative the steps have begun to overshoot: the rate has passed the greedy optimum,
   and the average lags a few steps, so the rate settles at ``settle`` times the value there.  If
   instead the smoothed loss blows up (``blowup`` above its best), it settles at ``1/4``.  A rate
   that starts too high shrinks (× ``settle`` per step) until the evidence turns positive.
2. **Cruise**: the :mod:`hypergradient` controller at a quarter of its gain (so that noise moves
   the rate slowly and its short-horizon bias acts as a gentle anneal), with the
   :mod:`stability` controller's spike, noise and plateau cuts taking precedence.

Momentum and β1 follow the hypergradient controller's buffer-alignment rule throughout the cruise.
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
    """Range test, then hypergradient cruise under stability cuts."""

    name = "auto"

    def __init__(
        self,
        ramp: float = 1.2,
        settle: float = 0.5,
        blowup: float = 2.0,
        min_ramp_steps: int = 3,
        cruise_gain: float = 0.05,
        deadband: float = 0.2,
        overshoot: float = 0.1,
    ) -> None:
        self.overshoot = overshoot
        self.deadband = deadband
        self.ramp, self.settle, self.blowup, self.min_ramp_steps = (
            ramp,
            settle,
            blowup,
            min_ramp_steps,
        )
        self.cruise_gain = cruise_gain
        self.hyper = HypergradientController(gain=cruise_gain, decay=0.9)
        self.stability = StabilityController()
        self._phase: list[str] = []  # "ramp" | "shrink" | "cruise" per group
        self._ramp_ema: list[RatioEMA] = []  # faster evidence for the range test
        self._ramp_steps: list[int] = []
        self._best_loss = float("inf")

    def _ensure(self, n: int) -> None:
        while len(self._phase) < n:
            self._phase.append("ramp")
            self._ramp_ema.append(RatioEMA(0.7))
            self._ramp_steps.append(0)

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        self._ensure(len(knobs))
        if signals.loss_ema is not None:
            self._best_loss = min(self._best_loss, signals.loss_ema)
        out: list[Proposal] = []
        for i, k in enumerate(knobs):
            g = signals.groups[i]
            rho_fast = self._ramp_ema[i].update(g.dot_update, g.grad_norm * g.update_norm)
            rho, _ = self.hyper.evidence(signals, i)  # keep every average current
            trouble = self.stability.trouble(signals, i)
            if g.update_norm == 0.0:
                continue
            if self._phase[i] != "cruise":
                out.extend(self._range_test(signals, i, k, rho_fast))
                continue
            if trouble is not None and not trouble.startswith("noisy"):
                out.append(self.stability.cut_proposal(i, k["lr"], trouble))
            elif abs(rho) > self.deadband or g.cos_update < REVERSAL:
                out.append(self.hyper.lr_proposal(i, k["lr"], rho, g.cos_update, self.cruise_gain))
        return out

    def _range_test(self, s: Signals, i: int, k: dict[str, float], rho: float) -> list[Proposal]:
        """One step of the in-run range test for group ``i``; moves to "cruise" when done."""
        self._ramp_steps[i] += 1
        n, lr, phase = self._ramp_steps[i], k["lr"], self._phase[i]

        def to_cruise(factor: float, why: str) -> list[Proposal]:
            self._phase[i] = "cruise"
            return [Proposal(i, "lr", lr * factor, f"range test: {why}")] if factor != 1 else []

        blown = s.loss_ema is not None and s.loss_ema > self.blowup * self._best_loss
        if phase == "ramp" and blown and n >= 10:
            ratio = s.loss_ema / self._best_loss if s.loss_ema is not None else math.inf
            return to_cruise(0.25, f"loss rose {ratio:.2f}x above its best at lr {lr:.3g}; settle")
        if n < self.min_ramp_steps:
            return []
        if n == self.min_ramp_steps and rho < -self.deadband:
            phase = self._phase[i] = "shrink"  # started above the edge: come down first
        if phase == "shrink":
            if rho >= -self.deadband:
                return to_cruise(1.0, "")
            why = f"rate too high (cos {rho:+.3f}); shrink"
            return [Proposal(i, "lr", lr * self.settle, f"range test: {why}")]
        if rho < -self.overshoot:
            return to_cruise(
                self.settle, f"steps began to overshoot at lr {lr:.3g} (cos {rho:+.3f})"
            )
        why = f"steps not yet overshooting (cos {rho:+.3f}); grow"
        return [Proposal(i, "lr", lr * self.ramp, f"range test: {why}")]

    def on_backoff(self, step: int) -> None:
        self._phase = ["cruise"] * len(self._phase)
        self.hyper.on_backoff(step)
        self.stability.on_backoff(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": list(self._phase),
            "ramp_ema": [e.state() for e in self._ramp_ema],
            "ramp_steps": list(self._ramp_steps),
            "best_loss": self._best_loss,
            "hyper": self.hyper.state_dict(),
            "stability": self.stability.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._phase = list(state["phase"])
        self._ramp_ema = [RatioEMA(**e) for e in state["ramp_ema"]]
        self._ramp_steps = list(state["ramp_steps"])
        self._best_loss = state["best_loss"]
        self.hyper.load_state_dict(state["hyper"])
        self.stability.load_state_dict(state["stability"])
