"""`stability` on the guard tests' task: how often the guard rolls it back, and where it ends.

The task of ``tests/test_guard.py``'s clean long run (``tests/faults.py``: a small tanh MLP
fitting a noisy teacher, seed 1) trained 2,000 steps by SGD with momentum at the tests' rate,
wrapped by ``selftune.wrap(..., "stability")`` with the default guard.  Written: the steps of
the guard's rollbacks and the full-data loss at the start and the end.  Run from the repository
root: ``PYTHONPATH=src:tests python bench-results/stability-ceiling/guard_task.py OUT.json``
(a few seconds); ``guard-task.json`` is its output with the ceiling, ``guard-task-before.json``
with the code before it (commit 7f90ad9~1).
"""

from __future__ import annotations

import json
import sys

from faults import make_optimizer, make_task, train

import selftune


def main(out: str) -> None:
    task = make_task(seed=1)
    start = task.full_loss()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "stability")
    events: list[selftune.StepEvent] = []
    opt.add_listener(events.append)
    train(task, opt, 2000, evaluate=False)
    rollbacks = [e.step for e in events if e.guard is not None and e.guard["event"] == "rollback"]
    result = {"start_loss": start, "final_loss": task.full_loss(), "rollbacks": rollbacks}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{len(rollbacks)} rollbacks (steps {rollbacks}); full-data loss {start:.4g} -> "
        f"{result['final_loss']:.4g}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
