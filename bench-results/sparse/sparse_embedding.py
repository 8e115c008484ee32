"""``auto`` on sparse gradients whose rows rarely repeat: SparseAdam on a 100-row embedding.

Run from the repository root: ``python bench-results/sparse/sparse_embedding.py`` (seconds); it
writes ``sparse_embedding.json`` next to itself.  Each of 100 embedding rows (width 8) must sum
to 1; a step draws 16 rows, so successive steps mostly touch different rows and the alignment of
a gradient with the last update is near zero.  SparseAdam at 0.01, plain and wrapped with
``auto``, 600 steps, seed 0; the full loss (all rows) and the rate every 50 steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import selftune


def run(wrapped: bool, steps: int = 600) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8, sparse=True)
    inner = torch.optim.SparseAdam(list(emb.parameters()), lr=0.01)
    opt = selftune.wrap(inner, "auto") if wrapped else inner
    gen = torch.Generator().manual_seed(1)
    rows = []
    for t in range(1, steps + 1):
        ids = torch.randint(0, 100, (16,), generator=gen)
        loss = emb(ids).sum(1).sub(1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if wrapped else opt.step()
        if t % 50 == 0 or t == 1:
            with torch.no_grad():
                full = float(emb.weight.sum(1).sub(1).square().mean())
            rows.append({"step": t, "full_loss": full, "lr": opt.param_groups[0]["lr"]
                         if not wrapped else opt.hyperparams()[0]["lr"]})  # fmt: skip
    return rows


def main() -> None:
    out = {"plain": run(False), "auto": run(True)}
    Path(__file__).with_name("sparse_embedding.json").write_text(json.dumps(out, indent=1) + "\n")
    for side, rows in out.items():
        print(side, " ".join(f"{r['step']}:{r['full_loss']:.4f}@{r['lr']:.3g}" for r in rows))


if __name__ == "__main__":
    main()
