"""Replay: a logged run re-applied gives bit-identical weights; a bad log is refused, by name."""

from __future__ import annotations

import json
import shutil
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from faults import (
    DECISIONS,
    LR,
    MANIFEST,
    edit_record,
    final_weights,
    guard_records,
    make_optimizer,
    make_task,
    train,
    write_garbage,
)

import selftune
from selftune.audit import GENESIS, AuditLog, LogError, canonical, read_log, record_hash
from selftune.replay import Decided, _FollowsTrace, _Passes

STEPS = 150
#: a non-finite loss (rolled back at once), a spike of one batch (held, and gone on from), and
#: a spike that the next step shows too (held, then rolled back)
FAULTS = {40: "nan_loss", 90: "loss_x100", 120: "loss_x100", 121: "loss_x100"}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def start(optimizer: str, params: Any) -> torch.optim.Optimizer:
    """The optimizer at a tenth of its usual rate: ``auto``'s range test has a climb to log."""
    return make_optimizer(optimizer, params, lr=LR[optimizer] / 10)


def logged_run(folder: Path, optimizer: str, controller: str) -> list[torch.Tensor]:
    task = make_task()
    opt = selftune.wrap(start(optimizer, task.model.parameters()), controller, log_dir=folder)
    train(task, opt, STEPS, faults=FAULTS, evaluate=False)
    opt.close()
    return final_weights(task.model)


def replayed_run(folder: Path, optimizer: str) -> list[torch.Tensor]:
    """The same script, data and faults, with the optimizer rebuilt from the log."""
    task = make_task()
    opt = selftune.replay(start(optimizer, task.model.parameters()), folder)
    train(task, opt, STEPS, faults=FAULTS, evaluate=False)
    return final_weights(task.model)


@pytest.mark.parametrize(
    ("optimizer", "controller"),
    [
        ("sgd", "auto"),
        ("adamw", "auto"),
        ("rmsprop", "auto"),  # its warm-up corrected at every step, as the manifest says
        ("sgd", "hypergradient"),
        ("adamw", "hypergradient"),
    ],
)
def test_replay_is_bit_identical_through_rollbacks(
    optimizer: str, controller: str, tmp_path: Path
) -> None:
    original = logged_run(tmp_path, optimizer, controller)
    records = guard_records(tmp_path)
    rollbacks = [r["step"] for r in records if r["event"] == "rollback"]
    holds = [r["step"] for r in records if r["event"] == "hold"]
    # every injected fault is caught at its step (a range test that overshoots may add one)
    assert {40, 121} <= set(rollbacks) and {90, 120} <= set(holds), records
    changes = [
        r
        for r in read_log(tmp_path).records
        if r["kind"] == "decision" and r["source"] == "controller"
    ]
    assert len(changes) >= 5, "the controller barely acted: replay would prove little"
    replayed = replayed_run(tmp_path, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(original, replayed, strict=True))
    # and the trajectory matters: the same run without selftune's changes ends elsewhere
    task = make_task()
    train(task, start(optimizer, task.model.parameters()), STEPS, evaluate=False)
    assert not all(
        torch.equal(a, b) for a, b in zip(original, final_weights(task.model), strict=True)
    )


def test_replay_is_bit_identical_through_a_range_test_restart(tmp_path: Path) -> None:
    """AdamW started 30x too high: auto's range test shrinks, then restarts from a snapshot."""
    task = make_task()
    opt = selftune.wrap(
        make_optimizer("adamw", task.model.parameters(), lr=0.3), "auto", log_dir=tmp_path
    )
    train(task, opt, STEPS, evaluate=False)
    opt.close()
    original = final_weights(task.model)
    restarts = [r for r in guard_records(tmp_path) if r["event"] == "restart"]
    assert len(restarts) == 1, guard_records(tmp_path)
    assert restarts[0]["restored_step"] < restarts[0]["step"]
    assert opt.hyperparams()[0]["lr"] < 0.3, "the restart kept the lower rate the test found"
    task = make_task()
    replayed = selftune.replay(make_optimizer("adamw", task.model.parameters(), lr=0.3), tmp_path)
    train(task, replayed, STEPS, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(original, final_weights(task.model), strict=True))


def test_replay_is_bit_identical_through_a_skipped_first_step(tmp_path: Path) -> None:
    """Trouble at step 1, before the guard holds any snapshot: the step is skipped and the rate
    cut (the run used to stop there with a GuardError), and the replay skips it too."""
    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), "auto", log_dir=tmp_path)
    train(task, opt, STEPS, faults={1: "nan_loss"}, evaluate=False)
    opt.close()
    original = final_weights(task.model)
    skip, *_ = guard_records(tmp_path)
    assert (skip["step"], skip["event"], skip["lr_factor"]) == (1, "skip", 0.5)
    task = make_task()
    replayed = selftune.replay(start("sgd", task.model.parameters()), tmp_path)
    train(task, replayed, STEPS, faults={1: "nan_loss"}, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(original, final_weights(task.model), strict=True))


def test_replay_holds_its_proposals_not_the_log(tmp_path: Path) -> None:
    """``replay`` reads the log in one pass and keeps of each decision the proposal it makes
    again, not the record: it had held every record of the log, some 2 KB a decision (a long
    run's log took more memory than a machine has). Counted by tracemalloc, which sees every
    allocation and no other process."""
    task = make_task()
    selftune.wrap(make_optimizer("sgd", task.model.parameters()), log_dir=tmp_path).close()
    signals = {"loss": 0.5, "loss_ema": 0.6, "grad_norm": 2.5, "cos_update": 0.25}
    with AuditLog(tmp_path) as log:
        for step in range(1, 6_001):
            cos = step % 100 / 100  # a controller's reasons repeat: its signals, rounded
            for knob, old in (("lr", LR["sgd"]), ("momentum", 0.9)):
                log.append(
                    dict(
                        kind="decision",
                        step=step,
                        group=0,
                        knob=knob,
                        old=old,
                        new=old,
                        value=old,
                        signals={**signals, "loss": 1 / step},
                        reason=f"raise (averaged cos {cos:+.3f})",
                        clipped=False,
                        source="controller",
                    )
                )
    size = (tmp_path / DECISIONS).stat().st_size
    optimizer = make_optimizer("sgd", task.model.parameters())
    tracemalloc.start()
    try:
        selftune.replay(optimizer, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 2, (peak, size)


def test_a_step_proposes_its_decisions_in_log_order_wherever_they_lie() -> None:
    """The decisions are kept in columns looked up by step: a log whose steps go back (written
    by hand) has each step's decisions, in log order, and a guard's decision is left out."""
    decided = Decided()
    for seq, (step, knob) in enumerate([(3, "lr"), (1, "lr"), (3, "momentum"), (2, "lr")]):
        decided.add(
            {"step": step, "group": 0, "knob": knob, "old": seq, "value": seq, "reason": f"r{seq}"}
        )
    decided.add({"step": 3, "group": 0, "knob": "lr", "old": 0, "value": 0, "source": "guard"})
    proposals, olds = decided.at(3)
    assert [(p.knob, p.value, p.reason, p.raw) for p in proposals] == [
        ("lr", 0.0, "replay: r0", True),
        ("momentum", 2.0, "replay: r2", True),
    ]
    assert olds == [0.0, 2.0]
    assert [p.reason for p in decided.at(1)[0]] == ["replay: r1"]
    assert decided.at(4) == ([], [])


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short logged AdamW run with controller decisions and one guard rollback."""
    folder = tmp_path_factory.mktemp("run")
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), log_dir=folder)
    train(task, opt, 60, faults={40: "nan_loss"}, evaluate=False)
    opt.close()
    assert len(read_log(folder).records) >= 3
    return folder


@pytest.fixture
def copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run folder that a test may damage."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def adamw(hidden: int = 16) -> torch.optim.Optimizer:
    return make_optimizer("adamw", make_task(hidden=hidden).model.parameters())


def refused(folder: Path, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """The messages of ``replay`` and ``verify`` on ``folder``; both must raise SelfTuneError."""
    messages = []
    with pytest.raises(selftune.SelfTuneError) as info:
        selftune.replay(optimizer if optimizer is not None else adamw(), folder)
    messages.append(str(info.value))
    with pytest.raises(LogError) as info:
        selftune.verify(folder)
    messages.append(str(info.value))
    return messages


def test_an_intact_log_is_accepted(run_dir: Path) -> None:
    assert selftune.verify(run_dir).guard_events == 1
    assert isinstance(selftune.replay(adamw(), run_dir), selftune.SelfTuned)


def test_refuses_an_edited_record(copy: Path) -> None:
    edit_record(copy, 2, reason="edited afterwards")
    for message in refused(copy):
        assert "line 2" in message and "hash does not match" in message


def test_refuses_a_record_rewritten_with_a_fresh_hash(copy: Path) -> None:
    lines = (copy / DECISIONS).read_bytes().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["value"] = 2.0
    record["hash"] = record_hash(record)
    lines[0] = canonical(record) + b"\n"
    (copy / DECISIONS).write_bytes(b"".join(lines))
    for message in refused(copy):
        assert "line 2" in message and "prev does not match" in message


def test_refuses_a_missing_folder(tmp_path: Path) -> None:
    for message in refused(tmp_path / "nowhere"):
        assert "no run folder" in message and "nowhere" in message


def test_refuses_a_folder_without_a_decision_log(copy: Path) -> None:
    (copy / DECISIONS).unlink()
    for message in refused(copy):
        assert f"no {DECISIONS}" in message


def test_refuses_garbage_in_the_decision_log(copy: Path) -> None:
    write_garbage(copy / DECISIONS)
    for message in refused(copy):
        assert DECISIONS in message and "line 1" in message


@pytest.mark.parametrize("name", [DECISIONS, MANIFEST])
@pytest.mark.parametrize("damage", [b"[" * 200_000, b'{"step": ' + b"9" * 5000 + b"}"])
def test_refuses_pathological_json_as_damage(copy: Path, name: str, damage: bytes) -> None:
    """A number of thousands of digits in the manifest escaped as a plain ValueError, which
    `selftune verify` did not catch; the same damage in the decision log, and deep nesting in
    either file, is refused by name as well."""
    (copy / name).write_bytes(damage + b"\n")
    for message in refused(copy):
        assert name in message and "damaged" in message


def test_refuses_a_blank_decision_log_line(copy: Path) -> None:
    (copy / DECISIONS).write_bytes(b"\n")
    for message in refused(copy):
        assert "line 1" in message and "not valid JSON" in message


def test_refuses_garbage_and_empty_manifests(copy: Path) -> None:
    write_garbage(copy / MANIFEST)
    for message in refused(copy):
        assert MANIFEST in message
    (copy / MANIFEST).write_bytes(b"")
    for message in refused(copy):
        assert MANIFEST in message and "not valid JSON" in message


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("param_groups", 5, "param_groups"),
        ("config", "adamw", "'config' is a str, not an object"),  # report failed on it
        ("format", "selftune-audit/99", "this selftune reads 'selftune-audit/1'"),
        ("format", None, "format is None"),
    ],
)
def test_refuses_a_manifest_with_wrong_types(copy: Path, key: str, value: Any, named: str) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, key: value}))
    for message in refused(copy):
        assert named in message


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("guard", {"interval": 25, "unknown": 1}, "unknown"),
        ("average", 2.0, "average=2.0"),
        # an IndexError and OverflowErrors (JSON reads a whole number of any size exactly)
        ("policy.bounds.lr", [], "list index out of range"),
        ("guard.z", 10**400, "int too large to convert to float"),
        ("average", 10**400, "int too large to convert to float"),
    ],
    ids=["unknown guard setting", "average", "bound", "huge guard setting", "huge average"],
)
def test_refuses_unreadable_guard_or_average_settings(
    copy: Path, key: str, value: Any, named: str
) -> None:
    manifest = json.loads((copy / MANIFEST).read_text())
    *path, last = ["config", *key.split(".")]
    node = manifest
    for name in path:
        node = node[name]
    node[last] = value
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LogError, match=f"settings in 'config' cannot be read back.*{named}"):
        selftune.replay(adamw(), copy)


@pytest.mark.parametrize("options", [[1], [None]])
def test_refuses_group_settings_that_are_not_objects(copy: Path, options: list[Any]) -> None:
    """An edited manifest's 'options' (each group's weight decay, eps, ...) that is a list of
    something else ended the replay in an AttributeError from its comparison."""
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["config"]["options"] = options
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LogError, match=r"'config\.options' is .*, not a list of objects"):
        selftune.replay(adamw(), copy)


def test_refuses_a_chained_record_with_missing_fields(tmp_path: Path) -> None:
    """A record chained correctly but lacking the value replay needs (hand-written logs)."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), log_dir=tmp_path)
    opt.close()
    record = {"kind": "decision", "step": 3, "group": 0, "knob": "lr", "seq": 0, "prev": GENESIS}
    record["hash"] = record_hash(record)
    (tmp_path / DECISIONS).write_bytes(canonical(record) + b"\n")
    for message in refused(tmp_path):
        assert "lacks" in message and "value" in message


#: a whole number past a float's range, which JSON reads exactly and float() refuses
HUGE = 10**400


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"step": 2**63}, f"step is {2**63}, not a whole number from 0 to {2**63 - 1}"),
        ({"value": HUGE}, "value is 1000.*, not a number a float holds"),
        ({"kind": "guard", "event": "rollback", "signal": "loss", "value": HUGE}, "value is 1000"),
    ],
    ids=["step", "decision value", "guard value"],
)
def test_refuses_a_chained_number_past_what_a_reader_holds(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    """A chained record (edited and rehashed, or written by another tool) whose step is past a
    signed 64-bit column's, or whose number is past a float's range: the replay ended in an
    OverflowError from its columns or from float(), not a LogError naming the record."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), log_dir=tmp_path)
    opt.close()
    record = {
        "kind": "decision",
        "step": 3,
        "group": 0,
        "knob": "lr",
        "old": 0.01,
        "new": 0.02,
        "value": 2.0,
        "signals": {},
        "reason": "grow",
        "clipped": False,
        **change,
        "seq": 0,
        "prev": GENESIS,
    }
    record["hash"] = record_hash(record)
    (tmp_path / DECISIONS).write_bytes(canonical(record) + b"\n")
    with pytest.raises(LogError, match=words):
        selftune.replay(make_optimizer("adamw", task.model.parameters()), tmp_path)


def test_refuses_a_log_of_a_different_model(run_dir: Path) -> None:
    with pytest.raises(selftune.SelfTuneError, match="param group 0 does not match") as info:
        selftune.replay(adamw(hidden=20), run_dir)
    assert "parameters" in str(info.value)
    # an SGD optimizer has other knobs (momentum, not betas)
    with pytest.raises(selftune.SelfTuneError, match="param group 0 does not match"):
        selftune.replay(make_optimizer("sgd", make_task().model.parameters()), run_dir)
    model = make_task().model
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    with pytest.raises(selftune.SelfTuneError, match="1 param groups, this optimizer has 2"):
        selftune.replay(torch.optim.AdamW(groups, lr=0.01), run_dir)
    # the same model and optimizer, at another starting rate: its decisions would replay
    # onto other rates
    other = make_optimizer("adamw", make_task().model.parameters(), lr=0.5)
    with pytest.raises(selftune.SelfTuneError, match=r"started with .*'lr': 0.5"):
        selftune.replay(other, run_dir)


def test_refuses_another_optimizer_class(run_dir: Path) -> None:
    """Adam has AdamW's knobs and parameter count: only the manifest's class tells them apart."""
    other = torch.optim.Adam(make_task().model.parameters(), lr=LR["adamw"])
    with pytest.raises(selftune.SelfTuneError, match="stepped a AdamW, this optimizer is a Adam"):
        selftune.replay(other, run_dir)


def test_refuses_a_model_or_a_wrapped_optimizer_by_name(run_dir: Path) -> None:
    """A model came back as an AttributeError on ``param_groups``, and a selftune optimizer as
    "the logged run stepped a AdamW, this optimizer is a SelfTuned"."""
    model = make_task().model
    with pytest.raises(
        selftune.ConfigError, match=r"needs a torch\.optim\.Optimizer, got Sequential"
    ):
        selftune.replay(model, run_dir)  # type: ignore[arg-type]
    wrapped = selftune.wrap(make_optimizer("adamw", model.parameters()), guard=False)
    with pytest.raises(selftune.ConfigError, match="pass the plain one it wraps"):
        selftune.replay(wrapped, run_dir)


def test_refuses_an_optimizer_built_with_other_settings(run_dir: Path) -> None:
    """A replay through an AdamW of another weight decay ran to the end on other weights with
    no word: the manifest held only the starting knobs.  Refused, the optimizer is not left
    marked wrapped: built right, it replays."""
    params = list(make_task().model.parameters())
    other = torch.optim.AdamW(params, lr=LR["adamw"], weight_decay=0.5)
    with pytest.raises(selftune.SelfTuneError, match=r"group 0 .*weight_decay 0.01 -> 0.5"):
        selftune.replay(other, run_dir)
    with pytest.raises(selftune.SelfTuneError, match=r"group 0 .*eps 1e-08 -> 1e-06"):
        selftune.replay(torch.optim.AdamW(params, lr=LR["adamw"], eps=1e-6), run_dir)
    with pytest.raises(selftune.SelfTuneError, match=r"started with"):
        selftune.replay(torch.optim.AdamW(params, lr=1.0), run_dir)
    other.param_groups[0]["weight_decay"] = 0.01
    selftune.replay(other, run_dir)


def test_a_setting_the_logging_torch_lacked_is_no_difference(copy: Path) -> None:
    """A log written under a torch whose AdamW had no ``decoupled_weight_decay`` was refused
    by a torch that has it ("None -> True")."""
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["config"]["options"][0]["decoupled_weight_decay"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    selftune.replay(adamw(), copy)


def test_keys_no_setting_of_the_optimizer_s_own_need_not_match(tmp_path: Path) -> None:
    """A scheduler built before the wrap adds ``initial_lr`` to the groups, and an optimizer
    built from ``named_parameters()`` holds the names: a replay that builds either otherwise
    ends on the same weights, and was refused."""
    task = make_task()
    inner = torch.optim.SGD(task.model.named_parameters(), lr=0.05, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(inner, step_size=1000)  # adds initial_lr before the wrap
    opt = selftune.wrap(inner, log_dir=tmp_path)
    train(task, opt, 30, evaluate=False)
    opt.close()
    task = make_task()
    plain = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
    train(task, selftune.replay(plain, tmp_path), 30, evaluate=False)


def test_a_replay_on_other_data_says_once_where_its_loss_first_differs(tmp_path: Path) -> None:
    """The knobs replay as logged whatever the data, so a replay on data scaled by 1.5 ran to
    its end on other weights with no word; it is told, once, at the first step whose loss is
    not the logged one, and a replay of the run's own data hears nothing."""

    def replay(scale: float) -> list[str]:
        task = make_task()
        task.x.mul_(scale)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            train(task, selftune.replay(start("sgd", task.model.parameters()), tmp_path), 30)
        return [str(w.message) for w in said if "the loss is" in str(w.message)]

    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), log_dir=tmp_path)
    train(task, opt, 30)
    opt.close()
    assert replay(1.0) == []
    (told,) = replay(1.5)
    assert told.startswith("replay: at step 1 the loss is ") and "the data" in told


@pytest.mark.parametrize("change", ["scheduler", "scheduler-off", "nan"])
def test_a_replay_that_leaves_the_logged_run_is_stopped_where_it_does(
    tmp_path: Path, change: str
) -> None:
    """A replay without the run's scheduler, or one whose loss goes NaN where the run's did
    not, ended on other weights (the latter non-finite ones) with no word; it is stopped at
    the first step where it and the run folder disagree, naming what differs: the knob a
    decision of that step found in force, or, at a step with none (the ``off`` controller
    decides nothing), the knobs after it, which the trace holds."""
    controller = "off" if change == "scheduler-off" else "auto"
    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), controller, log_dir=tmp_path)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    train(task, opt, 60, evaluate=False, on_step=lambda t: sched.step())
    opt.close()
    task = make_task()
    replayed = selftune.replay(start("sgd", task.model.parameters()), tmp_path)
    if change.startswith("scheduler"):
        words = {
            "scheduler": r"at step 11 group 0's lr stood at 0\.0179\d*, not at 0\.0089",
            "scheduler-off": r"at step 11 the knobs after it are \[\{\"lr\": 0\.005, .*were "
            r"\[\{\"lr\": 0\.0025,",
        }[change]
        with pytest.raises(selftune.SelfTuneError, match=words):
            train(task, replayed, 60, evaluate=False)
    else:
        sched = torch.optim.lr_scheduler.StepLR(replayed, step_size=10, gamma=0.5)
        with pytest.raises(selftune.SelfTuneError, match="at step 30 its loss is nan"):
            train(
                task,
                replayed,
                60,
                faults={30: "nan_loss"},
                evaluate=False,
                on_step=lambda t: sched.step(),
            )


@pytest.mark.parametrize("controller", ["off", "auto"])
def test_a_replay_whose_knobs_leave_the_trace_after_the_last_decision_is_stopped(
    tmp_path: Path, controller: str
) -> None:
    """Another scheduler whose rates part from the run's only after its last decision (and
    under ``off``, which logs none) moved the replay's weights with no word: only the
    decisions' knobs were checked.  The knobs after every step, as the trace holds them, are
    now: the replay stops at the first step whose knobs differ."""
    steps, cut = 60, 50

    def run(opt: selftune.SelfTuned, task: Any, step_size: int) -> None:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.5)
        train(task, opt, steps, evaluate=False, on_step=lambda t: sched.step())

    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), controller, log_dir=tmp_path)
    run(opt, task, cut)
    opt.close()
    decided = [r["step"] for r in read_log(tmp_path).records if r["kind"] == "decision"]
    assert max(decided, default=0) < cut  # the knobs part after the last decision
    task = make_task()
    replayed = selftune.replay(start("sgd", task.model.parameters()), tmp_path)
    with pytest.raises(selftune.SelfTuneError, match=f"at step {cut + 1} the knobs after it"):
        run(replayed, task, cut + 5)


def finder_script(
    wrap: Callable[[torch.optim.Optimizer], selftune.SelfTuned], tried: int = 4, after: int = 35
) -> list[torch.Tensor]:
    """A learning-rate finder's loop: 20 steps, the state kept, ``tried`` steps at rates set by
    hand, then (``after`` > 0) the state loaded back into the same optimizer and ``after`` steps
    more; the optimizer closed at its end.  Returns the final weights."""
    task = make_task()
    opt = wrap(make_optimizer("sgd", task.model.parameters()))
    train(task, opt, 20, evaluate=False)
    kept, weights = deepcopy(opt.state_dict()), deepcopy(task.model.state_dict())
    for rate in (0.02, 0.03, 0.04, 0.05)[:tried]:
        opt.param_groups[0]["lr"] = rate
        train(task, opt, 1, evaluate=False)
    if after:
        task.model.load_state_dict(weights)
        opt.load_state_dict(kept)
        train(task, opt, after, evaluate=False)
    opt.close()
    return final_weights(task.model)


def test_a_script_that_rewinds_in_its_own_process_replays_to_its_weights(tmp_path: Path) -> None:
    """:func:`finder_script`: the trace's rows 21-24 are the steps that replaced the thrown-away
    ones, and the replay, which runs both, was stopped at step 21 as if it had left the run.
    The rewind is logged, and rows there go unchecked."""
    weights = finder_script(lambda plain: selftune.wrap(plain, "off", log_dir=tmp_path))
    notes = [r for r in read_log(tmp_path).records if r["kind"] == "note"]
    assert [(r["step"], r["rewound_from"]) for r in notes] == [(20, 24)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed past the rewind: nothing to tell
        again = finder_script(lambda plain: selftune.replay(plain, tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))


@pytest.mark.parametrize(("tried", "told"), [(2, True), (4, True), (0, False)])
def test_a_replay_closed_inside_steps_the_run_threw_away_says_so(
    tmp_path: Path, tried: int, told: bool
) -> None:
    """A replay of :func:`finder_script` whose own script stops in the steps the run threw
    away (steps 21-24), before its rewind: the log holds nothing of them (``auto`` decided
    there, and the load cut it), so the weights it ends on are none the run had, and it was
    closed on them without a word.  Closed at step 20, before them, it ends on the run's."""
    finder_script(lambda plain: selftune.wrap(plain, "auto", log_dir=tmp_path))
    replay = lambda plain: selftune.replay(plain, tmp_path)  # noqa: E731
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        finder_script(replay, tried=tried, after=0)
    inside = [w for w in said if "threw away" in str(w.message)]
    if not told:
        assert inside == []
        return
    assert [str(w.message) for w in inside] == [
        f"replay: closed at step {20 + tried}, inside steps 21-24 that the logged run threw "
        "away (it went back from step 24 to step 20): the log holds nothing of them, so these "
        "weights may not be any the run had; run the replay on past that rewind, as the run did"
    ]
    assert inside[0].filename == __file__  # the script's close(), not a line of selftune


#: scripts that rewind: a retry after an error, a retry of a retry that went back further than
#: the first, two retries from one kept state, and a retry after the guard gave up (``nan@3+``:
#: a NaN loss from the third step on, until the GuardError the script catches)
RETRIES = {
    "once": ["train 20", "keep a", "train 10 nan@5", "load a", "train 30"],
    "further back": [
        "train 10",
        "keep a",
        "train 10",
        "keep b",
        "train 10 nan@5",
        "load b",
        "train 20",
        "load a",
        "train 30",
    ],
    "twice from one state": [
        "train 20",
        "keep a",
        "train 10 nan@5",
        "load a",
        "train 5 nan@3",
        "load a",
        "train 30",
    ],
    "after the guard gave up": ["train 20", "keep a", "train 30 nan@3+", "load a", "train 30"],
    "after the guard gave up in the second try": [
        "train 20",
        "keep a",
        "train 10 nan@5",
        "load a",
        "train 10 nan@1+",
        "load a",
        "train 30",
    ],
    "after the guard gave up, then further back": [
        "train 10",
        "keep a",
        "train 10",
        "keep b",
        "train 10 nan@3+",
        "load b",
        "train 20",
        "load a",
        "train 30",
    ],
    "loaded at the top of every try": [
        "train 20",
        "keep a",
        "load a",
        "train 10 nan@5",
        "load a",
        "train 30",
    ],
    "from the state saved after the guard gave up": [
        "train 20",
        "train 10 nan@3+",
        "keep c",
        "load c",
        "train 20",
    ],
}


def retry_script(
    plan: list[str],
    wrap: Callable[[torch.optim.Optimizer], selftune.SelfTuned],
    seen: list[tuple[int, str]],
) -> list[torch.Tensor]:
    """Run ``plan`` (``RETRIES``); ``seen`` gets each step's decisions and ``(-1, "a
    rewind")`` at each load; returns the final weights."""
    task = make_task()
    opt = wrap(start("sgd", task.model.parameters()))
    opt.add_listener(lambda e: seen.extend((e.step, d.reason) for d in e.decisions))
    kept: dict[str, Any] = {}
    for op in plan:
        verb, arg, *fault = op.split()
        if verb == "train":
            at = [int(f.split("@")[1].rstrip("+")) for f in fault]
            if fault and fault[0].endswith("+"):
                with pytest.raises(selftune.GuardError):
                    train(task, opt, int(arg), fault_from=(at[0], "nan_loss"), evaluate=False)
            else:
                train(task, opt, int(arg), faults=dict.fromkeys(at, "nan_loss"), evaluate=False)
        elif verb == "keep":
            kept[arg] = deepcopy((opt.state_dict(), task.model.state_dict()))
        else:
            task.model.load_state_dict(kept[arg][1])
            opt.load_state_dict(kept[arg][0])
            seen.append((-1, "a rewind"))
    return final_weights(task.model)


@pytest.mark.parametrize("retry", sorted(RETRIES))
def test_a_rewind_over_steps_that_decided_replays_to_its_weights(
    tmp_path: Path, retry: str
) -> None:
    """Steps of ``auto`` whose rate climbs and whose NaN loss is rolled back, thrown away by
    loading a state kept before them into the same optimizer.  The load cut their records,
    and the replay, running them again, met the records of the steps that replaced them
    (stopped at the first: the NaN where the log held none, or a decision's knob standing
    elsewhere).  It now decides nothing where the log says the run's steps were thrown away,
    and is checked again once it has rewound too.  A rewind that a later one, further back,
    cut from the log (the second plan's to ``b``) leaves a gap in the notes' numbers, and two
    from one state (the third) are told apart by them (the first was matched with the second's
    note).  The third also went wrong in the run itself: torch's load keeps the dict's tensors
    as the optimizer's state, so the second load of ``a`` held where the steps thrown away had
    left its momentum, which the replay could not follow.  Where the guard gave up, the note
    holds its escalate record, cut with the rest, and the replay raises that GuardError, in the
    pass where the run's guard gave up alone (it raised it in the first try, where the run's
    only rolled back), also where a later rewind cut that note (its record had gone with it),
    and where the state saved after the GuardError is loaded (the state's log ended after the
    escalate record, which stood, and the replay raised it a second time).  A state loaded at
    the step the run stands at, then stepped past and loaded again (a retry loop that loads its
    kept state at the top of every try), was not copied the first time, and the second load
    held the momentum the thrown-away steps had left in it."""
    thrown: list[tuple[int, str]] = []
    weights = retry_script(
        RETRIES[retry], lambda p: selftune.wrap(p, "auto", log_dir=tmp_path), thrown
    )
    # steps 21-29 were thrown away by the first load past them in every plan
    first = next(i for i, (t, _) in enumerate(thrown) if t == -1 and thrown[i - 1][0] > 20)
    decided = [why for t, why in thrown[:first] if t > 20]
    # the controller's (in the other plans a NaN, or the snapshots a load started again, come
    # before the range test's next decision),
    if retry in (
        "once",
        "further back",
        "twice from one state",
        "after the guard gave up in the second try",
    ):
        assert any("guard" not in why for why in decided), decided
    assert any("guard" in why for why in decided), decided  # and the rollbacks' restores
    notes = [r for r in read_log(tmp_path).records if "rewound_from" in r]
    # each rewind note: (step, rewound_from, its number, [(rewind, step) where it gave up])
    expected = {
        "once": [(20, 30, 1, [])],
        "further back": [(10, 40, 2, [])],
        "twice from one state": [(20, 30, 2, [])],
        "after the guard gave up": [(20, 29, 1, [(1, 29)])],
        "after the guard gave up in the second try": [(20, 30, 2, [(2, 27)])],
        "after the guard gave up, then further back": [(10, 40, 2, [(1, 29)])],
        "from the state saved after the guard gave up": [(28, 29, 1, [(1, 29)])],
        "loaded at the top of every try": [(20, 30, 1, [])],
    }[retry]
    gave_up = [[(e["rewind"], e["step"]) for e in r.get("gave_up", [])] for r in notes]
    found = [
        (r["step"], r["rewound_from"], r["rewind"], g) for r, g in zip(notes, gave_up, strict=True)
    ]
    assert found == expected
    assert not [r for r in read_log(tmp_path).records if r.get("event") == "escalate"]
    again = retry_script(RETRIES[retry], lambda p: selftune.replay(p, tmp_path), [])
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))


def test_a_replay_that_does_not_rewind_where_the_run_did_is_stopped(tmp_path: Path) -> None:
    """A replay whose script does not go back where the run's did (an error that does not
    come again, so no retry) ran on through the steps the log says were thrown away, deciding
    nothing there, and ended on other weights without a word.  It is stopped at the first step
    past where the run went back; one that goes back elsewhere, where it goes back."""
    retry_script(RETRIES["once"], lambda p: selftune.wrap(p, "auto", log_dir=tmp_path), [])
    with pytest.raises(selftune.SelfTuneError, match="at step 31 the logged run had gone back"):
        retry_script(["train 60"], lambda p: selftune.replay(p, tmp_path), [])
    elsewhere = ["train 20", "keep a", "train 5", "load a", "train 30"]
    with pytest.raises(selftune.SelfTuneError, match=r"replay went back to step 20 \(its rewind 1"):
        retry_script(elsewhere, lambda p: selftune.replay(p, tmp_path), [])


def test_a_state_saved_in_steps_a_rewind_threw_away_is_refused(tmp_path: Path) -> None:
    """A state kept at step 30, then a rewind to step 20, then that state loaded: its steps
    21-30 were thrown away, and the log and trace hold the steps that replaced them (the
    trace's rows of another rate, under ``off``, whose log has no record to tell the two by):
    the replay stopped on a difference the run had made.  It is refused, naming the rewind,
    and leaves the run as it stood."""
    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    train(task, opt, 20, evaluate=False)
    a = deepcopy(opt.state_dict())
    train(task, opt, 10, evaluate=False)
    b = deepcopy(opt.state_dict())
    opt.load_state_dict(a)
    train(task, opt, 15, evaluate=False)
    knobs, momentum = opt.hyperparams(), deepcopy(opt.optimizer.state_dict()["state"])
    with pytest.raises(selftune.ConfigError, match="saved at step 30, before a load since took"):
        opt.load_state_dict(b)
    assert opt.step_count == 35 and opt.hyperparams() == knobs
    state = opt.optimizer.state_dict()["state"]
    assert all(
        torch.equal(state[i]["momentum_buffer"], momentum[i]["momentum_buffer"]) for i in state
    )
    opt.load_state_dict(a)  # a state of the steps the run kept still loads


def test_a_script_resumed_from_the_run_s_checkpoint_replays_from_it(tmp_path: Path) -> None:
    """A script that resumes from a checkpoint of the run, saved under the run's controller,
    replays: the load was refused as another controller's state (``auto``'s, where the replay
    runs ``replay``), so the same script could not run under the replay.  From the checkpoint
    on, the replay ends on the run's weights to the bit, through its later rollback too."""
    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), "auto", log_dir=tmp_path / "run")
    train(task, opt, 45, faults=FAULTS, evaluate=False)
    order = task.order.get_state()
    selftune.save_checkpoint(
        tmp_path / "c.pt", model=task.model, optimizer=opt, step=45, extra={"order": order}
    )
    later = {t - 45: kind for t, kind in FAULTS.items() if t > 45}
    train(task, opt, STEPS - 45, faults=later, evaluate=False)
    opt.close()
    assert [r["step"] for r in guard_records(tmp_path / "run")][-1] > 45  # a rollback after
    logged = final_weights(task.model)
    task = make_task()
    replayed = selftune.replay(start("sgd", task.model.parameters()), tmp_path / "run")
    saved = selftune.load_checkpoint(tmp_path / "c.pt", model=task.model, optimizer=replayed)
    task.order.set_state(saved["extra"]["order"])
    train(task, replayed, STEPS - 45, faults=later, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(logged, final_weights(task.model), strict=True))


def test_a_checkpoint_of_steps_a_rewind_threw_away_is_refused_in_a_new_process(
    tmp_path: Path,
) -> None:
    """The same, with the checkpoint loaded by a fresh optimizer over the folder (a new
    process), which made no rewind of its own: the log's note of the run's tells it, where
    the checkpoint was taken in a stretch without records (under ``off``) and its place in
    the log still matched."""
    task = make_task()
    opt = selftune.wrap(start("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    train(task, opt, 10, evaluate=False)
    a = deepcopy(opt.state_dict())
    train(task, opt, 10, evaluate=False)
    selftune.save_checkpoint(tmp_path / "c20.pt", model=task.model, optimizer=opt, step=20)
    train(task, opt, 5, evaluate=False)
    opt.load_state_dict(a)
    train(task, opt, 20, evaluate=False)
    opt.close()
    log = (tmp_path / "decisions.jsonl").read_bytes()
    task = make_task()
    fresh = selftune.wrap(start("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    with pytest.raises(selftune.CheckpointError, match="saved at step 20, before a load since"):
        selftune.load_checkpoint(tmp_path / "c20.pt", model=task.model, optimizer=fresh)
    assert fresh.step_count == 0 and (tmp_path / "decisions.jsonl").read_bytes() == log


def test_rewind_notes_written_before_they_were_numbered_are_matched_in_order() -> None:
    """A log of the stop before the notes were numbered: of two rewinds, the second, further
    back, cut the first's note.  Numbered by position, the note left was taken for the
    replay's first rewind and the replay refused; it is matched by step and reach, in order."""
    note = {"kind": "note", "step": 10, "rewound_from": 40, "reason": "rewound"}
    passes, made = _Passes([note]), []
    passes.made = lambda: made
    assert passes.thrown_away(25) and not passes.thrown_away(10)
    made.append((1, 20, 30))  # the rewind whose note the second cut
    assert passes.thrown_away(25)
    made.append((2, 10, 40))
    assert not passes.thrown_away(11)


def test_the_trace_check_follows_a_replay_that_rewinds(tmp_path: Path) -> None:
    """The rows of steps a logged rewind threw away go unchecked until the replay rewinds as
    the run did; from there they are the replay's own, and checked (they went unchecked on
    both passes).  A replay that steps past the trace's end and rewinds is checked again (the
    check had stopped for good at the end)."""
    rows = [{"step": t, "loss": None, "hp": [{"lr": t / 10}]} for t in range(1, 6)]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rewind = {"kind": "note", "step": 2, "rewound_from": 4, "rewind": 1, "reason": "rewound"}

    def event(step: int, lr: float) -> Any:
        return SimpleNamespace(step=step, hyperparams=[{"lr": lr}], loss=None)

    passes, made = _Passes([rewind]), []
    passes.made = lambda: made
    follows = _FollowsTrace(tmp_path, {}, passes)
    for t, lr in [(1, 0.1), (2, 0.2), (3, 9.0), (4, 9.0)]:  # 3-4 thrown away
        follows(event(t, lr))
    made.append((1, 2, 4))  # the replay's load, as the run's
    follows(event(3, 0.3))
    with pytest.raises(selftune.SelfTuneError, match="at step 4 the knobs after it"):
        follows(event(4, 9.0))
    follows = _FollowsTrace(tmp_path, {}, _Passes([]))
    for t in range(1, 8):
        follows(event(t, t / 10))
    with pytest.raises(selftune.SelfTuneError, match="at step 3 the knobs after it"):
        follows(event(3, 9.0))


@pytest.mark.parametrize(
    "damage",
    # a number of thousands of digits and deep nesting: json.loads raised ValueError and
    # RecursionError, not JSONDecodeError, out of the replay's step
    [b"garbage", b'{"step": ' + b"9" * 5000 + b"}", b"[" * 100_000],
    ids=["garbage", "thousands of digits", "deep nesting"],
)
def test_a_damaged_trace_leaves_the_replay_to_the_log(tmp_path: Path, damage: bytes) -> None:
    """The trace has no hash chain: a damaged one is told of where the replay reaches the
    damage, and the replay, checked against the decision log alone from there, still ends on
    the run's weights."""
    weights = logged_run(tmp_path, "sgd", "auto")
    trace = tmp_path / "trace.jsonl"
    rows = trace.read_bytes().split(b"\n")
    rows[STEPS // 2] = damage
    trace.write_bytes(b"\n".join(rows))
    with pytest.warns(UserWarning, match="checks the logged decisions alone.*not a JSON line"):
        again = replayed_run(tmp_path, "sgd")
    assert all(torch.equal(a, b) for a, b in zip(weights, again, strict=True))


def test_an_empty_decision_log_is_a_run_without_changes(tmp_path: Path) -> None:
    """Documented: a run in which nothing changed has an empty decisions.jsonl.  Replaying it
    (controller ``off``, no trouble) re-applies nothing and still matches the run exactly."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    train(task, opt, 50, evaluate=False)
    opt.close()
    assert (tmp_path / DECISIONS).read_bytes() == b""
    assert selftune.verify(tmp_path).records == 0
    again = make_task()
    replayed = selftune.replay(make_optimizer("sgd", again.model.parameters()), tmp_path)
    train(again, replayed, 50, evaluate=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(final_weights(task.model), final_weights(again.model), strict=True)
    )


def test_replay_stops_where_the_guard_gave_up(tmp_path: Path) -> None:
    """A run that ended in a guard "escalate" (GuardError) replays to the same end: the same
    error at the same step, with the weights as the original left them, not trained on past it."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "off", log_dir=tmp_path)
    with pytest.raises(selftune.GuardError) as info:
        train(task, opt, 200, fault_from=(40, "nan_loss"), evaluate=False)
    opt.close()
    original, message, steps = final_weights(task.model), str(info.value), opt.step_count
    last = guard_records(tmp_path)[-1]
    assert last["event"] == "escalate" and last["reason"] == message, last
    task = make_task()
    replayed = selftune.replay(make_optimizer("sgd", task.model.parameters()), tmp_path)
    with pytest.raises(selftune.GuardError) as again:
        train(task, replayed, 200, fault_from=(40, "nan_loss"), evaluate=False)
    assert f"step {last['step']}" in str(again.value) and message in str(again.value)
    assert replayed.step_count == steps
    assert all(torch.equal(a, b) for a, b in zip(original, final_weights(task.model), strict=True))


def test_an_unwrapped_run_goes_on_at_the_rate_it_found_and_replays_to_the_same_weights(
    tmp_path: Path,
) -> None:
    """``unwrap`` writes the rate selftune found into the wrapped optimizer (selftune keeps it as
    a scale apart, which a plain optimizer or a state dict loaded into one would not carry), and
    notes it in the log: the replay of the whole script, the plain steps after the hand-over
    included, ends on the same weights."""
    task = make_task()
    inner = start("adamw", task.model.parameters())
    opt = selftune.wrap(inner, "auto", log_dir=tmp_path)
    train(task, opt, 60, evaluate=False)
    found = opt.hyperparams()
    assert found[0]["lr"] > 2 * inner.param_groups[0]["lr"]  # the range test climbed
    back = opt.unwrap()
    assert back is inner and back.param_groups[0]["lr"] == found[0]["lr"]
    assert opt.hyperparams() == found and opt.unwrap() is back
    with pytest.raises(selftune.ConfigError, match="unwrapped after step 60"):
        opt.step()
    train(task, back, 40, evaluate=False)  # plain AdamW steps at the rate found
    original = final_weights(task.model)
    last = read_log(tmp_path).records[-1]
    assert last["kind"] == "note" and last["step"] == 60 and "unwrapped" in last["reason"]

    again = make_task()
    replayed = selftune.replay(start("adamw", again.model.parameters()), tmp_path)
    train(again, replayed, 100, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(original, final_weights(again.model), strict=True))
    plain = torch.optim.AdamW(task.model.parameters())
    plain.load_state_dict(back.state_dict())  # a state dict of it carries the rate found
    assert plain.param_groups[0]["lr"] == found[0]["lr"]
    selftune.wrap(back)  # handed back whole: it can be wrapped again


def test_a_replay_under_other_versions_says_which(tmp_path: Path) -> None:
    """The manifest records the versions of selftune, torch and Python the run ran under; a
    replay under others said nothing of them (another torch's kernels may round otherwise), and
    where the losses happened to agree, nothing at all.  It names them, once, when it is built;
    under the run's own it says nothing."""
    logged_run(tmp_path, "sgd", "off")
    task = make_task()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        selftune.replay(start("sgd", task.model.parameters()), tmp_path).close()
    assert not [w for w in said if "ran under" in str(w.message)]
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(torch="2.1.0+cu118", python="3.10.4")
    path.write_text(json.dumps(manifest))
    task = make_task()
    with pytest.warns(UserWarning, match=r"ran under torch 2\.1\.0\+cu118, python 3\.10\.4, "
                      r"this replay under torch .*, python ") as told:  # fmt: skip
        selftune.replay(start("sgd", task.model.parameters()), tmp_path).close()
    assert len([w for w in told if "ran under" in str(w.message)]) == 1
    assert told[0].filename == __file__
