"""What the integrations record of a step, in one place for all.

Kept apart from either writer so that each imports only its own package: the MLflow writer must
not need TensorBoard installed to describe a decision.
"""

from __future__ import annotations

import math
from typing import Any

from selftune.controllers.base import Option, check_options
from selftune.tuner import Decision, StepEvent

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
    """One line for a guard event (skip, roll back, escalate) and its reason."""
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
