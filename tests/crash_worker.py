"""A training run that the crash test kills: it checkpoints every few steps and, started again,
resumes from its last checkpoint until it is done.

The run is the toy problem of ``dist_worker.py`` with SGD and the ``hypergradient`` controller
(which changes a knob at almost every step, so that there are log appends to tear) and NaN losses
at two steps (so that the guard rolls back between crashes too).  The final checkpoint, at the last
step, marks the run as done.

To put a kill inside a particular moment, a ``Window`` makes the worker announce that it is there
(on ``conn``) and then wait to be killed:

- ``step``: inside the optimizer step of ``at_step``, after the weights moved but before the log and
  trace were written;
- ``append``: in the middle of writing the first record at or after ``at_step`` (half the line is
  on disk, as in a torn write);
- ``checkpoint``: inside the first checkpoint save at or after ``at_step``: ``nth`` 0 halfway
  through writing the file, 1 at its fsync (written, not yet renamed), 2 at the folder's fsync
  (renamed, not yet durable);
- ``rewind``: after step ``at_step`` the run goes back in its own process to its last checkpoint
  (a retry), and is killed inside that load, after the log and trace were cut back to the
  checkpoint and before the note of the rewind was written.

``widen`` (seconds) makes every such moment last that long without announcing it, so that kills at
random times land in them more often.  Run it directly to train to the end:
``python tests/crash_worker.py RUN_DIR``.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from dist_worker import make_model, train_step

import selftune
from selftune import audit
from selftune.checkpoint import load_checkpoint, save_checkpoint
from selftune.tuner import SelfTuned

STEPS, EVERY = 100, 10
NAN_STEPS = (45, 80)


@dataclass(frozen=True)
class Window:
    kind: str  #: "step", "append", "checkpoint" or "rewind"
    at_step: int
    nth: int = 1  #: where in the checkpoint save: 0 mid-write, 1 and 2 its two fsyncs


def make_optimizer(model: torch.nn.Module, log_dir: Path) -> SelfTuned:
    inner = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return selftune.wrap(inner, "hypergradient", log_dir=log_dir, seed=0)


def run(
    run_dir: Path,
    window: Window | None = None,
    widen: float = 0.0,
    conn: Connection | None = None,
    steps: int = STEPS,
) -> int:
    """Train from the last checkpoint (or from scratch) to ``steps``; return the first step run."""
    torch.set_num_threads(1)
    ckpt, log_dir = run_dir / "ckpt.pt", run_dir / "log"
    progress = {"step": 0, "saving": False, "fsyncs": 0, "fired": False}

    def hold(kind: str) -> None:
        """Stay inside the moment: until killed when it is the window, else for ``widen`` s."""
        if window is not None and window.kind == kind and not progress["fired"]:
            progress["fired"] = True
            if conn is not None:
                conn.send(("window", kind, progress["step"]))
            time.sleep(60)  # the test kills us here
            raise RuntimeError(f"not killed inside the {kind} window")
        if widen:
            time.sleep(widen)

    def due(kind: str) -> bool:
        return window is None or window.kind != kind or progress["step"] >= window.at_step

    _patch_append(lambda: hold("append") if due("append") else time.sleep(widen))
    _patch_fsync(progress, window, hold)
    _patch_torch_save(progress, window, hold)

    model = make_model()
    opt = make_optimizer(model, log_dir)
    _patch_inner_step(opt, lambda: hold("step") if due("step") else time.sleep(widen))
    _patch_rewind_note(opt, lambda: hold("rewind"))
    start = 1
    if ckpt.exists():
        start = load_checkpoint(ckpt, model=model, optimizer=opt)["step"] + 1
    else:  # before any step: a crash from here on always has a checkpoint to resume from
        _save(ckpt, model, opt, 0, progress)
    if conn is not None:
        conn.send(("ready", start))
    t = start
    while t <= steps:
        progress["step"] = t
        train_step(model, opt, t, rank=0, nan=t in NAN_STEPS)
        if t % EVERY == 0 or t == steps:
            _save(ckpt, model, opt, t, progress)
        if window is not None and window.kind == "rewind" and t == window.at_step:
            t = load_checkpoint(ckpt, model=model, optimizer=opt)["step"]  # a retry
        t += 1
    opt.close()
    if conn is not None:
        conn.send(("done", start))
    return start


def _save(ckpt: Path, model: torch.nn.Module, opt: SelfTuned, t: int, progress: dict) -> None:
    progress["saving"] = True
    try:
        save_checkpoint(ckpt, model=model, optimizer=opt, step=t)
    finally:
        progress["saving"] = False


def _patch_append(inside: Callable[[], None]) -> None:
    """Write each record in two halves with ``inside()`` between them: a torn line, if killed."""

    def write(self: audit.AuditLog, fd: int, line: bytes) -> None:
        half = len(line) // 2
        os.write(fd, line[:half])
        inside()
        os.write(fd, line[half:])

    audit.AuditLog._write = write  # type: ignore[method-assign]


def _patch_fsync(progress: dict[str, Any], window: Window | None, hold: Callable) -> None:
    """Call ``hold`` at the chosen fsync of the chosen checkpoint save."""
    real = os.fsync

    def fsync(fd: Any) -> None:
        if progress["saving"]:
            progress["fsyncs"] += 1
            due = window is None or (
                window.kind == "checkpoint"
                and progress["step"] >= window.at_step
                and window.nth > 0
                and progress["fsyncs"] % 2 == window.nth % 2
            )
            if due:
                real(fd)
                hold("checkpoint")
                return
        real(fd)

    os.fsync = fsync


def _patch_torch_save(progress: dict[str, Any], window: Window | None, hold: Callable) -> None:
    """Write a checkpoint in two halves with ``hold`` between them when it is the window."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        due = progress["saving"] and (
            window is None
            or (
                (window.kind == "checkpoint" and progress["step"] >= window.at_step)
                and window.nth == 0
            )
        )
        if not due:
            real(obj, f, *args, **kwargs)
            return
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        hold("checkpoint")
        f.write(data[len(data) // 2 :])

    torch.save = save


def _patch_inner_step(opt: SelfTuned, inside: Callable[[], None]) -> None:
    """Call ``inside()`` right after the wrapped optimizer moved the weights."""
    inner = opt.optimizer
    real = inner.step

    def step(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        inside()
        return result

    inner.step = step  # type: ignore[method-assign]


def _patch_rewind_note(opt: SelfTuned, inside: Callable[[], None]) -> None:
    """Call ``inside()`` in a load that rewinds ``opt`` (its step count behind the furthest it
    took), after the log and trace were cut back and before the rewind's note is written."""
    real = opt._note_rewind

    def note(*args: Any, **kwargs: Any) -> None:
        if opt.step_count < opt._furthest:
            inside()
        real(*args, **kwargs)

    opt._note_rewind = note  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--widen", type=float, default=0.0)
    args = parser.parse_args()
    print(f"resumed at step {run(args.run_dir, widen=args.widen)}")
