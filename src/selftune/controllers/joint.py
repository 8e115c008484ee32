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
        self.corrects_rmsprop_warmup = getattr(inner, "corrects_rmsprop_warmup", False)
        #: the inner controller's options, and this mode, for the run's manifest
        self.options = {**getattr(inner, "options", {}), "groups": "joint"}
        self._scales, self._outside = scales, outside
        self._ref = 0  #: the reference group: the one the run's rate is read from
        #: the factor from the reference's own rate to the run's (in the first reference's units)
        self._unit = 1.0
        #: per group, whether it had a rate at the last step, and its last own rate (without the
        #: scale) above zero (None: none yet)
        self._live: list[bool] = []
        self._own: list[float | None] = []
        self._scale: float | None = None  #: the run's scale, as last set or read
        #: per group and knob other than the rate, its memory ``1 - μ`` over the run's, as
        #: first seen
        self._memory: list[dict[str, float]] = []

    def join(self, knobs: Knobs) -> list[Proposal]:
        """Find the step's reference (:meth:`_pick`), and bring the groups given a rate since
        the last step (added, or held at zero by a scheduler) to the run's scale, at once: left
        at their own, a group added mid-run stayed there while the run stood at 8x, and one
        that took over the reference read the run 8x low."""
        owns, scales, was = self._rates(knobs)
        self._live = [own > 0 for own in owns]
        if not any(self._live):
            return []  # every rate held at zero: the run's reading waits where it stood
        self._ref, self._unit, run = self._pick(owns, scales, was)
        self._scale = run
        self._own = [own if own > 0 else last for own, last in zip(owns, self._own, strict=True)]
        why = f"joint: joins the run's rate ({run:.4g}x its own)"
        return [
            Proposal(i, "lr", own * run, why)
            for i, own in enumerate(owns)
            if own > 0 and not was[i] and scales[i] != run
        ]

    @property
    def live(self) -> list[int]:
        """The groups with a rate at this step, as :meth:`join` found them."""
        return [i for i, on in enumerate(self._live) if on]

    def _rates(self, knobs: Knobs) -> tuple[list[float], list[float], list[bool]]:
        """Each group's own rate (without the scale), its scale, and whether it had a rate at
        the last step (a group added since had none); the groups' records grown to them all."""
        scales = self._scales()
        owns = [k["lr"] / scale for k, scale in zip(knobs, scales, strict=True)]
        self._own += [None] * (len(owns) - len(self._own))
        return owns, scales, self._live + [False] * (len(owns) - len(self._live))

    def _pick(
        self, owns: list[float], scales: list[float], was: list[bool]
    ) -> tuple[int, float, float]:
        """The reference, the factor from its own rate to the run's, and the run's scale, for
        groups whose own rates are ``owns`` (one above zero at least) and which had a rate at
        the last step where ``was``.

        The reference stays while its rate is not zero: another's would move the rate the
        inner controller reads.  When it is, the next is one that had a rate at the last step,
        else the first with one, and the run's rate goes on where it stood: the factor takes
        the ratio of the two groups' last own rates (the ones they were first given can be long
        gone: a warm-up on one group).  The run's scale is that of a group with a rate now and
        at the last step, else the one last set: the scale of a group held at zero is stale (no
        change, nor a rollback, moves it).
        """
        live = [i for i, own in enumerate(owns) if own > 0]
        carried = [i for i in (self._ref, *live) if owns[i] > 0 and was[i]]
        ref, unit = self._ref, self._unit
        if ref not in live:
            ref = carried[0] if carried else live[0]
            before, after = self._own[self._ref], self._own[ref] or owns[ref]
            if before is not None:
                unit *= before / after
        last_set = scales[ref] if self._scale is None else self._scale
        return ref, unit, scales[carried[0]] if carried else last_set

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """The inner controller's proposals for the run, each made one for the group its knob
        is read from: the wrapper applies it there, then to the rest through :meth:`spread`.

        ``signals`` are already pooled (the wrapper pools them once, so that each decision's
        record holds the signals it was made on); the groups with a rate are those :meth:`join`
        found at this step (its joins change scales only)."""
        live = self.live
        if not live:
            return []  # every rate held at zero: nothing to scale
        run, sources = self._view(knobs, self._ref, self._unit)
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
        if knob == "lr":
            self._scale = value
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

    def _view(self, knobs: Knobs, ref: int, unit: float) -> tuple[dict[str, float], dict[str, int]]:
        """The run's knobs as the inner controller reads them, and the group each is read from.

        The rate is the reference ``ref``'s, times ``unit``.  A momentum's or a beta's memory
        ``1 - μ`` is kept per group as its ratio to the run's when the group was first seen (to
        the reference's, else the first group's that has the knob and holds it), and read from
        the reference, else the first group that has the knob and holds it: read from the
        reference alone, a reference without momentum left every group's untuned, and a new
        reference moved the momenta by the ratio of the two (a layer's momenta of 0.91 fell to
        0.87 while the controller lengthened them, and another's two, at 0.83, parted).
        """
        outside = self._outside()
        mine = [
            {n: 1 - v for n, v in k.items() if n != "lr" and v < 1 and n not in outside[i]}
            for i, k in enumerate(knobs)
        ]
        self._memory += [{} for _ in range(len(self._memory), len(knobs))]
        run, sources = {"lr": knobs[ref]["lr"] * unit}, {"lr": ref}
        for i in (ref, *range(len(knobs))):
            for name, memory in mine[i].items():
                s = sources.get(name)
                if name not in self._memory[i]:  # first seen: its ratio to the run's
                    self._memory[i][name] = (
                        1.0 if s is None else memory / mine[s][name] * self._memory[s][name]
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
        """Tell the inner controller the run's knobs that failed, read from the reference this
        step would have had (a reference a scheduler had just set to zero told it nothing)."""
        note = getattr(self.inner, "before_rollback", None)
        if note is None:
            return
        owns, scales, was = self._rates(knobs)
        if not any(own > 0 for own in owns):
            return
        ref, unit, _ = self._pick(owns, scales, was)
        note([self._view(knobs, ref, unit)[0]])

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "memory": self._memory,
            "ref": self._ref,
            "unit": self._unit,
            "live": self._live,
            "own": self._own,
            "scale": self._scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._memory = [dict(m) for m in state["memory"]]
        self._ref = state["ref"]
        # a state saved before a reference's change was followed: the first reference's units
        self._unit = state.get("unit", 1.0)
        self._live = list(state.get("live", []))
        self._scale = state.get("scale")
        # the groups' own rates are the scheduler's, which a rollback leaves as they are: the
        # latest known stay (a snapshot's, older, put the run in another group's units)
        saved = list(state.get("own", []))
        n = max(len(saved), len(self._own))
        saved += [None] * (n - len(saved))
        self._own += [None] * (n - len(self._own))
        self._own = [o if o is not None else was for o, was in zip(self._own, saved, strict=True)]
