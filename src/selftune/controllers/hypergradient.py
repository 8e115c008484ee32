"""``hypergradient``: learning rate and momentum by normalised multiplicative hypergradients.

Baydin et al. 2018 ("Online learning rate adaptation with hypergradient descent") update the rate
additively with ``∂L/∂lr = ⟨g_t, Δθ_{t-1}⟩ / lr``; that step depends on the scale of the loss and
can drive the rate negative.  Here, as in Chandra et al. 2022 ("Gradient descent: the ultimate
optimizer") and in the multiplicative variant of Baydin et al., the rate moves in log space by the
*cosine* of the hypergradient, averaged over about ten steps:

    lr ← lr · exp(κ · ρ),   ρ = EMA⟨−g_t, Δθ_{t-1}⟩ / EMA(‖g_t‖‖Δθ_{t-1}‖) ∈ [−1, 1]

which is free of every scale and stays positive.  A step that reversed the gradient outright
(instantaneous cosine below −0.9: noise spread over many directions almost never reaches it)
is an overshoot that the average would see too late, so it halves the rate at once.  A
gradient confined to one direction reaches it by chance (see ``auto``, which reads a reversal
only after clear progress).  Momentum (SGD, RMSprop) and Adam's β1 move the same way in
``1 − μ``, from the alignment of the new gradient with the momentum buffer: agreement lengthens
the memory.
"""

from __future__ import annotations

import math
from typing import Any

from selftune.controllers.base import Knobs, Option, Proposal, check_options, options_set
from selftune.controllers.evidence import RatioEMA
from selftune.signals import Signals

#: an instantaneous cosine below this means the last step jumped across a valley
REVERSAL = -0.9
#: the largest exponent of a hypergradient step's factor (see :func:`step_factor`)
MAX_EXPONENT = 700.0

#: the range of each option (:func:`~selftune.controllers.base.check_options`)
OPTIONS = {
    "gain": Option("the hypergradient step on the rate", "0.1", 0.0, open_low=True),
    "momentum_gain": Option("the hypergradient step on momentum", "0.02", 0.0),
    "decay": Option("the decay of the averaged cosines", "0.9", 0.0, high=1.0),
}


class HypergradientController:
    """Normalised multiplicative hypergradient descent on ``lr`` and on momentum / β1.

    ``gain``: log-rate change per step at full agreement (0.1: ×100 in about 50 steps of
    consistent evidence).  ``momentum_gain``: the same for ``log(1 − μ)``.  ``decay``: memory of
    the averaged evidence (0.9: about 10 steps).
    """

    name = "hypergradient"
    reads_buffer = True  #: whether it needs the momentum-buffer alignment signal
    #: RMSprop's uncorrected warm-up is divided out (see selftune.knobs.rmsprop_warmup)
    corrects_rmsprop_warmup = True

    def __init__(self, gain: float = 0.1, momentum_gain: float = 0.02, decay: float = 0.9) -> None:
        check_options(OPTIONS, locals())
        #: the options set off their defaults, for the run's manifest
        self.options = options_set(HypergradientController, locals())
        self.gain, self.momentum_gain, self.decay = gain, momentum_gain, decay
        self._lr: list[RatioEMA] = []
        self._mom: list[RatioEMA] = []

    def _ensure(self, n: int) -> None:
        while len(self._lr) < n:
            self._lr.append(RatioEMA(self.decay))
            self._mom.append(RatioEMA(self.decay))

    def evidence(self, signals: Signals, group: int) -> tuple[float, float]:
        """Fold this step into the averages; return (ρ for lr, ρ for momentum)."""
        self._ensure(group + 1)
        g = signals.groups[group]
        rho = self._lr[group].update(g.dot_update, g.grad_norm * g.update_norm)
        rho_m = self._mom[group].update(g.cos_buffer, 1.0)
        return rho, rho_m

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        out: list[Proposal] = []
        for i, k in enumerate(knobs):
            rho, rho_m = self.evidence(signals, i)
            g = signals.groups[i]
            if g.update_norm == 0.0 or not g.has_gradient:
                # no previous update yet, or no gradient (a loss multiplied by 0): no evidence,
                # and the averages, which skip such a step, would move the rate again on the
                # last one's at every step while momentum alone moves the weights
                continue
            reversal = g.cos_update if g.cos_update < REVERSAL else None
            out.append(self.lr_proposal(i, k["lr"], rho, self.gain, reversal))
            for name in ("momentum", "beta1"):
                if name in k and math.isfinite(g.cos_buffer):
                    out.append(momentum_proposal(i, name, k[name], rho_m, self.momentum_gain))
        return out

    @staticmethod
    def lr_proposal(
        group: int, lr: float, rho: float, gain: float, reversal: float | None = None
    ) -> Proposal:
        """The hypergradient step on ``lr``, or a halving at once on an outright reversal.

        ``reversal``: the cosine of a step that reversed the gradient and is to be acted on
        (the caller decides which count), else None.
        """
        if reversal is not None:
            return Proposal(
                group,
                "lr",
                lr * 0.5,
                f"overshoot: the step reversed the gradient (cos {reversal:.2f})",
            )
        verb = "raise" if rho > 0 else "lower"
        return Proposal(
            group,
            "lr",
            lr * step_factor(gain * rho),
            f"hypergradient: {verb} (averaged cos {rho:+.3f})",
        )

    def on_backoff(self, step: int) -> None:
        for ema in self._lr:
            ema.num = min(ema.num, 0.0)  # forget the evidence that led into trouble

    def state_dict(self) -> dict[str, Any]:
        return {"lr": [e.state() for e in self._lr], "momentum": [e.state() for e in self._mom]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lr = [RatioEMA(**s) for s in state["lr"]]
        self._mom = [RatioEMA(**s) for s in state["momentum"]]


def momentum_proposal(group: int, name: str, value: float, rho: float, gain: float) -> Proposal:
    """Move ``1 − μ`` multiplicatively: agreement with the buffer lengthens the memory."""
    new = 1.0 - (1.0 - value) * step_factor(-gain * rho)
    verb = "lengthen" if rho > 0 else "shorten"
    return Proposal(group, name, new, f"buffer alignment: {verb} memory (averaged cos {rho:+.3f})")


def step_factor(exponent: float) -> float:
    """``exp(exponent)``, the exponent held to :data:`MAX_EXPONENT`.

    A gain the options allow (any finite one) can make ``gain · ρ`` past 709.8, where
    ``math.exp`` raised OverflowError from the step (``hypergradient`` with gain=1000).  A factor
    of e**700 (1e304) is past any per-step limit a run sets in practice, to which the policy
    then holds the move; below the cap the factor is ``math.exp``'s own, to the bit.
    """
    return math.exp(min(exponent, MAX_EXPONENT))
