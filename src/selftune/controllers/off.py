"""``off``: tunes nothing; the rates are the run's own (its settings, its scheduler's).

The control arm of every comparison: same wrapper, same signals, same guard, no tuning.

One thing it can do, if asked (``regain_after``): undo the guard's cuts once the run has shown
them needless.  A rollback halves the rate (compounded by repeated trouble), and with no
controller to grow it back a fault that was not the rate's (a batch with a non-finite value, a
change of task the guard took for a spike) left the rest of the run at half the rate chosen.
With ``regain_after=n`` the cut is a trial: after ``n`` healthy steps the rate doubles back, one
doubling every ``n`` steps, until the cut is undone (held, as every proposal, to the policy's
bounds and limit per step), up to the rate that failed or the one the restored snapshot held,
the lower.  A doubling is on trial as long in its turn: trouble within ``n`` steps of one shows
that the rate breaks the run, and that group's cuts then stand for the rest of the run.

Not the default (``regain_after=0``: every cut stands), because where the rate itself is the
trouble the cut is what saves the run: over every run of the guard alone in the probes of
``bench-results/`` (``bench-results/off-regain/``), at 25 the trial took tasks trained by turns
of 20 from a rate at its floor to plain AdamW's error and kept more of a GAN's modes, but at the
benchmark grid's rates too high for the plain optimizer 37 runs of 165 reached the target
against 49 with the cuts kept, and it cost full-batch Adam and batch-1 SGD a little.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from selftune.controllers.base import Knobs, Option, Proposal, check_options, options_set
from selftune.signals import Signals

#: the range of each option (:func:`~selftune.controllers.base.check_options`)
OPTIONS = {
    "regain_after": Option(
        "healthy steps after a guard's cut before the rate doubles back (0: never)",
        "25",
        0,
        whole=True,
    ),
}


@dataclass
class _Cut:
    """What a group still owes to the guard's cut, and how far its trial has gone."""

    owed: float = 1.0  #: the factor of the cut not yet undone (1: none)
    at: int = 0  #: the step of the trouble that made the cut
    healthy: int = 0  #: healthy steps since the cut or the last doubling
    regained: bool = False  #: a doubling is on its trial (within ``regain_after`` steps)
    stands: bool = False  #: trouble came in a doubling's trial: the cuts stand for good
    #: how high the cut may be undone, until the first step after it reads what it took off:
    #: the rate that failed, or the snapshot's (what the run was healthy at), the lower
    ceiling: float | None = None
    rate: float | None = None  #: the rate in force after this controller's last step


class OffController:
    """Proposes nothing but the undoing of a guard's cut that the run showed needless.

    A subclass (a controller of one's own built on this one, which proposes nothing of itself)
    need not call this ``__init__``: the trial's state starts empty and ``regain_after`` at its
    default (no trial) without it."""

    name = "off"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal
    regain_after = 0  #: see the module's docstring
    #: per group, the trial of the guard's last cut (empty and immutable on the class, so that no
    #: list is shared between instances: each sets its own)
    _cuts: Sequence[_Cut] = ()
    #: the groups' trials as the trouble found them, with the rates that failed: kept from
    #: :meth:`before_rollback` across the restore of this state to the snapshot's, for
    #: :meth:`on_backoff` (the restore forgets whether a doubling came before the trouble)
    _failing: Sequence[_Cut] = ()

    def __init__(self, regain_after: int = 0) -> None:
        check_options(OPTIONS, locals())
        #: the options set off their defaults, for the run's manifest
        self.options = options_set(OffController, locals())
        self.regain_after = regain_after

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        if not self.regain_after:  # every cut stands: nothing to follow
            return []
        out = []
        self._cuts = [*self._cuts, *(_Cut() for _ in range(len(knobs) - len(self._cuts)))]
        for i, (cut, k) in enumerate(zip(self._cuts, knobs, strict=False)):
            cut.rate, ceiling, cut.ceiling = k["lr"], cut.ceiling, None
            if ceiling is not None:  # the first step after the cut: what it took off (a rate
                # held at zero has nothing to double back)
                cut.owed = ceiling / k["lr"] if ceiling > k["lr"] > 0.0 else 1.0
            if cut.stands or (cut.owed <= 1.0 and not cut.regained):
                continue
            cut.healthy += 1
            if cut.healthy < self.regain_after:
                continue
            cut.healthy = 0
            if cut.owed <= 1.0:  # the last doubling has held as long as a cut's trial
                cut.regained = False
                continue
            factor = min(2.0, cut.owed)
            cut.owed, cut.regained = cut.owed / factor, True
            left = f"; {cut.owed:.3g}x of it left" if cut.owed > 1.0 else ""
            why = (
                f"the guard's cut at step {cut.at} was a trial, and {self.regain_after} healthy "
                f"steps have passed: the rate goes back up x{factor:g}{left}"
            )
            cut.rate = k["lr"] * factor
            out.append(Proposal(i, "lr", cut.rate, why))
        return out

    def before_rollback(self, knobs: Knobs) -> None:
        """Keep each group's trial as the trouble found it, and the rate that failed."""
        if not self.regain_after:
            return
        cuts = [*self._cuts, *(_Cut() for _ in range(len(knobs) - len(self._cuts)))]
        self._failing = [
            _Cut(stands=c.stands or c.regained, ceiling=k["lr"])
            for c, k in zip(cuts, knobs, strict=False)
        ]

    def on_backoff(self, step: int) -> None:
        """Start each group's trial of the cut just made (its size is read at the next step),
        up to the rate that failed or the one the restored snapshot held, the lower: a rate
        written wrong (a scheduler's, the loop's) failed, and is no rate to go back to."""
        failing, self._failing = list(self._failing), ()
        for cut, kept in itertools.zip_longest(failing, self._cuts[: len(failing)]):
            cut.at = step
            if kept is not None and kept.rate is not None and cut.ceiling is not None:
                cut.ceiling = min(cut.ceiling, kept.rate)
        self._cuts = [*failing, *self._cuts[len(failing) :]]

    def state_dict(self) -> dict[str, Any]:
        return {"cuts": [asdict(c) for c in self._cuts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cuts = [_Cut(**c) for c in state.get("cuts", [])]  # saved before the trial: none
