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

:class:`JointController` gives the controller it wraps one group: the pooled signals of all
(:func:`~selftune.signals.pooled`: what one group holding every parameter reads) and the knobs
of the reference group, the first whose rate is not zero (a scheduler may hold a group at 0),
kept while its rate is not.  Each change it proposes moves every group alike: the rate's scale
(selftune's factor on each group's own rate, which a scheduler keeps moving) is set to the
reference's new scale, and a momentum's or a beta's memory ``1 - μ`` is set to the reference's
new memory times the ratio the two had when the group was first seen.  So the rates' ratios the
loop set (a head at 10x, a layer-wise decay) are kept, and a group that the policy's bounds or
step limit held is brought back to them by the next change within its bounds.  A scheduler's
rise is read as the one every group with a rate shares (the least), whatever the groups' order:
``auto`` holds the rise of a warm-up on all groups, and lets a rise on some groups only pass.  A
run whose groups all start at one rate tunes as one group would.  A group added later, or whose
rate a scheduler held at zero, takes the run's scale at the next change of the rate: its own
rate, as given, times the factor the run's stands at.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from selftune.controllers.base import Controller, Knobs, Proposal, checked
from selftune.signals import Signals


class JointController:
    """``inner`` run on all param groups as one (``wrap(..., groups="joint")``).

    ``scales``: the wrapper's scale of each group's rate (read at each proposal).
    """

    def __init__(self, inner: Controller, scales: Callable[[], list[float]]) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads_buffer = getattr(inner, "reads_buffer", True)
        #: the inner controller's options, and this mode, for the run's manifest
        self.options = {**getattr(inner, "options", {}), "groups": "joint"}
        self._scales = scales
        #: per group and knob other than the rate, its memory ``1 - μ`` over the reference's
        #: when the group was first seen
        self._memory: list[dict[str, float]] = []
        self._ref = 0  #: the reference group of the last proposal, for ``before_rollback``

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """The inner controller's proposals for the reference group, spread over every group.

        ``signals`` are already pooled (the wrapper pools them once, so that each decision's
        record holds the signals it was made on)."""
        live = [i for i, k in enumerate(knobs) if k["lr"] > 0]
        if not live:
            return []  # every rate held at zero: nothing to scale
        # the reference stays while its rate does: another's would move the rate it reads
        r = self._ref = self._ref if self._ref in live else live[0]
        self._see(knobs, r)
        rise = min(signals.groups[i].base_rise for i in live)
        one = dataclasses.replace(
            signals, groups=(dataclasses.replace(signals.groups[r], base_rise=rise),)
        )
        proposals = checked(self.inner, self.inner.propose(one, [knobs[r]]), [knobs[r]])
        scales = self._scales()
        return [q for p in proposals for q in self._spread(p, knobs, r, scales)]

    def _see(self, knobs: Knobs, r: int) -> None:
        """Keep the memories' ratios of the groups not seen before (at their first step)."""
        for k in knobs[len(self._memory) :]:
            self._memory.append(
                {
                    name: (1 - k[name]) / (1 - knobs[r][name])
                    for name in k
                    if name != "lr" and name in knobs[r] and knobs[r][name] < 1
                }
            )

    def _spread(self, p: Proposal, knobs: Knobs, r: int, scales: list[float]) -> list[Proposal]:
        """A proposal for the reference group as one for every group that has its knob."""
        out = []
        for i, k in enumerate(knobs):
            if p.knob not in k:
                continue
            if i == r:
                value = p.value
            elif p.knob == "lr":  # the reference's new scale, on this group's own rate
                value = k["lr"] / scales[i] * scales[r] * p.value / knobs[r]["lr"]
            elif p.knob in self._memory[i]:
                value = 1 - self._memory[i][p.knob] * (1 - p.value)
            else:
                continue
            out.append(Proposal(i, p.knob, value, p.reason))
        return out

    def on_backoff(self, step: int) -> None:
        self.inner.on_backoff(step)

    def take_restart(self) -> str | None:
        take = getattr(self.inner, "take_restart", None)
        return None if take is None else take()

    def before_rollback(self, knobs: Knobs) -> None:
        note = getattr(self.inner, "before_rollback", None)
        if note is not None:
            note(knobs[self._ref : self._ref + 1])

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "memory": self._memory, "ref": self._ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._memory = [dict(m) for m in state["memory"]]
        self._ref = state["ref"]
