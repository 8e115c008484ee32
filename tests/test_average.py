"""The weight average (`wrap(..., average=...)`): what it holds, and that the trust layer keeps it.

The average is evaluated in the weights' place, so it must be exactly the average of the applied
steps' weights: never of steps the guard rolled back, the same after a checkpoint's resume and
in a replay, and it must earn its place by being better than the iterate it replaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from faults import guard_records, make_optimizer, make_task, train
from problems import noisy_quadratic

import selftune
from selftune.checkpoint import load_checkpoint, save_checkpoint


def average_of(opt: selftune.SelfTuned) -> list[torch.Tensor]:
    assert opt.average is not None
    return [t.clone() for group in opt.average.tensors for t in group]


def test_the_average_is_the_running_mean_then_the_ema_of_the_applied_steps() -> None:
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), "off", average=0.8)
    iterates = [[p.detach().clone() for p in task.model.parameters()]]
    train(
        task,
        opt,
        12,
        evaluate=False,
        on_step=lambda t: iterates.append([p.detach().clone() for p in task.model.parameters()]),
    )
    expected = [t.clone() for t in iterates[0]]
    for k, weights in enumerate(iterates[1:], start=1):
        weight = max(0.2, 1.0 / (k + 1))  # the running mean until 1/(k+1) falls to 1 - decay
        expected = [(1 - weight) * e + weight * w for e, w in zip(expected, weights, strict=True)]
    for got, want in zip(average_of(opt), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # one update per applied step (the first four a plain mean of the iterates so far)
    assert opt.average is not None and opt.average.updates == 12


def test_averaged_swaps_the_average_in_and_the_weights_back_even_on_error() -> None:
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), average=True)
    train(task, opt, 30, evaluate=False)
    weights = [p.detach().clone() for p in task.model.parameters()]
    with opt.averaged():
        inside = [p.detach().clone() for p in task.model.parameters()]
    for got, want in zip(inside, average_of(opt), strict=True):
        assert torch.equal(got, want)
    assert any(not torch.equal(a, w) for a, w in zip(inside, weights, strict=True))
    with pytest.raises(RuntimeError, match="evaluation failed"), opt.averaged():
        raise RuntimeError("evaluation failed")
    for p, w in zip(task.model.parameters(), weights, strict=True):
        assert torch.equal(p, w)


def test_the_controller_is_told_whether_the_metric_was_measured_at_the_average() -> None:
    """``auto`` stops cutting the rate on a plateau of the loss once the metric is read at the
    average (its noise floor is the average's to lower), so the wrapper must say which weights
    the metric came from: the average when ``observe`` follows an ``averaged()`` block run since
    the last step; a metric still waiting for its step keeps that flag across a checkpoint."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), average=True)
    train(task, opt, 5, evaluate=False)

    def step_after(evaluation: str) -> bool:
        if evaluation == "average":
            with opt.averaged():
                metric = task.full_loss()
        else:
            metric = task.full_loss()
        opt.observe(metric)
        if evaluation == "checkpoint":  # a metric given, then the run saved and resumed
            state = opt.state_dict()
            opt.load_state_dict(state)
        train(task, opt, 1, evaluate=False)
        assert opt.last_signals is not None and opt.last_signals.metric is not None
        return opt.last_signals.metric_at_average

    assert step_after("average")
    assert not step_after("weights")  # the flag is the last evaluation's, not the run's
    with opt.averaged():  # an averaged evaluation; its metric then waits through a checkpoint
        pass
    assert step_after("checkpoint")


def test_bad_settings_are_named() -> None:
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()))
    with pytest.raises(selftune.ConfigError, match="average=True"), opt.averaged():
        pass
    for bad in (1.0, 0.0, -0.5, "0.9"):
        with pytest.raises(selftune.ConfigError, match="a decay in"):
            selftune.wrap(make_optimizer("sgd", make_task().model.parameters()), average=bad)


def test_an_integer_parameter_is_refused_at_the_wrap_and_when_its_group_is_added() -> None:
    """An integer parameter (``requires_grad=False``: torch's optimizers take it, and never step
    it) has no average: its update raised after the first step had moved the weights, and every
    later step was refused as broken part-way."""
    weight = torch.nn.Parameter(torch.ones(3))
    index = torch.nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    with pytest.raises(selftune.ConfigError, match=r"torch\.int64 parameter"):
        selftune.wrap(torch.optim.SGD([weight, index], lr=0.1), average=True)
    opt = selftune.wrap(torch.optim.SGD([weight], lr=0.1), average=True)
    with pytest.raises(selftune.ConfigError, match=r"param group 1 holds a torch\.int64"):
        opt.add_param_group({"params": [index]})
    assert len(opt.param_groups) == 1
    for _ in range(3):  # the run goes on, the refused group left out
        opt.zero_grad()
        (weight**2).sum().backward()
        opt.step()
    assert opt.step_count == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_average_of_a_noisy_descent_is_closer_to_the_minimum_than_its_last_iterate(
    seed: int,
) -> None:
    """At a fixed rate, SGD ends in a noise ball about the minimum; the average sits nearer its
    centre.  The noisy quadratic's full loss measures exactly that distance."""
    problem = noisy_quadratic(seed)
    opt = selftune.wrap(
        torch.optim.SGD(problem.model.parameters(), lr=0.15), "off", guard=False, average=True
    )
    for t in range(1, 301):
        opt.zero_grad()
        problem.batch_loss(t).backward()
        opt.step()
    last = problem.full_loss()
    with opt.averaged():
        averaged = problem.full_loss()
    assert averaged < 0.7 * last, (averaged, last)


def test_a_rollback_restores_the_average_its_snapshot_held(tmp_path: Path) -> None:
    """A rate overwritten with 1e3 (a scheduler gone wrong) takes one applied step that wrecks the
    weights; the guard sees the loss it leads to and rolls back.  The average had taken the wrecked
    weights in; after the rollback it must be the snapshot's, or it would evaluate them."""
    task = make_task()
    opt = selftune.wrap(
        make_optimizer("sgd", task.model.parameters()), "off", log_dir=tmp_path, average=True
    )
    after = {0: average_of(opt)}
    train(
        task,
        opt,
        40,
        faults={33: "lr_1e3"},
        evaluate=False,
        on_step=lambda t: after.__setitem__(t, average_of(opt)),
    )
    opt.close()
    (rollback, *_) = [r for r in guard_records(tmp_path) if r["event"] == "rollback"]
    assert rollback["step"] > 33, "the fault was caught before its step was applied"
    # a snapshot is taken before its step's update: it holds the average after the step before
    held = after[rollback["restored_step"] - 1]
    for got, want in zip(after[rollback["step"]], held, strict=True):
        assert torch.equal(got, want)
    assert not all(
        torch.equal(a, b) for a, b in zip(after[rollback["step"] - 1], held, strict=True)
    ), "the average had not moved since the snapshot: the test lost its power"


def test_a_resumed_run_and_a_replay_end_with_the_same_average(tmp_path: Path) -> None:
    def run(
        folder: Path, stop: int | None = None, resume: Path | None = None
    ) -> selftune.SelfTuned:
        task = make_task()
        base = make_optimizer("adamw", task.model.parameters(), lr=1e-3)
        opt = selftune.wrap(base, log_dir=folder, average=0.95)
        first = 1
        if resume is not None:
            first = load_checkpoint(resume, model=task.model, optimizer=opt)["step"] + 1
            for _ in range(first - 1):
                task.batch_loss()  # the data order of the steps already taken
        for t in range(first, (stop or 80) + 1):
            train(task, opt, 1, faults={1: "nan_loss"} if t == 40 else None, evaluate=False)
            if t == 50 and stop is not None:
                save_checkpoint(folder / "ckpt.pt", model=task.model, optimizer=opt, step=t)
        opt.close()
        return opt

    reference = average_of(run(tmp_path / "ref"))
    run(tmp_path / "res", stop=55)
    resumed = average_of(run(tmp_path / "res", resume=tmp_path / "res" / "ckpt.pt"))
    task = make_task()
    replay = selftune.replay(
        make_optimizer("adamw", task.model.parameters(), lr=1e-3), tmp_path / "ref"
    )
    train(task, replay, 80, faults={40: "nan_loss"}, evaluate=False)
    for ref, res, rep in zip(reference, resumed, average_of(replay), strict=True):
        assert torch.equal(ref, res)
        assert torch.equal(ref, rep)


def test_a_checkpoint_saved_at_the_average_holds_the_training_weights(tmp_path: Path) -> None:
    """ "Validate at the average, save if best": a save inside ``averaged()`` stores the weights
    the run trains on, so that the resumed run is the uninterrupted one (it held the average,
    and the resumed run trained on from it)."""

    def run(resume: bool) -> list[torch.Tensor]:
        task = make_task()
        opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), average=True)
        for t in range(1, 41):
            train(task, opt, 1, evaluate=False)
            if t == 20:
                with opt.averaged():
                    task.full_loss()
                    save_checkpoint(tmp_path / "c.pt", model=task.model, optimizer=opt, step=t)
                    inside = [p.detach().clone() for p in task.model.parameters()]
                if resume:
                    load_checkpoint(tmp_path / "c.pt", model=task.model, optimizer=opt)
                    resumed = [p.detach().clone() for p in task.model.parameters()]
                    assert not all(map(torch.equal, resumed, inside))  # not the average
        return [p.detach().clone() for p in task.model.parameters()]

    assert all(map(torch.equal, run(resume=False), run(resume=True)))


def test_a_half_precision_average_is_kept_in_float32() -> None:
    """In bfloat16 each update of the average rounds away once it is within about 2**-8 /
    (1 - decay) of the weights: one of weights that jumped to 4.0 and stayed stopped at 3.86
    (decay 0.99).  Kept in float32 it reaches them; swapped in, it is their dtype again."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = selftune.wrap(torch.optim.SGD([w], lr=3.0), "off", guard=False, average=0.99)
    for t in range(1, 1001):
        opt.zero_grad()
        w.grad = torch.full_like(w, -1.0 if t == 1 else 0.0)  # one step to 4.0, then none
        opt.step()
    ((average,),) = opt.average.tensors
    assert average.dtype == torch.float32
    assert average.tolist() == pytest.approx([4.0] * 4, abs=1e-3)
    with opt.averaged():
        assert w.dtype == torch.bfloat16 and torch.equal(w, average.to(torch.bfloat16))
    assert w.tolist() == [4.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_average_copied_into_the_weights_is_held_until_they_change(dtype: torch.dtype) -> None:
    """``held_by`` tells whether the weights still hold the average ``copy_into`` put there (a
    float32 one read at the bfloat16 weights' dtype): what the Hugging Face integration asks
    before it puts back the training weights for the next ``train()``."""
    w = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = selftune.wrap(torch.optim.SGD([w], lr=0.1), "off", guard=False, average=True)
    for _ in range(3):
        opt.zero_grad()
        w.grad = torch.full_like(w, -1.0)
        opt.step()
    assert opt.average is not None and not opt.average.held_by(opt.param_groups)
    opt.average.copy_into(opt.param_groups)
    assert opt.average.held_by(opt.param_groups)
    with torch.no_grad():
        w[0] += 1.0
    assert not opt.average.held_by(opt.param_groups)


@pytest.mark.parametrize(
    ("dtype", "moved_to"),
    [
        (torch.bfloat16, torch.float32),  # a float32 average, written bfloat16-rounded
        (torch.bfloat16, torch.float16),
        (torch.float32, torch.float64),
        (torch.float32, torch.bfloat16),
    ],
)
def test_the_average_copied_into_the_weights_is_held_across_a_conversion(
    dtype: torch.dtype, moved_to: torch.dtype
) -> None:
    """Weights converted since ``copy_into`` (``model.to(dtype)``, or to another device, which
    the same comparison follows) still hold the average: it is read at the dtype it was
    written at, then converted as they were.  Read at their new dtype alone, the float32
    average of bfloat16 weights was not found in them once widened to float32."""
    w = torch.nn.Parameter(torch.linspace(0.1, 0.9, 7, dtype=dtype))
    opt = selftune.wrap(torch.optim.SGD([w], lr=0.1), "off", guard=False, average=True)
    for _ in range(3):
        opt.zero_grad()
        w.grad = torch.linspace(-1.0, 1.0, 7).to(dtype)
        opt.step()
    assert opt.average is not None
    opt.average.copy_into(opt.param_groups)
    w.data = w.data.to(moved_to)
    assert opt.average.held_by(opt.param_groups)
    with torch.no_grad():
        w[0] += 1.0
    assert not opt.average.held_by(opt.param_groups)


@pytest.mark.parametrize("when", [0, 5])
def test_the_average_follows_a_model_converted_after_wrap(when: int) -> None:
    """``model.to(torch.bfloat16)`` after ``wrap`` (before the first step, which plain torch's
    optimizers allow, or mid-run with SGD): the fused update mixed a float32 average with
    bfloat16 weights and raised after the step had moved them, which broke the run."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = selftune.wrap(torch.optim.SGD([w], lr=1.0), "off", guard=False, average=0.5)
    for t in range(1, 11):
        if t == when + 1:
            w.data = w.data.to(torch.bfloat16)  # what model.to(torch.bfloat16) does
        opt.zero_grad()
        w.grad = torch.full_like(w, -1.0)
        opt.step()
    ((average,),) = opt.average.tensors
    assert w.dtype == torch.bfloat16 and average.dtype == torch.float32  # kept wide
    assert w.tolist() == [11.0] * 4
    assert average.tolist() == pytest.approx([10.0] * 4, abs=2e-3)  # the ema: 1 step behind
    with opt.averaged():
        assert torch.equal(w, average.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_average_follows_one_parameter_converted_alone(dtype: torch.dtype) -> None:
    """One submodule converted after ``wrap`` (``model.head.to(...)``), not the group's first
    parameter: the update looked at the first alone, mixed dtypes in its fused op and raised
    after the step had moved the weights, and every later step was refused."""
    first, second = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = selftune.wrap(torch.optim.SGD([first, second], lr=1.0), "off", average=0.5)
    for t in range(1, 11):
        if t == 6:
            second.data = second.data.to(dtype)  # what second's module.to(dtype) does
        opt.zero_grad()
        first.grad, second.grad = torch.full_like(first, -1.0), torch.full_like(second, -1.0)
        opt.step()
    assert opt.average is not None and opt.step_count == 10
    ((_, average),) = opt.average.tensors
    assert second.dtype == dtype
    assert average.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)  # kept wide
    assert average.tolist() == pytest.approx([10.0] * 4, abs=2e-3)  # the ema: 1 step behind
    with opt.averaged():
        assert torch.equal(second, average.to(dtype))


def test_a_group_added_mid_run_joins_the_average_from_its_own_weights() -> None:
    task = make_task()
    first, _, second = task.model.children()
    opt = selftune.wrap(torch.optim.SGD(first.parameters(), lr=0.05), "off", average=True)
    train(task, opt, 10, evaluate=False)
    start = [p.detach().clone() for p in second.parameters()]
    opt.add_param_group({"params": list(second.parameters())})
    train(task, opt, 10, evaluate=False)
    assert opt.average is not None and len(opt.average.tensors) == 2
    with opt.averaged():
        inside = [p.detach().clone() for p in second.parameters()]
    for avg, begin, now in zip(inside, start, second.parameters(), strict=True):
        assert not torch.equal(avg, begin) and not torch.equal(avg, now)


def test_a_state_saved_without_an_average_starts_one_from_the_loaded_weights() -> None:
    task = make_task()
    plain = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "off")
    train(task, plain, 20, evaluate=False)
    saved = {"model": task.model.state_dict(), "optimizer": plain.state_dict()}
    fresh = make_task()  # the initial weights, which a stale average would still hold
    opt = selftune.wrap(make_optimizer("sgd", fresh.model.parameters()), "off", average=True)
    fresh.model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for avg, p in zip(average_of(opt), fresh.model.parameters(), strict=True):
        assert torch.equal(avg, p)


def test_a_state_with_an_average_loaded_without_one_says_it_is_dropped() -> None:
    """A checkpoint of a run with ``average=True`` loaded into a wrapper without one dropped
    the average with no word (``averaged()`` then refused)."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("sgd", task.model.parameters()), "off", average=True)
    train(task, opt, 5, evaluate=False)
    saved = opt.state_dict()
    bare = selftune.wrap(make_optimizer("sgd", make_task().model.parameters()), "off")
    with pytest.warns(UserWarning, match="the average is dropped"):
        bare.load_state_dict(saved)


def test_a_param_group_with_no_params_is_stepped_rolled_back_saved_and_averaged(
    tmp_path: Path,
) -> None:
    # torch.optim accepts a group with an empty list (one a model fills later, say); torch's
    # fused ops refuse empty lists, so every per-group fused op must pass it by
    def make(task: Any, log_dir: Path | None = None) -> selftune.SelfTuned:
        inner = torch.optim.SGD(
            [{"params": list(task.model.parameters())}, {"params": []}], lr=0.05, momentum=0.9
        )
        return selftune.wrap(inner, average=True, log_dir=log_dir)

    task = make_task()
    opt = make(task, tmp_path / "run")
    train(task, opt, 40, faults={30: "nan_loss"}, evaluate=False)  # a rollback restores state
    assert [r["event"] for r in guard_records(tmp_path / "run")] == ["rollback"]
    fresh = make(make_task())
    fresh.load_state_dict(opt.state_dict())
    with fresh.averaged():
        inside = [p.detach().clone() for group in fresh.param_groups for p in group["params"]]
    for got, want in zip(inside, average_of(opt), strict=True):
        assert torch.equal(got, want)


def test_averaged_with_no_parameters_yet_is_an_empty_block() -> None:
    """An optimizer built of an empty group, its parameters added later (add_param_group),
    raised torch's "Tensor list must have at least one tensor" in ``averaged()`` before the
    first group was added."""
    opt = selftune.wrap(torch.optim.SGD([{"params": []}], lr=0.1), average=True)
    opt.step()
    with opt.averaged():
        assert opt.training_weights() == {}
    weight = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [weight]})
    with opt.averaged():
        assert torch.equal(weight, torch.ones(2))


def test_averaged_refuses_a_group_whose_params_changed_behind_its_back() -> None:
    """A parameter appended to a group's ``params`` (torch's optimizers take that) fits no
    average: ``averaged()`` raised torch's "Tensor lists must have the same number of tensors"
    from inside the swap, where the next step names the change and what to do."""
    task = make_task()
    opt = selftune.wrap(make_optimizer("adamw", task.model.parameters()), average=True)
    train(task, opt, 5, evaluate=False)
    weights = [p.detach().clone() for p in task.model.parameters()]
    opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(selftune.ConfigError, match="param group 0 holds 5"), opt.averaged():
        pass
    assert not opt.training_weights()
    for p, w in zip(task.model.parameters(), weights, strict=True):
        assert torch.equal(p, w)
