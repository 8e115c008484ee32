"""Peak memory of `selftune verify`, `selftune report` and `selftune.replay` on a long audit log.

Writes a real run (`selftune.wrap`, hypergradient, two param groups, 3,000 steps), extends its
log through `AuditLog.append` to `--records` records in the real decisions' pattern (four a
step, a guard event every 25,000 steps, a note every 97,000) with a trace row a step, then
runs each reader in a fresh process and records its peak resident memory (`ru_maxrss`).  The
log is written in a process of its own: Linux carries a process's peak over to the program it
starts, so a reader started from the writer would report the writer's peak.
The code measured is the `selftune` on `PYTHONPATH` (an older tree's `src` measures that
one), recorded by `--label` in `results.json` beside this script.

    PYTHONPATH=src python bench-results/long-log/measure.py --label after
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: each reader, run in its own process: it prints its peak resident memory in MB
READERS = {
    "verify": "from selftune.audit import verify; verify(RUN)",
    "report": "from selftune.report import write_report; write_report(RUN, OUT)",
    "replay": (
        "import torch, selftune\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(\n"
        "    torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))\n"
        "opt = torch.optim.SGD([{'params': model[0].parameters()},\n"
        "    {'params': model[2].parameters(), 'lr': 0.02}], lr=0.05, momentum=0.9)\n"
        "selftune.replay(opt, RUN)"
    ),
}
PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"


def write_run(out: Path, steps: int) -> None:
    """A real run of ``steps`` steps into ``out``."""
    import torch

    import selftune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 0.02},
    ]
    opt = selftune.wrap(
        torch.optim.SGD(groups, lr=0.05, momentum=0.9), "hypergradient", log_dir=out, seed=0
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g)
    y = x.sum(1, keepdim=True).sin()
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss)
    opt.close()


def extend(out: Path, total: int) -> int:
    """Append records in the real decisions' pattern until the log holds ``total``."""
    from selftune import audit

    real = audit.read_log(out).records
    decisions = [r for r in real if r["kind"] == "decision"]
    rng = random.Random(0)
    rows = (out / "trace.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    hp = [dict(h) for h in last["hp"]]
    step, count = last["step"], len(real)
    log = audit.AuditLog(out)
    with open(out / "trace.jsonl", "a") as trace:
        while count < total:
            step += 1
            loss = 0.05 * math.exp(rng.gauss(0, 0.3))
            if step % 25_000 == 0:
                reason = "gradient norm far above its running mean: step skipped"
                log.append(
                    {"kind": "guard", "step": step, "event": "skip", "signal": "grad_norm",
                     "value": 912.5, "reason": reason}
                )  # fmt: skip
                count += 1
            elif step % 97_000 == 0:
                log.append({"kind": "note", "step": step, "reason": f"a note at step {step}"})
                count += 1
            base = (step % (len(decisions) // 4)) * 4
            for r in decisions[base : base + 4]:
                group, knob = r["group"], r["knob"]
                old = hp[group][knob]
                new = old * (1.0 + rng.uniform(-0.02, 0.02))
                new = min(new, 0.99) if knob == "momentum" else new
                hp[group][knob] = new
                log.append(
                    {"kind": "decision", "step": step, "group": group, "knob": knob,
                     "old": old, "new": new, "value": new,
                     "signals": dict(r["signals"], loss=loss), "reason": r["reason"],
                     "clipped": rng.random() < 0.01}
                )  # fmt: skip
                count += 1
            trace.write(json.dumps({"step": step, "loss": loss, "hp": hp}) + "\n")
    log.close()
    return count


def peak_mb(code: str, run: Path, out: Path) -> float:
    """The peak resident memory of ``code`` in a fresh process, in MB."""
    script = f"RUN, OUT = {str(run)!r}, {str(out)!r}\n{code}\n{PEAK}\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=os.environ
    )
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the code measured, e.g. before, after")
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--write", metavar="RUN", help=argparse.SUPPRESS)  # the log's process
    args = parser.parse_args()
    if args.write:
        write_run(Path(args.write), 3000)
        print(extend(Path(args.write), args.records))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        written = subprocess.run(
            [sys.executable, __file__, "--label", args.label, "--records", str(args.records),
             "--write", str(run)],
            capture_output=True, text=True, check=True, env=os.environ,
        )  # fmt: skip
        records = int(written.stdout.strip().splitlines()[-1])
        size = (run / "decisions.jsonl").stat().st_size
        peaks = {name: peak_mb(code, run, Path(tmp) / "r.html") for name, code in READERS.items()}
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = {"records": records, "log_bytes": size, "peak_mb": peaks}
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results[args.label]))


if __name__ == "__main__":
    main()
