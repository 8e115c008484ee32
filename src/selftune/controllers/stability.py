"""``stability``: grow the rate while training is calm, cut it on spikes, noise and plateaus.

The rule a careful practitioner follows by eye, made explicit.  *Calm* means the smoothed loss is
falling (fast EMA below slow EMA) and the last step did not overshoot (its hypergradient cosine is
not negative); then the rate grows geometrically, so that a rate set a hundred times too small is
corrected within a few hundred steps.  Three kinds of trouble cut it:

- a *spike*: the loss more than ``spike_sigma`` running deviations above its fast EMA and 50%
  above it in relative terms (both, because minibatch losses have heavy tails);
- *noise*: the loss's relative deviation (deviation over level) grows to ``noise_ratio`` times what
  it was after the warm-up or the last cut: the steps now shake the loss more than they lower it;
- a *plateau*: the smoothed loss no longer falls by more than its own noise
  (:class:`~selftune.controllers.evidence.PlateauDetector`).

Without a loss (``step()`` called without one), only the gradient-based parts act.

A rate the guard had to roll back from is not grown into again: growth stops at ``cut`` times
the lowest rate that failed.  Without that ceiling the rate grew back to the failing one within
``warmup`` steps and a few dozen calm ones, and on the guard tests' classifier SGD with
momentum met eight regressions of its loss in 2,000 steps, each rolled back
(``tests/test_guard.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from selftune.controllers.base import Knobs, Option, Proposal, check_options, options_set
from selftune.controllers.evidence import PlateauDetector
from selftune.signals import Signals

#: the range of each option (:func:`~selftune.controllers.base.check_options`)
OPTIONS = {
    "growth": Option("the rate's growth per calm step", "1.05", 1.0),
    "cut": Option("the factor a cut applies to the rate", "0.5", 0.0, high=1.0, open_low=True),
    "spike_sigma": Option(
        "deviations above the smoothed loss that make a spike", "6.0", 0.0, open_low=True
    ),
    "noise_ratio": Option(
        "the rise of the loss's relative deviation read as noise", "3.0", 1.0, open_low=True
    ),
    "warmup": Option("steps before trouble is read", "20", 0, whole=True),
}


@dataclass
class _GroupState:
    plateau: PlateauDetector = field(default_factory=PlateauDetector)
    cooldown: int = 0  #: steps left during which no growth happens after a cut
    noise_ref: float = 0.0  #: relative loss deviation after the warm-up or the last cut


class StabilityController:
    """Geometric growth in calm phases; multiplicative cuts on spike, noise or plateau."""

    name = "stability"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal
    #: RMSprop's uncorrected warm-up is divided out (see selftune.knobs.rmsprop_warmup)
    corrects_rmsprop_warmup = True

    def __init__(
        self,
        growth: float = 1.05,
        cut: float = 0.5,
        spike_sigma: float = 6.0,
        noise_ratio: float = 3.0,
        warmup: int = 20,
    ) -> None:
        check_options(OPTIONS, locals())
        #: the options set off their defaults, for the run's manifest
        self.options = options_set(StabilityController, locals())
        self.growth, self.cut, self.spike_sigma = growth, cut, spike_sigma
        self.noise_ratio, self.warmup = noise_ratio, warmup
        self._groups: list[_GroupState] = []
        #: per group, the lowest rate the guard rolled back from (None: none yet); kept across
        #: the rollbacks, which restore this controller's state from before the failure
        self._failed: list[float | None] = []
        self._failing: list[float | None] = []  #: the rates of the rollback under way

    def trouble(self, signals: Signals, group: int) -> tuple[str, str] | None:
        """Update the trackers of ``group``; return the trouble seen (kind, reason in words)."""
        while len(self._groups) <= group:
            self._groups.append(_GroupState())
        st = self._groups[group]
        st.cooldown = max(st.cooldown - 1, 0)
        s = signals
        if s.loss is None or s.loss_ema is None or s.loss_std is None or s.step < self.warmup:
            return None
        plateau = st.plateau.update(s.step, s.loss, s.loss_std)
        level = abs(s.loss_ema)
        noise = s.loss_std / level if level > 0 else 0.0
        noisy = st.noise_ref > 0.0 and noise > self.noise_ratio * st.noise_ref
        if st.noise_ref == 0.0 or noisy:
            st.noise_ref = noise
        if s.loss > s.loss_ema + self.spike_sigma * s.loss_std and s.loss > 1.5 * level:
            return "spike", f"loss {s.loss:.4g} vs smoothed {s.loss_ema:.4g} (sd {s.loss_std:.3g})"
        if plateau:
            return "plateau", "the smoothed loss no longer falls by more than its noise"
        if noisy:
            return "noise", f"relative loss deviation {noise:.3g}, {self.noise_ratio:g}x its level"
        return None

    def calm(self, signals: Signals, group: int) -> bool:
        """Falling smoothed loss (or, without a loss, no overshoot) and no recent cut."""
        s, g = signals, signals.groups[group]
        falling = s.loss_slope is None or s.loss_slope < 0
        return falling and g.cos_update >= 0 and self._groups[group].cooldown == 0

    def cut_proposal(
        self, group: int, lr: float, trouble: tuple[str, str], step: int = 0
    ) -> Proposal:
        """Cut ``lr`` and hold off growth and further cuts for a while."""
        self._groups[group].cooldown = self.warmup
        self._groups[group].plateau.hold(step)
        kind, why = trouble
        return Proposal(group, "lr", lr * self.cut, f"{kind}: {why}; cut x{self.cut:g}")

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """Cut each group's rate on trouble, grow it when calm.

        A group without a gradient at this step (a frozen backbone's, one the batch did not use:
        :attr:`~selftune.signals.GroupSignals.has_gradient`) keeps its rate.  Its cosine, 0 by
        convention, read as calm, and a group frozen for 200 steps went from 1e-3 to 1.29, the
        rate it would have been unfrozen at.  The loss's trouble is that of the groups that
        trained, which are cut for it.  Its trackers still follow the loss, as in ``auto``.
        """
        out = []
        for i, k in enumerate(knobs):
            trouble = self.trouble(signals, i)
            if not signals.groups[i].has_gradient:
                continue
            if trouble is not None:
                out.append(self.cut_proposal(i, k["lr"], trouble, signals.step))
            elif signals.step >= self.warmup and self.calm(signals, i):
                out.extend(self.grow(i, k["lr"]))
        return out

    def grow(self, group: int, lr: float) -> list[Proposal]:
        """Grow the rate by ``growth``, up to the ceiling a failure left (none before one)."""
        why = "calm: loss falling steadily"
        failed = self._failed[group] if group < len(self._failed) else None
        if failed is None:
            return [Proposal(group, "lr", lr * self.growth, why)]
        ceiling = self.cut * failed
        if lr >= ceiling:
            return []
        why += f", up to {ceiling:.4g} ({self.cut:g}x {failed:.4g}, a rate that was rolled back)"
        return [Proposal(group, "lr", min(lr * self.growth, ceiling), why)]

    def plateau_level(self, group: int) -> tuple[float, int] | None:
        """The mean minibatch loss of the window that last signalled a plateau, and its length."""
        plateau = self._groups[group].plateau
        return None if plateau.level is None else (plateau.level, plateau.level_count)

    def before_rollback(self, knobs: Knobs) -> None:
        """The guard is about to restore an older state, perhaps one from before any failure:
        keep the lowest rate that has failed, this one included, for :meth:`on_backoff`."""
        failed = (self._failed + [None] * len(knobs))[: len(knobs)]
        self._failing = [
            k["lr"] if before is None else min(k["lr"], before)
            for k, before in zip(knobs, failed, strict=True)
        ]

    def on_backoff(self, step: int) -> None:
        for st in self._groups:
            st.cooldown = self.warmup
        self._failed, self._failing = self._failing or self._failed, []

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self._groups], "failed": list(self._failed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups = [
            _GroupState(**{**g, "plateau": PlateauDetector(**g["plateau"])})
            for g in state["groups"]
        ]
        self._failed = list(state.get("failed", []))  # a state saved before the ceiling: none
