"""Evidence that controllers accumulate over several steps, kept as plain numbers.

One-step hypergradients are noisy and biased towards short steps (Wu et al. 2018, "Understanding
short-horizon bias in stochastic meta-optimization"); averaging the numerator and denominator of
the cosine separately over a window gives a longer-horizon, still scale-free estimate.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from selftune.signals import square


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


@dataclass
class PlateauDetector:
    """Says when the loss has stopped falling by more than its own noise.

    It compares the mean minibatch loss of each window with that of the window before.  A window
    lasts ``window`` steps or a quarter of the steps so far, whichever is longer, so that a slow
    descent late in a run is judged over a horizon as long as its pace.  Each mean has a standard
    error of ``σ/√n`` (σ: the running deviation of the minibatch loss, n: the window's length),
    so a fall of less than one standard error is no real improvement: a plateau.  After it fires
    it waits ``cooldown`` steps, or a quarter of the steps so far if that is longer, so that cuts
    slow down as the run goes on (a schedule in 1/t).
    """

    window: int = 25
    cooldown: int = 50
    prev: float | None = None  #: mean loss of the previous window
    total: float = 0.0  #: sum of the losses in the current window
    count: int = 0
    wait: int = 0
    #: the mean loss and length of the window that last fired: the level a cut is judged against
    level: float | None = None
    level_count: int = 0

    def update(self, step: int, loss: float | None, std: float | None) -> bool:
        if loss is None or std is None:
            return False
        self.wait = max(self.wait - 1, 0)
        self.total += loss
        self.count += 1
        if self.count < max(self.window, step // 4):
            return False
        mean, prev, n = self.total / self.count, self.prev, self.count
        self.prev, self.total, self.count = mean, 0.0, 0
        if prev is None or self.wait > 0:
            return False
        if prev - mean < std / math.sqrt(n):
            self.level, self.level_count = mean, n
            self.hold(step)
            return True
        return False

    def hold(self, step: int = 0) -> None:
        """Start the wait (after any cut, so that cuts do not pile up)."""
        self.prev, self.total, self.count = None, 0.0, 0
        self.wait = max(self.cooldown, step // 4)

    def state(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MetricPlateau:
    """Says when an evaluation metric has gone more than ``patience`` evaluations without a new
    best.

    ReduceLROnPlateau's test (a new best must beat the old by a relative ``threshold``), read off
    the metric the training loop already evaluates.  That metric is held-out evidence the
    training loss lacks: on several benchmark workloads ``auto``'s training loss fell as low as
    the best grid member's while its accuracy stood short of it (bench-results/pilots, ``gap.py``),
    a sign of a rate still too high for the last stretch that no signal of the training steps
    shows.  Evaluations are few and each averages a whole held-out set, so a plain count of
    evaluations without improvement is the evidence, as in the scheduler.
    """

    patience: int = 3
    threshold: float = 1e-4
    best: float | None = None
    bad: int = 0  #: evaluations since the best

    def update(self, value: float, higher_is_better: bool) -> bool:
        """Count one evaluation; True when it makes more than ``patience`` without a new best
        (``ReduceLROnPlateau``'s rule: with a patience of 3, the fourth).  A value that is not
        finite bettered nothing; before any finite one there is no best to better, and none
        counts."""
        sign = 1.0 if higher_is_better else -1.0
        best = self.best
        if best is None and not math.isfinite(value):
            return False  # undefined so far (an F1 with no positive prediction): no best to miss
        if math.isfinite(value) and (
            best is None or sign * (value - best) > self.threshold * abs(best)
        ):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        return self.bad > self.patience

    def state(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SignTest:
    """Whether the recent mean of a noisy per-step signal stands clear of zero, and on which side.

    A sign read from an average of noisy per-step cosines means something only when the average
    stands clear of its own noise: on a flat start (a recurrent model at its initial plateau) the
    per-step cosines scatter ±0.05 around zero and a short EMA of them changes sign by chance.
    The test reads the mean of the last ``window`` samples against its standard error from the
    same samples, and says nothing until ``min_samples`` give a deviation worth the name.  A
    window, not the mean of every sample, because the sign it looks for can change: a ramp's
    first cosines are positive and its later ones negative.  It is asked once per step, so the
    band is ``clear`` = 3 standard errors, not 2: on 25 steps of pure noise that gives a false
    sign about one time in five, where 2 errors give three in five (tests/test_auto.py measures
    both).  The verdict waits for four samples, not six: six delayed it past a ramp's whole
    climb on a small model, whose cosines fell from 0.65 to below zero within six steps.
    """

    window: int = 8
    min_samples: int = 4
    samples: list[float] = field(default_factory=list)

    def update(self, x: float) -> None:
        if math.isfinite(x):
            self.samples = [*self.samples[1 - self.window :], x]

    @property
    def mean(self) -> float:
        """The samples' mean (0 without any).

        A sum past float64's range (``auto``'s losses near 1e308) is taken over the samples
        divided first: ``fmean`` raised OverflowError from the step.
        """
        if not self.samples:
            return 0.0
        try:
            return statistics.fmean(self.samples)
        except OverflowError:
            n = len(self.samples)
            return math.fsum(x / n for x in self.samples)

    @property
    def deviation(self) -> float:
        """The samples' standard deviation (infinite below two samples).

        In plain floats: ``statistics.stdev`` computes exactly, in fractions, far slower than a
        float sum, and this runs several times a step.  Each square is :func:`square`'s,
        infinite past float64's range, and finite squares whose sum is past it are summed scaled
        down by the largest deviation: ``auto`` keeps the losses' starting level here, and a
        loss past 1e154 (a sum of large terms, in float64) raised Python's OverflowError from
        the step.
        """
        n = len(self.samples)
        if n < 2:
            return math.inf
        mean = self.mean
        try:
            return math.sqrt(math.fsum(square(x - mean) for x in self.samples) / (n - 1))
        except OverflowError:
            scale = max(abs(x - mean) for x in self.samples)
            return scale * math.sqrt(
                math.fsum(square((x - mean) / scale) for x in self.samples) / (n - 1)
            )

    @property
    def error(self) -> float:
        """The mean's standard error (infinite below two samples)."""
        return self.deviation / math.sqrt(len(self.samples)) if self.samples else math.inf

    def sign(self, clear: float) -> int:
        """+1 or -1 when the mean is more than ``clear`` standard errors from zero, else 0."""
        if len(self.samples) < max(2, self.min_samples):
            return 0
        error = self.error
        if self.mean > clear * error:
            return 1
        return -1 if self.mean < -clear * error else 0

    def state(self) -> dict[str, Any]:
        return asdict(self)
