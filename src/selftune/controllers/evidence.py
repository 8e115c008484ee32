"""Evidence that controllers accumulate over several steps, kept as plain numbers.

One-step hypergradients are noisy and biased towards short steps (Wu et al. 2018, "Understanding
short-horizon bias in stochastic meta-optimization"); averaging the numerator and denominator of
the cosine separately over a window gives a longer-horizon, still scale-free estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RatioEMA:
    """EMA of ``num`` over EMA of ``den``: a windowed cosine in [-1, 1] when den ≥ |num|."""

    decay: float
    num: float = 0.0
    den: float = 0.0

    def update(self, num: float, den: float) -> float:
        if math.isfinite(num) and math.isfinite(den) and den > 0:
            self.num = self.decay * self.num + (1 - self.decay) * num
            self.den = self.decay * self.den + (1 - self.decay) * den
        return self.value

    @property
    def value(self) -> float:
        return self.num / self.den if self.den > 0 else 0.0

    def state(self) -> dict[str, Any]:
        return asdict(self)
