"""How torch's CPU kernels move one fine-tuning run of ``auto``, and whether this machine gives
the benchmark's committed rows to the bit: the figures the README quotes for the re-run.

selftune reads reductions (gradient and update norms, dot products), whose last bits depend on
the vectorised kernels torch picks for the CPU; ``auto``'s decisions carry a difference in them
on.  This runs one fine-tune (seed 0, ``auto`` from 1e-5) in a process per kernel set
(``ATEN_CPU_CAPABILITY``: this machine's own, ``avx2``, ``default``, the unvectorised ones),
then re-runs eight rows of the benchmark's full suite (digits-mlp and friedman-mlp, ``auto`` and
the optimizers at their defaults, seed 0) into a scratch folder and compares them with
``bench-results/results.jsonl``, timing fields aside.

Run from the repository root: ``PYTHONPATH=src python bench-results/finetune/kernels.py``;
writes ``kernels.json`` next to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from selftune.bench.runner import read_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CAPABILITIES = (None, "avx2", "default")
ONE_RUN = """
import importlib.util, json, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("finetune", {path!r})
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)
data = finetune.split(0)
row = finetune.finetune(0, data, finetune.pretrained(0, data), 1e-5, "auto")
print(json.dumps({{**row, "kernels": torch.backends.cpu.get_cpu_capability()}}))
"""
WORKLOADS, METHODS = "digits-mlp,friedman-mlp", "selftune-auto-sgd,selftune-auto-adamw,*-default"
TIMING = ("ms_per_step", "train_seconds", "seconds_to_target")


def one_run(capability: str | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    code = ONE_RUN.format(path=str(HERE / "finetune.py"))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def committed_rows() -> dict[str, Any]:
    """Re-run eight committed rows of the full suite; which come out the same to the bit."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "selftune.cli",
                "bench",
                "--suite",
                "full",
                "--out",
                scratch,
                "--workloads",
                WORKLOADS,
                "--methods",
                METHODS,
                "--seeds",
                "1",
                "--jobs",
                "1",
                "--no-report",
                "--quiet",
            ],
            check=True,
        )
        fresh = read_results(Path(scratch) / "results.jsonl")
    committed = read_results(ROOT / "bench-results" / "results.jsonl")

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["workload"], r["method"], r["seed"], r.get("lr0")

    def plain(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k not in TIMING}

    last = {key(r): plain(r) for r in committed}
    same = [key(r) for r in fresh if last.get(key(r)) == plain(r)]
    return {"rows": [list(key(r)) for r in fresh], "same_to_the_bit": len(same), "of": len(fresh)}


def main() -> None:
    runs = [one_run(c) for c in CAPABILITIES]
    out = {"auto_from_1e-5_seed_0": runs, "committed_rows": committed_rows()}
    (HERE / "kernels.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
