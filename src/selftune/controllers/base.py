"""The controller protocol: what every controller implements, and the record it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from selftune.signals import Signals

#: knob values per param group, e.g. ``[{"lr": 0.01, "momentum": 0.9}]`` (effective values)
Knobs = list[dict[str, float]]


@dataclass(frozen=True)
class Proposal:
    """A controller's wish for one knob of one param group, with the reason in words."""

    group: int
    knob: str
    value: float
    reason: str
    #: ``value`` is the stored value itself (the scale, for ``lr``) and bypasses the policy:
    #: only replay, which re-applies values the policy already passed, sets it
    raw: bool = False


@runtime_checkable
class Controller(Protocol):
    """Turns one step's :class:`~selftune.signals.Signals` into proposed knob values.

    ``propose`` is called once per optimizer step that will be applied, before the update, with
    the knobs now in force; it returns only the knobs it wants to change.  The policy then clips
    each proposal.  ``on_backoff`` tells the controller that the guard rolled the run back and cut
    the rate, so that it does not undo the cut at once.  State must be plain JSON-able values:
    ``load_state_dict(state_dict())`` on a fresh instance must reproduce every future proposal.
    A controller may set ``reads_buffer = False`` to spare the step the momentum-buffer
    alignment signal (one more fused pass over the parameters) when it does not read it.
    A controller may also define ``take_restart() -> str | None``, asked once per applied step
    after ``propose``: a reason asks the wrapper to restart from the oldest guard snapshot with
    the knobs just proposed, held to the policy's bounds but not to its per-step limit (``auto``
    does so when its range test damaged the run).  And it may
    define ``before_rollback(knobs)``, called when the guard rolls back, with the knobs that
    failed, before its state is restored to the snapshot's: what it learnt there (which rate
    broke the run) would otherwise be lost with the restore; ``on_backoff`` follows.
    """

    name: str

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]: ...

    def on_backoff(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
