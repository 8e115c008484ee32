"""A plain training loop with mixed precision, a ``GradScaler`` and gradient accumulation.

    python examples/amp_accumulation.py

The three rules that keep selftune's signals right in such a loop:

1. Step once per *optimizer* step, after the last micro-batch's backward: the gradients are then
   complete, and that is what selftune measures.
2. Pass the loss of the whole step (the mean over its micro-batches), through the scaler:
   ``scaler.step(opt, loss=...)`` forwards keyword arguments to ``opt.step``.
3. Let the scaler skip steps with non-finite gradients: it does not call ``opt.step`` then, so
   selftune neither counts nor learns from a step that never happened.
"""

from __future__ import annotations

import torch

import selftune


def train(
    steps: int = 200, accumulate: int = 4, micro_batch: int = 16, seed: int = 0
) -> tuple[selftune.SelfTuned, torch.amp.GradScaler, list[float]]:
    """Train a small MLP on a synthetic task; return the optimizer, the scaler and step losses."""
    torch.manual_seed(seed)
    x = torch.randn(4096, 16)
    y = (x @ torch.randn(16, 4)).argmax(dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = selftune.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3))
    # bfloat16 has float32's range, so on the CPU the scaler rarely has anything to do; the loop
    # is the same as with float16 on a GPU (device "cuda", dtype torch.float16).
    scaler = torch.amp.GradScaler("cpu")
    gen = torch.Generator().manual_seed(seed)
    step_losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad()
        total = torch.zeros(())
        for _ in range(accumulate):
            idx = torch.randint(0, len(x), (micro_batch,), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            # Divide so that the accumulated gradient is the mean over the step's micro-batches.
            scaler.scale(loss / accumulate).backward()
            total += loss.detach().float() / accumulate
        scaler.step(opt, loss=total)  # skipped (opt.step not called) if gradients are not finite
        scaler.update()
        step_losses.append(float(total))
    return opt, scaler, step_losses


if __name__ == "__main__":
    opt, _, losses = train()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; knobs now {opt.hyperparams()}")
