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

:class:`JointController` gives the controller it wraps one group: the pooled signals of the
groups with a rate (:func:`~selftune.signals.pooled`: what one group holding those parameters
reads; a scheduler may hold a group at 0), and the run's knobs.  The run's rate is read from the
reference group, the first with a rate, kept while its rate is not zero; when it is, the next
reference goes on from the rate the run stood at, so that nothing the controller stored (a rate
that failed, a cap) changes its meaning.  A momentum or a beta is read from the reference, else
from the first group that has one and holds it (a knob a scheduler or the loop set is theirs).
A change it proposes is made on the group it was read from, held by the policy, and then made
on every other group alike: the rate's scale (selftune's factor on each group's own rate, which
a scheduler keeps moving) is set to the one the policy let through, and a memory ``1 - μ`` to
that group's new memory times the ratio the two had when first seen.  So the rates' ratios the
loop set (a head at 10x, a layer-wise decay) are kept: a run held at a bound is held whole, and
a group that the policy held alone is brought back to them by the next change within its
bounds.  A group given a rate (added mid-run, or released by a scheduler that held it at zero)
takes the run's scale at once, in a decision of its own.  A scheduler's rise is read as the one
every group with a rate shares (the least), whatever the groups' order: ``auto`` holds the rise
of a warm-up on all groups, and lets a rise on some groups only pass.  A run whose groups all
start at one rate tunes as one group would; a group with no momentum (SGD's 0, Adam's beta1 0)
gets none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from selftune.controllers.base import Controller, Knobs, Proposal, checked
from selftune.signals import Signals


class JointController:
    """``inner`` run on all param groups as one (``wrap(..., groups="joint")``).

    ``scales``: the wrapper's scale of each group's rate; ``outside``: each group's knobs that
    are no longer selftune's (a scheduler or the loop set them); both read as they stand.  The
    wrapper calls :meth:`join` at each step before :meth:`propose`, and spreads each change the
    policy made with :meth:`spread`.
    """

    def __init__(
        self,
        inner: Controller,
        scales: Callable[[], list[float]],
        outside: Callable[[], list[set[str]]],
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads_buffer = getattr(inner, "reads_buffer", True)
        #: the inner controller's options, and this mode, for the run's manifest
        self.options = {**getattr(inner, "options", {}), "groups": "joint"}
        self._scales, self._outside = scales, outside
        self._ref = 0  #: the reference group: the one the run's rate is read from
        #: the factor from the reference's own rate to the run's (in the first reference's units)
        self._unit = 1.0
        #: each group's own rate (without the scale) at the last step, None where it was zero
        self._last: list[float | None] = []
        #: per group and knob other than the rate, its memory ``1 - μ`` over the run's, as
        #: first seen
        self._memory: list[dict[str, float]] = []

    def join(self, knobs: Knobs) -> list[Proposal]:
        """Find the step's reference, and bring the groups given a rate since the last step
        (added, or held at zero by a scheduler) to the run's scale.

        The reference stays while its rate is not zero: another's would move the rate the
        inner controller reads.  When it is, the next is one that had a rate at the last step,
        else the first with one, and the run's rate goes on where it stood: its factor
        ``_unit`` takes the ratio of the two groups' own rates at the last step (the one they
        were first given can be long gone: a warm-up on one group).  A group that comes to a
        rate takes the run's scale at once (left at its own, a group added mid-run stayed
        there while the run stood at 27x, and one that took over the reference read the run
        27x low).
        """
        scales = self._scales()
        owns = [k["lr"] / scale for k, scale in zip(knobs, scales, strict=True)]
        live = [i for i, own in enumerate(owns) if own > 0]
        last = self._last + [None] * (len(owns) - len(self._last))
        run = scales[self._ref]  # the reference's: kept while a scheduler held its rate at 0
        if live and self._ref not in live:
            carried = [i for i in live if last[i] is not None]
            new = carried[0] if carried else live[0]
            before = last[self._ref]
            if before is not None:
                self._unit *= before / (last[new] or owns[new])
            self._ref = new
        self._last = [own if own > 0 else None for own in owns]
        why = f"joint: joins the run's rate ({run:.4g}x its own)"
        return [
            Proposal(i, "lr", owns[i] * run, why)
            for i in live
            if last[i] is None and scales[i] != run
        ]

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """The inner controller's proposals for the run, each made one for the group its knob
        is read from: the wrapper applies it there, then to the rest through :meth:`spread`.

        ``signals`` are already pooled (the wrapper pools them once, so that each decision's
        record holds the signals it was made on)."""
        live = [i for i, k in enumerate(knobs) if k["lr"] > 0]
        if not live:
            return []  # every rate held at zero: nothing to scale
        if self._ref not in live:  # called without join: no group joins
            self.join(knobs)
        run, sources = self._view(knobs)
        rise = min(signals.groups[i].base_rise for i in live)
        one = dataclasses.replace(
            signals, groups=(dataclasses.replace(signals.groups[self._ref], base_rise=rise),)
        )
        out = []
        for p in checked(self.inner, self.inner.propose(one, [run]), [run]):
            s = sources[p.knob]
            if p.knob == "lr":
                value = p.value / self._unit
            else:
                value = 1 - self._memory[s][p.knob] * (1 - p.value)
            out.append(Proposal(s, p.knob, value, p.reason))
        return out

    def spread(
        self, group: int, knob: str, value: float, knobs: Knobs, bases: list[float], reason: str
    ) -> list[Proposal]:
        """Proposals that move every other group as ``group``'s ``knob`` was just moved, to the
        stored ``value`` the policy let through (for the rate, its scale, set on each group's
        own rate of ``bases``): spread from the value proposed, a rate the policy then held
        moved the others alone."""
        outside = self._outside()
        out = []
        for i, k in enumerate(knobs):
            if i == group or knob not in k or knob in outside[i]:
                continue
            if knob == "lr":  # the same scale, on this group's own rate
                out.append(Proposal(i, knob, bases[i] * value, reason))
            elif knob in self._memory[i]:  # the memory in the ratio first seen
                ratio = self._memory[i][knob] / self._memory[group][knob]
                out.append(Proposal(i, knob, 1 - ratio * (1 - value), reason))
        return out

    def _view(self, knobs: Knobs) -> tuple[dict[str, float], dict[str, int]]:
        """The run's knobs as the inner controller reads them, and the group each is read from.

        The rate is the reference's, times ``_unit``.  A momentum's or a beta's memory
        ``1 - μ`` is kept per group as its ratio to the run's when the group was first seen (to
        the reference's, else the first group's that has the knob and holds it), and read from
        the reference, else the first group that has the knob and holds it: read from the
        reference alone, a reference without momentum left every group's untuned, and a new
        reference moved the momenta by the ratio of the two (0.9 and 0.8 to 0.5 and 0.06).
        """
        outside = self._outside()
        mine = [
            {n: 1 - v for n, v in k.items() if n != "lr" and v < 1 and n not in outside[i]}
            for i, k in enumerate(knobs)
        ]
        self._memory += [{} for _ in range(len(self._memory), len(knobs))]
        run, sources = {"lr": knobs[self._ref]["lr"] * self._unit}, {"lr": self._ref}
        for i in (self._ref, *range(len(knobs))):
            for name, memory in mine[i].items():
                s = sources.get(name)
                if name not in self._memory[i]:  # first seen: its ratio to the run's
                    self._memory[i][name] = (
                        1.0 if s is None else memory / mine[s][name] * (self._memory[s][name])
                    )
                if s is None:
                    sources[name] = i
                    run[name] = 1 - memory / self._memory[i][name]
        return run, sources

    def on_backoff(self, step: int) -> None:
        self.inner.on_backoff(step)

    def take_restart(self) -> str | None:
        take = getattr(self.inner, "take_restart", None)
        return None if take is None else take()

    def before_rollback(self, knobs: Knobs) -> None:
        note = getattr(self.inner, "before_rollback", None)
        if note is not None and knobs[self._ref]["lr"] > 0:
            note([self._view(knobs)[0]])

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "memory": self._memory,
            "ref": self._ref,
            "unit": self._unit,
            "last": self._last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._memory = [dict(m) for m in state["memory"]]
        self._ref = state["ref"]
        # a state saved before a reference's change was followed: the first reference's units
        self._unit = state.get("unit", 1.0)
        self._last = list(state.get("last", []))
