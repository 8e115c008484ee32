"""The benchmark's methods: how each one builds its optimizer, and how the loop must drive it.

A :class:`Method` is a name (the report's row label), a family, the base optimizer it is compared
against (``sgd`` or ``adamw``: its default and its grid's oracle), and a builder that returns a
:class:`Handle`.  The handle hides what differs between methods from the training loop: selftune
wants the loss at ``step``, Schedule-Free wants ``train()``/``eval()`` around evaluation,
ReduceLROnPlateau and selftune's ``observe`` want the evaluation metric, schedulers step after
the optimizer, the *effective* learning rate is read differently by each (Prodigy and
D-Adaptation: ``lr × d``; DoG: its ``eta``), and the averaged rows (``-avg``) evaluate at an
average of the weights: selftune's own (``wrap(..., average=True)``), or for the plain optimizers
of the grid the same :class:`~selftune.average.WeightAverage` kept beside them, so both sides of
a comparison are averaged alike.  DoG is evaluated at the polynomial-decay average its authors'
package keeps (they state that DoG without it is not the method they published); that average
needs the model, which is why a builder is given the model rather than its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from selftune.average import DEFAULT_DECAY, WeightAverage, swapped
from selftune.bench.workloads import by_glob
from selftune.controllers.base import Controller
from selftune.tuner import SelfTuned

#: Learning-rate grids, 3x apart, meant to hold the best member inside; the report names any
#: oracle at a grid's edge (the digits autoencoder's SGD wants the top rate, 3.0).
ADAMW_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SGD_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
#: selftune's start sweep: its default controller started far from a good rate, both ways.
ADAMW_SWEEP = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SGD_SWEEP = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SGD_DEFAULT = {"lr": 0.01, "momentum": 0.9}
ADAMW_DEFAULT = {"lr": 1e-3}
#: each base's default rate: where its default row, and selftune's rows at the default, start
DEFAULT_LR = {"sgd": SGD_DEFAULT["lr"], "adamw": ADAMW_DEFAULT["lr"]}
#: Seeds in the full suite: headline methods need 5 to resolve 20-30% differences; grid and
#: ablation rows 3, which is enough to pick the oracle and keeps the suite within its time.
HEADLINE_SEEDS = 5
OTHER_SEEDS = 3


@dataclass(frozen=True)
class Setting:
    """What a builder may know about the run: its budget, the metric's direction, the seed."""

    steps: int
    higher_is_better: bool
    seed: int


class Average(Protocol):
    """An average of the weights kept beside an optimizer, to evaluate in their place."""

    def update(self, groups: list[dict[str, Any]]) -> None: ...

    def swapped_in(self, groups: list[dict[str, Any]]) -> AbstractContextManager[object]: ...


class _PolynomialAverage:
    """The DoG package's ``PolynomialDecayAverager`` (Shamir and Zhang's average, weights and
    buffers alike) seen as an :class:`Average`: evaluation copies its model's state in."""

    def __init__(self, model: torch.nn.Module) -> None:
        from dog import PolynomialDecayAverager

        self.model = model
        self.averager = PolynomialDecayAverager(model)

    def update(self, groups: list[dict[str, Any]]) -> None:
        self.averager.step()

    def swapped_in(self, groups: list[dict[str, Any]]) -> AbstractContextManager[object]:
        state, averaged = self.model.state_dict(), self.averager.averaged_model.state_dict()
        return swapped(list(state.values()), [averaged[k] for k in state])


class Handle:
    """An optimizer as the training loop drives it (see the module docstring for why)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
        pass_loss: bool = False,
        mode_switch: bool = False,
        lr_of: Callable[[torch.optim.Optimizer], float] | None = None,
        metric_to: Callable[[float], None] | None = None,
        average: Average | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.plateau = plateau
        self.pass_loss = pass_loss
        self.mode_switch = mode_switch
        self._lr_of = lr_of or _group_lr
        self._metric_to = metric_to
        #: a weight average the handle keeps for a plain optimizer (selftune keeps its own)
        self._average = average

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step (the selftune wrapper gets the loss), then the scheduler's."""
        if self.pass_loss:
            self.optimizer.step(loss=loss.detach())  # type: ignore[call-overload]
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self._average is not None:
            self._average.update(self.optimizer.param_groups)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The weights to evaluate: Schedule-Free's averaged point, or a weight average."""
        if self.mode_switch:
            self.optimizer.eval()  # type: ignore[attr-defined]
        try:
            with self._averaged():
                yield
        finally:  # an evaluation that raises must not leave the next steps at the eval point
            if self.mode_switch:
                self.optimizer.train()  # type: ignore[attr-defined]

    def _averaged(self) -> AbstractContextManager[object]:
        if self._average is not None:
            return self._average.swapped_in(self.optimizer.param_groups)
        if isinstance(self.optimizer, SelfTuned) and self.optimizer.average is not None:
            return self.optimizer.averaged()
        return nullcontext()

    def observe(self, metric: float) -> None:
        """Tell ReduceLROnPlateau, or selftune, the evaluation metric."""
        if self.plateau is not None:
            self.plateau.step(metric)
        if self._metric_to is not None:
            self._metric_to(metric)

    def lr(self) -> float:
        """The effective learning rate of the first parameter group."""
        return float(self._lr_of(self.optimizer))


def _group_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])


def _d_adapted_lr(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return float(group["lr"]) * float(group["d"])


def _dog_lr(opt: torch.optim.Optimizer) -> float:
    """DoG's step size, which it sets at each step from the gradients: none before the first."""
    eta = opt.param_groups[0].get("eta")
    return float(eta[0]) if eta else 0.0


def _scheduled_lr(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return float(group.get("scheduled_lr", group["lr"]))


def _selftune_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.hyperparams()[0]["lr"])  # type: ignore[attr-defined]


Builder = Callable[[torch.nn.Module, Setting], Handle]


@dataclass(frozen=True)
class Method:
    """A benchmark row: ``family`` groups rows in the report, ``base`` names the comparison."""

    name: str
    family: str  #: default, grid, plateau, published, hypergradient, selftune, sweep
    base: str  #: "sgd" or "adamw": whose default and oracle this row is compared with
    build: Builder
    seeds: int  #: seeds in the full suite
    lr0: float | None = None  #: the starting (or constant) learning rate, where there is one


def _base(base: str, lr: float) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    if base == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=SGD_DEFAULT["momentum"])
    return lambda params: torch.optim.AdamW(params, lr=lr)


def lr_label(lr: float) -> str:
    """``3e-4``, ``1e-2``, ``1e0``: the compact form used in method names."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    return f"{mantissa}e{exponent}"


def _plain(base: str, lr: float, schedule: str, average: bool = False) -> Builder:
    make = _base(base, lr)

    def build(model: torch.nn.Module, s: Setting) -> Handle:
        opt = make(model.parameters())
        sched = None
        if schedule == "cos":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.steps)
        kept = WeightAverage(opt.param_groups, DEFAULT_DECAY) if average else None
        return Handle(opt, scheduler=sched, average=kept)

    return build


def _plateau(model: torch.nn.Module, s: Setting) -> Handle:
    # Starts at the default rate (anything else would borrow the grid's knowledge) and halves it
    # at the fourth evaluation in a row without improvement (patience 3, in evaluations).
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_DEFAULT["lr"])
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max" if s.higher_is_better else "min", factor=0.5, patience=3
    )
    return Handle(opt, plateau=plateau)


def _prodigy(model: torch.nn.Module, s: Setting) -> Handle:
    from prodigyopt import Prodigy

    return Handle(Prodigy(model.parameters(), lr=1.0), lr_of=_d_adapted_lr)


def _dadapt_adam(model: torch.nn.Module, s: Setting) -> Handle:
    from dadaptation import DAdaptAdam

    return Handle(DAdaptAdam(model.parameters(), lr=1.0), lr_of=_d_adapted_lr)


def _schedulefree(model: torch.nn.Module, s: Setting) -> Handle:
    from schedulefree import AdamWScheduleFree

    return Handle(AdamWScheduleFree(model.parameters()), mode_switch=True, lr_of=_scheduled_lr)


def _dog(model: torch.nn.Module, s: Setting) -> Handle:
    # At the package's defaults, with the one exception its README makes: ``reps_rel`` 1e-4, not
    # 1e-6, for a model with batch normalization (read off the model, not tuned on any run).
    from dog import DoG

    nn = torch.nn
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    batch_norm = any(isinstance(m, kinds) for m in model.modules())
    opt = DoG(model.parameters(), reps_rel=1e-4 if batch_norm else 1e-6)
    return Handle(opt, lr_of=_dog_lr, average=_PolynomialAverage(model))


def _hd_sgd(model: torch.nn.Module, s: Setting) -> Handle:
    from selftune.bench.hd import SGDHD

    return Handle(SGDHD(model.parameters(), lr=SGD_DEFAULT["lr"], momentum=SGD_DEFAULT["momentum"]))


def _hd_adam(model: torch.nn.Module, s: Setting) -> Handle:
    from selftune.bench.hd import AdamHD

    return Handle(AdamHD(model.parameters(), lr=ADAMW_DEFAULT["lr"]))


def _selftune(
    base: str,
    lr: float,
    controller: str | Controller,
    metric: bool = True,
    average: bool = False,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> Builder:
    """selftune given the loss at every step and, unless ``metric`` is False, the evaluation
    metric after every evaluation (``observe``), as a loop that evaluates can give it;
    ``average``: evaluated at its weight average (the metric it reads being the average's).
    A controller instance (the probes' variants) serves one run: build one per run.
    ``bounds``: the policy's, for a probe's variant (the benchmark's rows keep the defaults)."""
    make = _base(base, lr)

    def build(model: torch.nn.Module, s: Setting) -> Handle:
        import selftune

        opt = selftune.wrap(
            make(model.parameters()),
            controller=controller,
            seed=s.seed,
            average=average,
            bounds=bounds,
        )
        mode = "max" if s.higher_is_better else "min"
        to = (lambda value: opt.observe(value, mode=mode)) if metric else None
        return Handle(opt, pass_loss=True, lr_of=_selftune_lr, metric_to=to)

    return build


def _controllers() -> list[str]:
    import selftune

    return list(selftune.CONTROLLERS)


def _registry() -> dict[str, Method]:
    grids = {"sgd": SGD_GRID, "adamw": ADAMW_GRID}
    sweeps = {"sgd": SGD_SWEEP, "adamw": ADAMW_SWEEP}
    rows: list[Method] = []
    for b in ("sgd", "adamw"):
        rows.append(
            Method(
                f"{b}-default",
                "default",
                b,
                _plain(b, DEFAULT_LR[b], "const"),
                HEADLINE_SEEDS,
                DEFAULT_LR[b],
            )
        )
    for b in ("sgd", "adamw"):
        for schedule in ("const", "cos"):
            for lr in grids[b]:
                for average, suffix, family in ((False, "", "grid"), (True, "-avg", "grid-avg")):
                    rows.append(
                        Method(
                            f"{b}-grid-{schedule}-{lr_label(lr)}{suffix}",
                            family,
                            b,
                            _plain(b, lr, schedule, average),
                            OTHER_SEEDS,
                            lr,
                        )
                    )
    rows += [
        Method("adamw-plateau", "plateau", "adamw", _plateau, HEADLINE_SEEDS, ADAMW_DEFAULT["lr"]),
        Method("prodigy", "published", "adamw", _prodigy, HEADLINE_SEEDS),
        Method("dadapt-adam", "published", "adamw", _dadapt_adam, HEADLINE_SEEDS),
        Method("schedulefree-adamw", "published", "adamw", _schedulefree, HEADLINE_SEEDS),
        Method("dog-sgd", "published", "sgd", _dog, HEADLINE_SEEDS),
        Method("hd-sgd", "hypergradient", "sgd", _hd_sgd, HEADLINE_SEEDS, SGD_DEFAULT["lr"]),
        Method("hd-adam", "hypergradient", "adamw", _hd_adam, HEADLINE_SEEDS, ADAMW_DEFAULT["lr"]),
    ]
    for controller in _controllers():
        seeds = HEADLINE_SEEDS if controller == "auto" else OTHER_SEEDS
        for b in ("sgd", "adamw"):
            rows.append(
                Method(
                    f"selftune-{controller}-{b}",
                    "selftune",
                    b,
                    _selftune(b, DEFAULT_LR[b], controller),
                    seeds,
                    DEFAULT_LR[b],
                )
            )
    for b in ("sgd", "adamw"):  # auto evaluated at its weight average, against the averaged grid
        rows.append(
            Method(
                f"selftune-auto-{b}-avg",
                "averaged",
                b,
                _selftune(b, DEFAULT_LR[b], "auto", average=True),
                HEADLINE_SEEDS,
                DEFAULT_LR[b],
            )
        )
    for b in ("sgd", "adamw"):  # auto as a loop that never evaluates drives it: the loss alone
        rows.append(
            Method(
                f"selftune-auto-blind-{b}",
                "selftune",
                b,
                _selftune(b, DEFAULT_LR[b], "auto", metric=False),
                HEADLINE_SEEDS,
                DEFAULT_LR[b],
            )
        )
    for b in ("adamw", "sgd"):
        for lr in sweeps[b]:
            for average, suffix, family in ((False, "", "sweep"), (True, "-avg", "sweep-avg")):
                rows.append(
                    Method(
                        f"selftune-auto-{b}-lr{lr_label(lr)}{suffix}",
                        family,
                        b,
                        _selftune(b, lr, "auto", average=average),
                        OTHER_SEEDS,
                        lr,
                    )
                )
    return {m.name: m for m in rows}


_METHODS: dict[str, Method] = {}


def methods() -> dict[str, Method]:
    """Every method by name (built on first use, since it asks selftune for its controllers)."""
    if not _METHODS:
        _METHODS.update(_registry())
    return _METHODS


def select(patterns: list[str] | None) -> list[Method]:
    """The methods whose names match any of the glob ``patterns`` (all when none are given)."""
    hint = (
        "names look like 'adamw-default', 'sgd-grid-cos-1e-1', 'selftune-auto-*' (see "
        "docs/benchmarks.md, or selftune bench --list)"
    )
    return by_glob(methods(), patterns, "method", hint)
