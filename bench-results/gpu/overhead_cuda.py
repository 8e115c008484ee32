"""selftune's per-step cost on a GPU: the benchmark's CNN and transformer, and a larger transformer.

    python bench-results/gpu/overhead_cuda.py --out DIR

Writes ``DIR/overhead-cuda.json`` (one row per workload, base and loop), ``DIR/memory-cuda.json``
(peak device memory of the larger transformer, plain and wrapped) and ``DIR/overhead-cuda.md``
(the tables).  Each row is :func:`selftune.bench.overhead.measure` on the device, once with a loop
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
from typing import Any

import torch

import selftune
from selftune import GuardConfig
from selftune.bench.models import CharTransformer
from selftune.bench.overhead import make_optimizer, measure
from selftune.bench.workloads import WORKLOADS

LARGE = dataclasses.replace(
    WORKLOADS["shakespeare-char"],
    make_model=lambda task: CharTransformer(task.vocab_size, width=512, layers=6, heads=8),
    batch_size=128,
)
LARGE_LABEL = "shakespeare-char 512x6, batch 128"
CASES = {
    "mnist1d-cnn": WORKLOADS["mnist1d-cnn"],
    "shakespeare-char": WORKLOADS["shakespeare-char"],
    LARGE_LABEL: LARGE,
}


def peak_memory(base: str, guard: GuardConfig | None, steps: int = 60) -> dict[str, Any]:
    """Peak device memory (MiB) of ``steps`` steps of the larger transformer, beyond its weights:
    plain (``guard`` None) or wrapped with ``auto`` and that guard (three snapshots by step 50)."""
    task = LARGE.task()
    torch.manual_seed(0)
    model = LARGE.make_model(task).to("cuda")
    opt: torch.optim.Optimizer = make_optimizer(base, model.parameters())
    if guard is not None:
        opt = selftune.wrap(opt, "auto", guard=guard, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [task.batch(LARGE.batch_size, gen) for _ in range(steps)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for x, y in batches:
        loss = task.loss(model, (x.to("cuda"), y.to("cuda")))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if guard is not None else opt.step()
    torch.cuda.synchronize()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    side = "plain" if guard is None else f"selftune, offload={guard.offload}"
    return {
        "base": base,
        "side": side,
        "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
        "weights_mib": weights / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per side")
    parser.add_argument("--only", help="time only the cases whose label contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("overhead_cuda.py: no CUDA device here; run it where there is one")
    rows = []
    for label, workload in CASES.items():
        if args.only and args.only not in label:
            continue
        for base in ("sgd", "adamw"):
            for sync in (True, False):
                row = measure(workload, base, args.steps, device="cuda", sync=sync)
                row["workload"] = label
                row["gpu"] = torch.cuda.get_device_name()
                rows.append(row)
                print(json.dumps(row), flush=True)
    memory = [
        peak_memory(base, guard)
        for base in ("sgd", "adamw")
        for guard in (None, GuardConfig(), GuardConfig(offload=False))
    ]
    for row in memory:
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead-cuda.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "memory-cuda.json").write_text(json.dumps(memory, indent=2) + "\n")
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
    lines += [
        "",
        f"Peak device memory beyond the weights, {LARGE_LABEL}, 60 steps:",
        "",
        "| base | side | peak MiB | × weights |",
        "| --- | --- | ---: | ---: |",
    ]
    lines += [
        f"| {m['base']} | {m['side']} | {m['peak_mib']:.0f} | "
        f"{m['peak_mib'] / m['weights_mib']:.2f} |"
        for m in memory
    ]
    (args.out / "overhead-cuda.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
