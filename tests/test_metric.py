"""``observe``: an evaluation metric fed to the run reaches ``auto``, the log, replay and resume."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import LR, final_weights, make_optimizer, make_task, train

import selftune
from selftune import cli
from selftune.audit import read_log
from selftune.report import metric_series, read_run, write_report

STEPS = 400
EVERY = 10  #: evaluate every this many steps, as a training loop does


def _observing(task: Any, opt: selftune.SelfTuned) -> Callable[[int], None]:
    """After every ``EVERY`` steps, give the optimizer the full-data loss, as a loop that
    evaluates would give its validation loss."""

    def on_step(t: int) -> None:
        if t % EVERY == 0:
            opt.observe(task.full_loss())

    return on_step


def _run(folder: Path | None, observe: bool) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), log_dir=folder)
    trail: list[dict[str, Any]] = []
    opt.add_listener(lambda e: trail.extend({"step": e.step, **d.__dict__} for d in e.decisions))
    train(task, opt, STEPS, evaluate=False, on_step=_observing(task, opt) if observe else None)
    opt.close()
    return final_weights(task.model), trail


def test_a_stalled_metric_halves_the_rate_in_a_logged_run_that_replays_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich folds a frame narrower than its header
    weights, trail = _run(tmp_path, observe=True)
    cuts = [d for d in trail if d["reason"].startswith("metric plateau")]
    assert cuts, [d["reason"] for d in trail]
    first = cuts[0]
    assert first["step"] % EVERY == 1  # read at the step after the evaluation
    assert first["new"] == pytest.approx(first["old"] / 2)
    # the log records the metric among the signals of the decision it drove
    logged = [r for r in read_log(tmp_path).records if r["kind"] == "decision"]
    assert any("metric" in r["signals"] and "metric plateau" in r["reason"] for r in logged)
    # before the first cut the run is the one that never evaluated; after it, it is not
    blind_weights, blind = _run(None, observe=False)

    def before_cut(decisions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        keys = ("step", "knob", "old", "new", "reason")
        return [tuple(d[k] for k in keys) for d in decisions if d["step"] < first["step"]]

    assert before_cut(blind) == before_cut(trail)
    assert not all(torch.equal(a, b) for a, b in zip(weights, blind_weights, strict=True))
    # the report plots the metric at the steps that read it
    series = metric_series(read_run(tmp_path))
    assert list(series.steps) == list(range(EVERY + 1, STEPS, EVERY))
    write_report(tmp_path)
    assert (tmp_path / "plots" / "metric.png").exists()
    # watch shows the last one, at the step that read it
    assert cli.main(["watch", str(tmp_path), "--once"]) == 0
    last = series.values[-1], series.steps[-1]
    assert f"metric {last[0]:.4g} (step {last[1]})" in capsys.readouterr().out
    # replay re-applies the logged decisions: it needs no metric
    task = make_task()
    replayed = selftune.replay(make_optimizer("adamw", task.model.parameters()), tmp_path)
    train(task, replayed, STEPS, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, final_weights(task.model), strict=True))


@pytest.mark.parametrize("saved_as", ["dict", "list"])
def test_a_metric_not_yet_read_survives_a_checkpoint(saved_as: str) -> None:
    """A run checkpointed between an evaluation and the next step resumes to the same future,
    also from a state saved when the pending metric was a list ``[value, mode, ...]``."""

    def run(split: int | None) -> list[torch.Tensor]:
        task = make_task()
        opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()))
        for t in range(1, STEPS + 1):
            loss = task.batch_loss()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
            if t % EVERY == 0:
                opt.observe(task.full_loss())
            if t == split:  # just after an evaluation: its metric is still pending
                state = opt.state_dict()
                pending = state["selftune"]["metric"]["observed"]  # no step has shared it yet
                assert pending["value"] is not None
                if saved_as == "list":  # a state of before, which held it as the shared one
                    state["selftune"]["metric"] = [pending["value"], pending["mode"]]
                opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()))
                opt.load_state_dict(state)
        return final_weights(task.model)

    whole = run(None)
    split = run(EVERY * 20)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))


@pytest.mark.parametrize(
    ("metric", "mode", "words"),
    [
        (0.5, "minimize", 'use "min"'),
        ("0.5", "min", "needs one number, got str"),
        (torch.ones(3), "min", r"shape \(3,\)"),
        (10**400, "min", "too large for a float"),
        (torch.tensor(1 + 2j), "min", "needs a real number, got a torch.complex64"),
        (True, "max", "needs a real number, got a bool"),
    ],
)
def test_a_bad_metric_is_refused_by_name(metric: Any, mode: str, words: str) -> None:
    opt = selftune.wrap(make_optimizer("adamw", make_task().model.parameters()))
    with pytest.raises(selftune.ConfigError, match=words):
        opt.observe(metric, mode=mode)


@pytest.mark.parametrize(
    ("patience", "words"), [(-1, r"outside \[0, inf\)"), (2.5, "whole number")]
)
def test_a_bad_metric_patience_is_refused_by_name(patience: Any, words: str) -> None:
    with pytest.raises(selftune.ConfigError, match=words):
        selftune.wrap(
            make_optimizer("adamw", make_task().model.parameters()), metric_patience=patience
        )


def test_a_run_keeps_one_metric_direction() -> None:
    opt = selftune.wrap(make_optimizer("adamw", make_task().model.parameters()))
    opt.observe(torch.tensor(0.9), mode="max")  # a tensor of one element is a number
    with pytest.raises(selftune.ConfigError, match="one metric"):
        opt.observe(0.5)


def test_a_metric_undefined_at_first_counts_from_its_first_value() -> None:
    """An evaluation metric that is NaN until the model predicts anything (an F1 with no
    positive prediction) bettered no best: the NaNs before the first number count for no cut
    (a step once failed formatting the missing best), those after it count as misses."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), metric_patience=1)
    cuts: list[int] = []
    opt.add_listener(
        lambda e: cuts.extend(e.step for d in e.decisions if d.reason.startswith("metric"))
    )

    def on_step(t: int) -> None:
        if t % EVERY == 0:  # undefined for the first 150 steps, then defined, then NaN again
            opt.observe(task.full_loss() if 150 < t <= 250 else float("nan"))

    train(task, opt, 320, evaluate=False, on_step=on_step)
    assert min(cuts) > 160, cuts  # the first number came at step 160: no cut before it
    assert any(t > 250 for t in cuts), cuts  # NaNs after a best count as misses


def _floor_run(
    folder: Path, metric: Callable[[Any], float], joint: bool = False, low: float | None = None
) -> tuple[list[warnings.WarningMessage], list[torch.Tensor]]:
    """SGD under ``auto`` with its floor at a tenth of its start, given ``metric`` of the task
    every ``EVERY`` steps; the floor's warnings the run made, and its final weights.
    ``joint``: each layer a param group of its own, tuned as one (``groups="joint"``), the
    second at half the first's rate.  ``low``: the lower bound given as a rate
    (``lr_bounds_absolute``), not as a factor of the start."""
    task = make_task()
    layers = [list(m.parameters()) for m in task.model.modules() if list(m.parameters(False))]
    params: Any = (
        [{"params": p, "lr": LR["sgd"] / (1 + i)} for i, p in enumerate(layers)]
        if joint
        else task.model.parameters()
    )
    opt = selftune.wrap(
        make_optimizer("sgd", params),
        log_dir=folder,
        bounds={"lr": (0.1, 1e5) if low is None else (low, 10.0)},
        lr_bounds_absolute=low is not None,
        groups="joint" if joint else "each",
    )

    def on_step(t: int) -> None:
        if t % EVERY == 0:
            opt.observe(metric(task))

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train(task, opt, STEPS, evaluate=False, on_step=on_step)
    opt.close()
    return [w for w in said if w.category is selftune.RateFloorWarning], final_weights(task.model)


@pytest.mark.parametrize("low", [None, 0.1 * LR["sgd"], 2 * LR["sgd"]])
def test_a_rate_cut_to_its_floor_is_warned_once_and_noted_in_the_log(
    tmp_path: Path, low: float | None
) -> None:
    """A metric that never improves (an accuracy stuck at one level) has the metric's rule
    halve the rate until the floor stops it: the user is told once, with what to do, and the
    log notes it at the step of the cut that got there (nothing said so before); the floor
    given as a factor of the start or as a rate alike, and a start below the rate given is
    the floor (a bound stops a move, never makes one: the cuts may go on to the start)."""
    said, weights = _floor_run(tmp_path, lambda task: 1.0, low=low)
    assert len(said) == 1, [str(w.message) for w in said]
    message = str(said[0].message)
    assert Path(said[0].filename).name == "faults.py"  # the loop's call of step(), not selftune
    start = LR["sgd"]
    floor = 0.1 * start if low is None else min(low, start)
    assert f"floor, {floor:.3g}" in message and "without observe()" in message, message
    log = read_log(tmp_path).records
    notes = [r for r in log if r["kind"] == "note" and "floors" in r]
    assert len(notes) == 1 and notes[0]["groups"] == [0], notes
    assert notes[0]["floors"] == [pytest.approx(floor)] and notes[0]["reason"] == message
    cut = [
        r
        for r in log
        if r["kind"] == "decision" and r["step"] == notes[0]["step"] and r["knob"] == "lr"
    ]
    assert len(cut) == 1 and cut[0]["new"] == pytest.approx(floor) and cut[0]["clipped"], cut
    assert cut[0]["old"] > floor
    # later halvings are held at the floor: no decision takes the rate below it
    rates = [r["new"] for r in log if r["kind"] == "decision" and r["knob"] == "lr"]
    assert min(rates) == pytest.approx(floor)
    # the note decides nothing: the run replays to the same weights
    task = make_task()
    replayed = selftune.replay(make_optimizer("sgd", task.model.parameters()), tmp_path)
    train(task, replayed, STEPS, evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, final_weights(task.model), strict=True))


def test_a_metric_that_improves_takes_no_rate_to_its_floor(tmp_path: Path) -> None:
    """The same run given its full-data loss, which falls: no cut reaches the floor, and no
    warning or note says one did."""
    assert _floor_run(tmp_path, lambda task: task.full_loss())[0] == []
    assert not [r for r in read_log(tmp_path).records if r["kind"] == "note" and "floors" in r]


def test_a_joint_run_cut_to_its_floor_is_warned_of_once_for_all_its_groups(tmp_path: Path) -> None:
    """Tuned as one, every group reaches its floor at the same cut: one warning names them all
    (a warning per group was as many warnings alike as the model has groups)."""
    said, _ = _floor_run(tmp_path, lambda task: 1.0, joint=True)
    assert len(said) == 1, [str(w.message) for w in said]
    notes = [r for r in read_log(tmp_path).records if r["kind"] == "note" and "floors" in r]
    assert len(notes) == 1 and notes[0]["groups"] == [0, 1], notes
    assert notes[0]["floors"] == [pytest.approx(0.1 * LR["sgd"]), pytest.approx(0.05 * LR["sgd"])]
    assert "groups 0, 1" in str(said[0].message)
