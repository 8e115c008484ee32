"""``stability``: grow the rate while training is calm, cut it on spikes, noise and plateaus.

The rule a careful practitioner follows by eye, made explicit.  *Calm* means the smoothed loss is
falling (fast EMA below slow EMA) and the last step did not overshoot (its hypergradient cosine is
not negative); then the rate grows geometrically, so that a rate set a hundred times too small is
corrected within a few hundred steps.  Three kinds of trouble cut it:

- a *spike*: the loss more than ``spike_sigma`` running deviations above its fast EMA and 50%
  above it in relative terms (both, because minibatch losses have heavy tails);
- *noise*: the loss's relative deviation (deviation over level) grows to ``noise_ratio`` times what
  it was after the warm-up or the last cut: the steps now shake the loss more than they lower it;
- a *plateau*: the smoothed loss has not improved by ``min_improvement`` in ``patience`` steps.

Without a loss (``step()`` called without one), only the gradient-based parts act.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from selftune.controllers.base import Knobs, Proposal
from selftune.signals import Signals


@dataclass
class _GroupState:
    best: float = float("inf")  #: best fast EMA of the loss so far
    since_best: int = 0  #: steps since ``best`` improved by ``min_improvement``
    cooldown: int = 0  #: steps left during which no growth happens after a cut
    noise_ref: float = 0.0  #: relative loss deviation after the warm-up or the last cut


class StabilityController:
    """Geometric growth in calm phases; multiplicative cuts on spike, noise or plateau."""

    name = "stability"

    def __init__(
        self,
        growth: float = 1.02,
        cut: float = 0.5,
        spike_sigma: float = 6.0,
        noise_ratio: float = 3.0,
        patience: int = 100,
        min_improvement: float = 0.01,
        warmup: int = 20,
    ) -> None:
        self.growth, self.cut, self.spike_sigma = growth, cut, spike_sigma
        self.noise_ratio, self.patience, self.min_improvement = (
            noise_ratio,
            patience,
            min_improvement,
        )
        self.warmup = warmup
        self._groups: list[_GroupState] = []

    def trouble(self, signals: Signals, group: int) -> str | None:
        """Update the plateau tracker of ``group``; return the trouble seen this step, if any."""
        while len(self._groups) <= group:
            self._groups.append(_GroupState())
        st = self._groups[group]
        st.cooldown = max(st.cooldown - 1, 0)
        s = signals
        if s.loss is None or s.loss_ema is None or s.loss_std is None or s.step < self.warmup:
            return None
        if s.loss_ema < st.best * (1 - self.min_improvement):
            st.best, st.since_best = s.loss_ema, 0
        else:
            st.since_best += 1
        level = abs(s.loss_ema)
        if s.loss > s.loss_ema + self.spike_sigma * s.loss_std and s.loss > 1.5 * level:
            return f"loss spike: {s.loss:.4g} vs smoothed {s.loss_ema:.4g} (std {s.loss_std:.3g})"
        noise = s.loss_std / level if level > 0 else 0.0
        if st.noise_ref == 0.0:
            st.noise_ref = noise
        elif noise > self.noise_ratio * st.noise_ref:
            st.noise_ref = noise
            return (
                f"noisy: relative loss deviation {noise:.3g} is {self.noise_ratio:g}x its reference"
            )
        if st.since_best >= self.patience:
            st.since_best = 0
            st.best = s.loss_ema
            return f"plateau: no {self.min_improvement:.0%} improvement in {self.patience} steps"
        return None

    def calm(self, signals: Signals, group: int) -> bool:
        """Falling smoothed loss (or, without a loss, no overshoot) and no recent cut."""
        s, g = signals, signals.groups[group]
        falling = s.loss_slope is None or s.loss_slope < 0
        return falling and g.cos_update >= 0 and self._groups[group].cooldown == 0

    def cut_proposal(self, group: int, lr: float, why: str) -> Proposal:
        """Cut ``lr`` and hold off growth for a while."""
        self._groups[group].cooldown = self.warmup
        return Proposal(group, "lr", lr * self.cut, f"cut x{self.cut:g}: {why}")

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        out = []
        for i, k in enumerate(knobs):
            why = self.trouble(signals, i)
            if why is not None:
                out.append(self.cut_proposal(i, k["lr"], why))
            elif signals.step >= self.warmup and self.calm(signals, i):
                out.append(Proposal(i, "lr", k["lr"] * self.growth, "calm: loss falling steadily"))
        return out

    def on_backoff(self, step: int) -> None:
        for st in self._groups:
            st.cooldown = self.warmup

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [asdict(g) for g in self._groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._groups = [_GroupState(**g) for g in state["groups"]]
