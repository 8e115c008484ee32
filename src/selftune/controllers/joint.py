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
reference group, the first whose rate is not zero, kept while its rate is not; a momentum or a
beta from the reference too, else from the first group that has one.  Each is read in the units
of the first group that had the knob, through the ratio of the two groups' values when first
seen, so that a new reference changes nothing the controller reads (its rates, stored to cap
or to return to, stay right).  A change it proposes is made on that group, held by the policy,
and then made on every other group alike: the rate's scale (selftune's factor on each group's
own rate, which a scheduler keeps moving) is set to the one the policy let through, and a
memory ``1 - μ`` to that group's new memory times the ratio first seen.  So the rates' ratios
the loop set (a head at 10x, a layer-wise decay) are kept: a run held at a bound is held
whole, and a group that the policy held alone is brought back to them by the next change
within its bounds.  A scheduler's rise is read as the one every group with a rate shares (the
least), whatever the groups' order: ``auto`` holds the rise of a warm-up on all groups, and
lets a rise on some groups only pass.  A run whose groups all start at one rate tunes as one
group would.  A group added later, or whose rate a scheduler held at zero, takes the run's
scale at the next change of the rate: its own rate, as given, times the factor the run's
stands at; a group with no momentum (SGD's 0, Adam's beta1 0) gets none.
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
        #: per group and knob, the group's own value over the run's (see :meth:`_see`)
        self._ratios: list[dict[str, float]] = []
        self._ref = 0  #: the reference group: the one the run's rate is read from

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        """The inner controller's proposals for the run, each made one for the group its knob
        is read from: the wrapper applies it there, then to the rest through :meth:`spread`.

        ``signals`` are already pooled (the wrapper pools them once, so that each decision's
        record holds the signals it was made on)."""
        live = [i for i, k in enumerate(knobs) if k["lr"] > 0]
        if not live:
            return []  # every rate held at zero: nothing to scale
        # the reference stays while its rate does: another's would move the rate it reads
        self._ref = self._ref if self._ref in live else live[0]
        owns = self._own(knobs)
        self._see(owns)
        run, sources = self._view(owns)
        rise = min(signals.groups[i].base_rise for i in live)
        one = dataclasses.replace(
            signals, groups=(dataclasses.replace(signals.groups[self._ref], base_rise=rise),)
        )
        out = []
        for p in checked(self.inner, self.inner.propose(one, [run]), [run]):
            s = sources[p.knob]
            ratio = self._ratios[s][p.knob]
            value = p.value * ratio if p.knob == "lr" else 1 - ratio * (1 - p.value)
            out.append(Proposal(s, p.knob, value, p.reason))
        return out

    def spread(
        self, group: int, knob: str, value: float, knobs: Knobs, bases: list[float], reason: str
    ) -> list[Proposal]:
        """Proposals that move every other group as ``group``'s ``knob`` was just moved, to the
        stored ``value`` the policy let through (for the rate, its scale, set on each group's
        own rate of ``bases``): spread from the value proposed, a rate the policy then held
        moved the others alone."""
        out = []
        for i, k in enumerate(knobs):
            if i == group or knob not in k:
                continue
            if knob == "lr":  # the same scale, on this group's own rate
                out.append(Proposal(i, knob, bases[i] * value, reason))
            elif knob in self._ratios[i]:  # the memory in the ratio first seen
                ratio = self._ratios[i][knob] / self._ratios[group][knob]
                out.append(Proposal(i, knob, 1 - ratio * (1 - value), reason))
        return out

    def _own(self, knobs: Knobs) -> list[dict[str, float]]:
        """What the ratios compare, per group and knob: the group's own rate (without
        selftune's scale), or a memory ``1 - μ``; only where it is above zero."""
        scales = self._scales()
        owns = []
        for k, scale in zip(knobs, scales, strict=True):
            own = {n: v / scale if n == "lr" else 1 - v for n, v in k.items()}
            owns.append({n: v for n, v in own.items() if v > 0})
        return owns

    def _see(self, owns: list[dict[str, float]]) -> None:
        """Give each group's knobs not seen before their ratio to the run's.

        A knob is first seen where it has a value to read (a rate above zero), as its ratio to
        the same knob of a group seen before, the reference first: so every ratio is in one
        unit, that of the first group that had the knob, in which the inner controller reads
        the run.  Read from the reference alone, a new reference (the old one's rate set to
        zero) moved every memory by the ratio of the two (momenta of 0.9 and 0.8 went to 0.5
        and 0.06) and the inner controller's rates by the ratio of their rates.
        """
        self._ratios += [{} for _ in range(len(self._ratios), len(owns))]
        for i in (self._ref, *range(len(owns))):
            for name, own in owns[i].items():
                if name not in self._ratios[i]:
                    s = self._source(owns, name)
                    self._ratios[i][name] = (
                        1.0 if s is None else own / owns[s][name] * self._ratios[s][name]
                    )

    def _source(self, owns: list[dict[str, float]], name: str) -> int | None:
        """The group the run's ``name`` is read from: the reference, else the first that has
        the knob seen and a value to read (a reference with no momentum left every other
        group's momentum untuned)."""
        for i in (self._ref, *range(len(owns))):
            if i < len(self._ratios) and name in self._ratios[i] and name in owns[i]:
                return i
        return None

    def _view(self, owns: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
        """The run's knobs, in the units of :meth:`_see`, and the group each is read from."""
        scales = self._scales()
        run, sources = {}, {}
        for name in dict.fromkeys(n for own in owns for n in own):
            s = self._source(owns, name)
            if s is not None:
                own = owns[s][name] / self._ratios[s][name]
                run[name] = own * scales[s] if name == "lr" else 1 - own
                sources[name] = s
        return run, sources

    def on_backoff(self, step: int) -> None:
        self.inner.on_backoff(step)

    def take_restart(self) -> str | None:
        take = getattr(self.inner, "take_restart", None)
        return None if take is None else take()

    def before_rollback(self, knobs: Knobs) -> None:
        note = getattr(self.inner, "before_rollback", None)
        run = self._view(self._own(knobs))[0]  # read as at the last proposal: nothing new seen
        if note is not None and "lr" in run:
            note([run])

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "ratios": self._ratios, "ref": self._ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        # a state saved before the rates had ratios holds the memories' ("memory"), in the
        # same unit; the rates' are then taken at the next step
        self._ratios = [dict(m) for m in state.get("ratios", state.get("memory", []))]
        self._ref = state["ref"]
