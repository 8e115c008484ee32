"""Hypergradient descent as published: SGD-HD and Adam-HD (Baydin et al., ICLR 2018).

"Online Learning Rate Adaptation with Hypergradient Descent", Algorithms 1-3.  The learning rate is
a single scalar per parameter group, updated *before* each step by the hypergradient
``∂f(θ_{t-1})/∂α = ∇f(θ_{t-1}) · ∂θ_{t-1}/∂α``, summed over all parameters of the group:

* SGD-HD: ``α_t = α_{t-1} + β ∇f(θ_{t-1}) · d_{t-2}`` where ``d`` is the previous update
  direction (the gradient; with momentum, the momentum buffer, as in SGDN-HD).
* Adam-HD: ``α_t = α_{t-1} + β ∇f(θ_{t-1}) · m̂_{t-1} / (√v̂_{t-1} + ε)``.

No bounds and no safeguards, on purpose: these are the baselines as published (β = 1e-3 for SGD-HD
and 1e-7 for Adam-HD, the paper's settings), so the rate may go negative or grow without limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Σ ⟨aᵢ, bᵢ⟩ over a list of tensors (one host sync)."""
    if not a:
        return 0.0
    return float(torch.stack([torch.sum(x * y) for x, y in zip(a, b, strict=True)]).sum())


class SGDHD(torch.optim.Optimizer):
    """SGD (optionally heavy-ball momentum) whose learning rate follows its hypergradient."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        momentum: float = 0.0,
        hypergrad_lr: float = 1e-3,
    ) -> None:
        if lr <= 0 or not 0.0 <= momentum < 1.0 or hypergrad_lr < 0:
            raise ValueError(
                f"SGDHD(lr={lr!r}, momentum={momentum!r}, hypergrad_lr={hypergrad_lr!r}): "
                "use lr > 0, 0 <= momentum < 1, hypergrad_lr >= 0"
            )
        super().__init__(params, {"lr": lr, "momentum": momentum, "hypergrad_lr": hypergrad_lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            prev = [self.state[p].get("direction") for p in params]
            if all(d is not None for d in prev):
                # The previous step moved θ by -α·d, so ∂f/∂α = -g·d and descent adds β·g·d.
                h = _dot(grads, prev)
                group["lr"] += group["hypergrad_lr"] * h
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(g)
                    d = buf
                else:
                    d = g
                state["direction"] = d.clone()
                p.add_(d, alpha=-group["lr"])
        return loss


class AdamHD(torch.optim.Optimizer):
    """Adam whose learning rate follows its hypergradient (Adam-HD, Algorithm 3 of the paper)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        hypergrad_lr: float = 1e-7,
    ) -> None:
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas) or hypergrad_lr < 0:
            raise ValueError(
                f"AdamHD(lr={lr!r}, betas={betas!r}, hypergrad_lr={hypergrad_lr!r}): "
                "use lr > 0, betas in [0, 1), hypergrad_lr >= 0"
            )
        defaults = {"lr": lr, "betas": betas, "eps": eps, "hypergrad_lr": hypergrad_lr}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            prev = [self.state[p].get("update") for p in params]
            if all(u is not None for u in prev):
                h = _dot(grads, prev)
                group["lr"] += group["hypergrad_lr"] * h
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                state["update"] = update  # this step's direction: next step's hypergradient
                p.add_(update, alpha=-group["lr"])
        return loss
