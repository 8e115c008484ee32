"""The decisions of one `selftune-auto-muon` run of ``muon.py``: where its rates went, and why.

Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/muon/trace.py WORKLOAD SEED``; prints the steps to target and every decision of
the run's log (the range test's growth folded into its first and last step), and writes the
same to ``trace-WORKLOAD-SEED.txt`` next to this file.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import muon  # noqa: E402


def main(workload: str, seed: int) -> None:
    import selftune
    from selftune.bench import workloads
    from selftune.bench.runner import one_thread, train

    folder = Path(tempfile.mkdtemp()) / "run"
    method = muon.build("selftune-auto-muon")
    wrap = selftune.wrap

    def logged(*args: Any, **kwargs: Any) -> selftune.SelfTuned:
        return wrap(*args, **kwargs, log_dir=folder)

    selftune.wrap = logged  # the probe's own row, with a log
    try:
        (chosen,) = workloads.select([workload])
        with one_thread():
            record = train(chosen, method, seed)
    finally:
        selftune.wrap = wrap
    lines = [f"{workload} seed {seed}: steps to target {record['steps_to_target']}"]
    ramp: list[dict[str, Any]] = []
    for line in (folder / "decisions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("kind") not in ("decision", "guard"):
            continue
        if r.get("kind") == "decision" and str(r["reason"]).startswith("range test: steps not"):
            ramp.append(r)
            continue
        lines.extend(_ramp(ramp))
        ramp = []
        what = r.get("event") if r["kind"] == "guard" else f"{r['old']:.4g} -> {r['new']:.4g}"
        lines.append(f"step {r['step']} group {r.get('group', '-')} {what}: {r.get('reason')}")
    lines.extend(_ramp(ramp))
    text = "\n".join(lines) + "\n"
    (HERE / f"trace-{workload}-{seed}.txt").write_text(text, encoding="utf-8")
    print(text, end="")


def _ramp(ramp: list[dict[str, Any]]) -> list[str]:
    """The range test's growth, one line per group: from its first step to its last."""
    out = []
    for group in sorted({r["group"] for r in ramp}):
        mine = [r for r in ramp if r["group"] == group]
        out.append(
            f"steps {mine[0]['step']}-{mine[-1]['step']} group {group} "
            f"{mine[0]['old']:.4g} -> {mine[-1]['new']:.4g}: range test, growing"
        )
    return out


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
