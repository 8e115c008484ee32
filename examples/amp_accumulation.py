"""A plain training loop with mixed precision, a ``GradScaler`` and gradient accumulation.

    python examples/amp_accumulation.py            # bfloat16 on the CPU
    python examples/amp_accumulation.py cuda       # float16 on a GPU

The three rules that keep selftune's signals right in such a loop:

1. Step once per *optimizer* step, after the last micro-batch's backward: the gradients are then
   complete, and that is what selftune measures.
2. Pass the loss of the whole step (the mean over its micro-batches), through the scaler:
   ``scaler.step(opt, loss=...)`` forwards keyword arguments to ``opt.step``.
3. Let the scaler skip steps with non-finite gradients: it does not call ``opt.step`` then, so
   selftune neither counts nor learns from a step that never happened.
"""

from __future__ import annotations

import sys

import torch

import selftune


def train(
    steps: int = 200,
    accumulate: int = 4,
    micro_batch: int = 16,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[selftune.SelfTuned, torch.amp.GradScaler, list[float]]:
    """Train a small MLP on a synthetic task; return the optimizer, the scaler and step losses.

    On the CPU autocast runs in bfloat16, which has float32's range, so the scaler rarely has
    anything to do; on a GPU (``device="cuda"``) it runs in float16, whose overflows the scaler
    finds and skips.  The loop is the same.
    """
    torch.manual_seed(seed)
    x = torch.randn(4096, 16)
    y = (x @ torch.randn(16, 4)).argmax(dim=1)
    x, y = x.to(device), y.to(device)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = selftune.wrap(torch.optim.AdamW(model.to(device).parameters(), lr=1e-3))
    kind = torch.device(device).type
    dtype = torch.bfloat16 if kind == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(kind)
    gen = torch.Generator(device=device).manual_seed(seed)
    step_losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for _ in range(accumulate):
            idx = torch.randint(0, len(x), (micro_batch,), generator=gen, device=device)
            with torch.autocast(kind, dtype=dtype):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            # Divide so that the accumulated gradient is the mean over the step's micro-batches.
            scaler.scale(loss / accumulate).backward()
            total += loss.detach().float() / accumulate
        scaler.step(opt, loss=total)  # skipped (opt.step not called) if gradients are not finite
        scaler.update()
        step_losses.append(float(total))
    return opt, scaler, step_losses


if __name__ == "__main__":
    opt, _, losses = train(device=sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; knobs now {opt.hyperparams()}")
