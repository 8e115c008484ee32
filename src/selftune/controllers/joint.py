"""Tuning every param group together: one controller reading the run as one group.

A controller reads each param group's signals and moves each group's knobs on its own.  Where a
run's groups are a rate per layer (a fine-tuning script's layer-wise rates, one group per
tensor), that splits one run's evidence into many thin shares: a bias of a few numbers gives
cosines that are mostly noise, every group runs its own range test on the one loss of the run,
and any group that reads harm from that loss restarts the whole run.  On four of the
benchmark's workloads with a group per tensor (two bases, three seeds), the groups' rates of
``auto`` ended up to 2.4e5 apart and 4 runs of 24 missed targets that one group reached in all
24; tuned jointly, the same groups took one group's steps in every run
(``bench-results/groups/``).

:class:`JointController` gives the controller it wraps one group, the pooled signals of all
(:func:`~selftune.signals.pooled`: what one group holding every parameter reads) and the knobs
of the first group as the reference, and applies each change it proposes to every group in
the same ratio: ``lr`` times the factor, ``momentum`` and the betas with their memory
``1 - μ`` times the factor.  The rates' ratios the loop set (a head at 10x, a layer-wise
decay) are kept, and a run whose groups all start at one rate tunes as if it had one group.
A group added later keeps the rate it is given and moves with the run's from then on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from selftune.controllers.base import Controller, Knobs, Proposal
from selftune.signals import Signals


class JointController:
    """``inner`` run on all param groups as one (``wrap(..., groups="joint")``)."""

    def __init__(self, inner: Controller) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads_buffer = getattr(inner, "reads_buffer", True)
        #: the inner controller's options, and this mode, for the run's manifest
        self.options = {**getattr(inner, "options", {}), "groups": "joint"}

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """The inner controller's proposals for the first group, spread over every group.

        ``signals`` are already pooled (the wrapper pools them once, so that each decision's
        record holds the signals it was made on)."""
        one = dataclasses.replace(signals, groups=signals.groups[:1])
        return [q for p in self.inner.propose(one, knobs[:1]) for q in spread(p, knobs)]

    def on_backoff(self, step: int) -> None:
        self.inner.on_backoff(step)

    def take_restart(self) -> str | None:
        take = getattr(self.inner, "take_restart", None)
        return None if take is None else take()

    def before_rollback(self, knobs: Knobs) -> None:
        note = getattr(self.inner, "before_rollback", None)
        if note is not None:
            note(knobs[:1])

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def spread(p: Proposal, knobs: Knobs) -> list[Proposal]:
    """A proposal for the first group as one for every group that has its knob, in the same
    ratio: the rate's factor, or the factor on the memory ``1 - μ`` of a momentum or a beta."""
    ref = knobs[0][p.knob]
    out = []
    for i, k in enumerate(knobs):
        if p.knob not in k:
            continue
        if p.knob == "lr":
            value = k["lr"] * (p.value / ref) if ref > 0 else p.value
        else:
            value = 1 - (1 - k[p.knob]) * (1 - p.value) / (1 - ref) if ref < 1 else p.value
        out.append(Proposal(i, p.knob, value if i else p.value, p.reason))
    return out
