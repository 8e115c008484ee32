"""selftune on a GPU: the same contracts as on the CPU, plus the one host sync per step.

Skipped where no CUDA device is present (CI has none); run where one is, as
``bench-results/gpu/run.sh`` does.  Every test trains the real task of :mod:`faults` on the device,
data and minibatch order included, so no copy between host and device hides in the loop.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import (
    FAULTS,
    LR,
    final_weights,
    guard_records,
    make_optimizer,
    make_task,
    train,
)

import selftune
from selftune import GuardConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
BASES = ("sgd", "adamw")


def _wrapped(base: str, task: Any, **options: Any) -> selftune.SelfTuned:
    """``auto`` from a tenth of the base's usual rate: the range test has a climb to make."""
    return selftune.wrap(
        make_optimizer(base, task.model.parameters(), lr=LR[base] / 10), "auto", **options
    )


@pytest.mark.parametrize("base", BASES)
def test_auto_raises_the_rate_and_trains_with_all_its_state_on_the_device(base: str) -> None:
    task = make_task(device=DEVICE)
    before = task.full_loss()
    opt = _wrapped(base, task)
    run = train(task, opt, 300)
    assert opt.hyperparams()[0]["lr"] > LR[base] / 10, "the range test did not raise the rate"
    assert run.final < 0.2 * before, (before, run.final)
    plain_task = make_task(device=DEVICE)  # the same start, left at its rate
    plain = train(
        plain_task, make_optimizer(base, plain_task.model.parameters(), LR[base] / 10), 300
    )
    assert run.final < plain.final, (run.final, plain.final)
    assert opt.guard is not None and opt.guard.snapshots
    saved = opt.guard.snapshots[-1].payload["params"]
    assert all(p.device.type == "cpu" for group in saved for p in group), "not offloaded"


def _peak_bytes(guard: GuardConfig | None, steps: int = 60) -> tuple[int, int]:
    """Peak device memory over ``steps`` of AdamW on a 4M-parameter MLP, beyond what the model
    held before the first step, plain (``guard`` None) or wrapped; and the parameters' bytes."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024) for _ in range(4)]
    model = torch.nn.Sequential(*layers).to(DEVICE)
    x = torch.randn(64, 1024, device=DEVICE)
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if guard is not None:
        opt = selftune.wrap(opt, "auto", guard=guard)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(steps):  # three snapshots are held by step 50: the first, 25 and 50
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if guard is not None else opt.step()
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return torch.cuda.max_memory_allocated() - before, params


def test_offloaded_snapshots_cost_no_device_memory() -> None:
    """Wrapped, the only extra device memory is the previous update (one parameter-size)."""
    plain, params = _peak_bytes(None)
    offloaded, _ = _peak_bytes(GuardConfig())
    on_device, _ = _peak_bytes(GuardConfig(offload=False))
    assert offloaded - plain <= 1.2 * params, (plain, offloaded, params)
    # the measurement sees snapshots when they are there: 3 of (weights + Adam's 2 moments)
    assert on_device - plain >= 6 * params, (plain, on_device, params)


@pytest.mark.parametrize("base", BASES)
def test_a_wrapped_step_syncs_with_the_host_exactly_once(base: str) -> None:
    """The signals are reduced on the device and read back in one transfer per step."""

    def syncs(opt: torch.optim.Optimizer, task: Any, steps: int) -> int:
        train(task, opt, 20, evaluate=False)  # first-call allocations and lazy state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(task, opt, steps, evaluate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    steps = 60  # three of the guard's snapshots fall inside
    plain_task = make_task(device=DEVICE)
    plain = syncs(make_optimizer(base, plain_task.model.parameters()), plain_task, steps)
    task = make_task(device=DEVICE)
    wrapped = syncs(_wrapped(base, task), task, steps)
    assert plain == 0, f"the plain loop itself syncs {plain} times: the count proves nothing"
    assert wrapped == steps, f"{wrapped} host syncs in {steps} wrapped steps"


@pytest.mark.parametrize("base", BASES)
def test_the_guard_rolls_back_every_fault_on_the_device(base: str, tmp_path: Path) -> None:
    task = make_task(device=DEVICE)
    opt = _wrapped(base, task, log_dir=tmp_path)
    faults = {40 + 30 * i: kind for i, kind in enumerate(FAULTS)}
    run = train(task, opt, 200, faults=faults)
    opt.close()
    rollbacks = {r["step"] for r in guard_records(tmp_path) if r["event"] == "rollback"}
    for at, kind in faults.items():  # an overwritten rate shows in the next step's loss
        lag = 2 if kind == "lr_1e3" else 0
        assert any(at <= step <= at + lag for step in rollbacks), (kind, at, rollbacks)
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    assert math.isfinite(run.final) and run.final < run.losses[0]


@pytest.mark.parametrize("base", BASES)
def test_a_run_on_the_device_replays_bit_identically(base: str, tmp_path: Path) -> None:
    faults = {40: "nan_loss", 90: "loss_x100"}
    task = make_task(device=DEVICE)
    opt = _wrapped(base, task, log_dir=tmp_path)
    train(task, opt, 150, faults=faults, evaluate=False)
    opt.close()
    original = final_weights(task.model)
    task = make_task(device=DEVICE)
    replayed = selftune.replay(
        make_optimizer(base, task.model.parameters(), LR[base] / 10), tmp_path
    )
    train(task, replayed, 150, faults=faults, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(original, final_weights(task.model), strict=True))


def test_a_checkpoint_resumes_bit_identically_on_the_device_and_loads_on_the_cpu(
    tmp_path: Path,
) -> None:
    """A crash halfway costs nothing on the GPU; the same file carries the run to a CPU."""
    whole = make_task(device=DEVICE)
    train(whole, _wrapped("adamw", whole), 120, evaluate=False)

    first = make_task(device=DEVICE)
    opt = _wrapped("adamw", first)
    train(first, opt, 60, evaluate=False)
    knobs = opt.hyperparams()
    ckpt = selftune.save_checkpoint(
        tmp_path / "ckpt.pt",
        model=first.model,
        optimizer=opt,
        step=60,
        extra={"order": first.order.get_state()},
    )
    resumed = make_task(device=DEVICE)
    opt = _wrapped("adamw", resumed)
    extra = selftune.load_checkpoint(ckpt, model=resumed.model, optimizer=opt, map_location=DEVICE)
    resumed.order.set_state(extra["extra"]["order"].cpu())  # map_location moved it
    train(resumed, opt, 60, evaluate=False)
    weights = zip(final_weights(whole.model), final_weights(resumed.model), strict=True)
    assert all(torch.equal(a, b) for a, b in weights)

    on_cpu = make_task()
    cpu_opt = _wrapped("adamw", on_cpu)
    selftune.load_checkpoint(ckpt, model=on_cpu.model, optimizer=cpu_opt, map_location="cpu")
    assert cpu_opt.hyperparams() == knobs
    assert cpu_opt.guard is not None and cpu_opt.guard.snapshots
    kept = cpu_opt.guard.snapshots[-1].payload["params"]
    assert all(p.device.type == "cpu" for group in kept for p in group)
    before = on_cpu.full_loss()
    run = train(on_cpu, cpu_opt, 60)
    assert run.final < before


def test_float16_autocast_with_a_grad_scaler_steps_only_when_the_scaler_does() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "amp_accumulation.py"
    spec = importlib.util.spec_from_file_location("example_amp_accumulation", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    steps, init_scale = 150, torch.amp.GradScaler(DEVICE).get_scale()
    opt, scaler, losses = example.train(steps=steps, accumulate=4, device=DEVICE)
    # each overflow halves the scale, and none grows it back within 2000 steps
    skipped = round(math.log2(init_scale / scaler.get_scale()))
    assert opt.step_count == steps - skipped
    assert opt.last_signals.loss == pytest.approx(losses[-1], rel=1e-6)
    assert opt.hyperparams()[0]["lr"] != pytest.approx(1e-3, rel=1e-3)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
