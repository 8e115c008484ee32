"""The optimizer contract of ``selftune.wrap``: schedulers, tensor rates, groups, bad input."""

from __future__ import annotations

import copy
import gc
import inspect
import io
import itertools
import math
import pickle
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from problems import noisy_quadratic, train

import selftune
from selftune import audit, report
from selftune.controllers.auto import FLAGS as auto_flags
from selftune.controllers.auto import OPTIONS as auto_options
from selftune.controllers.auto import AutoController
from selftune.controllers.base import Proposal
from selftune.controllers.hypergradient import OPTIONS as hypergradient_options
from selftune.controllers.hypergradient import HypergradientController
from selftune.controllers.off import OffController
from selftune.controllers.stability import OPTIONS as stability_options
from selftune.controllers.stability import StabilityController
from selftune.policy import DEFAULT_BOUNDS

pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd(lr: float = 0.002, **kw: float) -> tuple[torch.optim.Optimizer, object]:
    pr = noisy_quadratic(seed=1)
    return torch.optim.SGD(pr.model.parameters(), lr=lr, momentum=0.9, **kw), pr


def test_wrap_is_an_optimizer_that_shares_the_inner_state() -> None:
    inner, _ = _sgd()
    opt = selftune.wrap(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state


def test_a_scheduler_composes_with_the_scale() -> None:
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step // 50))
    for t in range(1, 201):
        loss = pr.batch_loss(t)  # type: ignore[attr-defined]
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        sched.step()
        scheduled = sched.get_last_lr()[0]
        # the group keeps the scheduler's rate; the effective one is that times selftune's scale
        assert opt.param_groups[0]["lr"] == scheduled
        assert opt.hyperparams()[0]["lr"] == pytest.approx(scheduled * opt._scales[0])
    assert opt._scales[0] != 1.0, "selftune never adjusted the rate"


def _steps(
    pr: Any,
    opt: selftune.SelfTuned,
    span: range,
    nan_at: int | None = None,
    after: Callable[[], Any] | None = None,
) -> None:
    """Train over the steps of ``span``, the loss reported as NaN at ``nan_at`` (the guard's
    trouble); ``after`` each step (a scheduler's step)."""
    for t in span:
        loss = pr.batch_loss(t)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach() * (math.nan if t == nan_at else 1.0))
        if after is not None:
            after()


@pytest.mark.parametrize(
    ("make", "settings", "said"),
    [
        (
            lambda p: torch.optim.Adam(p),
            {"bounds": {"momentum": (0.5, 0.99)}},
            r"bounds names momentum, a knob no param group of this Adam has "
            r".*counterpart of momentum is beta1",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            {"max_change": {"beta1": 0.05}},
            r"max_change names beta1, a knob no param group of this SGD has",
        ),
        (
            lambda p: torch.optim.Adam(p),
            {"bounds": {"beta2": (0.9, 0.99)}},
            r"bounds names beta2, which the policy freezes .*the setting does nothing",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1),
            {"bounds": {"lr": (0.01, 0.1)}},
            r"factors of each group's starting rate that leave out the start itself",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.3),
            {"bounds": {"momentum": (0.5, 0.99)}},
            r"starts its momentum at 0.3, outside the bounds",
        ),
    ],
)
def test_a_setting_the_optimizer_cannot_honour_is_warned_of_at_wrap(
    make: Callable[[Any], torch.optim.Optimizer], settings: dict[str, Any], said: str
) -> None:
    """A bound on a knob the optimizer does not have (Adam's is beta1, not momentum) did
    nothing, and a start outside the bounds given stayed there (SGD at 1.0 under bounds of
    1e-4 to 1e-2 still stepped at 0.43 after 120 steps of auto): both without a word."""
    model = torch.nn.Linear(3, 1)
    with pytest.warns(UserWarning, match=said):
        selftune.wrap(make(model.parameters()), **settings)


@pytest.mark.parametrize("scheduler", [False, True])
def test_a_rate_outside_absolute_bounds_is_warned_of_at_the_first_step(scheduler: bool) -> None:
    """SGD at 1.0 under absolute bounds of 1e-4 to 1e-2 stepped at 0.43 after 120 steps of
    auto, without a word.  Told at the first step, where the start is read: a OneCycleLR built
    after the wrap starts the same SGD at 0.004, inside the bounds, and nothing is said."""
    inner, pr = _sgd(lr=1.0)
    opt = selftune.wrap(inner, bounds={"lr": (1e-4, 1e-2)}, lr_bounds_absolute=True)
    if scheduler:
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _steps(pr, opt, range(1, 3))
    texts = [str(w.message) for w in said if "outside the bounds" in str(w.message)]
    assert len(texts) == (0 if scheduler else 1)
    assert scheduler or texts[0].startswith("param group 0 starts its rate at 1, outside the")


def test_each_misfit_of_several_groups_is_warned_of_once() -> None:
    """The check of factors that leave out the start ran in the loop over the groups: it was
    said once per group, and it skipped the group's other knobs (a momentum outside its bounds
    went unsaid)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [{"params": m.parameters()} for m in model]
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=0.3)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        selftune.wrap(sgd, bounds={"lr": (2.0, 10.0), "momentum": (0.5, 0.99)})
    texts = [str(w.message) for w in said]
    assert sum("leave out the start itself" in t for t in texts) == 1
    assert sum("starts its momentum at 0.3" in t for t in texts) == 2  # one per group


def test_a_warm_up_the_loop_writes_leaves_the_bounds_on_the_rate_given() -> None:
    """Read again at the first step, the start took the loop's own first write to ``lr`` (a
    warm-up by hand from a thousandth of the rate): the bounds, factors of it, fell a
    thousandfold below the rate the optimizer was built with.  Only a scheduler's record of
    its start (``initial_lr``) is read there."""
    inner, pr = _sgd(lr=0.1)
    opt = selftune.wrap(inner, _Push("lr", 1.0), bounds={"lr": (0.1, 10.0)}, guard=False)
    for t in range(1, 21):
        for group in opt.param_groups:
            group["lr"] = 0.1 * t / 1000
        _steps(pr, opt, range(t, t + 1))
    assert opt.state_dict()["selftune"]["start"] == [0.1]


def test_settings_the_optimizer_honours_are_not_warned_of() -> None:
    """The control: the defaults, knobs frozen that the optimizer has not (which never move,
    as asked: "tune the rate only"), and settings that fit."""
    model = torch.nn.Linear(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        selftune.wrap(
            torch.optim.SGD(model.parameters(), lr=0.1), frozen={"momentum", "beta1", "beta2"}
        )
        # a frozen rate is still cut by the guard's rollbacks, which its bounds hold
        selftune.wrap(
            torch.optim.SGD(model.parameters(), lr=0.1), frozen={"lr"}, bounds={"lr": (0.1, 1)}
        )
        selftune.wrap(
            torch.optim.Adam(model.parameters(), lr=1e-3),
            bounds={"lr": (1e-5, 1e-2), "beta1": (0.8, 0.95)},
            lr_bounds_absolute=True,
            max_change={"beta1": 0.05},
            frozen={"beta2"},
        )


def test_a_listener_that_cannot_take_events_is_refused_when_added() -> None:
    """A string was accepted and failed the next step with "'str' object is not callable",
    after that step's update; a writer's class, callable, would have been built once a step."""
    from selftune.integrations.tensorboard import TensorBoardWriter

    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    with pytest.raises(selftune.ConfigError, match="a callable taking one StepEvent, not str"):
        opt.add_listener("notcallable")  # type: ignore[arg-type]
    with pytest.raises(selftune.ConfigError, match=r"class TensorBoardWriter.*pass an instance"):
        opt.add_listener(TensorBoardWriter)  # type: ignore[arg-type]
    seen: list[int] = []
    opt.add_listener(lambda event: seen.append(event.step))
    _steps(pr, opt, range(1, 4))
    assert seen == [1, 2, 3]


def test_a_step_without_the_closure_l_bfgs_needs_is_refused_and_the_run_goes_on() -> None:
    """L-BFGS steps only with a closure: torch's TypeError came from inside the step, which
    then stood broken off and refused every step after it until a checkpoint loaded."""
    model = torch.nn.Linear(4, 1)
    opt = selftune.wrap(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3))
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    closure()
    with pytest.raises(
        selftune.ConfigError, match=r"LBFGS steps only with a closure.*step\(closure\)"
    ):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.step_count == 0
    opt.step(closure)
    assert opt.step_count == 1


def test_a_step_of_the_wrapped_optimizer_itself_is_refused_before_it_moves_a_weight(
    tmp_path: Path,
) -> None:
    """The optimizer given to ``wrap``, stepped itself (a reference the loop kept, or
    ``opt.optimizer``): that step had no guard, no record in the log or the trace, and the
    run could no longer be replayed, with no word.  Now it is refused before the update, and
    what steps it for the wrapper goes through: the wrapper's step, its closure, the guard's
    rollback, a scheduler built on the wrapped optimizer, a GradScaler given the wrapper."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, log_dir=tmp_path / "run")
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.5)
    _steps(pr, opt, range(1, 4), nan_at=2, after=sched.step)
    loss = pr.batch_loss(4)  # type: ignore[attr-defined]
    opt.zero_grad()
    loss.backward()
    weights = [p.detach().clone() for p in pr.model.parameters()]  # type: ignore[attr-defined]
    moments = copy.deepcopy(inner.state_dict()["state"])
    for bypass in (inner.step, opt.optimizer.step, lambda: inner.step(lambda: loss)):
        with pytest.raises(
            selftune.ConfigError,
            match=r"the SGD that selftune\.wrap wraps.*"
            r"step the wrapper",
        ):
            bypass()
    assert all(torch.equal(a, b) for a, b in zip(weights, pr.model.parameters(), strict=True))
    torch.testing.assert_close(inner.state_dict()["state"], moments)
    assert opt.step_count == 3
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad()
    scaler.scale(pr.batch_loss(4)).backward()  # type: ignore[attr-defined]
    scaler.step(opt)
    scaler.update()
    sched.step()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = pr.batch_loss(5)  # type: ignore[attr-defined]
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.step_count == 5
    opt.close()
    assert (tmp_path / "run" / "trace.jsonl").read_text().count("\n") == 5
    selftune.verify(tmp_path / "run")
    assert opt.unwrap() is inner
    inner.step()  # handed back: its steps are its own


def test_the_step_gate_holds_its_wrapper_weakly_and_no_copy_of_the_optimizer_carries_it() -> None:
    """The refusal of a step past the wrapper is a hook on the wrapped optimizer, which the
    loop holds: held strongly, it kept a dropped wrapper (its log files, its snapshots) alive
    for as long as the optimizer.  A copy or a pickle of the optimizer is no wrapped one, and
    steps as any; its state dict and the wrapper's save as before."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    _steps(pr, opt, range(1, 3))

    class KeepsItsHooks(torch.optim.SGD):  # copies all it holds, the gate among its hooks
        def __getstate__(self) -> dict[str, Any]:
            return self.__dict__

    pr_keeps = noisy_quadratic(seed=1)
    keeps = KeepsItsHooks(pr_keeps.model.parameters(), lr=0.002, momentum=0.9)
    keeping = selftune.wrap(keeps)
    _steps(pr_keeps, keeping, range(1, 3))
    for copied in (copy.deepcopy(inner), pickle.loads(pickle.dumps(inner)), copy.deepcopy(keeps)):
        copied.step()
    torch.save({"inner": inner.state_dict(), "opt": opt.state_dict()}, io.BytesIO())
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    inner.step()  # nothing tunes it any more: its step is its own


def test_a_step_after_close_is_refused_before_it_moves_the_weights(tmp_path: Path) -> None:
    """It moved the weights and then failed writing its trace (a ValueError from the closed
    file), so the run went on past the end of its log."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, log_dir=tmp_path / "run")
    _steps(pr, opt, range(1, 6))
    opt.close()
    opt.close()  # a second close is harmless
    pr.batch_loss(6).backward()  # type: ignore[attr-defined]
    params = inner.param_groups[0]["params"]
    before = [p.clone() for p in params]
    with pytest.raises(selftune.ConfigError, match=r"closed after step 5 \(close\(\)\)"):
        opt.step()
    assert opt.step_count == 5
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    selftune.verify(tmp_path / "run")  # the log as close left it: undamaged, five steps traced
    assert (tmp_path / "run" / "trace.jsonl").read_text().count("\n") == 5
    with pytest.raises(selftune.ConfigError, match="a param group added now"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(selftune.ConfigError, match="loading a state now"):
        opt.load_state_dict(opt.state_dict())  # it failed on the closed trace, half loaded
    # a checkpoint saved after close (it raised a ValueError from the closed trace) resumes
    ckpt = selftune.save_checkpoint(tmp_path / "c.pt", model=pr.model, optimizer=opt, step=5)
    inner_b, pr_b = _sgd()
    resumed = selftune.wrap(inner_b, log_dir=tmp_path / "run")
    assert selftune.load_checkpoint(ckpt, model=pr_b.model, optimizer=resumed)["step"] == 5
    _steps(pr_b, resumed, range(6, 9))
    resumed.close()
    assert selftune.verify(tmp_path / "run").records > 0
    assert (tmp_path / "run" / "trace.jsonl").read_text().count("\n") == 8
    found = opt.hyperparams()[0]["lr"]
    assert opt.unwrap() is inner and inner.param_groups[0]["lr"] == found  # the way on
    inner.step()
    # with no run folder there is nothing to keep in step with: close does not stop the run
    inner2, pr2 = _sgd()
    plain = selftune.wrap(inner2)
    plain.close()
    _steps(pr2, plain, range(1, 3))
    assert plain.step_count == 2


def test_unwrap_hands_a_chained_scheduler_the_rate_found_and_refuses_inside_averaged() -> None:
    inner, pr = _sgd(lr=0.002)
    opt = selftune.wrap(inner, average=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    _steps(pr, opt, range(1, 41), after=sched.step)  # the decay at step 40 is the scheduler's
    found = opt.hyperparams()[0]["lr"]
    assert found != pytest.approx(inner.param_groups[0]["lr"])  # a scale of selftune's own
    with opt.averaged(), pytest.raises(selftune.ConfigError, match="averaged"):
        opt.unwrap()
    # a step there would update the average, then be thrown away: refused, nothing changed
    pr.batch_loss(41).backward()  # type: ignore[attr-defined]
    params = inner.param_groups[0]["params"]
    before, steps = [p.clone() for p in params], opt.step_count
    with opt.averaged(), pytest.raises(selftune.ConfigError, match="inside an averaged"):
        opt.step()
    assert opt.step_count == steps
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert opt.unwrap() is inner and inner.param_groups[0]["lr"] == found
    for _ in range(40):
        sched.step()  # StepLR multiplies the rate it finds: it goes on from the one found
    assert inner.param_groups[0]["lr"] == pytest.approx(found / 2)
    with pytest.raises(selftune.ConfigError, match="after unwrap"), opt.averaged():
        pass  # an average stopped 40 steps ago, served as if current


def test_inside_averaged_a_load_or_a_group_is_refused_and_a_block_inside_is_the_outer() -> None:
    """The block's end put the training weights back over a state loaded inside it; a group
    added there was snapshotted with the average as its weights; an evaluate() with a block of
    its own ended the outer one's protections (a step inside was taken and thrown away)."""
    inner, pr = _sgd(lr=0.002)
    opt = selftune.wrap(inner, average=True)
    _steps(pr, opt, range(1, 21))
    saved, extra = opt.state_dict(), torch.nn.Parameter(torch.zeros(3))
    with opt.averaged():
        with pytest.raises(selftune.ConfigError, match="loading a state inside an averaged"):
            opt.load_state_dict(saved)
        with pytest.raises(selftune.ConfigError, match="a param group added inside an averaged"):
            opt.add_param_group({"params": [extra]})
        with opt.averaged():
            pass
        assert opt.training_weights(), "the inner block's end cleared the outer one's"
        with pytest.raises(selftune.ConfigError, match="inside an averaged"):
            opt.step()
    assert len(opt.param_groups) == 1 and opt.step_count == 20


def test_a_frozen_rate_is_never_restarted_from_the_first_snapshot() -> None:
    """With the rate frozen no probe moved it, yet auto's range test restarted the run from its
    first snapshot at the same rate, throwing the steps since away."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    opt = selftune.wrap(torch.optim.Adam(model.parameters(), lr=0.3), frozen={"lr", "beta2"})
    events: list[str] = []
    opt.add_listener(lambda e: events.append(e.guard["event"]) if e.guard else None)
    x = torch.randn(256, 8)
    y = (x[:, :4] @ torch.randn(4, 3)).argmax(1)
    for _ in range(60):
        i = torch.randint(0, 256, (32,))
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    assert "restart" not in events


def test_lr_bounds_absolute_without_bounds_is_refused() -> None:
    """The default factors (1e-3, 1e5) read as rates: a start of 1e-4 was its own floor, and no
    rollback could cut it."""
    with pytest.raises(selftune.ConfigError, match=r"needs bounds=\{\"lr\""):
        selftune.wrap(_sgd()[0], lr_bounds_absolute=True)
    for policy in (  # a Policy built by hand for SelfTuned passed with them as the rates
        lambda: selftune.Policy(lr_bounds_absolute=True),
        lambda: selftune.Policy(bounds={"momentum": (0.5, 0.9)}, lr_bounds_absolute=True),
    ):
        with pytest.raises(selftune.ConfigError, match=r"needs bounds=\{\"lr\""):
            policy()
    assert selftune.Policy().bounds == selftune.Policy.build().bounds == DEFAULT_BOUNDS


def test_a_rollback_restores_a_momentum_the_user_set_outside_the_bounds() -> None:
    """A beta1 of 0.3 (below the default floor) that hypergradient moved went back to the
    floor, 0.5, on a rollback: a value the run never had at the restored weights."""
    pr = noisy_quadratic(seed=1)
    opt = selftune.wrap(torch.optim.Adam(pr.model.parameters(), lr=3e-3, betas=(0.3, 0.999)),
                        "hypergradient")  # fmt: skip
    _steps(pr, opt, range(1, 22))  # before the second snapshot: a rollback goes to step 1's
    assert opt.hyperparams()[0]["beta1"] > 0.5
    opt.zero_grad()
    pr.batch_loss(22).backward()  # type: ignore[attr-defined]
    opt.step(loss=float("nan"))
    assert opt.hyperparams()[0]["beta1"] == 0.3


def test_a_rollback_keeps_the_decay_a_scheduler_made_since_its_snapshot() -> None:
    """The rollback restores the snapshot's weights and selftune's scale (backed off) on the
    rate the scheduler has set since: put back from before a chained scheduler's decay, the
    rate stayed 10x too high for the rest of the run."""
    inner, pr = _sgd(lr=0.01)
    opt = selftune.wrap(inner, "off")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    events = []
    opt.add_listener(lambda e: events.append(e.guard) if e.guard else None)
    _steps(pr, opt, range(1, 61), nan_at=35, after=sched.step)  # the snapshot: at 25
    assert [(e["event"], e["restored_step"]) for e in events] == [("rollback", 25)]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) == sched.get_last_lr()[0]
    assert opt.hyperparams()[0]["lr"] == pytest.approx(0.5e-4)


def test_a_second_rollback_before_a_training_step_keeps_the_first_one_s_cap() -> None:
    """Trouble again at the step after a rollback: the rate that failed was read before the
    first rollback's cap had been applied (no step had trained), from the rate LambdaLR had
    written back under the rollback's scale, and the run stepped on above two backoffs of the
    rate that failed first."""
    inner, pr = _sgd(lr=0.05)
    stepped: list[float] = []
    inner.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))
    opt = selftune.wrap(inner, "auto")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    bases: list[float] = []
    for t in range(1, 61):
        bases.append(opt.param_groups[0]["lr"])
        _steps(pr, opt, range(t, t + 1), nan_at=45 if t == 45 else 46)
        sched.step()
    failed = stepped[43] * bases[44] / bases[43]  # the rate of step 45
    for k, rate in enumerate(stepped[44:54]):  # steps 47 to 56
        assert rate <= 0.25 * failed * bases[46 + k] / bases[44] * (1 + 1e-9), (47 + k, rate)


def test_auto_holds_a_warmup_that_rises_past_the_step_limit_in_one_step() -> None:
    """LinearLR from a thousandth of the rate over 5 steps rises 200x in its first: the hold,
    a controller proposal, was clipped to a quarter of that by the per-step limit, and the
    run stepped at the rest of the rise.  Held, the rate moves as the range test grows it."""
    inner, pr = _sgd(lr=0.05)
    stepped: list[float] = []
    inner.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))
    opt = selftune.wrap(inner, "auto")
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.001, total_iters=5)
    _steps(pr, opt, range(1, 13), after=sched.step)
    ratios = [b / a for a, b in itertools.pairwise(stepped)]
    assert max(ratios) <= opt.controller.ramp * (1 + 1e-9), ratios


@pytest.mark.parametrize("controller", ["off", "auto"])
def test_a_rollback_under_a_closed_form_warmup_stays_below_the_rate_that_failed(
    controller: str,
) -> None:
    """A rollback lowers the base rate to its snapshot's and sets the scale on it; LambdaLR
    writes its own rate back at its next step, and the scale multiplied that: ``auto``, whose
    scale the warm-up's hold had cut since the snapshot, stepped on above half the rate that
    failed (and, after a rollback, stopped holding the rest of the warm-up).  Under ``off``
    the rate goes on at half the schedule's (a hold at the rate the rollback set, the
    snapshot's, cut it by the warm-up's rise for good).  A state dict saved between the
    rollback and the next step resumes to the same rates."""

    def run(resume_at: int | None = None) -> tuple[list[float], list[float], list[dict], list]:
        _, pr = _sgd()
        stepped: list[float] = []

        def wrap() -> tuple[selftune.SelfTuned, Any]:
            inner = torch.optim.SGD(pr.model.parameters(), lr=0.05, momentum=0.9)
            inner.register_step_pre_hook(lambda o, a, k: stepped.append(o.param_groups[0]["lr"]))
            opt = selftune.wrap(inner, controller)
            opt.add_listener(lambda e: events.append(e.guard) if e.guard else None)
            opt.add_listener(
                lambda e: held.extend(d.step for d in e.decisions if "held:" in d.reason)
            )
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

        events: list[dict] = []
        held: list[int] = []  # the steps where auto held a rise of the warm-up
        bases: list[float] = []
        opt, sched = wrap()
        for t in range(1, 91):
            bases.append(opt.param_groups[0]["lr"])
            _steps(pr, opt, range(t, t + 1), nan_at=45)
            sched.step()
            if t == resume_at:
                state, sched_state = opt.state_dict(), sched.state_dict()
                opt, sched = wrap()
                opt.load_state_dict(state)
                sched.load_state_dict(sched_state)
        return stepped, bases, events, held

    stepped, bases, events, held = run()
    assert [e["event"] for e in events] == ["rollback"]
    failed = stepped[43] * bases[44] / bases[43]  # the rate of step 45, whose update was not made
    after = stepped[44:54]  # steps 46 to 55
    for k, rate in enumerate(after):
        assert rate <= 0.5 * failed * bases[45 + k] / bases[44] * (1 + 1e-9), (46 + k, rate)
    if controller == "off":
        assert after == pytest.approx([0.5 * b for b in bases[45:55]], rel=1e-9)
    else:
        assert any(step > 46 for step in held), held
    assert run(resume_at=45)[0] == stepped


def test_a_restart_keeps_the_rate_a_warmup_has_reached() -> None:
    """``auto``'s restart restores its first snapshot's weights, not the base rate of that
    step: a chained warmup goes on from the rate it had reached, to the optimizer's own."""
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.8, momentum=0.9), "auto")
    restarts = []
    opt.add_listener(lambda e: restarts.append(e.step) if e.guard else None)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=40)
    for t in range(1, 61):
        batch = torch.Generator().manual_seed(100 + t)
        x = torch.randn(32, 6, generator=batch)
        loss = torch.nn.functional.mse_loss(model(x), torch.sin(x.sum(1, keepdim=True)))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        sched.step()
    assert restarts, "the range test did not restart: the test no longer covers the path"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)


def test_float64_parameters_are_measured_in_float64() -> None:
    """Norms of float64 tensors cannot be taken in float32 (torch refuses to narrow them): the
    second step, the first with a previous update, failed.  The loss keeps its digits."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64, generator=gen))
    x = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    opt = selftune.wrap(torch.optim.SGD([w], lr=0.01, momentum=0.9))
    for _ in range(5):
        opt.zero_grad()
        loss = (x @ w.T).pow(2).mean() + 1 / 3
        loss.backward()
        opt.step(loss=loss.detach())
        assert opt.last_signals is not None and opt.last_signals.loss == float(loss.detach())
    assert -1.0 <= opt.last_signals.groups[0].cos_update <= 1.0
    assert opt.last_signals.groups[0].update_norm > 0


def test_float16_parameters_under_an_eps_that_rounds_to_zero_are_warned_of_at_wrap() -> None:
    """float16 AdamW at eps=1e-8 turns its weights non-finite at any rate (its moments are
    float16 and the eps is zero there), so the guard cuts the rate in vain: wrap says so, where
    the user wrapped, and the guard's last error names the cut that did not help."""

    def wrap_here(inner: torch.optim.Optimizer) -> tuple[selftune.SelfTuned, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = selftune.wrap(inner, "off")
        return opt, [str(w.message) for w in caught if w.filename == __file__]

    def run(eps: float) -> tuple[list[str], BaseException | None]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        ).half()
        x = torch.randn(64, 8, dtype=torch.float16)
        y = (x.sum(1, keepdim=True) > 0).half()
        opt, messages = wrap_here(torch.optim.AdamW(model.parameters(), eps=eps))
        try:
            for _ in range(30):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step(loss=loss.detach())
        except selftune.GuardError as err:
            return messages, err
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return messages, None

    messages, error = run(1e-8)
    assert len(messages) == 1 and "eps=1e-08 is zero in float16" in messages[0], messages
    assert "eps=1e-4" in messages[0] and "of its parameters" in messages[0]
    assert isinstance(error, selftune.GuardError) and "x the rate its snapshot held" in str(error)
    assert run(1e-4) == ([], None)  # an eps float16 holds: no warning, and it trains
    half = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    assert wrap_here(torch.optim.AdamW(half, fused=True))[1] == []  # fused: float32 inside


def test_float16_parameters_added_under_an_eps_that_rounds_to_zero_are_warned_of() -> None:
    """A group of float16 parameters added mid-run (a half-precision body unfrozen) under the
    optimizer's eps=1e-8 steps to non-finite weights as one given at wrap does: wrap warned,
    add_param_group said nothing, and the guard cut the rate in vain."""
    body = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]
    opt = selftune.wrap(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]), "off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.add_param_group({"params": body})
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})  # float32: none
    messages = [str(w.message) for w in caught if w.filename == __file__]
    assert len(messages) == 1 and messages[0].startswith("param group 1: eps=1e-08 is zero in")


def test_float16_gradients_of_finite_entries_past_its_largest_number_are_read_finite() -> None:
    """float16's largest number is 65504: a gradient of 4096 entries of 2048 has a norm of
    131072, which a norm taken in float16 made infinite, so the guard rolled a sound run of
    plain SGD back six times and raised ``GuardError``; the momentum buffer's inner product
    with it overflowed too, and ``hypergradient`` left the momentum where it stood.  Norms and
    products of narrow tensors are accumulated in float32."""

    def run(controller: str) -> tuple[selftune.SelfTuned, torch.Tensor]:
        w = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.float16))
        inner = torch.optim.SGD([w], lr=1e-6, momentum=0.9)
        opt = selftune.wrap(inner, controller) if controller else inner
        for _ in range(8):
            loss = (w.float() * 2048).sum()  # every entry's gradient is 2048, in float16
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach()) if controller else opt.step()
        return opt, w.detach()  # type: ignore[return-value]

    plain = run("")[1]
    off, weights = run("off")
    assert torch.equal(weights, plain)  # no rollback: the run is plain SGD's
    assert off.last_signals.groups[0].grad_norm == 2048 * 64
    tuned = run("hypergradient")[0]
    assert tuned.last_signals.groups[0].cos_buffer == pytest.approx(1.0)
    assert tuned.hyperparams()[0]["momentum"] != 0.9


def test_a_scheduler_at_zero_holds_the_rate_there_and_a_rollback_survives_it() -> None:
    """A warm-up from zero, a decay to zero: the rate is the scheduler's to hold at zero, and no
    decision divides by it (a ZeroDivisionError in every controller's step at the zero, and in
    a rollback to a snapshot taken there)."""
    for controller in selftune.CONTROLLERS:
        inner, pr = _sgd(lr=0.01)
        opt = selftune.wrap(inner, controller)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s == 0 else 1.0)
        _steps(pr, opt, range(1, 41), nan_at=12, after=sched.step)  # back to step 1's
        assert opt.param_groups[0]["lr"] == 0.01 and opt.hyperparams()[0]["lr"] > 0
        decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, end_factor=0.0, total_iters=5)
        _steps(pr, opt, range(41, 51), after=decay.step)
        assert opt.param_groups[0]["lr"] == 0.0 == opt.hyperparams()[0]["lr"]


@pytest.mark.parametrize("controller", ["off", "hypergradient"])
def test_a_scheduler_that_decays_below_the_floor_is_not_pushed_back_up(controller: str) -> None:
    """A decay the user scheduled below the floor (``1e-3`` of the start) is the user's rate, as
    a start outside the bounds is: a bound stops a move of selftune's, it never makes one.  The
    floor raised the rate to itself: a rollback meant to halve the rate multiplied it by 100,
    and a controller lowering it by 1% held it 100x above the schedule."""
    inner, pr = _sgd(lr=0.01)
    opt = selftune.wrap(inner, controller)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, end_factor=1e-5, total_iters=80)
    decisions: list[selftune.Decision] = []
    events: list[str] = []
    opt.add_listener(lambda e: decisions.extend(d for d in e.decisions if d.knob == "lr"))
    opt.add_listener(lambda e: events.append(e.guard["event"]) if e.guard else None)
    _steps(pr, opt, range(1, 101), nan_at=95, after=sched.step)
    assert events == ["rollback"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7)  # the schedule's, below 1e-5
    late = [d for d in decisions if d.step > 80]  # the base rate at 1e-7 all along
    for d in late:  # none raised the rate past the controller's step limit: none went 100x
        assert d.new <= 4 * d.old, (d.step, d.old, d.new, d.reason)
        assert d.source == "controller" or d.new <= d.old, (d.step, d.old, d.new, d.reason)
    assert bool(late) == (controller != "off"), "the test no longer covers the path"
    assert opt.hyperparams()[0]["lr"] < 1e-5
    if controller == "off":  # the floor held the halving back, and kept the schedule's rate
        assert opt.hyperparams()[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("controller", ["stability", "hypergradient"])
def test_a_rising_scheduler_is_held_to_the_upper_bound_and_replays(
    controller: str, tmp_path: Path
) -> None:
    """A scale raised under a warm-up composed with the rates the warm-up went on to set: the
    optimizer stepped above the bound the user gave, for most of the run.  The cut that holds
    it is logged, and a replay makes it again."""
    cap = 0.01

    def run(make: Callable[[torch.optim.Optimizer], selftune.SelfTuned]) -> list[float]:
        inner, pr = _sgd(lr=cap)
        applied: list[float] = []
        inner.register_step_pre_hook(lambda o, a, k: applied.append(o.param_groups[0]["lr"]))
        opt = make(inner)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=100)
        _steps(pr, opt, range(1, 151), after=sched.step)
        opt.close()
        return [*applied, *(p.detach().clone() for p in inner.param_groups[0]["params"])]

    bounds = {"lr": (1e-5, cap)}
    kw: dict[str, Any] = {"bounds": bounds, "lr_bounds_absolute": True, "guard": False}
    logged = run(lambda o: selftune.wrap(o, controller, log_dir=tmp_path, **kw))
    rates, weights = logged[:150], logged[150:]
    assert max(rates) <= cap * (1 + 1e-15), [r for r in rates if r > cap][:5]
    cuts = [
        r
        for r in audit.read_log(tmp_path).records
        if r["kind"] == "decision" and r["source"] == "bound"
    ]
    assert cuts, "the scale never rose above 1 under the warm-up: the test covers nothing"
    assert all(c["old"] > cap and c["new"] <= cap * (1 + 1e-15) for c in cuts), cuts
    replayed = run(lambda o: selftune.replay(o, tmp_path))
    assert replayed[:150] == rates
    assert all(torch.equal(a, b) for a, b in zip(weights, replayed[150:], strict=True))


class _Push:
    """A controller that pushes one knob by ``delta`` at every step."""

    name = "push"
    reads_buffer = False

    def __init__(self, knob: str, delta: float) -> None:
        self.knob, self.delta = knob, delta

    def propose(self, signals: Any, knobs: Any) -> list[Any]:
        value = knobs[0][self.knob] + self.delta
        return [selftune.controllers.Proposal(0, self.knob, value, "push")]

    def on_backoff(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize(
    ("make", "knob", "delta", "bound"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3), "beta1", -0.02, 0.5),
        (lambda p: torch.optim.SGD(p, lr=2.0, momentum=0.9), "momentum", 0.02, 0.995),
    ],
)
def test_a_knob_other_than_the_rate_is_held_to_its_own_bounds(
    make: Any, knob: str, delta: float, bound: float
) -> None:
    """Not to bounds widened to the starting *rate*: beta1 went down to Adam's 1e-3, momentum up
    to SGD's 2.0."""
    pr = noisy_quadratic(seed=1)
    opt = selftune.wrap(make(pr.model.parameters()), _Push(knob, delta), guard=False)
    _steps(pr, opt, range(1, 61))
    assert opt.hyperparams()[0][knob] == pytest.approx(bound)


def test_the_knobs_are_those_the_group_came_with() -> None:
    """Adam with beta1 = 0 keeps no first moment and SGD with momentum 0 no buffer: neither is
    switched on; and a momentum pushed down to its floor of zero stays a knob (it vanished from
    the knobs, and no later proposal could raise it again)."""
    pr = noisy_quadratic(seed=1)
    adam = torch.optim.Adam(pr.model.parameters(), lr=1e-3, betas=(0.0, 0.99))
    assert list(selftune.wrap(adam, "hypergradient").hyperparams()[0]) == ["lr", "beta2"]
    pr = noisy_quadratic(seed=1)
    sgd = torch.optim.SGD(pr.model.parameters(), lr=0.01, momentum=0.1)
    opt = selftune.wrap(sgd, _Push("momentum", -0.1), guard=False)
    _steps(pr, opt, range(1, 7))  # at +-0.02 a step, down from 0.1
    assert opt.hyperparams()[0]["momentum"] == 0.0
    opt.controller.delta = 0.05  # type: ignore[attr-defined]
    _steps(pr, opt, range(7, 13))
    assert opt.hyperparams()[0]["momentum"] == pytest.approx(0.12)


def test_a_warm_up_built_before_the_wrap_starts_from_the_rate_it_was_given() -> None:
    """A scheduler built first (Lightning's configure_optimizers, the Trainer's warm-up) may
    have written zero into ``lr`` already: the wrap accepts it, and bounds the rate by the
    ``initial_lr`` the scheduler recorded, not by that zero."""
    inner, pr = _sgd(lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: min(1.0, s / 5))
    assert inner.param_groups[0]["lr"] == 0.0
    down = _Proposes([Proposal(0, "lr", 1e-12, "down")])  # below any bound
    opt = selftune.wrap(inner, down, guard=False)
    _steps(pr, opt, range(1, 61), after=sched.step)
    floor, _ = opt.policy.limits("lr", 0.01)
    assert floor > 0 and opt.hyperparams()[0]["lr"] == pytest.approx(floor)


@pytest.mark.parametrize("scheduler", ["one_cycle", "cyclic"])
def test_a_scheduler_built_after_the_wrap_bounds_the_rate_as_one_built_before(
    scheduler: str,
) -> None:
    """OneCycleLR and CyclicLR set the rate they start from (``max_lr / div_factor``,
    ``base_lr``) when built, over the optimizer's own: built after the wrap, the bounds were
    factors of the rate the optimizer was given, 2.5x and 10x off those of the same script
    with the scheduler built first.  The start is read at the first step, in either order."""

    def run(first: bool) -> tuple[float, list[float]]:
        inner, pr = _sgd(lr=0.01)

        def build(o: torch.optim.Optimizer) -> Any:
            if scheduler == "one_cycle":
                return torch.optim.lr_scheduler.OneCycleLR(
                    o, max_lr=0.1, total_steps=100, cycle_momentum=False
                )
            return torch.optim.lr_scheduler.CyclicLR(
                o, base_lr=1e-3, max_lr=1e-2, step_size_up=10, cycle_momentum=False
            )

        sched = build(inner) if first else None
        opt = selftune.wrap(inner, _Push("lr", 1.0), bounds={"lr": (0.1, 10.0)}, guard=False)
        sched = sched or build(opt)
        rates: list[float] = []

        def after() -> None:
            sched.step()
            rates.append(opt.hyperparams()[0]["lr"])

        _steps(pr, opt, range(1, 41), after=after)
        return opt.state_dict()["selftune"]["start"][0], rates

    (start, rates), (start_after, rates_after) = run(first=True), run(first=False)
    assert start == (0.004 if scheduler == "one_cycle" else 1e-3)
    # the push holds the rate at its bound: the same bound, the same rates, in either order
    assert start_after == start and rates_after == rates


def test_a_tensor_rate_is_written_in_place_and_logged_as_stepped() -> None:
    """The rate ``hyperparams()`` (and so the log) gave, and the one ``unwrap`` handed over,
    were the float64 product of the base rate and the scale, which could be a float32 ulp off
    the rate the step's ``mul_`` made."""
    pr = noisy_quadratic(seed=1)
    inner = torch.optim.Adam(pr.model.parameters(), lr=torch.tensor(1e-3))
    stepped: list[float] = []
    inner.register_step_pre_hook(lambda o, a, k: stepped.append(float(o.param_groups[0]["lr"])))
    opt = selftune.wrap(inner)
    logged: list[float] = []
    opt.add_listener(lambda e: logged.append(e.hyperparams[0]["lr"]))
    lr = opt.param_groups[0]["lr"]
    start = lr.clone()
    train(pr, opt, 60)
    # the same tensor, holding the user's rate again after every step (compile sees no new input)
    assert opt.param_groups[0]["lr"] is lr and torch.equal(lr, start)
    assert len(set(stepped)) > 10, "the effective rate barely moved"
    assert logged == stepped
    assert float(opt.unwrap().param_groups[0]["lr"]) == stepped[-1]


@pytest.mark.parametrize(
    ("dtype", "bounds", "warned"),
    [
        (torch.float32, None, False),  # the default floor: a thousandth of the start, 1e-6
        (torch.float32, {"lr": (1e-9, 1e5)}, False),  # 1e-12, which float32 holds to 7 digits
        (torch.float32, {"lr": (1e-40, 1e5)}, True),  # 1e-43: subnormal, three digits
        (torch.float16, None, True),  # 1e-6: below float16's normal numbers (6.1e-5)
        (None, {"lr": (1e-40, 1e5)}, False),  # a float is a double
    ],
)
def test_a_tensor_rate_whose_dtype_cannot_hold_the_floor_is_warned_of_once(
    dtype: torch.dtype | None, bounds: dict[str, tuple[float, float]] | None, warned: bool
) -> None:
    """selftune writes and scales a tensor rate in place at the tensor's dtype: where the
    bounds let it lower the rate below that dtype's normal numbers, the step's rate kept fewer
    digits than the one decided, or was zero, with no word.  It is said once, at the first step
    (and for a group added later, of that group), where the bounds allow such a rate."""
    pr = noisy_quadratic(seed=1)
    lr: float | torch.Tensor = 1e-3 if dtype is None else torch.tensor(1e-3, dtype=dtype)
    opt = selftune.wrap(torch.optim.SGD(pr.model.parameters(), lr=lr), bounds=bounds)
    added = torch.nn.Parameter(torch.zeros(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(pr, opt, 3)
        opt.add_param_group({"params": [added], "lr": lr if dtype is None else lr.clone()})
        train(pr, opt, 2)
    said = [str(w.message) for w in caught if "held to full precision" in str(w.message)]
    if not warned:
        assert said == []
        return
    assert [s.split(":")[0] for s in said] == ["param group 0", "param group 1"]
    assert f"lr is a {dtype} tensor" in said[0] and "bounds={'lr': (low, high)}" in said[0]


def test_a_tensor_knob_that_cannot_hold_a_tuned_value_is_refused_by_name() -> None:
    """torch takes ``lr=torch.tensor(1)``: the first step failed inside the step's scaling of
    the rate ("result type Float can't be cast to the desired output type Long"), leaving the
    wrapper broken; a rate written into it would have been cut to a whole number (0.5 to 0).
    A rate of two entries, which ``add_param_group`` takes, failed in ``item()``."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(selftune.ConfigError, match=r"param group 0: lr is a torch.int64 tensor"):
        selftune.wrap(torch.optim.SGD(params[:1], lr=torch.tensor(1)))
    opt = selftune.wrap(torch.optim.Adam(params[:1], lr=torch.tensor(0.01)))
    betas = (torch.tensor(0.9), torch.tensor(True))
    with pytest.raises(selftune.ConfigError, match=r"param group 1: beta2 is a torch.bool tensor"):
        opt.add_param_group({"params": params[1:], "betas": betas})
    with pytest.raises(selftune.ConfigError, match=r"param group 1: lr is a .* of shape \(2,\)"):
        opt.add_param_group({"params": params[1:], "lr": torch.tensor([0.01, 0.02])})
    opt.add_param_group({"params": params[1:], "lr": torch.tensor([0.02])})  # one entry: taken
    params[0].grad, params[1].grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert len(opt.hyperparams()) == 2


def _tensor_knob_run(shared: bool, how: str) -> tuple[Any, ...]:
    """Adam on two groups with tensor knobs, given once as the optimizer's defaults (which
    torch hands every group as the same tensor objects) or to each group as its own; ``how``
    the groups get there: at the wrap, with a load mid-run of the state dict of a plain Adam
    built the same way ("resume"), or the second added mid-run ("add")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    parts = [list(model[0].parameters()), list(model[2].parameters())]
    knobs = {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), torch.tensor(0.999))}

    def group(params: list[torch.Tensor]) -> dict[str, Any]:
        return {"params": params} if shared else {"params": params, **_copy(knobs)}

    def adam(n: int = 2) -> torch.optim.Optimizer:
        return torch.optim.Adam([group(p) for p in parts[:n]], **_copy(knobs))

    opt = selftune.wrap(adam(1 if how == "add" else 2), "hypergradient")
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for t in range(1, 41):
        if how == "add" and t == 11:
            opt.add_param_group(group(parts[1]))
        if how == "resume" and t == 21:  # torch's load deep-copies the groups as one
            opt.load_state_dict(adam().state_dict())
        loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if t == 30 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    rates = [float(g["lr"]) for g in opt.param_groups]
    return rates, opt.hyperparams(), [p.detach().clone() for p in model.parameters()]


def _copy(knobs: dict[str, Any]) -> dict[str, Any]:
    """Tensor knobs (and pairs of them) copied: a group's own."""
    return {
        k: tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()
        for k, v in knobs.items()
    }


@pytest.mark.parametrize("how", ["wrap", "resume", "add"])
def test_tensor_knobs_shared_by_the_groups_are_tuned_per_group(how: str) -> None:
    """An optimizer given ``lr=torch.tensor(...)`` (the way to compile its step) hands every
    group that one tensor.  Each group's scale was applied to it in place in turn, so every
    group stepped at the product of all the scales, and the user's rate came back as the first
    scale times itself: after 40 steps it was 1e-8, not 0.01.  A group's beta1 moved every
    group's."""
    rates, knobs, weights = _tensor_knob_run(shared=True, how=how)
    own_rates, own_knobs, own_weights = _tensor_knob_run(shared=False, how=how)
    assert rates == own_rates == [pytest.approx(0.01)] * 2
    assert knobs == own_knobs and knobs[0]["beta1"] != knobs[1]["beta1"]
    assert all(torch.equal(a, b) for a, b in zip(weights, own_weights, strict=True))


def test_each_param_group_is_tuned_on_its_own() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    groups = [
        {"params": model[0].parameters(), "lr": 1e-4},
        {"params": model[2].parameters(), "lr": 1e-1},
    ]
    opt = selftune.wrap(torch.optim.SGD(groups, momentum=0.9))
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    for _ in range(80):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    first, second = (g["lr"] for g in opt.hyperparams())
    assert first / 1e-4 != pytest.approx(second / 1e-1), "both groups moved by the same factor"


@pytest.mark.parametrize("controller", ["auto", "hypergradient"])
@pytest.mark.parametrize(
    "make",
    [
        lambda p, **kw: torch.optim.SGD(p, lr=0.003, momentum=0.9, **kw),
        lambda p, **kw: torch.optim.Adam(p, lr=0.003, **kw),
    ],
    ids=["sgd", "adam"],
)
def test_maximize_is_tuned_as_the_descent_it_mirrors(controller: str, make: Any) -> None:
    """``maximize=True`` ascends the gradient it is given: ascending ``-loss`` is descending
    ``loss`` step for step, and must be tuned the same.  The update was read against the raw
    gradient, so every step looked like an overshoot (cosine -1) and ``auto`` drove the rate
    to its floor, 1000x below the start, where the run stalled."""
    runs = []
    for maximize in (False, True):
        pr = noisy_quadratic(seed=1)
        opt = selftune.wrap(make(pr.model.parameters(), maximize=maximize), controller)
        for t in range(1, 81):
            loss = pr.batch_loss(t)
            opt.zero_grad()
            (-loss if maximize else loss).backward()
            opt.step(loss=loss.detach())  # the loss the ascent lowers
        assert opt.last_signals is not None
        runs.append((opt.hyperparams(), opt.last_signals.groups[0], pr.full_loss()))
    assert runs[1] == runs[0]
    assert runs[0][0][0]["lr"] != pytest.approx(0.003), "the rate never moved"


@pytest.mark.parametrize("controller", ["auto", "hypergradient"])
@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.003, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.003),
    ],
    ids=["sgd", "adam"],
)
def test_complex_parameters_are_tuned_as_their_real_pairs(controller: str, make: Any) -> None:
    """torch's optimizers step a complex parameter as the real pairs of its entries: a complex
    least-squares fit and the same fit written over those pairs are one run, and must be tuned
    as one.  The alignments summed the products of the complex entries (Re Σ a·b, not
    Re Σ conj(a)·b): steps along the gradient read as reversals, and ``auto`` cut the rate to
    its floor."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.cfloat, generator=gen)
    y = x @ torch.randn(8, dtype=torch.cfloat, generator=gen)
    start = torch.randn(8, dtype=torch.cfloat, generator=gen)
    runs = []
    for as_pairs in (False, True):
        w = torch.nn.Parameter(torch.view_as_real(start).clone() if as_pairs else start.clone())
        opt = selftune.wrap(make([w]), controller)
        for t in range(80):
            rows = torch.arange(8 * (t % 8), 8 * (t % 8 + 1))
            weights = torch.view_as_complex(w) if as_pairs else w
            loss = (x[rows] @ weights - y[rows]).abs().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
        assert opt.last_signals is not None
        g = opt.last_signals.groups[0]
        knobs = opt.hyperparams()[0]
        runs.append([*knobs.values(), g.grad_norm, g.update_norm, g.cos_update, g.cos_buffer])
    # a complex norm is not summed in the order of its pairs' norm: equal to float32's digits
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, nan_ok=True)
    assert runs[0][0] > 0.003, "the rate never rose on a clean descent"


def test_step_without_a_loss_tunes_on_gradients_alone() -> None:
    inner, pr = _sgd(lr=2e-5)
    opt = selftune.wrap(inner)
    curve = train(pr, opt, 200, pass_loss=False)  # type: ignore[arg-type]
    assert all(math.isfinite(v) for v in opt.hyperparams()[0].values())
    assert opt.hyperparams()[0]["lr"] > 2e-5 and curve[-1] < curve[0]


def test_a_closure_supplies_the_loss() -> None:
    inner, pr = _sgd()
    opt = selftune.wrap(inner)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = pr.batch_loss(0)  # type: ignore[attr-defined]
        loss.backward()
        return loss

    for _ in range(30):
        opt.step(closure)
    assert opt.last_signals is not None and opt.last_signals.loss is not None


def test_step_returns_what_the_closure_returned_as_torch_s_optimizers_do() -> None:
    """``step(closure)`` returns the closure's result, as torch's optimizers do: given the loss
    by name too, it returned that loss, and a one-element NumPy array came back as a float.
    A step the guard skipped returns it too; one without a closure returns None."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    plain = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def closure(returned: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
        def run() -> Any:
            opt.zero_grad()
            loss = pr.batch_loss(opt.step_count)  # type: ignore[attr-defined]
            loss.backward()
            results.append(returned(loss))
            return results[-1]

        return run

    results: list[Any] = []
    for returned, by_name in (
        (lambda loss: loss, None),
        (lambda loss: (loss, "outputs"), torch.tensor(1.0)),
        (lambda loss: np.array([loss.item()]), None),
        (lambda loss: torch.tensor(math.nan), None),  # the guard skips the step
    ):
        assert opt.step(closure(returned), loss=by_name) is results[-1]
        assert plain.step(closure(returned)) is results[-1]
    assert opt.step_count == 4
    pr.batch_loss(0).backward()  # type: ignore[attr-defined]
    assert opt.step(loss=torch.tensor(1.0)) is None is plain.step()


def test_a_closure_that_returns_no_one_number_is_refused_naming_the_closure() -> None:
    """What a closure returns is read as the loss: one that returned its loss with its
    outputs, or unreduced, was refused as ``step(loss=...)``, which the loop never passed."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    before = [p.detach().clone() for p in pr.model.parameters()]  # type: ignore[attr-defined]

    def closure(returned: Callable[[torch.Tensor], Any]) -> Callable[[], Any]:
        def run() -> Any:
            opt.zero_grad()
            loss = pr.batch_loss(0)  # type: ignore[attr-defined]
            loss.backward()
            return returned(loss)

        return run

    for returned, match in (
        (lambda loss: (loss, None), r"got tuple \(or pass the loss by name"),
        (lambda loss: loss.expand(3), r"got a tensor of shape \(3,\)"),
    ):
        with pytest.raises(selftune.ConfigError, match=r"step\(closure\) reads what the closure"):
            opt.step(closure(returned))
        with pytest.raises(selftune.ConfigError, match=match):
            opt.step(closure(returned))
    params = pr.model.parameters()  # type: ignore[attr-defined]
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # nothing moved
    opt.step(closure(lambda loss: (loss, None)), loss=pr.batch_loss(0).detach())  # type: ignore[attr-defined]
    assert opt.step_count == 1


def test_a_loss_passed_where_a_closure_goes_is_refused_by_name() -> None:
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    loss = pr.batch_loss(0)  # type: ignore[attr-defined]
    loss.backward()
    with pytest.raises(selftune.ConfigError, match=r"got a Tensor .* step\(loss=loss\)"):
        opt.step(loss)  # type: ignore[arg-type]
    assert opt.step_count == 0


def test_frozen_knobs_do_not_move_and_clipped_decisions_say_so() -> None:
    inner, pr = _sgd(lr=2e-5)
    opt = selftune.wrap(inner, "hypergradient", frozen={"momentum"}, max_change={"lr": 1.01})
    reasons: list[str] = []
    opt.add_listener(lambda e: reasons.extend(d.reason for d in e.decisions))
    train(pr, opt, 100)  # type: ignore[arg-type]
    assert opt.hyperparams()[0]["momentum"] == 0.9
    assert any("clipped" in r for r in reasons)


class _RestartsAt(OffController):
    """Asks at step ``at`` to restart from the first snapshot with a quarter of every knob."""

    name = "restarts"

    def __init__(self, at: int) -> None:
        self.at, self.t = at, 0

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        self.t = signals.step
        if signals.step != self.at:
            return []
        return [Proposal(0, k, v / 4, "test") for k, v in knobs[0].items()]

    def take_restart(self) -> str | None:
        return "a test restart" if self.t == self.at else None


def test_a_restart_moves_no_frozen_knob() -> None:
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _RestartsAt(10), frozen={"lr"})
    events: list[Any] = []
    opt.add_listener(events.append)
    train(pr, opt, 20)  # type: ignore[arg-type]
    assert any(e.guard and e.guard["event"] == "restart" for e in events)
    assert opt.hyperparams()[0] == {"lr": 0.002, "momentum": 0.9 / 4}  # momentum was free


class _RestartsWithNoWords(_RestartsAt):
    """Asks to restart with a number where the reason in words goes."""

    def take_restart(self) -> Any:
        return 5 if self.t == self.at else None


def test_a_restart_asked_for_without_a_reason_in_words_is_refused_and_its_step_taken_without_it(
    tmp_path: Path,
) -> None:
    """The log refused the restart's record after the restart was made, with a LogError that
    left the run broken part-way.  The step is taken at the knobs in force, without the
    controller's proposals or its restart, and the run goes on."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _RestartsWithNoWords(10), log_dir=tmp_path / "r")
    train(pr, opt, 9)  # type: ignore[arg-type]
    words = r"take_restart\(\) returned 5; return .* a str"
    with pytest.raises(selftune.ControllerError, match=words):
        train(pr, opt, 1)  # type: ignore[arg-type]
    assert opt.step_count == 10 and opt.hyperparams() == [{"lr": 0.002, "momentum": 0.9}]
    train(pr, opt, 2)  # type: ignore[arg-type]
    opt.close()
    assert opt.step_count == 12
    audit.verify(tmp_path / "r")
    assert not [r for r in audit.read_log(tmp_path / "r").records if r["kind"] == "guard"]


class _Halves(OffController):
    """Proposes half the rate at every step."""

    name = "halves"

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        return [Proposal(0, "lr", knobs[0]["lr"] / 2, "test")]


class _Proposes(OffController):
    """Proposes what it is given, at every step."""

    name = "mine"

    def __init__(self, proposals: Any) -> None:
        self.proposals = proposals

    def propose(self, signals: Any, knobs: Any) -> Any:
        return self.proposals


@pytest.mark.parametrize(
    ("proposals", "words"),
    [
        (None, "propose\\(\\) returned NoneType; return a list"),
        ([("lr", 0.1)], "returned a tuple in its list"),
        ([Proposal(1, "lr", 0.1, "")], "group 1, and the optimizer has param groups 0 to 0"),
        ([Proposal(-1, "lr", 0.1, "")], "group -1"),
        ([Proposal(0, "beta1", 0.5, "")], "knob 'beta1' of group 0, whose knobs are"),
        ([Proposal(0, "lr", torch.tensor(0.1), "")], "lr=tensor\\(0.1000\\) .* a finite float"),
        ([Proposal(0, "lr", math.nan, "")], "lr=nan"),
        ([Proposal(0, "lr", 0.1, {"why": "up"})], "gave the reason \\{'why': 'up'\\}; .* a str"),
        ([Proposal(0, "lr", 1e6, "up", raw=True)], "raw=True, which only replay sets"),
        ([Proposal(0, "lr", -0.001, "")], "lr=-0.001 for group 0, a negative rate"),
        ([Proposal(0, "lr", -math.inf, "")], "lr=-inf"),
    ],
)
def test_a_controllers_bad_proposal_is_refused_by_name_and_its_step_taken_without_it(
    proposals: Any, words: str, tmp_path: Path
) -> None:
    """A controller of one's own that erred failed deep inside the wrapper, applied group -1 to
    the last group (a log that then failed ``verify``), stored a tensor as the rate that the
    log refused after the weights had moved, or had a negative rate clipped to the bounds with
    no word.  The refusal came from inside the step, which then stood broken off: every later
    step was refused until a checkpoint loaded."""
    inner, pr = _sgd()
    plain, pp = _sgd()
    opt = selftune.wrap(inner, _Proposes(proposals), log_dir=tmp_path)
    with pytest.raises(selftune.ControllerError, match=words) as refused:
        train(pr, opt, 1)  # type: ignore[arg-type]
    assert isinstance(refused.value.__cause__, selftune.ConfigError)
    train(pp, plain, 1, pass_loss=False)  # the step as taken with no proposal
    assert opt.step_count == 1 and opt.hyperparams() == [{"lr": 0.002, "momentum": 0.9}]
    pairs = zip(inner.param_groups[0]["params"], plain.param_groups[0]["params"], strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    opt.controller.proposals = []  # type: ignore[attr-defined]
    train(pr, opt, 1)  # type: ignore[arg-type]
    opt.close()
    assert opt.step_count == 2
    audit.verify(tmp_path)


class _RaisesAt(OffController):
    """Lowers the rate by a tenth at every step, and raises at step ``at`` before proposing."""

    name = "raises"

    def __init__(self, at: int) -> None:
        self.at = at

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        if signals.step == self.at:
            raise ZeroDivisionError("no rate")
        return [Proposal(0, "lr", knobs[0]["lr"] * 0.9, "lower")]


def test_a_controller_that_raises_has_its_step_taken_without_it_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """An exception from a controller's propose left the step broken off: the wrapper refused
    every later step until a checkpoint loaded.  The step is taken at the knobs in force, its
    log records say why no decision was made there, and the run replays to the bit."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _RaisesAt(3), log_dir=tmp_path / "r")
    for t in range(1, 7):
        loss = pr.batch_loss(t)  # type: ignore[attr-defined]
        opt.zero_grad()
        loss.backward()
        if t != 3:
            opt.step(loss=loss.detach())
            continue
        knobs = opt.hyperparams()
        with pytest.raises(selftune.ControllerError, match=r"propose\(\) raised ZeroDiv") as e:
            opt.step(loss=loss.detach())
        assert "controller 'raises'" in str(e.value) and "Step 3 was taken" in str(e.value)
        assert isinstance(e.value.__cause__, ZeroDivisionError)
        assert opt.step_count == 3 and opt.hyperparams() == knobs
    opt.close()
    assert opt.step_count == 6
    assert opt.hyperparams()[0]["lr"] == pytest.approx(0.002 * 0.9**5)
    audit.verify(tmp_path / "r")
    records = audit.read_log(tmp_path / "r").records
    assert [r["step"] for r in records if r["kind"] == "decision"] == [1, 2, 4, 5, 6]
    (note,) = [r for r in records if r["kind"] == "note" and r.get("step") == 3]
    assert "propose() raised ZeroDivisionError: no rate" in note["reason"]
    again, pa = _sgd()
    replayed = selftune.replay(again, tmp_path / "r")
    train(pa, replayed, 6)  # type: ignore[arg-type]
    pairs = zip(pr.model.parameters(), pa.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_controllers_numpy_group_and_value_are_taken_as_plain_numbers(tmp_path: Path) -> None:
    """A group index or a value read off a numpy array: the index was refused as no group
    ('group np.int64(0), and the optimizer has param groups 0 to 0'), and a float32 value
    stopped the run with the log's TypeError (not JSON serializable)."""
    proposals = [
        Proposal(np.int64(0), "lr", np.float32(0.004), "numpy"),  # type: ignore[arg-type]
        Proposal(0, "momentum", np.float32(0.85), "numpy"),  # type: ignore[arg-type]
    ]
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _Proposes(proposals), log_dir=tmp_path / "r")
    train(pr, opt, 3)  # type: ignore[arg-type]
    opt.close()
    audit.verify(tmp_path / "r")
    assert opt.hyperparams()[0] == {
        "lr": float(np.float32(0.004)),
        "momentum": float(np.float32(0.85)),
    }
    again, pa = _sgd()
    replayed = selftune.replay(again, tmp_path / "r")
    train(pa, replayed, 3)  # type: ignore[arg-type]
    pairs = zip(pr.model.parameters(), pa.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)


class _ThereAndBack(OffController):
    """Moves the rate and the momentum twice in each of steps 3 and 4."""

    name = "there-and-back"

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        lr = knobs[0]["lr"]
        if signals.step == 3:  # there and back
            return [
                Proposal(0, "lr", 2 * lr, "x2"),
                Proposal(0, "momentum", 0.89, "shorter"),
                Proposal(0, "lr", lr, "back"),
                Proposal(0, "momentum", 0.91, "longer"),
            ]
        if signals.step == 4:  # 2x, then 8x: past the step's limit of 4x
            return [Proposal(0, "lr", 2 * lr, "x2"), Proposal(0, "lr", 8 * lr, "x8")]
        return []


def test_a_knob_proposed_twice_in_a_step_ends_at_the_second_and_logs_both(tmp_path: Path) -> None:
    """The second proposal was applied to the knob as the step found it: one back to that
    value was dropped with the first left standing (the rate stayed doubled), and one that
    moved was logged as moving from the step's value, not the one in force.  The policy's
    limit holds for the step, not for each proposal."""
    inner, pr = _sgd(lr=0.01)
    opt = selftune.wrap(inner, _ThereAndBack(), log_dir=tmp_path / "r", max_change={"lr": 4.0})
    rates: list[dict[str, float]] = []
    opt.add_listener(lambda e: rates.append(dict(e.hyperparams[0])))
    train(pr, opt, 4)  # type: ignore[arg-type]
    opt.close()
    assert rates[2] == pytest.approx({"lr": 0.01, "momentum": 0.91})
    assert rates[3]["lr"] == pytest.approx(0.04)
    changes = [
        (r["step"], r["knob"], float(f"{r['old']:.9g}"), float(f"{r['new']:.9g}"), r["reason"])
        for r in audit.read_log(tmp_path / "r").records
        if r["kind"] == "decision"
    ]
    assert changes == [
        (3, "lr", 0.01, 0.02, "x2"),
        (3, "momentum", 0.9, 0.89, "shorter"),
        (3, "lr", 0.02, 0.01, "back"),
        (3, "momentum", 0.89, 0.91, "longer"),
        (4, "lr", 0.01, 0.02, "x2"),
        (4, "lr", 0.02, 0.04, "x8 (clipped: step limited to x4)"),
    ]
    again, pr = _sgd(lr=0.01)
    replayed = selftune.replay(again, tmp_path / "r")
    train(pr, replayed, 4)  # type: ignore[arg-type]
    assert replayed.hyperparams()[0]["lr"] == pytest.approx(0.04)


def test_a_plain_optimizers_state_sets_the_rate_the_bounds_are_factors_of() -> None:
    inner, pr = _sgd(lr=0.1)
    plain = torch.optim.SGD(pr.model.parameters(), lr=1e-4, momentum=0.9)  # a run gone before
    opt = selftune.wrap(inner, _Halves(), guard=False)
    opt.load_state_dict(plain.state_dict())
    train(pr, opt, 5)  # type: ignore[arg-type]
    # the floor is 1e-3 of the loaded rate, 1e-7: 1e-4 was the floor of the rate built with
    assert opt.hyperparams()[0]["lr"] == pytest.approx(1e-4 / 32)


def test_torch_s_state_dict_hooks_on_the_wrapper_run() -> None:
    """``wrap`` returns an Optimizer, and checkpoint code registers torch's state-dict hooks on
    it (a key added on save, taken off on load): its own state_dict and load_state_dict ran
    none of them."""
    opt = selftune.wrap(_sgd()[0])
    called: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: called.append("save, before"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "mine": 1})

    def on_load(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        called.append(f"load, before, mine={sd['mine']}")
        return {k: v for k, v in sd.items() if k != "mine"}

    opt.register_load_state_dict_pre_hook(on_load)
    opt.register_load_state_dict_post_hook(lambda o: called.append("load, after"))
    saved = opt.state_dict()
    assert saved["mine"] == 1
    opt.load_state_dict(saved)
    assert called == ["save, before", "load, before, mine=1", "load, after"]


def test_a_step_hook_on_the_inner_optimizer_runs_only_on_updates_made() -> None:
    """Torch's step hooks on the wrapper run after each call of ``step``; one on the wrapped
    optimizer runs only where its update is made: not on the step the guard skipped."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    calls: list[tuple[str, int]] = []
    opt.register_step_post_hook(lambda *a: calls.append(("wrapper", opt.step_count)))
    inner.register_step_post_hook(lambda *a: calls.append(("inner", opt.step_count)))
    for t in range(1, 5):
        loss = pr.batch_loss(t)  # type: ignore[attr-defined]
        opt.zero_grad()
        loss.backward()
        opt.step(loss=torch.tensor(math.nan) if t == 3 else loss.detach())
    assert calls == [
        ("inner", 0), ("wrapper", 1), ("inner", 1), ("wrapper", 2),
        ("wrapper", 3),  # skipped: no update made
        ("inner", 3), ("wrapper", 4),
    ]  # fmt: skip


def test_torch_s_global_step_hooks_run_once_a_step_given_the_wrapper() -> None:
    """Hooks registered for every optimizer (a profiler's step counter, a memory tracker, an
    EMA) ran twice a step, around the wrapper's ``step`` and again around the inner one's:
    6 calls for 3 steps.  They run once a call of ``step``, given the wrapper and the call's
    arguments, as its own hooks are; a hook on the wrapped optimizer still runs at its update."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    inner, pr = _sgd()
    calls: list[tuple[str, Any, Any]] = []
    inner.register_step_post_hook(lambda o, a, k: calls.append(("inner", o, k)))
    opt = selftune.wrap(inner)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", o, k))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", o, k))),
    ]
    try:
        for t in range(1, 5):
            loss = pr.batch_loss(t)  # type: ignore[attr-defined]
            opt.zero_grad()
            loss.backward()
            opt.step(loss=torch.tensor(math.nan) if t == 3 else loss.detach())
    finally:
        for handle in handles:
            handle.remove()
    assert [(name, o is opt) for name, o, _ in calls] == [
        ("pre", True), ("inner", False), ("post", True),
        ("pre", True), ("inner", False), ("post", True),
        ("pre", True), ("post", True),  # skipped by the guard: no update made
        ("pre", True), ("inner", False), ("post", True),
    ]  # fmt: skip
    assert all("loss" in kwargs for name, _, kwargs in calls if name != "inner")


def test_wrapped_optimizers_stepping_in_threads_keep_torch_s_global_step_hooks() -> None:
    """Each inner step swaps torch's registries of global hooks for empty ones and back: two
    threads stepping at once put back each other's empty ones, and every global hook was lost
    for good (0 left of 1 after four threads' 300 steps).  The last step to end puts them back."""
    import threading

    from torch.optim import optimizer as torch_optimizer
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def train(seed: int) -> None:
        torch.manual_seed(seed)
        model = torch.nn.Linear(32, 32)
        opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
        for _ in range(300):
            loss = model(torch.randn(16, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())

    calls: list[str] = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: calls.append(type(o).__name__))
    try:
        threads = [threading.Thread(target=train, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert handle.id in torch_optimizer._global_optimizer_post_hooks
        assert set(calls) == {"SelfTuned"}
    finally:
        handle.remove()


def test_copying_or_pickling_says_to_save_the_state_dict() -> None:
    import copy
    import pickle

    opt = selftune.wrap(_sgd()[0])
    for attempt in (lambda: copy.deepcopy(opt), lambda: pickle.dumps(opt)):
        with pytest.raises(TypeError, match=r"save opt.state_dict\(\)"):
            attempt()


class _Nameless:
    """A controller with the four methods and no name."""

    propose = on_backoff = load_state_dict = staticmethod(lambda *args: None)
    state_dict = staticmethod(dict)


class _NoLr(torch.optim.Optimizer):
    def __init__(self, params: object) -> None:
        super().__init__(params, {"rho": 0.9})  # type: ignore[arg-type]

    def step(self, closure: object = None) -> None:
        return None


def _without_rate() -> torch.optim.Optimizer:
    """An optimizer that sets its own rate, as Adafactor with ``lr=None`` does."""
    opt, _ = _sgd()
    opt.param_groups[0]["lr"] = None
    return opt


def _relative_step() -> torch.optim.Optimizer:
    """Hugging Face's Adafactor with ``relative_step=True`` under its ``AdafactorSchedule``,
    whose rate of 0 was refused as a rate of zero, with advice on freezing layers."""
    opt, _ = _sgd()
    opt.param_groups[0].update(lr=0.0, initial_lr=0.0, relative_step=True)
    return opt


def _stepped(loss: Any) -> None:
    opt, pr = _sgd()
    wrapped = selftune.wrap(opt)
    pr.batch_loss(1).backward()  # type: ignore[attr-defined]
    wrapped.step(loss=loss)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: selftune.wrap(_NoLr([torch.nn.Parameter(torch.zeros(2))])), "has no 'lr'"),
        (lambda: selftune.wrap(_sgd()[0], "fastest"), "unknown controller 'fastest'"),
        (lambda: selftune.wrap(_sgd()[0], bounds={"lr": (10.0, 0.1)}), "out of order"),
        (lambda: selftune.wrap(_sgd()[0], bounds={"lr": (0.1, math.inf)}), "must be finite"),
        (lambda: selftune.wrap(_sgd()[0], max_change={"lr": 0.5}), "max_change for lr"),
        (lambda: selftune.wrap(_sgd()[0], frozen={"gamma"}), "unknown knob 'gamma'"),
        (
            lambda: selftune.wrap(torch.optim.Rprop([torch.nn.Parameter(torch.ones(2))])),
            "Rprop keeps a step size per parameter",
        ),
        (
            lambda: selftune.wrap(torch.optim.Adafactor([torch.nn.Parameter(torch.ones(2))])),
            r"Adafactor steps at min\(lr, 1/sqrt\(step\)\)",
        ),
        (lambda: selftune.wrap(_relative_step()), "relative_step=True, so the optimizer"),
        (lambda: selftune.wrap(object()), "needs a torch.optim.Optimizer"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], bounds={"lr": 5}), r"give a pair \(low, high\)"),
        (lambda: selftune.wrap(_sgd()[0], max_change={"lr": "2"}), "give a number, got '2'"),
        (lambda: selftune.wrap(_sgd()[0], log_dir=123), "give a folder path"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], log_dir=""), "an empty path"),
        (lambda: selftune.GuardConfig(interval="5"), r"interval='5' \(steps between"),  # type: ignore[arg-type]
        (lambda: selftune.GuardConfig(z=math.nan), "z=nan .*give a number"),
        (lambda: selftune.GuardConfig(early_ratio=0.5), r"early_ratio=0.5 .* outside \(1, inf\)"),
        (lambda: selftune.GuardConfig(relapse=0), r"relapse=0 \(the share .* outside \(0, inf\)"),
        (lambda: selftune.GuardConfig(nonfinite_only="yes"), "nonfinite_only='yes': give True"),  # type: ignore[arg-type]
        (lambda: _stepped(torch.ones(2)), r"needs one number, got a tensor of shape \(2,\)"),
        (lambda: _stepped("0.5"), "needs a number or a one-element tensor, got str"),
        (lambda: selftune.wrap(_without_rate()), "lr=None is not a number"),
        (lambda: selftune.wrap(_sgd()[0], AutoController), "is a class: pass an instance"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], _Nameless()), "_Nameless: it lacks name \\(a controller"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], AutoController(), ramp=1.5), "go with a controller's"),
        (lambda: selftune.wrap(_sgd()[0], max_change=2.0), r"max_change=2.0: give a mapping"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], bounds=0.1), r"bounds=0.1: give a mapping"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], frozen=3), r"frozen=3: give knob names"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], lr_bounds_absolute="yes"), "give True or False"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], seed="abc"), "seed='abc': give a whole number"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], seed=1.5), "seed=1.5: give a whole number"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0], log_di="x"), r"'log_di'.*wrap\(\) hands .*ramp"),
        (lambda: _stepped(torch.tensor(1 + 1j)), "needs a real number, got a torch.complex64"),
        (lambda: _stepped(np.array([0.5, 1.0])), "needs a number or a one-element tensor"),
        (lambda: selftune.wrap(_sgd()[0]).load_state_dict(None), "got NoneType"),  # type: ignore[arg-type]
        (lambda: selftune.wrap(_sgd()[0]).load_state_dict({"foo": 1}), r"keys \['foo'\]"),
    ],
)
def test_bad_input_names_the_problem(make: object, words: str) -> None:
    with pytest.raises(selftune.ConfigError, match=words):
        make()  # type: ignore[operator]


def _option_cases() -> list[tuple[str, str, Any, str]]:
    """Per controller option: a value just below its range (or at an open end) and a string."""
    tables = {
        "auto": auto_options,
        "stability": stability_options,
        "hypergradient": hypergradient_options,
    }
    cases = []
    for controller, table in tables.items():
        for name, r in table.items():
            below = r.low if r.open_low else r.low - 1
            cases += [(controller, name, below, " is outside"), (controller, name, "x", ": give a")]
    return cases


@pytest.mark.parametrize(("controller", "name", "value", "words"), _option_cases())
def test_a_controller_option_out_of_range_is_refused_by_name(
    controller: str, name: str, value: Any, words: str
) -> None:
    with pytest.raises(selftune.ConfigError, match=rf"^{name}=\S+ \(.+\){words}"):
        selftune.wrap(_sgd()[0], controller, **{name: value})


@pytest.mark.parametrize(
    ("make", "table"),
    [
        (AutoController, auto_options),
        (StabilityController, stability_options),
        (HypergradientController, hypergradient_options),
    ],
)
def test_every_controller_option_has_a_range_and_its_example_is_accepted(
    make: Any, table: dict[str, Any]
) -> None:
    flags = auto_flags if make is AutoController else {}
    assert set(inspect.signature(make).parameters) == set(table) | set(flags)
    for name, r in table.items():
        make(**{name: int(r.example) if r.whole else float(r.example)})
    # the upper ends: a deadband above 1 (a cosine never exceeds it) and a retreat above 1
    with pytest.raises(selftune.ConfigError, match=r"deadband=1.5 .* outside \[0, 1\]"):
        AutoController(deadband=1.5)
    with pytest.raises(selftune.ConfigError, match=r"retreat=2 .* outside \(0, 1\]"):
        AutoController(retreat=2)
    with pytest.raises(selftune.ConfigError, match="give a whole number"):
        AutoController(min_ramp_steps=True)
    np = pytest.importorskip("numpy")  # a value read off a config or a sweep: numpy's scalars
    AutoController(ramp=np.float32(1.3), metric_patience=np.int64(2))
    with pytest.raises(selftune.ConfigError, match="give a whole number"):
        AutoController(metric_patience=np.float64(2.0))


def test_the_manifest_records_the_options_a_controller_was_built_with(
    tmp_path: Path,
) -> None:
    """A run of ``auto`` with no range test, or another settle, is not the default's: its
    manifest said only "auto".  A numpy scalar read off a sweep is stored as a number, and an
    instance built with options says them as the name's keywords do."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, log_dir=tmp_path / "run", range_test=False, settle=np.float32(0.5))
    train(pr, opt, 3)
    opt.close()
    run = audit.read_log(tmp_path / "run")
    assert run.manifest["controller"] == "auto"
    assert run.manifest["config"]["controller_options"] == {"range_test": False, "settle": 0.5}
    assert (
        "<b>auto</b> (range_test=False, settle=0.5)"
        in report.write_report(tmp_path / "run").read_text()
    )
    built = {
        "default": {},
        "given-default": {"ramp": 1.2},  # at its default: no different from the default's run
        "instance": AutoController(range_test=False, metric_patience=np.int64(2)),
        "own": _Halves(),  # a controller of the user's own, with no options dict
    }
    recorded = {}
    for name, how in built.items():
        inner, pr = _sgd()
        kwargs = how if isinstance(how, dict) else {"controller": how}
        opt = selftune.wrap(inner, log_dir=tmp_path / name, **kwargs)
        train(pr, opt, 3)
        opt.close()
        recorded[name] = audit.read_log(tmp_path / name).manifest["config"]["controller_options"]
    assert recorded == {
        "default": {},
        "given-default": {},
        "instance": {"range_test": False, "metric_patience": 2},
        "own": {},
    }


class _ListsItsOptions(_Halves):
    """Gives its options as a list of pairs."""

    def __init__(self) -> None:
        self.options = [("patience", 50)]


@pytest.mark.parametrize("groups", ["each", "joint"])
def test_a_controllers_options_that_are_no_dict_are_refused_by_name(groups: str) -> None:
    """The protocol asks for a dict: a list of pairs went into the manifest of one run, and
    raised a TypeError from inside the wrap of a joint one ('list' object is not a mapping)."""
    with pytest.raises(selftune.ConfigError, match=r"'halves': its options are \[\('patience'"):
        selftune.wrap(_sgd()[0], _ListsItsOptions(), groups=groups)


class _BacksOffWithoutTheStep(_Halves):
    """Defines on_backoff without the step the wrapper passes."""

    def on_backoff(self) -> None:  # type: ignore[override]
        pass


def test_a_controller_method_that_cannot_take_the_wrappers_arguments_is_refused_at_wrap(
    tmp_path: Path,
) -> None:
    """on_backoff(self) was taken, and raised a TypeError from inside the guard at the first
    rollback, hours into a run, the step broken part-way."""
    inner, _ = _sgd()
    with pytest.raises(
        selftune.ConfigError, match=r"'halves': on_backoff .* define it as on_backoff\(self, step\)"
    ):
        selftune.wrap(inner, _BacksOffWithoutTheStep(), log_dir=tmp_path / "r")


def test_a_state_of_another_controller_says_how_to_wrap_the_one_it_was_saved_by() -> None:
    """A state saved by a controller of one's own said to wrap with controller='halves',
    a name wrap refuses as unknown: such a controller is given as an instance."""
    saved = {}
    for controller in ("off", _Halves()):
        inner, pr = _sgd()
        opt = selftune.wrap(inner, controller)
        train(pr, opt, 2)  # type: ignore[arg-type]
        saved[opt.controller.name] = opt.state_dict()
    with pytest.raises(selftune.ConfigError, match=r"named 'halves', an instance of it as the"):
        selftune.wrap(_sgd()[0], "off").load_state_dict(saved["halves"])
    with pytest.raises(selftune.ConfigError, match=r"wrap with controller='off' to resume it"):
        selftune.wrap(_sgd()[0], _Halves()).load_state_dict(saved["off"])


def test_one_controller_instance_stepped_by_two_optimizers_in_turn_is_refused() -> None:
    """Two wrappers given one instance (a GAN's two players) stepped it in turn, its state
    following both runs and each proposing from the other's signals, with no word.  One that
    goes on with an instance another has finished with is not refused."""
    shared = _Halves()
    (a, pa), (b, pb) = _sgd(), _sgd()
    first, second = selftune.wrap(a, shared), selftune.wrap(b, shared)
    train(pa, first, 3)  # type: ignore[arg-type]
    train(pb, second, 3)  # type: ignore[arg-type]  # the first is done with it: goes on
    before = [p.clone() for p in pa.model.parameters()]  # type: ignore[attr-defined]
    with pytest.raises(selftune.ConfigError, match=r"'halves': another optimizer's wrapper"):
        train(pa, first, 1)  # type: ignore[arg-type]
    after = list(pa.model.parameters())  # type: ignore[attr-defined]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    (a, pa), (b, pb) = _sgd(), _sgd()
    first, second = selftune.wrap(a, shared), selftune.wrap(b, copy.deepcopy(shared))
    for _ in range(3):  # each its own: in turn, as a GAN's players step
        train(pa, first, 1)  # type: ignore[arg-type]
        train(pb, second, 1)  # type: ignore[arg-type]
    assert first.step_count == second.step_count == 3


@pytest.mark.parametrize("name", [None, "", 5])
def test_a_controller_whose_name_is_no_words_is_refused_by_name(name: Any) -> None:
    """The manifest recorded it as given, and a state saved under a name of None loaded into
    a run of any other controller, the check of whose it was skipped."""
    controller = _Halves()
    controller.name = name
    with pytest.raises(selftune.ConfigError, match=r"_Halves: its name is .*; give it a name"):
        selftune.wrap(_sgd()[0], controller)


@pytest.mark.parametrize("value", ["False", 0, None])
def test_a_switch_that_is_not_a_bool_is_refused_with_both_choices(value: Any) -> None:
    """A string "False" read off a config is truthy: taken as given it would run the range test
    the user turned off."""
    with pytest.raises(selftune.ConfigError, match=r"^range_test=.*: give True \(.*\) or False"):
        selftune.wrap(_sgd()[0], "auto", range_test=value)


def test_a_step_with_no_gradient_is_warned_of_once() -> None:
    """``zero_grad()`` between the backward and the step (or no backward) leaves every
    ``.grad`` None: torch steps without a word and nothing trains, though the wrapper reads
    every gradient.  It says so once; a loop in the right order hears nothing."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train(pr, opt, 3)
        assert not [w for w in said if "gradient" in str(w.message)]
        for t in range(4, 7):
            loss = pr.batch_loss(t)  # type: ignore[attr-defined]
            loss.backward()
            opt.zero_grad()
            opt.step(loss=loss.detach())
    told = [w for w in said if "no parameter has a gradient" in str(w.message)]
    assert len(told) == 1 and "step 4:" in str(told[0].message)
    assert told[0].filename == __file__


def test_a_run_folder_reopened_with_another_optimizer_names_the_optimizer(
    tmp_path: Path,
) -> None:
    """The same model, seeded alike, wrapped with Adam over the folder of a run of SGD with
    momentum: the refusal told the user to build the model with the run's initial weights,
    which it had; it names the knobs that differ, the groups' count, and the groups' order
    (the weights' hash is taken in that order, so it read as other weights too).  The run's own
    optimizer over other initial weights is still told to seed them (the groups' check read
    groups in the same order as reordered ones, and blamed the optimizer)."""

    def model() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        return list(torch.nn.Linear(4, 3).parameters())  # a weight of 12, a bias of 3

    def sgd(groups: list[list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": g} for g in groups], lr=0.002, momentum=0.9)

    weight, bias = model()
    selftune.wrap(sgd([[weight], [bias]]), log_dir=tmp_path / "run").close()
    for other, what in (
        (torch.optim.Adam(model()), r"it had 2 param groups, this optimizer has 1"),
        (torch.optim.Adam([{"params": [p]} for p in model()]),
         r"knobs were \[\['lr', 'momentum'\], \['lr', 'momentum'\]\].*'beta1'"),
        (sgd([model()[1:], model()[:1]]),
         r"held \[12, 3\] parameters, this optimizer's hold \[3, 12\]"),
    ):  # fmt: skip
        with pytest.raises(selftune.SelfTuneError, match=what) as told:
            selftune.wrap(other, log_dir=tmp_path / "run")
        assert "param groups are not the run's" in str(told.value)
        assert "seed" not in str(told.value)
    torch.manual_seed(1)  # the run's optimizer over other initial weights: the model differs
    other_weights = list(torch.nn.Linear(4, 3).parameters())
    with pytest.raises(selftune.SelfTuneError, match=r"seed their initialisation") as told:
        selftune.wrap(sgd([other_weights[:1], other_weights[1:]]), log_dir=tmp_path / "run")
    assert "param groups" not in str(told.value)


def test_a_policy_given_to_wrap_is_refused_naming_its_parts() -> None:
    """``Policy`` is public, and ``wrap(opt, policy=Policy(...))`` raised torch's TypeError of
    a keyword given twice, from inside ``wrap``: it builds its policy from the parts."""
    with pytest.raises(selftune.ConfigError, match=r"from bounds=, max_change=, frozen="):
        selftune.wrap(_sgd()[0], policy=selftune.Policy(bounds={"lr": (0.5, 2.0)}))


def test_a_policy_built_by_hand_checks_its_arguments_as_wrap_does() -> None:
    """``Policy`` is public, for ``SelfTuned(policy=...)``: built by hand, frozen="lr" froze
    the knobs "l" and "r" (refused as unknown), bounds=5 raised dict()'s TypeError, and
    lr_bounds_absolute="yes" was taken as true."""
    assert selftune.Policy(frozen="lr").frozen == frozenset({"lr"})
    for kwargs, match in (
        ({"bounds": 5}, r"bounds=5: give a mapping"),
        ({"max_change": [("lr", 2.0)]}, r"max_change=\[\('lr', 2.0\)\]: give a mapping"),
        ({"frozen": 5}, r"frozen=5: give knob names"),
        ({"lr_bounds_absolute": "yes"}, r"lr_bounds_absolute='yes': give True or False"),
    ):
        with pytest.raises(selftune.ConfigError, match=match):
            selftune.Policy(**kwargs)


def test_a_policy_that_is_not_a_policy_is_refused_and_the_optimizer_left_free() -> None:
    """``SelfTuned(opt, policy={"lr": ...})`` raised an AttributeError from the settings it
    read after the optimizer's groups were re-registered."""
    inner, _ = _sgd()
    with pytest.raises(selftune.ConfigError, match=r"policy=\{'lr': \(0.5, 2.0\)\}: give a"):
        selftune.SelfTuned(inner, policy={"lr": (0.5, 2.0)})  # type: ignore[arg-type]
    opt = selftune.SelfTuned(inner, policy=selftune.Policy(bounds={"lr": (0.5, 2.0)}))
    assert opt.policy.bounds["lr"] == (0.5, 2.0)


def test_a_refused_wrap_leaves_the_optimizer_free_to_wrap() -> None:
    """Every argument is checked before the optimizer is marked as wrapped: a typo, a bad guard
    setting or a run folder of another run, once corrected, wraps."""
    inner, _ = _sgd()
    with pytest.raises(selftune.ConfigError, match="unknown controller 'autoo'"):
        selftune.wrap(inner, "autoo")
    for guard in ({"interval": 10}, "on", 1, selftune.GuardConfig):
        with pytest.raises(selftune.ConfigError, match=r"guard=.*GuardConfig\(\.\.\.\)"):
            selftune.wrap(inner, guard=guard)  # type: ignore[arg-type]
    assert selftune.wrap(inner, guard=None).guard is None  # None is "no guard", as False


def test_non_finite_settings_and_double_wrapping_are_refused() -> None:
    inner, _ = _sgd()
    inner.param_groups[0]["lr"] = math.nan
    with pytest.raises(selftune.ConfigError, match="lr=nan is not finite"):
        selftune.wrap(inner)
    inner.param_groups[0]["lr"] = 0.01
    opt = selftune.wrap(inner)
    with pytest.raises(selftune.ConfigError, match="already"):
        selftune.wrap(inner)
    with pytest.raises(selftune.ConfigError, match="already wrapped"):
        selftune.wrap(opt)


@pytest.mark.parametrize("controller", ["auto", "off"])
@pytest.mark.parametrize(
    ("rate", "words"),
    [
        (math.nan, "lr=nan was written"),
        (math.inf, "lr=inf was written"),
        (-0.002, "lr=-0.002 was written"),
        (None, "lr=None is not a number"),
    ],
)
def test_a_rate_written_mid_run_that_no_step_can_take_is_refused_before_the_step(
    controller: str, rate: float | None, words: str
) -> None:
    """A scheduler or the loop that writes a rate no step can take mid-run (a ``LambdaLR``
    whose linear decay runs past its end goes below zero): ``auto`` raised a ConfigError that
    blamed its own proposal ("controller 'auto': proposed lr=nan"), a rate of None a TypeError
    from inside the wrapper, and either left every later step refused as one broken part-way,
    the rate put right or not; ``off`` stepped the weights to NaN for the guard to roll back;
    a negative rate was tuned as a rate, the weights climbing the loss.  The step is refused
    by name before anything changes, and the run goes on once the rate is put right."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, controller)
    train(pr, opt, 5)
    before = [p.clone() for p in pr.model.parameters()]
    opt.param_groups[0]["lr"] = rate
    pr.batch_loss(6).backward()
    with pytest.raises(selftune.ConfigError, match=rf"param group 0: {words}.*step 6 was refused"):
        opt.step()
    assert opt.step_count == 5
    assert all(torch.equal(a, p) for a, p in zip(before, pr.model.parameters(), strict=True))
    opt.param_groups[0]["lr"] = 0.002
    train(pr, opt, 5)
    assert opt.step_count == 10 and math.isfinite(pr.full_loss())


def test_a_nan_momentum_or_beta1_is_refused_at_wrap_and_in_an_added_group() -> None:
    """A NaN momentum or beta1 is not above zero, so the group was read as one without it and
    the value went unchecked: torch's SGD takes momentum=nan, whose steps turned the weights
    NaN, and the guard gave up at step 21, pointing at the data."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(selftune.ConfigError, match="param group 0: momentum=nan is not finite"):
        selftune.wrap(torch.optim.SGD(params[:1], lr=0.01, momentum=math.nan))
    opt = selftune.wrap(torch.optim.Adam(params[:1], lr=0.01))
    with pytest.raises(selftune.ConfigError, match="param group 1: beta1=nan is not finite"):
        opt.add_param_group({"params": params[1:], "betas": (math.nan, 0.999)})
    opt.add_param_group({"params": params[1:]})  # the refused group left nothing behind
    assert len(opt.hyperparams()) == 2


#: the unfreezing runs' data, fixed apart from the global generator
_GEN = torch.Generator().manual_seed(1)
_X, _Y = torch.randn(64, 4, generator=_GEN), torch.randn(64, 1, generator=_GEN)


def _unfreezing(
    folder: Path, controller: str = "auto", *, replay: bool = False
) -> tuple[torch.nn.Sequential, selftune.SelfTuned]:
    """A body and a head, with only the head's group in the optimizer at first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    inner = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    if replay:
        return model, selftune.replay(inner, folder)
    return model, selftune.wrap(inner, controller, log_dir=folder, seed=0)


def _unfreeze(model: torch.nn.Sequential, opt: selftune.SelfTuned) -> None:
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.02})


def _train_unfreezing(
    model: torch.nn.Sequential, opt: selftune.SelfTuned, steps: range, nan_step: int = 0
) -> None:
    """Train over ``steps``, adding the body's group before step 11 (gradual unfreezing), with a
    non-finite loss at ``nan_step`` for the guard to roll back."""
    for t in steps:
        if t == 11:
            _unfreeze(model, opt)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        opt.step(loss=torch.tensor(float("nan")) if t == nan_step else loss.detach())


@pytest.mark.parametrize("controller", selftune.CONTROLLERS)
def test_a_group_added_mid_run_is_tuned_logged_restored_and_replayed(
    controller: str, tmp_path: Path
) -> None:
    model, opt = _unfreezing(tmp_path / "run", controller)
    initial_body = model[0].weight.detach().clone()
    _train_unfreezing(model, opt, range(1, 41), nan_step=30)
    opt.close()
    weights = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(weights[0], initial_body)  # the added group trained
    records = audit.read_log(tmp_path / "run").records
    added = [r for r in records if r["kind"] == "group"]
    assert [(r["step"], r["group"], r["knobs"]) for r in added] == [(10, 1, ["lr", "momentum"])]
    rollbacks = [r for r in records if r["kind"] == "guard" and r["event"] == "rollback"]
    # the rollback restored a snapshot that holds the new group, taken after it was added
    assert [r["step"] for r in rollbacks] == [30]
    assert rollbacks[0]["restored_step"] > 10
    assert audit.verify(tmp_path / "run").records == len(records)
    assert report.write_report(tmp_path / "run").exists()
    if controller != "off":
        assert any(r["kind"] == "decision" and r["group"] == 1 for r in records)
    model, opt = _unfreezing(tmp_path / "run", replay=True)
    _train_unfreezing(model, opt, range(1, 41), nan_step=30)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_a_replay_without_the_added_group_names_the_step_that_needs_it(tmp_path: Path) -> None:
    """It failed with an IndexError from inside the wrapper.  The knobs after step 11, which
    the trace holds, tell it first; without a trace, the step's decision for the group."""
    model, opt = _unfreezing(tmp_path / "run", "hypergradient")
    _train_unfreezing(model, opt, range(1, 21))
    opt.close()
    for trace in ("kept", "removed"):
        if trace == "removed":
            (tmp_path / "run" / "trace.jsonl").unlink()
        model, opt = _unfreezing(tmp_path / "run", replay=True)
        words = r"run added param group 1 after step 10: add (param group 1|it) with add_param_"
        with pytest.raises(selftune.SelfTuneError, match=words) as err:
            for _ in range(20):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(_X), _Y).backward()
                opt.step()
        told = "after step 11 the logged run had 2" if trace == "kept" else "holds a decision"
        assert told in str(err.value)


def test_a_group_added_after_a_rollback_is_measured_and_guarded_at_once() -> None:
    """A rollback's restore (torch's ``load_state_dict``) replaces the param-group list; a group
    added after it is still measured, so trouble in it alone is caught, and the add keeps a
    snapshot, so that trouble in the very next step has one to go back to."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = selftune.wrap(torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9), "off")
    events: list[tuple[int, str]] = []
    opt.add_listener(lambda e: events.append((e.step, e.guard["event"])) if e.guard else None)
    for t in range(1, 33):
        if t == 31:
            _unfreeze(model, opt)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(_X), _Y)
        loss.backward()
        if t == 31:
            model[0].weight.grad.fill_(math.nan)  # trouble in the new group only
        opt.step(loss=torch.tensor(math.nan) if t == 30 else loss.detach())
    assert events == [(30, "rollback"), (31, "rollback")]
    assert opt.last_signals is not None and len(opt.last_signals.groups) == 2
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_group_removed_behind_the_wrapper_is_refused_before_the_step(tmp_path: Path) -> None:
    """``param_groups.pop(0)``: the per-group scales were read against the wrong groups (the
    second group's rate times the first one's scale), then a step failed deep inside on the
    previous update's shape, after it had moved the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.2}]
    opt = selftune.wrap(torch.optim.SGD(groups, lr=0.05), log_dir=tmp_path / "run")
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(_X), _Y).backward()
        opt.step()
    removed = opt.param_groups.pop(0)
    before = [p.clone() for p in model.parameters()]
    # (its advice was to unwrap(), which this refused too: unwrap hands back the rates it
    # tuned, one per group, and cannot tell which is which either)
    for refused in (opt.step, opt.hyperparams, opt.unwrap):
        with pytest.raises(
            selftune.ConfigError,
            match=r"holds 1 param groups where selftune tunes 2: .* Put the groups back",
        ):
            refused()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    opt.param_groups.insert(0, removed)
    rates = [knobs["lr"] for knobs in opt.hyperparams()]
    assert [g["lr"] for g in opt.unwrap().param_groups] == rates
    selftune.verify(tmp_path / "run")


def test_a_parameter_added_to_a_group_behind_the_wrapper_is_refused_before_the_step(
    tmp_path: Path,
) -> None:
    """``param_groups[0]["params"].extend(...)``, which torch's optimizers take: the step
    failed deep inside the signals' read ("Tensor lists must have the same number of tensors",
    the previous update held the group's old parameters), and the wrapper then stood broken,
    refusing every step until a checkpoint was loaded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = selftune.wrap(
        torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9), log_dir=tmp_path / "run"
    )
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(_X), _Y).backward()
        opt.step()
    opt.param_groups[0]["params"].extend(model[0].parameters())
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(_X), _Y).backward()
    before = [p.clone() for p in model.parameters()]
    for refused in (opt.step, opt.hyperparams):
        with pytest.raises(
            selftune.ConfigError,
            match=r"param group 0 holds 4 parameters where selftune tracks 2: .*add_param_group",
        ):
            refused()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    del opt.param_groups[0]["params"][2:]  # put back as it was: the run goes on, unbroken
    opt.step()
    opt.add_param_group({"params": list(model[0].parameters())})  # the way to add them
    opt.step()
    rates = [knobs["lr"] for knobs in opt.hyperparams()]
    opt.param_groups[1]["params"].append(torch.nn.Parameter(torch.zeros(2)))
    inner = opt.unwrap()  # as the refusal says: unwrap reads none of what no longer fits
    assert [g["lr"] for g in inner.param_groups] == rates
    selftune.verify(tmp_path / "run")


def test_a_lazy_parameter_not_yet_initialized_is_refused_where_its_values_are_needed() -> None:
    """A wrapper over a lazy module's parameters takes them before the dry run, as torch's
    optimizers do; but a group of them added mid-run failed in torch's ValueError from
    allocating its previous update, after its group and half of selftune's records of it were
    in, and the next step failed deep inside; and ``average=True`` failed in the same error
    from copying them, after the optimizer's groups were re-registered."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(4, 4), torch.nn.LazyLinear(1)
    with pytest.raises(selftune.ConfigError, match=r"lazy module's parameter .* \(average=True\)"):
        selftune.wrap(torch.optim.SGD(head.parameters(), lr=0.1), average=True)
    opt = selftune.wrap(torch.optim.SGD(body.parameters(), lr=0.05, momentum=0.9))

    def step() -> None:
        opt.zero_grad()
        x = body(_X)
        loss = torch.nn.functional.mse_loss(head(x) if len(opt.param_groups) > 1 else x, _Y)
        loss.backward()
        opt.step(loss=loss.detach())

    step()
    with pytest.raises(selftune.ConfigError, match=r"lazy module's parameter .* add_param_group"):
        opt.add_param_group({"params": list(head.parameters())})
    step()  # nothing of the refused group was left behind
    head(body(_X))  # the dry run
    opt.add_param_group({"params": list(head.parameters())})
    step()
    assert len(opt.hyperparams()) == 2 and head.weight.grad is not None


def test_a_run_with_an_added_group_resumes_to_the_same_weights_and_log(tmp_path: Path) -> None:
    """Stopped at a checkpoint after the body's group was added, and resumed the documented way
    (build the optimizer, add the group again, load the checkpoint): the weights and the audit
    log are byte for byte those of the run that never stopped."""
    model, opt = _unfreezing(tmp_path / "ref")
    _train_unfreezing(model, opt, range(1, 41))
    opt.close()
    reference = [p.detach().clone() for p in model.parameters()]

    ckpt = tmp_path / "ckpt.pt"
    model, opt = _unfreezing(tmp_path / "res")
    _train_unfreezing(model, opt, range(1, 21))
    selftune.save_checkpoint(ckpt, model=model, optimizer=opt, step=20)
    opt.close()
    model, opt = _unfreezing(tmp_path / "res")
    _unfreeze(model, opt)
    start = selftune.load_checkpoint(ckpt, model=model, optimizer=opt)["step"] + 1
    _train_unfreezing(model, opt, range(start, 41))
    opt.close()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference, strict=True))
    for name in ("decisions.jsonl", "trace.jsonl"):
        assert (tmp_path / "res" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_a_state_saved_between_an_add_and_the_next_step_resumes_to_a_log_that_verifies(
    tmp_path: Path,
) -> None:
    """The added group's record waits for the next step; a state saved before it (Lightning's
    and the Trainer's checkpoints call ``state_dict``) writes it first, so that the position it
    saves counts it, and the resumed run, which adds the group again, drops its own copy."""

    def steps(model: torch.nn.Sequential, opt: selftune.SelfTuned, span: range) -> None:
        for _ in span:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(_X), _Y).backward()
            opt.step()

    model, opt = _unfreezing(tmp_path / "ref")
    steps(model, opt, range(10))
    _unfreeze(model, opt)
    steps(model, opt, range(10))
    opt.close()

    model, opt = _unfreezing(tmp_path / "res")
    steps(model, opt, range(10))
    _unfreeze(model, opt)
    state = opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    opt.close()
    model, opt = _unfreezing(tmp_path / "res")
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
    _unfreeze(model, opt)
    opt.load_state_dict(state)
    steps(model, opt, range(10))
    opt.close()
    assert audit.verify(tmp_path / "res").records == audit.verify(tmp_path / "ref").records
    for name in ("decisions.jsonl", "trace.jsonl"):
        assert (tmp_path / "res" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_a_run_started_again_into_its_own_folder_is_refused(tmp_path: Path) -> None:
    """The same seeded script run twice into one folder: the folder knows the run (its initial
    weights) and took the second for a resume, but no state was loaded, so the log went on at
    step 1 again, steps 1-20 twice over, and verified."""

    def run() -> None:
        inner, pr = _sgd()
        opt = selftune.wrap(inner, log_dir=tmp_path / "run", seed=0)
        train(pr, opt, 20)  # type: ignore[arg-type]
        opt.close()

    run()
    with pytest.raises(selftune.ConfigError, match="already holds steps of this run"):
        run()
    trace = (tmp_path / "run" / "trace.jsonl").read_text().splitlines()
    assert len(trace) == 20


def _one_cycle_run(tmp_path: Path, cycle: bool) -> tuple[selftune.SelfTuned, list[Any], list]:
    """The hypergradient controller (which tunes momentum) under OneCycleLR, a NaN loss at
    step 40 for a rollback; the momentum each step used is read inside the wrapped step."""
    inner, pr = _sgd(lr=0.01)
    used: list[float] = []
    inner_step = inner.step

    def step(*args: Any, **kw: Any) -> Any:
        used.append(inner.param_groups[0]["momentum"])
        return inner_step(*args, **kw)

    inner.step = step  # type: ignore[method-assign]
    opt = selftune.wrap(inner, "hypergradient", log_dir=tmp_path / f"cycle-{cycle}")
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.02, total_steps=200, cycle_momentum=cycle
    )
    scheduled: list[float] = []

    def after() -> None:
        sched.step()
        scheduled.append(opt.param_groups[0]["momentum"])

    scheduled.append(opt.param_groups[0]["momentum"])
    _steps(pr, opt, range(1, 81), nan_at=40, after=after)
    opt.close()
    records = audit.read_log(tmp_path / f"cycle-{cycle}").records
    return opt, records, [used, scheduled]


def test_a_scheduler_that_cycles_momentum_takes_it_over(tmp_path: Path) -> None:
    """OneCycleLR writes momentum after every step (cycle_momentum is its default): a value
    selftune tuned, or a rollback restored, was overwritten before any step used it, and the
    log held momentum decisions that never took effect.  The knob is handed to the scheduler
    at once, with a note and a warning, and the log holds only what the steps used."""
    with pytest.warns(UserWarning, match="momentum was changed outside selftune before step 2"):
        opt, records, (used, scheduled) = _one_cycle_run(tmp_path, cycle=True)
    (note,) = [r for r in records if r["kind"] == "note"]
    assert note["step"] == 2 and "cycle_momentum=False" in note["reason"]
    assert not [r for r in records if r["kind"] == "decision" and r["knob"] == "momentum"]
    assert [r["event"] for r in records if r["kind"] == "guard"] == ["rollback"]
    skipped = 40  # the rolled-back step does not step the optimizer
    assert used == scheduled[: skipped - 1] + scheduled[skipped : len(used) + 1]
    assert opt.state_dict()["selftune"]["outside"] == [["momentum"]]
    # the control: without the cycle, selftune tunes momentum and the steps use its values
    opt, records, (used, scheduled) = _one_cycle_run(tmp_path, cycle=False)
    assert not [r for r in records if r["kind"] == "note"]
    tuned = [r for r in records if r["kind"] == "decision" and r["knob"] == "momentum"]
    assert tuned and used[-1] == tuned[-1]["new"] != scheduled[0]


def test_a_tensor_beta_selftune_tuned_is_not_taken_for_a_scheduler_s() -> None:
    """A float32 tensor holds a rounded copy of the beta1 a decision wrote: compared with the
    unrounded value, the next step took selftune's own change for someone else's."""
    pr = noisy_quadratic(seed=1)
    betas = (torch.tensor(0.9), torch.tensor(0.999))
    inner = torch.optim.Adam(pr.model.parameters(), lr=torch.tensor(1e-2), betas=betas)
    opt = selftune.wrap(inner, "hypergradient")
    train(pr, opt, 40)
    assert opt.hyperparams()[0]["beta1"] != pytest.approx(0.9), "beta1 was never tuned"
    assert opt.state_dict()["selftune"]["outside"] == [[]]


class _RaisesAtRollback(OffController):
    """Lowers the rate by a hundredth at every step; raises in ``stage``, one of the methods
    the guard's rollback calls (None: in none)."""

    name = "raises-at-rollback"

    def __init__(self, stage: str | None) -> None:
        self.stage = stage

    def _maybe_raise(self, stage: str) -> None:
        if stage == self.stage:
            raise ZeroDivisionError(f"no {stage}")

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        return [Proposal(0, "lr", knobs[0]["lr"] * 0.99, "lower")]

    def before_rollback(self, knobs: Any) -> None:
        self._maybe_raise("before_rollback")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._maybe_raise("load_state_dict")

    def on_backoff(self, step: int) -> None:
        self._maybe_raise("on_backoff")


@pytest.mark.parametrize("stage", ["before_rollback", "load_state_dict", "on_backoff"])
def test_a_controller_that_raises_at_a_rollback_has_it_taken_and_the_run_goes_on(
    stage: str, tmp_path: Path
) -> None:
    """An exception from a controller's method that the guard's rollback calls left the step
    broken part-way (the guard had given up its snapshot, the weights not yet restored): every
    later step was refused until a checkpoint loaded.  The rollback is taken as the guard made
    it, logged with a note of why, step() raises ControllerError, and the run goes on, to the
    weights of a run whose controller did not raise, and replays to the bit."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _RaisesAtRollback(stage), log_dir=tmp_path / "r")
    plain, pp = _sgd()
    reference = selftune.wrap(plain, _RaisesAtRollback(None))
    _steps(pp, reference, range(1, 36), nan_at=30)
    _steps(pr, opt, range(1, 30))
    with pytest.raises(selftune.ControllerError, match=rf"{stage}\(\) raised ZeroDiv") as e:
        _steps(pr, opt, range(30, 31), nan_at=30)
    assert "Step 30 took the guard's rollback" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    _steps(pr, opt, range(31, 36))
    opt.close()
    assert opt.step_count == 35 and opt.hyperparams() == reference.hyperparams()
    pairs = zip(pr.model.parameters(), pp.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)
    audit.verify(tmp_path / "r")
    records = audit.read_log(tmp_path / "r").records
    assert [r["event"] for r in records if r["kind"] == "guard"] == ["rollback"]
    (note,) = [r for r in records if r["kind"] == "note" and r.get("step") == 30]
    assert f"{stage}() raised ZeroDivisionError" in note["reason"]
    again, pa = _sgd()
    replayed = selftune.replay(again, tmp_path / "r")
    _steps(pa, replayed, range(1, 36), nan_at=30)
    pairs = zip(pr.model.parameters(), pa.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)


class _StateRaises(OffController):
    """Lowers the rate by a hundredth at every step and counts its proposals; its
    ``state_dict`` raises at its ``at``-th call (the wrap's is the first)."""

    name = "state-raises"

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.seen = at, 0, 0

    def propose(self, signals: Any, knobs: Any) -> list[Proposal]:
        self.seen += 1
        return [Proposal(0, "lr", knobs[0]["lr"] * 0.99, "lower")]

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        if self.calls == self.at:
            raise ZeroDivisionError("no state")
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def test_a_controller_whose_state_dict_raises_at_a_snapshot_has_the_step_taken_without_it(
    tmp_path: Path,
) -> None:
    """An exception from the controller's state_dict where the guard takes a snapshot left the
    step broken off: every later step was refused until a checkpoint loaded.  The step is taken
    without that snapshot (the guard keeps the one before), noted, step() raises
    ControllerError, and a later rollback goes back to the older snapshot, whose weights, knobs
    and controller state are all of one step; the run replays to the bit."""
    inner, pr = _sgd()
    controller = _StateRaises(at=3)  # the wrap's, step 1's snapshot, step 25's
    opt = selftune.wrap(inner, controller, log_dir=tmp_path / "r")
    _steps(pr, opt, range(1, 25))
    with pytest.raises(selftune.ControllerError, match=r"state_dict\(\) raised ZeroDiv") as e:
        _steps(pr, opt, range(25, 26))
    assert "controller 'state-raises'" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert opt.step_count == 25 and opt.guard is not None
    assert [s.step for s in opt.guard.snapshots] == [1]
    _steps(pr, opt, range(26, 36), nan_at=30)
    assert [s.step for s in opt.guard.snapshots] == [1]
    assert controller.seen == 0 + 5  # step 1's state (no proposal yet), then steps 31 to 35
    opt.close()
    audit.verify(tmp_path / "r")
    records = audit.read_log(tmp_path / "r").records
    (rollback,) = [r for r in records if r["kind"] == "guard"]
    assert rollback["step"] == 30 and rollback["restored_step"] == 1
    notes = [r for r in records if r["kind"] == "note" and r.get("step") == 25]
    assert [n.get("unkept") for n in notes] == [25, None]  # kept or not before the proposals
    assert "state_dict() raised ZeroDivisionError: no state" in notes[1]["reason"]
    again, pa = _sgd()
    replayed = selftune.replay(again, tmp_path / "r")
    _steps(pa, replayed, range(1, 36), nan_at=30)
    pairs = zip(pr.model.parameters(), pa.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)
    assert replayed.hyperparams() == opt.hyperparams()


def test_a_controller_whose_state_dict_raises_at_a_skip_has_the_skip_taken(
    tmp_path: Path,
) -> None:
    """Trouble with no snapshot held (the first step) skips the step, keeping the controller's
    state for a relevel to undo the cut: its state_dict raising there broke the step off.  The
    skip is taken, its cut kept for good, noted, and step() raises ControllerError."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _StateRaises(at=2), log_dir=tmp_path / "r")
    with pytest.raises(selftune.ControllerError, match=r"state_dict\(\) raised ZeroDiv") as e:
        _steps(pr, opt, range(1, 2), nan_at=1)
    assert "Step 1 took the guard's skip" in str(e.value)
    assert opt.guard is not None and opt.guard.skipped is None
    _steps(pr, opt, range(2, 8))
    opt.close()
    assert opt.step_count == 7
    audit.verify(tmp_path / "r")
    records = audit.read_log(tmp_path / "r").records
    assert [r["event"] for r in records if r["kind"] == "guard"] == ["skip"]
    assert [r.get("unkept") for r in records if r["kind"] == "note"][-1] == 1
    again, pa = _sgd()
    replayed = selftune.replay(again, tmp_path / "r")
    _steps(pa, replayed, range(1, 8), nan_at=1)
    pairs = zip(pr.model.parameters(), pa.model.parameters(), strict=True)  # type: ignore[attr-defined]
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_controller_whose_state_dict_raises_as_a_group_is_added_adds_none(
    tmp_path: Path,
) -> None:
    """``add_param_group`` takes the guard's snapshot of the run with the new group at once,
    which holds the controller's state: its state_dict raising there escaped raw from deep
    inside, the group already in the wrapped optimizer and the guard's snapshots dropped, with
    selftune's per-group lists half grown.  It raises ControllerError naming the controller,
    the original its cause, and adds no group: the run steps on as it was, and the group added
    again once state_dict gives one joins whole, logged and verified."""
    inner, pr = _sgd()
    controller = _StateRaises(at=0)
    opt = selftune.wrap(inner, controller, log_dir=tmp_path / "r")
    _steps(pr, opt, range(1, 4))
    assert opt.guard is not None
    held = [s.step for s in opt.guard.snapshots]
    groups = len(inner.param_groups)
    extra = torch.nn.Parameter(torch.ones(3))
    controller.at = controller.calls + 1  # the next call raises
    said = r"'state-raises': state_dict\(\) raised"
    with pytest.raises(selftune.ControllerError, match=said) as e:
        opt.add_param_group({"params": [extra], "lr": 0.01})
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert "param group was not added" in str(e.value)
    assert len(inner.param_groups) == groups and [s.step for s in opt.guard.snapshots] == held
    _steps(pr, opt, range(4, 6))  # as it was
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert len(inner.param_groups) == groups + 1
    assert [s.step for s in opt.guard.snapshots] == [5]
    assert opt.guard.snapshots[0].payload["controller"] == {"seen": 5}
    _steps(pr, opt, range(6, 8))
    opt.close()
    audit.verify(tmp_path / "r")
    records = audit.read_log(tmp_path / "r").records
    assert [r["step"] for r in records if r["kind"] == "group"] == [5]


def test_a_controller_whose_state_dict_raises_at_a_checkpoint_saves_none_and_steps_on(
    tmp_path: Path,
) -> None:
    """opt.state_dict() with a controller whose state_dict raised stopped part-way with the
    controller's own error.  It raises ControllerError naming the controller, before anything
    is written; the run steps on, and the next state_dict saves and loads."""
    inner, pr = _sgd()
    opt = selftune.wrap(inner, _StateRaises(at=3), log_dir=tmp_path / "r")
    _steps(pr, opt, range(1, 4))
    with pytest.raises(selftune.ControllerError, match=r"'state-raises': state_dict\(\) raised"):
        opt.state_dict()
    _steps(pr, opt, range(4, 6))
    saved = opt.state_dict()
    assert saved["selftune"]["controller"] == {"seen": 5} and saved["selftune"]["step"] == 5
    opt.load_state_dict(saved)
    _steps(pr, opt, range(6, 8))
    opt.close()
    audit.verify(tmp_path / "r")
