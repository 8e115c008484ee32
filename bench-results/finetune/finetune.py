"""selftune on fine-tuning: a network trained on one task, tuned on a small related one.

Fine-tuning starts from weights that already hold what the new task needs, at a rate well
below a training rate, and with little data: raising the rate can overwrite what was learnt,
and the training loss, which falls either way on a hundred examples, does not show it.  This
probes whether ``auto`` does harm there.

Data: scikit-learn's handwritten digits (8x8), split in two halves at random.  An MLP
(64-128-128 with a 10-class head) is trained on half of the first (plain AdamW, 1e-3, 600 steps;
task A).  Task B is the second half under a shift of domain (Gaussian noise of standard
deviation 0.15 on every pixel, drawn once per image): a fresh head is fine-tuned with the whole
network on 100 of its examples (10 per class) for 300 steps of 20, with AdamW at each rate of a
grid (1e-5 to 3e-3): plain; wrapped with ``selftune.wrap`` at its defaults; the same with the
accuracy on 200 other examples of B given to ``observe`` every 25 steps; wrapped with the rate
bounded at 10x its start (``bounds={"lr": (1e-3, 10.0)}``); wrapped with no range test
(``range_test=False``); and, for what the pretraining is worth, plain from a fresh network.
Then with discriminative rates, the fine-tuner's usual split (the body at a tenth of the head's
rate, two param groups): plain; wrapped at its defaults, each group tuned on its own; and
wrapped with ``groups="joint"``, the two tuned as one with their ratio kept.
Measured on the rest of B (599 examples): accuracy at the end; and on A's test half, through A's
own head, how much of A is left (forgetting).  Seeds 0-4 (the pretraining, the split, the noise
and the order of batches).

Run from the repository root: ``PYTHONPATH=src python bench-results/finetune/finetune.py``;
writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import selftune

HERE = Path(__file__).resolve().parent
RATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
VARIANTS = (
    "plain",
    "auto",
    "auto-observe",
    "auto-10x",
    "auto-no-test",
    "scratch",
    "plain-split",
    "auto-split",
    "auto-split-joint",
)
#: the variants whose body steps at a tenth of the head's rate (the rate of the grid)
SPLIT = {"plain-split": 0.1, "auto-split": 0.1, "auto-split-joint": 0.1}
#: the wrapped variants whose rate at the end (the head's) the table gives, and the body's
FINAL = ("auto", "auto-no-test", "auto-split", "auto-split-joint")
FINAL_BODY = ("auto-split", "auto-split-joint")
#: how each wrapped variant calls ``selftune.wrap`` (``auto-10x``: the rate may rise at most
#: 10x above its start, the bound a user who knows the run fine-tunes can set; ``auto-no-test``:
#: no range test, the cruise starting at the rate given, for a user who trusts it)
WRAP: dict[str, dict[str, Any]] = {
    "auto": {},
    "auto-observe": {},
    "auto-10x": {"bounds": {"lr": (1e-3, 10.0)}},
    "auto-no-test": {"range_test": False},
    "auto-split": {},
    "auto-split-joint": {"groups": "joint"},
}
SEEDS = range(5)
PRETRAIN, FINETUNE, BATCH, SHOTS, VALIDATION, EVERY = 600, 300, 20, 10, 200, 25
DOMAIN_NOISE = 0.15  #: the standard deviation of task B's pixel noise


def split(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Task A's train and test halves (clean digits); task B's shots, validation and test: the
    other half under a shift of domain (Gaussian pixel noise, drawn once per image)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    a, b = order[: len(y) // 2], order[len(y) // 2 :]
    noisy = x + DOMAIN_NOISE * torch.randn(x.shape, generator=gen)
    shots = torch.cat([b[y[b] == c][:SHOTS] for c in range(10)])
    rest = b[~torch.isin(b, shots)]
    half = len(a) // 2
    return {
        "a_train": (x[a[:half]], y[a[:half]]),
        "a_test": (x[a[half:]], y[a[half:]]),
        "b_train": (noisy[shots], y[shots]),
        "b_val": (noisy[rest[:VALIDATION]], y[rest[:VALIDATION]]),
        "b_test": (noisy[rest[VALIDATION:]], y[rest[VALIDATION:]]),
    }


def accuracy(body: nn.Module, head: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((head(body(data[0])).argmax(1) == data[1]).float().mean())


def pretrained(seed: int, data: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """The body and task A's head after plain training on A."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    head = nn.Linear(128, 10)
    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=1e-3)
    x, y = data["a_train"]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(PRETRAIN):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return body, head


def finetune(
    seed: int, data: dict[str, Any], base: tuple[nn.Module, nn.Module], rate: float, variant: str
) -> dict[str, Any]:
    """Fine-tune a copy of the pretrained body with a fresh head for B."""
    body, head_a = copy.deepcopy(base[0]), base[1]
    torch.manual_seed(100 + seed)
    head = nn.Linear(128, 10)
    if variant == "scratch":  # the same network, not pretrained: what the pretraining is worth
        for layer in body:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    if variant in SPLIT:  # the head's group last
        groups: Any = [
            {"params": list(body.parameters()), "lr": rate * SPLIT[variant]},
            {"params": list(head.parameters())},
        ]
    else:
        groups = [*body.parameters(), *head.parameters()]
    inner = torch.optim.AdamW(groups, lr=rate)
    wrapped = variant in WRAP
    opt: Any = selftune.wrap(inner, seed=seed, **WRAP[variant]) if wrapped else inner
    x, y = data["b_train"]
    gen = torch.Generator().manual_seed(200 + seed)
    for t in range(1, FINETUNE + 1):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        if wrapped:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if variant == "auto-observe" and t % EVERY == 0:
            opt.observe(accuracy(body, head, data["b_val"]), mode="max")
    row = {
        "seed": seed,
        "rate": rate,
        "variant": variant,
        "b_test": accuracy(body, head, data["b_test"]),
        "a_left": accuracy(body, head_a, data["a_test"]),
    }
    if wrapped:
        row["final_rate"] = opt.hyperparams()[-1]["lr"]
        if variant in SPLIT:
            row["final_body_rate"] = opt.hyperparams()[0]["lr"]
    return row


def table(rows: list[dict[str, Any]], pretrained_a: list[float]) -> str:
    """Median over seeds of B's test accuracy and of A's left, per start rate and variant."""
    lines = [
        f"Task A's test accuracy after pretraining: median {statistics.median(pretrained_a):.3f}.",
        "",
        "| AdamW rate at the start | "
        + " | ".join(f"B test: {v}" for v in VARIANTS)
        + " | "
        + " | ".join(f"A left: {v}" for v in VARIANTS)
        + "".join(f" | final rate: {v} (median)" for v in FINAL)
        + "".join(f" | body's final rate: {v} (median)" for v in FINAL_BODY)
        + " |",
        "|---:|" + "---:|" * (2 * len(VARIANTS) + len(FINAL) + len(FINAL_BODY)),
    ]
    for rate in RATES:

        def med(variant: str, key: str, rate: float = rate) -> float:
            return statistics.median(
                r[key] for r in rows if r["rate"] == rate and r["variant"] == variant
            )

        lines.append(
            f"| {rate:g} | "
            + " | ".join(f"{med(v, 'b_test'):.3f}" for v in VARIANTS)
            + " | "
            + " | ".join(f"{med(v, 'a_left'):.3f}" for v in VARIANTS)
            + "".join(f" | {med(v, 'final_rate'):.2g}" for v in FINAL)
            + "".join(f" | {med(v, 'final_body_rate'):.2g}" for v in FINAL_BODY)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    rows, pretrained_a = [], []
    for seed in SEEDS:
        data = split(seed)
        base = pretrained(seed, data)
        pretrained_a.append(accuracy(*base, data["a_test"]))
        for rate in RATES:
            for variant in VARIANTS:
                rows.append(finetune(seed, data, base, rate, variant))
    out = {"pretrained_a_test": pretrained_a, "runs": rows}
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (HERE / "table.md").write_text(table(rows, pretrained_a), encoding="utf-8")
    print(table(rows, pretrained_a))


if __name__ == "__main__":
    main()
