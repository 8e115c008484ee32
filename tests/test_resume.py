"""A run resumed from a checkpoint ends bit-identical to one that never stopped; checkpoints fail
loudly when they are missing or damaged and are never left half-written.

The 2-rank DDP version of the resume check is in ``test_distributed.py``; killing real processes
at random moments is in ``test_crash.py``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_worker import (
    OPTIMIZERS,
    SEED,
    assert_same_state,
    batch,
    dropped_on_resume,
    final_state,
    log_body,
    make_inner,
    make_model,
    make_optimizer,
    train_step,
)

import selftune
from selftune import audit, checkpoint
from selftune.audit import read_log
from selftune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selftune.tuner import SelfTuned

STEPS = 60
NAN_STEP = 40  # after the guard's snapshot at step 25 and a checkpoint at step 30


def train(
    model: torch.nn.Module, opt: SelfTuned, steps: range, nan_step: int | None = None
) -> None:
    for t in steps:
        train_step(model, opt, t, rank=0, nan=t == nan_step)


def reference(name: str, log_dir: Path, nan_step: int | None = None) -> dict[str, Any]:
    model = make_model()
    opt = make_optimizer(name, model, log_dir)
    train(model, opt, range(1, STEPS + 1), nan_step)
    opt.close()
    return final_state(model, opt)


def interrupted(
    name: str,
    log_dir: Path,
    ckpt_step: int,
    stop_step: int,
    nan_step: int | None = None,
    round_trip: bool = False,
    crashed: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Checkpoint at ``ckpt_step``, go on to ``stop_step`` and drop everything (a crash), then
    resume from the checkpoint with fresh objects and the same folder and finish the run.
    ``round_trip``: first load the fresh optimizer's own state into it, as accelerate's
    optimizer wrapper does when the Hugging Face ``Trainer`` prepares it for a resume.
    ``crashed``: called with the run folder after the crash, to leave what a crash leaves."""
    ckpt = log_dir.parent / f"{log_dir.name}.ckpt"
    model = make_model()
    opt = make_optimizer(name, model, log_dir)
    for t in range(1, stop_step + 1):
        train_step(model, opt, t, rank=0, nan=t == nan_step)
        if t == ckpt_step:
            save_checkpoint(ckpt, model=model, optimizer=opt, step=t)
    opt.close()
    if crashed is not None:
        crashed(log_dir)
    torch.manual_seed(999)  # the resumed run must not depend on the generator it finds
    model = make_model()
    opt = make_optimizer(name, model, log_dir)
    if round_trip:
        opt.load_state_dict(opt.state_dict())
    start = load_checkpoint(ckpt, model=model, optimizer=opt)["step"] + 1
    assert start == ckpt_step + 1
    train(model, opt, range(start, STEPS + 1), nan_step)
    opt.close()
    return final_state(model, opt)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stopped_at_a_checkpoint_and_resumed_writes_the_same_bytes(
    tmp_path: Path, name: str
) -> None:
    ref = reference(name, tmp_path / "ref")
    res = interrupted(name, tmp_path / "res", ckpt_step=STEPS // 2, stop_step=STEPS // 2)
    assert_same_state(ref, res)
    for file in ("decisions.jsonl", "trace.jsonl"):
        assert (tmp_path / "res" / file).read_bytes() == (tmp_path / "ref" / file).read_bytes()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_crashed_after_a_checkpoint_and_resumed_redoes_the_lost_steps(
    tmp_path: Path, name: str
) -> None:
    ref = reference(name, tmp_path / "ref")
    res = interrupted(name, tmp_path / "res", ckpt_step=5, stop_step=30)
    assert_same_state(ref, res)
    (dropped,) = dropped_on_resume(tmp_path / "res")
    assert dropped > 0, "no decisions between checkpoint and crash: the test lost its power"
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")
    trace = (tmp_path / "res" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()  # no step twice


@pytest.mark.parametrize("damaged", [range(22, 25), range(19, 22)], ids=["past", "through"])
def test_a_trace_damaged_past_the_checkpoint_is_cut_with_the_steps_redone(
    tmp_path: Path, damaged: range
) -> None:
    """A power cut may leave the blocks of the trace's rows past the last checkpoint as NULs
    (the checkpoint forced the rows before it to disk, not those after).  The resume was
    refused over them as a damaged trace, after it had cut the log back and loaded the
    optimizer, and so was every later resume from that checkpoint.  Rows damaged through the
    checkpoint's step are cut too, and said to be."""

    def power_cut(log_dir: Path) -> None:
        rows = (log_dir / "trace.jsonl").read_bytes().split(b"\n")
        lost = slice(damaged.start - 1, damaged.stop - 1)
        rows[lost] = [bytes(len(b"\n".join(rows[lost])))]
        (log_dir / "trace.jsonl").write_bytes(b"\n".join(rows))

    ref = reference("sgd", tmp_path / "ref")
    told = r"rows of steps 19-20 were lost to damage \(1 rows"
    with pytest.warns(UserWarning, match=told) if damaged.start < 20 else contextlib.nullcontext():
        res = interrupted("sgd", tmp_path / "res", ckpt_step=20, stop_step=30, crashed=power_cut)
    assert_same_state(ref, res)
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")
    steps = [json.loads(line)["step"] for line in (tmp_path / "res" / "trace.jsonl").open()]
    assert steps == [t for t in range(1, STEPS + 1) if not (t in damaged and t <= 20)]


@pytest.mark.parametrize(
    "schedule",
    [lambda t: min(1.0, (t + 1) / 30), lambda t: 0.5 ** (t // 4)],
    ids=["warm-up", "step-decay"],
)
def test_a_run_resumed_mid_warm_up_holds_the_same_rises(
    tmp_path: Path, schedule: Callable[[int], float]
) -> None:
    """``auto`` holds a warm-up's rises above the highest rate the scheduler had set (here its
    range test grows from the rate held): that highest rate is in the checkpoint, or the
    resumed run reads no rise at its first step and grows from another rate.  Likewise the
    rate its last step read, which a decay's cut is read against (the range test grows on
    through it)."""

    def run(folder: Path, steps: range, ckpt: Path | None = None) -> dict[str, Any]:
        model = make_model()
        opt = make_optimizer("adamw", model, folder)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        if ckpt is not None:
            sched.load_state_dict(load_checkpoint(ckpt, model=model, optimizer=opt)["extra"])
        for t in steps:
            train_step(model, opt, t, rank=0)
            sched.step()
            if t == 12 and ckpt is None:
                extra = sched.state_dict()
                save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=t, extra=extra)
        opt.close()
        return final_state(model, opt)

    ref = run(tmp_path / "ref", range(1, 41))
    run(tmp_path / "res", range(1, 13))
    res = run(tmp_path / "res", range(13, 41), ckpt=tmp_path / "c.pt")
    assert_same_state(ref, res)
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")


def test_a_fresh_optimizer_loading_its_own_state_keeps_the_folders_trace(tmp_path: Path) -> None:
    """Loading a fresh wrapper's own state changes nothing, so it cuts nothing from the folder
    it reopened: it once cut the trace back to step 0, and the Hugging Face ``Trainer``'s resume
    (accelerate loads each optimizer's own state when it prepares it) lost every row before
    the checkpoint."""
    ref = reference("adamw", tmp_path / "ref")
    res = interrupted("adamw", tmp_path / "res", ckpt_step=20, stop_step=30, round_trip=True)
    assert_same_state(ref, res)
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")
    trace = (tmp_path / "res" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()


def test_a_run_that_crashed_before_its_first_record_resumes_from_its_step_0_checkpoint(
    tmp_path: Path,
) -> None:
    """The checkpoint saved before the first step, with the log still empty at the crash: the
    state looked like the fresh wrapper's own (same step, same log position), the trace was not
    cut, and the resume was refused at step 1 with advice to load the checkpoint just loaded.
    A script started again without its resume is refused before its step-0 checkpoint replaces
    the run's last one, which left nothing to resume."""

    def build() -> tuple[torch.nn.Module, SelfTuned]:
        model = make_model()
        return model, selftune.wrap(make_inner("sgd", model), "off", log_dir=tmp_path / "run")

    def finish(model: torch.nn.Module, opt: SelfTuned, start: int) -> dict[str, Any]:
        train(model, opt, range(start, 41))
        opt.close()
        return final_state(model, opt)

    model, opt = build()
    ref = finish(model, opt, 1)
    reference_trace = (tmp_path / "run" / "trace.jsonl").read_bytes()
    for name in ("decisions.jsonl", "trace.jsonl"):
        (tmp_path / "run" / name).unlink()
    (tmp_path / "run" / "manifest.json").unlink()
    model, opt = build()
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, step=0)
    train(model, opt, range(1, 21))  # then the crash, before any record
    opt.close()
    assert read_log(tmp_path / "run").records == [], "a record: the test lost its power"
    model, opt = build()
    with pytest.raises(CheckpointError, match="already holds steps of a run"):
        save_checkpoint(tmp_path / "other", model=model, optimizer=opt, step=0)
    assert not (tmp_path / "other").exists()
    assert load_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt)["step"] == 0
    assert_same_state(ref, finish(model, opt, 1))
    assert (tmp_path / "run" / "trace.jsonl").read_bytes() == reference_trace


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_rollback_after_resuming_restores_the_same_snapshot(tmp_path: Path, name: str) -> None:
    """The guard's snapshots live in memory: the checkpoint must carry them, or the resumed
    run rolls back to a snapshot taken at its first step instead of the one from step 25."""
    ref = reference(name, tmp_path / "ref", nan_step=NAN_STEP)
    res = interrupted(name, tmp_path / "res", ckpt_step=30, stop_step=30, nan_step=NAN_STEP)
    body = log_body(tmp_path / "ref")
    (rollback,) = [r for r in body if r["kind"] == "guard"]
    assert (rollback["step"], rollback["restored_step"]) == (NAN_STEP, 25)
    assert log_body(tmp_path / "res") == body
    assert_same_state(ref, res)


@pytest.mark.parametrize(("ckpt_step", "initial"), [(60, 1), (130, None)])
def test_the_checkpoint_carries_the_first_snapshot_while_the_guard_keeps_it(
    tmp_path: Path, ckpt_step: int, initial: int | None
) -> None:
    """The first snapshot (a controller's restart point) is kept for 100 steps besides the newest
    two; at step 60 only the checkpoint can bring it back; the snapshot at step 125 drops it."""
    model = make_model()
    opt = make_optimizer("sgd", model, None)
    train(model, opt, range(1, ckpt_step + 1))
    assert opt.guard is not None and [s.step for s in opt.guard.snapshots] == [
        ckpt_step // 25 * 25 - 25,
        ckpt_step // 25 * 25,
    ]
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, step=ckpt_step)
    fresh = make_optimizer("sgd", make_model(), None)
    load_checkpoint(tmp_path / "ckpt", model=make_model(), optimizer=fresh)
    assert fresh.guard is not None
    for guard in (opt.guard, fresh.guard):
        assert (guard.initial.step if guard.initial else None) == initial
        assert [s.step for s in guard.snapshots] == [s.step for s in opt.guard.snapshots]
    if initial is not None:
        saved = [p for g in opt.guard.initial.payload["params"] for p in g]
        loaded = [p for g in fresh.guard.initial.payload["params"] for p in g]
        assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))


def test_without_the_snapshots_the_rollback_goes_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: it detects a checkpoint that drops the snapshots."""
    monkeypatch.setattr(checkpoint, "_restore_guard_snapshots", lambda opt, saved: None)
    reference("sgd", tmp_path / "ref", nan_step=NAN_STEP)
    interrupted("sgd", tmp_path / "res", ckpt_step=30, stop_step=30, nan_step=NAN_STEP)
    (rollback,) = [r for r in log_body(tmp_path / "res") if r["kind"] == "guard"]
    assert rollback["restored_step"] == 31
    assert log_body(tmp_path / "res") != log_body(tmp_path / "ref")


# --------------------------------------------------------------------------- the file itself


@pytest.fixture
def trained(tmp_path: Path) -> tuple[torch.nn.Module, SelfTuned]:
    model = make_model()
    opt = make_optimizer("adamw", model, tmp_path / "run")
    train(model, opt, range(1, 4))
    return model, opt


def test_random_generators_and_extra_come_back(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    np = pytest.importorskip("numpy")  # optional: checkpoints cover it when it is installed
    model, opt = trained
    path = save_checkpoint(
        tmp_path / "c.pt", model=model, optimizer=opt, step=3, extra={"epoch": 2}
    )
    expected = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    assert load_checkpoint(path, model=model, optimizer=opt) == {"step": 3, "extra": {"epoch": 2}}
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])


def test_generators_of_more_cuda_devices_than_here_restore_those_here(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint of a machine with two GPUs, resumed on one: torch's set_rng_state_all set
    device 1's generator, which is no device here, and raised an IndexError from inside torch
    (``default_generators[1]``) after the model and optimizer had loaded.  Here the machine's
    one device is torch's as far as selftune sees it: its count and its generator's setter."""
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    payload = torch.load(path, weights_only=True)
    payload["rng"]["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]
    torch.save(payload, path)
    restored: list[int] = []

    def set_rng_state(state: torch.Tensor, device: int) -> None:
        if device >= 1:  # as torch's default_generators[device] does, with one device
            raise IndexError("tuple index out of range")
        restored.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    with pytest.warns(UserWarning, match=r"states of 2 CUDA devices, this machine has 1: those"):
        assert load_checkpoint(path, model=model, optimizer=opt)["step"] == 3
    assert restored == [0]


def test_a_checkpoint_of_another_run_folder_is_refused_before_anything_loads(
    tmp_path: Path,
) -> None:
    """Refused by its log position, once the model, the step and the rates were loaded over
    this run's: a caller who caught the error trained on from the other run, into this log."""
    other_model = make_model()
    other = make_optimizer("adamw", other_model, tmp_path / "other")
    train(other_model, other, range(1, 41))
    ckpt = save_checkpoint(tmp_path / "other.pt", model=other_model, optimizer=other, step=40)
    model = make_model()
    opt = make_optimizer("adamw", model, tmp_path / "run")
    train(model, opt, range(1, 11))
    before = (copy.deepcopy(model.state_dict()), opt.step_count, opt.hyperparams())
    with pytest.raises(CheckpointError, match="belongs to another run"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert_same_state(before[0], model.state_dict())
    assert (opt.step_count, opt.hyperparams()) == before[1:]


def test_missing_damaged_and_foreign_files_are_named(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    model, opt = trained
    good = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3).read_bytes()
    cases = {
        "missing.pt": (None, "no checkpoint at"),
        "torn.pt": (good[: len(good) // 2], "is damaged or is not a checkpoint"),
        "junk.pt": (b"\x80\x02junk", "is damaged or is not a checkpoint"),
        "empty.pt": (b"", "is damaged or is not a checkpoint"),
        # what torch's unpickler raised, named with its kind: "(101)" alone said nothing
        "text.pt": (b"hello world\n", r"is damaged or is not a checkpoint \(\w+Error: "),
    }
    for name, (data, words) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=words) as err:
            load_checkpoint(tmp_path / name, model=model, optimizer=opt)
        assert name in str(err.value)
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not a selftune checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", model=model, optimizer=opt)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "c.pt", model=torch.nn.Linear(2, 2), optimizer=opt)
    with pytest.raises(CheckpointError, match="step must be an int >= 0"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=-1)
    with pytest.raises(CheckpointError, match=r"model= takes the torch.nn.Module .* SelfTuned"):
        save_checkpoint(tmp_path / "c.pt", model=opt, optimizer=opt, step=3)  # type: ignore[arg-type]
    kind = type(model).__name__
    with pytest.raises(CheckpointError, match=rf"optimizer= takes the optimizer .* {kind}"):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=model, step=3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"every_rank='yes': True \(every rank calls"):
        load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, every_rank="yes")  # type: ignore[arg-type]
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, every_rank=True)  # alone


def test_a_model_the_checkpoint_does_not_fit_is_refused_before_any_weight_loads(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    """A model whose last layer is wider, loaded with a plain optimizer (whose state the
    wrapper's check of shapes does not see): refused naming the key and both shapes, and the
    layers that fit keep their weights (torch's strict load copied them, then raised)."""
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    wider = make_model()
    wider[2] = torch.nn.Linear(wider[2].in_features, 2)
    before = copy.deepcopy(wider.state_dict())
    plain = torch.optim.SGD(wider.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"shapes: 2.weight saved \(1, \d+\), here \(2, "):
        load_checkpoint(path, model=wider, optimizer=plain)
    assert_same_state(before, wider.state_dict())
    assert plain.state_dict()["state"] == {}


class _Counted(torch.nn.Linear):
    """Extra state as serialized bytes, whose length grows with the count (as some fp8
    libraries keep their metadata)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(str(self.calls).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.calls = int(bytes(state.tolist()))


class _Amax(torch.nn.Linear):
    """Extra state that is None until the first forward."""

    amax: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.amax = x.abs().amax()
        return super().forward(x)

    def get_extra_state(self) -> torch.Tensor | None:
        return self.amax

    def set_extra_state(self, state: torch.Tensor | None) -> None:
        self.amax = state


def _quantization_aware() -> torch.nn.Module:
    """Per-channel fake quantization, whose observers' buffers take the saved shapes."""
    from torch.ao import quantization

    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).train()
    model.qconfig = quantization.get_default_qat_qconfig("x86")
    return quantization.prepare_qat(model)


@pytest.mark.parametrize(
    "build",
    [lambda: _Counted(8, 1), lambda: _Amax(8, 1), _quantization_aware],
    ids=["extra-state-grows", "extra-state-from-none", "quantization-aware"],
)
def test_a_model_whose_load_takes_the_saved_shapes_resumes(tmp_path: Path, build: Any) -> None:
    """Modules whose own load takes a buffer's saved shape (a quantization observer's scale, a
    module's extra state that grows or starts as None) load as torch's load takes them: the
    check of fit before the load looks at the parameters' shapes alone."""
    torch.manual_seed(0)
    model = build()
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.01), "off", guard=False)
    for _ in range(12):
        loss = model(torch.randn(4, 8)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=12)
    torch.manual_seed(0)
    fresh = build()
    again = selftune.wrap(torch.optim.SGD(fresh.parameters(), lr=0.01), "off", guard=False)
    assert load_checkpoint(path, model=fresh, optimizer=again)["step"] == 12
    assert_same_state(model.state_dict(), fresh.state_dict())


def test_a_compiled_model_s_checkpoint_loaded_into_a_plain_one_says_so(tmp_path: Path) -> None:
    """The keys of a ``torch.compile``'d model hold ``_orig_mod.``: the refusal says that the
    one model was compiled and the other not, not that the model is another."""
    model = make_model()
    opt = make_optimizer("sgd", model, None)
    compiled = torch.compile(model, backend="eager")
    path = save_checkpoint(tmp_path / "c.pt", model=compiled, optimizer=opt, step=0)
    with pytest.raises(CheckpointError, match=r"torch\.compile'd and the other not"):
        load_checkpoint(path, model=model, optimizer=opt)


def test_a_lazy_parameter_not_yet_initialized_is_refused_at_save(tmp_path: Path) -> None:
    """``weights_only`` refuses an uninitialized lazy parameter: the file saved before the
    first forward was then refused as damaged."""
    model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        CheckpointError, match=r"model\['0\.(weight|bias)'\], a lazy module's .* forward"
    ):
        save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    assert not (tmp_path / "c.pt").exists()
    model(torch.randn(2, 3))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=0)
    assert load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)["step"] == 0


def test_a_lazy_model_wrapped_before_its_dry_run_resumes(tmp_path: Path) -> None:
    """A wrapper over a lazy module's parameters not yet initialized checks a state's shapes
    against those the model's load gives them (it raised torch's error from reading a shape
    there); with a run folder, whose manifest holds the hash of the initial weights, the wrap
    is refused by name (it raised from hashing them)."""

    def build() -> tuple[torch.nn.Module, SelfTuned]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        return model, selftune.wrap(torch.optim.AdamW(model.parameters(), lr=0.01))

    def steps(model: torch.nn.Module, opt: SelfTuned, ts: range) -> None:
        for t in ts:
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(t))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())

    model, opt = build()
    steps(model, opt, range(1, 6))
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=5)
    steps(model, opt, range(6, 11))
    resumed, again = build()
    assert load_checkpoint(path, model=resumed, optimizer=again)["step"] == 5
    steps(resumed, again, range(6, 11))
    assert_same_state(model.state_dict(), resumed.state_dict())
    lazy = torch.nn.LazyLinear(4)
    with pytest.raises(selftune.ConfigError, match=r"lazy module's parameter .* before wrapping"):
        selftune.wrap(torch.optim.SGD(lazy.parameters(), lr=0.1), log_dir=tmp_path / "run")


def test_a_layer_renamed_since_with_a_hook_that_maps_its_keys_loads(tmp_path: Path) -> None:
    """A module's load pre-hook may rename the saved keys (a layer renamed since the run):
    the check of fit before the load leaves such a model to torch's load, which took it."""

    class Renamed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 1)
            self._register_load_state_dict_pre_hook(self._old_names)

        @staticmethod
        def _old_names(state: dict[str, Any], prefix: str, *_: Any) -> None:
            for key in [k for k in state if k.startswith(f"{prefix}fc.")]:
                state[key.replace(f"{prefix}fc.", f"{prefix}head.", 1)] = state.pop(key)

    old = torch.nn.Module()
    old.fc = torch.nn.Linear(4, 1)
    opt = selftune.wrap(torch.optim.SGD(old.parameters(), lr=0.1), "off")
    path = save_checkpoint(tmp_path / "c.pt", model=old, optimizer=opt, step=0)
    new = Renamed()
    load_checkpoint(
        path, model=new, optimizer=selftune.wrap(torch.optim.SGD(new.parameters()), "off")
    )
    assert torch.equal(new.head.weight, old.fc.weight) and torch.equal(new.head.bias, old.fc.bias)


def test_a_scalar_parameter_s_moments_take_its_dtype_when_the_model_s_changes() -> None:
    """The moments of a parameter that is a scalar itself (a learned temperature) are scalars
    too: they take the parameter's dtype on load, as torch gives it, where the optimizer's own
    scalars keep the dtype they were saved in (the update failed on float32 moments beside a
    float64 parameter)."""
    for build in (torch.optim.Adam, torch.optim.NAdam, torch.optim.SGD):
        scale = torch.nn.Parameter(torch.tensor(1.5))
        model = torch.nn.Linear(3, 1)
        params = [scale, *model.parameters()]
        kwargs = {"momentum": 0.9} if build is torch.optim.SGD else {}
        opt = selftune.wrap(build(params, lr=0.01, **kwargs), "off")
        for _ in range(2):
            opt.zero_grad()
            loss = (model(torch.ones(2, 3)) * scale).pow(2).mean()
            loss.backward()
            opt.step(loss=loss.detach())
        saved = copy.deepcopy(opt.state_dict())
        with torch.no_grad():
            scale.data = scale.data.double()
        model.double()
        again = selftune.wrap(build(params, lr=0.01, **kwargs), "off")
        again.load_state_dict(saved)
        kept = again.optimizer.state[scale]
        own = ("step", "mu_product")  # NAdam's own scalar, beside every parameter: float32
        assert all(v.dtype == torch.float64 for k, v in kept.items() if k not in own), build
        if build is torch.optim.NAdam:
            assert again.optimizer.state[model.weight]["mu_product"].dtype == torch.float32
            assert kept["mu_product"].dtype == torch.float32
        again.zero_grad()
        loss = (model(torch.ones(2, 3, dtype=torch.float64)) * scale).pow(2).mean()
        loss.backward()
        again.step(loss=loss.detach())


def test_a_float64_scalar_parameter_s_run_resumes_bit_for_bit() -> None:
    """A float64 model with a parameter that is a scalar itself (a learned temperature): the
    optimizer's own scalar beside it (NAdam's float32 ``mu_product``) came back from torch's
    load as float64, since every state of a scalar parameter is a scalar, and the resumed
    run left the uninterrupted one (the moments beside it take its dtype, as before)."""
    x = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def build() -> tuple[list[torch.nn.Parameter], SelfTuned]:
        torch.manual_seed(SEED)
        params = [
            torch.nn.Parameter(torch.randn(4, 1, dtype=torch.float64)),
            torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64)),
        ]
        opt = selftune.wrap(torch.optim.NAdam(params, lr=0.01), "hypergradient", guard=False)
        return params, opt

    def train(params: list[torch.nn.Parameter], opt: SelfTuned, steps: range) -> None:
        for _ in steps:
            loss = (x @ params[0] * params[1] - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())

    whole, opt = build()
    train(whole, opt, range(40))
    first, opt = build()
    train(first, opt, range(20))
    saved = [p.detach().clone() for p in first], _load_weights_only(opt.state_dict())
    resumed, opt = build()
    with torch.no_grad():
        for p, kept in zip(resumed, saved[0], strict=True):
            p.copy_(kept)
    opt.load_state_dict(saved[1])
    assert opt.optimizer.state[resumed[1]]["mu_product"].dtype == torch.float32
    assert opt.optimizer.state[resumed[1]]["exp_avg"].dtype == torch.float64
    train(resumed, opt, range(20, 40))
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))


def _load_weights_only(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def test_an_optimizer_the_checkpoint_does_not_fit_is_refused_before_the_model_loads(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    """Another optimizer, another controller or other param groups: refused by name, and the
    model keeps its weights (torch's own errors came from deep inside, after the model had
    been overwritten).  An unwrapped optimizer loads, with a warning that it runs untuned."""
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    fresh = make_model()
    before = [p.detach().clone() for p in fresh.parameters()]
    params = list(fresh.parameters())
    cases = {
        "was saved from the optimizer AdamW, this one is SGD": selftune.wrap(
            torch.optim.SGD(params, lr=0.1)
        ),
        "was saved by controller 'auto', this optimizer runs 'off'": selftune.wrap(
            torch.optim.AdamW(params), "off"
        ),
        r"param groups of \[4\] tensors, this optimizer has \[2, 2\]": selftune.wrap(
            torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
        ),
    }
    for words, other in cases.items():
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(path, model=fresh, optimizer=other)
        assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), before, strict=True))
    with pytest.warns(UserWarning, match="not wrapped: it resumes at its base rates, untuned"):
        load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(params))
    # the state dict alone (Lightning's and the Trainer's checkpoints) is refused the same way
    other = selftune.wrap(torch.optim.AdamW(params), "off")
    with pytest.raises(selftune.ConfigError, match="saved by controller 'auto'"):
        other.load_state_dict(opt.state_dict())


def test_an_optimizer_that_takes_no_state_now_is_refused_before_the_model_loads(
    tmp_path: Path,
) -> None:
    """A load inside ``averaged()``, or into an optimizer closed since, is refused: it was,
    by the optimizer's load, after the model had loaded (inside the block, its buffers stayed
    the checkpoint's and the weights went back to the run's at the block's end; after close,
    the weights were the checkpoint's and the optimizer's state the run's)."""
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = selftune.wrap(sgd, average=True, model=model, log_dir=tmp_path / "run")
    for t in range(1, 11):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if t == 5:
            path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=t)

    def refused(words: str) -> None:
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(path, model=model, optimizer=opt)
        assert_same_state(before, model.state_dict())

    with opt.averaged():
        refused("loading a state inside an averaged")
    opt.close()
    refused(r"closed after step 10 \(close\(\)\)")


def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temporary(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    before = path.read_bytes()
    (tmp_path / ".c.pt.12345.tmp").write_bytes(b"left by a writer killed mid-save")
    with pytest.raises(Exception, match=r"pickle|lambda"):
        save_checkpoint(path, model=model, optimizer=opt, step=4, extra={"bad": lambda: 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "run"]
    assert load_checkpoint(path, model=model, optimizer=opt)["step"] == 3


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError while writing (here a full disk) was raised as it came, naming the hidden
    temporary file; it is a CheckpointError naming the checkpoint and the reason.  torch.save
    meets the full disk in its zip writer, which raises a RuntimeError of its own as it closes
    ("unexpected pos 704 vs 598"), the OSError only its context: that was raised as it came."""
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    before = path.read_bytes()

    class Filling(io.FileIO):  # a disk with room for the first kilobyte
        def write(self, data: Any) -> int:
            if self.tell() + len(data) > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", Filling, raising=False)
    with pytest.raises(
        CheckpointError, match=re.escape(f"cannot write the checkpoint {path} (No space")
    ):
        save_checkpoint(path, model=model, optimizer=opt, step=4)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "run"]
    assert load_checkpoint(path, model=model, optimizer=opt)["step"] == 3


@pytest.mark.parametrize("file", ["trace.jsonl", "decisions.jsonl"])
def test_a_disk_that_fills_mid_run_leaves_whole_lines_and_a_run_that_resumes(
    tmp_path: Path, file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills half-way through a line of the run folder's ``file``: the trace's
    ``OSError`` came bare from deep inside a step, and a torn line was left behind. It is a
    LogError naming the file, the line is cut back, and the checkpoint resumes the run to the
    bytes of one that never stopped."""
    ref = reference("adamw", tmp_path / "ref")
    model = make_model()
    opt = make_optimizer("adamw", model, tmp_path / "res")
    train(model, opt, range(1, 21))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=20)
    target = os.stat(tmp_path / "res" / file).st_ino
    write = os.write
    torn: list[int] = []

    def fill(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino != target:
            return write(fd, data)
        if not torn:  # the first write returns short, as a disk that fills does
            torn.append(write(fd, bytes(data)[: len(data) // 2]))
            return torn[0]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", fill)
    with pytest.raises(selftune.LogError, match=rf"{file}: No space left on device") as caught:
        train(model, opt, range(21, STEPS + 1))
    monkeypatch.undo()
    assert torn and "resume from the last checkpoint" in str(caught.value)
    lines = (tmp_path / "res" / file).read_bytes().split(b"\n")
    assert lines.pop() == b"", "a torn final line"
    assert all(json.loads(line) for line in lines)
    opt.close()
    model = make_model()
    finish_from_checkpoint(ref, model, make_optimizer("adamw", model, tmp_path / "res"), tmp_path)


def finish_from_checkpoint(
    ref: dict[str, Any], model: torch.nn.Module, opt: SelfTuned, tmp_path: Path
) -> None:
    """Load ``tmp_path/c.pt`` into ``opt``, train to the end, and check that the weights, the
    log and the trace in ``tmp_path/res`` are those of the reference run in ``tmp_path/ref``."""
    start = load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)["step"] + 1
    train(model, opt, range(start, STEPS + 1))
    opt.close()
    assert_same_state(ref, final_state(model, opt))
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")
    trace = (tmp_path / "res" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()


def test_a_step_that_raised_part_way_refuses_steps_and_saves_until_a_checkpoint_loads(
    tmp_path: Path,
) -> None:
    """A Ctrl-C inside ``step`` after the wrapped optimizer moved the weights, then the usual
    ``except KeyboardInterrupt: save_checkpoint(...)``: the checkpoint held step 23's weights
    with step 22's count, and the run resumed from it ended elsewhere than the run, its log a
    step short, with nothing said.  Both are refused; the last checkpoint, loaded in place,
    resumes the run to the bytes of one never interrupted."""
    ref = reference("sgd", tmp_path / "ref")
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "res")
    train(model, opt, range(1, 21))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=20)
    train(model, opt, range(21, 22))
    save_checkpoint(tmp_path / "c21.pt", model=model, optimizer=opt, step=21)
    train(model, opt, range(22, 23))

    def interrupt(optimizer: Any, args: Any, kwargs: Any) -> None:
        raise KeyboardInterrupt  # where a Ctrl-C can land: the update made, not recorded

    hook = opt.optimizer.register_step_post_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, range(23, 24))
    hook.remove()
    with pytest.raises(selftune.ConfigError, match="step 23 raised part-way"):
        save_checkpoint(tmp_path / "broken.pt", model=model, optimizer=opt, step=23)
    assert not (tmp_path / "broken.pt").exists()
    with pytest.warns(UserWarning, match="will not load"):  # a framework's save goes on
        state = opt.state_dict()
    other = make_optimizer("sgd", make_model(), None)
    with pytest.raises(selftune.ConfigError, match="saved after step 23 raised part-way"):
        other.load_state_dict(state)
    with pytest.raises(selftune.ConfigError, match="Resume from the last checkpoint"):
        train(model, opt, range(23, 24))
    with pytest.raises(selftune.ConfigError, match="unwrap"):
        opt.unwrap()  # its note would name step 22, the weights past it
    with pytest.raises(selftune.ConfigError, match="a param group added is refused: step 23"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})  # (c21.pt lacks it)
    assert len(opt.param_groups) == 1
    load_checkpoint(tmp_path / "c21.pt", model=model, optimizer=opt)
    hook = opt.optimizer.register_step_post_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):  # step 22, the last one recorded before the load:
        train(model, opt, range(22, 23))  # read as recorded, and the run went on a step short
    hook.remove()
    with pytest.raises(selftune.ConfigError, match="step 22 raised part-way"):
        save_checkpoint(tmp_path / "broken.pt", model=model, optimizer=opt, step=22)
    finish_from_checkpoint(ref, model, opt, tmp_path)  # loaded in place


def test_a_state_of_other_param_groups_is_refused_before_a_broken_step_is_cleared() -> None:
    """A step broken off by a Ctrl-C, then a load of a state for other param groups (a plain
    state saved before any step, whose update selftune holds none of to check): torch's load
    refused it, but only after the load had cleared the broken step, and the wrapper took
    steps again past an update it had not recorded.  It is refused by name first, and the
    wrapper still refuses steps."""
    model = torch.nn.Linear(3, 1)
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.1), "off")
    other = torch.optim.SGD(torch.nn.Linear(3, 1, bias=False).parameters(), lr=0.1)

    def step() -> None:
        loss = model(torch.ones(2, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())

    def interrupt(optimizer: Any, args: Any, kwargs: Any) -> None:
        raise KeyboardInterrupt

    step()
    hook = opt.optimizer.register_step_post_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        step()
    hook.remove()
    for state in (other.state_dict(), selftune.wrap(other, "off").state_dict()):
        with pytest.raises(selftune.ConfigError, match=r"param groups of \[1\] parameters"):
            opt.load_state_dict(state)
        with pytest.raises(selftune.ConfigError, match="step 2 raised part-way"):
            step()


def test_a_refused_loss_or_a_listener_s_error_leaves_the_run_whole(tmp_path: Path) -> None:
    """A loss refused by name changes nothing, and a listener that raises (a writer's error, a
    user's early stop) does so after the step is written: neither is a step broken off, and
    both were taken for one, so that the run could neither go on nor be saved."""
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "run")
    train(model, opt, range(1, 4))
    with pytest.raises(selftune.ConfigError, match="needs one number"):
        opt.step(loss=torch.ones(3))

    def stop(event: selftune.StepEvent) -> None:
        if event.step == 5:
            raise RuntimeError("a writer failed")

    opt.add_listener(stop)
    train(model, opt, range(4, 5))
    with pytest.raises(RuntimeError, match="a writer failed"):
        train(model, opt, range(5, 6))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=5)
    train(model, opt, range(6, 8))
    assert opt.step_count == 7


def test_extra_that_loading_would_refuse_is_refused_at_save(
    tmp_path: Path, trained: tuple[torch.nn.Module, SelfTuned]
) -> None:
    """A numpy scalar in ``extra`` (a best validation loss) pickles fine, but the
    ``weights_only`` load refuses it: the save replaced the good checkpoint with one that
    could never be loaded, and loading called it damaged."""
    np = pytest.importorskip("numpy")
    model, opt = trained
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=3)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"extra\['best'\].*numpy.*float\(x\)"):
        save_checkpoint(path, model=model, optimizer=opt, step=4, extra={"best": np.float64(0.3)})
    assert path.read_bytes() == before
    assert load_checkpoint(path, model=model, optimizer=opt)["step"] == 3


def test_a_checkpoint_forces_the_log_it_points_into_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint holds the log's position and resuming refuses a log that ends before it:
    after a power cut, an unsynced log tail would make the one checkpoint unusable."""
    model = make_model()
    opt = make_optimizer("adamw", model, tmp_path / "run")
    train(model, opt, range(1, 11))
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(f"/proc/self/fd/{fd}").resolve().name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # the one module the log, trace and file share
    save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, step=10)
    assert {"decisions.jsonl", "trace.jsonl"} <= set(synced)
    assert synced.index("decisions.jsonl") < len(synced) - 2  # before the checkpoint's own
    # Lightning and the Hugging Face Trainer save opt.state_dict() in files of their own: it
    # forced nothing, and such a checkpoint could outlive the log's last records after a power
    # cut, a resume from it refused as ahead of the log
    train(model, opt, range(11, 16))
    synced.clear()
    opt.state_dict()
    assert {"decisions.jsonl", "trace.jsonl"} <= set(synced)
    opt.close()


def test_the_notes_a_reopened_folder_writes_survive_the_resume(tmp_path: Path) -> None:
    """Reopened with other settings, the folder notes that its manifest changed; loading the
    checkpoint cut that note away with the steps after the checkpoint, and counted it among
    them, so the log no longer said that the rest of the run ran otherwise."""
    model = make_model()
    opt = make_optimizer("adamw", model, tmp_path / "run")
    train(model, opt, range(1, 11))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=10)
    train(model, opt, range(11, 16))
    opt.close()
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=2e-3)
    guard = selftune.GuardConfig(interval=10)  # not the run's: a changed manifest
    opt = selftune.wrap(inner, log_dir=tmp_path / "run", seed=SEED, average=True, guard=guard)
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    notes = [r["reason"] for r in read_log(tmp_path / "run").records if r["kind"] == "note"]
    assert len(notes) == 2 and notes[0].startswith("resumed: dropped ")
    assert "changed manifest (config: guard)" in notes[1]  # the setting named
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)  # again, in this process
    again = [r["reason"] for r in read_log(tmp_path / "run").records if r["kind"] == "note"]
    assert len(again) == 2 and again[1] == notes[1]
    # the second cut took the first one's note with it, and the log no longer told of it
    assert again[0].endswith(f"(among them notes that said: {notes[0]})"), again[0]
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)  # a third time: flat
    third = [r["reason"] for r in read_log(tmp_path / "run").records if r["kind"] == "note"]
    head = again[0].partition(" (among")[0]
    assert third[0].endswith(f"(among them notes that said: {notes[0]}; {head})"), third[0]
    opt.close()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_continued_run_that_crashed_is_retried_from_the_same_checkpoint(
    tmp_path: Path, name: str
) -> None:
    """A run continued into a new folder from another folder's checkpoint crashes before a
    checkpoint of its own and is retried from the same one: the retry refused the folder (the
    checkpoint's log position is the other folder's), and would have traced steps twice."""
    model = make_model()
    opt = make_optimizer(name, model, tmp_path / "first")
    train(model, opt, range(1, 6))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=5)
    opt.close()

    def continue_into(folder: Path, stop: int) -> dict[str, Any]:
        model = make_model()
        opt = make_optimizer(name, model, folder)
        start = load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)["step"] + 1
        train(model, opt, range(start, stop + 1))
        opt.close()
        return final_state(model, opt)

    ref = continue_into(tmp_path / "ref", STEPS)
    continue_into(tmp_path / "res", 30)  # the crash
    res = continue_into(tmp_path / "res", STEPS)
    assert_same_state(ref, res)
    notes = [r["reason"] for r in read_log(tmp_path / "res").records if r["kind"] == "note"]
    assert len(notes) == 2 and notes[0].startswith("continued from a checkpoint of another log")
    dropped = re.fullmatch(r"resumed: dropped (\d+) records written after the checkpoint", notes[1])
    assert dropped is not None and int(dropped.group(1)) > 0
    assert log_body(tmp_path / "res") == log_body(tmp_path / "ref")
    trace = (tmp_path / "res" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()  # no step twice


def test_trouble_right_after_loading_a_plain_state_dict_skips_the_step(tmp_path: Path) -> None:
    """``opt.state_dict()`` (what Lightning and the Trainer save) holds no guard snapshots, so
    none is held until the next healthy step: a NaN loss in the first step after the load
    stopped the run with a GuardError.  The step is skipped and the rate cut instead."""
    model = make_model()
    opt = make_optimizer("sgd", model, None)
    train(model, opt, range(1, 31))
    saved, weights = opt.state_dict(), model.state_dict()
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "run")
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    before, rate = [p.clone() for p in model.parameters()], opt.hyperparams()[0]["lr"]
    train_step(model, opt, 31, rank=0, nan=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.hyperparams()[0]["lr"] == pytest.approx(rate / 2)
    train_step(model, opt, 32, rank=0)
    # no previous update read after the skip (the skipped read had multiplied it in place)
    assert opt.last_signals is not None and opt.last_signals.groups[0].update_norm == 0.0
    train(model, opt, range(33, 61), nan_step=45)  # a snapshot since: a rollback to it
    opt.close()
    events = [r for r in read_log(tmp_path / "run").records if r["kind"] == "guard"]
    assert [(r["step"], r["event"], r.get("restored_step")) for r in events] == [
        (31, "skip", None),
        (45, "rollback", 32),
    ]


def plain_checkpoint() -> tuple[dict[str, Any], dict[str, Any]]:
    """The weights and optimizer state of five steps of plain AdamW (a checkpoint of a run
    that never used selftune), copied as a file would hold them."""
    model = make_model()
    plain = make_inner("adamw", model)
    for t in range(1, 6):
        x, y = batch(t, 0)
        plain.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        plain.step()
    return copy.deepcopy((model.state_dict(), plain.state_dict()))


def test_a_plain_state_loaded_into_a_wrapper_that_stepped_starts_afresh() -> None:
    """A plain optimizer's state (and its model's weights) loaded into a wrapper that had
    trained another run: the run goes on from the loaded rate, not that rate times the other
    run's scale, and trouble after the load goes back to the loaded
    weights, not to a snapshot of the other run's (a rollback put those over the checkpoint)."""
    weights, saved = plain_checkpoint()
    model = make_model()
    opt = make_optimizer("adamw", model, None)
    train(model, opt, range(1, 41))
    assert opt.hyperparams()[0]["lr"] != pytest.approx(2e-3)  # auto moved the rate
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    assert opt.hyperparams()[0]["lr"] == 2e-3
    loaded = [p.clone() for p in model.parameters()]
    train_step(model, opt, 41, rank=0, nan=True)  # no snapshot of this run yet: skipped
    assert all(torch.equal(a, b) for a, b in zip(loaded, model.parameters(), strict=True))
    assert opt.hyperparams()[0]["lr"] == pytest.approx(1e-3)


def test_a_run_that_loads_a_plain_state_mid_way_replays_exactly(tmp_path: Path) -> None:
    """The load starts the wrapper afresh (its scale, controller, guard and snapshots): the
    replay, which loads the same state at the same step, starts afresh alike and rolls back
    where the run did, to a snapshot taken since the load."""

    def script(make: Any) -> tuple[list[torch.Tensor], SelfTuned]:
        saved = plain_checkpoint()
        model = make_model()
        opt = make(make_inner("adamw", model))
        for t in range(1, 61):
            if t == 31:
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
            train_step(model, opt, t, rank=0, nan=t == 45)
        return [p.detach().clone() for p in model.parameters()], opt

    logged, opt = script(lambda inner: selftune.wrap(inner, log_dir=tmp_path))
    opt.close()
    (rollback,) = [r for r in read_log(tmp_path).records if r["kind"] == "guard"]
    assert (rollback["step"], rollback["restored_step"]) == (45, 31)
    replayed, _ = script(lambda inner: selftune.replay(inner, tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(logged, replayed, strict=True))


def test_a_knob_a_plain_state_switched_off_stays_off_through_a_resume_and_a_replay(
    tmp_path: Path,
) -> None:
    """AdamW wrapped with β1 0.9 under ``hypergradient``, which tunes β1, loads the state of a
    run that kept no first moment (β1 0): the knob stays off, as in AdamW wrapped with β1 0
    (it rose to 0.013 in 60 steps), through a resume in a fresh wrapper and in the replay."""
    run = tmp_path / "run"

    def script(make: Any) -> tuple[list[torch.Tensor], SelfTuned]:
        model = make_model()
        plain = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.0, 0.99))
        opt = make(make_inner("adamw", model))
        opt.load_state_dict(copy.deepcopy(plain.state_dict()))
        train(model, opt, range(1, 31))
        saved, weights = copy.deepcopy((opt.state_dict(), model.state_dict()))
        opt.close()
        model = make_model()
        opt = make(make_inner("adamw", model))
        model.load_state_dict(weights)
        opt.load_state_dict(saved)
        train(model, opt, range(31, 61))
        return [p.detach().clone() for p in model.parameters()], opt

    logged, opt = script(
        lambda inner: selftune.wrap(inner, controller="hypergradient", log_dir=run)
    )
    assert opt.hyperparams()[0]["beta1"] == 0.0
    assert opt.hyperparams()[0]["lr"] != 2e-3  # the rate is tuned still
    opt.close()
    (note,) = [r for r in read_log(run).records if "beta1 is 0" in str(r.get("reason"))]
    assert note["kind"] == "note" and "leaves it off" in note["reason"]
    assert "beta1" not in audit.verify(run).knobs  # raises where the log does not verify
    replayed, _ = script(lambda inner: selftune.replay(inner, run))
    assert all(torch.equal(a, b) for a, b in zip(logged, replayed, strict=True))


def test_dcp_s_optimizer_helpers_given_the_wrapper_warn_and_take_no_step_of_the_run(
    tmp_path: Path,
) -> None:
    """``torch.distributed.checkpoint``'s helpers keep only ``state`` and ``param_groups`` and
    fill an empty state by a step with the rates zeroed: given the wrapper (the guide says to
    give them ``opt.optimizer``), that step was the run's step 1, logged, and selftune's part
    went without a word.  Now each says so, and the filling step is the wrapped optimizer's
    alone, as it is given ``opt.optimizer``."""
    from torch.distributed.checkpoint import state_dict as dcp_sd

    model = make_model()
    opt = selftune.wrap(make_inner("adamw", model), log_dir=tmp_path / "run")
    plain_model = make_model()
    plain = make_inner("adamw", plain_model)
    with pytest.warns(UserWarning, match=r"Give them opt\.optimizer"):
        filled = dcp_sd.get_optimizer_state_dict(model, opt)
    assert opt.step_count == 0 and opt.hyperparams()[0]["lr"] == 2e-3
    as_plain = dcp_sd.get_optimizer_state_dict(plain_model, plain)
    torch.testing.assert_close(filled["state"], as_plain["state"])
    assert filled["param_groups"] == as_plain["param_groups"]
    train(model, opt, range(1, 11))
    with pytest.warns(UserWarning, match="dropping selftune's part"):
        saved = dcp_sd.get_optimizer_state_dict(model, opt)
    assert "selftune" not in saved and opt.step_count == 10
    opt.close()
    rows = (tmp_path / "run" / "trace.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == list(range(1, 11))
    other_model = make_model()
    other = selftune.wrap(make_inner("adamw", other_model))
    with pytest.warns(UserWarning, match="dropping selftune's part"):
        dcp_sd.set_optimizer_state_dict(other_model, other, saved)
    assert other.step_count == 0


def test_dcp_s_helpers_given_the_wrapped_optimizer_fill_its_state_past_the_wrapper() -> None:
    """The guide gives torch.distributed.checkpoint's helpers ``opt.optimizer``, whose empty
    state they fill by a step of it with the rates zeroed: the one step of the wrapped
    optimizer, not made by the wrapper, that is no step of the run and is let through."""
    from torch.distributed.checkpoint import state_dict as dcp_sd

    model, plain_model = make_model(), make_model()
    opt = selftune.wrap(make_inner("adamw", model))
    filled = dcp_sd.get_optimizer_state_dict(model, opt.optimizer)
    as_plain = dcp_sd.get_optimizer_state_dict(plain_model, make_inner("adamw", plain_model))
    torch.testing.assert_close(filled["state"], as_plain["state"])
    assert opt.step_count == 0 and opt.hyperparams()[0]["lr"] == 2e-3
    train(model, opt, range(1, 3))
    assert opt.step_count == 2


@pytest.mark.parametrize(
    ("knob", "value", "says"),
    [("betas", (math.nan, 0.999), "beta1=nan is not finite"), ("lr", 0.0, "lr=0.0 must be > 0")],
)
def test_a_state_of_knobs_a_wrap_refuses_is_refused_before_anything_loads(
    knob: str, value: Any, says: str
) -> None:
    """A NaN β1 or a zero rate in a checkpoint's param groups: refused at the wrap, they loaded
    without a word, and the guard gave up on the NaN weights some steps later."""
    model = make_model()
    opt = make_optimizer("adamw", model, None)
    train(model, opt, range(1, 11))
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0][knob] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(selftune.ConfigError, match=f"the state dict's param group 0: {says}"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and opt.step_count == 10


def test_a_state_of_parameters_of_other_shapes_is_refused_before_anything_loads() -> None:
    """Saved from a model of as many parameters of other shapes: torch loads the inner state
    without a word, and the run failed in the signals' arithmetic with the state half loaded."""
    model = make_model()
    opt = make_optimizer("adamw", model, None)
    train(model, opt, range(1, 31))
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    fresh = selftune.wrap(torch.optim.AdamW(other.parameters(), lr=2e-3))
    with pytest.raises(selftune.ConfigError, match="parameters of other shapes"):
        fresh.load_state_dict(opt.state_dict())
    assert fresh.step_count == 0 and not fresh.state


@pytest.mark.parametrize(
    ("name", "nan_step", "event"),
    [*((name, 45, "rollback") for name in OPTIMIZERS), ("sgd", 31, "skip")],
)
def test_a_run_resumed_from_a_plain_state_dict_replays_exactly(
    tmp_path: Path, name: str, nan_step: int, event: str
) -> None:
    """Resumed from ``opt.state_dict()`` (the Trainer's checkpoints), the guard starts its
    snapshots again, and a later rollback goes to one taken after the resume (trouble in the
    first step after it is skipped): a replay, which runs straight through and still held the
    one from step 25, rolled back there instead and ended elsewhere.  The guard record now says
    where the snapshots started again, and the replay drops its own at that step."""
    model = make_model()
    opt = make_optimizer(name, model, tmp_path / "run")
    train(model, opt, range(1, 31))
    # copied, as a checkpoint file would hold them: torch's state dicts share the live tensors
    saved, weights = copy.deepcopy((opt.state_dict(), model.state_dict()))
    train(model, opt, range(31, 41))  # then the crash
    opt.close()
    model = make_model()
    opt = make_optimizer(name, model, tmp_path / "run")
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    train(model, opt, range(31, 61), nan_step=nan_step)
    opt.close()
    (guarded,) = [r for r in read_log(tmp_path / "run").records if r["kind"] == "guard"]
    assert (guarded["step"], guarded["event"], guarded["snapshots_since"]) == (nan_step, event, 31)
    replayed_model = make_model()
    replayed = selftune.replay(make_inner(name, replayed_model), tmp_path / "run")
    train(replayed_model, replayed, range(1, 61), nan_step=nan_step)
    for a, b in zip(model.parameters(), replayed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_guard_snapshots_saved_as_a_list_by_older_checkpoints_still_load() -> None:
    from selftune.guard import Guard

    guard = Guard()
    guard.load_snapshots_state([{"step": 25, "payload": {"knobs": []}}])
    assert [s.step for s in guard.snapshots] == [25] and guard.initial is None
    state = guard.snapshots_state()
    fresh = Guard()
    fresh.load_snapshots_state(state)
    assert [s.step for s in fresh.snapshots] == [25] and fresh.initial is None


def test_a_state_saved_before_the_warm_up_hold_loads_reading_no_rise_at_once() -> None:
    """A state saved before the wrapper kept the scheduler's highest rate takes the rates in
    force as that highest: the first step after loading holds nothing, the next rise is held."""
    model = make_model()
    opt = make_optimizer("adamw", model, None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 30))
    for t in range(1, 6):
        train_step(model, opt, t, rank=0)
        sched.step()
    state = opt.state_dict()
    del state["selftune"]["peaks"]
    fresh = make_optimizer("adamw", model, None)
    fresh.load_state_dict(state)
    rises = []
    for t in range(6, 9):
        train_step(model, fresh, t, rank=0)
        assert fresh.last_signals is not None
        rises.append(fresh.last_signals.groups[0].base_rise)
        fresh.param_groups[0]["lr"] *= 1.25  # the scheduler's next rise, written by hand
    assert rises == [1.0, pytest.approx(1.25), pytest.approx(1.25)]


def test_a_path_under_the_home_folder_is_expanded_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``log_dir="~/runs/a"`` made a folder named ``~`` in the working folder, which ``verify
    ~/runs/a`` (the shell expands it) then could not find."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = make_model()
    opt = make_optimizer("sgd", model, Path("~/runs/a"))
    train(model, opt, range(1, 11))
    save_checkpoint("~/c.pt", model=model, optimizer=opt, step=10)
    opt.close()
    assert (tmp_path / "home" / "runs" / "a" / "manifest.json").exists()
    assert (tmp_path / "home" / "c.pt").exists() and not (tmp_path / "~").exists()
    assert selftune.verify("~/runs/a").records == len(read_log("~/runs/a").records)
    model = make_model()
    opt = make_optimizer("sgd", model, Path("~/runs/a"))
    assert load_checkpoint("~/c.pt", model=model, optimizer=opt)["step"] == 10
    replayed = selftune.replay(make_inner("sgd", make_model()), "~/runs/a")
    assert replayed.step_count == 0


def test_a_checkpoint_of_an_attempt_cut_back_since_says_what_the_trace_lacks(
    tmp_path: Path,
) -> None:
    """Run to 40 (checkpoints at 30 and 40), crash; resume from 30, crash at 35; load the step
    40 checkpoint of the first attempt. No record fell between them, so the log's position
    matched, and the trace lost the rows of steps 36-40 with no word."""

    def wrapped(model: torch.nn.Module) -> SelfTuned:
        return selftune.wrap(make_inner("sgd", model), "off", log_dir=tmp_path / "run")

    model = make_model()
    opt = wrapped(model)
    for t in range(1, 41):
        train_step(model, opt, t, rank=0)
        if t in (30, 40):
            save_checkpoint(tmp_path / f"c{t}.pt", model=model, optimizer=opt, step=t)
    opt.close()
    model = make_model()
    opt = wrapped(model)
    load_checkpoint(tmp_path / "c30.pt", model=model, optimizer=opt)
    train(model, opt, range(31, 36))
    opt.close()
    model = make_model()
    opt = wrapped(model)
    with pytest.warns(UserWarning, match="rows of steps 36-40 were cut"):
        load_checkpoint(tmp_path / "c40.pt", model=model, optimizer=opt)
    train(model, opt, range(41, 43))
    opt.close()
    notes = [r["reason"] for r in read_log(tmp_path / "run").records if r["kind"] == "note"]
    assert any("trace.jsonl ends at step 35" in n for n in notes), notes
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "trace.jsonl").open()]
    assert steps == [*range(1, 36), 41, 42]


def _closure_run(model: torch.nn.Module, opt: SelfTuned, steps: range, nan_step: int) -> None:
    """Steps of a closure that recomputes the loss (L-BFGS calls it again in its search);
    the loss of ``nan_step`` is NaN, which the guard rolls back from."""
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(SEED))
    y = x.sum(1, keepdim=True) + 0.1

    for t in steps:

        def closure(t: int = t) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss * math.nan if t == nan_step else loss).backward()
            return loss * math.nan if t == nan_step else loss

        opt.step(closure)


def _batch_run(model: torch.nn.Module, opt: SelfTuned, steps: range, nan_step: int) -> None:
    """Steps on a batch per step, that of ``nan_step`` with a NaN loss."""
    for t in steps:
        gen = torch.Generator().manual_seed(SEED + t)
        x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        loss = loss * math.nan if t == nan_step else loss
        loss.backward()
        opt.step(loss=loss.detach())


@pytest.mark.parametrize(
    ("build", "dtype", "loop"),
    [
        (lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3), torch.float32, _closure_run),
        (
            lambda ps: torch.optim.LBFGS(ps, lr=torch.tensor(0.5), max_iter=3),
            torch.float32,
            _closure_run,
        ),
        (lambda ps: torch.optim.NAdam(ps, lr=0.01), torch.float64, _batch_run),
        (lambda ps: torch.optim.ASGD(ps, lr=0.01, t0=5), torch.float64, _batch_run),
    ],
    ids=["lbfgs", "lbfgs-tensor-rate", "nadam-float64", "asgd-float64"],
)
def test_optimizers_with_a_state_of_their_own_kind_resume_bit_for_bit(
    tmp_path: Path, build: Any, dtype: torch.dtype, loop: Any
) -> None:
    """L-BFGS with a tensor rate kept the rate tensor itself as its step length, which the base
    rate put back after each step overwrote, and a checkpoint saved the two apart; NAdam's
    float32 ``mu_product`` beside float64 parameters came back from torch's load as float64.
    Either resumed on another course than the uninterrupted run's.  (ASGD's float32 scalars
    came back as float64 too, with no change of course: checked alike.)"""

    def run(folder: str, steps: range, at: Path | None = None) -> torch.nn.Module:
        torch.manual_seed(SEED)
        model = torch.nn.Linear(4, 1).to(dtype)
        opt = selftune.wrap(build(model.parameters()), "auto", log_dir=tmp_path / folder)
        if at is not None:
            load_checkpoint(at, model=model, optimizer=opt)
        loop(model, opt, steps, nan_step=3)
        if at is None and steps.stop < 12:
            save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=steps.stop - 1)
        opt.close()
        return model

    whole = run("whole", range(1, 13))
    run("resumed", range(1, 7))
    resumed = run("resumed", range(7, 13), at=tmp_path / "c.pt")
    assert_same_state(whole.state_dict(), resumed.state_dict())


def test_a_checkpoint_of_steps_a_resume_cut_away_is_named_so(tmp_path: Path) -> None:
    """Checkpoints at steps 10 and 30, a resume from the one at 10 (the log cut back to it and
    written anew), then a load of the one at 30: refused, rightly, since the log no longer holds
    its steps, but as a checkpoint of another run folder, which sent the user looking for one.
    The refusal names the cut."""
    run = tmp_path / "run"
    model = make_model()
    opt = make_optimizer(OPTIMIZERS[0], model, run)
    for t in range(1, 31):
        train_step(model, opt, t, rank=0, nan=False)
        if t in (10, 30):
            save_checkpoint(tmp_path / f"at{t}.ckpt", model=model, optimizer=opt, step=t)
    opt.close()
    model = make_model()
    opt = make_optimizer(OPTIMIZERS[0], model, run)
    load_checkpoint(tmp_path / "at10.ckpt", model=model, optimizer=opt)
    train(model, opt, range(11, 41))
    opt.close()
    model = make_model()
    opt = make_optimizer(OPTIMIZERS[0], model, run)
    with pytest.raises(CheckpointError, match=r"cut away \(the log notes that cut at seq \d+\)"):
        load_checkpoint(tmp_path / "at30.ckpt", model=model, optimizer=opt)
    opt.close()


def test_a_resume_reads_the_log_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pass over the log reads and hashes every record of the run, hundreds of thousands
    in a long run's; a resume made four (the open, two checks of the checkpoint's place, the
    cut), where the file had not changed in between.  It makes one, and the resumed run ends
    as the run that never stopped."""
    ref = reference(OPTIMIZERS[0], tmp_path / "ref")
    passes: list[Path] = []
    scan = audit._scan

    def counted(path: Path) -> Any:
        passes.append(path)
        return scan(path)

    monkeypatch.setattr(audit, "_scan", counted)
    res = interrupted(OPTIMIZERS[0], tmp_path / "res", ckpt_step=20, stop_step=30)
    assert_same_state(ref, res)
    assert len(passes) == 1  # the fresh wrapper's open, over the crashed run's folder


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda own: own["controller"].pop("phase"), r"KeyError: 'phase'"),
        (lambda own: own.pop("scales"), r"KeyError: 'scales'"),
        (lambda own: own["tracker"].pop("var"), r"KeyError: 'tracker'"),
        (lambda own: own["guard"].update(loss="?"), r"TypeError"),
        (lambda own: own["average"]["tensors"][0].pop(), r"average does not fit"),
    ],
)
def test_a_selftune_state_that_does_not_read_is_refused_before_anything_loads(
    damage: Callable[[dict[str, Any]], Any], match: str
) -> None:
    """A state damaged, edited or saved by another version stopped with a bare ``KeyError``
    from deep inside (and an average of other shapes with its ``ConfigError``) after the
    wrapped optimizer's state, the step count and the rates had loaded: the run went on from
    that mix.  Now it is refused, named, with the wrapper as it was."""
    model = make_model()
    opt = selftune.wrap(torch.optim.AdamW(model.parameters(), lr=2e-3), average=True)
    train(model, opt, range(1, 31))
    saved = copy.deepcopy(opt.state_dict())
    train(model, opt, range(31, 41))
    before = copy.deepcopy(opt.state_dict())
    damage(saved["selftune"])
    with pytest.raises(selftune.ConfigError, match=match) as refused:
        opt.load_state_dict(saved)
    assert "damaged, or was saved by another version" in str(refused.value) or "average" in match
    after = opt.state_dict()
    assert (
        after["selftune"]["step"] == 40
        and after["selftune"]["scales"] == before["selftune"]["scales"]
    )
    assert all(
        torch.equal(after["state"][k]["exp_avg"], before["state"][k]["exp_avg"])
        for k in before["state"]
    )
    train(model, opt, range(41, 43))  # and it goes on


def _saved_on(ckpt: Path, world_size: int | None, to: Path) -> None:
    """Write to ``to`` the checkpoint ``ckpt`` as if saved on ``world_size`` ranks (None: by a
    version that kept no number)."""
    payload = torch.load(ckpt, weights_only=True)
    own = payload["optimizer"]["selftune"]
    assert own.pop("world_size") == 1  # a single process saved it
    if world_size is not None:
        own["world_size"] = world_size
    torch.save(payload, to)


def _notes(folder: Path) -> list[dict[str, Any]]:
    return [r for r in read_log(folder).records if r["kind"] == "note"]


def test_a_checkpoint_of_more_ranks_resumed_here_is_noted_once_at_the_next_step(
    tmp_path: Path,
) -> None:
    """The log read as one run where the effective batch size changed (the 2-rank runs are in
    test_distributed.py); a load retried from the same checkpoint notes it once, and one of
    this number of ranks loaded after it not at all."""
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "run")
    train(model, opt, range(1, 6))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=5)
    opt.close()
    _saved_on(tmp_path / "c.pt", 4, to=tmp_path / "c4.pt")
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    resumed = {}
    for folder, loads in [("run", ["c4.pt", "c4.pt"]), ("again", ["c4.pt", "c.pt"])]:
        resumed[folder] = model = make_model()
        opt = make_optimizer("sgd", model, tmp_path / folder)
        for name in loads:
            load_checkpoint(tmp_path / name, model=model, optimizer=opt)
        train(model, opt, range(6, 8))
        opt.close()
    assert _notes(tmp_path / "again") == []
    [note] = _notes(tmp_path / "run")
    assert (note["step"], note["saved_world_size"], note["world_size"]) == (6, 4, 1)
    assert note["reason"].startswith(
        "resumed on 1 rank (a single process) from a checkpoint saved on 4: the effective batch "
        "size changed"
    )
    assert audit.verify(tmp_path / "run").records == len(read_log(tmp_path / "run").records)
    from selftune.report import read_run, render_html

    assert "resumed on 1 rank (a single process)" in render_html(read_run(tmp_path / "run"), [])
    replayed_model = make_model()  # and the replay runs past the note
    replayed = selftune.replay(make_inner("sgd", replayed_model), tmp_path / "run")
    train(replayed_model, replayed, range(1, 8))
    for a, b in zip(resumed["run"].parameters(), replayed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_and_a_folder_that_kept_no_world_size_resume_with_no_note(
    tmp_path: Path,
) -> None:
    """Those of the version before: nothing tells their number of ranks, so nothing is noted,
    and a manifest without one is no changed manifest."""
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "run")
    train(model, opt, range(1, 6))
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, step=5)
    opt.close()
    _saved_on(tmp_path / "c.pt", None, to=tmp_path / "c.pt")
    manifest = json.loads((tmp_path / "run" / audit.MANIFEST).read_text())
    assert manifest.pop("world_size") == 1
    (tmp_path / "run" / audit.MANIFEST).write_text(json.dumps(manifest))
    model = make_model()
    opt = make_optimizer("sgd", model, tmp_path / "run")
    load_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    train(model, opt, range(6, 8))
    opt.close()
    assert _notes(tmp_path / "run") == []
