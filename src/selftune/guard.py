"""The guard: catch instability, roll back to the last good state, back off, go on.

Every optimizer step, before the update, the guard checks the step's signals:

- *non-finite*: the loss or any gradient is NaN or infinite;
- *spike*: the loss (or the gradient norm) jumped far above its running level.  Minibatch losses
  have heavy tails, so a spike must be both ``z`` running deviations above the running mean *of
  the logarithm* and a factor ``ratio`` above the running level; the statistics only learn from
  healthy steps, and during the first ``warmup`` of them only a jump of ``early_ratio`` above
  the median of the last few healthy losses counts, or, for gradient norms, of ten times that
  above the lowest norm seen;
- *regression*: the loss's running level has stood above ``regress`` times the lowest it
  reached (and clear of the level's own noise) for ``interval`` healthy steps: no step was a
  spike, but the run got worse and stayed there (a network that died, a rate raised into a
  rising loss); or, where that is the smaller rise, above it by ``relapse`` (half) of the
  fall from the start to it, if that share stands clear of the noise: a network that learnt a
  little and then died rises less than ``regress`` back to chance.  Or the data got harder
  (a curriculum): the rollback is a trial, and the run goes forward again if the restored
  weights do no better on the data of now;
- *a jump never recovered from*: in the run's warm-up, a jump of the loss (``ratio`` above
  the recent median) or of the gradient norm (``grad_ratio`` above the lowest) too small for
  the early check, after which the loss's level has not got back below where it stood before
  within ``interval`` steps: the jump killed the network (a rate too high for it), whose loss
  then sits at chance level with no spike to call and no lower level to regress from.  The
  rollback is a trial too: a loss that rises by design in the first steps (a GAN player's)
  is as high on the restored weights, and the run goes forward again.

A loss below zero (a Gaussian negative log-likelihood, a negated score) has no logarithm: from
that step on the loss's statistics are kept on its own scale, where a factor above a level is a
factor above zero (see ``_RunningStats``).  A loss of exactly zero is a non-negative loss at its
floor (a cross-entropy that rounds to 0.0, a hinge loss with every margin met): it is not learnt
from, as before, and the log scale stays.

``GuardConfig(nonfinite_only=True)`` keeps the first check alone, for a loss that is no measure
of the optimizer's own progress (a GAN's players: each one's loss rises when the other's
improves, and rolling back one player's state does not bring it back).

A spike (not a non-finite value) is first only *held* (a ``hold`` event): the step's update is
not made, nothing is restored and no rate is cut, and the next step, on the same weights and a
new batch, judges it.  A spike there too, or a loss or gradient norm more than half ``z``
deviations above its level, is the weights': the rollback below, one step later and with no
update made between.  A spike the next batch does not show was its own batch's (the
ragged last batch of an epoch, a handful of examples where the others have a hundred, whose
mean loss strays far more; a batch of hard examples): the run goes on, having lost that one
batch's update, where a rollback would have lost up to ``interval`` steps and halved the rate
(``bench-results/ragged-batch/``).  ``confirm=False`` acts on the first spike.

On trouble the step is skipped, the model parameters, optimizer state, controller state and knobs
are restored from the newest snapshot, and the learning rate is cut by ``backoff`` (compounded
while trouble repeats); with no snapshot held yet (the first step, or the first after loading a
state dict) the step is only skipped and the rate cut (a ``skip`` event).  Trouble again before
``interval`` healthy steps have passed goes back one snapshot further; ``max_retries``
consecutive rollbacks raise :class:`GuardError`.  After a controller's restart from the first
snapshot (its probe harmed the weights), trouble that comes before the loss's level has got
below that snapshot's goes back to it, not to a newer one: those hold weights that the
restart's rate may have harmed in turn.  A regression instead goes back to the snapshot
of the lowest loss level held (kept beside the newest two for that), once per snapshot, and
a jump never recovered from to the newest snapshot taken before the jump.  A
spike on the first step after a rollback, on weights that were healthy when kept, comes from
the data or the objective (a new task, a layer unfrozen): the guard learns the new level
instead of rolling back until the run stops, and the rollback's cut is undone.  So it does for
a spike on the first step after a skip, on the weights the skip left as they were.

Snapshots are taken every ``interval`` healthy steps (default 25), of a state whose loss the guard
has just checked, and the newest two are kept; the first one is also kept for ``keep_initial``
steps, so that a controller whose early probing damaged the run can restart from the beginning.
25 steps bounds the work lost per rollback to a few percent of a short run, while a snapshot (one
copy of parameters and optimizer state) costs about one optimizer step of memory traffic, i.e.
under 4% per step amortised.

Snapshots are kept in host memory (``offload``): on an accelerator the two to four held would
otherwise take as many more copies of the parameters and of the optimizer's state (with
Adam, up to 9 parameter-sizes of device memory).  The copy to the host is queued without waiting
for it, in the device's stream order, so a step does not wait for it either; a rollback copies
back.  ``offload=False`` keeps them next to the parameters: faster rollbacks, more device memory.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from selftune.controllers.base import Option, check_flags, check_options
from selftune.errors import GuardError
from selftune.signals import Signals, square


def _advice(trouble: Trouble, cut: float) -> str:
    """What a GuardError tells the user to do, for the trouble that came back.

    The turns-between-tasks setting only where it can help: it still acts on a non-finite value.
    """
    advice = (
        f"Trouble that survives a rate cut to {cut:.3g}x may not come from the rate: check the "
        "data and the loss of this step, and the parameters' dtype (float16 under an optimizer "
        "whose eps is zero in float16; wrap warns of it); else lower the starting learning rate."
    )
    if math.isfinite(trouble.value):
        advice += (
            " A loss that takes turns between tasks of different scales is judged as one stream, "
            "each change of task a spike: give such a run GuardConfig(nonfinite_only=True)."
        )
    return (
        f"{advice} A run folder's decisions.jsonl, where the run logs one, lists every guard event."
    )


#: how many healthy losses the early level is the median of
RECENT = 5
#: the signal of a loss regression's trouble
REGRESSION = "loss_level"
#: the signal of a jump in the warm-up that the loss never came back from
DAMAGE = "loss_after_jump"


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guard; the defaults keep clean runs free of false alarms."""

    interval: int = 25
    warmup: int = 20
    z: float = 6.0
    ratio: float = 3.0
    grad_ratio: float = 10.0
    early_ratio: float = 10.0
    backoff: float = 0.5
    max_retries: int = 6
    #: a loss whose running level has stood this factor above the lowest it reached (and
    #: clear of its noise) for ``interval`` healthy steps has regressed: the run rolls back to
    #: the snapshot of the lowest level
    regress: float = 1.5
    #: so has a loss whose running level has lost this share of its fall from the start (the
    #: median of its first few values) to the lowest level, when that is less than ``regress``
    #: and clear of the level's noise: a network that learnt a little, then died
    relapse: float = 0.5
    #: the first snapshot is also kept until the first snapshot after this many steps, for a
    #: controller's restart (``auto``'s range test probes in the first tens of steps and may
    #: need to undo all of them)
    keep_initial: int = 100
    #: keep the snapshots in host memory, not next to the parameters (no difference on the CPU)
    offload: bool = True
    #: act on non-finite values only, judging no spike and no regression: for a loss that is
    #: no measure of this optimizer's own progress, such as a GAN player's, which rises when
    #: the other player gets better and which no rollback of this player's state brings back,
    #: or a policy gradient's surrogate (the default guard cost plain Adam modes of the data
    #: in ``bench-results/gan/`` and slowed one seed of five in ``policy-gradient/``, two
    #: before it judged a loss below zero on its own scale)
    nonfinite_only: bool = False
    #: hold back the update of a step whose loss or gradient norm spikes, and roll back only
    #: if the next step, on the same weights, spikes too or stands high: a spike the next
    #: batch does not show was its own batch's (a ragged last batch of an epoch, a batch of
    #: hard examples), and a rollback there cost up to ``interval`` steps and halved the rate
    #: for nothing
    confirm: bool = True

    def __post_init__(self) -> None:
        check_options(GUARD_OPTIONS, vars(self))
        check_flags(GUARD_FLAGS, vars(self))


#: the range of each GuardConfig setting (a NaN or infinite threshold would switch its check off)
GUARD_OPTIONS = {
    "interval": Option("steps between snapshots", "25", 1, whole=True),
    "warmup": Option("healthy steps before spikes are judged by z-score", "20", 0, whole=True),
    "z": Option("standard deviations above its level that make a spike", "6.0", 0, open_low=True),
    "ratio": Option("the loss's rise over its level that a spike needs", "3.0", 1, open_low=True),
    "grad_ratio": Option(
        "the gradient norm's rise over its level that a spike needs", "10.0", 1, open_low=True
    ),
    "early_ratio": Option("the jump that is a spike before warmup", "10.0", 1, open_low=True),
    "backoff": Option("the factor on the rate after a rollback", "0.5", 0, high=1, open_low=True),
    "max_retries": Option("rollbacks in a row before the run stops", "6", 1, whole=True),
    "regress": Option(
        "the loss level's rise over its lowest that, sustained, is a regression",
        "1.5",
        1,
        open_low=True,
    ),
    "relapse": Option(
        "the share of the loss's fall from its start that, lost and sustained, is a regression",
        "0.5",
        0,
        open_low=True,
    ),
    "keep_initial": Option("steps the first snapshot is kept for", "100", 0, whole=True),
}

#: the switches among the settings, and what each choice does (see ``check_flags``)
GUARD_FLAGS = {
    "offload": "True (snapshots in host memory, the default: no device memory) or False "
    "(snapshots on the parameters' device, taking device memory)",
    "nonfinite_only": "True (act on non-finite values only: for a loss that is no measure of "
    "this optimizer's own progress, a GAN player's, a policy gradient's surrogate) or False "
    "(also judge spikes and regressions, the default)",
    "confirm": "True (a spike's update is held back, and rolled back from only if the next "
    "step, on the same weights, spikes too or stands high, the default) or False (roll back "
    "at the first spike)",
}


@dataclass(frozen=True)
class Trouble:
    """What the guard saw: the signal, its value, and why that is trouble."""

    step: int
    signal: str
    value: float
    reason: str
    #: a spike whose update is only held back, for the next step to confirm (see ``confirm``)
    hold: bool = False


@dataclass
class _RunningStats:
    """EMA of a positive signal's logarithm, and of its step-to-step noise; or, for a loss that
    has gone below zero (``signed``), of the loss itself.

    The spread is measured from the change between consecutive healthy values, not from the
    deviation about the mean: while the loss falls fast (early training) the mean lags behind it,
    and a spread taken about a lagging mean is the lag, not the noise; it hid a loss 100x too
    large.  For independent noise the variance of a difference is twice the noise's, hence ``/2``.

    A factor above a level is a factor above zero: on the log scale a difference of
    ``log(factor)``, on the loss's own scale a rise of ``factor - 1`` times the level's distance
    from zero (the same for a positive level), see :meth:`above`.  A loss whose level stands
    near zero is then judged by its noise alone.
    """

    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    low: float = 0.0  #: the lowest value seen
    last: float = 0.0  #: the last healthy value, as :meth:`scaled`
    recent: list[float] = field(default_factory=list)  #: the last few healthy values
    best: float = math.inf  #: the lowest running level (``mean``) reached after the warm-up
    #: the median of the first few healthy values, as :meth:`scaled`: where progress starts
    start: float = math.inf
    signed: bool = False  #: on the loss's own scale, not its logarithm's

    @property
    def median(self) -> float:
        """The median of the last few healthy values (infinite before any)."""
        return statistics.median(self.recent) if self.recent else math.inf

    def unscaled(self, x: float) -> float:
        """A level ``x`` (the mean, the best) on the signal's own scale."""
        return x if self.signed else math.exp(x)

    def scaled(self, value: float) -> float:
        """``value`` on the scale the statistics are kept on."""
        return value if self.signed else math.log(value)

    def above(self, x: float, base: float, factor: float) -> bool:
        """Whether ``x`` stands more than ``factor`` above ``base`` (both as :meth:`scaled`)."""
        return x - base > self.rise(base, factor)

    def rise(self, base: float, factor: float) -> float:
        """How far above ``base`` (as :meth:`scaled`) is ``factor`` above it."""
        return (factor - 1) * abs(base) if self.signed else math.log(factor)

    def spike(
        self,
        value: float,
        z: float,
        ratio: float,
        warmup: int,
        early_ratio: float,
        early: Literal["median", "lowest"],
    ) -> float | None:
        """The z-score if ``value`` is a spike, else None.

        Before ``warmup`` healthy steps there is no deviation to judge by, so only a jump of
        ``early_ratio`` above the early level counts (reported as an infinite z-score): the
        ``"median"`` of the last few healthy values, or the ``"lowest"`` value seen.  On the
        loss's own scale the jump is measured from zero or, for a level nearer zero than the
        last few values spread, in that spread: the only scale of the noise there is yet.
        """
        if self.n == 0 or (value <= 0 and not self.signed):
            return None
        if self.n < warmup:
            level = self.median if early == "median" else self.low
            if self.signed:
                spread = max(self.recent) - min(self.recent)
                jump = (early_ratio - 1) * max(abs(level), spread)
                return math.inf if value - level > jump else None
            return math.inf if value > early_ratio * level else None
        score = self.deviations(value)
        return score if score > z and self.above(self.scaled(value), self.mean, ratio) else None

    def deviations(self, value: float) -> float:
        """How many running deviations ``value`` stands above the running level (after the
        warm-up; minus infinity for a value the statistics do not take)."""
        if self.n == 0 or not math.isfinite(value) or (value <= 0 and not self.signed):
            return -math.inf
        return (self.scaled(value) - self.mean) / max(math.sqrt(self.var), 1e-12)

    def regressed(self, ratio: float, relapse: float, z: float, warmup: int) -> bool:
        """Whether the level stands clearly above the lowest it reached (and note the lowest).

        Above means by more than :meth:`margin` and by more than ``z`` deviations of the level
        itself (an EMA of decay 0.95 carries ``sqrt(0.05 / 1.95)`` of the per-step noise): the
        lowest level of a noisy loss is an extreme of that noise.
        """
        if self.n < warmup:
            return False
        noise = self.noise(z)
        above = self.mean - self.best > max(noise, self.margin(ratio, relapse, noise))
        self.best = min(self.best, self.mean)
        return above

    def noise(self, z: float) -> float:
        """``z`` deviations of the level's own noise."""
        return z * math.sqrt(self.var * 0.05 / 1.95)

    def margin(self, ratio: float, relapse: float, noise: float) -> float:
        """The rise over the lowest level that is a regression: ``ratio`` above it or, when
        that is less, the share ``relapse`` of the fall from the start level to the lowest, if
        that share stands clear of the level's ``noise`` (:meth:`noise`; a fall within the
        noise is no progress to lose)."""
        lost = relapse * (self.start - self.best)
        by_ratio = self.rise(self.best, ratio)
        return min(by_ratio, lost) if lost > noise else by_ratio

    def learn(self, value: float, decay: float = 0.95) -> None:
        if not math.isfinite(value) or (value <= 0 and not self.signed):
            return
        x = self.scaled(value)
        self.low = min(self.low, value) if self.n else value
        self.recent = [*self.recent[1 - RECENT :], value]
        if self.n == 0:
            self.mean = x
        else:
            self.mean += (1 - decay) * (x - self.mean)
            self.var = decay * self.var + (1 - decay) * 0.5 * square(x - self.last)
        self.last = x
        self.n += 1
        if self.n == RECENT:
            self.start = self.scaled(self.median)

    def on_own_scale(self) -> _RunningStats:
        """These statistics moved to the loss's own scale, for a loss that went below zero:
        learnt again from the last few healthy values, so that the early check, with
        their spread for a scale, guards the steps until the warm-up is over again."""
        stats = _RunningStats(signed=True)
        for value in self.recent:
            stats.learn(value)
        return stats


@dataclass
class Snapshot:
    """The state a rollback restores (held in memory only)."""

    step: int
    payload: dict[str, Any]
    level: float = math.inf  #: the loss's running level (its log) when taken; inf: not known

    def plain(self) -> dict[str, Any]:
        """As plain data, for a checkpoint (a dataclass instance is not loadable there)."""
        return {"step": self.step, "payload": self.payload, "level": self.level}

    @classmethod
    def from_plain(cls, saved: dict[str, Any]) -> Snapshot:
        return cls(int(saved["step"]), saved["payload"], float(saved.get("level", math.inf)))


@dataclass
class Guard:
    """Checks each step and keeps the snapshots a rollback needs."""

    config: GuardConfig = field(default_factory=GuardConfig)
    loss: _RunningStats = field(default_factory=_RunningStats)
    grad: _RunningStats = field(default_factory=_RunningStats)
    healthy_since: int = 0  #: step of the last rollback (or 0): trouble within ``interval`` repeats
    retries: int = 0  #: consecutive rollbacks without ``interval`` healthy steps in between
    snapshots: list[Snapshot] = field(default_factory=list)
    initial: Snapshot | None = None  #: the first snapshot, for ``keep_initial`` steps
    #: the snapshot of the lowest loss level that left the newest two: where a regression goes
    best: Snapshot | None = None
    above: int = 0  #: healthy steps in a row with the loss level regressed, since any rollback
    #: the next step is the first on weights a rollback restored (see :meth:`judge`)
    fresh: bool = False
    #: the step of the snapshot the last regression went back to
    regressed_to: int | None = None
    #: trouble this step that the guard answered by learning a new level: for the log
    relevelled: Trouble | None = None
    #: the step of the snapshot the last rollback restored, and of the last one whose rollback
    #: was undone (see :meth:`_forgive`)
    restored: int | None = None
    forgiven: int | None = None
    #: the step of each signal's last relevel: levels learnt before it (a snapshot's statistics,
    #: its loss level) describe data the run no longer sees
    loss_since: int = 0
    grad_since: int = 0
    #: a regression's rollback on trial: the newest snapshot it left, kept until the trial ends
    abandoned: Snapshot | None = None
    #: the trial's log loss level at the regression, and its steps and their summed log losses
    trial: dict[str, float] | None = None
    #: this step: the snapshot a failed trial goes forward to again (see :meth:`_judge_trial`)
    forward: Snapshot | None = None
    #: whether a trial failed: this run's loss rises by design, and no rise is judged again
    rises: bool = False
    #: this step: the snapshot whose rollback the restored weights proved needless, whose
    #: knobs and controller state the wrapper puts back without the rollback's cut
    mistaken: Snapshot | None = None
    #: the knobs and controller state before the last step's skip (no weights: a skip changes
    #: none), set by the wrapper, for a relevel at the next step to put back (see :meth:`judge`)
    skipped: Snapshot | None = None
    #: whether the controller restarted from the first snapshot (its probe harmed the weights):
    #: trouble before the loss improves on it goes back there (see :meth:`rollback`)
    restarted: bool = False
    #: a jump of the warm-up too small for its check: its step and the loss's log level before
    #: it, until the level gets back below that (see :meth:`_damaged`)
    jump: dict[str, float] | None = None
    #: the step of the last spike held, confirmed or not: one of the step before is pending,
    #: and this step confirms it or not
    last_hold: int | None = None

    @property
    def restart_point(self) -> Snapshot | None:
        """The oldest snapshot held: where a controller's restart goes back to."""
        return self.initial or (self.snapshots[0] if self.snapshots else None)

    def begin_step(self, step: int) -> None:
        """Called before a step's signals are read; a replay's guard drops its snapshots here
        where the logged run's started again (:class:`selftune.replay.ReplayGuard`)."""

    def check(self, s: Signals) -> Trouble | None:
        """Judge this step; on a healthy one, count it towards forgiving earlier rollbacks."""
        trouble = self.judge(s)
        if trouble is None and self.retries and s.step - self.healthy_since >= self.config.interval:
            self.retries = 0
        return trouble

    def judge(self, s: Signals) -> Trouble | None:
        """Is this step trouble?  Learn the running statistics from it if not.

        Trouble is a non-finite value, a spike, or a regression of the loss's level.  The
        first step after a rollback reads the restored weights, which were healthy when kept:
        a spike they show too comes from the data or the objective (a new task, a layer just
        unfrozen), which no rollback mends and rolling back again would only repeat until the
        run stops.  So does one that the first step after a skip shows on the weights the skip
        left as they were (a state dict loaded before a new task), which skipping again would
        only repeat, cutting a rate that moves no weight.  The guard then learns the new level
        instead (:attr:`relevelled` says so); so it does when a regression would go back to the
        snapshot the last one restored.
        """
        c = self.config
        fresh, self.fresh, self.relevelled, self.mistaken = self.fresh, False, None, None
        skipped, self.skipped, self.forward = self.skipped, None, None
        pending = self.last_hold if self.last_hold == s.step - 1 else None
        if s.loss is not None and -math.inf < s.loss < 0 and not self.loss.signed:
            self._to_own_scale(s.step)
        trouble = self._spike(s)
        if trouble is None and pending is not None:
            trouble = self._still_high(s, pending)
        if trouble is not None:
            if not (fresh and math.isfinite(trouble.value)):
                return self._confirmed(trouble, pending)
            shown = "the restored weights" if self.restored is not None else "the weights kept"
            self._relevel(trouble, f"{shown} show it too")
            self._forgive(skipped)
        if s.loss is not None:
            self._note_jump(s)
            self.loss.learn(s.loss)
            if self._judge_trial(s.loss):
                return None
            trouble = self._damaged(s.step)
            if trouble is not None:
                return trouble
            judged = not (self.rises or c.nonfinite_only)
            regressed = self.loss.regressed(c.regress, c.relapse, c.z, c.warmup) and judged
            self.above = self.above + 1 if regressed else 0
            if self.above >= c.interval:
                trouble = self._regression(s.step)
                held = self._comparable()
                if held and self._lowest(held).step != self.regressed_to:
                    return trouble
                self._relevel(trouble, "it came back from the snapshot the last one restored")
        self.grad.learn(s.grad_norm)
        return None

    def _still_high(self, s: Signals, pending: int) -> Trouble | None:
        """Trouble when the loss or the gradient norm of the step after a held spike, on the
        same weights, stands more than half ``z`` deviations above its level, short of a spike
        of its own: the weights were harmed, if less than that one batch showed.  A rate raised
        30x on a Gaussian NLL spiked its loss once, and the next batch, high but short of a
        spike, passed as healthy: the run went on at that rate, and ended at 3x the clean
        run's loss (``tests/test_guard.py``).  Under normal noise a batch stands 3 deviations
        high about once in a thousand."""
        c = self.config
        bar = c.z / 2
        read = [("loss", s.loss, self.loss), ("grad_norm", s.grad_norm, self.grad)]
        for signal, value, stats in read:
            if value is None or stats.n < c.warmup:
                continue
            score = stats.deviations(value)
            if score > bar:
                name = "loss" if signal == "loss" else "gradient norm"
                why = f"{name} {value:.4g} is {score:.1f} sd above its running level"
                return Trouble(s.step, signal, value, f"{why} (over {bar:g})")
        return None

    def _confirmed(self, trouble: Trouble, pending: int | None) -> Trouble:
        """``trouble`` as the wrapper acts on it: a finite spike after a healthy step is held
        (its update held back, nothing restored, nothing cut: :attr:`last_hold`), and the next
        step judges it.  The weights stay as they were, so a spike there too is theirs, and
        the rollback comes one step later than it would have, with no update made between;
        a spike the next batch does not show was its own batch's.  A non-finite value is
        acted on at once, as it is with ``confirm`` off, and so is a spike with no snapshot
        held: its skip already leaves the weights for the next step to judge (:meth:`judge`).
        So is a spike within ``interval`` steps of the last one held: a batch's own spike is
        rare, and spikes that keep coming are the run's (two tasks by turns, whose losses stand
        100x apart, had every other step held, and the second task never trained).  And so is
        a jump of the warm-up, before the signal's spread is known: its check (``early_ratio``
        above the early level) has no noise to weigh a batch by, and such a jump is a start
        past the rate's edge, whose rollback came a step later and a batch along when held
        (``tests/test_core.py``'s starts at 10x the rate then missed their bar in all five
        runs that met such a jump)."""
        if pending is not None:
            why = f"{trouble.reason}, on the weights whose spike at step {pending} was held"
            return replace(trouble, reason=why)
        last, c = self.last_hold, self.config
        recent = last is not None and trouble.step - last < c.interval
        stats = self.grad if trouble.signal == "grad_norm" else self.loss
        early = stats.n < c.warmup
        if recent or early or not (c.confirm and self.snapshots and math.isfinite(trouble.value)):
            return trouble
        self.last_hold = trouble.step
        return replace(trouble, hold=True)

    def _regression(self, step: int) -> Trouble:
        """The trouble of a regression at ``step``, saying which rise called it."""
        c, stats = self.config, self.loss
        level, best = stats.unscaled(stats.mean), stats.unscaled(stats.best)
        if self._margin() < stats.rise(stats.best, c.regress):
            start = stats.unscaled(stats.start)
            above = (
                f"the lowest it reached ({best:.4g}) by more than {c.relapse:g} of its fall "
                f"there from its start ({start:.4g}),"
            )
        else:
            above = f"{c.regress:g}x the lowest it reached ({best:.4g})"
        why = f"loss regression: its running level {level:.4g} has stood above {above} for "
        why += f"{c.interval} steps"
        return Trouble(step, REGRESSION, level, why)

    def _margin(self) -> float:
        """The rise over the loss's lowest level that is a regression, by this config."""
        c = self.config
        return self.loss.margin(c.regress, c.relapse, self.loss.noise(c.z))

    def _to_own_scale(self, step: int) -> None:
        """Judge the loss on its own scale from now on: it went below zero, where a log has no
        value (a Gaussian or a flow's negative log-likelihood, a negated score).  Before, the
        statistics stopped learning there, and a Gaussian NLL that stood at -0.5 jumped to 3.5
        unseen, against a level learnt before it crossed zero (``tests/test_guard.py``).  Not
        at zero itself: a cross-entropy that rounds to 0.0 is at its floor, and on its own
        scale the small losses around it made a hard example's a spike.  The snapshots' levels
        are on the log scale: as after a relevel, none is compared with the new ones."""
        self.loss, self.loss_since, self.jump = self.loss.on_own_scale(), step, None
        if self.best is not None and self.best.step < step:
            self.best = None
        self.end_trial()

    def _spike(self, s: Signals) -> Trouble | None:
        """A non-finite loss or gradient norm, or a spike of either."""
        c = self.config
        if s.loss is not None and not math.isfinite(s.loss):
            return Trouble(s.step, "loss", s.loss, f"loss is {s.loss}")
        if not math.isfinite(s.grad_norm):
            return Trouble(s.step, "grad_norm", s.grad_norm, f"gradient norm is {s.grad_norm}")
        if c.nonfinite_only:
            return None
        if s.loss is not None:
            # early, against the recent median, not the lowest loss seen: an extreme of noisy
            # minibatch losses, which plain SGD with momentum at the best rate of the
            # benchmark's regression bounces 7.7x above within its first 25 steps
            # (bench-results/pilots/early_swings.py)
            score = self.loss.spike(s.loss, c.z, c.ratio, c.warmup, c.early_ratio, "median")
            if score is not None:
                why = _spike_why("loss", s.loss, score, c.early_ratio, "recent median")
                return Trouble(s.step, "loss", s.loss, why)
        # the norms of the same starts stay within 37x of their lowest (that regression again;
        # the other five workloads within 8.4x), inside the factor of 100 they are given
        score = self.grad.spike(
            s.grad_norm, c.z, c.grad_ratio, c.warmup, c.early_ratio * 10, "lowest"
        )
        if score is not None:
            why = _spike_why("gradient-norm", s.grad_norm, score, c.early_ratio * 10, "lowest")
            return Trouble(s.step, "grad_norm", s.grad_norm, why)
        return None

    def _note_jump(self, s: Signals) -> None:
        """Remember a jump of the warm-up that its check let pass: the loss above ``ratio``
        times the recent median, or the gradient norm above ``grad_ratio`` times the lowest,
        the factors a spike needs after the warm-up.  Early, only ten times that is a spike,
        since a healthy start bounces nearly that far (heavy-ball SGD at the benchmark
        regression's best rate, 7.7x); but a jump that far can also be the step that killed
        the network, after which its loss sits at chance level, no spike ever comes, and the
        newer snapshots hold the dead weights (the small CNN with SGD at 1.0: the loss 4x its
        median and the gradient norm 84x its lowest at steps 8-9, chance level for 2,000
        steps after; ``bench-results/too-high/``).  Only in the run's own warm-up: one after a
        relevel (or on the loss's own scale) learns new data, whose jumps are its own."""
        c = self.config
        if self.jump is not None or self.rises or c.nonfinite_only or self.loss_since:
            return
        if not 0 < self.loss.n < c.warmup or s.loss is None:
            return
        loss_jump = s.loss > c.ratio * self.loss.median
        grad_jump = 0 < self.grad.n < c.warmup and s.grad_norm > c.grad_ratio * self.grad.low
        if loss_jump or grad_jump:
            self.jump = {"step": s.step, "level": self.loss.mean}

    def _damaged(self, step: int) -> Trouble | None:
        """Trouble when the loss's level has not got back below where it stood before the
        warm-up's jump (:meth:`_note_jump`) within ``interval`` steps of it: the jump did
        harm, which a healthy bounce does not (its loss falls on).  Going back to the snapshot
        from before the jump (:meth:`rollback`) and halving the rate costs those steps."""
        jump = self.jump
        if jump is None:
            return None
        if self.loss.mean < jump["level"]:
            self.jump = None
        elif step - jump["step"] >= self.config.interval:
            level, before = self.loss.unscaled(self.loss.mean), self.loss.unscaled(jump["level"])
            why = (
                f"loss after a jump: its running level {level:.4g} has not got back below "
                f"{before:.4g}, where it stood before the jump of step {int(jump['step'])}, "
                f"in {self.config.interval} steps"
            )
            return Trouble(step, DAMAGE, level, why)
        return None

    def _judge_trial(self, loss: float) -> bool:
        """Weigh a regression's rollback over the ``interval`` steps after it; True when it
        failed and the run goes forward again to the snapshot it left (:attr:`forward`).

        A regression says the weights got worse; so does a loss that rises by design (a
        curriculum that mixes harder examples in, a penalty whose weight grows), and there
        the older weights, on the data of now, do no better.  The rollback is kept if the
        mean log loss of the trial stands below the level that regressed by half the rise
        that called it a regression (weights that had died or diverged fall back far below
        it at once); else the newest snapshot the rollback left is restored, at the rate it
        held, and its level accepted as the new normal; no later rise is judged a regression
        in this run (:attr:`rises`), since each trial costs steps.  Under such a curriculum
        (``tests/test_guard.py``) plain AdamW through the guard ended with 2.6-3.1x the error
        of plain AdamW, each regression's rollback costing the steps since the lowest level
        and half the rate, again at every further rise.

        The rollback of a jump never recovered from (:meth:`_damaged`) is on the same trial,
        kept if the trial's mean log loss stays below the level the jump left: dead weights'
        level is above where the restored ones start.  A loss that rises by design in the
        first steps (a GAN player's, as the other player learns) is as high on the restored
        weights; without the trial every rollback re-entered the warm-up, met the same rise,
        and the default guard halved a GAN generator's rate up to 246 times
        (``bench-results/gan/``).
        """
        trial = self.trial
        if trial is None or not math.isfinite(loss) or (loss <= 0 and not self.loss.signed):
            return False
        trial["age"] += 1
        trial["total"] += self.loss.scaled(loss)
        mean = trial["total"] / trial["age"]
        if trial["age"] >= RECENT and mean >= trial["level"]:
            helped = False  # no better at all: no need to wait for the rest
        elif trial["age"] < self.config.interval:
            return False
        elif "need" in trial:
            helped = trial["level"] - mean > trial["need"]
        else:  # saved by an older version, with the factor of its rule (none: a regression's)
            factor = trial.get("factor", math.sqrt(self.config.regress))
            helped = self.loss.above(trial["level"], mean, factor)
        self.forward = None if helped else self.abandoned
        self.rises = self.rises or not helped
        self.end_trial()
        return self.forward is not None

    def end_trial(self) -> None:
        """Stop weighing a regression's rollback (trouble came, or the run restarted)."""
        self.trial = self.abandoned = None

    def went_forward(self, snap: Snapshot) -> None:
        """The wrapper restored ``snap`` after a failed trial: hold it as the newest snapshot
        and take the level its statistics bring as the lowest, as after a relevel."""
        self._hold_newest(snap)
        self.loss.best, self.above = self.loss.mean, 0

    def restarted_from(self, snap: Snapshot) -> None:
        """The wrapper restarted from ``snap``: the newer snapshots, the lowest level's and
        a regression's trial belong to the trajectory it abandoned."""
        self.snapshots, self.best, self.restarted, self.jump = [snap], None, True, None
        self.end_trial()

    def _hold_newest(self, snap: Snapshot) -> None:
        """Make ``snap`` the newest snapshot held, beside the one before it."""
        self.snapshots = [*[s for s in self.snapshots if s.step < snap.step][-1:], snap]

    def _forgive(self, skipped: Snapshot | None) -> None:
        """Mark the rollback just made as needless: the trouble came from the data, and the
        rate cut and the controller's reaction to a failure (``auto`` remembers the rate that
        failed and may retreat far below it) would hold the rest of the run back for nothing.
        The steps back to the snapshot stay lost: the weights left are not kept.  Once per
        snapshot, so trouble that keeps coming back from one snapshot is cut as before, and
        the count of rollbacks in a row starts again: they were the data's.  After a skip
        (no snapshot restored) the cut undone is the skip's: ``skipped`` holds what it cut."""
        if self.restored is None:
            snap = skipped
        elif self.restored == self.forgiven:
            return
        else:
            snap = next((s for s in self._held() if s.step == self.restored), None)
        if snap is not None:
            self.mistaken, self.forgiven, self.retries = snap, snap.step, 0

    def _relevel(self, trouble: Trouble, why: str) -> None:
        """Learn the troubled signal's level afresh instead of rolling back.  A loss that
        spiked on weights that were healthy marks new data or a new objective, whose gradients
        are of another size too: the gradient norm's level is learnt afresh with it.  Kept,
        it judged the new task's gradients against the old one's (two tasks by turns, whose
        losses stand 100x apart: the norm spiked a few steps after the loss's relevel, and its
        rollback's cut stood; ``bench-results/multi-task/``).  A gradient norm's own spike
        (a layer unfrozen) leaves the loss's level as it was."""
        spike = trouble.signal != REGRESSION
        if spike:  # of either signal: the gradient norm's level is learnt afresh
            self.grad, self.grad_since = _RunningStats(), trouble.step
        if trouble.signal != "grad_norm":
            if spike:
                self.loss = _RunningStats(signed=self.loss.signed)
            else:
                self.loss.best, self.above = self.loss.mean, 0
            self.loss_since, self.jump = trouble.step, None
            if self.best is not None and self.best.step < trouble.step:
                self.best = None
        reason = f"{trouble.reason}; {why}: the data or the objective changed, not the run"
        self.relevelled = Trouble(trouble.step, trouble.signal, trouble.value, reason)

    def wants_snapshot(self, step: int) -> bool:
        """Snapshot on the first step and every ``interval`` steps after."""
        return not self.snapshots or step % self.config.interval == 0

    def keep(self, step: int, payload: dict[str, Any]) -> None:
        level = self.loss.mean if self.loss.n else math.inf
        snap = Snapshot(step, payload, level)
        if len(self.snapshots) > 1:  # the older of the two leaves: kept if the lowest so far
            leaving = self.snapshots[0]
            # not one from before the last relevel: its level is of data the run no longer
            # sees (a lower one held the place of every later snapshot's for good)
            comparable = leaving.step >= self.loss_since
            if comparable and leaving.level < (math.inf if self.best is None else self.best.level):
                self.best = leaving
        if self.initial is None and not self.snapshots and step <= self.config.keep_initial:
            self.initial = snap
        elif self.initial is not None and step > self.config.keep_initial:
            self.initial = None
        self.snapshots = [*self.snapshots[-1:], snap]

    def forget_snapshots(self) -> None:
        """Drop every snapshot: the param groups changed, and one taken before could not restore
        the new group.  The next healthy step takes a fresh one."""
        self.snapshots, self.initial, self.best, self.jump = [], None, None, None
        self.end_trial()

    def rollback(self, trouble: Trouble) -> tuple[Snapshot | None, float]:
        """The snapshot to restore and the factor to cut the learning rate by.

        With no snapshot held (trouble in the first step, or in the first after loading a
        state dict, which carries none) there is nothing to restore: the troubled step is
        skipped (its update was never made) and the rate cut, as a rollback would.  Raises
        :class:`GuardError` when trouble keeps coming back.
        """
        self.above, jump, self.jump = 0, self.jump, None
        if trouble.signal == REGRESSION and (held := self._comparable()):
            # to the lowest level; a regression never escalates: it comes only after
            # ``interval`` steps, and cuts the rate once
            snap = self._back_on_trial(self._lowest(held), trouble.step, self._margin() / 2)
            self.regressed_to = snap.step
            return snap, self.config.backoff
        self.end_trial()
        self.retries += 1
        what = f"step {trouble.step}: {trouble.reason} ({trouble.signal}={trouble.value})"
        if self.retries > self.config.max_retries:
            cut = self.config.backoff ** (self.retries - 1)
            raise GuardError(
                f"{what}; {self.retries - 1} rollbacks did not help, the last with the learning "
                f"rate cut to {cut:.3g}x the rate its snapshot held. {_advice(trouble, cut)}"
            )
        if not self.snapshots:
            # the weights stay as they were, and the next step reads them again: trouble it
            # shows too is the data's, as on weights a rollback restored (see :meth:`judge`)
            self.healthy_since, self.fresh, self.restored = trouble.step, True, None
            return None, self.config.backoff**self.retries
        if trouble.signal == DAMAGE and jump is not None and (before := self._before(jump)):
            snap = self._back_on_trial(before, trouble.step, 0.0)
            return snap, self.config.backoff**self.retries
        # trouble again soon after a rollback: the newest snapshot may already be on the way down
        index = -2 if self.retries > 1 and len(self.snapshots) > 1 else -1
        snap = self.snapshots[index]
        self.snapshots = self.snapshots[: len(self.snapshots) + index + 1]
        start = self._restart_instead_of(snap)
        if start is not None:
            snap, self.snapshots = start, [start]
        self.healthy_since, self.fresh, self.restored = trouble.step, True, snap.step
        return snap, self.config.backoff**self.retries

    def _restart_instead_of(self, snap: Snapshot) -> Snapshot | None:
        """The controller's restart point, if trouble goes back there instead of ``snap``: the
        controller restarted from the first snapshot, and the loss has made no progress on it
        since.  The newer snapshots may then hold weights the restart's rate harmed (dead units
        at chance level, whose loss no rollback lowers); the restart point holds none.  Without
        a restart a loss that has not moved is no sign of harm (a recurrent model's flat
        start), nor is a level not known (no loss given), and ``snap`` stands (None)."""
        start = self.initial if self.restarted else None
        if start is None or start.step < self.loss_since or not math.isfinite(start.level):
            return None
        return start if snap.level >= start.level else None

    def _held(self) -> list[Snapshot]:
        return [s for s in (self.initial, self.best, *self.snapshots) if s is not None]

    def _comparable(self) -> list[Snapshot]:
        """The snapshots a regression may go back to: those whose loss level was learnt on the
        data the run sees now.  Before, a task switch's regression went back to a snapshot of
        the old task, the lowest level by the old task's losses, which the new one's data
        called a spike at once."""
        return [s for s in self._held() if s.step >= self.loss_since]

    @staticmethod
    def _lowest(held: list[Snapshot]) -> Snapshot:
        """The snapshot of the lowest loss level (the oldest if none knows its level)."""
        known = [s for s in held if s.level < math.inf]
        return min(known, key=lambda s: (s.level, -s.step)) if known else held[0]

    def _before(self, jump: dict[str, float]) -> Snapshot | None:
        """The newest snapshot held from before the warm-up's ``jump`` (None if none is)."""
        taken = [s for s in self._comparable() if s.step < jump["step"]]
        return max(taken, key=lambda s: s.step) if taken else None

    def _back_on_trial(self, snap: Snapshot, step: int, need: float) -> Snapshot:
        """Go back to ``snap`` at ``step``, a rollback on trial (:meth:`_judge_trial`): the newer
        snapshots belong to the trajectory left behind and are dropped, but the newest is kept
        to go forward to if the restored weights' mean log loss does not stand ``need`` (as
        :meth:`_RunningStats.scaled`) below the level of now."""
        newest, level = self.snapshots[-1] if self.snapshots else None, self.loss.mean
        self._hold_newest(snap)
        if self.best is not None and self.best.step > snap.step:
            self.best = None
        self.healthy_since, self.fresh, self.restored = step, True, snap.step
        if newest is not None and newest.step > snap.step:
            self.abandoned = newest
            self.trial = {"level": level, "age": 0, "total": 0.0, "need": need}
        return snap

    def snapshots_state(self) -> dict[str, Any]:
        """The snapshots as plain data, for a checkpoint: they live in memory only."""
        kept = {name: getattr(self, name) for name in _KEPT_APART}
        return {
            "held": [s.plain() for s in self.snapshots],
            **{name: None if s is None else s.plain() for name, s in kept.items()},
        }

    def load_snapshots_state(self, saved: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Put the snapshots back after ``load_state_dict`` (which clears them).

        A list is the format of checkpoints written before the first snapshot was kept apart.
        """
        if isinstance(saved, list):
            saved = {"held": saved, "initial": None}
        self.snapshots = [Snapshot.from_plain(s) for s in saved["held"]]
        for name in _KEPT_APART:  # absent from checkpoints older than the snapshot
            plain = saved.get(name)
            setattr(self, name, None if plain is None else Snapshot.from_plain(plain))

    def statistics(self) -> dict[str, Any]:
        """The running levels of loss and gradient norm, which a snapshot keeps with the state.

        A rollback restores them with the state: levels learnt on the abandoned trajectory
        (a loss that had fallen 20x) would call the restored state's own loss a spike.
        """
        return {"loss": asdict(self.loss), "grad": asdict(self.grad)}

    def load_statistics(self, stats: dict[str, Any], taken: int | None = None) -> None:
        """Put back the levels of a snapshot taken at step ``taken`` (None: a state dict's):
        each signal's only if it was learnt since that signal's last relevel.  An older one
        describes data the run no longer sees, and called the next step a spike: after a task
        switch, ``auto``'s restart and the guard's rollback took turns until the run stopped."""
        if taken is None or taken >= self.loss_since:
            self.loss = _RunningStats(**stats["loss"])
        if taken is None or taken >= self.grad_since:
            self.grad = _RunningStats(**stats["grad"])

    def state_dict(self) -> dict[str, Any]:
        return {**self.statistics(), **copy.deepcopy({k: getattr(self, k) for k in _SAVED})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_statistics(state)
        defaults = {f.name: f.default for f in fields(self) if f.name in _SAVED}
        for name, default in defaults.items():  # a state saved by an older version lacks some
            setattr(self, name, copy.deepcopy(state.get(name, default)))
        if self.retries > self.config.max_retries:
            # saved after the guard gave up: a load of it is a new try (GuardError's advice:
            # the data or the rate seen to), and the spent count made the first bad batch after
            # it raise GuardError at once, with no rollback made
            self.retries = 0
        self.snapshots = []  # snapshots live in memory only; a fresh one is taken at once
        for name in _KEPT_APART:
            setattr(self, name, None)


#: what :meth:`Guard.state_dict` saves besides the statistics (the snapshots are saved apart)
_SAVED = (
    "healthy_since",
    "retries",
    "above",
    "fresh",
    "regressed_to",
    "restored",
    "forgiven",
    "loss_since",
    "grad_since",
    "trial",
    "rises",
    "restarted",
    "jump",
    "last_hold",
)
#: the snapshots held beside the newest two, saved with them by :meth:`Guard.snapshots_state`
_KEPT_APART = ("initial", "best", "abandoned", "skipped")


def _spike_why(name: str, value: float, score: float, factor: float, against: str) -> str:
    """A spike's reason: its z-score, or, in the warm-up, which has no deviation to judge by
    yet (:meth:`_RunningStats.spike`'s infinite score, which read as "inf sd"), the jump's check."""
    if math.isinf(score):
        return (
            f"{name} spike: {value:.4g} jumped past the warm-up's check ({factor:g}x its "
            f"{against}, before a deviation is known)"
        )
    return f"{name} spike: {value:.4g} is {score:.1f} sd above its running level"
