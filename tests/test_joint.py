"""``wrap(..., groups="joint")``: every param group tuned as one, on real runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from problems import OPTIMIZERS, Problem, mlp_regression, train

import selftune
from selftune.controllers.off import OffController
from selftune.signals import pooled


def _per_tensor(problem: Problem, lrs: list[float] | None = None) -> list[dict[str, Any]]:
    """A param group per tensor of the problem's model, at ``lrs`` (else the optimizer's)."""
    params = list(problem.model.parameters())
    if lrs is None:
        return [{"params": [p]} for p in params]
    return [{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)]


def _rates(opt: selftune.SelfTuned, steps: int, problem: Problem) -> list[list[float]]:
    """Each step's effective rates of every group."""
    rates: list[list[float]] = []
    opt.add_listener(lambda e: rates.append([k["lr"] for k in e.hyperparams]))
    train(problem, opt, steps)
    return rates


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_pooled_signals_are_those_of_one_group_holding_every_parameter(name: str) -> None:
    """The pooled alignments of four groups are the one group's, step by step: norms and dot
    products add over groups."""
    reads: dict[str, list[Any]] = {"one": [], "four": []}
    for arm in reads:
        problem = mlp_regression(seed=3)
        groups: Any = _per_tensor(problem) if arm == "four" else problem.model.parameters()
        watcher = OffController()
        watcher.reads_buffer = True  # type: ignore[misc]  # a momentum buffer's alignment too
        opt = selftune.wrap(OPTIMIZERS[name](groups, 1e-2), watcher)
        opt.add_listener(lambda e, arm=arm: reads[arm].append(pooled(e.signals).groups[0]))
        train(problem, opt, 20)
    assert len(reads["four"]) == 20
    for one, four in zip(reads["one"], reads["four"], strict=True):
        for field in ("grad_norm", "update_norm", "cos_update", "dot_update", "cos_buffer"):
            a, b = getattr(one, field), getattr(four, field)
            assert (math.isnan(a) and math.isnan(b)) or b == pytest.approx(a, rel=1e-5, abs=1e-9)
    assert any(g.cos_update != 0 for g in reads["four"])
    if name == "sgd-momentum":
        assert all(math.isfinite(g.cos_buffer) for g in reads["four"][1:])


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_joint_groups_at_one_rate_tune_as_one_group(name: str) -> None:
    """A group per tensor at one rate, tuned jointly, takes one group's rates at every step
    (the range test, the cruise, the guard's cuts), where tuned each on its own they part."""
    arms: dict[str, list[list[float]]] = {}
    for arm, groups in (("one", None), ("joint", "joint"), ("each", "each")):
        problem = mlp_regression(seed=1)
        params: Any = problem.model.parameters() if groups is None else _per_tensor(problem)
        opt = selftune.wrap(OPTIMIZERS[name](params, 1e-3), groups=groups or "each")
        arms[arm] = _rates(opt, 150, problem)
    one = [r[0] for r in arms["one"]]
    assert max(one) / min(one) > 10, "the range test must move the rate for this to mean much"
    for step, (a, rates) in enumerate(zip(one, arms["joint"], strict=True)):
        assert rates == pytest.approx([a] * 4, rel=1e-4), f"step {step + 1}"
    assert any(max(r) / min(r) > 1.5 for r in arms["each"])


def test_joint_keeps_the_ratios_of_the_rates_given(tmp_path: Path) -> None:
    """A head at 10x and the rest at 1x stay 10x apart through the run, while the run's rate
    moves; every group's change is logged with the pooled signals it was made on."""
    problem = mlp_regression(seed=2)
    lrs = [1e-3, 1e-3, 1e-2, 1e-2]  # the second layer (the head) at 10x
    inner = torch.optim.SGD(_per_tensor(problem, lrs), lr=1e-3, momentum=0.9)
    opt = selftune.wrap(inner, groups="joint", log_dir=tmp_path / "run")
    rates = _rates(opt, 150, problem)
    opt.close()
    assert max(r[0] for r in rates) / 1e-3 > 2, "the run's rate must move"
    for r in rates:
        assert r == pytest.approx([r[0], r[0], 10 * r[0], 10 * r[0]], rel=1e-6)
    records = [json.loads(line) for line in (tmp_path / "run" / "decisions.jsonl").open()]
    decisions = [r for r in records if r["kind"] == "decision" and r["source"] == "controller"]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for d in decisions:
        by_step.setdefault(d["step"], []).append(d)
    assert by_step
    for made in by_step.values():
        assert sorted(d["group"] for d in made) == [0, 1, 2, 3]
        assert len({d["signals"]["cos_update"] for d in made}) == 1  # the pooled one, for all
        moved, *followed = made  # the group the controller moved, and those that followed it
        assert all(d["reason"].endswith(f"(joint: as group {moved['group']})") for d in followed)
        assert "joint: as group" not in moved["reason"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["controller_options"] == {"groups": "joint"}
    assert selftune.verify(tmp_path / "run").records == len(records)
    again = mlp_regression(seed=2)  # replayed: the same rates, from the log alone
    inner = torch.optim.SGD(_per_tensor(again, lrs), lr=1e-3, momentum=0.9)
    assert _rates(selftune.replay(inner, tmp_path / "run"), 150, again) == rates


def test_joint_moves_every_groups_momentum_memory_by_one_factor() -> None:
    """``hypergradient`` tunes momentum: groups at 0.9 and 0.8 keep their memories ``1 - μ``
    one to two apart while the run's momentum moves."""
    problem = mlp_regression(seed=5)
    groups = _per_tensor(problem)
    for g, momentum in zip(groups, (0.9, 0.9, 0.8, 0.8), strict=True):
        g["momentum"] = momentum
    opt = selftune.wrap(
        torch.optim.SGD(groups, lr=1e-2, momentum=0.9), "hypergradient", groups="joint"
    )
    seen: list[list[float]] = []
    opt.add_listener(lambda e: seen.append([1 - k["momentum"] for k in e.hyperparams]))
    train(problem, opt, 100)
    assert max(abs(m[0] - 0.1) for m in seen) > 0.002, "the run's momentum must move"
    for m in seen:
        assert m == pytest.approx([m[0], m[0], 2 * m[0], 2 * m[0]], rel=1e-6)


def test_joint_resumes_where_it_stopped() -> None:
    """A jointly tuned run's state saved at step 60 and loaded into a fresh wrapper goes on to
    the same rates as the run that never stopped; so does a state saved by the version before
    a new reference was followed."""

    def wrapped(problem: Problem) -> selftune.SelfTuned:
        return selftune.wrap(torch.optim.AdamW(_per_tensor(problem), lr=1e-3), groups="joint")

    straight = mlp_regression(seed=4)
    whole = _rates(wrapped(straight), 100, straight)

    for saved in ("now", "before"):
        problem = mlp_regression(seed=4)
        first = wrapped(problem)
        train(problem, first, 60)
        state = first.state_dict()
        joint = state["selftune"]["controller"]
        if saved == "before":  # as saved before a new reference was followed
            del joint["unit"], joint["live"], joint["own"], joint["scale"]
        second = wrapped(problem)  # a fresh wrapper of a fresh AdamW on the same model and data
        second.load_state_dict(state)
        assert _rates(second, 40, problem) == whole[60:]
    assert max(r[0] for r in whole) / 1e-3 > 5, "the run's rate must move"


def _scheduled(order: list[int], lambdas: list[Any], steps: int) -> dict[int, list[float]]:
    """A group per tensor at 1e-2, in ``order``, under a ``LambdaLR`` of ``lambdas`` (per
    tensor), tuned jointly: each tensor's rate at each step, and the full loss at the end."""
    problem = mlp_regression(seed=6)
    params = list(problem.model.parameters())
    inner = torch.optim.SGD([{"params": [params[i]]} for i in order], lr=1e-2, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, [lambdas[i] for i in order])
    opt = selftune.wrap(inner, groups="joint")
    rates: dict[int, list[float]] = {i: [] for i in order}
    for t in range(1, steps + 1):
        loss = problem.batch_loss(t)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        schedule.step()
        for i, knobs in zip(order, opt.hyperparams(), strict=True):
            rates[i].append(knobs["lr"])
    rates[-1] = [problem.full_loss()]
    return rates


def test_joint_reads_a_group_held_at_zero_as_no_reference() -> None:
    """A scheduler holds the first layer at rate 0 for 30 steps: the second layer's groups are
    tuned as the run (before, the rate 0 was the reference, and every change spread a rate of
    0 to them: cut to the floor of 1e-5 within five steps)."""
    held = [lambda s: 0.0 if s < 30 else 1.0] * 2 + [lambda s: 1.0] * 2
    rates = _scheduled([0, 1, 2, 3], held, 60)
    assert rates[0][:29] == [0.0] * 29
    assert min(rates[2] + rates[3]) >= 1e-2, "the head's range test grows from 1e-2"
    assert max(rates[2]) > 2e-2
    assert rates[2] == pytest.approx(rates[3], rel=1e-9)


def test_joint_reads_a_warm_up_on_one_group_whatever_the_groups_order() -> None:
    """A warm-up on one tensor only: the run is the same whether its group comes first or
    last (before, the first group's rise alone was read, and held every group)."""
    warm = [lambda s: min(1.0, (s + 1) / 20)] + [lambda s: 1.0] * 3
    first, last = _scheduled([0, 1, 2, 3], warm, 60), _scheduled([3, 2, 1, 0], warm, 60)
    for i in range(-1, 4):
        assert last[i] == pytest.approx(first[i], rel=1e-5)
    assert max(first[1]) > 2e-2, "the run's rate must move"


@pytest.mark.parametrize(("saved", "loaded"), [("joint", "each"), ("each", "joint")])
def test_a_state_of_one_mode_is_refused_by_the_other(saved: str, loaded: str) -> None:
    """One controller state for all groups, or one per group: loaded into the other mode it
    read groups as the wrong ones (a joint state's other groups ran a new range test)."""
    problem = mlp_regression(seed=7)
    opt = selftune.wrap(torch.optim.AdamW(_per_tensor(problem), lr=1e-3), groups=saved)
    train(problem, opt, 10)
    other = selftune.wrap(torch.optim.AdamW(_per_tensor(problem), lr=1e-3), groups=loaded)
    with pytest.raises(
        selftune.ConfigError, match=rf"wrapped with groups='{saved}'.*groups='{saved}' to resume"
    ):
        other.load_state_dict(opt.state_dict())


def test_a_bad_proposal_of_ones_own_controller_is_refused_by_name_when_joint() -> None:
    """The proposals are checked before they are spread: a proposal for a second group, of a
    controller that sees one, failed as nothing (it was spread as the first's)."""

    class Stray(OffController):
        name = "stray"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            return [selftune.Proposal(1, "lr", 0.5, "a group it was not given")]

    problem = mlp_regression(seed=8)
    opt = selftune.wrap(torch.optim.SGD(_per_tensor(problem), lr=1e-2), Stray(), groups="joint")
    with pytest.raises(selftune.ConfigError, match=r"controller 'stray': a proposal for group 1"):
        train(problem, opt, 2)


def test_a_group_held_by_its_bound_returns_to_its_ratio() -> None:
    """A controller doubles the run's rate three times and halves it three times; the head,
    at 10x, meets an absolute bound of 1.5e-2 on the way up and is back at 10x at the end
    (spread from the rate each group held, it stayed at 1.5e-2 / 8: 1.9x)."""

    class UpDown(OffController):
        name = "up-down"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            factor = 2.0 if signals.step <= 3 else 0.5 if signals.step <= 6 else 1.0
            return [selftune.Proposal(0, "lr", knobs[0]["lr"] * factor, "up, then down")]

    problem = mlp_regression(seed=9)
    inner = torch.optim.SGD(_per_tensor(problem, [1e-3, 1e-3, 1e-2, 1e-2]), lr=1e-3)
    opt = selftune.wrap(
        inner, UpDown(), groups="joint", bounds={"lr": (1e-5, 1.5e-2)}, lr_bounds_absolute=True
    )
    rates = _rates(opt, 8, problem)
    assert rates[2] == pytest.approx([8e-3, 8e-3, 1.5e-2, 1.5e-2])  # the head held
    assert rates[-1] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])


class _Lengthen(OffController):
    """Lengthens the run's momentum memory ``1 - μ`` by x0.95 a step for 8 steps, and keeps
    the knobs it was given."""

    name = "lengthen"

    def __init__(self) -> None:
        self.given: list[dict[str, float]] = []

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        self.given.append(dict(knobs[0]))
        if signals.step > 8:
            return []
        return [selftune.Proposal(0, "momentum", 1 - (1 - knobs[0]["momentum"]) * 0.95, "up")]


def test_a_new_reference_reads_the_run_in_the_units_of_the_first() -> None:
    """The first layer (rate 1e-2, momentum 0.9) is frozen at step 4 and the second (1e-3,
    0.8) becomes the reference: the controller reads on the same rate and momentum, and every
    memory keeps its ratio (read from the reference alone, the rate it read fell 10x, the
    first layer's momenta fell from 0.91 to 0.87 while the controller lengthened them, and the
    second layer's two, at 0.83, parted: 0.87 and 0.73 by step 12)."""
    problem = mlp_regression(seed=10)
    groups = _per_tensor(problem, [1e-2, 1e-2, 1e-3, 1e-3])
    for g, momentum in zip(groups, (0.9, 0.9, 0.8, 0.8), strict=True):
        g["momentum"] = momentum
    inner = torch.optim.SGD(groups, lr=1e-2)
    controller = _Lengthen()
    opt = selftune.wrap(inner, controller, groups="joint")
    memories: list[list[float]] = []
    opt.add_listener(lambda e: memories.append([1 - k["momentum"] for k in e.hyperparams]))

    def freeze(t: int) -> None:
        if t == 3:
            inner.param_groups[0]["lr"] = inner.param_groups[1]["lr"] = 0.0

    train(problem, opt, 12, on_step=freeze)
    assert [g["lr"] for g in controller.given] == pytest.approx([1e-2] * 12)
    assert memories[-1][0] == pytest.approx(0.1 * 0.95**8)
    for m in memories:
        assert m == pytest.approx([m[0], m[0], 2 * m[0], 2 * m[0]], rel=1e-9)


def test_a_reference_held_by_its_bound_holds_the_run() -> None:
    """A controller triples the run's rate twice under an absolute bound of 2e-2, which holds
    the reference (1e-2) at 2x: every group is at 2x (spread from the proposal, the others
    went on to 6x, and the ratio of 10 became 3.3)."""

    class Triple(OffController):
        name = "triple"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            up = signals.step in (3, 4)
            return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 3, "up")] if up else []

    problem = mlp_regression(seed=11)
    inner = torch.optim.SGD(_per_tensor(problem, [1e-2, 1e-2, 1e-3, 1e-3]), lr=1e-2)
    opt = selftune.wrap(
        inner, Triple(), groups="joint", bounds={"lr": (1e-5, 2e-2)}, lr_bounds_absolute=True
    )
    rates = _rates(opt, 6, problem)
    assert rates[-1] == pytest.approx([2e-2, 2e-2, 2e-3, 2e-3])


def test_two_changes_of_the_rate_in_one_step_move_every_group_alike() -> None:
    """A controller of one's own doubles the rate, then triples it, in one step: every group
    ends at 6x its own rate."""

    class Twice(OffController):
        name = "twice"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            if signals.step != 2:
                return []
            lr = knobs[0]["lr"]
            return [
                selftune.Proposal(0, "lr", lr * 2, "x2"),
                selftune.Proposal(0, "lr", lr * 6, "x3"),
            ]

    problem = mlp_regression(seed=14)
    inner = torch.optim.SGD(_per_tensor(problem, [1e-3, 1e-3, 1e-2, 1e-2]), lr=1e-3)
    opt = selftune.wrap(inner, Twice(), groups="joint", max_change={"lr": 10.0})
    assert _rates(opt, 3, problem)[-1] == pytest.approx([6e-3, 6e-3, 6e-2, 6e-2])


class _Grow(OffController):
    """Doubles the run's rate at each of its first three steps, and keeps the rates it read."""

    name = "grow"

    def __init__(self) -> None:
        self.read: list[float] = []

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        self.read.append(knobs[0]["lr"])
        up = signals.step <= 3
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 2, "up")] if up else []


def test_a_reference_warmed_up_alone_hands_over_the_rate_it_stood_at() -> None:
    """The first layer warms up from 0.1x over 10 steps and is frozen at step 20: the second
    takes over the rate the run stood at (compared by the rates first given, the warm-up's
    0.1x, it read the run 10x low)."""
    problem = mlp_regression(seed=15)
    inner = torch.optim.SGD(_per_tensor(problem), lr=1e-2)
    warm = [lambda s: 0.0 if s >= 19 else min(1.0, 0.1 + 0.09 * s)] * 2 + [lambda s: 1.0] * 2
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, warm)
    controller = _Grow()
    opt = selftune.wrap(inner, controller, groups="joint")
    train(problem, opt, 30, on_step=lambda t: schedule.step())
    assert controller.read[15:] == pytest.approx([8e-2] * 15)
    assert opt.hyperparams()[2]["lr"] == pytest.approx(8e-2)


@pytest.mark.parametrize("arm", ["held", "added"])
def test_groups_given_a_rate_take_the_run_s_scale_at_once(arm: str) -> None:
    """The run's rate stands at 8x: the second layer, held at zero until step 10 while the
    first is frozen there, or a group added at step 10, steps at 8x its own rate from then
    on, and the controller reads the run's rate on (left at its own until the rate next
    changed, it stayed at 1x, and one that took over the reference read the run 8x low)."""
    problem = mlp_regression(seed=16)
    params = list(problem.model.parameters())
    controller = _Grow()
    if arm == "held":
        inner = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
        held = [lambda s: 1.0 if s < 9 else 0.0, lambda s: 0.0 if s < 9 else 1.0]
        schedule = torch.optim.lr_scheduler.LambdaLR(inner, held)
        opt = selftune.wrap(inner, controller, groups="joint")
        train(problem, opt, 20, on_step=lambda t: schedule.step())
        assert [k["lr"] for k in opt.hyperparams()] == pytest.approx([0.0, 8e-2])
    else:
        opt = selftune.wrap(torch.optim.SGD(params[:2], lr=1e-2), controller, groups="joint")

        def add(t: int) -> None:
            if t == 9:
                opt.add_param_group({"params": params[2:], "lr": 1e-3})

        train(problem, opt, 20, on_step=add)
        assert [k["lr"] for k in opt.hyperparams()] == pytest.approx([8e-2, 8e-3])
    assert controller.read[3:] == pytest.approx([8e-2] * 17)


def test_a_join_and_a_change_in_one_step_replay(tmp_path: Path) -> None:
    """A group added mid-run joins the run's scale in the step ``hypergradient`` moves the
    rate: both decisions are logged, the log verifies, and the replay takes the run's rates
    (it read the second decision's rate as a replay that had left the run)."""

    def run(opt: selftune.SelfTuned, problem: Problem) -> list[list[float]]:
        params = list(problem.model.parameters())

        def add(t: int) -> None:
            if t == 9:
                opt.add_param_group({"params": params[2:], "lr": 1e-3, "momentum": 0.8})

        rates: list[list[float]] = []
        opt.add_listener(lambda e: rates.append([v for k in e.hyperparams for v in k.values()]))
        train(problem, opt, 20, on_step=add)
        return rates

    def inner(problem: Problem) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(problem.model.parameters())[:2], lr=1e-2, momentum=0.9)

    problem = mlp_regression(seed=17)
    opt = selftune.wrap(inner(problem), "hypergradient", groups="joint", log_dir=tmp_path / "r")
    rates = run(opt, problem)
    opt.close()
    records = [json.loads(line) for line in (tmp_path / "r" / "decisions.jsonl").open()]
    tenth = [(r["group"], r["knob"]) for r in records if r.get("step") == 10]
    assert tenth.count((1, "lr")) == 2, "a join, then the run's change"
    assert selftune.verify(tmp_path / "r").records == len(records)
    again = mlp_regression(seed=17)
    assert run(selftune.replay(inner(again), tmp_path / "r"), again) == rates


def test_a_knob_taken_over_on_one_group_is_tuned_on_the_rest() -> None:
    """The loop sets the first group's momentum at step 5: it is the loop's from then on, and
    the others' is tuned on (read from the first group, it stopped on every group)."""
    problem = mlp_regression(seed=18)
    inner = torch.optim.SGD(_per_tensor(problem), lr=1e-2, momentum=0.9)
    opt = selftune.wrap(inner, "hypergradient", groups="joint")
    seen: list[list[float]] = []
    opt.add_listener(lambda e: seen.append([k["momentum"] for k in e.hyperparams]))

    def take(t: int) -> None:
        if t == 5:
            inner.param_groups[0]["momentum"] = 0.95

    with pytest.warns(UserWarning, match="group 0's momentum was changed outside selftune"):
        train(problem, opt, 60, on_step=take)
    assert all(m[0] == 0.95 for m in seen[5:])
    assert abs(seen[-1][1] - seen[5][1]) > 1e-3, "the others' momentum must move"
    for m in seen:
        assert m[1:] == pytest.approx([m[1]] * 3, rel=1e-12)


def test_a_failure_before_the_first_proposal_is_told_as_for_one_group() -> None:
    """A non-finite loss at step 1, before the controller has read the run: ``auto`` holds the
    rate that failed as it does for one group (it was not told, so a second failure was not
    read as a repeat)."""
    states = {}
    for arm in ("one", "joint"):
        problem = mlp_regression(seed=19)
        params: Any = problem.model.parameters() if arm == "one" else _per_tensor(problem)
        wrapped = torch.optim.SGD(params, lr=3e-2, momentum=0.9)
        opt = selftune.wrap(wrapped, groups="each" if arm == "one" else "joint")
        for t in range(1, 31):
            loss = problem.batch_loss(t)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=torch.tensor(math.nan) if t == 1 else loss.detach())
        state = opt.state_dict()["selftune"]["controller"]
        states[arm] = state if arm == "one" else state["inner"]
    assert states["one"]["failed"] == [pytest.approx(3e-2)]
    assert states["joint"]["failed"] == states["one"]["failed"]
    assert states["joint"]["phase"] == states["one"]["phase"]


def _two_layers(problem: Problem, lrs: tuple[float, float], held: list[Any]) -> Any:
    """SGD on the problem's two layers at ``lrs``, under a ``LambdaLR`` of ``held``."""
    params = list(problem.model.parameters())
    groups = [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]
    inner = torch.optim.SGD(groups, lr=lrs[0])
    return inner, torch.optim.lr_scheduler.LambdaLR(inner, held)


#: a guard that rolls back at the first spike
AT_ONCE = selftune.GuardConfig(confirm=False)


def _spiked(problem: Problem, opt: Any, schedule: Any, steps: int, spike: int) -> None:
    """Train ``steps`` steps under ``schedule``, the loss passed at step ``spike`` 1e4x.  The
    wrapper's guard is to act at that spike (``GuardConfig(confirm=False)``): the tests are of
    the rollback at that step, not of a hold before it."""
    for t in range(1, steps + 1):
        loss = problem.batch_loss(t)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach() * (1e4 if t == spike else 1.0))
        schedule.step()


def test_a_rollback_past_a_new_reference_keeps_the_run_s_units() -> None:
    """The run at 8x; the first layer (1e-2) frozen at step 20, the second (2e-2) the
    reference; a spike at step 22 rolls back to the snapshot of step 1, taken before any group
    was read: the second layer stays at the rate the rollback set and the controller reads it
    in the first layer's units (read in its own, 2x high; and it went back to the rate that
    failed, 16x above the rollback's)."""
    problem = mlp_regression(seed=20)
    inner, schedule = _two_layers(problem, (1e-2, 2e-2), [lambda s: float(s < 19), lambda s: 1.0])
    controller = _Grow()
    opt = selftune.wrap(inner, controller, groups="joint", guard=AT_ONCE)
    events: list[Any] = []
    opt.add_listener(lambda e: events.append(e))
    _spiked(problem, opt, schedule, 26, spike=22)
    assert events[21].guard is not None and events[21].guard["restored_step"] == 1
    after = events[21].hyperparams[1]["lr"]
    assert after < 2e-2
    assert [e.hyperparams[1]["lr"] for e in events[22:]] == [after] * 4
    assert controller.read[-4:] == pytest.approx([after / 2] * 4)


def test_a_failure_as_the_reference_is_set_to_zero_is_told() -> None:
    """A scheduler sets the reference's rate to zero and the next step fails: ``auto`` holds
    the rate that failed, read from the group that takes over (the reference of rate zero told
    it nothing)."""
    failed = {}
    for arm in ("frozen", "none"):
        problem = mlp_regression(seed=21)
        held = [lambda s: float(s < 29)] if arm == "frozen" else [lambda s: 1.0]
        inner, schedule = _two_layers(problem, (1e-2, 1e-2), [*held, lambda s: 1.0])
        opt = selftune.wrap(inner, groups="joint", guard=AT_ONCE)
        _spiked(problem, opt, schedule, 30, spike=30)
        failed[arm] = opt.state_dict()["selftune"]["controller"]["inner"]["failed"]
    assert failed["none"][0] is not None
    assert failed["frozen"] == failed["none"]


def test_a_pause_of_every_group_keeps_the_run_s_units() -> None:
    """Both layers held at zero for two steps, the second (1e-3, the first's rate / 10) back
    first: the controller reads the run's rate on (it read it 10x low from then on)."""
    problem = mlp_regression(seed=22)
    held = [lambda s: float(not 10 <= s < 16), lambda s: float(not 10 <= s < 12)]
    inner, schedule = _two_layers(problem, (1e-2, 1e-3), held)
    controller = _Grow()
    opt = selftune.wrap(inner, controller, groups="joint", guard=False)
    train(problem, opt, 20, on_step=lambda t: schedule.step())
    assert controller.read[3:] == pytest.approx([8e-2] * (len(controller.read) - 3))
    assert [k["lr"] for k in opt.hyperparams()] == pytest.approx([8e-2, 8e-3])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_joint_tunes_momentum_whichever_group_lacks_it(kind: str) -> None:
    """A group with no momentum (SGD's 0, Adam's beta1 0), first or last: the others' is
    tuned alike either way (read from the first group alone, it was never tuned where that
    group had none)."""
    knob = "momentum" if kind == "sgd" else "beta1"
    ends: dict[str, list[float]] = {}
    for order in ("first", "last"):
        problem = mlp_regression(seed=12)
        groups = _per_tensor(problem)
        none = 0 if order == "first" else 3
        for i, g in enumerate(groups):
            if kind == "sgd":
                g["momentum"] = 0.0 if i == none else 0.9
            else:
                g["betas"] = (0.0 if i == none else 0.9, 0.999)
        inner = (
            torch.optim.SGD(groups, lr=1e-2) if kind == "sgd" else torch.optim.Adam(groups, lr=1e-3)
        )
        opt = selftune.wrap(inner, "hypergradient", groups="joint")
        train(problem, opt, 60)
        ends[order] = [k[knob] for i, k in enumerate(opt.hyperparams()) if i != none]
        assert all(knob not in k for i, k in enumerate(opt.hyperparams()) if i == none)
    for values in ends.values():
        assert abs(values[0] - 0.9) > 1e-3, "the momentum must move"
        assert values == pytest.approx([values[0]] * 3, rel=1e-9)


def test_joint_pools_only_the_groups_with_a_rate() -> None:
    """A scheduler holds the first layer at rate 0: the decisions read the signals of the
    rest alone (pooled with the held layer's gradient, their cosines were thinned)."""
    problem = mlp_regression(seed=13)
    params = list(problem.model.parameters())
    inner = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, momentum=0.9)
    torch.optim.lr_scheduler.LambdaLR(inner, [lambda s: 0.0, lambda s: 1.0])
    opt = selftune.wrap(inner, "hypergradient", groups="joint")
    pairs: list[tuple[float, float]] = []
    opt.add_listener(
        lambda e: pairs.extend(
            (d.signals["cos_update"], e.signals.groups[1].cos_update) for d in e.decisions
        )
    )
    train(problem, opt, 40)
    assert len(pairs) > 10
    assert all(read == own for read, own in pairs)
    assert any(own != 0 for _, own in pairs)


def test_groups_takes_each_or_joint() -> None:
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(selftune.ConfigError, match=r"groups='all': give 'each' .* or 'joint'"):
        selftune.wrap(opt, groups="all")
    selftune.wrap(opt, groups="joint").close()  # the refused wrap left it free


def test_a_joint_change_is_one_row_of_the_watch_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joint run logs a change once per group: with twelve groups the watch's panel of the
    last eight showed less than one change (a first read took the last 64 lines), and the
    watch, the report's table and its card counted each record as a decision of its own."""
    from selftune import cli, watch
    from selftune.report import write_report

    monkeypatch.setenv("COLUMNS", "250")  # a reason on one line
    problem = mlp_regression(seed=0, depth=5)  # twelve tensors, a group each
    folder = tmp_path / "run"
    opt = selftune.wrap(
        torch.optim.AdamW(_per_tensor(problem), lr=1e-3), groups="joint", log_dir=folder
    )
    train(problem, opt, 300)
    opt.close()
    records = [json.loads(line) for line in (folder / "decisions.jsonl").read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    followers = [r for r in decisions if "(joint: as group 0)" in r["reason"]]
    changes = len(decisions) - len(followers)
    assert changes > 8 and len(followers) == 11 * changes  # every change made on all 12
    assert cli.main(["watch", str(folder), "--once"]) == 0
    frame = capsys.readouterr().out
    assert f"decisions {changes} (+{len(followers)} made alike on other groups)" in frame
    shown = [
        r
        for r in records
        if r["kind"] in ("decision", "guard", "note")
        and not ("(joint: as group 0)" in r["reason"] and not r["clipped"])
    ][-8:]
    panel = [line for line in frame.splitlines() if re.match(r"│\s+\d+\s", line)]
    assert [int(line.split()[1]) for line in panel] == [r["step"] for r in shown]
    for line, r in zip(panel, shown, strict=True):
        if r["kind"] == "decision":
            assert f"g0 {r['knob']}, +11 groups " in line
    # a first read that skips most of the log counts the changes in the part it skips
    monkeypatch.setattr(watch, "RECENT", 2)
    assert cli.main(["watch", str(folder), "--once"]) == 0
    frame = capsys.readouterr().out
    assert f"decisions {changes} (+{len(followers)} made alike on other groups)" in frame
    panel = [line for line in frame.splitlines() if re.match(r"│\s+\d+\s", line)]
    assert [int(line.split()[1]) for line in panel] == [r["step"] for r in shown[-2:]]
    page = write_report(folder).read_text()
    assert f"{changes} decisions and {len(followers)} that made one alike" in page
    assert f"<b>{changes}</b><span>decisions</span>" in page
    rows = re.findall(r"<tr class=decision>.*?</tr>", page)
    assert len(rows) == min(changes, 100)
    assert all(re.search(r"title='also on groups 1, 2, .*, 11'>\+11<", row) for row in rows)


def test_a_follower_the_policy_held_apart_has_a_row_and_the_rest_still_fold(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of four groups, the second's momentum (0.5 where the others' are 0.95) moves by more
    than the step's limit at each change the controller makes: it keeps a row of its own in
    the report, and the groups after it fold into the change (they each took a row of their
    own too); the watch folds it too, saying so (its rows of clipped followers pushed the
    change out of the eight it shows)."""
    from selftune import cli
    from selftune.report import write_report

    class Shorten(OffController):
        name = "shorten"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            if signals.step > 6:
                return []
            return [selftune.Proposal(0, "momentum", knobs[0]["momentum"] - 0.01, "shorter")]

    monkeypatch.setenv("COLUMNS", "250")
    problem = mlp_regression(seed=20)
    groups = _per_tensor(problem)
    for group, momentum in zip(groups, (0.95, 0.5, 0.95, 0.95), strict=True):
        group["momentum"] = momentum
    folder = tmp_path / "run"
    opt = selftune.wrap(torch.optim.SGD(groups, lr=1e-2), Shorten(), groups="joint", log_dir=folder)
    train(problem, opt, 8)
    opt.close()
    records = [json.loads(line) for line in (folder / "decisions.jsonl").read_text().splitlines()]
    clipped = [r["group"] for r in records if r["kind"] == "decision" and r["clipped"]]
    assert clipped == [1] * 6
    assert cli.main(["watch", str(folder), "--once"]) == 0
    panel = [line for line in capsys.readouterr().out.splitlines() if re.match(r"│\s+\d+", line)]
    assert [line.split()[1:7] for line in panel] == [
        [str(step), "g0", "momentum,", "+3", "groups", "(1"] for step in range(1, 7)
    ]
    page = write_report(folder).read_text()
    rows = re.findall(r"<tr class=decision>.*?</tr>", page)
    assert len(rows) == 12 and sum(">+2<" in row for row in rows) == 6


def test_a_reason_like_a_followers_folds_nothing_in_a_run_not_joint(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold is for joint runs, as the manifest says: a controller of one's own whose reason
    reads like a follower's was counted as one, and folded into another group's change."""
    from selftune import cli
    from selftune.report import write_report

    class Copy(OffController):
        name = "copy"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            if signals.step != 2:
                return []
            return [
                selftune.Proposal(0, "lr", 2 * knobs[0]["lr"], "double"),
                selftune.Proposal(1, "lr", 2 * knobs[1]["lr"], "double (joint: as group 0)"),
            ]

    monkeypatch.setenv("COLUMNS", "250")
    problem = mlp_regression(seed=21)
    folder = tmp_path / "run"
    opt = selftune.wrap(torch.optim.SGD(_per_tensor(problem), lr=1e-2), Copy(), log_dir=folder)
    train(problem, opt, 3)
    opt.close()
    assert cli.main(["watch", str(folder), "--once"]) == 0
    frame = capsys.readouterr().out
    assert "decisions 2 " in frame and "made alike" not in frame and "+1 groups" not in frame
    assert "<b>2</b><span>decisions</span>" in write_report(folder).read_text()
