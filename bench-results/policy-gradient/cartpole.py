"""selftune on a policy-gradient loss: REINFORCE on the cart-pole.

A policy gradient's surrogate loss, ``-mean(log pi(a|s) * advantage)`` with advantages
normalised per batch, is no measure of progress either: it has mean near zero and changes sign
from one update to the next, whatever the policy's return does.  This trains a policy (4-32-2,
tanh) on the cart-pole balancing task (the dynamics and limits of Barto, Sutton and Anderson
1983 as Gymnasium's ``CartPole-v1`` has them: episodes end when the pole passes 12 degrees or
the cart 2.4 units, or after 500 steps), one update per batch of 8 episodes, discounted returns
(0.99) normalised over the batch, with Adam at 1e-2 (a common setting for this task), for 100
updates: plain; through ``selftune.wrap`` (``auto``); the same with the rate's rise bounded at
10x its start (``bounds={"lr": (1e-3, 10.0)}``); through the guard alone (``controller="off"``);
and with ``controller="off", guard=GuardConfig(nonfinite_only=True)``.
Seeds 0-4.  Measured: the mean return of the last 10 batches, and the first update after which
the batch's mean return reached 475 (solved).  Run from the repository root:
``PYTHONPATH=src python bench-results/policy-gradient/cartpole.py``; writes ``results.json``
and ``table.md`` next to this file.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from probe_grid import Column, per_seed, run_grid  # noqa: E402

import selftune  # noqa: E402

VARIANTS = ("plain", "auto", "auto-10x", "guard-only", "off-nonfinite")
SEEDS, UPDATES, EPISODES, HORIZON, GAMMA = range(5), 100, 8, 500, 0.99


def batch_step(state: torch.Tensor, push: torch.Tensor) -> torch.Tensor:
    """One Euler step (0.02 s) of every cart-pole in the batch, ``push`` 0 (left) or 1 (right)."""
    gravity, cart, pole, half_length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    x, x_dot, theta, theta_dot = state.unbind(1)
    force = (push.float() * 2 - 1) * force_mag
    cos, sin = theta.cos(), theta.sin()
    total = cart + pole
    temp = (force + pole * half_length * theta_dot**2 * sin) / total
    theta_acc = (gravity * sin - cos * temp) / (half_length * (4.0 / 3.0 - pole * cos**2 / total))
    x_acc = temp - pole * half_length * theta_acc * cos / total
    return torch.stack(
        [
            x + tau * x_dot,
            x_dot + tau * x_acc,
            theta + tau * theta_dot,
            theta_dot + tau * theta_acc,
        ],
        dim=1,
    )


def episodes(policy: nn.Module, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A batch of episodes run together: the surrogate loss's terms (log-probabilities of the
    actions taken, and their normalised returns) and the batch's mean return."""
    state = (torch.rand(EPISODES, 4, generator=gen) - 0.5) * 0.1
    alive = torch.ones(EPISODES, dtype=torch.bool)
    logps, masks = [], []
    for _ in range(HORIZON):
        logits = policy(state)
        probs = logits.softmax(1)
        action = torch.multinomial(probs.detach(), 1, generator=gen).squeeze(1)
        logps.append(logits.log_softmax(1).gather(1, action[:, None]).squeeze(1))
        masks.append(alive.clone())
        state = batch_step(state, action)
        fell = (state[:, 0].abs() > 2.4) | (state[:, 2].abs() > 12 * 2 * math.pi / 360)
        alive = alive & ~fell
        if not alive.any():
            break
    mask = torch.stack(masks, 1).float()  # steps each episode was alive for
    rewards = mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros(EPISODES)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + GAMMA * running
        returns[:, t] = running
    taken = mask.bool()
    adv = (returns - returns[taken].mean()) / (returns[taken].std() + 1e-8)
    logp = torch.stack(logps, 1)
    return logp[taken], adv[taken], float(mask.sum(1).mean())


def run(variant: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    opt: Any = torch.optim.Adam(policy.parameters(), lr=1e-2)
    if variant == "auto":
        opt = selftune.wrap(opt)
    elif variant == "auto-10x":  # the rate may rise at most 10x above its start
        opt = selftune.wrap(opt, bounds={"lr": (1e-3, 10.0)})
    elif variant == "guard-only":
        opt = selftune.wrap(opt, controller="off")
    elif variant == "off-nonfinite":
        opt = selftune.wrap(opt, controller="off", guard=selftune.GuardConfig(nonfinite_only=True))
    gen = torch.Generator().manual_seed(seed)
    returns, solved = [], None
    for update in range(1, UPDATES + 1):
        logp, adv, mean_return = episodes(policy, gen)
        returns.append(mean_return)
        if solved is None and mean_return >= 475:
            solved = update
        loss = -(logp * adv).mean()
        opt.zero_grad()
        loss.backward()
        opt.step() if variant == "plain" else opt.step(loss=loss.detach())
    row: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "last_10": statistics.fmean(returns[-10:]),
        "solved_at": solved,
        "returns": returns,
    }
    if variant != "plain":
        row["rate"] = opt.hyperparams()[0]["lr"]
    return row


COLUMNS: list[Column] = [
    (
        "mean return of the last 10 batches, per seed",
        "---",
        lambda m: per_seed(m, lambda r: f"{r['last_10']:.0f}"),
    ),
    ("median", "---:", lambda m: f"{statistics.median(r['last_10'] for r in m):.0f}"),
    (
        "solved at update (per seed)",
        "---",
        lambda m: per_seed(m, lambda r: str(r["solved_at"] or "-")),
    ),
    # a plain run keeps the rate it was given
    ("rate at the end", "---", lambda m: per_seed(m, lambda r: f"{r.get('rate', 1e-2):.2g}")),
]


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
