"""The benchmark's workloads: data, model, batch size, step budget, and the target to reach.

A :class:`Workload` is a plain record; what differs between kinds of data (how a minibatch is drawn,
what the loss is, what the held-out metric is) lives in three small task classes.  Every minibatch
is drawn from a ``torch.Generator`` that the runner seeds, and every evaluation uses the same fixed
held-out set, so a run is a function of its seed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from selftune.bench import data
from selftune.bench.models import (
    CharTransformer,
    Cnn1d,
    ConvAutoencoder1d,
    Denoiser,
    GruClassifier,
    MatrixFactorization,
    ResNet2d,
    Vae,
    mlp,
)


class Task(Protocol):
    """How to draw a minibatch, score it, and measure the held-out metric."""

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random minibatch (inputs, targets) drawn from the training part with ``gen``."""
        ...

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The training loss of one minibatch (a scalar with a graph)."""
        ...

    def evaluate(self, model: nn.Module) -> float:
        """The metric on the fixed held-out set (the model is in eval mode, gradients off)."""
        ...


class ClassifyTask:
    """Cross-entropy training; the metric is test accuracy."""

    def __init__(self, split: data.Supervised) -> None:
        self.split = split

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.split.y_train), (size,), generator=gen)
        return self.split.x_train[idx], self.split.y_train[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, model: nn.Module) -> float:
        pred = model(self.split.x_test).argmax(dim=1)
        return float((pred == self.split.y_test).float().mean())


class ReconstructTask:
    """An autoencoder's mean squared reconstruction error, trained and measured on the inputs."""

    def __init__(self, split: data.Supervised) -> None:
        self.split = split

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.split.x_train), (size,), generator=gen)
        x = self.split.x_train[idx]
        return x, x

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])

    def evaluate(self, model: nn.Module) -> float:
        return float(F.mse_loss(model(self.split.x_test), self.split.x_test))


class ElboTask(ReconstructTask):
    """A variational autoencoder's negative evidence lower bound (nats per example), trained on
    one reparameterised sample per example and measured on the test inputs with the same fixed
    noise at every evaluation, so that the metric moves only with the weights."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(batch[0]).mean()

    def evaluate(self, model: nn.Module) -> float:
        gen = torch.Generator().manual_seed(0)
        return float(model(self.split.x_test, gen=gen).mean())


class RegressTask(ClassifyTask):
    """Mean squared error on a scalar or vector target, trained and measured alike (test MSE)."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]).squeeze(-1), batch[1])

    def evaluate(self, model: nn.Module) -> float:
        return float(F.mse_loss(model(self.split.x_test).squeeze(-1), self.split.y_test))


class PoissonTask:
    """A physics-informed network for Poisson's equation ``-Δu = f`` on the unit square, ``u = 0``
    on its edges, with ``f`` made so that ``u*(x, y) = sin(πx) sin(πy) + 0.1 sin(4πx) sin(4πy)``
    solves it: a solution with two scales, of which networks learn the coarse one first.

    There is no dataset: each step draws fresh collocation points, ``size`` inside and a quarter
    as many on the edges.  The loss is the mean squared residual of the equation inside (the
    Laplacian by double backward through the network) plus the mean squared value on the edges;
    the metric is the relative L2 error against ``u*`` on a fixed grid of cell centres.
    """

    MODES = ((1.0, 1.0), (0.1, 4.0))  #: (amplitude, frequency in units of π) of u*'s terms

    def __init__(self, grid: int) -> None:
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
        xs, ys = torch.meshgrid(centres, centres, indexing="ij")
        self.points = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
        self.exact = self.solution(self.points)

    @classmethod
    def solution(cls, p: torch.Tensor) -> torch.Tensor:
        """``u*`` at points ``p`` (n x 2)."""
        return cls._terms(p, lambda a, k: a)

    @classmethod
    def source(cls, p: torch.Tensor) -> torch.Tensor:
        """``f = -Δu*`` at points ``p``: each term's Laplacian is ``-2 (kπ)²`` times the term."""
        return cls._terms(p, lambda a, k: a * 2 * (k * torch.pi) ** 2)

    @classmethod
    def _terms(cls, p: torch.Tensor, weight: Callable[[float, float], float]) -> torch.Tensor:
        """The sum over ``u*``'s terms of ``weight(amplitude, frequency)`` times the term's
        ``sin(kπx) sin(kπy)``."""
        x, y = p[:, 0], p[:, 1]
        terms = [
            weight(a, k) * torch.sin(k * torch.pi * x) * torch.sin(k * torch.pi * y)
            for a, k in cls.MODES
        ]
        return torch.stack(terms).sum(dim=0)

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inside = torch.rand(size, 2, generator=gen)
        n = max(1, size // 4)
        along = torch.rand(n, generator=gen)
        side = torch.randint(4, (n,), generator=gen)
        # sides 0-3: x = 0, x = 1, y = 0, y = 1
        fixed = (side % 2).float()
        edge = torch.where(
            (side < 2)[:, None], torch.stack([fixed, along], 1), torch.stack([along, fixed], 1)
        )
        return inside, edge

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inside, edge = batch
        x = inside.detach().requires_grad_(True)
        u = model(x).squeeze(-1)
        (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        laplacian = sum(
            torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2)
        )
        residual = -laplacian - self.source(inside)  # a fixed function of the points: no graph
        return residual.pow(2).mean() + model(edge).squeeze(-1).pow(2).mean()

    def evaluate(self, model: nn.Module) -> float:
        error = model(self.points).squeeze(-1) - self.exact
        return float(error.norm() / self.exact.norm())


class DenoiseTask:
    """A denoising diffusion model's objective (Ho, Jain and Abbeel 2020, "Denoising diffusion
    probabilistic models"): a point is noised to a random step ``t`` of ``STEPS`` under their
    linear schedule of variances, ``x_t = √ᾱ_t x + √(1 - ᾱ_t) ε``, and the model predicts ``ε``
    from ``x_t`` and ``t``; the loss is the mean squared error of that prediction.

    The step and the noise are drawn afresh for every example of every minibatch, so the
    objective is noisier than the data's sampling alone makes it, most of all where the steps
    are small and ``ε`` hard to tell from the data.  The metric is the same loss on the test
    points, each noised once, to a step and with noise drawn from a fixed seed, so that it moves
    only with the weights.
    """

    STEPS = 1000  #: diffusion steps T
    BETAS = (1e-4, 0.02)  #: the first and last step's noise variance, linear between

    def __init__(self, train: torch.Tensor, test: torch.Tensor) -> None:
        kept = torch.cumprod(1 - torch.linspace(*self.BETAS, self.STEPS), dim=0)  # ᾱ_t
        self.signal, self.noise = kept.sqrt(), (1 - kept).sqrt()
        self.train = train
        self.test = self._noised(test, torch.Generator().manual_seed(0))

    def _noised(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` noised to random steps: the model's inputs (``x_t`` and ``t`` as a last column)
        and the noise it should predict."""
        t = torch.randint(self.STEPS, (len(x),), generator=gen)
        eps = torch.randn(x.shape, generator=gen)
        noised = self.signal[t, None] * x + self.noise[t, None] * eps
        return torch.cat([noised, t[:, None].float()], dim=1), eps

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.train), (size,), generator=gen)
        return self._noised(self.train[idx], gen)

    def linear_guess(self, inputs: torch.Tensor) -> torch.Tensor:
        """The least-squares linear guess of the noise, ``√(1 - ᾱ_t) x_t`` (on standardised
        points ``x_t`` has unit variance and covariance ``√(1 - ᾱ_t)`` with ``ε``), whose expected
        squared error is ``ᾱ_t``: the score a denoiser must beat to have learnt the data's shape.
        """
        return self.noise[inputs[:, -1].long(), None] * inputs[:, :-1]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])

    def evaluate(self, model: nn.Module) -> float:
        return float(self.loss(model, self.test))


class LanguageTask:
    """Next-character prediction; the metric is the mean loss on fixed validation windows."""

    def __init__(self, text: data.CharText, context: int, eval_windows: int) -> None:
        if len(text.val) < context + 2:
            raise ValueError(
                f"the validation text has {len(text.val)} characters, fewer than the context "
                f"{context} + 2; use more text"
            )
        self.text = text
        self.context = context
        # Evenly spaced windows: the same ones at every evaluation of every run.
        last = len(text.val) - context - 1
        starts = torch.linspace(0, last, eval_windows).long()
        self.val_x = torch.stack([text.val[s : s + context] for s in starts])
        self.val_y = torch.stack([text.val[s + 1 : s + 1 + context] for s in starts])

    @property
    def vocab_size(self) -> int:
        return len(self.text.vocab)

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.text.train) - self.context - 1, (size,), generator=gen)
        offsets = torch.arange(self.context)
        x = self.text.train[starts[:, None] + offsets]
        y = self.text.train[starts[:, None] + offsets + 1]
        return x, y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = model(batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def evaluate(self, model: nn.Module) -> float:
        return float(self.loss(model, (self.val_x, self.val_y)))


@dataclass(frozen=True)
class Workload:
    """One benchmark problem and the rules of its race.

    ``steps_to_target`` is the first evaluation step (every ``eval_every`` steps) at which the
    held-out metric meets ``target``; ``steps`` is the budget every method gets.  ``held_out``
    marks a workload that no default was tuned on.  ``small`` selects the smoke suite's tiny data.
    """

    name: str
    description: str
    make_task: Callable[[bool], Task]  #: small -> task
    make_model: Callable[[Any], nn.Module]  #: task -> freshly initialised model
    batch_size: int
    steps: int
    eval_every: int
    metric: str
    target: float
    higher_is_better: bool
    held_out: bool = False
    small: bool = False

    def met(self, value: float) -> bool:
        """Whether a metric value reaches the target."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def task(self) -> Task:
        """The task, built once per process (data generation and encoding are not free)."""
        return _task(self.name, self.small)

    def smoke(self, steps: int = 60) -> Workload:
        """The same workload on tiny data with a tiny budget, for the smoke suite and tests."""
        return replace(
            self, steps=steps, eval_every=max(1, min(self.eval_every, steps // 3)), small=True
        )


@lru_cache(maxsize=16)
def _task(name: str, small: bool) -> Task:
    return WORKLOADS[name].make_task(small)


def _mnist1d(small: bool) -> data.Supervised:
    return data.mnist1d(num_samples=1_000 if small else 10_000, seed=42)


def _mnist1d_task(small: bool) -> Task:
    return ClassifyTask(_mnist1d(small))


def _mnist1d_reconstruct_task(small: bool) -> Task:
    return ReconstructTask(_mnist1d(small))


def _digits_task(small: bool) -> Task:
    return ClassifyTask(data.digits())


def _digits_reconstruct_task(small: bool) -> Task:
    return ReconstructTask(data.digits())


def _digits_elbo_task(small: bool) -> Task:
    return ElboTask(data.digits())


def _friedman_task(small: bool) -> Task:
    return RegressTask(data.friedman1(num_samples=1_000 if small else 10_000))


def _moons_task(small: bool) -> Task:
    return ClassifyTask(data.moons(num_samples=1_000 if small else 10_000))


def _hypercube_task(small: bool) -> Task:
    return ClassifyTask(data.hypercube(num_samples=1_000 if small else 10_000))


def _image_task(small: bool) -> Task:
    return RegressTask(data.image_pixels(factor=8 if small else 4))


def _ratings_task(small: bool) -> Task:
    return RegressTask(data.ratings(num_users=200, num_items=100) if small else data.ratings())


def _factorization(task: RegressTask) -> nn.Module:
    """Embedding tables as large as the ratings' users and items."""
    pairs = torch.cat([task.split.x_train, task.split.x_test])
    num_users, num_items = (int(n) + 1 for n in pairs.max(dim=0).values)
    return MatrixFactorization(num_users, num_items)


def _poisson_task(small: bool) -> Task:
    return PoissonTask(grid=16 if small else 64)


def _swiss_roll_task(small: bool) -> Task:
    return DenoiseTask(*data.swiss_roll(num_samples=1_000 if small else 10_000))


def _shakespeare_task(small: bool) -> Task:
    text = data.shakespeare(max_chars=50_000 if small else 1_000_000)
    return LanguageTask(text, context=64, eval_windows=32 if small else 256)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            name="mnist1d-cnn",
            description="MNIST-1D (10,000 generated samples, 80/20 split), 3-layer 1-D CNN",
            make_task=_mnist1d_task,
            make_model=lambda task: Cnn1d(),
            batch_size=128,
            steps=2000,
            eval_every=25,
            metric="test accuracy",
            target=0.93,
            higher_is_better=True,
        ),
        Workload(
            name="digits-mlp",
            description="scikit-learn digits (1,797 images, 80/20 split), MLP 64-128-128-10",
            make_task=_digits_task,
            make_model=lambda task: mlp([64, 128, 128, 10]),
            batch_size=64,
            steps=500,
            eval_every=10,
            metric="test accuracy",
            target=0.97,
            higher_is_better=True,
        ),
        Workload(
            name="shakespeare-char",
            description="Shakespeare's plays (first 1 MB), character transformer 2x64, context 64",
            make_task=_shakespeare_task,
            make_model=lambda task: CharTransformer(task.vocab_size),
            batch_size=32,
            steps=600,
            eval_every=25,
            metric="val loss",
            target=2.2,
            higher_is_better=False,
        ),
        Workload(
            name="digits-autoencoder",
            # held out until issue 7's pilots, which looked at it while choosing auto's settle
            description="scikit-learn digits, MLP autoencoder 64-128-16-128-64",
            make_task=_digits_reconstruct_task,
            make_model=lambda task: mlp([64, 128, 16, 128, 64], out_activation=nn.Sigmoid()),
            batch_size=64,
            steps=1000,
            eval_every=25,
            metric="test MSE",
            target=0.02,
            higher_is_better=False,
        ),
        Workload(
            name="mnist1d-gru",
            # held out until issue 7's pilots 8-16, which looked at it to mend auto's flat start
            description="MNIST-1D read as 40 steps of 1 feature, GRU 64, linear head",
            make_task=_mnist1d_task,
            make_model=lambda task: GruClassifier(),
            batch_size=128,
            steps=500,
            eval_every=25,
            metric="test accuracy",
            target=0.94,
            higher_is_better=True,
        ),
        Workload(
            name="friedman-mlp",
            # held out until issue 7's pilots 17-19, whose rollback rules were read off its runs
            description="Friedman #1 regression (10,000 generated samples, noise 1, 80/20 split), "
            "MLP 10-128-128-1",
            make_task=_friedman_task,
            make_model=lambda task: mlp([10, 128, 128, 1]),
            batch_size=64,
            steps=1500,
            eval_every=25,
            metric="test MSE",
            target=2.0,
            higher_is_better=False,
        ),
        Workload(
            # its target and budget were chosen from three seeds of plain AdamW and SGD at their
            # defaults only (bench-results/held-out-choice), before auto first ran on it; held out
            # until its runs rejected issue 7's pilot 26
            name="digits-resnet",
            description="scikit-learn digits as 8x8 images, residual CNN with batch norm "
            "(2 blocks, 32 channels)",
            make_task=_digits_task,
            make_model=lambda task: ResNet2d(),
            batch_size=64,
            steps=600,
            eval_every=25,
            metric="test accuracy",
            target=0.985,
            higher_is_better=True,
        ),
        Workload(
            # its target and budget were chosen from three seeds of plain AdamW and SGD at their
            # defaults only (bench-results/held-out-choice), with auto's constants committed
            # (6d0c40c) before auto first ran on it; held out until issue 7's pilots 57-59, judged
            # partly on its runs after gap.py had read where its rate fell short
            name="mnist1d-conv-autoencoder",
            description="MNIST-1D signals, 1-D convolutional autoencoder (code 16, "
            "transposed-convolution decoder)",
            make_task=_mnist1d_reconstruct_task,
            make_model=lambda task: ConvAutoencoder1d(),
            batch_size=128,
            steps=2200,
            eval_every=25,
            metric="test MSE",
            target=0.1,
            higher_is_better=False,
        ),
        Workload(
            # held out: its target and budget were chosen from three seeds of plain AdamW and SGD
            # at their defaults only (bench-results/held-out-choice), with auto's constants
            # committed (5cd85e0) before auto first ran on it
            name="moons-deep-tanh",
            description="scikit-learn two moons (10,000 generated samples, noise 0.25, 80/20 "
            "split), deep narrow tanh MLP 2-(32x6)-2",
            make_task=_moons_task,
            make_model=lambda task: mlp([2, *[32] * 6, 2], activation=nn.Tanh),
            batch_size=64,
            steps=1200,
            eval_every=25,
            metric="test accuracy",
            target=0.93,
            higher_is_better=True,
            held_out=True,
        ),
        Workload(
            # held out: its target and budget were chosen from three seeds of plain AdamW and SGD
            # at their defaults only (bench-results/held-out-choice), with every constant of auto
            # committed before auto first ran on it
            name="hypercube-logreg",
            description="scikit-learn make_classification (10,000 samples, 50 features, 5 "
            "classes, 80/20 split), multinomial logistic regression (a convex problem)",
            make_task=_hypercube_task,
            make_model=lambda task: mlp([50, 5]),
            batch_size=64,
            steps=900,
            eval_every=10,
            metric="test accuracy",
            target=0.78,
            higher_is_better=True,
            held_out=True,
        ),
        Workload(
            # held out: its target and budget were chosen from three seeds of plain AdamW and SGD
            # at their defaults only (bench-results/held-out-choice), with every constant of auto
            # committed before auto first ran on it
            name="image-fourier-mlp",
            description="scikit-learn's China photograph (106x160 pixels, a random fifth held "
            "out), coordinate MLP 128-256-256-3 on random Fourier features of the position",
            make_task=_image_task,
            make_model=lambda task: mlp([128, 256, 256, 3]),
            batch_size=256,
            steps=3400,
            eval_every=25,
            metric="test MSE",
            target=0.01,
            higher_is_better=False,
            held_out=True,
        ),
        Workload(
            # its target and budget were chosen from three seeds of plain AdamW and SGD at their
            # defaults only (bench-results/held-out-choice), with every constant of auto committed
            # before auto first ran on it; held out until pilot 74, made from a trace of its runs
            name="ratings-factorization",
            description="ratings of 500 items by 1,000 users from scikit-learn "
            "make_low_rank_matrix (a fifth of the cells rated, with noise; 80/20 split of "
            "them), matrix factorization with 32-dimensional embeddings and biases",
            make_task=_ratings_task,
            make_model=_factorization,
            batch_size=256,
            steps=7300,
            eval_every=25,
            metric="test MSE",
            target=1.0,
            higher_is_better=False,
        ),
        Workload(
            # its target and budget were chosen from three seeds of plain AdamW and SGD at their
            # defaults only (bench-results/held-out-choice), with every constant of auto committed
            # before auto first ran on it; held out until pilot 77, made from a trace of its runs
            name="digits-vae",
            description="scikit-learn digits (8x8, 1437/360 split), variational autoencoder "
            "64-128-(2x8) / 8-128-64 with Bernoulli pixels, one reparameterised sample a step",
            make_task=_digits_elbo_task,
            make_model=lambda task: Vae(),
            batch_size=64,
            steps=3400,
            eval_every=25,
            metric="test negative ELBO (nats)",
            target=24.5,
            higher_is_better=False,
        ),
        Workload(
            # held out: its target and budget were chosen from three seeds of plain AdamW and SGD
            # at their defaults only (bench-results/held-out-choice), with every constant of auto
            # committed before auto first ran on it
            name="poisson-pinn",
            description="Poisson's equation on the unit square (a two-scale solution, zero on the "
            "edges), physics-informed tanh MLP 2-64-64-64-1 on fresh collocation points",
            make_task=_poisson_task,
            make_model=lambda task: mlp([2, 64, 64, 64, 1], activation=nn.Tanh),
            batch_size=256,
            steps=3000,
            eval_every=25,
            metric="test relative L2 error",
            target=0.15,
            higher_is_better=False,
            held_out=True,
        ),
        Workload(
            # its target and budget were chosen from three seeds of plain AdamW and SGD at their
            # defaults only (bench-results/held-out-choice), with every constant of auto committed
            # before auto first ran on it; held out until pilot 83, made from its first runs
            name="swissroll-diffusion",
            description="scikit-learn swiss roll (10,000 generated points, noise 0.5, 80/20 "
            "split, seen from its side), denoising diffusion model: MLP 18-128-128-128-2 "
            "predicting the noise at one of 1,000 steps",
            make_task=_swiss_roll_task,
            make_model=lambda task: Denoiser(period=DenoiseTask.STEPS),
            batch_size=128,
            steps=5200,
            eval_every=25,
            metric="test denoising MSE",
            target=0.26,
            higher_is_better=False,
        ),
    ]
}


T = TypeVar("T")


def select(patterns: list[str] | None) -> list[Workload]:
    """The workloads whose names match any of the glob ``patterns`` (all when none are given)."""
    return by_glob(WORKLOADS, patterns, "workload", f"choose from {', '.join(WORKLOADS)}")


def by_glob(items: dict[str, T], patterns: list[str] | None, what: str, hint: str) -> list[T]:
    """The ``items`` whose names match any of the glob ``patterns`` (all when none are given).

    Every pattern must match one: a typo beside a pattern that matched was dropped without a
    word (``--workloads mnist1d-cnn,digts-mlp`` planned mnist1d-cnn alone), and the suite ran
    without the runs it was asked for.  ``what`` names an item, ``hint`` the valid names.
    """
    if not patterns:
        return list(items.values())
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(name, p) for name in items)]
    if unmatched:
        raise ValueError(f"no {what} matches {', '.join(map(repr, unmatched))}; {hint}")
    return [item for name, item in items.items() if any(fnmatch.fnmatch(name, p) for p in patterns)]
