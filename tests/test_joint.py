"""``wrap(..., groups="joint")``: every param group tuned as one, on real runs."""

from __future__ import annotations

import json
import math
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
    the same rates as the run that never stopped."""

    def wrapped(problem: Problem) -> selftune.SelfTuned:
        return selftune.wrap(torch.optim.AdamW(_per_tensor(problem), lr=1e-3), groups="joint")

    straight = mlp_regression(seed=4)
    whole = _rates(wrapped(straight), 100, straight)

    problem = mlp_regression(seed=4)
    first = wrapped(problem)
    train(problem, first, 60)
    second = wrapped(problem)  # a fresh wrapper of a fresh AdamW on the same model and data
    second.load_state_dict(first.state_dict())
    assert _rates(second, 40, problem) == whole[60:]
    assert max(r[0] for r in whole) / 1e-3 > 5, "the run's rate must move"


def test_groups_takes_each_or_joint() -> None:
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(selftune.ConfigError, match=r"groups='all': give 'each' .* or 'joint'"):
        selftune.wrap(opt, groups="all")
    selftune.wrap(opt, groups="joint").close()  # the refused wrap left it free
