"""selftune's per-step cost on a GPU: the benchmark's CNN and transformer, and a larger transformer.

    python bench-results/gpu/overhead_cuda.py --out DIR

Writes ``DIR/overhead-cuda.json`` (one row per workload, base and loop) and ``DIR/overhead-cuda.md``
(the table).  Each row is :func:`selftune.bench.overhead.measure` on the device, once with a loop
that reads the loss every step (``sync``) and once with one that does not, where selftune's own
read of its signals is the only thing that makes the host wait for the device.  The benchmark's
models are small enough that a step on this device is bound by kernel launches; the 512-wide,
6-layer transformer is bound by its arithmetic, as the models people tune on a GPU are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from selftune.bench.models import CharTransformer
from selftune.bench.overhead import measure
from selftune.bench.workloads import WORKLOADS

LARGE = dataclasses.replace(
    WORKLOADS["shakespeare-char"],
    make_model=lambda task: CharTransformer(task.vocab_size, width=512, layers=6, heads=8),
    batch_size=128,
)
CASES = {
    "mnist1d-cnn": WORKLOADS["mnist1d-cnn"],
    "shakespeare-char": WORKLOADS["shakespeare-char"],
    "shakespeare-char 512x6, batch 128": LARGE,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per side")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("overhead_cuda.py: no CUDA device here; run it where there is one")
    rows = []
    for label, workload in CASES.items():
        for base in ("sgd", "adamw"):
            for sync in (True, False):
                row = measure(workload, base, args.steps, device="cuda", sync=sync)
                row["workload"] = label
                row["gpu"] = torch.cuda.get_device_name()
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead-cuda.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"Per-step cost on {rows[0]['gpu']} (torch {rows[0]['torch_version']}), "
        f"{args.steps} steps per side, `auto` against the same optimizer unwrapped.",
        "",
        "| workload | base | loop reads the loss each step | plain ms/step | selftune ms/step "
        "| ratio |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['workload']} | {r['base']} | {'yes' if r['sync'] else 'no'} | "
        f"{r['plain_ms']:.2f} | {r['selftune_ms']:.2f} | {r['ratio']:.2f}x |"
        for r in rows
    ]
    (args.out / "overhead-cuda.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
