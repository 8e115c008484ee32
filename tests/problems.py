"""Small, real training problems shared by the tests: a noisy quadratic, an MLP regression, a
Gaussian negative log-likelihood (a loss that goes below zero), and a GAN on a ring of Gaussians
(two players, each lowering a loss the other raises).

Each problem is deterministic for a seed and cheap (a few hundred steps in well under a second),
and the first two come with a reference learning rate per optimizer: a rate at which the plain
optimizer trains well.  The contract tests start 100x below and 10x above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from selftune.tuner import SelfTuned

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd-momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "sgd-nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.5),
}


@dataclass
class Problem:
    """A model, a way to draw one minibatch loss, and a way to measure the full loss."""

    model: torch.nn.Module
    batch_loss: Callable[[int], torch.Tensor]  #: loss of the minibatch drawn for step t
    full_loss: Callable[[], float]


def noisy_quadratic(seed: int = 0, dim: int = 20) -> Problem:
    """0.5·Σ hᵢ(xᵢ − cᵢ)² with curvatures hᵢ from 0.1 to 10 and noisy centres cᵢ per step.

    The noisy quadratic model of Zhang et al. 2019 ("Which algorithmic choices matter at which
    batch sizes?"): curvature spread and gradient noise, the two things a rate must balance.
    """
    gen = torch.Generator().manual_seed(seed)
    h = torch.logspace(-1, 1, dim)
    x = torch.nn.Parameter(torch.randn(dim, generator=gen) * 3)
    model = torch.nn.Module()
    model.x = x  # type: ignore[assignment]
    noise = torch.Generator().manual_seed(seed + 1)

    def batch_loss(t: int) -> torch.Tensor:
        c = torch.randn(dim, generator=noise) * 0.1 / h.sqrt()
        return 0.5 * (h * (x - c) ** 2).sum()

    def full_loss() -> float:
        with torch.no_grad():
            return float(0.5 * (h * x**2).sum())

    return Problem(model, batch_loss, full_loss)


def mlp_regression(seed: int = 0, depth: int = 1) -> Problem:
    """A tanh MLP (``depth`` hidden layers) fitting a smooth function of 8 inputs from
    minibatches of 32."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 8, generator=gen)
    w = torch.randn(8, 1, generator=gen) / 8**0.5
    Y = torch.sin(2 * X @ w) + 0.05 * torch.randn(512, 1, generator=gen)
    torch.manual_seed(seed)
    hidden = [torch.nn.Linear(8, 32), torch.nn.Tanh()]
    for _ in range(depth - 1):
        hidden += [torch.nn.Linear(32, 32), torch.nn.Tanh()]
    model = torch.nn.Sequential(*hidden, torch.nn.Linear(32, 1))
    order = torch.Generator().manual_seed(seed + 1)

    def batch_loss(t: int) -> torch.Tensor:
        idx = torch.randint(0, 512, (32,), generator=order)
        return torch.nn.functional.mse_loss(model(X[idx]), Y[idx])

    def full_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(X), Y))

    return Problem(model, batch_loss, full_loss)


def gaussian_nll(seed: int, noise: float) -> Problem:
    """An MLP predicting the mean and the spread of ``sin(2x)`` plus Gaussian noise of spread
    ``noise``, trained on ``torch.nn.GaussianNLLLoss`` from minibatches of 64: its loss ends
    near ``log(noise) + 0.5``, below zero for a noise under 0.61.  The mean's bias is the
    model's last parameter."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(2000, 1, generator=gen) * 6 - 3
    Y = torch.sin(2 * X) + noise * torch.randn(2000, 1, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    )  # fmt: skip
    order, crit = torch.Generator().manual_seed(seed + 1), torch.nn.GaussianNLLLoss()

    def nll(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return crit(out[:, :1], y, torch.nn.functional.softplus(out[:, 1:]) + 1e-6)

    def batch_loss(t: int) -> torch.Tensor:
        idx = torch.randint(0, 2000, (64,), generator=order)
        return nll(X[idx], Y[idx])

    def full_loss() -> float:
        with torch.no_grad():
            return float(nll(X, Y))

    return Problem(model, batch_loss, full_loss)


PROBLEMS: dict[str, Callable[[int], Problem]] = {
    "quadratic": noisy_quadratic,
    "mlp": mlp_regression,
}

#: a rate at which each plain optimizer trains each problem well (found by a coarse sweep)
REFERENCE_LR: dict[str, dict[str, float]] = {
    "quadratic": {
        "sgd": 0.1,
        "sgd-momentum": 0.02,
        "sgd-nesterov": 0.02,
        "adam": 0.1,
        "adamw": 0.1,
        "rmsprop": 0.03,
    },
    "mlp": {
        "sgd": 0.1,
        "sgd-momentum": 0.03,
        "sgd-nesterov": 0.03,
        "adam": 0.03,
        "adamw": 0.03,
        "rmsprop": 0.01,
    },
}


def train(
    problem: Problem,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    pass_loss: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train for ``steps`` steps; return the full loss after each step (inf once non-finite)."""
    curve = []
    for t in range(1, steps + 1):
        loss = problem.batch_loss(t)
        optimizer.zero_grad()
        loss.backward()
        if pass_loss:
            optimizer.step(loss=loss.detach())  # type: ignore[call-arg]
        else:
            optimizer.step()
        if on_step is not None:
            on_step(t)
        value = problem.full_loss()
        curve.append(value if math.isfinite(value) else math.inf)
    return curve


# -- a two-player problem -------------------------------------------------------------------
#: the GAN literature's toy data: eight Gaussians on a circle (Metz et al. 2017, "Unrolled
#: generative adversarial networks"), its noise dimension and minibatch size
RING_MODES, RING_RADIUS, RING_STD, GAN_NOISE, GAN_BATCH = 8, 2.0, 0.05, 16, 256


def ring_centres() -> torch.Tensor:
    """The eight modes' centres, one row each."""
    angles = torch.arange(RING_MODES) * (2 * math.pi / RING_MODES)
    return RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def gan_players(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A generator (noise to points) and a discriminator (points to a logit), seeded."""

    def mlp(inputs: int, outputs: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(inputs, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, outputs),
        )

    torch.manual_seed(seed)
    return mlp(GAN_NOISE, 2), mlp(2, 1)


def gan_adam(player: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam at the settings common for GANs."""
    return torch.optim.Adam(player.parameters(), lr=1e-3, betas=(0.5, 0.999))


def train_gan(
    players: tuple[torch.nn.Module, torch.nn.Module],
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    seed: int,
    steps: int,
    nan_at: int | None = None,
) -> None:
    """Train a GAN (non-saturating losses) for ``steps`` rounds of one discriminator step and
    one generator step.  A selftune optimizer is told its own player's loss.  ``nan_at``: the
    generator's loss of that round is NaN (a fault for the guard to catch)."""
    generator, discriminator = players
    g_opt, d_opt = optimizers
    gen = torch.Generator().manual_seed(1000 + seed)
    bce = torch.nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(GAN_BATCH, 1), torch.zeros(GAN_BATCH, 1)

    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, SelfTuned):
            opt.step(loss=loss.detach())
        else:
            opt.step()

    centres = ring_centres()
    for t in range(1, steps + 1):
        real = centres[torch.randint(0, RING_MODES, (GAN_BATCH,), generator=gen)]
        real = real + RING_STD * torch.randn(GAN_BATCH, 2, generator=gen)
        fake = generator(torch.randn(GAN_BATCH, GAN_NOISE, generator=gen))
        step(d_opt, bce(discriminator(real), ones) + bce(discriminator(fake.detach()), zeros))
        g_loss = bce(discriminator(fake), ones)
        step(g_opt, g_loss * math.nan if t == nan_at else g_loss)


def ring_quality(generator: torch.nn.Module, seed: int) -> dict[str, float]:
    """The measures of Srivastava et al. 2017 (VEEGAN) on 2,500 samples: the share within
    three standard deviations of a mode, and how many modes hold at least 20 of those."""
    gen = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        samples = generator(torch.randn(2500, GAN_NOISE, generator=gen))
    distance, nearest = torch.cdist(samples, ring_centres()).min(dim=1)
    good = distance < 3 * RING_STD
    counts = torch.bincount(nearest[good], minlength=RING_MODES)
    return {"high_quality": float(good.float().mean()), "modes": int((counts >= 20).sum())}
