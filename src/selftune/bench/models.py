"""The benchmark's models: small enough to train on one CPU core per run."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


class Cnn1d(nn.Module):
    """Three strided 1-D convolutions and a linear head, the shape of MNIST-1D's reference CNN."""

    def __init__(self, length: int = 40, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, 1, length)).shape[1]
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvAutoencoder1d(nn.Module):
    """A 1-D convolutional autoencoder: strided convolutions down to a small code, transposed
    convolutions back up.

    A kind of model unlike the other workloads': the decoder's transposed convolutions and the
    linear bottleneck between two convolutional stacks make a deep, narrow regression with no
    normalisation, whose output is unbounded (real-valued signals, no sigmoid), so the loss
    surface's sharpness and the safe rate differ from the MLP autoencoder's.
    """

    def __init__(self, length: int = 40, channels: int = 32, code: int = 16) -> None:
        super().__init__()
        if length % 4:
            raise ValueError(f"length={length}: use a multiple of 4 (two stride-2 stages)")
        half = channels // 2
        self.shape = (channels, length // 4)
        self.encoder = nn.Sequential(
            nn.Conv1d(1, half, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(half, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * length // 4, code),
        )
        self.expand = nn.Sequential(nn.Linear(code, channels * length // 4), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(channels, half, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose1d(half, 1, 4, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(self.encoder(x)).view(-1, *self.shape)
        return self.decoder(h)


class GruClassifier(nn.Module):
    """A one-layer GRU over a ``(N, 1, L)`` signal read as L steps of one feature; a linear head.

    A recurrent workload unlike the others: its gradients flow back through every time step
    (backpropagation through time), so saturating gates and long products of Jacobians shape the
    loss landscape, and the rate that trains it well differs from the convolutional, MLP and
    transformer workloads'.  The head reads only the last hidden state, so the whole signal must
    pass through the recurrence.
    """

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(x.transpose(1, 2))  # (N, 1, L) -> (N, L, 1): L steps of one feature
        return self.head(last[-1])


def mlp(
    sizes: list[int],
    out_activation: nn.Module | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` (ReLU) between them (and optionally
    ``out_activation`` after the last)."""
    if len(sizes) < 2:
        raise ValueError(f"mlp sizes={sizes!r}: give at least an input and an output width")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class CharTransformer(nn.Module):
    """A decoder-only transformer over characters (pre-norm blocks, causal mask, no dropout).

    No dropout so that a run is a deterministic function of its seed and the optimizer alone.
    """

    def __init__(
        self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.mask: torch.Tensor
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        h = self.tokens(ids) + self.positions(pos)
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class ResNet2d(nn.Module):
    """A small residual network with batch normalisation over flat ``(N, side * side)`` images.

    A kind of model unlike the other workloads': batch normalisation makes every convolution's
    weights scale-invariant (the loss does not change when they are scaled), so a rate's real
    effect shrinks as their norm grows and the rate that trains well is not set by curvature
    alone.  A stem convolution, ``blocks`` residual blocks (two 3x3 convolutions with batch
    normalisation, added to their input), global average pooling and a linear head.
    """

    def __init__(
        self, side: int = 8, channels: int = 32, blocks: int = 2, classes: int = 10
    ) -> None:
        super().__init__()
        self.side = side
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.view(-1, 1, self.side, self.side))
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h.mean(dim=(2, 3)))


class MatrixFactorization(nn.Module):
    """A rating as a user's and an item's embeddings' dot product plus their biases and a global
    offset (Koren, Bell and Volinsky 2009), embeddings drawn small (deviation 0.1) as
    collaborative-filtering code draws them, so that the factors start near the saddle at zero.
    """

    def __init__(self, num_users: int, num_items: int, dim: int = 32) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        self.offset = nn.Parameter(torch.zeros(()))
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.1)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, i = x[:, 0], x[:, 1]
        dot = (self.users(u) * self.items(i)).sum(dim=-1)
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.offset


class Vae(nn.Module):
    """A variational autoencoder (Kingma and Welling 2014): a Gaussian latent, Bernoulli pixels,
    MLP encoder and decoder.  Its forward gives each example's negative evidence lower bound in
    nats, the reconstruction's cross-entropy plus the posterior's KL divergence from the prior,
    estimated with one reparameterised sample (drawn with ``gen`` when given, so that an
    evaluation can draw the same noise every time): the objective is stochastic beyond the
    minibatch's sampling, unlike any other workload's."""

    def __init__(self, inputs: int = 64, hidden: int = 128, latent: int = 8) -> None:
        super().__init__()
        self.encoder = mlp([inputs, hidden, 2 * latent])
        self.decoder = mlp([latent, hidden, inputs])

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        noise = torch.randn(mu.shape, generator=gen, dtype=mu.dtype, device=mu.device)
        z = mu + (0.5 * logvar).exp() * noise
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=-1)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)
        return recon + kl


class Denoiser(nn.Module):
    """A diffusion model's noise predictor for points in ``dim`` dimensions: the noised point and
    sinusoidal features of its diffusion step (the positional encoding of Vaswani et al. 2017,
    which Ho et al. 2020 use for the step) into an MLP with SiLU units.

    Its input is the point with the step index as a last column, so that the benchmark's tasks
    hand it one tensor; the step enters only through the features, at ``frequencies``
    geometrically spaced rates ``period ** (-k / frequencies)`` radians per step, from one down
    towards ``1/period`` (the transformer's spacing).
    """

    rates: torch.Tensor

    def __init__(
        self, dim: int = 2, frequencies: int = 8, width: int = 128, period: float = 1000.0
    ) -> None:
        super().__init__()
        rates = torch.exp(-math.log(period) * torch.arange(frequencies) / frequencies)
        self.register_buffer("rates", rates)
        self.net = mlp([dim + 2 * frequencies, width, width, width, dim], activation=nn.SiLU)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        point, step = inputs[:, :-1], inputs[:, -1:]
        angles = step * self.rates
        return self.net(torch.cat([point, angles.sin(), angles.cos()], dim=1))
