"""The guard under fire: faults injected into real training runs are caught, rolled back, survived.

Every controller is crossed with SGD (momentum 0.9) and AdamW on a small regression
(:func:`faults.make_task`).  A clean run fixes the step at which the full-data loss first reaches
``TARGET``; each faulty run must reach it within 1.5x as many steps, and its decision log must hold
the guard record of the fault at the step it happened.  ``pytest -s`` prints a summary of faults
injected, survived and steps lost.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import (
    FAULTS,
    Task,
    final_weights,
    guard_records,
    make_optimizer,
    make_task,
    train,
)
from problems import gan_adam, gan_players, gaussian_nll, train_gan
from problems import train as train_problem

import selftune
from selftune.audit import read_log
from selftune.bench.workloads import WORKLOADS
from selftune.signals import GroupSignals, Signals
from selftune.tuner import SelfTuned

pytestmark = pytest.mark.usefixtures("one_thread")

CONTROLLERS = sorted(selftune.CONTROLLERS)
OPTIMIZERS = ("sgd", "adamw")
#: full-data loss every clean run reaches in 80-180 steps (the start is about 2.5)
TARGET = 0.05
CLEAN_LIMIT = 600
#: a faulty run may take this many times the clean run's steps to reach the target
SLACK = 1.5
#: what the guard's record names for each fault; the ×100 loss moves loss and gradient alike
SIGNALS = {
    "nan_loss": {"loss"},
    "inf_grad": {"grad_norm"},
    "loss_x100": {"loss", "grad_norm"},
    "lr_1e3": {"loss", "grad_norm"},
}

SUMMARY: list[dict[str, Any]] = []

_RATE_NOT_REGAINED = (
    "after a one-off fault the guard's lr cut (x0.5) is kept for the rest of the run; "
    "off never grows it back at its default (regain_after=0) and hypergradient too slowly: the "
    "target is missed by a few steps"
)
#: combinations that miss the slack for a known defect; strict, so a fix shows as XPASS
KNOWN: dict[tuple[str, str, str], str] = {
    ("sgd", "off", "lr_1e3"): _RATE_NOT_REGAINED,
    # the faulty batch's update is held back and never made, nothing else changes: the run
    # goes on one batch along the stream.  That alone (no fault, no guard event, one batch
    # left out of the stream near step 55; a probe, not kept) took stability's SGD here past
    # the slack: its rate is at its edge, and the clean run's steps are its batch order's luck
    ("sgd", "stability", "loss_x100"): "the clean run's steps are one batch order's luck",
    **{("adamw", "hypergradient", f): _RATE_NOT_REGAINED for f in FAULTS if f != "loss_x100"},
}


@pytest.fixture(autouse=True, scope="module")
def summary() -> Iterator[None]:
    """Print the fault table once the module's runs are done (shown by ``pytest -s``)."""
    yield
    if not SUMMARY:
        return
    survived = [r for r in SUMMARY if r["survived"]]
    lost = [r["hit"] - r["clean"] for r in survived]
    print(f"\nguard fault injection: target full-data loss {TARGET}, slack {SLACK}x")
    print(
        f"{'optimizer':9} {'controller':13} {'fault':9} {'at':>4} {'caught':>6} "
        f"{'clean':>5} {'hit':>5} {'lost':>5} {'ratio':>5}"
    )
    for r in SUMMARY:
        hit = "-" if r["hit"] is None else r["hit"]
        lost_steps = "-" if r["hit"] is None else r["hit"] - r["clean"]
        ratio = "-" if r["hit"] is None else f"{r['hit'] / r['clean']:.2f}"
        print(
            f"{r['optimizer']:9} {r['controller']:13} {r['fault']:9} {r['at']:>4} "
            f"{r['caught']!s:>6} {r['clean']:>5} {hit!s:>5} {lost_steps!s:>5} {ratio:>5}"
        )
    print(
        f"faults injected {len(SUMMARY)}, survived {len(survived)}, steps lost: "
        f"median {sorted(lost)[len(lost) // 2] if lost else '-'}, "
        f"max {max(lost) if lost else '-'}, total {sum(lost)}"
    )


def wrapped(task: Task, optimizer: str, controller: str, **kwargs: Any) -> selftune.SelfTuned:
    return selftune.wrap(make_optimizer(optimizer, task.model.parameters()), controller, **kwargs)


@functools.cache
def clean_hit(optimizer: str, controller: str) -> int:
    """The step at which the clean run first reaches ``TARGET`` (the same for every fault)."""
    task = make_task()
    run = train(
        task, wrapped(task, optimizer, controller), CLEAN_LIMIT, target=TARGET, stop_at_target=True
    )
    assert run.hit is not None, (
        f"{optimizer}/{controller}: the clean run never reached {TARGET} "
        f"(final {run.final:.4f}); the target no longer suits the task"
    )
    return run.hit


def fault_step(clean: int) -> int:
    """Inject 70% of the way to the target: past the guard's warm-up, with a snapshot behind it.

    Multiples of the snapshot interval are avoided: there the snapshot is taken after the fault's
    learning rate was written, which tests a different path (two rollbacks) than the one asked for.
    """
    at = max(30, round(0.7 * clean))
    return at + 1 if at % selftune.GuardConfig().interval == 0 else at


def _cases() -> list[Any]:
    return [
        pytest.param(
            o,
            c,
            f,
            marks=[pytest.mark.xfail(reason=KNOWN[o, c, f], strict=True)]
            if (o, c, f) in KNOWN
            else [],
        )
        for o in OPTIMIZERS
        for c in CONTROLLERS
        for f in FAULTS
    ]


@pytest.mark.parametrize(("optimizer", "controller", "fault"), _cases())
def test_fault_is_caught_logged_and_survived(
    optimizer: str, controller: str, fault: str, tmp_path: Path
) -> None:
    clean = clean_hit(optimizer, controller)
    at = fault_step(clean)
    task = make_task()
    opt = wrapped(task, optimizer, controller, log_dir=tmp_path)
    limit = math.floor(SLACK * clean)
    run = train(task, opt, limit, faults={at: fault}, target=TARGET, stop_at_target=True)
    # auto's range test may overshoot into a spike the guard catches in the first steps, in the
    # clean run as here: only what happens from the fault on is this test's business
    events = [e for e in guard_records(tmp_path) if e["step"] >= at]
    caught = bool(events) and events[0]["step"] in range(at, at + 3)
    SUMMARY.append(
        {
            "optimizer": optimizer,
            "controller": controller,
            "fault": fault,
            "at": at,
            "caught": caught,
            "clean": clean,
            "hit": run.hit,
            "survived": run.hit is not None,
        }
    )

    if fault == "lr_1e3" and controller == "auto":
        # a rise of the rate in param_groups is a scheduler's to auto, which holds it: the
        # rate stepped at stays the one auto chose, and no trouble follows for the guard
        held = [
            r
            for r in read_log(tmp_path).records
            if r["kind"] == "decision" and r["step"] == at and r["reason"].startswith("held:")
        ]
        assert len(held) == 1 and held[0]["new"] < 1.0, held
        assert not events, events
        assert run.hit is not None
        return
    assert events, f"no guard record for {fault} injected at step {at}"
    first = events[0]
    if fault == "lr_1e3":
        # the rate is written before step `at`'s update; the trouble shows in the next loss
        assert at < first["step"] <= at + 2, first
    else:
        assert first["step"] == at, first
    assert first["signal"] in SIGNALS[fault], first
    # a spike is held, and the weights it came from show it again at the next step; a fault
    # of one batch's loss is not there at the next step: its update was never made
    spike = fault in ("loss_x100", "lr_1e3")
    assert first["event"] == ("hold" if spike else "rollback"), first
    rolled = events[1] if spike and fault == "lr_1e3" else first
    if fault == "nan_loss":
        assert math.isnan(float(first["value"]))
    if fault == "inf_grad":
        assert float(first["value"]) == math.inf
    # one trouble, one rollback (after its hold): the guard did not go on to fire again
    assert len(events) == (2 if fault == "lr_1e3" else 1), events
    cuts = [
        r
        for r in read_log(tmp_path).records
        if r["kind"] == "decision"
        and r["source"] == "guard"
        and r["knob"] == "lr"
        and r["step"] >= at
    ]
    if fault == "loss_x100":
        assert not cuts, cuts  # nothing restored, nothing cut
    else:
        assert rolled["event"] == "rollback" and rolled["restored_step"] < at, rolled
        assert rolled["step"] == first["step"] + (fault == "lr_1e3"), rolled
        assert [r["step"] for r in cuts] == [rolled["step"]]
    if fault in ("nan_loss", "inf_grad"):  # at lr_1e3 ``old`` is the restored base rate
        assert cuts[0]["new"] < cuts[0]["old"]  # times the wild scale
    assert run.hit is not None, (
        f"{fault} at step {at}: the target {TARGET} was not reached within {limit} steps "
        f"({SLACK}x the clean run's {clean}); full-data loss at the end {run.final:.4f}"
    )
    assert all(torch.isfinite(p).all() for p in task.model.parameters())


@pytest.mark.parametrize("controller", [c for c in CONTROLLERS if c != "stability"])
def test_clean_long_run_raises_no_guard_event(controller: str, tmp_path: Path) -> None:
    """2,000 clean steps per optimizer: heavy-tailed minibatch losses must not look like trouble."""
    for optimizer in OPTIMIZERS:
        task = make_task(seed=1)
        start = task.full_loss()
        folder = tmp_path / optimizer
        opt = wrapped(task, optimizer, controller, log_dir=folder)
        train(task, opt, 2000, evaluate=False)
        opt.close()
        assert guard_records(folder) == [], f"{optimizer}/{controller}: false alarm"
        assert opt.step_count == 2000
        assert task.full_loss() < 0.1 * start, f"{optimizer}/{controller} did not train"


def test_stability_grows_no_rate_back_up_to_one_the_guard_rolled_back_from(tmp_path: Path) -> None:
    """``stability`` grows its rate into regressions of this task's loss (SGD with momentum, the
    clean-run test's seed), true alarms the guard rolls back.  It grew back to the failing rate
    within a few dozen steps of each: eight rollbacks in 2,000 steps.  Growth now stops at
    ``cut`` times the lowest rate that failed, which leaves fewer rollbacks and a run that
    trains."""
    task = make_task(seed=1)
    start = task.full_loss()
    opt = wrapped(task, "sgd", "stability")
    events: list[selftune.StepEvent] = []
    opt.add_listener(events.append)
    train(task, opt, 2000, evaluate=False)
    lowest, rollbacks = math.inf, 0
    for before, event in itertools.pairwise(events):
        if event.guard is not None and event.guard["event"] == "rollback":
            rollbacks += 1
            lowest = min(lowest, before.hyperparams[0]["lr"])  # the rate the step failed at
        grown = [d.new for d in event.decisions if d.source == "controller" and d.new > d.old]
        assert all(new <= 0.5 * lowest for new in grown), (event.step, grown, lowest)
    assert 1 <= rollbacks <= 2, f"{rollbacks} rollbacks"  # 0: the test lost its power
    assert task.full_loss() < 0.1 * start


@pytest.mark.parametrize(
    ("faults", "regain_after", "regained_at", "end"),
    [
        ({40: "nan_loss"}, 25, [65], 1.0),  # a one-off fault: the cut is undone
        # trouble again at once: the rate the first cut left failed too, and only the second
        # cut is undone
        ({40: "nan_loss", 41: "nan_loss"}, 25, [66], 0.5),
        # trouble in the doubling's trial: back to before it, cut again, and the cuts stand
        ({40: "nan_loss", 70: "nan_loss"}, 25, [65], 0.25),
        ({40: "nan_loss", 100: "nan_loss"}, 25, [65, 125], 1.0),  # after it: a new trial
        ({40: "nan_loss"}, 0, [], 0.5),  # regain_after=0, the default: every cut stands
    ],
)
def test_off_undoes_a_guard_cut_the_run_showed_needless(
    faults: dict[int, str], regain_after: int, regained_at: list[int], end: float, tmp_path: Path
) -> None:
    """Under ``off`` with ``regain_after`` the guard's cut of the rate is a trial: that many
    healthy steps on, the rate doubles back, until the cut is undone; trouble within as many
    steps of a doubling keeps the cuts for good.  Without it a one-off fault left the rest of
    the run at half the rate the user chose, as it still does by default.  The doublings are
    the controller's decisions, logged with the cut they undo, and a replay follows them to
    the same weights."""
    task = make_task()
    kwargs = {"regain_after": regain_after} if regain_after else {}
    opt = wrapped(task, "sgd", "off", log_dir=tmp_path, **kwargs)
    start = opt.hyperparams()[0]["lr"]
    train(task, opt, 150, faults=faults, evaluate=False)
    opt.close()
    records = read_log(tmp_path).records
    cuts = [r["step"] for r in records if r["kind"] == "guard" and r["event"] == "rollback"]
    assert cuts == sorted(faults)
    doublings = [r for r in records if r["kind"] == "decision" and r["source"] == "controller"]
    assert [r["step"] for r in doublings] == regained_at
    assert all("the guard's cut at step" in r["reason"] for r in doublings)
    assert opt.hyperparams()[0]["lr"] == pytest.approx(start * end, rel=1e-12)
    replayed_task = make_task()
    replayed = selftune.replay(make_optimizer("sgd", replayed_task.model.parameters()), tmp_path)
    train(replayed_task, replayed, 150, faults=faults, evaluate=False)
    for a, b in zip(task.model.parameters(), replayed_task.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_off_with_a_trial_of_the_cut_makes_up_for_a_one_off_rate_fault() -> None:
    """The known miss of the fault table (SGD under ``off``, one step at 1000x its rate: the
    halved rate kept to the end missed the target within the slack) is made up with
    ``regain_after=25``, the rate back by the time the clean run reaches the target."""
    clean = clean_hit("sgd", "off")
    at = fault_step(clean)
    task = make_task()
    opt = wrapped(task, "sgd", "off", regain_after=25)
    start = opt.hyperparams()[0]["lr"]
    limit = math.floor(SLACK * clean)
    run = train(task, opt, limit, faults={at: "lr_1e3"}, target=TARGET, stop_at_target=True)
    assert run.hit is not None, (clean, limit, run.final)
    assert opt.hyperparams()[0]["lr"] == pytest.approx(start)


def test_repeated_trouble_escalates_with_a_clear_error(tmp_path: Path) -> None:
    task = make_task()
    # "off": only the guard acts (auto's range test may itself overshoot into an early rollback,
    # which would leave fewer retries for the fault)
    opt = wrapped(task, "sgd", "off", log_dir=tmp_path)
    retries = selftune.GuardConfig().max_retries
    at = 40
    with pytest.raises(selftune.GuardError) as info:
        train(task, opt, 200, fault_from=(at, "nan_loss"))
    message = str(info.value)
    escalated = at + retries  # one rollback per step at..at+retries-1, then the error
    assert f"step {escalated}" in message
    assert "loss=nan" in message
    assert f"cut to {0.5**retries:.3g}x" in message and "check the data" in message
    assert "nonfinite_only" not in message  # it still acts on a NaN: no help for this trouble
    records = read_log(tmp_path).records
    last = records[-1]
    assert last["kind"] == "guard" and last["event"] == "escalate", last
    assert last["step"] == escalated and last["signal"] == "loss"
    assert math.isnan(float(last["value"]))
    rollbacks = [r for r in records if r["kind"] == "guard" and r["event"] == "rollback"]
    assert [r["step"] for r in rollbacks] == list(range(at, escalated))
    # the error leaves the model as the last rollback restored it: finite, never NaN
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    # and no step after it: one went on in the log past the escalate record, and its replay,
    # which raises the error again there, could not follow
    with pytest.raises(selftune.GuardError, match=f"gave up at step {escalated}"):
        train(task, opt, 1)
    # nor a group added: it dropped the snapshots and took a group the checkpoint to resume
    # from lacks, which then no longer loaded
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(selftune.GuardError, match=f"gave up at step {escalated}"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1
    assert read_log(tmp_path).records[-1] == last


def test_a_rollback_logs_the_rate_it_cut_from(tmp_path: Path) -> None:
    """A rate of 1e3 written by the loop, rolled back: the guard's decision is from the rate in
    force at the fault to half the snapshot's.  Read after the restore had lowered the base,
    its ``old`` was the snapshot's rate, and the report drew the halving as a doubling."""
    task = make_task()
    opt = wrapped(task, "sgd", "off", log_dir=tmp_path)
    train(task, opt, 60, faults={40: "lr_1e3"}, evaluate=False)
    opt.close()
    records = read_log(tmp_path).records
    # the step at 1e3 is taken; the next one's loss is the spike, held, and the one after,
    # on the same weights, confirms it
    (cut,) = [r for r in records if r["kind"] == "decision" and r["step"] == 42]
    assert cut["source"] == "guard" and cut["knob"] == "lr"
    assert (cut["old"], cut["new"]) == (1e3, pytest.approx(0.05 * 0.5))


def test_a_regression_s_rollback_cuts_below_the_rate_that_regressed(tmp_path: Path) -> None:
    """A regression goes back to the snapshot of the lowest level, older than a spike's cut
    since: half its rate was the rate that regressed (0.75 x 0.5 = 0.375), no decision was
    logged, and the run went on at it.  The cut is now below the rate that failed too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(32, 4)
    )
    opt = selftune.wrap(
        torch.optim.SGD(model.parameters(), lr=1.5, momentum=0.9), "off", log_dir=tmp_path
    )
    batches = torch.Generator().manual_seed(1)
    for _ in range(100):
        rows = torch.randint(0, len(x), (32,), generator=batches)
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    records = read_log(tmp_path).records
    steps = [r["step"] for r in records if r["kind"] == "guard" and r["signal"] == "loss_level"]
    assert steps, "no regression: the test lost its power"
    cut = [r for r in records if r["kind"] == "decision" and r["step"] == steps[0]]
    assert cut and cut[0]["new"] == pytest.approx(cut[0]["old"] / 2), cut


def test_grad_scaler_skipped_steps_are_never_seen(tmp_path: Path) -> None:
    """A step the GradScaler skips (non-finite gradients) is not a step: not counted, not judged."""
    task = make_task()
    opt = wrapped(task, "sgd", "off", log_dir=tmp_path)  # no range test: any guard record is news
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()
    poisoned = {30, 31, 55}
    counts: list[int] = []
    for t in range(1, 101):
        loss = task.batch_loss()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if t in poisoned:
            next(iter(task.model.parameters())).grad.fill_(math.inf)  # type: ignore[union-attr]
        scaler.step(opt, loss=loss.detach())
        scaler.update()
        counts.append(opt.step_count)
    assert opt.step_count == 100 - len(poisoned)
    # the count stood still exactly on the poisoned iterations
    assert [t for t in range(1, 101) if counts[t - 1] == (counts[t - 2] if t > 1 else 0)] == sorted(
        poisoned
    )
    assert guard_records(tmp_path) == []
    opt.close()
    trace = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert len(trace) == opt.step_count
    assert scaler.get_scale() < 2.0**10  # the scaler did see the infinities and backed off


def test_gradient_accumulation_acts_once_per_optimizer_step(tmp_path: Path) -> None:
    task = make_task()
    opt = wrapped(task, "adamw", "auto", log_dir=tmp_path)
    assert opt.guard is not None
    calls = {"guard": 0, "controller": 0}
    check, propose = opt.guard.check, opt.controller.propose

    def counted_check(*args: Any) -> Any:
        calls["guard"] += 1
        return check(*args)

    def counted_propose(*args: Any) -> Any:
        calls["controller"] += 1
        return propose(*args)

    opt.guard.check = counted_check  # type: ignore[method-assign]
    opt.controller.propose = counted_propose  # type: ignore[method-assign]
    micro, steps = 4, 60
    for _ in range(steps):
        opt.zero_grad()
        total = 0.0
        for _ in range(micro):
            loss = task.batch_loss() / micro
            loss.backward()
            total += float(loss.detach())
        opt.step(loss=total)
    assert opt.step_count == steps
    assert calls == {"guard": steps, "controller": steps}
    opt.close()
    trace = [line for line in (tmp_path / "trace.jsonl").read_text().splitlines() if line]
    assert len(trace) == steps
    assert task.full_loss() < 0.5


def test_guard_off_lets_a_nan_through(tmp_path: Path) -> None:
    task = make_task()
    opt = wrapped(task, "sgd", "auto", guard=False, log_dir=tmp_path)
    assert opt.guard is None
    train(task, opt, 40, faults={30: "nan_loss"}, evaluate=False)
    assert not all(torch.isfinite(p).all() for p in task.model.parameters())
    assert guard_records(tmp_path) == []
    assert opt.step_count == 40


@pytest.mark.parametrize(
    "guard",
    [False, selftune.GuardConfig(nonfinite_only=True), True],
    ids=["off", "nonfinite", "on"],
)
def test_a_float64_loss_too_large_to_square_goes_on_to_the_guard(guard: Any) -> None:
    """A float64 run diverging past 1e154, whose loss's square is past float64's range: the
    loss statistics take it as infinite (a Python ``** 2`` raised OverflowError there), and
    what follows is each guard's own: none, or a rollback once a value is non-finite; the
    default guard catches the climb long before."""
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64)
    y = x @ torch.randn(8, 1, dtype=torch.float64)
    model = torch.nn.Linear(8, 1).double()
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=5.0), "off", guard=guard)
    highest = 0.0
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x), y)
        highest = max(highest, loss.item()) if loss.isfinite() else highest
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    if guard is True:  # the guard caught the climb long before
        assert torch.nn.functional.mse_loss(model(x), y).item() < 1e-6
    else:
        assert highest > 1e155  # the run went where the square overflows
    # an integer loss past float64's range is an infinite one: skipped, not a traceback
    rate = opt.hyperparams()[0]["lr"]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step(loss=10**400)
    if guard is not False:
        assert opt.hyperparams()[0]["lr"] == rate / 2


def test_a_rollback_restores_the_loss_levels_of_its_snapshot(tmp_path: Path) -> None:
    """A NaN at step 15, after the loss has fallen several times over, rolls back to step 1, and
    the guard's running levels go back with the state.

    Kept from the abandoned trajectory, they would judge the restored state's own loss against
    levels it never had: when the early level was the lowest loss seen, that called the restored
    loss (10x the lowest) a spike at every step after the rollback, until the guard gave up.
    """
    task = make_task()
    opt = selftune.wrap(
        make_optimizer("sgd", task.model.parameters(), lr=0.03), "off", log_dir=tmp_path
    )
    assert opt.guard is not None
    levels: list[dict[str, Any]] = []
    opt.add_listener(lambda event: levels.append(copy.deepcopy(opt.guard.statistics())))
    at = 15
    train(task, opt, at, faults={at: "nan_loss"}, evaluate=False)
    assert [(r["step"], r["event"]) for r in guard_records(tmp_path)] == [(at, "rollback")]
    first, abandoned = levels[0]["loss"], levels[at - 2]["loss"]
    fallen = first["recent"][-1] / statistics.median(abandoned["recent"])
    assert fallen > 3, "the loss did not fall enough to test this"
    assert opt.guard.statistics() == levels[0]


class _Ramp(selftune.controllers.off.OffController):
    """Grows the rate 2% a step and counts its steps; records what each rollback hook saw."""

    def __init__(self) -> None:
        self.count = 0
        self.seen: list[tuple[str, Any]] = []

    def propose(self, signals: Any, knobs: Any) -> list[Any]:
        self.count += 1
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 1.02, "ramp")]

    def before_rollback(self, knobs: Any) -> None:
        self.seen.append(("before_rollback", (self.count, knobs[0]["lr"])))

    def on_backoff(self, step: int) -> None:
        self.seen.append(("on_backoff", (self.count, step)))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def test_a_controller_sees_the_knobs_that_failed_before_its_state_is_restored() -> None:
    """``before_rollback`` gets the rate in force at the failing step and the controller's own
    state from before the restore; ``on_backoff`` then sees the snapshot's state."""
    task, ctl = make_task(), _Ramp()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters(), lr=0.01), ctl)
    rates: list[float] = []
    opt.add_listener(lambda event: rates.append(opt.hyperparams()[0]["lr"]))
    at = 15
    train(task, opt, at, faults={at: "nan_loss"}, evaluate=False)
    assert [name for name, _ in ctl.seen] == ["before_rollback", "on_backoff"]
    (count, lr), (restored_count, step) = ctl.seen[0][1], ctl.seen[1][1]
    assert count == at - 1 and lr == pytest.approx(rates[at - 2])  # the rate of update at - 1
    assert lr == pytest.approx(0.01 * 1.02 ** (at - 1), rel=1e-6)
    assert step == at and restored_count < count  # the snapshot's state, from before the ramp


class _Restarter(selftune.controllers.off.OffController):
    """At step ``at``, asks for a restart with a rate 100x below the one in force."""

    def __init__(self, at: int) -> None:
        self.at, self.asked = at, False

    def propose(self, signals: Any, knobs: Any) -> list[Any]:
        self.asked = signals.step == self.at
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] / 100, "drop")] if self.asked else []

    def take_restart(self) -> str | None:
        return "test restart" if self.asked else None


@pytest.mark.parametrize("guard", [True, False])
def test_the_rate_set_with_a_restart_is_not_limited_per_step(guard: bool) -> None:
    """A restart sets the rate for the restored weights at once, within the bounds; without a
    guard there is no snapshot, no restart, and the per-step limit (x4) holds as for any
    decision.  (auto's re-test from a quarter of the rate its shrink found was held to a quarter
    of the rate it was leaving: 0.054 instead of 0.0042 on the residual CNN.)"""
    task, at = make_task(), 5
    sgd = make_optimizer("sgd", task.model.parameters(), lr=0.01)
    opt = selftune.wrap(sgd, _Restarter(at), guard=guard)
    decisions: list[Any] = []
    opt.add_listener(lambda event: decisions.extend(event.decisions))
    train(task, opt, at + 1, evaluate=False)
    (decision,) = decisions
    assert decision.new == pytest.approx(1e-4 if guard else 0.01 / 4)
    assert decision.clipped is not guard


def _signals(step: int, loss: float | None, grad_norm: float = 1.0) -> Signals:
    """A step's signals as the guard reads them: the loss, and the gradient norm."""
    group = GroupSignals(
        grad_norm=grad_norm, update_norm=1.0, cos_update=0.0, dot_update=0.0, cos_buffer=math.nan
    )
    return Signals(
        step=step, loss=loss, loss_ema=None, loss_ema_slow=None, loss_std=None,
        loss_slope=None, grad_norm=grad_norm, groups=(group,),
    )  # fmt: skip


def _judge_all(losses: list[float]) -> list[int]:
    """Feed minibatch losses to a fresh guard; return the steps it calls trouble."""
    guard = selftune.guard.Guard()
    return [step for step, loss in enumerate(losses, 1) if guard.check(_signals(step, loss))]


@pytest.mark.parametrize(
    ("restart", "trend", "restored"),
    [(True, 0.01, 1), (True, -0.02, 25), (False, 0.01, 25), (True, None, 25)],
)
def test_trouble_after_a_restart_before_any_progress_goes_back_to_the_restart(
    restart: bool, trend: float | None, restored: int
) -> None:
    """Trouble rolls back to the newest snapshot, unless the controller restarted from the first
    (its probe harmed the weights) and the loss has made no progress on it since: then the newer
    snapshots hold weights the same rates may have harmed, and the restart point holds none.
    Found on the small CNN from SGD at 1.0 (seed 1 of the benchmark's sweep): after its restart
    the loss stood at chance, a spike at step 33 went back to the snapshot of step 25, whose
    units the rate had killed, and the run ended at chance 2,000 steps later.  Without a
    restart a loss that has not moved is no sign of harm (a recurrent model's flat start: going
    back there cost the GRU's AdamW from 1e-4 its target), nor is a run that gives no loss."""
    guard = selftune.guard.Guard()
    trouble = None
    for step in range(1, 34):
        noise = 1.0 + 0.02 * (-1) ** step
        if trend is None:  # no loss: the trouble is the gradient norm's
            trouble = guard.check(_signals(step, None, 1e3 if step == 33 else noise))
        else:
            loss = 2.3 * math.exp(trend * step) * noise
            trouble = guard.check(_signals(step, 100.0 if step == 33 else loss))
        if trouble is None and guard.wants_snapshot(step):
            guard.keep(step, {"step": step})
        if restart and step == 8:
            assert guard.restart_point is not None
            guard.restarted_from(guard.restart_point)
    assert trouble is not None and trouble.signal == ("grad_norm" if trend is None else "loss")
    snap, _ = guard.rollback(trouble)
    assert snap is not None and snap.step == restored
    resumed = selftune.guard.Guard()  # a checkpoint carries the restart
    resumed.load_state_dict(guard.state_dict())
    assert resumed.restarted is restart


def test_the_early_level_is_the_recent_median_not_the_lowest_loss() -> None:
    # heavy-ball SGD on a regression bounces far above its lowest minibatch loss in its first
    # steps (plain SGD at friedman-mlp's best rate: 21 -> 164); a bounce is not a blow-up
    bounce = [228.0, 200.0, 120.0, 60.0, 15.0, 60.0, 170.0, 90.0]
    assert _judge_all(bounce) == []
    # a blow-up, a jump of over 100x in one step, is
    assert _judge_all([228.0, 73.0, 18528.0]) == [3]
    # and so is a jump of 10x over a level the loss has held for a few steps
    assert _judge_all([228.0, 100.0, 20.0, 18.0, 16.0, 15.0, 14.0, 190.0]) == [8]


def test_a_warm_up_spike_names_its_check_not_an_infinite_score() -> None:
    """Before the guard knows a deviation the jump's check judges, whose score is infinite by
    design: the reason read "18528 is inf sd above its running level"."""
    guard = selftune.guard.Guard()
    found = [guard.check(_signals(t, loss)) for t, loss in enumerate([228.0, 73.0, 18528.0], 1)]
    trouble = found[-1]
    assert trouble is not None and "inf" not in trouble.reason, trouble.reason
    assert "jumped past the warm-up's check (10x its recent median" in trouble.reason


def test_a_snapshot_is_not_changed_by_the_training_that_follows_its_restore() -> None:
    """A rollback hands the optimizer copies of the snapshot's tensors, not the tensors
    themselves: the steps after it update momentum buffers and weights in place, and a snapshot
    that shared them would restore that later state the next time it is used."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters(), lr=0.03), "off")
    assert opt.guard is not None
    train(task, opt, 30, evaluate=False)
    snap = opt.guard.snapshots[-1]
    kept = copy.deepcopy(snap.payload)
    train(task, opt, 3, faults={2: "nan_loss"}, evaluate=False)  # rolls back to ``snap``
    assert opt.guard.snapshots[-1] is snap
    train(task, opt, 5, evaluate=False)

    def tensors(tree: Any) -> list[torch.Tensor]:
        if isinstance(tree, torch.Tensor):
            return [tree]
        items = tree.values() if isinstance(tree, dict) else tree
        if isinstance(items, (list, tuple)) or isinstance(tree, dict):
            return [t for item in items for t in tensors(item)]
        return []

    now, then = tensors(snap.payload), tensors(kept)
    assert len(now) == len(then) > 0
    assert all(torch.equal(a, b) for a, b in zip(now, then, strict=True))


def test_a_rollback_keeps_the_param_groups_and_state_the_loop_holds() -> None:
    """torch's ``load_state_dict``, which a rollback's restore calls, builds new group dicts
    and a new ``state``: a loop that held a group (``head = opt.param_groups[1]``, to set its
    rate later) wrote its rate after the rollback into a dict no optimizer read any more, and
    the write was lost without a word.  The restore puts the snapshot's state into the
    containers and tensors in force (a compiled step guards on their identity)."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters(), lr=0.03), "off")
    groups, group, state = opt.param_groups, opt.param_groups[0], opt.state
    train(task, opt, 30, evaluate=False)
    buffers = {p: s["momentum_buffer"] for p, s in state.items()}
    momentum = {p: b.clone() for p, b in buffers.items()}
    train(task, opt, 1, faults={1: "nan_loss"}, evaluate=False)  # rolls back to step 25's
    assert opt.guard is not None and opt.guard.snapshots[-1].step == 25
    assert opt.param_groups is groups and opt.param_groups[0] is group and opt.state is state
    assert all(s["momentum_buffer"] is buffers[p] for p, s in state.items())
    assert any(not torch.equal(s["momentum_buffer"], momentum[p]) for p, s in state.items())
    group["lr"] = 0.0  # the loop's write to the group it holds is the optimizer's rate
    assert opt.hyperparams()[0]["lr"] == 0.0
    before = [p.detach().clone() for p in task.model.parameters()]
    train(task, opt, 1, evaluate=False)
    assert all(torch.equal(a, p) for a, p in zip(before, task.model.parameters(), strict=True))


@pytest.mark.parametrize("steps", [0, 30], ids=["skip", "rollback"])
def test_a_step_the_guard_refused_leaves_the_gradients_tensors(steps: int) -> None:
    """torch's ``step`` never touches ``.grad``; the guard's skip and rollback set every
    gradient to None, so a loop that read them after the step (a logger of the gradient's
    norm) failed there on NoneType, hours into a run, and one that zeroes in place
    (``zero_grad(set_to_none=False)``, static gradient buffers) lost its tensors.  They are
    zeroed in place: the refused batch's non-finite values cannot be stepped on later."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters(), lr=0.03), "off")
    events: list[str] = []
    opt.add_listener(lambda e: events.append(e.guard["event"]) if e.guard else None)
    train(task, opt, steps, evaluate=False)
    opt.zero_grad(set_to_none=False)
    (task.batch_loss() * math.nan).backward()
    grads = [p.grad for p in task.model.parameters()]
    opt.step(loss=torch.tensor(math.nan))
    assert events == ["skip" if steps == 0 else "rollback"]
    assert all(p.grad is g for p, g in zip(task.model.parameters(), grads, strict=True))
    assert all(not g.any() for g in grads)


def _classes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """256 points in 10 dimensions, labelled by the largest of three random projections."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=gen)
    return x, (x @ torch.randn(10, 3, generator=gen)).argmax(1)


def _switching_run(seed: int, opt_of: Any, log_dir: Path | None = None) -> tuple[float, float]:
    """160 steps of a small classifier whose task changes at step 80 (a curriculum, a new
    dataset); the losses on the new task at the switch and at the end, over all its data."""
    (x1, y1), (x2, y2) = _classes(100 + seed), _classes(200 + seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = opt_of(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), log_dir)
    order, at_switch = torch.Generator().manual_seed(seed), math.nan
    for step in range(160):
        x, y = (x1, y1) if step < 80 else (x2, y2)
        if step == 80:
            with torch.no_grad():
                at_switch = float(torch.nn.functional.cross_entropy(net(x2), y2))
        i = torch.randint(0, 256, (32,), generator=order)
        loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    with torch.no_grad():
        return at_switch, float(torch.nn.functional.cross_entropy(net(x2), y2))


@pytest.mark.parametrize("seed", range(4))
def test_a_new_task_mid_run_is_learnt_not_rolled_back_until_the_run_stops(
    seed: int, tmp_path: Path
) -> None:
    """A lasting change of the data is no fault of the run: the weights a rollback restores
    show it too, and rolling back again would only repeat until the run stopped (it did, in
    four seeds of four).  The guard learns the new level, logs it, and the run trains on."""
    start, end = _switching_run(seed, lambda o, d: selftune.wrap(o, "off", log_dir=d), tmp_path)
    assert end < 0.5 * start
    events = {r["event"] for r in guard_records(tmp_path)}
    assert "relevel" in events and "escalate" not in events


def _new_task_after_a_plain_load(
    log_dir: Path,
    checkpoint: Path | None = None,
    replay: bool = False,
    controller: Any = lambda: "off",
    raised: list[int] | None = None,
) -> tuple[SelfTuned, float, float]:
    """80 steps of SGD under ``off`` on one task, its ``opt.state_dict()`` (what Lightning and
    the Trainer save) loaded into a fresh wrapper, then 80 steps on another task (a fine-tune
    of a saved run on new data); the wrapper, and the new task's loss at the load and at the
    end, over all its data.  ``checkpoint``: saved there after the new task's first step, and
    the run resumed from it in a fresh wrapper.  ``replay``: the second wrapper replays the run
    that ``log_dir`` holds.  ``controller``: makes each wrapper's controller in place of
    ``off``.  ``raised``: the steps whose ``step()`` raised ControllerError, caught."""
    (x1, y1), (x2, y2) = _classes(100), _classes(200)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    order = torch.Generator().manual_seed(0)

    def train(opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            i = torch.randint(0, 256, (32,), generator=order)
            loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            try:
                opt.step(loss=loss.detach())
            except selftune.ControllerError:
                if raised is None:
                    raise
                raised.append(opt.step_count)

    def new_task_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(net(x2), y2))

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    first = selftune.wrap(sgd(), controller())
    train(first, x1, y1, 80)
    wrapped_at = copy.deepcopy(net.state_dict())
    opt = (
        selftune.replay(sgd(), log_dir)
        if replay
        else selftune.wrap(sgd(), controller(), log_dir=log_dir)
    )
    opt.load_state_dict(first.state_dict())
    start = new_task_loss()
    if checkpoint is not None:
        train(opt, x2, y2, 1)
        selftune.save_checkpoint(checkpoint, model=net, optimizer=opt, step=opt.step_count)
        opt.close()
        net.load_state_dict(wrapped_at)  # the weights the run folder was started with
        opt = selftune.wrap(sgd(), controller(), log_dir=log_dir)
        selftune.load_checkpoint(checkpoint, model=net, optimizer=opt)
    train(opt, x2, y2, 160 - opt.step_count)  # to step 160
    opt.close()
    return opt, start, new_task_loss()


def test_a_new_task_right_after_loading_a_plain_state_dict_is_learnt(tmp_path: Path) -> None:
    """Loaded from a plain state dict, the guard holds no snapshot until a healthy step, so
    trouble there skips the step and leaves the weights as they were.  On a new task each next
    step read those weights on that data again: six skips halved a rate that moved no weight,
    and the run stopped with a GuardError at the new task's seventh step.  A spike that the
    weights the skip left show again is the new task's level, learnt as after a rollback."""
    _, start, end = _new_task_after_a_plain_load(tmp_path)
    assert end < 0.5 * start
    assert [(r["step"], r["event"]) for r in guard_records(tmp_path)] == [
        (81, "skip"),
        (82, "relevel"),
    ]


class _RefusesToGoBack(selftune.controllers.off.OffController):
    """Takes the state it is loaded with once (the plain load), and raises at every later load."""

    name = "refuses-to-go-back"

    def __init__(self) -> None:
        self.loads = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loads += 1
        if self.loads > 1:
            raise ValueError("no going back")


def test_a_controller_that_raises_at_a_relevel_has_it_taken_as_the_guard_made_it(
    tmp_path: Path,
) -> None:
    """A relevel (a regression's trial gone forward, likewise) puts the snapshot's controller
    state back as a rollback does; a ``load_state_dict`` that raised there, unlike at the
    rollback, broke the step off, and every later step was refused until a checkpoint loaded.
    The relevel is taken whole, noted, ``step()`` raises ControllerError, and the run goes on."""
    raised: list[int] = []
    opt, start, end = _new_task_after_a_plain_load(
        tmp_path, controller=_RefusesToGoBack, raised=raised
    )
    assert raised == [82] and opt.step_count == 160 and end < 0.5 * start
    assert opt.hyperparams()[0]["lr"] == 0.05  # the skip's cut undone
    selftune.audit.verify(tmp_path)
    (note,) = [r for r in read_log(tmp_path).records if r["kind"] == "note" and r["step"] == 82]
    assert "load_state_dict() raised ValueError: no going back" in note["reason"]


def test_the_relevel_after_a_skip_undoes_the_skip_s_rate_cut(tmp_path: Path) -> None:
    """As a relevel undoes the cut of the rollback it found needless, it undoes a skip's: the
    rate stayed halved for the rest of the run, for a change of the data, and ``auto``
    remembered the rate it had stood at as one that failed."""
    opt, _, _ = _new_task_after_a_plain_load(tmp_path)
    assert opt.hyperparams()[0]["lr"] == 0.05
    (undone,) = [r for r in read_log(tmp_path).records if r["kind"] == "decision"][-1:]
    assert (undone["step"], undone["old"], undone["new"]) == (82, 0.025, 0.05)
    assert "the skip's rate cut is undone" in undone["reason"]


def test_a_checkpoint_saved_between_a_skip_and_its_relevel_resumes_as_the_run(
    tmp_path: Path,
) -> None:
    """The knobs and controller state a skip cut travel in the checkpoint's snapshots: resumed
    from one saved between the skip and the relevel, the run undoes the cut as the run that
    never stopped does, to the same weights."""
    run, _, end = _new_task_after_a_plain_load(tmp_path / "run")
    resumed, _, resumed_end = _new_task_after_a_plain_load(tmp_path / "res", tmp_path / "c.pt")
    assert resumed.hyperparams() == run.hyperparams() and resumed_end == end
    weights = [[p for g in o.param_groups for p in g["params"]] for o in (run, resumed)]
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    # and the replay of the run undoes the skip's cut where the run did, to the same weights
    replayed, _, replayed_end = _new_task_after_a_plain_load(tmp_path / "run", replay=True)
    assert replayed.hyperparams() == run.hyperparams() and replayed_end == end


def test_after_a_new_task_the_lowest_level_held_is_the_new_task_s() -> None:
    """A regression goes back to the snapshot of the lowest loss level held beside the newest
    two.  After the task switch of :func:`_switching_run` that place went to a snapshot of the
    old task as it left the newest two (step 75, its easier loss's level below any the new
    task reached), and kept it for good: no regression may go back to it, so none could go
    back further than the newest two.  Only a snapshot taken since the relevel takes it now."""
    wrapped: list[SelfTuned] = []

    def wrap(optimizer: torch.optim.Optimizer, log_dir: Path | None) -> SelfTuned:
        wrapped.append(selftune.wrap(optimizer, "off", log_dir=log_dir))
        return wrapped[-1]

    for seed in range(4):
        _switching_run(seed, wrap)
        guard = wrapped[-1].guard
        assert guard is not None and guard.loss_since > 80  # the relevel at the switch
        best = guard.best
        assert best is not None and best.step >= guard.loss_since, (best.step, best.level)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_layer_unfrozen_mid_run_is_learnt_not_rolled_back_until_the_run_stops(
    base: str, tmp_path: Path
) -> None:
    """Gradual unfreezing (``add_param_group``) raises the gradient norm for good; the guard
    called every step after it a spike and rolled back to the snapshot taken with the new
    group, until the run stopped (6 of these 8 runs).  The restored weights show the spike
    too, and the guard learns the new level: a ``relevel`` event, which the listeners (the
    TensorBoard and MLflow writers) hear as they hear every guard event the log holds (they
    heard none of it: it was logged as the guard judged the step, and never reached them)."""
    relevels = 0
    for seed in range(4):
        x, y = _classes(seed)
        order = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 3),
        )  # fmt: skip
        net[0].requires_grad_(False)
        net[2].requires_grad_(False)
        inner = (
            torch.optim.SGD(net[4].parameters(), lr=0.05, momentum=0.9)
            if base == "sgd"
            else torch.optim.AdamW(net[4].parameters(), lr=1e-3)
        )
        opt = selftune.wrap(inner, log_dir=tmp_path / str(seed))
        heard: list[tuple[int, str]] = []
        opt.add_listener(lambda e, h=heard: h.append((e.step, e.guard["event"])) if e.guard else 0)
        for step in range(120):
            if step == 50:
                net[2].requires_grad_(True)
                opt.add_param_group({"params": net[2].parameters()})
            i = torch.randint(0, 256, (32,), generator=order)
            loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())  # raised GuardError before
        assert opt.step_count == 120 and math.isfinite(float(loss.detach()))
        events = [(r["step"], r["event"]) for r in guard_records(tmp_path / str(seed))]
        # held, confirmed on the same weights, then the restored weights show it too
        hold = [(51, "hold"), (52, "rollback"), (53, "relevel")]
        assert not events or events[:3] == hold, events
        assert heard == events
        relevels += len(events) > 0
    assert relevels >= 3  # the spike came in most runs: the test keeps its power


def test_a_new_task_s_gradients_are_judged_against_its_own_level(tmp_path: Path) -> None:
    """Two regressions on a shared trunk by turns of 100 steps, their losses 100x apart
    (``bench-results/multi-task/``): at the first change of task the loss spikes, is held,
    rolled back from, and the restored weights show it too, so the guard learns its new level.
    The gradient norm's level was left as the old task's, and the new task's gradients spiked
    against it one and four steps later (seeds 2 and 4), whose rollbacks' cuts stood.  The
    loss's relevel learns the gradient norm's level afresh too."""
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2000, 8, generator=gen)
        w_a, w_b = torch.randn(8, 1, generator=gen), torch.randn(8, 1, generator=gen)
        targets = (torch.sin(x @ w_a), 10 * torch.tanh(x @ w_b))
        torch.manual_seed(seed)
        trunk = torch.nn.Sequential(
            torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh()
        )
        heads = torch.nn.ModuleList([torch.nn.Linear(64, 1), torch.nn.Linear(64, 1)])
        inner = torch.optim.AdamW([*trunk.parameters(), *heads.parameters()], lr=1e-3)
        opt = selftune.wrap(inner, "off", log_dir=tmp_path / str(seed))
        for step in range(120):
            task = step // 100
            i = torch.randint(0, len(x), (32,), generator=gen)
            loss = torch.nn.functional.mse_loss(heads[task](trunk(x[i])), targets[task][i])
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
        opt.close()
        events = [(r["step"], r["event"]) for r in guard_records(tmp_path / str(seed))]
        assert events == [(101, "hold"), (102, "rollback"), (103, "relevel")], (seed, events)
        assert opt.hyperparams()[0]["lr"] == pytest.approx(1e-3)  # the relevel undid the cut


def _switch_and_replay(seed: int, folder: Path) -> tuple[float, float, bool | None]:
    """:func:`_switching_run` under ``auto``, logged to ``folder``; with its losses, whether a
    replay of the log ended on the same weights (None: no regression's rollback to replay)."""
    nets: list[Any] = []

    def wrapped(o: torch.optim.Optimizer, d: Path | None) -> torch.optim.Optimizer:
        nets.append(o.param_groups[0]["params"])
        return selftune.wrap(o, log_dir=d)

    def replayed(o: torch.optim.Optimizer, d: Path | None) -> torch.optim.Optimizer:
        nets.append(o.param_groups[0]["params"])
        return selftune.replay(o, folder)

    start, end = _switching_run(seed, wrapped, folder)
    records = guard_records(folder)
    assert "escalate" not in {r["event"] for r in records}
    if not any(r["signal"] == "loss_level" and r["event"] == "rollback" for r in records):
        return start, end, None
    _switching_run(seed, replayed)
    return start, end, all(torch.equal(a, b) for a, b in zip(*nets, strict=True))


def test_a_loss_that_regresses_rolls_back_to_the_lowest_level_and_replays(tmp_path: Path) -> None:
    """``auto`` on the new task of :func:`_switching_run` undid a plateau cut into a rising loss
    and diverged slowly (2.4 to 27 to 138 over 80 steps: no step a spike); the guard's
    regression test rolls back to the snapshot of the lowest level it holds, at half the rate,
    and the run ends trained.  That snapshot may predate the switch: the old task's loss
    statistics then called the new task's losses spikes after ``auto``'s restart, and the
    restart and the rollback took turns until the run stopped (on one machine of two).  A
    replay of the log ends on the same weights."""
    replays = []
    for seed in range(4):
        start, end, same = _switch_and_replay(seed, tmp_path / str(seed))
        assert end < 0.5 * start, (seed, start, end)
        replays += [] if same is None else [same]
    assert replays and all(replays), replays


def _curriculum_run(
    seed: int,
    opt_of: Any,
    log_dir: Path | None = None,
    stop_at: int | None = None,
    resume: Path | None = None,
) -> float:
    """A regression MLP fed easy examples (a linear target) for 100 steps, then more and more
    hard ones (a nonlinear target) until step 300, then only those: its minibatch loss rises
    about 500x by design.  Returns the mean squared error on the hard examples at the end
    (NaN when it stops after ``stop_at`` steps, with a checkpoint in ``log_dir``; ``resume``
    from such a checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    easy_x, hard_x = torch.randn(1024, 8, generator=gen), torch.randn(1024, 8, generator=gen)
    easy_y = 0.5 * easy_x[:, :1]
    hard_y = torch.sin(3 * hard_x[:, :1]) * hard_x[:, 1:2] + hard_x[:, 2:3] ** 2
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 1),
    )  # fmt: skip
    opt = opt_of(torch.optim.AdamW(net.parameters(), lr=1e-3), log_dir)
    first = 0
    if resume is not None:
        saved = selftune.load_checkpoint(resume, model=net, optimizer=opt)
        first = saved["step"]
        gen.set_state(saved["extra"]["gen"])
    for step in range(first, 600):
        if step == stop_at and log_dir is not None:
            extra = {"gen": gen.get_state()}
            selftune.save_checkpoint(
                log_dir / "ck.pt", model=net, optimizer=opt, step=step, extra=extra
            )
            return math.nan
        hard = 0 if step < 100 else min(64, 64 * (step - 100) // 200)
        i = torch.randint(0, 1024, (64,), generator=gen)
        x = torch.cat([easy_x[i[hard:]], hard_x[i[:hard]]])
        y = torch.cat([easy_y[i[hard:]], hard_y[i[:hard]]])
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if isinstance(opt, SelfTuned) else opt.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(hard_x), hard_y))


def test_a_loss_that_rises_by_design_costs_the_guard_little(tmp_path: Path) -> None:
    """A curriculum raises the loss on purpose: the guard called its rise a regression, again
    and again as it went on, and each rollback cost the steps since the lowest level and half
    the rate for good: plain AdamW through the guard ended with 2.6-3.1x the error of plain
    AdamW.  Now a regression's rollback is a trial: the restored weights do no better on the
    data of now, so the run goes forward again to where it left, at its rate, and the guard
    judges no rise again in this run.  (A spike still cuts the rate: one seed's curriculum
    sends a batch 10x above its level.)"""
    ratios = []
    for seed in range(3):
        plain = _curriculum_run(seed, lambda o, d: o)
        folder = tmp_path / str(seed)
        guarded = _curriculum_run(seed, lambda o, d: selftune.wrap(o, "off", log_dir=d), folder)
        ratios.append(guarded / plain)
        records = guard_records(folder)
        regressions = [r for r in records if r["signal"] == "loss_level"]
        # one failed trial, the last regression record: no rise is judged after it
        events = [r["event"] for r in regressions]
        assert events[-1:] == ["forward"] and events.count("forward") == 1, regressions
        rates = {
            r["step"]: (r["old"], r["new"])
            for r in read_log(folder).records
            if r["kind"] == "decision" and r["step"] in {g["step"] for g in regressions}
        }
        (left, cut), (_, back) = rates[regressions[-2]["step"]], rates[regressions[-1]["step"]]
        assert cut == left / 2 and back == left, rates  # the rate it left, not the cut
        replayed = _curriculum_run(seed, lambda o, d, f=folder: selftune.replay(o, f))
        assert replayed == guarded  # a forward replays as a rollback does
    assert statistics.median(ratios) < 1.5, ratios  # 2.85 before


def test_a_run_resumed_inside_a_regression_trial_is_bit_identical(tmp_path: Path) -> None:
    """A checkpoint taken while a regression's rollback is on trial holds the trial and the
    snapshot it left: the resumed run goes forward where the uninterrupted one did, to the
    same weights, with the same log."""

    def wrapped(o: torch.optim.Optimizer, d: Path | None) -> torch.optim.Optimizer:
        return selftune.wrap(o, "off", log_dir=d)

    whole = _curriculum_run(1, wrapped, tmp_path / "whole")
    forward = [r["step"] for r in guard_records(tmp_path / "whole") if r["event"] == "forward"]
    assert forward, guard_records(tmp_path / "whole")
    part = tmp_path / "part"
    _curriculum_run(1, wrapped, part, stop_at=forward[0] - 2)  # steps before it: the trial's
    assert _curriculum_run(1, wrapped, part, resume=part / "ck.pt") == whole
    hashes = [[r["hash"] for r in read_log(d).records] for d in (tmp_path / "whole", part)]
    assert hashes[0] == hashes[1]


def _gan(seed: int, wrap: Any, steps: int, nan_at: int | None = None) -> list[torch.Tensor]:
    """The GAN of ``tests/problems.py`` trained with both players' Adam passed through
    ``wrap(optimizer, player)``; the generator's and discriminator's weights at the end."""
    players = gan_players(seed)
    opts = [wrap(gan_adam(p), name) for p, name in zip(players, ("g", "d"), strict=True)]
    train_gan(players, (opts[0], opts[1]), seed, steps, nan_at)
    for opt in opts:
        if isinstance(opt, SelfTuned):
            opt.close()
    return [w for player in players for w in final_weights(player)]


def test_a_gan_guarded_for_non_finite_values_only_trains_as_plain_adam(tmp_path: Path) -> None:
    """A GAN player's loss is no measure of its progress (it rises when the other player gets
    better), and rolling back one player does not bring it back: the default guard rolls the
    players back within the first 160 rounds of these seeds, and over 3,000 rounds cost plain
    Adam modes of the data (``bench-results/gan/``).  ``nonfinite_only`` judges no spike and no
    regression: the run is plain Adam's to the bit, and a NaN loss still rolls back (plain Adam
    ends on NaN weights), in a run that replays from its log."""
    steps, only = 160, selftune.GuardConfig(nonfinite_only=True)
    for seed in (0, 2, 3):
        default = tmp_path / f"default-{seed}"
        _gan(seed, lambda o, who, d=default: selftune.wrap(o, "off", log_dir=d / who), steps)
        events = [r["event"] for who in ("g", "d") for r in guard_records(default / who)]
        assert "rollback" in events, events
        plain = _gan(seed, lambda o, who: o, steps)
        guarded = _gan(seed, lambda o, who: selftune.wrap(o, "off", guard=only), steps)
        assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))
    folder = tmp_path / "nan"
    broken = _gan(0, lambda o, who: o, steps, nan_at=100)
    assert not all(bool(w.isfinite().all()) for w in broken)
    guarded = _gan(
        0,
        lambda o, who: selftune.wrap(o, "off", guard=only, log_dir=folder / who),
        steps,
        nan_at=100,
    )
    assert all(bool(w.isfinite().all()) for w in guarded)
    records = guard_records(folder / "g")
    assert [(r["step"], r["event"], r["signal"]) for r in records] == [(100, "rollback", "loss")]
    assert guard_records(folder / "d") == []
    replayed = _gan(0, lambda o, who: selftune.replay(o, folder / who), steps, nan_at=100)
    assert all(torch.equal(a, b) for a, b in zip(guarded, replayed, strict=True))


@pytest.mark.parametrize("noise", [0.3, 0.6])
def test_a_loss_that_goes_below_zero_is_judged_on_its_own_scale(
    noise: float, tmp_path: Path
) -> None:
    """A Gaussian negative log-likelihood crosses zero (noise 0.3: its minibatch losses end
    near -0.5; 0.6: they straddle zero).  The guard's statistics were learnt on a log scale,
    from positive losses only: below zero they stood still, and between they were the noise of
    the logarithms of losses near zero.  On that code (e9fe28a) the mean prediction moved by 1
    (the full loss from -0.5 to 3.5-4.0, or from 0.05-0.09 to 1.1-1.5) went unseen in three
    runs of these eight, was called a regression 34-39 steps later in three (one of which went
    forward again, as a loss that rises by design) and a spike at once in two; the rate
    raised 30x was caught at once in one run of eight, 30-45 steps later in the others.  Now a
    loss below zero moves them to the loss's own scale: each fault is a spike at once (held,
    and rolled back where the next step spikes too), and clean runs raise nothing."""
    fault_at, steps = 200, 250
    for seed in range(4):
        ends = []
        for fault in (None, "mean", "rate"):
            problem, folder = gaussian_nll(seed, noise), tmp_path / f"{seed}-{fault}"
            opt = selftune.wrap(
                torch.optim.AdamW(problem.model.parameters(), lr=1e-3), "off", log_dir=folder
            )
            losses: list[float] = []
            opt.add_listener(lambda e, out=losses: out.append(e.loss))

            def inject(t: int, model: Any = problem.model, o: Any = opt, f: Any = fault) -> None:
                if t == fault_at - 1 and f == "mean":
                    with torch.no_grad():
                        list(model.parameters())[-1][0] += 1.0
                elif t == fault_at - 1 and f == "rate":
                    o.param_groups[0]["lr"] = 3e-2

            ends.append(train_problem(problem, opt, steps, on_step=inject)[-1])
            opt.close()
            assert min(losses[: fault_at - 1]) < 0, min(losses)
            got = [(r["step"], r["event"], r["signal"]) for r in guard_records(folder)]
            if fault is None:
                assert got == [], (seed, got)
            else:
                # the rate fault is in the snapshot of step 200 too: a second rollback may
                # go back one further
                first, kinds = got[0][0], {g[1:] for g in got}
                held, rolled = ("hold", "loss"), ("rollback", "loss")
                assert kinds <= {held, rolled}, (seed, fault, got)
                # the weights moved stay moved, and the next step confirms the spike; a rate
                # raised 30x may leave weights whose spike one batch alone shows
                assert fault == "rate" or rolled in kinds, (seed, fault, got)
                assert fault_at <= first <= fault_at + (0 if fault == "mean" else 2), got
        assert max(ends[1:]) < ends[0] + 0.1, (seed, ends)  # survived: trained on as clean


def _one_example_steps(opt: torch.optim.Optimizer, net: torch.nn.Module, steps: int) -> list[float]:
    """Train ``net`` on the digits one example a step; the losses of those steps."""
    from selftune.bench.data import digits

    data, order, losses = digits(), torch.Generator().manual_seed(0), []
    for _ in range(steps):
        i = torch.randint(0, len(data.y_train), (1,), generator=order)
        loss = torch.nn.functional.cross_entropy(net(data.x_train[i]), data.y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if isinstance(opt, SelfTuned) else opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_a_loss_of_exactly_zero_is_a_loss_at_its_floor_not_below_it(tmp_path: Path) -> None:
    """A cross-entropy of one example the network is sure of rounds to 0.0 in float32.  The
    guard took that for a loss below zero (25a8224) and moved its statistics to the loss's own
    scale, where the small losses around it gave a level so near zero that a hard example's
    loss was a spike: this run rolled back eight times in its last 200 steps, each halving its
    rate, where plain SGD trains on.  Zero is the floor of such a loss, which stays on the log
    scale: the run is plain SGD's to the bit."""
    steps, finals = 2400, []
    for wrapped in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        opt: Any = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        if wrapped:
            opt = selftune.wrap(opt, "off", log_dir=tmp_path)
        losses = _one_example_steps(opt, net, steps)
        finals.append(final_weights(net))
        assert 0.0 in losses, min(losses)  # the case: some steps' loss is exactly zero
    assert guard_records(tmp_path) == []
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def _by_turns(guard: Any, steps: int = 40) -> None:
    """Two regressions whose losses start 100x apart, trained by turns of one step through a
    shared trunk (``bench-results/multi-task/``), AdamW wrapped with ``guard``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=gen)
    targets = (torch.sin(x @ torch.randn(8, 1, generator=gen)), 10 * torch.tanh(x[:, :1]))
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(32, 1), torch.nn.Linear(32, 1)])
    params = [*trunk.parameters(), *heads.parameters()]
    opt = selftune.wrap(torch.optim.AdamW(params, lr=1e-3), "off", guard=guard)
    for t in range(steps):
        i = torch.randint(0, 500, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(heads[t % 2](trunk(x[i])), targets[t % 2][i])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


def test_tasks_by_turns_stop_with_an_error_that_names_the_setting_that_trains_them() -> None:
    """The guard judges one loss stream: tasks whose losses differ 100x, trained by turns of a
    step, read as a spike at each change of task, the step after each rollback is the other
    task's, and the rollbacks escalate (every run of the probe stopped at step 14).  The error
    says so and names the setting, with which the same run trains to its end."""
    with pytest.raises(selftune.GuardError, match=r"GuardConfig\(nonfinite_only=True\)"):
        _by_turns(True)
    _by_turns(selftune.GuardConfig(nonfinite_only=True))


def _after_a_jump(
    jump: float, after: float, grad_jump: float = 1.0, steps: int = 80
) -> tuple[Any, Any]:
    """A guard fed a loss that falls from 2.3, jumps ``jump`` times its level at step 8 (the
    gradient norm ``grad_jump`` times its own), then stands at ``after`` with minibatch noise;
    the first trouble, and the guard."""
    guard = selftune.guard.Guard()
    for step in range(1, steps):
        noise = 1.0 + 0.02 * (-1) ** step
        level = 2.3 - 0.02 * step if step < 8 else after
        loss, grad = (level * jump, grad_jump) if step == 8 else (level * noise, noise)
        trouble = guard.check(_signals(step, loss, grad))
        if trouble is not None:
            return trouble, guard
        if guard.wants_snapshot(step):
            guard.keep(step, {"step": step})
    return None, guard


@pytest.mark.parametrize(("jump", "grad_jump"), [(4.0, 1.0), (1.0, 84.0)])
def test_a_warm_up_jump_the_loss_never_comes_back_from_goes_back_before_it(
    jump: float, grad_jump: float
) -> None:
    """A jump of the warm-up too small for its check (under 10x the loss's median, 100x the
    gradient norm's lowest) but past the factors a spike needs later, after which the loss's
    level never gets back below where it stood: the jump killed the network (the small CNN
    from SGD at 1.0: the loss 4x its median and the gradient norm 84x its lowest at step 9,
    then chance level for 2,000 steps, no spike ever called).  Trouble comes ``interval``
    steps after the jump, and goes back to the snapshot from before it, not to the newest,
    which holds the dead weights."""
    trouble, guard = _after_a_jump(jump, after=2.31, grad_jump=grad_jump)
    assert trouble is not None and trouble.signal == selftune.guard.DAMAGE
    assert trouble.step == 8 + guard.config.interval
    assert "step 8" in trouble.reason
    snap, factor = guard.rollback(trouble)
    assert snap is not None and snap.step == 1 and factor == guard.config.backoff
    assert [s.step for s in guard.snapshots] == [1]
    assert guard.abandoned is not None and guard.abandoned.step == 25  # on trial
    _, pending = _after_a_jump(jump, after=2.31, grad_jump=grad_jump, steps=20)
    resumed = selftune.guard.Guard()  # a checkpoint carries the jump still being judged
    resumed.load_state_dict(pending.state_dict())
    assert (
        resumed.jump
        == pending.jump
        == {"step": 8, "level": pytest.approx(math.log(2.19), abs=0.03)}
    )


@pytest.mark.parametrize(("jump", "after"), [(4.0, 1.5), (2.5, 2.31)])
def test_a_bounce_the_loss_falls_on_from_is_no_trouble(jump: float, after: float) -> None:
    """A jump the loss comes back from (its level gets below where it stood before) is a
    bounce of a healthy start, and so is a jump under the factor a later spike needs."""
    trouble, guard = _after_a_jump(jump, after)
    assert trouble is None and guard.jump is None


def _digits_at_sgd_1(seed: int, wrap: Any = None) -> tuple[float, list[torch.Tensor]]:
    """The benchmark's digits MLP, SGD (momentum 0.9) at 1.0, a rate past its grid's largest
    that reaches the target (0.3), through ``wrap`` (None: plain); its test accuracy after the
    budget of 500 steps, and its weights."""
    workload = WORKLOADS["digits-mlp"]
    task = workload.task()
    torch.manual_seed(seed)
    model = workload.make_model(task)
    gen = torch.Generator().manual_seed(seed)
    opt: Any = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = opt if wrap is None else wrap(opt)
    for _ in range(workload.steps):
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        opt.step() if wrap is None else opt.step(loss=loss.detach())
    model.eval()
    with torch.no_grad():
        return task.evaluate(model), [p.detach().clone() for p in model.parameters()]


def test_a_network_a_warm_up_jump_killed_is_brought_back(tmp_path: Path) -> None:
    """The guard alone on a rate that kills the network in its first steps: plain SGD ends at
    chance in every seed (at step 8 or 9 a loss 1.4-1.9x its recent median and a gradient norm
    16-35x its lowest, neither a spike by the warm-up's factors, then the loss at 2.3 for good).
    The guard goes back to the snapshot from before the jump at half the rate, as often as it
    takes; before, two of these three seeds ran at chance to the end with no guard event at
    all (``bench-results/too-high/``).  The log replays the run to the bit.  What accuracy a
    revived network reaches in the budget moves with the CPU's float rounding (the steps after
    a jump at this rate are chaotic: the same code gave other accuracies on another machine),
    so the test asks for networks back from chance, well clear of every plain run."""
    plain, guarded = [], []
    for seed in range(3):
        folder = tmp_path / str(seed)
        plain.append(_digits_at_sgd_1(seed)[0])
        accuracy, weights = _digits_at_sgd_1(
            seed, lambda o, f=folder: selftune.wrap(o, "off", log_dir=f)
        )
        guarded.append(accuracy)
        jumps = [r for r in guard_records(folder) if r["signal"] == selftune.guard.DAMAGE]
        assert jumps and all(r["restored_step"] < r["step"] - 25 for r in jumps), jumps
        if seed == 0:
            _, replayed = _digits_at_sgd_1(seed, lambda o, f=folder: selftune.replay(o, f))
            assert all(torch.equal(a, b) for a, b in zip(weights, replayed, strict=True))
    assert max(plain) < 0.2, plain
    assert statistics.median(guarded) > 0.5 and min(guarded) > 0.3, guarded  # chance: 0.1


@pytest.mark.parametrize(("restored", "forward"), [(2.0, False), (3.0, True)])
def test_a_jump_s_rollback_is_undone_when_the_restored_weights_do_no_better(
    restored: float, forward: bool
) -> None:
    """The rollback of a jump never recovered from is on trial, as a regression's: weights
    that died sit above where the restored ones start, and the rollback stands; but a loss
    that rises by design in the first steps (a GAN generator's, as the discriminator learns)
    is as high on the restored weights, and then the run goes forward again to the newest
    snapshot it left, and judges no jump or rise again.  Without the trial each rollback
    re-entered the warm-up, met the same rise, and halved a GAN generator's rate up to 246
    times (``bench-results/gan/``)."""
    trouble, guard = _after_a_jump(4.0, after=2.31)
    assert trouble is not None
    guard.rollback(trouble)
    went = []
    for t in range(guard.config.interval):
        assert guard.check(_signals(34 + t, restored * (1.0 + 0.02 * (-1) ** t))) is None
        went += [guard.forward.step] if guard.forward is not None else []
    assert went == ([25] if forward else [])
    assert guard.rises is forward and guard.trial is None


def _fall_then_rise(low: float, after: float, **config: float) -> tuple[Any, Any]:
    """A guard (of ``config``) fed a loss that falls from 2.3 to ``low`` by step 100, then
    climbs to ``after`` by step 150 and stays there to step 300, with minibatch noise; the
    first trouble, and the guard."""
    guard = selftune.guard.Guard(selftune.GuardConfig(**config))
    for step in range(1, 300):
        fall, climb = min(step, 100) / 100, min(max(step - 120, 0), 30) / 30
        level = 2.3 * (low / 2.3) ** fall * (after / low) ** climb
        trouble = guard.check(_signals(step, level * (1.0 + 0.02 * (-1) ** step)))
        if trouble is not None:
            return trouble, guard
        if guard.wants_snapshot(step):
            guard.keep(step, {"step": step})
    return None, guard


@pytest.mark.parametrize(("low", "after", "relapse"), [(1.7, 2.3, True), (0.5, 1.0, False)])
def test_a_loss_that_loses_most_of_its_fall_has_regressed(
    low: float, after: float, relapse: bool
) -> None:
    """A network that learnt a little and then died (the small CNN from SGD at 1.0, after its
    warm-up jump's rollback: its loss from 2.3 down to 1.7, then back to chance at 2.3 for
    2,000 steps) rises 1.35x, under the 1.5x a regression needs; it has lost all of its fall,
    more than the half (``relapse``) that is a regression too.  The rollback goes to the
    snapshot of the lowest level, on trial; a rise past 1.5x is a regression by that factor
    as before, whatever the fall."""
    trouble, guard = _fall_then_rise(low, after)
    assert trouble is not None and trouble.signal == selftune.guard.REGRESSION
    assert ("0.5 of its fall" in trouble.reason) is relapse, trouble.reason
    snap, factor = guard.rollback(trouble)
    assert snap is not None and snap.step in {100, 125} and factor == guard.config.backoff
    assert guard.trial is not None and guard.trial["need"] > 0


@pytest.mark.parametrize(
    ("low", "after", "config"),
    [
        (1.7, 1.9, {}),  # a third of the fall lost: a slow stretch, not a death
        (2.25, 2.6, {}),  # a fall within the noise: no progress to lose
        (1.7, 2.3, {"relapse": 1e9}),  # the rule switched off
    ],
)
def test_a_loss_that_keeps_most_of_its_fall_has_not_regressed(
    low: float, after: float, config: dict[str, float]
) -> None:
    trouble, _ = _fall_then_rise(low, after, **config)
    assert trouble is None, trouble


def test_a_state_saved_after_the_guard_gave_up_loads_with_its_rollbacks_back(
    tmp_path: Path,
) -> None:
    """GuardError's advice is to resume from a checkpoint with the data or the rate seen to, and
    a state saved after it loads (the log's place before the escalate record).  It held the
    guard's spent count of rollbacks, so the first bad batch after the load raised GuardError at
    once ("7 rollbacks did not help"), with none made.  A load of it is a new try: one bad batch
    is rolled back, and trouble that keeps coming is given up on after as many rollbacks as at
    first."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    train(task, opt, 20, evaluate=False)
    with pytest.raises(selftune.GuardError, match="6 rollbacks did not help"):
        train(task, opt, 30, fault_from=(3, "nan_loss"), evaluate=False)
    saved = copy.deepcopy((opt.state_dict(), task.model.state_dict()))
    task.model.load_state_dict(saved[1])
    opt.load_state_dict(saved[0])
    train(task, opt, 10, faults={5: "nan_loss"}, evaluate=False)
    rollbacks = [r for r in guard_records(tmp_path) if r["event"] == "rollback"]
    assert rollbacks[-1]["step"] == opt.step_count - 5
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    with pytest.raises(selftune.GuardError, match="6 rollbacks did not help"):
        train(task, opt, 30, fault_from=(3, "nan_loss"), evaluate=False)


def _batch_norm_run(
    log_dir: Path,
    model_given: bool,
    steps: int,
    *,
    bad_at: int = 30,
    start: int = 1,
    net: torch.nn.Module | None = None,
    opt: Any = None,
    replay: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """SGD on a network with BatchNorm, one example of one batch infinite at ``bad_at``: its
    forward writes NaN into the running statistics, and the guard rolls the step back."""
    if net is None:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        )
    if opt is None:
        inner = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        given = {"model": net} if model_given else {}
        if replay:
            opt = selftune.replay(inner, log_dir, **given)
        else:
            opt = selftune.wrap(inner, "auto", log_dir=log_dir, **given)
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, noise = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
        if t == bad_at:
            x[0, 0] = math.inf
        loss = torch.nn.functional.mse_loss(net(x), x[:, :1] * 2 + 0.1 * noise)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    return net, opt


def test_a_rollback_puts_back_the_buffers_of_the_model_given_to_wrap(tmp_path: Path) -> None:
    """A batch with one infinite example writes NaN into BatchNorm's running statistics in its
    forward pass; the guard rolled back the weights and left the statistics NaN, so that every
    evaluation after was NaN (and every checkpoint held them).  With ``model=`` the snapshots
    hold the buffers, and the rollback puts them back; without, the limitation stands, as the
    docs say."""
    for given in (True, False):
        net, _ = _batch_norm_run(tmp_path / str(given), given, 40)
        assert [r["step"] for r in guard_records(tmp_path / str(given))] == [30]
        bn = net[1]
        assert isinstance(bn, torch.nn.BatchNorm1d) and bn.running_mean is not None
        assert bool(bn.running_mean.isfinite().all()) is given
        net.eval()
        with torch.no_grad():
            assert bool(net(torch.randn(8, 4)).isfinite().all()) is given


def test_a_run_with_its_model_resumes_and_replays_to_the_bit(tmp_path: Path) -> None:
    """The buffers travel in the checkpoint's snapshots: a run resumed before the bad batch
    rolls its statistics back as the run that never stopped did.  The replay is given the
    model too, and refused without it (it would roll back the weights alone), or with one
    where the run had none."""
    whole, _ = _batch_norm_run(tmp_path / "whole", True, 40)
    net, opt = _batch_norm_run(tmp_path / "resumed", True, 20)
    selftune.save_checkpoint(tmp_path / "ckpt.pt", model=net, optimizer=opt, step=20)
    opt.close()
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    again = selftune.wrap(
        torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9),
        "auto",
        log_dir=tmp_path / "resumed",
        model=fresh,
    )
    selftune.load_checkpoint(tmp_path / "ckpt.pt", model=fresh, optimizer=again)
    _batch_norm_run(tmp_path / "resumed", True, 20, start=21, net=fresh, opt=again)
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    again.close()
    replayed, _ = _batch_norm_run(tmp_path / "whole", True, 40, replay=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), replayed.state_dict().values(), strict=True)
    )
    with pytest.raises(selftune.ConfigError, match=r"wrapped with its model .*model=model"):
        _batch_norm_run(tmp_path / "whole", False, 1, replay=True)
    _batch_norm_run(tmp_path / "plain", False, 2)
    with pytest.raises(selftune.ConfigError, match="wrapped without a model"):
        _batch_norm_run(tmp_path / "plain", True, 1, replay=True)


def test_spectral_norm_s_vectors_are_rolled_back_with_the_weights(tmp_path: Path) -> None:
    """A weight made infinite after a step turns spectral norm's power-iteration vectors (its
    buffers) NaN in the next forward; the guard restored the weights, every forward after was
    NaN still, and the run ended in GuardError blaming the data or the rate."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        spectral_norm(torch.nn.Linear(8, 16)), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    opt = selftune.wrap(torch.optim.SGD(net.parameters(), lr=0.05), "off", model=net)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 60):
        x = torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(net(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        if t == 30:
            with torch.no_grad():
                net[0].parametrizations.weight.original[0, 0] = math.inf
    assert all(b.isfinite().all() for b in net.buffers())
    assert all(p.isfinite().all() for p in net.parameters())


def test_a_buffer_that_grew_since_the_snapshot_is_left_as_it_is(tmp_path: Path) -> None:
    """A cache registered as a buffer that grows for a longer batch (as some rotary
    embeddings' do) no longer fits the snapshot's: the rollback refused it, part-way through the
    restore, and the run stopped, where without ``model=`` it had survived.  Such a buffer is
    left as it is, said once; the rest are put back."""

    class Cached(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.norm = torch.nn.BatchNorm1d(4)
            self.register_buffer("cache", torch.zeros(8), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > self.cache.numel():
                self.cache = torch.zeros(x.shape[0])
            return self.lin(self.norm(x))

    torch.manual_seed(0)
    net = Cached()
    opt = selftune.wrap(
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), "off", log_dir=tmp_path,
        model=net,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"buffers cache changed shape .* said once") as said:
        for t in range(1, 60):
            x = torch.randn(8 if t < 40 else 16, 4, generator=torch.Generator().manual_seed(t))
            if t in (45, 50):
                x[0, 0] = math.inf  # NaN in the running statistics, and the loss
            loss = torch.nn.functional.mse_loss(net(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
    assert len([w for w in said if "buffers cache" in str(w.message)]) == 1
    assert [r["step"] for r in guard_records(tmp_path)] == [45, 50]
    assert net.cache.numel() == 16 and opt.step_count == 59
    assert all(b.isfinite().all() for b in net.norm.buffers())  # the rest were put back


@pytest.mark.parametrize("change", ["dtype", "came"])
def test_a_buffer_of_another_dtype_or_one_that_came_since_is_left_as_it_is(
    tmp_path: Path, change: str
) -> None:
    """The other two of what no snapshot fits: a buffer converted to another dtype since the
    snapshot (copied back, it would take the snapshot's values, cast), and one registered
    since (the snapshot has none to put back).  Each is left as the run holds it, said once;
    BatchNorm's statistics are put back."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    net.register_buffer("cache", torch.zeros(3))
    opt = selftune.wrap(
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), "off", log_dir=tmp_path,
        model=net,
    )  # fmt: skip
    name = "cache" if change == "dtype" else "extra"
    told = rf"buffers {name} changed shape or dtype, or came"
    with pytest.warns(UserWarning, match=told) as said:
        for t in range(1, 45):
            if t == 30:  # after the snapshot of step 25
                if change == "dtype":
                    net.cache = torch.full((3,), 7.0, dtype=torch.float64)
                else:
                    net.register_buffer("extra", torch.full((3,), 7.0))
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(t))
            if t in (35, 40):
                x[0, 0] = math.inf  # NaN in the running statistics, and the loss
            loss = torch.nn.functional.mse_loss(net(x), x[:, :1])
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
    assert len([w for w in said if f"buffers {name}" in str(w.message)]) == 1
    assert [r["step"] for r in guard_records(tmp_path)] == [35, 40]
    kept = net.get_buffer(name)
    assert torch.equal(kept, torch.full((3,), 7.0, dtype=kept.dtype)), kept
    assert all(b.isfinite().all() for b in net[0].buffers())  # the rest were put back


def test_a_replay_of_a_run_resumed_with_its_model_says_so(tmp_path: Path) -> None:
    """A run begun without ``model=`` and resumed with it (a Lightning or Trainer run begun
    before the integrations passed the model): the manifest keeps the first settings, which the
    replay follows, and its rollbacks after the resume put back no buffers where the run's did;
    it diverged without a word.  It says so when it is built."""
    net, opt = _batch_norm_run(tmp_path / "run", False, 20)
    selftune.save_checkpoint(tmp_path / "ckpt.pt", model=net, optimizer=opt, step=20)
    opt.close()
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    again = selftune.wrap(
        torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9),
        "auto",
        log_dir=tmp_path / "run",
        model=fresh,
    )
    selftune.load_checkpoint(tmp_path / "ckpt.pt", model=fresh, optimizer=again)
    _batch_norm_run(tmp_path / "run", True, 20, start=21, net=fresh, opt=again)
    again.close()
    with pytest.warns(UserWarning, match=r"resumed with model= changed"):
        _batch_norm_run(tmp_path / "run", False, 1, replay=True)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_a_rollback_restores_the_optimizer_s_own_scalars_in_their_dtype(
    name: str, tmp_path: Path
) -> None:
    """Torch's load casts every floating state tensor to its parameter's dtype: a float64
    model's NAdam ``mu_product`` and ASGD's ``eta`` and ``mu``, kept in float32, came back from
    a rollback in float64, and the state restored was not the snapshot's (a resume keeps them)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    inner = getattr(torch.optim, name)(model.parameters(), lr=0.01)
    opt = selftune.wrap(inner, "off", log_dir=tmp_path)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    for step in range(62):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if step == 60 else 1.0)
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    assert [r["event"] for r in read_log(tmp_path).records if r["kind"] == "guard"] == ["rollback"]
    scalars = {
        key: value.dtype
        for state in opt.optimizer.state.values()
        for key, value in state.items()
        if key != "step" and isinstance(value, torch.Tensor) and value.dim() == 0
    }
    assert scalars and set(scalars.values()) == {torch.float32}, scalars


def _held_run(after: list[float], config: Any = None) -> list[Any]:
    """A guard fed 60 steps of a loss about 1.0 with a 2% wobble, snapshots kept as the
    wrapper keeps them, then a spike of 10x at step 61 and the losses ``after`` it; what it
    called each step from 61 on."""
    guard = selftune.guard.Guard(config or selftune.GuardConfig())
    calls = []
    for step, loss in enumerate([1.0 + 0.02 * (-1) ** t for t in range(60)] + [10.0, *after], 1):
        trouble = guard.check(_signals(step, loss))
        if trouble is None and guard.wants_snapshot(step):
            guard.keep(step, {"step": step})
        if step > 60:
            calls.append(trouble)
    return calls


def test_a_spike_is_held_and_the_next_step_judges_it() -> None:
    """A spike after the warm-up is held (``Trouble.hold``: the wrapper makes no update and
    restores nothing); after a healthy step the run goes on, and another spike, or a step
    more than half the deviations a spike needs above the level, is trouble named after the
    held one."""
    held, *rest = _held_run([1.0, 1.0])
    assert held is not None and held.hold and held.signal == "loss" and held.step == 61
    assert rest == [None, None]
    for after in (10.0, 1.2):  # a spike, or 1.2: some 6 sd above a level with 2% of noise
        held, confirmed, _ = _held_run([after, 1.0])
        assert held.hold and confirmed is not None and not confirmed.hold
        assert confirmed.signal == "loss" and "whose spike at step 61 was held" in confirmed.reason
    # off, the first spike is trouble at once, as before the hold
    (at_once, _) = _held_run([1.0], selftune.GuardConfig(confirm=False))
    assert at_once is not None and not at_once.hold


def test_spikes_that_keep_coming_are_not_held() -> None:
    """A second spike within ``interval`` steps of a held one is trouble at once: a batch's own
    spike is rare, and two tasks by turns, whose losses stand 100x apart, had every other
    step held (the second task never trained); ``interval`` steps later a spike is held
    again.  Nor is a jump of the warm-up held, a start past the rate's edge."""
    calls = _held_run([1.0, 1.0, 1.0, 10.0] + [1.0] * 30 + [10.0])
    called = [(c.step, c.hold) for c in calls if c is not None]
    assert called == [(61, True), (65, False), (96, True)]
    guard = selftune.guard.Guard()
    guard.keep(1, {"step": 1})
    for step, loss in enumerate([2.3, 2.2, 2.1, 30.0], 1):
        trouble = guard.check(_signals(step, loss))
    assert trouble is not None and trouble.step == 4 and not trouble.hold


def _ragged_epochs(seed: int, confirm: bool, epochs: int = 100) -> tuple[list[Any], float]:
    """A run of ``bench-results/ragged-batch/epochs.py``: the benchmark's digits MLP under
    plain AdamW through the guard alone, on a shuffled ``DataLoader`` whose epochs of 1,438
    examples in batches of 179 end on a batch of 6; the guard's events and the rate at the
    end."""
    from selftune.bench.data import digits

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    guard = selftune.GuardConfig(confirm=confirm)
    opt = selftune.wrap(torch.optim.AdamW(net.parameters(), lr=1e-3), "off", guard=guard)
    events: list[Any] = []
    opt.add_listener(lambda e: events.append((e.step, e.guard["event"])) if e.guard else None)
    data = digits()
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    order = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=179, shuffle=True, generator=order)
    for _ in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
    return events, opt.hyperparams()[0]["lr"]


def test_the_ragged_last_batch_of_an_epoch_is_held_not_rolled_back() -> None:
    """Late in a run the batch of six that ends an epoch spikes the gradient norm (its noise
    is some five times a full batch's): the guard that acts at once rolled the run back and
    halved its rate for good, where the hold loses that batch's update alone and the rate
    stays the run's own."""
    at_once, cut = _ragged_epochs(2, confirm=False)
    (step, event), *_ = at_once
    assert event == "rollback" and cut == pytest.approx(5e-4), at_once
    held, rate = _ragged_epochs(2, confirm=True)
    assert held == [(step, "hold")] and rate == 1e-3, held
    assert step % 9 == 0  # an epoch is eight batches of 179 and one of 6: the step of the 6


def _held_and_resumed(folder: Path, faults: set[int], stop: int | None = None) -> Any:
    """Plain SGD through the guard on the fault task, the loss passed 100x at the steps of
    ``faults``; stopped with a checkpoint after step ``stop``, or resumed from that checkpoint
    where one is in ``folder``'s parent.  The weights at step 80."""
    task = make_task()
    opt = wrapped(task, "sgd", "off", log_dir=folder)
    checkpoint, first = folder.parent / "held.pt", 1
    if stop is None and checkpoint.exists():
        saved = selftune.load_checkpoint(checkpoint, model=task.model, optimizer=opt)
        task.order.set_state(saved["extra"]["order"])
        first = saved["step"] + 1
    for t in range(first, 81):
        loss = task.batch_loss() * (100.0 if t in faults else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        if t == stop:
            extra = {"order": task.order.get_state()}
            selftune.save_checkpoint(
                checkpoint, model=task.model, optimizer=opt, step=t, extra=extra
            )
            break
    opt.close()
    return final_weights(task.model)


@pytest.mark.parametrize("confirmed", [False, True])
def test_a_checkpoint_saved_on_a_held_spike_resumes_as_the_run(
    confirmed: bool, tmp_path: Path
) -> None:
    """The held spike travels in the checkpoint: resumed from one saved right after the hold,
    the next step rolls back (the spike again) or goes on (a healthy batch) as the run that
    never stopped does, to the same weights and the same log."""
    faults = {60, 61} if confirmed else {60}
    whole = _held_and_resumed(tmp_path / "whole" / "run", faults)
    events = [(r["step"], r["event"]) for r in guard_records(tmp_path / "whole" / "run")]
    expected = [(60, "hold"), (61, "rollback")] if confirmed else [(60, "hold")]
    assert events == expected, events
    part = tmp_path / "part" / "run"
    _held_and_resumed(part, faults, stop=60)
    resumed = _held_and_resumed(part, faults)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))
    hashes = [[r["hash"] for r in read_log(d).records] for d in (tmp_path / "whole" / "run", part)]
    assert hashes[0] == hashes[1]
