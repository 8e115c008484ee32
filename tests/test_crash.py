"""Kill a training run with SIGKILL at 20 moments, resume it each time, and finish it: the log
verifies after every kill, and the final weights, optimizer state and log records equal those of a
run that was never killed.  A second test kills a run inside a rewind in its own process.

The moments are drawn from a fixed seed: inside an optimizer step, in the middle of a log append,
inside a checkpoint save (before and after its rename), and at random times while every such moment
is widened.  Workers are real processes, forked from a server that has imported torch once
(``forkserver`` with preloading), because 22 interpreters that each import torch would cost far
more than all the training they do.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import crash_worker
import pytest
import torch
from crash_worker import EVERY, STEPS, Window
from dist_worker import assert_same_state, dropped_on_resume, log_body, make_model, train_step

import selftune
from selftune.audit import read_log, verify

FAULTS = 20
KINDS = ("step", "append", "checkpoint", "random")
WIDEN_S = 0.002  # each widened moment, in random-time kills
TIMEOUT_S = 60.0  # for any one message from a worker


def context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # torch.optim imports torch._dynamo on first use, the costliest import of all; and
    # "__main__" (pytest's script) spares each worker re-running it before it starts
    modules = ["__main__", "torch", "torch._dynamo", "selftune.checkpoint", "crash_worker"]
    ctx.set_forkserver_preload(modules)
    return ctx


def start(
    ctx: Any, run_dir: Path, window: Window | None = None, widen: float = 0.0
) -> tuple[Any, Connection, int]:
    """Start a worker and wait until it has resumed; return it, its pipe and its first step."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=crash_worker.run, args=(run_dir, window, widen, send))
    proc.start()
    send.close()  # so that a dead worker reads as EOF here, not as silence
    message = expect(receive, proc, "ready")
    return proc, receive, message[1]


def expect(conn: Connection, proc: Any, kind: str) -> tuple[Any, ...]:
    if not conn.poll(TIMEOUT_S):
        proc.kill()
        pytest.fail(f"no {kind!r} from the worker within {TIMEOUT_S} s")
    try:
        message: tuple[Any, ...] = conn.recv()
    except EOFError:
        proc.join()
        pytest.fail(f"the worker died (exit code {proc.exitcode}) before sending {kind!r}")
    assert message[0] == kind, f"expected {kind!r} from the worker, got {message}"
    return message


def finish(ctx: Any, run_dir: Path) -> int:
    proc, conn, first = start(ctx, run_dir)
    expect(conn, proc, "done")
    proc.join(TIMEOUT_S)
    assert proc.exitcode == 0
    return first


def plan(rng: random.Random, start_step: int) -> tuple[str, Window | None, float]:
    """The next fault: a window a little ahead (up to two checkpoints), or a random delay."""
    kind = KINDS[rng.randrange(len(KINDS))]
    at_step = min(start_step + rng.randrange(2 * EVERY), STEPS)
    if kind == "random" and start_step > STEPS - 40:
        kind = "step"  # a random delay could outlast the few steps left
    if kind == "random":
        return kind, None, rng.uniform(0.0, 0.3)
    nth = rng.choice((0, 1, 2))
    if kind == "checkpoint" and at_step > STEPS - EVERY and nth == 2:
        nth = 1  # after the final save's rename the run is done: nothing would be left to resume
    return kind, Window(kind, at_step, nth), 0.0


def test_killed_at_20_moments_the_run_resumes_to_the_same_end(
    tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    ctx = context()
    assert finish(ctx, tmp_path / "ref") == 1
    rng = random.Random(20240611)
    run_dir = tmp_path / "crashed"
    step, survived, seen, torn, temporaries = 1, 0, set(), 0, 0
    for _ in range(FAULTS):
        kind, window, delay = plan(rng, step)
        proc, conn, first = start(ctx, run_dir, window, widen=WIDEN_S if window is None else 0.0)
        assert first == step  # resumed where the last checkpoint said, not from scratch
        survived += bool(seen)  # the run killed last time came back
        try:
            if window is None:
                time.sleep(delay)
            else:
                message = expect(conn, proc, "window")
                assert message[1] == kind
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(TIMEOUT_S)
        finally:
            if proc.is_alive():  # a failed check: leave no worker sleeping behind
                proc.kill()
        assert proc.exitcode == -signal.SIGKILL, f"the {kind} fault did not land: {proc.exitcode}"
        seen.add(kind)
        result = verify(run_dir / "log")  # a torn tail is accepted; anything else raises
        torn += result.torn_tail
        assert result.torn_tail or kind != "append"
        temporaries += bool(list(run_dir.glob(".ckpt.pt.*.tmp")))
        step = _checkpoint_step(run_dir) + 1
    assert seen == set(KINDS)
    assert torn and temporaries  # logs were torn and saves cut short, and both were survived
    assert finish(ctx, run_dir) == step
    assert not list(run_dir.glob(".ckpt.pt.*.tmp"))  # saves clear what killed saves left
    survived += 1

    ref, end = (_final(tmp_path / d) for d in ("ref", "crashed"))
    assert_same_state(ref, end)
    ref_body, end_body = log_body(tmp_path / "ref" / "log"), log_body(run_dir / "log")
    lost = sum((_multiset(ref_body) - _multiset(end_body)).values())
    assert end_body == ref_body, f"{lost} records lost, or records changed or added"
    assert sum(dropped_on_resume(run_dir / "log")) > 0  # redone steps' records were cut away
    trace = (run_dir / "log" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "log" / "trace.jsonl").read_bytes()
    assert any(r["kind"] == "guard" for r in ref_body)  # rollbacks happened between crashes
    fault_counts["faults injected"] += FAULTS
    fault_counts["runs survived"] += survived
    fault_counts["records lost"] += lost


def test_killed_inside_a_rewind_after_the_log_was_cut_the_run_resumes_whole(
    tmp_path: Path, fault_counts: dict[str, int]
) -> None:
    """A script that goes back to its checkpoint in its own process (a retry) and is killed
    inside that load, after the log and trace were cut back to the checkpoint and before the
    note of the rewind: the folder is one of a run stopped at that checkpoint.  It verifies,
    resumes from it with no record dropped, ends as a run never killed nor rewound does, and
    replays to the same weights (the note is the in-process rewind's alone: a resume in a
    fresh process needs none)."""
    ctx = context()
    assert finish(ctx, tmp_path / "ref") == 1
    run_dir = tmp_path / "crashed"
    proc, conn, first = start(ctx, run_dir, Window("rewind", EVERY * 3 + 5))
    try:
        assert first == 1
        assert expect(conn, proc, "window")[1:] == ("rewind", EVERY * 3 + 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    result = verify(run_dir / "log")
    assert not result.torn_tail
    records = read_log(run_dir / "log").records
    assert max(r.get("step", 0) for r in records) <= EVERY * 3  # cut back to the checkpoint
    notes = [r for r in records if r["kind"] == "note"]
    assert notes and not [r for r in notes if "rewind" in r]  # the cut's note, not the rewind's
    assert finish(ctx, run_dir) == EVERY * 3 + 1
    assert_same_state(_final(tmp_path / "ref"), _final(run_dir))
    assert log_body(run_dir / "log") == log_body(tmp_path / "ref" / "log")
    # the records of steps 31-35 went with the cut; the resume found none left to drop
    (dropped,) = dropped_on_resume(run_dir / "log")
    assert dropped > 0
    trace = (run_dir / "log" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "log" / "trace.jsonl").read_bytes()
    model = make_model()
    replayed = selftune.replay(
        torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), run_dir / "log"
    )
    for t in range(1, STEPS + 1):
        train_step(model, replayed, t, rank=0, nan=t in crash_worker.NAN_STEPS)
    assert_same_state(_final(run_dir)["model"], model.state_dict())
    fault_counts["faults injected"] += 1
    fault_counts["runs survived"] += 1


def _multiset(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in records)


def _checkpoint_step(run_dir: Path) -> int:
    """The step of the checkpoint a resume would load (0 when there is none yet)."""
    path = run_dir / "ckpt.pt"
    if not path.exists():
        return 0
    step: int = torch.load(path, weights_only=True)["step"]
    return step


def _final(run_dir: Path) -> dict[str, Any]:
    saved = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert saved["step"] == STEPS
    own = saved["optimizer"]["selftune"]
    saved["optimizer"]["selftune"] = {k: v for k, v in own.items() if k != "log"}
    return {"model": saved["model"], "optimizer": saved["optimizer"]}
