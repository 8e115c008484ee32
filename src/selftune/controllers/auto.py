"""``auto``, the default: an in-run range test, then a cruise that holds, corrects and anneals.

1. **Range test** (Smith 2017, "Cyclical learning rates for training neural networks", done
   inside the run).  The rate grows by ``ramp`` per step while the averaged hypergradient cosine
   ρ (see :mod:`~selftune.controllers.hypergradient`) is positive, i.e. the steps are still too
   short.  Only the *sign* of ρ is read: past the edge, Adam's steps give cosines of only -0.01
   to -0.1 on a 100k-parameter model while SGD's give far larger ones, so a threshold on the
   size of ρ is not scale-free (one at -0.1 let Adam ramp 50x past the best rate).  The first
   negative average ends the ramp; the rate is kept there (``settle``), which is about
   ``ramp**3`` past the zero crossing because the average lags: one-step evidence is biased
   towards short steps (below), so the crossing itself is too cautious a rate.

   Once the ramp has grown, a sign change is read only once there was a sign: the mean of the
   last few cosines must first have stood ``clear`` standard errors above zero
   (:class:`~selftune.controllers.evidence.SignTest`), or the minibatch loss must have been
   falling by more than its noise (progress: a start near the crossing, whose cosines are
   near zero because its rate is about right).  On a flat start (a recurrent model on its
   initial plateau) the cosines are noise around zero and the loss does not move; the short
   average changes sign by chance within a few steps, so the ramp goes on growing, as the
   offline finder does,
   until the evidence arrives, the recent cosines turn clearly negative (probe downwards), or
   the *loss* says it: the smoothed loss rising ``clear`` standard errors above its starting
   level (the finder's own criterion), or a guard rollback, sets the rate to ``retreat`` of the
   rate that did it.

   A start already past the crossing (ρ < 0 at the first look: the sign alone, since a start
   30x too high can give cosines too noisy to be clear, and growing from there is the costlier
   error) shrinks until ρ turns positive, then ramps back up to it; a guard rollback during an
   informed ramp starts the same downward probe from the halved rate, unless the recent cosines
   still stood clearly above zero when it came: then the sign was blind to that edge (SGD with
   heavy-ball momentum, whose cosines stay high up to a gradient spike) and the rate retreats
   as on a flat start.  If the smoothed loss blows up (``blowup`` times its best), or stands
   clearly above its start within ten steps after a ramp from below ended (the cosines'
   average lags the step that wrecked the network), it retreats as above.  In these cases the
   probe's steps overshot; if the loss also rose above where the run started, they did harm
   (dead ReLUs, wrecked embeddings, Adam's moments), and the controller asks the wrapper to
   *restart* from the first guard snapshot with the rate it found, as an offline
   learning-rate finder restores the weights after its test.  A start *far*
   past the crossing (its shrink went deeper than the average's lag) read that crossing on the
   weights its first steps harmed: it restarts once and tests again from below on the restored
   weights, never past the rate it found (:meth:`AutoController._retest`).
2. **Cruise**.  One-step hypergradients are biased towards short steps under gradient noise
   (Wu et al. 2018, "Understanding short-horizon bias in stochastic meta-optimization"): followed
   blindly they anneal far too early.  So the cruise *holds* the rate while |ρ| is within
   ``deadband`` (the noise-dominated zone), follows the hypergradient only on clear evidence, and
   anneals by halving when the smoothed loss stops falling by more than its own noise
   (:class:`~selftune.controllers.evidence.PlateauDetector`) or on a loss spike.  It follows
   an overshoot (ρ below ``-strong``) down only while the smoothed loss is not clearly falling:
   heavy-ball steps bounce across a valley while they descend along it, and the bounce is not
   what costs the descent (:meth:`AutoController._descending`).  A single
   step that reversed the gradient (cosine below -0.9) halves the rate at once only when the
   cosines before it stood clearly positive: a turn after progress.  Amid cosines of no clear
   sign it is noise: on ``friedman-mlp`` with SGD the network was reduced to a gradient in one
   direction, whose cosines are +1 or -1 at random, and a cut on each -1 took the rate from
   8e-3 to its floor of 1e-5 within 35 steps (bench-results/pilots, 23).

3. **The metric**, when the loop gives one (``SelfTuned.observe``: a validation loss or an
   accuracy after each evaluation).  Once it has gone more than three evaluations without a new
   best while every group cruises, the rate is halved, as ``ReduceLROnPlateau(patience=3,
   factor=0.5)`` would halve it (:meth:`AutoController._metric_stalled`).  Held-out evidence
   that no training signal gives: on several benchmark workloads the training loss had fallen
   as low as the best grid member's while the metric still stood short of the target.  Once
   the metric comes from the weight average (``wrap(..., average=True)``, evaluated inside
   ``averaged()``), a plateau of the training loss no longer cuts the rate (it still doubles
   it on clearly short steps): the average lowers the evaluated noise floor, which is what that
   cut was for, and the cut slowed a descent that falls in stages (:meth:`AutoController._plateau`).
   For the same reason the cruise then follows the hypergradient only upwards, on clearly
   positive cosines: the bounce of steps that overshoot is what the average absorbs
   (:meth:`AutoController._follows`).

4. **A scheduler's rise** above the highest rate it had set (a warm-up, ``OneCycleLR``'s climb)
   is held: the rules above read the rate as it stood, and where none moves it, it is set back
   (:meth:`AutoController._held`).  selftune's scale composes with a scheduler's rate, which
   suits a decay (the anneal ``auto`` alone lacks) but not a rise: a range test run during a
   warm-up found the edge at the rate of that time, and the rest of the warm-up took the run
   past it (``bench-results/schedules/``).  A return to a rate set before (a cycle's, a warm
   restart's) passes: the run has been seen there.  Without the range test the rate is the
   user's, and a warm-up climbs to it as set.

With ``range_test=False`` every group starts in the cruise, at the rate it was given: for a rate
already known to be right (a grid's best, a recipe's), which the range test would leave.  Started
at the grid's best constant rate on the benchmark's ten workloads not held out, seeds 0-2, the
cruise needed no more steps than that constant rate on 11 pairs of 18 (0.70-1.00x) and at most
1.15x on 15, and no more than the oracle's median (constant or cosine over the budget) on 10;
``auto`` as shipped, started at the same rate, ramped away from it and missed in some seed on 5
pairs (``bench-results/gap-decomposition/``).

Momentum and β1 are left where the user set them: the evidence tried for them (buffer alignment)
lengthened the memory whenever the rate was small, which trades one knob for the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from selftune.controllers.base import (
    Knobs,
    Option,
    Proposal,
    check_flags,
    check_options,
    options_set,
)
from selftune.controllers.evidence import MetricPlateau, RatioEMA, SignTest
from selftune.controllers.hypergradient import REVERSAL, HypergradientController
from selftune.controllers.stability import StabilityController
from selftune.signals import FAST_DECAY, SLOW_DECAY, Signals

#: steps after a ramp from below ends in which a loss above its start is blamed on the ramp:
#: the fast loss EMA's memory
WATCH = round(1 / (1 - FAST_DECAY))


def _ema_gap_deviation(fast: float, slow: float) -> float:
    """The standard deviation of an EMA of decay ``fast`` minus one of decay ``slow`` over the
    same independent unit-variance samples: each EMA's variance is ``(1-a)/(1+a)``, their
    covariance ``(1-a)(1-b)/(1-ab)``."""
    var = (1 - fast) / (1 + fast) + (1 - slow) / (1 + slow)
    return math.sqrt(var - 2 * (1 - fast) * (1 - slow) / (1 - fast * slow))


#: the least relative difference from the start's level read as one: a few float32 ulps
_ROUNDING = 1e-6

#: what minibatch noise alone gives the fast loss EMA minus the slow one, per unit of the
#: minibatch loss's deviation (about 0.17): the yardstick of a clear trend
TREND_NOISE = _ema_gap_deviation(FAST_DECAY, SLOW_DECAY)

#: the range of each option (:func:`~selftune.controllers.base.check_options`)
OPTIONS = {
    "ramp": Option("the range test's growth of the rate per step", "1.2", 1.0, open_low=True),
    "settle": Option("the factor on the rate where the range test ends", "1.0", 0.0, open_low=True),
    "blowup": Option("the loss's rise over its best that ends the test", "2.0", 1.0, open_low=True),
    "min_ramp_steps": Option("steps before the range test's first look", "3", 1, whole=True),
    "deadband": Option(
        "the cosine within which the cruise holds", "0.2", 0.0, high=1.0, open_high=False
    ),
    "cruise_gain": Option("the cruise's hypergradient step", "0.05", 0.0, open_low=True),
    "strong": Option(
        "the cosine below minus which the cruise lowers the rate",
        "0.5",
        0.0,
        high=1.0,
        open_low=True,
        open_high=False,
    ),
    "shrink": Option("the shrink per step past the crossing", "0.7", 0.0, high=1.0, open_low=True),
    "clear": Option("standard errors a sign must stand clear of zero", "3.0", 0.0),
    "retreat": Option(
        "the share of a failed rate the test retreats to",
        "0.25",
        0.0,
        high=1.0,
        open_low=True,
        open_high=False,
    ),
    "metric_patience": Option("evaluations without a new best before a cut", "3", 0, whole=True),
}

#: the switches among the options, and what each choice does (see ``check_flags``)
FLAGS = {
    "range_test": "True (test the rate first, the default) or False (start the cruise at the rate "
    "given, for a rate known to be right)",
}


@dataclass
class _Trial:
    """A plateau cut on trial: what :meth:`AutoController._judge_trial` weighs it by."""

    before: float  #: the rate before the cut, which an undo restores
    level: float  #: the mean minibatch loss of the window that signalled the plateau
    count: int  #: that window's length
    age: int = 0  #: steps since the cut
    total: float = 0.0  #: the sum of their minibatch losses

    @classmethod
    def load(cls, saved: Any) -> _Trial | None:
        """From a state dict: a dict, or the list of five older checkpoints hold; a trial saved
        before it held the plateau's level (four fields) is dropped, its cut kept."""
        if isinstance(saved, dict):
            return cls(**saved)
        return cls(*saved) if isinstance(saved, list) and len(saved) == 5 else None


class AutoController:
    """Range test, then hold / correct / anneal on evidence."""

    name = "auto"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal
    #: the rate is the step's size: RMSprop's uncorrected warm-up is divided out (see
    #: selftune.knobs.rmsprop_warmup)
    corrects_rmsprop_warmup = True

    def __init__(
        self,
        ramp: float = 1.2,
        settle: float = 1.0,
        blowup: float = 2.0,
        min_ramp_steps: int = 3,
        deadband: float = 0.2,
        cruise_gain: float = 0.05,
        strong: float = 0.5,
        shrink: float = 0.7,
        clear: float = 3.0,
        retreat: float = 0.25,
        metric_patience: int = 3,
        range_test: bool = True,
    ) -> None:
        check_options(OPTIONS, locals())
        check_flags(FLAGS, locals())
        #: the options set off their defaults, for the run's manifest
        self.options = options_set(AutoController, locals())
        self.shrink, self.clear, self.retreat = shrink, clear, retreat
        self.strong = strong
        self.ramp, self.settle, self.blowup = ramp, settle, blowup
        self.min_ramp_steps, self.deadband = min_ramp_steps, deadband
        self.cruise_gain, self.metric_patience = cruise_gain, metric_patience
        self.hyper = HypergradientController(gain=cruise_gain, decay=0.9)
        self.stability = StabilityController()
        self._phase: list[str] = []  # "ramp" | "shrink" | "ramp_up" | "drop" | "cruise" per group
        #: faster evidence for the range test: a plain EMA of the per-step cosine.  Not weighted
        #: by step size as the cruise's is: while the rate shrinks, a size-weighted average stays
        #: dominated by the large early steps and kept shrinking 50x past the crossing.
        self._ramp_ema: list[RatioEMA] = []
        self._ramp_steps: list[int] = []
        #: whether the range test's cosines have yet stood ``clear`` standard errors above zero:
        #: a sign change is read as the crossing only once there was a sign to change from
        self._evidence: list[SignTest] = []
        self._informed: list[bool] = []
        #: per group, the rate at the last growth step of the ramp, times the scheduler's cuts
        #: since (read at every step, those that skip the group too): the rate the test holds
        self._last_lr: list[float | None] = []
        self._best_loss = math.inf
        #: the first smoothed loss and the highest since: a probe whose loss rose above where
        #: the run started did harm, not just little good, and is worth a restart
        self._first_loss: float | None = None
        #: the minibatch losses of the first steps: the level (and noise) a flat start sits at
        self._start_level = SignTest()
        #: the recent step-to-step changes of the minibatch loss: a loss clearly falling is
        #: progress, and a start that makes progress is not flat, whatever its cosines say
        self._descent = SignTest()
        self._prev_loss: float | None = None
        self._peak_loss = -math.inf
        #: the phase a group starts in: "ramp" ("cruise" with no range test); "shrink" after a
        #: guard rollback during the first ramp; "cruise" after any later one
        self._start_phase = "ramp" if range_test else "cruise"
        self._tests_range = range_test  # a setting: it holds a scheduler's rises (see _holds)
        self._restart: str | None = None  # set when the range test asks for a restart
        #: per group, while a shrink runs (from the first look or after a rollback), the rate
        #: it began at; once it has turned positive, the rate where it did if it went deeper
        #: than the lag (what the re-test grows from), else None
        self._low: list[float | None] = []
        #: whether a start past the crossing has been re-tested (once per run: it survives
        #: rollbacks, whose snapshots may predate it, as ``_failed`` does)
        self._retested = False
        self._retesting = False  # a re-test asked for at this step (every deep group joins it)
        #: per group, the re-test's ceiling: the rate the first test found (None: no re-test)
        self._cap: list[float | None] = []
        #: per group, the lowest rate the guard has seen fail (read only by the range test):
        #: kept across rollbacks, which restore older states, perhaps from before any failure
        self._failed: list[float | None] = []
        #: per group, set just before a rollback restores an older state and read by
        #: ``on_backoff``: (the lowest rate that has failed, this one included; whether the
        #: range test should retreat rather than probe)
        self._at_failure: list[tuple[float, bool]] = []
        #: per group, the cruise steps left in which a rise of the loss above its start is
        #: blamed on the range test's last steps (see _harmed_after_ramp)
        self._watch: list[int] = []
        #: per group, the plateau cut on trial, if any
        self._trial: list[_Trial | None] = []
        #: the evaluation metric's plateau test (see ``SelfTuned.observe``): one metric for the
        #: run, kept across rollbacks, whose restores would undo evaluations
        self._metric = MetricPlateau(metric_patience)
        #: whether the loop has given a metric measured at the weight average: then the average,
        #: not a cut, lowers the evaluated noise floor, and a plateau of the loss does not cut
        #: (see _plateau); run-wide, kept across rollbacks as the metric's test is
        self._at_average = False
        #: the run-wide state a rollback's restore must not erase (the re-test done, the
        #: metric's test), set by ``before_rollback`` and put back by ``on_backoff``
        self._kept: dict[str, Any] = {}

    def _ensure(self, n: int) -> None:
        while len(self._phase) < n:
            self._phase.append(self._start_phase)
            self._ramp_ema.append(RatioEMA(0.7))
            self._ramp_steps.append(0)
            self._evidence.append(SignTest())
            self._informed.append(False)
            self._last_lr.append(None)
            self._trial.append(None)
            self._watch.append(0)
            self._failed.append(None)
            self._low.append(None)
            self._cap.append(None)

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        self._ensure(len(knobs))
        if signals.loss_ema is not None:
            self._best_loss = min(self._best_loss, signals.loss_ema)
            self._peak_loss = max(self._peak_loss, signals.loss_ema)
            if self._first_loss is None:
                self._first_loss = signals.loss_ema
        level = self._start_level
        if signals.loss is not None:
            if len(level.samples) < level.min_samples:
                level.update(signals.loss)
            if self._prev_loss is not None:
                self._descent.update(signals.loss - self._prev_loss)
            self._prev_loss = signals.loss
        stalled = self._metric_stalled(signals)
        self._at_average = self._at_average or (
            signals.metric is not None and signals.metric_at_average
        )
        out: list[Proposal] = []
        held: list[Proposal] = []  # each group's rate set back from a scheduler's rise
        for i, k in enumerate(knobs):
            g = signals.groups[i]
            if g.base_rise > 1.0 and self._holds:  # every rule below reads the rate as held
                k = {**k, "lr": k["lr"] / g.base_rise}
                held.append(self._held(i, k["lr"], g.base_rise))
            rho_fast = 0.0
            # a reversal is a turn, an overshoot, only after steps clearly going forward (read
            # before this one joins them); amid cosines of no clear sign it is what noise gives;
            # and the weight average absorbs it (see _follows)
            turned = (
                not self._at_average
                and g.cos_update < REVERSAL
                and self._evidence[i].sign(self.clear) > 0
            )
            grown = self._last_lr[i]
            if grown is not None:
                self._last_lr[i] = grown * g.base_fall
            # no previous update, or no gradient (GroupSignals.has_gradient): the cosine, 0, was
            # not measured, and the group keeps its knobs.  A group's zeroed gradients (a loop
            # whose zero_grad keeps them) fed the range test's average 0s, and its rate grew
            # 6.2x in 10 steps as that average decayed from +0.52 to +0.02
            measured = g.update_norm != 0.0 and g.has_gradient
            if measured:
                rho_fast = self._ramp_ema[i].update(g.cos_update, 1.0)
                self._evidence[i].update(g.cos_update)
            rho, _ = self.hyper.evidence(signals, i)  # every average stays current
            trouble = self.stability.trouble(signals, i)
            if not measured:
                continue
            if self._phase[i] != "cruise":
                out.extend(self._range_test(signals, i, k, rho_fast))
            elif self._harmed_after_ramp(signals, i):
                out.extend(self._retreat_after_harm(i, k["lr"]))
            elif stalled and self._trial[i] is None:
                out.append(self._metric_cut(signals, i, k["lr"]))
            elif trouble is not None and trouble[0] == "spike":
                self._trial[i] = None  # the spike's cut stands (see _judge_trial)
                out.append(self.stability.cut_proposal(i, k["lr"], trouble, signals.step))
            elif trouble is not None and trouble[0] == "plateau":
                if (change := self._plateau(signals, i, k["lr"], rho, trouble)) is not None:
                    out.append(change)
            elif (undo := self._judge_trial(signals, i, k["lr"])) is not None:
                out.append(undo)
            elif self._follows(signals, i, rho, turned):
                if rho < -self.strong or turned:
                    self._trial[i] = None  # an overshoot's cut stands (see _judge_trial)
                reversal = g.cos_update if turned else None
                out.append(self.hyper.lr_proposal(i, k["lr"], rho, self.cruise_gain, reversal))
        if self._retesting:  # the restart is the run's: every group that needs one joined it
            self._retested, self._retesting = True, False
        moved = {p.group for p in out if p.knob == "lr"}  # where no other rule moved it
        return out + [p for p in held if p.group not in moved]

    @staticmethod
    def _held(group: int, lr: float, rise: float) -> Proposal:
        """Hold a group's rate where its scheduler raised it above the highest it had set (a
        warm-up): ``auto`` chooses the rate, and a rise past the one it chose was never tested
        (a range test run during a warm-up found the edge at the rate of that time).  Decays
        pass: they anneal, as ``auto`` alone does not."""
        why = (
            f"held: the scheduler raised its rate x{rise:.4g} above the highest it had set "
            "(a warm-up), past the rate auto chose"
        )
        return Proposal(group, "lr", lr, why)

    @property
    def _holds(self) -> bool:
        """Whether rises are held: the rate is auto's only once its range test chose it.
        Without the test (``range_test=False``) the rate given is the user's, a warm-up's top
        included, and the warm-up must reach it.  Read from the setting, not from the phase a
        group starts in, which a rollback moves on (the rest of a warm-up went unheld after
        any rollback, and the run stepped above the rate that failed)."""
        return self._tests_range

    def _end_test(
        self, i: int, lr: float, factor: float, why: str, restart: bool = False
    ) -> list[Proposal]:
        """End group ``i``'s range test: to the cruise at ``lr * factor``.  ``restart``: if the
        probe raised the smoothed loss above its first value (it did harm), ask the wrapper to
        restart from the first snapshot."""
        self._phase[i] = "cruise"
        harmed = self._first_loss is not None and self._peak_loss > self._first_loss
        if restart and harmed and self._restart is None:
            self._restart = f"range test: {why}; the probe's steps damaged the weights"
        return [Proposal(i, "lr", lr * factor, f"range test: {why}")] if factor != 1 else []

    def _follows(self, s: Signals, i: int, rho: float, turned: bool) -> bool:
        """Whether the cruise follows the hypergradient at this step: out of the deadband, up
        past ``deadband`` or down past ``-strong`` while the loss is not clearly falling (see
        :meth:`_descending`), or on a reversal after progress.

        Once the metric comes from the weight average, only up, and only when the recent
        cosines also stand ``clear`` standard errors above zero, the evidence a plateau's
        doubling needs.  Steps that overshoot (negative cosines) bounce across a valley, and the
        average of the iterates sits inside it: the bounce the rate was lowered for is what the
        average absorbs, and lowered on it, the convolutional autoencoder's SGD cruised at 0.14x the
        grid's best constant rate.  Raises then need clear evidence, or cosines that alternate
        in sign (``friedman-mlp``'s SGD) raise the rate and never lower it: a ratchet, under
        which two of its runs missed, one traced to a network that died at 7x the grid's best
        constant rate (bench-results/pilots, 57; this rule is 59).
        """
        if self._at_average:
            return rho > self.deadband and self._evidence[i].sign(self.clear) > 0
        overshoot = rho < -self.strong and not self._descending(s)
        return rho > self.deadband or overshoot or turned

    def _descending(self, s: Signals) -> bool:
        """Whether the smoothed loss clearly falls: the fast EMA stands ``clear`` standard errors
        below the slow one, the error that minibatch noise alone gives their difference.

        Steps that overshoot while the loss falls this clearly bounce across a valley while they
        descend along it, and the bounce is not costing the descent: on the convolutional
        autoencoder with SGD, averaged cosines of -0.5 to -0.9 lowered the rate from 0.07 to
        0.021 within 35 steps while the fast EMA stood 23-28% below the slow one (the grid's best
        constant rate is 0.3).  The overshoot is then left to the plateau's and the guard's cuts.
        Over the benchmark's plain runs this made 29 of 320 faster and 8 slower, every changed
        one SGD's (bench-results/pilots, 61).
        """
        if s.loss_ema is None or s.loss_ema_slow is None or not s.loss_std:
            return False
        return s.loss_ema - s.loss_ema_slow < -self.clear * TREND_NOISE * s.loss_std

    def _harmed_after_ramp(self, s: Signals, i: int) -> bool:
        """Whether the smoothed loss rose clearly above its start just after the ramp ended.

        The ramp ends at the first negative average of the cosines, and that average lags about
        three steps; heavy-ball SGD's stay positive up to the step that wrecks the network.  On
        the digits MLP from 0.1 the ramp ended at 0.74 with the minibatch loss leaping from 1.7
        to 3.8 in that step, while the smoothed loss, ten steps of memory, still stood below
        the start; it rose to 2.9 within five steps and the network never left chance level,
        cruising at 0.37-0.74.  So for the fast EMA's memory (``WATCH`` steps) after a ramp
        from below ends, a smoothed loss ``clear`` errors above the start level is the offline
        finder's stop, read late: the ramp's last steps did harm.  Each call counts one step
        of the watch down.
        """
        if not self._watch[i]:
            return False
        self._watch[i] -= 1
        return self._left_start(s) > 0

    def _retreat_after_harm(self, i: int, lr: float) -> list[Proposal]:
        """Retreat to ``retreat`` of the rate and restart from the first snapshot, as for a
        ramp whose loss blew up.  The loss standing ``clear`` errors above its start level (the
        mean of the first four) also stands above the first loss, so the test counts as harm."""
        self._watch[i] = 0
        why = f"the loss rose above its start after the ramp ended at lr {lr:.3g}; retreat"
        return self._end_test(i, lr, self.retreat, why, restart=True)

    def _metric_stalled(self, s: Signals) -> bool:
        """Count an evaluation of the metric, if one came; True when it stalls in the cruise.

        A stall is more than ``metric_patience`` evaluations without a new best, as in
        ``ReduceLROnPlateau``: a first form cut at the third, and on ``friedman-mlp``, whose
        held-out loss falls slowly and noisily between stages, four AdamW runs of seven were
        slower at seed 0 (at the default rate 825 -> 900 steps: its one cut came an evaluation
        before a new best; pilot 45).  Only evaluations that find every group cruising count
        towards it: during the range test the rate itself is moving, and a metric standing
        still then says nothing about the rate the cruise will hold, so the count starts again
        (the best is kept); a group that has never stepped, with no gradient yet, does not hold
        the count back.  The cut is final, not a trial as a plateau cut of the loss is: a
        test of it against the best (kept on a new best within as many evaluations again, else
        undone) undid the cuts that helped on the digits MLP, whose test accuracy swings by
        up to 0.07 between evaluations, so that a lucky best is seldom beaten soon (pilot 45).
        """
        if s.metric is None:
            return False
        stalled = self._metric.update(s.metric, s.metric_mode == "max")
        # a group that has never stepped (a frozen backbone's) is no range test under way
        cruising = all(
            phase == "cruise" or steps == 0
            for phase, steps in zip(self._phase, self._ramp_steps, strict=True)
        )
        if stalled or not cruising:
            self._metric.bad = 0
        return stalled and cruising

    def _metric_cut(self, s: Signals, i: int, lr: float) -> Proposal:
        """Halve the rate: the metric the loop evaluates stopped improving.

        A decay read off held-out evidence, which the training loss cannot give: on the digits
        MLP and MNIST-1D ``auto``'s training loss fell as low as the best grid member's while
        its accuracy stood short of it (bench-results/pilots, ``gap.py``), and halving on the
        metric as ``ReduceLROnPlateau`` does closed part of that gap (pilot 44).  Not while a
        plateau cut of the loss is on trial (the caller checks): that trial already tests a
        lower rate and gives its verdict within ``2 * warmup`` steps.  A first form cut anyway
        and dropped the trial; on ``friedman-mlp`` with AdamW (seed 2 of the full suite, from
        1e-4 and 1e-2) the trial would have undone its cut, and the two cuts, kept, cost both
        runs their target (pilot 45).
        """
        m = self._metric
        why = f"the metric has not bettered its best ({m.best:.4g}) in {m.patience + 1} evaluations"
        return self.stability.cut_proposal(i, lr, ("metric plateau", why), s.step)

    def _plateau(
        self, s: Signals, i: int, lr: float, rho: float, trouble: tuple[str, str]
    ) -> Proposal | None:
        """A flat loss: steps clearly too short (grow), else a bounce at the noise floor (cut).

        "Clearly" as in the range test: the recent cosines stand ``clear`` standard errors above
        zero.  A non-negative average alone is what noise gives half the time: on the residual
        CNN with AdamW one of +0.006 doubled the rate to 0.053 (pilot 37).  A cut is a trial
        that :meth:`_judge_trial` undoes unless the loss falls clearly below the plateau's level.

        No cut once the loop has given a metric measured at the weight average: a plateau cut
        lowers the noise floor of the last iterate, which the average's evaluation no longer
        sees, and where the loss descends in stages (``friedman-mlp``) each cut took away rate
        that the later stages needed.  Evaluated at the average, the benchmark's ``auto`` rows
        ran 33 of 320 runs faster and 10 slower without it (the Friedman regression's medians
        1.71x -> 1.35x the averaged oracle with SGD, 2.06x -> 1.56x with AdamW; the slower
        runs MNIST-1D's SGD, whose decay is then left to the metric's rule), with the same
        hits (bench-results/pilots, 55).  Without the average the same rule cost the residual
        CNN, which reaches its target within seven evaluations, its early anneal (pilot 51).
        """
        if self._evidence[i].sign(self.clear) > 0:
            why = f"plateau with steps clearly too short (cos {rho:+.3f}); grow x2"
            return Proposal(i, "lr", lr * 2.0, why)
        if self._at_average:
            return None
        level = self.stability.plateau_level(i)
        if level is not None:
            self._trial[i] = _Trial(lr, level[0], level[1])
        return self.stability.cut_proposal(i, lr, trouble, s.step)

    def _judge_trial(self, s: Signals, i: int, lr: float) -> Proposal | None:
        """Keep a plateau cut only if it lowered the loss: at a noise floor a smaller rate lowers
        the floor within a few tens of steps; on a slow stretch of a descent (``friedman-mlp``
        with AdamW, whose loss falls in steps between long flat stretches) it only slows it.

        The mean minibatch loss of the ``2 * warmup`` steps after the cut is compared with the
        mean of the window that signalled the plateau, against the standard error of their
        difference (σ: the minibatch loss's running deviation): both are means of minibatch
        losses, so the comparison has no lag.  Before, the slow loss EMA was compared with its
        value at the cut; that EMA lags about 50 steps, so after any descent it went on falling
        towards the plateau's level and every cut looked as if it had helped.

        A spike or an overshoot (a clearly negative cosine, or a reversal after progress) during
        the trial ends it with no verdict, and the cut stands: each is evidence of its own that
        the rate is too high, which an undo to the rate before the trial would throw away.  On
        ``friedman-mlp`` with SGD (seed 4 of the full suite) a reversal at step 115 halved a rate
        on trial, 0.0095, to 0.0047, and the undo at 134 took it back to 0.019, six times the
        grid's best constant rate (that run misses either way: its network had died before,
        bench-results/pilots, 48).
        """
        trial = self._trial[i]
        if trial is None or s.loss is None or s.loss_std is None:
            return None
        trial.age += 1
        trial.total += s.loss
        if trial.age < self.stability.warmup * 2:
            return None
        self._trial[i] = None
        error = s.loss_std * math.sqrt(1 / trial.count + 1 / trial.age)
        if trial.level - trial.total / trial.age >= error:
            return None  # the cut helped: keep it
        why = "the last plateau cut did not lower the loss below the plateau's; undo it"
        return Proposal(i, "lr", max(trial.before, lr), why)

    def _range_test(self, s: Signals, i: int, k: dict[str, float], rho: float) -> list[Proposal]:
        """One step of the in-run range test for group ``i``; moves to "cruise" when done.

        The greedy optimum is where ρ crosses zero: below it the steps are too short (ρ > 0),
        above it they overshoot (ρ < 0).  Only the sign is read, because the size of ρ depends on
        the optimizer and the model (Adam's steps past the edge give cosines of only -0.01 to
        -0.1 in high dimension, SGD's much larger ones), while the sign does not.  The ramp stops
        at the first negative average; the average lags about ``1 / (1 - 0.7)`` steps, i.e. a
        factor ``ramp**3`` ≈ 1.7 past the crossing, and ``settle`` = 1 keeps that rate (1/2
        would land on the crossing: slower for AdamW on every tuning workload, faster for SGD on
        MNIST-1D; bench-results/pilots).  A start already past it (ρ < 0 at the first look, or
        the recent cosines clearly negative before they were ever clearly positive) shrinks
        until ρ turns positive and then ramps again, so that both directions end at the same
        crossing.  A ramp with no clear sign either way ends on the loss instead (see the module
        docstring).

        A scheduler's cut of the rate while the test grows it is no bound on the growth (see
        ``_last_lr``), and a step it holds the rate at zero (a cosine's end, a warm-up's start)
        is none of the test's: with no rate to read, it read as the bound, and the test ended.
        """
        if k["lr"] <= 0.0:
            return []
        self._ramp_steps[i] += 1
        n, lr, phase = self._ramp_steps[i], k["lr"], self._phase[i]

        def to_cruise(factor: float, why: str, restart: bool = False) -> list[Proposal]:
            return self._end_test(i, lr, factor, why, restart)

        failed = self._failed[i]
        if phase == "drop" and failed is not None:  # see on_backoff
            why = f"lr {failed:.3g} failed before the cosines turned, or twice; retreat"
            return to_cruise(self.retreat * failed / lr, why)
        if phase != "shrink" and n >= self.min_ramp_steps and s.loss_ema is not None:
            ratio = s.loss_ema / self._best_loss if self._best_loss > 0 else 1.0
            if ratio > self.blowup:
                why = f"loss rose {ratio:.2f}x above its best at lr {lr:.3g}"
                return to_cruise(self.retreat, why, restart=True)
        if n < self.min_ramp_steps:
            return []
        evidence, moved = self._evidence[i].sign(self.clear), self._left_start(s)
        progress = moved < 0 or self._descent.sign(self.clear) < 0
        self._informed[i] = self._informed[i] or evidence > 0 or progress
        if phase == "ramp" and not self._informed[i] and moved > 0:
            why = f"the loss rose off its flat start at lr {lr:.3g}"
            return to_cruise(self.retreat, why, restart=True)
        overshoot = rho < 0
        if phase == "ramp" and overshoot and not self._informed[i]:
            overshoot = False  # no sign yet for this one to change from: explore upwards
            if n == self.min_ramp_steps or evidence < 0:  # past the crossing: come down first
                phase = self._phase[i] = "shrink"
                self._last_lr[i], self._low[i] = None, lr
        if phase == "shrink":
            if self._low[i] is None:  # a shrink begun by a rollback (on_backoff) starts here
                self._low[i] = lr
            if rho >= 0:  # below the crossing (now, or already at the first look): ramp up
                phase = self._phase[i] = "ramp_up" if n > self.min_ramp_steps else "ramp"
                top = self._low[i]
                # deeper than the average's lag of about three steps: see _retest
                deep = phase == "ramp_up" and top is not None and top * self.shrink**3 > lr
                self._low[i] = lr if deep else None
            else:
                why = f"steps overshoot from the start (cos {rho:+.3f}); shrink"
                return [Proposal(i, "lr", lr * self.shrink, f"range test: {why}")]
        last = self._last_lr[i]
        # the policy's bound stopped the growth (``last`` holds a scheduler's cuts since, which
        # are none, to a product's rounding)
        bound = last is not None and lr <= last * (1 + _ROUNDING)
        cap = self._cap[i]
        if cap is not None and lr * self.ramp > cap:
            why = f"the re-test reached the rate the first test found, {cap:.3g}"
            return to_cruise(cap / lr, why)
        low = self._low[i]  # set only after a deep shrink
        if (overshoot or bound) and phase == "ramp_up" and low is not None and not self._retested:
            return self._retest(i, lr, low)
        if overshoot:
            if phase == "ramp":  # see _harmed_after_ramp
                self._watch[i] = WATCH
            why = f"steps began to overshoot at lr {lr:.3g} (cos {rho:+.3f})"
            return to_cruise(self.settle, why, restart=phase == "ramp_up")
        if bound:
            why = f"the rate reached its upper bound {lr:.3g}"
            return to_cruise(1.0, why, restart=phase == "ramp_up")
        self._last_lr[i] = lr
        why = f"steps not yet overshooting (cos {rho:+.3f}); grow"
        return [Proposal(i, "lr", lr * self.ramp, f"range test: {why}")]

    def _retest(self, i: int, lr: float, low: float) -> list[Proposal]:
        """A start far past the crossing: test again, from below, on restored weights.

        Adam from 100x its default moves every weight by about the rate in each of its first
        steps, before the test's first look; the shrink and the climb back that follow read the
        crossing of the network those steps harmed, which can sit far above the one of the
        network they started from (the char transformer: 0.041 against about 0.026; the
        residual CNN: 0.22, where the grid's best constant rate is 3e-3), and a restart there
        missed the target.  So the wrapper restarts from the first snapshot and the test runs
        again on the restored weights, the offline finder's way: growing from ``retreat`` of
        the rate where the shrink turned positive, and never past the rate the first test found
        (the ceiling it gave), ending at the first negative average as an informed ramp does.

        Only a start *far* past: one whose shrink went deeper than the average's lag of about
        three steps (``shrink**3``; on the way up the same lag is the ``ramp**3`` that
        ``settle`` keeps).  A start just past the crossing is where the test settles anyway, and
        on a flat start a noisy first look can shrink once (the GRU with AdamW from 1e-2: a
        re-test left it at 6e-3 and missing its target).  Once per run, since the restart
        restores every group: each group whose test ends at the same step re-tests with it.
        """
        self._retesting = True
        self._restart = "range test: the start was past the crossing; test again from below"
        self._phase[i], self._ramp_steps[i], self._last_lr[i] = "ramp", 0, None
        self._ramp_ema[i], self._evidence[i], self._informed[i] = RatioEMA(0.7), SignTest(), True
        self._cap[i], self._low[i] = lr, None
        self._best_loss, self._first_loss, self._peak_loss = math.inf, None, -math.inf
        self._start_level, self._descent, self._prev_loss = SignTest(), SignTest(), None
        new = self.retreat * low
        why = f"range test: the start was past the crossing (positive below {low:.3g}); re-test"
        return [Proposal(i, "lr", new, why)]

    def _left_start(self, s: Signals) -> int:
        """+1 or -1 when the smoothed loss stands ``clear`` standard errors above or below its
        starting level, else 0.

        The error combines the smoothed loss's own (an EMA of ~10 steps of minibatch losses with
        the deviation of the first ones) and that of the level (the mean of the first few). It
        is at least a millionth of the level, a few float32 ulps: a loss that never varies
        (one the loop reports as a constant) has no deviation, and the EMA's rounding, an ulp
        off the level, read as a rise and restarted the run.
        """
        level = self._start_level
        n = len(level.samples)
        if s.loss_ema is None or n < level.min_samples:
            return 0
        error = level.deviation * math.sqrt((1 - FAST_DECAY) / (1 + FAST_DECAY) + 1 / n)
        error = max(error, _ROUNDING * abs(level.mean))
        if abs(s.loss_ema - level.mean) <= self.clear * error:
            return 0
        return 1 if s.loss_ema > level.mean else -1

    def take_restart(self) -> str | None:
        """Asked by the wrapper after each ``propose``: restart from the first snapshot?"""
        reason, self._restart = self._restart, None
        return reason

    def before_rollback(self, knobs: Knobs) -> None:
        """The guard is about to restore an older state: keep what failed, which it would erase.

        Per group: the lowest rate that has failed, this one included, and whether the range
        test should retreat rather than probe: it failed before, or it was blind to this edge,
        i.e. had grown the rate with no sign yet (a flat start) or its recent cosines still
        stood clearly above zero.  The latter is what SGD with heavy-ball momentum shows on the
        benchmark's CNN and MLP: its averaged cosine stays at +0.3 to +0.5 until a few steps
        before a gradient-norm spike, and at +0.18 to +0.31 at it, since the update is a long
        average of gradients, while Adam's had mostly fallen to about zero when a spike came
        (bench-results/pilots, 17-18, read with ``trace.py`` there).  Not always: AdamW from
        1e-4 on MNIST-1D, in two seeds of the full suite, met a spike with its cosines at +0.17
        and +0.22, falling but still clear, and the retreat left it slower.  A failure before
        the test's first look is the start's, not the ramp's: the user's rate was past the edge,
        and the probe looks for it from below (a retreat cost AdamW from 0.1 on MNIST-1D its
        target, pilot 23).
        """
        self._ensure(len(knobs))
        self._at_failure = []
        self._kept = {
            "retested": self._retested,
            "metric": self._metric.state(),
            "at_average": self._at_average,
        }
        for i, k in enumerate(knobs):
            before = self._failed[i]
            grown = self._ramp_steps[i] >= self.min_ramp_steps  # else the start rate failed
            blind = (grown and not self._informed[i]) or self._evidence[i].sign(self.clear) > 0
            lowest = k["lr"] if before is None else min(k["lr"], before)
            self._at_failure.append((lowest, blind or before is not None))

    def on_backoff(self, step: int) -> None:
        """The guard rolled back and halved the rate.

        A range test that was blind to the edge it hit (see :meth:`before_rollback`) has no
        crossing to probe for: it retreats to ``retreat`` of the rate that failed, the offline
        finder's rule of a rate well below the one where the loss broke.  So does one that has
        failed before: the rollback may restore a state from before the first failure, and
        probing again from there loops (digits, SGD from 0.1: three full ramps, pilot 21); the
        lowest rate that failed is kept across restores, even one to the guard's first snapshot,
        which predates the controller's groups.  One that saw the crossing coming (the
        start, or the ramp, was past the edge) probes downwards from the halved rate: shrink,
        then ramp back up to the crossing, instead of cruising at a rate only known to be half
        of one that failed.  Trouble after the range test cuts as the guard does.
        """
        failure, self._at_failure = self._at_failure, []
        kept, self._kept = self._kept, {}
        self._retested = self._retested or kept.get("retested", False)  # one re-test per run
        if "metric" in kept:
            self._metric = MetricPlateau(**kept["metric"])
        self._at_average = self._at_average or kept.get("at_average", False)
        self._start_phase = "shrink" if self._start_phase == "ramp" else "cruise"
        known = len(self._phase)
        self._ensure(len(failure))  # the guard's first snapshot predates the groups
        for i, phase in enumerate(self._phase):
            retreat = False
            if i < len(failure):
                self._failed[i], retreat = failure[i]
            if retreat and phase in ("ramp", "ramp_up", "shrink"):
                self._phase[i] = "drop"
            elif i >= known:
                continue  # restored from before its first step: it starts as any group would
            elif phase == "ramp" and self._start_phase == "shrink":
                self._phase[i], self._ramp_steps[i], self._last_lr[i] = "shrink", 0, None
                self._evidence[i] = SignTest()
            else:
                self._phase[i] = "cruise"
        self.hyper.on_backoff(step)
        self.stability.on_backoff(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": list(self._phase),
            "ramp_ema": [e.state() for e in self._ramp_ema],
            "ramp_steps": list(self._ramp_steps),
            "evidence": [e.state() for e in self._evidence],
            "informed": list(self._informed),
            "last_lr": list(self._last_lr),
            "best_loss": self._best_loss,
            "first_loss": self._first_loss,
            "start_level": self._start_level.state(),
            "descent": self._descent.state(),
            "prev_loss": self._prev_loss,
            "peak_loss": self._peak_loss,
            "start_phase": self._start_phase,
            "trial": [None if t is None else asdict(t) for t in self._trial],
            "watch": list(self._watch),
            "failed": list(self._failed),
            "low": list(self._low),
            "cap": list(self._cap),
            "retested": self._retested,
            "metric": self._metric.state(),
            "at_average": self._at_average,
            "hyper": self.hyper.state_dict(),
            "stability": self.stability.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._phase = list(state["phase"])
        self._ramp_ema = [RatioEMA(**e) for e in state["ramp_ema"]]
        self._ramp_steps = list(state["ramp_steps"])
        # checkpoints from before the sign test read the bare sign, i.e. were always informed
        groups = len(self._phase)
        self._evidence = [SignTest(**e) for e in state.get("evidence", [{}] * groups)]
        self._informed = list(state.get("informed", [True] * groups))
        self._last_lr = list(state["last_lr"])
        self._best_loss = state["best_loss"]
        self._first_loss, self._peak_loss = state["first_loss"], state["peak_loss"]
        self._start_level = SignTest(**state.get("start_level", {}))
        self._descent = SignTest(**state.get("descent", {}))
        self._prev_loss = state.get("prev_loss")
        self._start_phase = state["start_phase"]
        self._trial = [_Trial.load(t) for t in state["trial"]]
        self._watch = list(state.get("watch", [0] * groups))
        self._failed = list(state.get("failed", [None] * groups))
        self._low = list(state.get("low", [None] * groups))
        self._cap = list(state.get("cap", [None] * groups))
        self._retested = state.get("retested", False)
        self._metric = MetricPlateau(
            **{"patience": self.metric_patience, **state.get("metric", {})}
        )
        self._at_average = state.get("at_average", False)
        self.hyper.load_state_dict(state["hyper"])
        self.stability.load_state_dict(state["stability"])
