"""What the integrations record of a step, in one place for all.

Kept apart from either writer so that each imports only its own package: the MLflow writer must
not need TensorBoard installed to describe a decision.
"""

from __future__ import annotations

import math
from typing import Any

from selftune.controllers.base import Option, check_options
from selftune.errors import ConfigError
from selftune.tuner import Decision, SelfTuned, StepEvent

#: the range of each writer's counts of steps and decisions (see ``check_options``)
WRITER_OPTIONS = {
    "every": Option("steps between the knobs written", "1", 1, whole=True),
    "flush_every": Option(
        "new decisions between rewrites of the decisions file", "50", 1, whole=True
    ),
}


def check_writer_options(**values: Any) -> None:
    """Refuse a writer's count out of range, naming it (a ``"10"`` read off a config file once
    failed as a comparison of a str with an int)."""
    check_options({name: WRITER_OPTIONS[name] for name in values}, values)


class FollowsOne:
    """A writer that draws one optimizer's steps, and refuses a second when added to it.

    A second optimizer's steps start again at 1 and its knobs have the same names: a
    ``TensorBoardWriter`` read its step 1 as a rewind of the first and purged the first's
    points, an ``MLflowWriter`` mixed the two optimizers' knobs and decisions under one name.
    Each optimizer (and each run) takes a writer of its own, with its own prefix or place.
    """

    _added = False  # to an optimizer: the writer follows that one alone

    def _place(self) -> str:
        """Where the writer writes, to name in its refusal."""
        raise NotImplementedError

    def added_to(self, optimizer: SelfTuned) -> None:
        """Called by ``optimizer.add_listener``: refuse it if the writer follows another."""
        self.check_unused()
        self._added = True

    def check_unused(self) -> None:
        """Raise :class:`~selftune.ConfigError` if the writer was added to an optimizer: what
        builds the optimizers it is meant for asks before it builds them (Lightning's
        ``SelfTuneCallback`` before it wraps a fit's, which made a run folder of the refused
        fit)."""
        if self._added:
            raise ConfigError(
                f"this {type(self).__name__} (of {self._place()}) was already added to an "
                "optimizer: a writer draws one optimizer's steps, and another's, from step 1 "
                "again, would be drawn under the same names. Give each optimizer (and each "
                "run) a writer of its own, with its own prefix (prefix=f'selftune/opt{k}') or "
                "place; a resumed run takes a new writer over the same place"
            )


def describe(decision: Decision) -> str:
    """One line for a person: what changed, from what to what, who decided and why."""
    clipped = " (clipped by the policy)" if decision.clipped and decision.source != "bound" else ""
    reason = decision.reason.removeprefix(f"{decision.source}: ")  # "by the guard: guard: ..."
    return (
        f"step {decision.step}, group {decision.group}: {decision.knob} "
        f"{decision.old:.6g} → {decision.new:.6g} by the {decision.source}{clipped}: {reason}"
    )


def event_metric(event: StepEvent) -> float | None:
    """The evaluation metric the controller read at this step (given to ``observe`` before it,
    averaged over ranks), if one came and is finite: written whatever ``every`` is, since an
    evaluation is rare and a cut on the metric is read against it."""
    metric = None if event.signals is None else event.signals.metric
    return metric if metric is not None and math.isfinite(metric) else None


def describe_guard(step: int, guard: dict[str, Any]) -> str:
    """One line for a guard event (hold, skip, roll back, escalate, ...) and its reason."""
    return f"step {step}: guard {guard.get('event', '?')}: {guard.get('reason', '')}"


class StepKnobs:
    """A listener that keeps the knobs in force at the wrapper's last step.

    A framework logs after its LR scheduler has stepped, when ``hyperparams()`` gives the next
    step's rate (the scheduler's next one times selftune's scale): the Trainer's log showed
    the next step's rate beside its own ``learning_rate`` of the step.  ``knobs`` is ``None``
    before the first step.
    """

    def __init__(self) -> None:
        self.knobs: list[dict[str, float]] | None = None

    def __call__(self, event: StepEvent) -> None:
        self.knobs = event.hyperparams
