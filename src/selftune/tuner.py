"""``SelfTuned``: the optimizer users hold.  It owns signals, controller, policy, guard and log.

The learning rate is tuned as a per-group *scale* that selftune keeps and applies only while the
wrapped optimizer steps: ``param_groups[i]["lr"]`` stays the value the user or a scheduler set, so
``LambdaLR`` (which overwrites the rate from ``base_lrs``) and chainable schedulers (which multiply
it) both compose with selftune instead of erasing or compounding its adjustment.  The *effective*
rate, ``lr × scale``, is what ``hyperparams()`` returns and what the log records.  Momentum and the
Adam betas belong to selftune outright and are written into ``param_groups`` directly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch.nn.parameter import is_lazy

from selftune import knobs as knobs_io
from selftune import shards
from selftune.audit import FOLLOWS, append_line
from selftune.average import WeightAverage, check_averageable, check_decay
from selftune.combined import defaults_of, held_state, in_combined, optimizer_name, parts
from selftune.controllers import CONTROLLERS, Controller, Knobs, Proposal, make_controller
from selftune.controllers.base import checked
from selftune.controllers.joint import JointController
from selftune.errors import ConfigError, ControllerError, GuardError, RateFloorWarning
from selftune.guard import Guard, GuardConfig, Snapshot, Trouble
from selftune.hooks import StepGate, stepping_inside
from selftune.policy import Policy, start_misfits
from selftune.signals import (
    RankState,
    RefusedStep,
    Signals,
    SignalTracker,
    check_loss,
    flagged_ranks,
    pooled,
)

if TYPE_CHECKING:
    from selftune.audit import AuditLog

_WRAPPED = "_selftune_wrapped"
#: the relative rounding a rate stored as a scale times a base rate may carry
_ROUNDING = 1.0 + 4 * sys.float_info.epsilon


@dataclass(frozen=True)
class Decision:
    """A knob change that was applied, with the reason in words and the signals behind it."""

    step: int
    group: int
    knob: str
    old: float
    new: float
    reason: str
    signals: dict[str, float] = field(default_factory=dict)
    clipped: bool = False
    #: "controller", "guard", or "bound" (a scheduler's rise cut back to the upper bound)
    source: str = "controller"
    value: float = 0.0  #: the stored value replay sets (the scale for ``lr``)


@dataclass(frozen=True)
class StepEvent:
    """What listeners receive after every optimizer step (applied or skipped).

    ``guard_events``: every guard record the step's log holds (``"kind": "guard"``), in the
    log's order; a step may hold two, a ``relevel`` as the guard judged it and then a
    ``restart`` the controller asked for.  ``guard`` is the last of them (the step's own guard
    event where there is one), or None: a listener that read ``guard`` alone heard one record
    of such a step, and a writer counting them fell behind the log.  An event built with
    ``guard`` and no ``guard_events`` lists ``guard``.
    """

    step: int
    loss: float | None
    hyperparams: list[dict[str, float]]
    decisions: list[Decision]
    guard: dict[str, Any] | None
    signals: Signals | None
    guard_events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.guard_events and self.guard is not None:
            object.__setattr__(self, "guard_events", [self.guard])


class SelfTuned(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that tunes the optimizer it wraps while it trains.

    Build it with :func:`selftune.wrap`.  ``param_groups`` and ``state`` are the wrapped
    optimizer's own objects, so schedulers, gradient clipping and checkpoint code that reach into
    them keep working.  Call ``step(loss=loss.detach())``; the loss is optional.

    Step the wrapper, not the optimizer it wraps: a step of that one itself (a reference kept
    to it, ``opt.optimizer.step()``, ``scaler.step(opt.optimizer)``) is refused by name before
    it moves a weight, as it would escape the guard, the log and the replay; ``unwrap`` hands
    it back to step plainly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: str | Controller = "auto",
        *,
        policy: Policy | None = None,
        guard: bool | GuardConfig | None = True,
        log_dir: str | Path | None = None,
        seed: int | None = None,
        average: bool | float = False,
        groups: str = "each",
        model: torch.nn.Module | None = None,
        **controller_options: Any,
    ) -> None:
        if isinstance(optimizer, SelfTuned):
            raise ConfigError(
                "this optimizer is already wrapped by selftune; wrap the inner one once"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"selftune.wrap needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if any(isinstance(part, torch.optim.Rprop) for part in parts(optimizer)):
            raise ConfigError(
                "Rprop keeps a step size per parameter and reads lr only to start them, on its "
                "first step: a rate selftune set later would be logged and change nothing. Wrap "
                "another optimizer (SGD, Adam, ...), or use Rprop unwrapped"
            )
        adafactor = getattr(torch.optim, "Adafactor", ())
        if any(isinstance(part, adafactor) for part in parts(optimizer)):
            raise ConfigError(
                "torch's Adafactor steps at min(lr, 1/sqrt(step)): a rate selftune set above "
                "1/sqrt(step) (past step 10,000 its default lr of 0.01 already is) would be "
                "logged and change only the weight decay. Wrap another optimizer (AdamW, ...), "
                "or use Adafactor unwrapped"
            )
        zero = shards.zero_redundancy(optimizer)
        if zero and getattr(optimizer, "_overlap_with_ddp", False):
            # (torch's own attribute) its groups are empty until DDP's hook builds them: it was
            # refused as a group with no rate, which said nothing of why
            raise ConfigError(shards.ZERO_OVERLAP_ADVICE)
        if in_combined(optimizer):
            raise ConfigError(
                f"this {type(optimizer).__name__} is one of a Combined's optimizers, which steps "
                "it: wrap the Combined (or give wrap the list of optimizers, which combines them)"
            )
        if getattr(optimizer, _WRAPPED, False):
            raise ConfigError(
                f"this {type(optimizer).__name__} was already passed to selftune.wrap; "
                "two wrappers would both tune it. Keep the first wrapper, or build a new optimizer"
            )
        for i, group in enumerate(optimizer.param_groups):
            knobs_io.check_group(i, group)
        decay = check_decay(average)
        if decay is not None:
            _refuse_lazy(
                optimizer.param_groups, f"the weight average (average={average!r}) starts from them"
            )
            check_averageable(optimizer.param_groups)
        for i, group in enumerate(optimizer.param_groups):
            lost = knobs_io.eps_lost_in_half(i, group)
            if lost is not None:
                warnings.warn(lost, stacklevel=outside_frames())
        # every argument is checked before the optimizer is touched: a refused wrap leaves it
        # as it was, free to be wrapped again
        if groups not in ("each", "joint"):
            raise ConfigError(
                f"groups={groups!r}: give 'each' (every param group tuned from its own signals) "
                "or 'joint' (all groups as one, their rates kept in the ratios given)"
            )
        self.controller = make_controller(controller, **controller_options)
        #: the id of the instance given, if one was, and whether this wrapper has stepped with
        #: it: see :meth:`_check_own_controller`
        self._given = None if isinstance(controller, str) else id(controller)
        self._stepped_with = False
        #: the controller that reads the groups as one, if so (see selftune.controllers.joint)
        self._joint: JointController | None = None
        if groups == "joint":  # read through a weak reference: a cycle would keep a dropped
            me = weakref.ref(self)  # run's files open until the collector found it
            self._joint = JointController(
                self.controller, lambda: _alive(me)._scales, lambda: _alive(me)._outside
            )
            self.controller = self._joint
        #: the options the controller was built with off its defaults, for the manifest: a run
        #: of ``auto`` with no range test is not the default's, and its log should say so (a
        #: controller of the user's own says what it likes in its ``options``, if anything)
        self._controller_options = dict(getattr(self.controller, "options", {}))
        #: the controller may fail on one rank alone: its failures are shared across ranks
        #: (see :meth:`_controller_error`)
        self._shares_failures = not _decides_alike(self.controller)
        #: whether RMSprop's uncorrected warm-up is divided out of its steps (the controller's
        #: call; see selftune.knobs.rmsprop_warmup): only where a group is RMSprop's, so that
        #: another optimizer's steps skip the check and its manifest reads as before (a folder
        #: of such a run resumed here noted a changed manifest for a correction of nothing)
        self._rmsprop_warmup = bool(
            getattr(self.controller, "corrects_rmsprop_warmup", False)
        ) and any(knobs_io.is_rmsprop(g) for g in optimizer.param_groups)
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise ConfigError(
                f"log_dir={log_dir!r}: give a folder path (a str or a pathlib.Path), or None"
            )
        if log_dir is not None and os.fspath(log_dir) == "":  # Path("") is the working folder
            raise ConfigError(
                "log_dir='': an empty path (an unset environment variable?) would log into the "
                "working folder; give the run's folder, or None for no log"
            )
        config = GuardConfig() if guard is True else guard
        if config is False or config is None:
            config = None
        elif not isinstance(config, GuardConfig):
            raise ConfigError(
                f"guard={guard!r}: pass True (the defaults), False (no guard) or a "
                "selftune.GuardConfig(...) instance"
            )
        if config is not None and zero:
            raise ConfigError(shards.ZERO_GUARD_ADVICE)
        if policy is not None and not isinstance(policy, Policy):  # else an AttributeError
            raise ConfigError(  # from the settings read further on, the optimizer touched
                f"policy={policy!r:.60}: give a selftune.Policy(bounds=..., max_change=..., "
                "frozen=...), or None for the defaults"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ConfigError(f"seed={seed!r}: give a whole number (it is recorded in the log)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"model={type(model).__name__}: give the torch.nn.Module whose parameters the "
                "optimizer trains (its buffers are rolled back with them), or None"
            )
        #: the model whose buffers (BatchNorm's running statistics, spectral norm's vectors) the
        #: guard's snapshots hold beside the weights: a batch that made them non-finite left
        #: them so after the rollback, and every evaluation after it NaN
        self._model = model
        self._told_buffers = False  # a buffer a rollback could not put back: warned of once
        #: a ZeroRedundancyOptimizer's consolidated state as the last step or load found it,
        #: which its state_dict() would return stale (see shards.check_consolidated)
        self._consolidated_before: object | None = None
        self._zero = zero  # read once: the step asks each time
        self.optimizer = optimizer
        # torch's __setstate__ sets up the hook registries and patches ``step`` for them, as
        # Optimizer.__init__ would, with no groups or state of its own: those are the wrapped
        # optimizer's, through the properties below.  (__init__ re-registered its groups
        # through them, which a Combined, whose groups are its optimizers', cannot take.)
        super().__setstate__({"defaults": dict(optimizer.defaults)})
        self.defaults = optimizer.defaults  # (one object, as __init__ kept it)
        # one scale per group needs one rate per group (torch shares a default tensor's)
        knobs_io.unshare(optimizer.defaults, self.param_groups)

        self.policy = policy if policy is not None else Policy()
        self.guard: Guard | None = None if config is None else Guard(config)
        self.step_count = 0
        self._told_no_gradient = False  # a step with no gradient at all: warned of once
        #: how this run is resumed, said when a first step over a folder that holds its steps
        #: is refused: an integration names its framework's way (a Lightning user told to call
        #: load_state_dict had no loop of their own to call it in)
        self._resume_how = "load its checkpoint (selftune.load_checkpoint, or load_state_dict)"
        self._scales = [1.0] * len(self.param_groups)
        #: each group's number of parameters, fixed when it joins (see :meth:`_check_groups`)
        self._counts = [len(g["params"]) for g in self.param_groups]
        #: each group's knobs, fixed when it joins: a momentum clipped to zero stays a knob
        self._names = [knobs_io.knob_names(g) for g in self.param_groups]
        self._start = [knobs_io.start_rate(g) for g in self.param_groups]
        #: per group, the highest rate a scheduler (or the loop) had set before the last step
        #: the controller read, None before a positive one: see :meth:`_read_rates`
        self._peaks: list[float | None] = [None] * len(self.param_groups)
        #: per group, the rate a scheduler (or the loop) had set at the last step the
        #: controller read, None before a positive one: see :meth:`_read_rates`
        self._taken: list[float | None] = [None] * len(self.param_groups)
        #: per group, after a rollback that lowered its base rate to the snapshot's, until the
        #: next step that trains: see :meth:`_hold_rollback_rates`
        self._lowered: list[tuple[float, float, float] | None] = [None] * len(self.param_groups)
        #: the knobs other than the rate as the last step left them, and those found changed
        #: since by someone else (a scheduler's cycle_momentum, the training loop): theirs from
        #: then on, neither tuned nor restored (the rate composes with a scheduler's instead)
        self._left: list[dict[str, float]] | None = None
        self._outside: list[set[str]] = [set() for _ in self.param_groups]
        #: notes for the log's next step (a knob found set outside selftune)
        self._notes: list[dict[str, Any]] = []
        #: the groups whose rate was cut to its floor, warned of once, and this step's such cuts
        #: (group, floor, by whom) for :meth:`_warn_floor`
        self._floored: set[int] = set()
        self._floor_cuts: list[tuple[int, float, str]] = []
        #: the guard's relevel of this step, logged when it was made: the listeners' guard event
        #: where the step has no other
        self._relevel: dict[str, Any] | None = None
        #: a state dict was loaded mid-run: its next step sees whether snapshots came with it
        self._loaded = False
        #: the step where the guard's snapshots started again after a state dict loaded without
        #: them, until a guard record has said so (see ``_note_lost_snapshots``)
        self._snapshots_since: int | None = None
        self._tracker = SignalTracker(lambda: self.param_groups)
        #: the controller's state before any step, for a plain optimizer's state loaded mid-run
        self._fresh_controller = _clone(self.controller.state_dict())
        #: the weight average evaluated in the weights' place (``averaged``), if one is kept
        self.average = None if decay is None else WeightAverage(self.param_groups, decay)
        self._listeners: list[Callable[[StepEvent], None]] = []
        self.last_signals: Signals | None = None
        self._seed = None if seed is None else int(seed)
        self._log: AuditLog | None = None
        self._trace: int | None = None  # trace.jsonl's fd, written as the log is: whole lines
        self._trace_closer: weakref.finalize | None = None
        self._trace_file = Path()
        self._trace_bytes = 0  # trace.jsonl's size, kept so that state_dict works after close
        #: ``group`` records of groups added since the last step, written with the next one
        self._added: list[dict[str, Any]] = []
        #: the metric the ranks shared at a step and no step's proposals have read yet, and
        #: the run's mode (set by the first metric shared)
        self._metric: float | None = None
        self._metric_mode: str | None = None
        #: a metric given to ``observe`` since, which the next step shares over the ranks
        self._ranks = RankState()
        self._at_average = False  #: whether ``averaged()`` ran since the last step
        #: inside ``averaged()``: the training weights swapped out, by id of their parameter
        self._swapped_out: dict[int, torch.Tensor] = {}
        #: whether the metric held for the next step was measured at the average (``observe``
        #: after an ``averaged()`` block, on every rank that observed)
        self._metric_at_average = False
        self._unwrapped = False  #: ``unwrap`` handed the optimizer back: no more steps here
        #: whether this wrapper is stepping the wrapped optimizer now, the one step that
        #: optimizer's :class:`~selftune.hooks.StepGate` lets through (see :meth:`_step_inner`)
        self._stepping_inner = False
        #: the inner optimizer steps only with a closure (L-BFGS, whose line search calls it)
        self._needs_closure = _needs_closure(optimizer)
        #: the furthest step this wrapper took before its last load (see :meth:`_note_rewind`)
        self._furthest = 0
        #: how many loads of a state the run had stepped past it has made (a state saved
        #: carries it on), and this wrapper's own (see :attr:`rewinds`)
        self._rewound = 0
        self._rewinds: list[tuple[int, int, int]] = []
        #: the guard's escalate event (step, signal, value, reason) where it raised
        #: GuardError: no more steps until a state is loaded; and where the log and trace
        #: ended before its record, where a state saved after it stands (see :meth:`state_dict`)
        self._gave_up: dict[str, Any] | None = None
        self._before_escalate: tuple[dict[str, Any] | None, int] = (None, 0)
        #: the escalate event of each of this wrapper's rewinds that followed one, by number
        self._gave_ups: dict[int, dict[str, Any]] = {}
        #: the step that raised part-way (an interrupt, a full disk, an optimizer's error): its
        #: weights may have moved with no record, so no step or state until a state is loaded
        self._broken_at: int | None = None
        #: the last step whose log and trace are written (a listener's error after that leaves
        #: nothing half-done)
        self._recorded = 0
        # and one controller class: a rank that shares its controller's failures pairs its
        # gathers with the others' only where every rank does
        kind = _class(self.controller)
        shards.check_same_settings({**self._settings(), "controller_class": kind})
        #: whether any rank logs to a run folder, and the step after which ``close`` closed it:
        #: a step after that would move the weights with no record, so every rank refuses it
        self._logged = _logged_on_rank_zero(log_dir)
        self._closed_after: int | None = None
        #: what ``close`` calls first: the end of the optimizer's steps is known there alone (a
        #: replay's says whether it ends on steps its logged run threw away)
        self._at_close: list[Callable[[], None]] = []
        # the hash of the initial weights is the whole model's, from every rank's shard: each
        # rank hashes if any rank logs (a loop may give the folder to rank 0 alone)
        if self._logged:
            from selftune import audit

            _refuse_lazy(
                self.param_groups, "the run folder records the hash of the initial weights"
            )
            params = [p for g in self.param_groups for p in g["params"]]
            digest = shards.whole_sha256(audit.params_sha256(params))

            def open_log() -> None:  # on the ranks given a folder
                if log_dir is not None:
                    self._open_log(Path(log_dir).expanduser(), digest)

            shards.refuse_on_every_rank(open_log, "open its run folder")
        setattr(optimizer, _WRAPPED, True)  # last: a wrap refused above leaves no mark
        self._gate = optimizer.register_step_pre_hook(StepGate(self))

    # -- the wrapped optimizer's containers, shared rather than copied -----------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    # -- public API ---------------------------------------------------------------------------
    def hyperparams(self) -> list[dict[str, float]]:
        """The knobs in force, one dict per param group, with the *effective* learning rate."""
        self._check_groups()
        return [self._knobs(i) for i in range(len(self.param_groups))]

    def add_listener(self, fn: Callable[[StepEvent], None]) -> None:
        """Call ``fn(event)`` after every step (used by the TensorBoard and MLflow writers).

        Checked here: a listener that cannot be called failed only at the next step, after that
        step's update was made, and a writer's class given for an instance built one per step.
        A listener with an ``added_to(optimizer)`` method is told here, and may refuse, before
        any step: a ``TensorBoardWriter`` follows one optimizer and refuses a second.
        """
        if isinstance(fn, type):
            raise ConfigError(
                f"add_listener was given the class {fn.__name__}, not a listener: pass an "
                f"instance (for the writers, {fn.__name__}(...), built with what it writes to)"
            )
        if not callable(fn):
            raise ConfigError(
                f"add_listener needs a callable taking one StepEvent, not {type(fn).__name__} "
                f"{fn!r:.60}"
            )
        added_to = getattr(fn, "added_to", None)
        if callable(added_to):
            added_to(self)
        self._listeners.append(fn)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group mid-run (gradual unfreezing): it is tuned from its next step on.

        It goes into the wrapped optimizer, starts at its own rate, and its first step has no
        previous update to read.  The guard's snapshots, which lack it and could not restore
        it, are dropped, and a fresh one is taken at once.  The audit log gets a
        ``group`` record (its index, knobs and size), which ``verify`` reads before the new
        group's decisions.  The record is written with the next step, not here: a run resumed
        from a checkpoint adds its groups again before loading it, and a checkpoint that
        already holds a group drops its record, so the resumed log is the uninterrupted one.
        Refused after :class:`GuardError` or a step that raised part-way, as a step is: the
        checkpoint the run resumes from lacks the group, and would no longer load.  Where the
        controller's ``state_dict`` raises (the guard's snapshot holds its state), no group is
        added: :class:`ControllerError` names the controller, its error the ``__cause__``, and
        the run steps on as it was.  Under ``torch.distributed`` a controller of one's own whose
        ``state_dict`` raised on one rank alone has every rank add no group and raise, the
        others naming that rank: one rank without the group parted the ranks' groups for good.
        """
        self._check_open("a param group added")
        self._check_outside_average("a param group added")
        # the checkpoint to resume from lacks the group: added here, it would not load
        self._check_not_given_up()
        self.check_whole("a param group added")
        # The controller's state for the guard's snapshot of the run with the group, taken
        # before anything changes: its state_dict raising as the snapshot was taken escaped
        # raw, after the group had joined the wrapped optimizer and the guard had dropped its
        # snapshots, with selftune's per-group lists half grown (every later step failed).
        taken = None
        if self.guard is not None:
            taken = (
                self._controller_state_or_refuse(
                    "The param group was not added (the guard's snapshot of the run with it, "
                    "taken at once, holds the controller's state): the run is as it was and "
                    "steps on; add the group again once state_dict gives one, or wrap with "
                    "guard=False, which takes no snapshots",
                    alike=True,
                ),
            )
        self.optimizer.add_param_group(param_group)
        i = len(self.param_groups) - 1
        try:
            knobs_io.check_group(i, self.param_groups[i])
            # (a wrap takes them: its previous update and snapshots wait for the first step)
            why = "a group added mid-run is measured and snapshotted at once"
            _refuse_lazy(self.param_groups[i:], why, "add_param_group")
            if self.average is not None:
                check_averageable(self.param_groups[i:], first=i)
        except ConfigError:
            self.param_groups.pop()
            raise
        lost = knobs_io.eps_lost_in_half(i, self.param_groups[i])  # said as at wrap
        if lost is not None:
            warnings.warn(lost, stacklevel=outside_frames())
        knobs_io.unshare(self.optimizer.defaults, self.param_groups)  # it took the defaults
        self._scales.append(1.0)
        self._counts.append(len(self.param_groups[i]["params"]))
        self._names.append(knobs_io.knob_names(self.param_groups[i]))
        self._start.append(knobs_io.start_rate(self.param_groups[i]))
        self._peaks.append(None)
        self._taken.append(None)
        self._lowered.append(None)
        self._outside.append(set())
        self._tracker.group_added()
        if self.average is not None:
            self.average.group_added(self.param_groups[i])
        if self.guard is not None:  # a fresh one, at once: trouble in the next step has one
            self.guard.forget_snapshots()
            payload = self._capture(taken=taken)  # (the controller's state is taken)
            assert payload is not None
            self.guard.keep(self.step_count, payload)
        if self._log is not None:
            knobs = self._knobs(i)
            self._added.append(
                {
                    "kind": "group",
                    "step": self.step_count,
                    "group": i,
                    "knobs": list(knobs),
                    "num_params": sum(p.numel() for p in self.param_groups[i]["params"]),
                    "reason": "param group added ("
                    + ", ".join(f"{k} {v:g}" for k, v in knobs.items())
                    + "); the guard's older snapshots were dropped",
                }
            )
        # last: a warning made an error (-W error) leaves the group added whole
        if self.step_count > 0:  # (else the first step says it, of every group)
            self._warn_rate_lost(i)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """Evaluate at the weight average: ``with opt.averaged(): val = evaluate(model)``.

        Inside the block the parameters hold the average that ``wrap(..., average=True)`` keeps;
        the training weights come back when it ends, even on an error.  Pass what you measured
        there to :meth:`observe`: ``auto`` then reads the metric of the weights you would keep,
        and, told that the metric came from the average (``observe`` after a block, on every
        rank), leaves the noise floor to it: a plateau of the loss no longer cuts the rate, and
        the cruise lowers it on no hypergradient.
        Batch norm's running statistics are the live ones (see :mod:`selftune.average`): the
        block swaps parameters, not buffers, so statistics recomputed inside it stay after it.
        A block inside a block is the outer one; a step, a state loaded or a group added
        inside one is refused (the block's end would put the training weights back over it).
        """
        if self.average is None:
            raise ConfigError(
                "averaged() needs a weight average: wrap the optimizer with average=True"
            )
        if self._unwrapped:
            raise ConfigError(
                "averaged() after unwrap(): the average stopped at the step unwrap handed the "
                "optimizer back; evaluate or copy it before unwrapping"
            )
        self._check_groups()  # the average holds the groups as they joined: swapped, it must fit
        self._at_average = True
        if self._swapped_out:  # a block inside a block (an evaluate() of its own): at it already
            yield
            return
        with self.average.swapped_in(self.param_groups) as kept:
            params = [p for group in self.param_groups for p in group["params"]]
            self._swapped_out = dict(zip(map(id, params), kept, strict=True))
            try:
                yield
            finally:
                self._swapped_out = {}

    def training_weights(self) -> dict[int, torch.Tensor]:
        """Inside :meth:`averaged`, the training weights the average took the place of, by
        ``id`` of their parameter (empty outside): what a checkpoint saved there must hold, since
        a resume trains on from them (:func:`selftune.save_checkpoint` reads it)."""
        return dict(self._swapped_out)

    def observe(self, metric: float | torch.Tensor, *, mode: str = "min") -> None:
        """Give the controller an evaluation metric (validation loss, accuracy) after evaluating.

        Optional: a loop that evaluates every so often can pass what it measured, as it would to
        ``ReduceLROnPlateau``.  ``auto`` halves the rate once the metric has gone more than three
        evaluations without a new best, a decay read off held-out evidence that the training
        loss cannot give; the other controllers ignore it.  ``mode``: "min" when lower is better
        (a loss), "max" when higher is (an accuracy); it must not change within a run.  The
        metric reaches the controller with the next step and is recorded with the decisions it
        drives.  Under ``torch.distributed`` it is averaged, in that step's collective, over the
        ranks that observed one since: call it on every rank, with each rank's own value or
        the same one, or on rank 0 alone, where it evaluates.
        """
        if mode not in ("min", "max"):
            raise ConfigError(f'observe(mode={mode!r}): use "min" (lower is better) or "max"')
        pending = self._ranks.metric is not None
        run_mode = ("max" if self._ranks.high else "min") if pending else self._metric_mode
        if run_mode is not None and mode != run_mode:
            raise ConfigError(
                f"observe(mode={mode!r}) after observe(mode={run_mode!r}): a run has one "
                "metric; pass the same mode every time"
            )
        if isinstance(metric, bool):
            raise ConfigError("observe() needs a real number, got a bool")
        if isinstance(metric, torch.Tensor) and (metric.is_complex() or metric.dtype == torch.bool):
            raise ConfigError(f"observe() needs a real number, got a {metric.dtype} tensor")
        try:
            # on the host, in float64 (which not every device has): one number, once an evaluation
            value = (
                metric.detach().to(device="cpu", dtype=torch.float64)
                if isinstance(metric, torch.Tensor)
                else torch.as_tensor(metric, dtype=torch.float64)
            )
        except OverflowError as err:
            raise ConfigError(
                f"observe() got {type(metric).__name__} {metric!r:.30}, too large for a float: "
                "pass the metric's value"
            ) from err
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(
                f"observe() needs one number, got {type(metric).__name__}: pass the metric's value"
            ) from err
        if value.numel() != 1:
            raise ConfigError(
                f"observe() needs one number, got a tensor of shape {tuple(value.shape)}: "
                "reduce it first (its mean, say)"
            )
        # with the flag of the weights it came from, for the next step to share
        self._ranks.metric, self._ranks.high = value.item(), mode == "max"
        self._ranks.at_average = self._at_average

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def join_hook(self, **kwargs: Any) -> NoReturn:
        """Refuse ``torch.distributed.algorithms.join.Join``, which asks for this hook first.

        Under ``torch.distributed`` each step is one collective of every rank, which a rank that
        has run out of inputs no longer makes: the others' steps waited in it until the process
        group's timeout (with ``Join([model])`` alone, not told here, they still do)."""
        raise ConfigError(
            "selftune cannot step under torch.distributed.algorithms.join.Join: each step is "
            "one collective of every rank, which a rank that ran out of inputs no longer makes, "
            "and the other ranks would wait in it until the process group's timeout. Give every "
            "rank as many steps: DistributedSampler(drop_last=True), or stop every rank at the "
            "fewest batches any rank has"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """Read the signals, let the controller and guard act, then step the wrapped optimizer.

        ``loss``: what the optimizer lowers, lower being better (for an optimizer built with
        ``maximize=True``, the negated objective it raises).  Without it, what ``closure``
        returns is read as the loss, and must be one number too.

        Returns what ``closure`` returned, as it was, and None without one, as torch's optimizers
        do: a loop or a framework that reads the result of ``step(closure)`` gets its own
        closure's, on a step the guard skipped too, whatever the loss given by name.
        """
        if self._unwrapped:
            raise ConfigError(
                f"this selftune optimizer was unwrapped after step {self.step_count}: step the "
                f"{type(self.optimizer).__name__} that unwrap() returned"
            )
        if closure is None and loss is None and self._filled_for_dcp():
            return None
        # under torch.distributed a rank refuses a step in the step's collective, every rank
        # alike: rank 0 alone may write the folder, and alone see it taken over or not resumed
        across = shards.across_ranks()
        refusal = self._not_open("a step")
        if refusal is not None and not across:
            raise refusal
        self._check_groups()
        # a step after it went on in the log past the escalate record, and a replay, which
        # raises the GuardError again there, could not follow
        self._check_not_given_up()
        if not across:  # else every rank refuses alike, in measure
            self.check_whole("a step")
        self._check_outside_average("a step")
        self._check_own_controller()
        if closure is not None and not callable(closure):
            raise ConfigError(
                f"step() got a {type(closure).__name__} where torch's optimizers take a closure; "
                "pass the loss by name: step(loss=loss)"
            )
        if closure is None and self._needs_closure:  # torch's TypeError came from inside the
            # step, which then stood broken off, refusing every step until a load
            raise ConfigError(
                f"{type(self.optimizer).__name__} steps only with a closure, which it calls again "
                "in its line search: step(closure), where the closure zeroes the gradients, "
                "computes the loss, calls backward and returns the loss"
            )
        inner_closure = closure
        result = None  # the closure's, which the step returns
        #: a closure that returned nothing chose to skip its backward (Lightning's, for a
        #: training_step that returned None, its documented skip of a batch)
        skipped = False
        returned = closure is not None and loss is None  # the loss is the closure's
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            loss = result if loss is None else loss
            inner_closure = _replay_once(closure, result)
            skipped = result is None
        t = self.step_count + 1
        refusal = refusal or self._not_resumed()
        if refusal is not None and not across:
            raise refusal
        # a refused loss changes nothing: refused before the step starts
        loss = check_loss(loss, returned=returned)
        self._ranks.refusal = refusal
        try:
            failed = self._step(t, loss, inner_closure, skipped)
        except (GuardError, RefusedStep):
            raise  # the guard gave up, and said so in the log; or nothing changed
        except BaseException:
            if self._recorded != t and self._broken_at is None:  # not a listener's error
                self._broken_at = t
            raise
        if self._zero:
            self._consolidated_before = shards.consolidation(self.optimizer)
        if failed is not None:  # the step is whole and recorded: the run goes on
            raise failed
        return result

    def _check_own_controller(self) -> None:
        """Refuse a step with a controller instance that another wrapper stepped with since
        this one last did, before anything changes.

        One instance given to two wrappers (a GAN's two optimizers given one
        ``AutoController``) read the signals of both into one state, proposed for each from
        the other's, and a rollback of either restored the state of both, with no word.  A
        wrapper that goes on with an instance another has finished with is no such sharing.
        """
        if self._given is None:
            return
        last = _STEPPED.get(self._given)
        if last is not None and last is not self and self._stepped_with:
            raise ConfigError(
                f"controller {self.controller.name!r}: another optimizer's wrapper was given "
                "the same instance and stepped with it since this one's last step, and one "
                "controller's state would follow both runs. Give each optimizer its own, "
                "built anew or copy.deepcopy(controller), before either steps"
            )
        _STEPPED[self._given] = self
        self._stepped_with = True

    def _step(
        self, t: int, loss: Any, inner_closure: Callable[[], Any] | None, skipped: bool
    ) -> ControllerError | None:
        """Step ``t`` from the signals on: what a failure part-way leaves unfinished.
        ``skipped``: the closure returned nothing, its backward skipped by choice.  Returns the
        controller's error, for ``step`` to raise: the step was taken without its proposals
        (:meth:`_consult`), or the guard's rollback taken without what the controller's methods
        there would have done (:meth:`_roll_back`)."""
        self._recorded = self.step_count  # this step is not: a stale count read as recorded
        if t == 1:
            self._read_start()
        current = self._usable_knobs(t)
        self._find_outside(t, current)
        if self._loaded:
            self._note_lost_snapshots(t)
        reads_buffer = getattr(self.controller, "reads_buffer", True)
        if self.guard is not None:
            self.guard.begin_step(t)
        # trouble that only skips the step (no snapshot held yet, or a spike held for the next
        # step to judge) has no snapshot to restore what reading it changed: the loss
        # statistics, and the previous update it multiplies (a few numbers, no tensor)
        unread = self._tracker.state_dict(include_update=False) if self.guard is not None else None
        self._ranks.broken = self._broken_at is not None
        signals = self._tracker.measure(t, loss, self.optimizer.state, reads_buffer, self._ranks)
        if self._tracker.no_gradient and not skipped and not self._told_no_gradient:
            self._told_no_gradient = True
            warnings.warn(
                f"step {t}: no parameter has a gradient (every .grad is None), so the step moves "
                "no weight: call loss.backward() before opt.step(), and opt.zero_grad() before "
                "the backward, not between it and the step (said once)",
                stacklevel=outside_frames(),
            )
        self._hold_shared_metric()
        self.last_signals = signals
        trouble = self.guard.check(signals) if self.guard is not None else None
        self._note_relevel(t)
        #: what the controller's methods raised in this step (:meth:`_tell`, :meth:`_consult`)
        failures: list[tuple[str, Exception]] = []
        forgiven = self._forgive(t, failures)
        if forgiven:
            current = self.hyperparams()
            self._lowered = [None] * len(self._lowered)
        if trouble is not None or (self.guard is not None and self.guard.forward is not None):
            decisions: list[Decision]
            if trouble is not None and trouble.hold:
                decisions, event = [], self._hold(trouble, unread)
            elif trouble is not None:
                decisions, event = self._roll_back(trouble, signals, unread, failures)
            else:
                decisions, event = self._go_forward(t, failures)
            failed = self._controller_error(t, failures, f"took the guard's {event['event']}")
            guard = self.guard
            assert guard is not None
            if event["event"] == "skip" and not self._kept(t, guard.skipped is None, failed, True):
                guard.skipped = None
            decisions = forgiven + decisions
            self._leave(current, decisions)
            self.step_count = t
            self._after(t, signals, decisions, event)
            return failed
        if self._metric is not None:  # held until a step whose proposals are made reads it
            signals = self.last_signals = dataclasses.replace(
                signals,
                metric=self._metric,
                metric_mode=self._metric_mode or "min",
                metric_at_average=self._metric_at_average,
            )
        due = self.guard is not None and self.guard.wants_snapshot(t)
        snapshot = self._capture(failures) if due else None
        # kept here, before the proposals (a restart asked for at this step goes back to the
        # oldest snapshot held once it is), unless the ranks share the controller's failures:
        # then once the proposals are made, where no rank failed
        deferred = due and self._shares_failures_now()
        if due and not deferred:
            self._keep_snapshot(t, snapshot, None)
        bases = self._bases()  # one read of the rates a step: the rises, the holds, the ceiling
        signals = self.last_signals = self._read_rates(signals, bases)
        held = self._hold_rollback_rates(t, signals, bases)
        if held:
            forgiven, current = forgiven + held, self.hyperparams()
        read = signals  # what the controller decides on: for joint groups, those with a rate
        if self._joint is not None:  # as one (a group held at zero would only thin the cosines)
            joins = self._joint.join(current)  # (which finds the groups with a rate)
            read = pooled(signals, self._joint.live)
            # a group given a rate since the last step takes the run's scale (bounds only, as
            joined = [  # a restart's knobs), before the controller reads the knobs
                d
                for q in joins
                if (d := self._apply(t, q, current[q.group], read, "controller", False))
            ]
            if joined:
                forgiven, current = forgiven + joined, self.hyperparams()
        proposals, restarting, failed = self._consult(t, read, current, failures, deferred)
        if deferred:
            self._keep_snapshot(t, snapshot, failed)
        self._metric, self._at_average, self._metric_at_average = None, False, False
        decisions = forgiven + self._decide(t, read, proposals, current, limited=restarting is None)
        if restarting is None:
            decisions += self._hold_ceiling(t, signals, bases)
        restart = None if restarting is None else self._restart(restarting)
        self._leave(current, decisions)
        if restart is not None:
            self.step_count = t
            self._after(t, signals, decisions, restart)
            return None
        self._tracker.before_update()
        with self._effective_lr():
            self._step_inner(inner_closure)
        self._tracker.after_update()
        if self.average is not None:
            self.average.update(self.param_groups)
        self.step_count = t
        self._after(t, signals, decisions, None)
        return failed

    def _consult(
        self,
        t: int,
        signals: Signals,
        knobs: Knobs,
        failures: list[tuple[str, Exception]],
        deferred: bool = False,
    ) -> tuple[list[Proposal], str | None, ControllerError | None]:
        """The controller's checked proposals at step ``t`` and its reason to restart; where it
        raised, or returned what :func:`checked` refuses, or raised earlier in the step (its
        ``failures``: at a relevel, :meth:`_forgive`), none, and the error for ``step`` to
        raise once the step is recorded, the original as its ``__cause__``; none on every rank
        where it failed on any (:meth:`_controller_error`).  ``deferred``: the step's snapshot
        is kept once the proposals are made (:meth:`_take_restart`).

        Raised from inside the step, the error left it broken off: the signals had been read,
        the guard had judged them, a rate held, and every later step was refused until a
        checkpoint loaded.  The step is taken instead as under a controller that proposed
        nothing (the guard's and the holds' decisions stand), not left untaken: undoing what
        it changed would cost a copy of that at every step, and a step the loop caught and
        went on from would leave a batch out of the run that a replay, stepping on the loop's
        batches, takes.  Taken, the log holds the whole step, with a note of why no decision
        came, and replays to the bit.  The controller's state is as its error left it.  The
        replay's own controller is not so handled: its refusal is where the replay leaves the
        logged run, and stops it.  Nor is an interrupt (a Ctrl-C), no error of the controller's.
        """
        controller = self.controller
        stage = "propose()"
        proposals: list[Proposal] = []
        restarting: str | None = None
        digest = 0.0  # of the proposals, where the ranks share the controller's failures
        try:
            made = controller.propose(signals, knobs)
            stage = "take_restart()"
            take = getattr(controller, "take_restart", None)
            reason = take() if take is not None else None
            stage = ""  # the wrapper's checks, whose refusals name the controller
            proposals = checked(controller, made, knobs)
            restarting = self._take_restart(proposals, reason, deferred)
            if self._shares_failures_now():
                digest = _proposals_digest(proposals, restarting is not None)
        except Exception as exc:
            failures.append(self._failure(stage, exc))
        done = "was taken at the knobs in force, without the controller's proposals"
        error = self._controller_error(t, failures, done, digest)
        return ([], None, error) if error is not None else (proposals, restarting, None)

    def _failure(self, stage: str, exc: Exception) -> tuple[str, Exception]:
        """Why the controller failed, its method ``stage`` having raised ``exc`` (``""``: the
        wrapper refused what it returned, in words that name it), with ``exc``.  The replay's
        own controller's error is raised: its refusal is where the replay leaves the logged
        run, and stops it."""
        if getattr(self.controller, "replays_log", False):
            raise exc
        if not stage:
            return str(exc), exc
        name = self.controller.name  # (a non-empty str: make_controller checks it)
        return f"controller {name!r}: {stage} raised {type(exc).__name__}: {exc}", exc

    def _controller_error(
        self, t: int, failures: list[tuple[str, Exception]], done: str, digest: float = 0.0
    ) -> ControllerError | None:
        """The error for ``step`` to raise where the controller failed at step ``t`` (the first
        of this rank's ``failures``, from :meth:`_failure`) or, under torch.distributed, on
        another rank, or proposed otherwise on some rank than on rank 0 (the ranks' ``digest``
        of its proposals differ, :func:`_proposals_digest`), with the log's note of it; None
        where it failed on no rank and proposed alike on all.  ``done``: what the step did
        instead, the same on every rank.

        Every rank must take the same decisions, and a controller of one's own may fail on one
        rank alone (it read the rank, a file, random numbers of its own): that rank took its
        step without the proposals the others applied, and the knobs and weights drifted apart
        with no word.  Its failure is shared in a gather of a flag per rank, after which every
        rank drops the proposals alike and raises, naming the rank that failed where it was
        another.  Nor may it propose apart: one whose state its own error left otherwise on one
        rank than on the others (what it had changed before it raised there), or that reads what
        a rank holds alone, proposed other knobs there from then on, and the ranks drifted apart
        with no word.  A digest of each rank's proposals rides in the same gather as the flag,
        and where one differs from rank 0's every rank drops the proposals alike and raises,
        naming the ranks and the fix.  The proposals are compared, not the knobs they set: they
        come before anything is applied, so the step is taken as after a failure, with nothing
        to undo, and from the same knobs in force the same proposals set the same knobs.  The
        controllers selftune ships, and a replay's, decide from what every rank holds alike
        (:func:`_decides_alike`): their steps make no gather but the step's one (the ranks'
        controllers are checked to be of one class at the wrap).
        """
        distributed = self._shares_failures_now()
        failed_on, digests = self._failed_ranks(failures, distributed, digest)
        apart: list[int] = []  # the ranks that proposed otherwise than rank 0
        if distributed and not failed_on:  # (a rank that failed proposed nothing)
            apart = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if not failed_on and not apart:
            return None
        name = self.controller.name
        if failed_on:
            why, cause = self._why_failed(failures, failed_on, " failed")
        else:
            ranks = ", ".join(str(rank) for rank in apart)
            why = (
                f"controller {name!r} proposed other knobs on rank{'s' if len(apart) > 1 else ''} "
                f"{ranks} than on rank 0, where every rank must take the same decisions: its "
                "state, or what it read, differs across the ranks (its own earlier error may have "
                "left it so on one). Make propose() a function of what every rank holds alike "
                "(the signals, the knobs, its state) and give every rank the same state (load one "
                "checkpoint on every rank)"
            )
            cause = None
        everywhere = ", on every rank" if distributed else ""
        self._notes.append({"reason": f"{why}; the step {done}{everywhere}"})
        error = ControllerError(
            f"{why}. Step {t} {done}{everywhere}, and logged so: the run goes on from the next step"
        )
        error.__cause__ = cause
        return error

    def _failed_ranks(
        self, failures: list[tuple[str, Exception]], shared: bool, digest: float = 0.0
    ) -> tuple[list[int], list[float]]:
        """The ranks where the controller failed (this rank's ``failures``), and every rank's
        ``digest``: one gather where the ranks ``shared`` their failures
        (:func:`~selftune.signals.flagged_ranks`), else this process alone, as rank 0."""
        if shared:
            return flagged_ranks(bool(failures), digest)
        return ([0] if failures else []), [digest]

    def _why_failed(
        self, failures: list[tuple[str, Exception]], failed_on: list[int], what: str
    ) -> tuple[str, Exception | None]:
        """Why the controller failed, and the error that is the ``__cause__``: this rank's first
        of ``failures``, or, where it failed on another rank alone, that rank named (its error
        there says why) and no cause; ``what`` it did there (`` failed``, ``: state_dict()
        raised``)."""
        if failures:
            return failures[0]
        name = self.controller.name
        return f"controller {name!r}{what} on rank {failed_on[0]} (its error there says why)", None

    def _shares_failures_now(self) -> bool:
        """Whether the controller's failures are shared across ranks at this step: a controller
        of one's own under torch.distributed (:meth:`_controller_error`)."""
        return self._shares_failures and shards.across_ranks()

    def _keep_snapshot(
        self, t: int, snapshot: dict[str, Any] | None, failed: ControllerError | None
    ) -> None:
        """Hand the guard the ``snapshot`` of step ``t`` (None: the controller's ``state_dict``
        raised) where it is kept (:meth:`_kept`)."""
        if self._kept(t, snapshot is None, failed):
            assert self.guard is not None and snapshot is not None
            self.guard.keep(t, snapshot)

    def _kept(self, t: int, lost: bool, failed: ControllerError | None, skip: bool = False) -> bool:
        """Whether the guard keeps the snapshot of step ``t`` (or, at a skip, what the skip
        cut, for a relevel to undo); ``lost``: the controller's ``state_dict`` raised on this
        rank, and there is none; ``failed``: the step's :meth:`_controller_error`.

        The controller's ``state_dict``, raising from inside the step, left it broken off, and
        every later step was refused until a checkpoint loaded.  The snapshot is not kept
        instead, and the guard keeps the one before (a rollback goes back further, to weights,
        knobs and a controller state that all belong to one step; at a skip, its rate cut
        stands): the run goes on from the next step, with a note, and ``step`` raises
        :class:`ControllerError`.  Nor is it kept without the controller's state: a rollback to
        it would put the weights and knobs of that step back under the controller's state of
        later (the one that saw the trouble), which would then propose for other weights than
        those restored, with no word.  With no snapshot held at all, the next step takes one
        (``wants_snapshot``).  Under ``torch.distributed`` a rank cannot tell which method
        failed on another (one flag a rank, :meth:`_controller_error`): no rank keeps it where
        the controller failed on any, so that every rank holds the same snapshots (and no gather
        is added).  The note names the step (``unkept``), for the replay's guard, whose
        controller does not fail, to drop its own there too.
        """
        if not lost and (failed is None or not self._shares_failures_now()):
            return True
        why = (
            f"guard: what the skip of step {t} cut is not kept, the controller having failed "
            "there: a relevel leaves its rate cut"
            if skip
            else f"guard: no snapshot of step {t} kept, the controller having failed there: a "
            "rollback goes back to an older one"
        )
        self._notes.append({"reason": why, "unkept": t})
        return False

    def _filled_for_dcp(self) -> bool:
        """Let the wrapped optimizer take the step by which torch.distributed.checkpoint's
        helpers fill an empty state (every rate set to zero, every gradient zeros), and warn:
        on the wrapper it was a step of the run, logged and counted, and Adam's step count
        then differed from that of a run that saved no checkpoint there.  The caller is asked
        before the rates are read: a stateless optimizer (SGD without momentum) comes here at
        every step, and reading a tensor rate on a device is a host sync."""
        if self.optimizer.state or not shards.called_by_dcp():
            return False
        if any(knobs_io.read(g, "lr") != 0.0 for g in self.param_groups):
            return False
        warnings.warn(shards.DCP_ADVICE, stacklevel=outside_frames())
        self._step_inner()
        return True

    def _step_inner(self, closure: Callable[[], Any] | None = None) -> None:
        """Step the wrapped optimizer: the one way its :class:`~selftune.hooks.StepGate` lets
        a step through while it is wrapped, torch's global step hooks held back (they ran
        around this wrapper's step)."""
        with stepping_inside(self):
            self.optimizer.step(closure) if closure else self.optimizer.step()

    def _stepped_past(self, optimizer: torch.optim.Optimizer) -> str:
        """Why its :class:`~selftune.hooks.StepGate` refuses a step of the wrapped optimizer
        made past the wrapper."""
        return (
            f"the {type(optimizer).__name__} that selftune.wrap wraps was stepped itself, "
            f"past the wrapper ({self.step_count} steps in; a reference kept to it, "
            "opt.optimizer.step(), a GradScaler or a framework given it): that step would move "
            "the weights with no guard and no record in the run's log or trace, and the run "
            "could no longer be replayed. Refused before the update: step the wrapper in its "
            "place (opt.step(loss=loss.detach()), scaler.step(opt)), or to train on untuned, "
            "take the optimizer back with opt.unwrap()"
        )

    def _hold_shared_metric(self) -> None:
        """Hold the metric the ranks shared in this step's collective, if any observed one,
        until a step whose proposals are made reads it (a rollback's step does not)."""
        shared, self._ranks.shared = self._ranks.shared, None
        if shared is None:
            return
        self._metric, self._metric_at_average, high = shared
        self._metric_mode = "max" if high else "min"
        self._ranks.metric = None
        saved, self._ranks.saved = self._ranks.saved, None
        # (a NaN metric, an F1 with no positive prediction yet, is no difference from itself)
        nan = saved is not None and math.isnan(saved) and math.isnan(self._metric)
        if saved is None or saved == self._metric or nan:
            return
        # other ranks observed other values: a resume from that state, which holds this
        # rank's alone, reads it where this run reads the ranks' mean
        warnings.warn(
            f"the state saved after step {self.step_count} holds the metric this rank "
            f"observed ({saved!r}), and the ranks' mean that the run read is "
            f"{self._metric!r}: a run resumed on every rank from that state alone reads "
            "this rank's and goes on differently (each rank resumed from its own state "
            "reads the mean). Save after the step that follows observe(), or observe the "
            "ranks' mean on every rank",
            stacklevel=outside_frames(),
        )

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus selftune's own under the key ``"selftune"``.

        The records of groups added since the last step are written first: the log's position
        saved here then counts them, as the state counts their groups (a resumed run adds the
        groups again and drops their records, since the log holds them).  The log and the trace
        are then forced to disk (:meth:`sync`), as a checkpoint that points into them needs:
        Lightning and the Hugging Face Trainer save this state in checkpoints of their own, and
        after a power cut one could point past the log's end, which a resume refuses.

        Where the controller's ``state_dict`` raises, :class:`ControllerError` names it, before
        anything is written: a checkpoint without the controller's state would resume another
        run than this one, with no word.  The wrapper is as it was, and steps on.
        """
        controller = self._checkpoint_controller()
        if shards.called_by_dcp():
            warnings.warn(shards.DCP_ADVICE, stacklevel=outside_frames())
        if self._broken_at is not None:  # saved (a framework's save on an exception goes on),
            warnings.warn(  # but refused where it would load
                f"the state saved after step {self._broken_at} raised part-way will not load: "
                "resume from a checkpoint saved before it",
                stacklevel=outside_frames(),
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)  # torch's hooks registered on the wrapper, run as Optimizer's own are
        if shards.across_ranks():
            self._ranks.saved = self._ranks.metric
        if self._log is not None and not self._taken_over:  # the folder is another's now
            self._write_added()
        sd = self.optimizer.state_dict()
        shards.check_consolidated(self.optimizer, self._consolidated_before)
        log, trace = self._before_escalate if self._gave_up is not None else self._log_end()
        self.sync()  # (after the log's position, whose first call may write the opening notes)
        sd["selftune"] = {
            "step": self.step_count,
            "scales": list(self._scales),
            "start": list(self._start),
            "peaks": list(self._peaks),
            "taken": list(self._taken),
            "lowered": [None if w is None else list(w) for w in self._lowered],
            "controller": controller,
            "controller_name": self.controller.name,
            "groups": "each" if self._joint is None else "joint",
            "optimizer_type": optimizer_name(self.optimizer),
            "tracker": self._tracker.state_dict(),
            "guard": None if self.guard is None else self.guard.state_dict(),
            # where the log and trace.jsonl end (rank 0's; None and 0 with no run folder); after
            # the guard gave up, before its escalate record, whose step the state never took: a
            # load of it cuts the record, as a load of any older state does
            "log": log,
            "trace": trace,
            # a shared metric no step's proposals have read yet, and where it was measured;
            # one observed here that no step has shared yet
            "metric": {
                "value": self._metric,
                "mode": self._metric_mode,
                "at_average": self._metric_at_average,
                "evaluating_average": self._at_average,
                "observed": None
                if self._ranks.metric is None
                else {
                    "value": self._ranks.metric,
                    "mode": "max" if self._ranks.high else "min",
                    "at_average": self._ranks.at_average,
                },
            },
            "average": None if self.average is None else _clone(self.average.state_dict()),
            "left": copy.deepcopy(self._left),
            # where the snapshots started again, if no guard record has said so yet
            "snapshots_since": self._snapshots_since,
            "outside": [sorted(knobs) for knobs in self._outside],
            "broken_at": self._broken_at,
            "rewinds": self._rewound,
            # how many ranks took the steps saved: a resume on another number notes it
            "world_size": shards.world_size(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            sd = post_hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if shards.called_by_dcp():
            warnings.warn(shards.DCP_ADVICE, stacklevel=outside_frames())
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict  # as Optimizer runs them
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # in one collective with the checks of fit: rank 0 alone may be closed or taken over
        shards.refuse_on_every_rank(lambda: self._check_fits_here(state_dict), "load this state")
        # a run resumed from before the guard gave up goes on (the rewind's note says where)
        gave_up, self._gave_up = self._gave_up, None
        self._broken_at = None  # as does one resumed from before a step that broke off
        self._furthest = max(self._furthest, self.step_count)
        sd = dict(state_dict)
        own = sd.pop("selftune", None)
        if own is not None and own["step"] <= self._furthest:
            # a rewind, or a state of the step it stands at (a retry loop's first load of the
            # state it keeps): torch's load keeps the dict's tensors as the optimizer's state,
            # which the steps after it change in place, so a state kept to go back to again held,
            # the next time, where the thrown-away steps had left it; the run's course hung on
            # steps its log holds nothing of, and its replay could not follow.  (A resume in a
            # fresh wrapper, from a file, is not copied.)
            sd, own = _clone(sd), _clone(own)
        # this wrapper's own state, as it stands: accelerate loads each optimizer's own state
        # when it prepares it, before the Hugging Face Trainer loads the checkpoint to resume
        # (a step-0 checkpoint of a run that crashed before its first record has the log's
        # position of the fresh wrapper over its folder, but not its trace's size: it moved)
        unmoved = (
            own is not None
            and own["step"] == self.step_count
            and (self._log is None or own["log"] == self._log.position())
            and own.get("trace", self._trace_bytes) == self._trace_bytes
        )
        self.optimizer.load_state_dict(sd)
        _keep_scalar_dtypes(self.optimizer, sd)
        self._consolidated_before = shards.consolidation(self.optimizer)
        # torch deep-copies the saved groups as one: tensors they shared are shared again
        knobs_io.unshare(self.optimizer.defaults, self.param_groups)
        if own is None:
            self._start_from_plain_state()
            return
        self.step_count = own["step"]
        self._scales, self._start = list(own["scales"]), list(own["start"])
        # a state saved before the peaks: the rates now (no rise is read at the next step)
        self._peaks = list(own.get("peaks", self._bases()))
        self._taken = list(own.get("taken", self._bases()))  # (a state saved before them)
        lowered = own.get("lowered", [None] * len(self._scales))
        # (a two-value entry, of a state saved by an earlier version, holds nothing)
        self._lowered = [None if w is None or len(w) != 3 else (w[0], w[1], w[2]) for w in lowered]
        self._left = copy.deepcopy(own.get("left"))
        self._snapshots_since = own.get("snapshots_since")
        self._outside = [set(k) for k in own.get("outside", [[] for _ in own["scales"]])]
        self._hand_over_switched_off()
        self._note_world_size(own.get("world_size"))  # (None: saved before it was kept)
        self._added = [r for r in self._added if r["group"] >= len(own["scales"])]
        metric = _pending_metric(own.get("metric"))
        self._metric, self._metric_mode = metric["value"], metric["mode"]
        self._metric_at_average = bool(metric["at_average"])
        self._at_average = bool(metric["evaluating_average"])
        observed = metric.get("observed") or {}
        self._ranks = RankState(
            metric=observed.get("value"),
            at_average=bool(observed.get("at_average")),
            high=observed.get("mode") == "max",
        )
        self.controller.load_state_dict(_clone(own["controller"]))
        self._tracker.load_state_dict(own["tracker"])
        if self.guard is not None and own["guard"] is not None:
            self.guard.load_state_dict(own["guard"])
            self._loaded = self.step_count > 0
        if self.average is not None:
            if own.get("average") is not None:
                self.average.load_state_dict(own["average"])
            else:  # saved without one: the loaded weights (the model loads first) start it
                self.average.restart(self.param_groups)
        elif own.get("average") is not None:
            warnings.warn(
                "the state loaded holds a weight average, and this optimizer was wrapped "
                "without one (average=...): the average is dropped, and the run goes on "
                "without it. Wrap with the run's average to keep it",
                stacklevel=outside_frames(),
            )
        # At the log's own end there is nothing to drop: no note, so a run stopped at a checkpoint
        # and resumed writes the same log as one that never stopped.
        if self._log is not None and own["log"] is not None and own["log"] != self._log.position():
            self._log.truncate_to(own["log"])
        # Nor is the trace cut for a state that stands where this wrapper does: a fresh one
        # over a folder that holds a run's rows would cut them all, and the checkpoint loaded
        # next finds none left of the steps before it.
        if self._trace is not None and not unmoved:
            from selftune.report import trace_cut

            self._trace_bytes, last, damaged = trace_cut(self._trace_file, self.step_count)
            os.ftruncate(self._trace, self._trace_bytes)
            if last is not None and last < self.step_count:
                # a checkpoint of an attempt that a resume from an older one has since cut back
                # (its log position still matched: no record between the two), or rows damaged
                # since: said, not hidden
                cause = (
                    f"lost to damage ({damaged} rows that did not read as rows were cut)"
                    if damaged
                    else "cut by a resume from an older checkpoint since"
                )
                why = (
                    f"trace.jsonl ends at step {last}, before this checkpoint's step "
                    f"{self.step_count}: the rows of steps {last + 1}-{self.step_count} were "
                    f"{cause}; the audit log and the weights are whole"
                )
                self._notes.append({"reason": why})
                warnings.warn(why, stacklevel=outside_frames())
        saved = own.get("rewinds", 0)
        self._rewound = max(self._rewound, saved)
        self._note_rewind(gave_up, saved)

    def _note_rewind(self, gave_up: dict[str, Any] | None, saved: int) -> None:
        """Log a state loaded into this wrapper after it had stepped past it: a script that
        rewinds in its own process (a learning-rate finder's loop, a retry after an error)
        threw those steps away, and its replay runs them again with no record of them (the
        load cut their records, and the steps that replaced them hold their numbers): it
        decides nothing there and checks nothing until it has rewound too.  The note
        names the furthest step this wrapper took: a rewind since, to an older state, cut the
        notes after it, so each is numbered (``rewind``): the replay's are matched by number.
        Where the guard gave up (a retry after GuardError), the escalate record was cut too,
        and the note holds it (``gave_up``), for the replay to raise the same GuardError there,
        with those of the notes this load cut (numbered past the state's ``saved`` count).  A
        resume in a fresh wrapper rewinds nothing: its replay runs straight on, and its log is
        the one of a run that never stopped."""
        if self.step_count >= self._furthest:
            return
        self._rewound += 1
        self._rewinds.append((self._rewound, self.step_count, self._furthest))
        if gave_up is not None:
            self._gave_ups[self._rewound] = gave_up
        if self._log is None:
            return
        carried = [{"rewind": n, **e} for n, e in sorted(self._gave_ups.items()) if n > saved]
        note = {
            "kind": "note",
            "step": self.step_count,
            "reason": f"rewound in this process to step {self.step_count}, having gone as "
            f"far as step {self._furthest}: steps {self.step_count + 1}-{self._furthest} "
            "were thrown away, and the rows of the steps that replaced them hold their numbers",
            "rewound_from": self._furthest,
            "rewind": self._rewound,
        }
        self._log.append({**note, "gave_up": carried} if carried else note)

    def _read_start(self) -> None:
        """The rates the bounds are factors of, read again at the first step where a scheduler
        built after the wrap recorded its start (``initial_lr``: OneCycleLR's ``max_lr /
        div_factor``, CyclicLR's ``base_lr``) over the rate the optimizer was built with, as
        one built before had: the same script gives the same bounds in either order.  The
        loop's own writes to ``lr`` are not read (a warm-up written by hand from a thousandth
        of the rate made the bounds a thousandth of the user's)."""
        for i, group in enumerate(self.param_groups):
            rate = knobs_io.start_rate(group) if "initial_lr" in group else math.nan
            if math.isfinite(rate) and rate > 0.0:  # no bound is a factor of zero
                self._start[i] = rate
        for i in range(len(self.param_groups)):
            self._warn_rate_lost(i)
        if self.policy.lr_bounds_absolute:  # the user's bounds (defaults are factors), checked
            for message in start_misfits(self.policy.bounds["lr"], self._start):  # at the start
                warnings.warn(message, stacklevel=outside_frames())

    def _warn_rate_lost(self, i: int) -> None:
        """Warn where group ``i``'s tensor rate cannot hold the lowest rate the policy lets
        selftune set (:func:`selftune.knobs.rate_lost_in_dtype`), unless the rate is frozen."""
        if "lr" in self.policy.frozen:
            return
        floor, _ = self.policy.limits("lr", self._start[i])
        lost = knobs_io.rate_lost_in_dtype(i, self.param_groups[i], floor)
        if lost is not None:
            warnings.warn(lost, stacklevel=outside_frames())

    def _start_from_plain_state(self) -> None:
        """A plain optimizer's state was loaded: a run continued under selftune starts from its
        rates (the bounds are factors of them, not of the rates this wrapper was built with) and
        from nothing of a run this wrapper stepped before: no scale on the loaded rates, no
        controller's or guard's memory, no snapshot (a rollback went back to the weights of that
        run, over the ones just loaded), no metric pending.  The step count goes on, as the log
        does."""
        n = len(self.param_groups)
        self._scales, self._peaks, self._lowered = [1.0] * n, [None] * n, [None] * n
        self._taken = [None] * n
        self._start = [knobs_io.start_rate(g) for g in self.param_groups]
        self._left = None  # its knobs were loaded, not changed by a scheduler
        self.controller.load_state_dict(_clone(self._fresh_controller))
        self._tracker = SignalTracker(lambda: self.param_groups)
        self._metric = self._metric_mode = None
        self._ranks = RankState()
        if self.guard is not None:  # in place: a replay's guard stays the replay's
            self.guard.load_state_dict(Guard(self.guard.config).state_dict())
            self._loaded = self.step_count > 0
        if self.average is not None:  # and its weights (the model loads first) start it
            self.average.restart(self.param_groups)
        self._hand_over_switched_off()

    def _hand_over_switched_off(self) -> None:
        """Leave alone a knob the loaded state switched off: momentum 0, or β1 0 (a run that
        kept no buffer, or no first moment), where this optimizer was built with it on.

        selftune tunes no knob that is off when it wraps an optimizer (:func:`~selftune.knobs.
        knob_names`: turning it on changes the algorithm, not its setting); one tuned from the
        wrap went on being tuned after such a load, and ``hypergradient`` raised the loaded
        β1 of 0 to 0.45 in 60 steps.  It is handed over as a knob a scheduler moves is (see
        :meth:`_find_outside`), with a note: neither tuned nor restored on a rollback, kept
        through a resume, and still reported, so the log's knobs stay those of its manifest.
        """
        for i, group in enumerate(self.param_groups):
            on = knobs_io.knob_names(group)
            for knob in self._names[i]:
                if knob in on or knob in self._outside[i]:
                    continue
                self._outside[i].add(knob)
                why = (
                    f"group {i}'s {knob} is 0 in the state loaded before step "
                    f"{self.step_count + 1}, which this optimizer was built with on: selftune "
                    "leaves it off, as it does in an optimizer wrapped with it off, and neither "
                    "tunes it nor restores it on a rollback"
                )
                self._notes.append({"reason": why})

    def _note_world_size(self, saved: Any) -> None:
        """Note, before the next step's records, a state saved on another number of ranks than
        this run has (``saved``; one process is one rank): each rank's batch adds to the step's,
        so the run goes on at another effective batch size, and the gradient noise the
        controller reads and the spread of the loss the guard judges change with it, where its
        log read as one run.  Nothing else changes: the controller's and the guard's state go on
        as saved and follow the new noise as they follow any other change of the data."""
        # one note, of the state loaded last (a retry loads the same checkpoint again)
        self._notes = [n for n in self._notes if "saved_world_size" not in n]
        now = shards.world_size()
        if isinstance(saved, bool) or not isinstance(saved, int) or saved == now:
            return
        alone = " (a single process)"
        why = (
            f"resumed on {'1 rank' + alone if now == 1 else f'{now} ranks'} from a checkpoint "
            f"saved on {saved}{alone * (saved == 1)}: the effective batch size changed with the "
            "number of ranks (unless each rank's batch changed to match), and with it the "
            "gradient noise the controller reads and the spread of the loss the guard judges"
        )
        self._notes.append({"reason": why, "saved_world_size": saved, "world_size": now})

    def check_fits(self, state_dict: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` if ``state_dict`` holds param groups of other sizes than
        this optimizer's (a plain optimizer's state too), if selftune's part of it was saved
        from another number of param groups, another optimizer class or another controller
        (older states name neither: only the groups are checked), if it is no optimizer's
        state, or if this optimizer takes no state now (closed, taken over, or inside
        ``averaged()``: ``load_checkpoint`` asks before the model loads, and a checkpoint
        refused there for that had replaced the weights or the buffers all the same);
        :class:`~selftune.audit.LogError` if it is a state of another run folder.

        Under ``torch.distributed`` a collective, as a load is (every rank loads the run's
        state): what one rank refuses, every rank refuses, naming it.  Rank 0 alone reads the
        log, and its refusal of another folder's checkpoint, or of one a rewind threw away,
        left the other ranks loading it and then waiting at the next step's collective."""
        shards.refuse_on_every_rank(lambda: self._check_fits_here(state_dict), "load this state")

    def _check_fits_here(self, state_dict: dict[str, Any]) -> None:
        """:meth:`check_fits` on this rank: before anything loads, a refused state changes
        nothing."""
        self._check_open("loading a state")  # it would cut back a log that is closed
        self._check_outside_average("loading a state")
        keys = {"state", "param_groups"}
        if not isinstance(state_dict, Mapping) or not keys <= state_dict.keys():
            got = type(state_dict).__name__
            if isinstance(state_dict, Mapping):
                got = f"a dict with keys {sorted(map(str, state_dict))[:6]}"
            raise ConfigError(
                f"load_state_dict needs an optimizer's state dict (keys 'state' and "
                f"'param_groups', as opt.state_dict() returns), got {got}"
            )
        own = state_dict.get("selftune")
        if own is not None and (not isinstance(own, Mapping) or not own.keys() >= _OWN_KEYS):
            if not isinstance(own, Mapping):
                raise _unreadable(TypeError(f"a {type(own).__name__}, not a dict"))
            raise _unreadable(KeyError(", ".join(sorted(_OWN_KEYS - own.keys()))))
        if own is not None and len(own["scales"]) != len(self.param_groups):
            raise ConfigError(
                f"state dict has {len(own['scales'])} param groups, this optimizer "
                f"{len(self.param_groups)}; load a state dict saved from the same model setup "
                "(a run that added groups mid-run: add them again, add_param_group, first)"
            )
        # refused here, not by torch's load: that came after the load had cleared a step that
        # raised part-way (or the guard's GuardError), and the wrapper took steps again
        saved_groups = state_dict["param_groups"]
        counts = [len(g["params"]) for g in self.param_groups]
        sizes = (
            [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in saved_groups]
            if isinstance(saved_groups, list)
            else saved_groups
        )
        if sizes != counts:
            raise ConfigError(
                f"the state dict holds param groups of {sizes} parameters, this optimizer "
                f"{counts}: load a state dict saved from the same model setup (a run that added "
                "groups mid-run: add them again, add_param_group, first)"
            )
        for i, group in enumerate(saved_groups):
            try:  # as at the wrap: torch loads a NaN or a zero rate or β1 without a word, and
                # the guard gave up on the NaN weights steps later, blaming the data
                knobs_io.check_group(i, group)
            except ConfigError as err:
                raise ConfigError(
                    f"the state dict's {err} (a checkpoint's knobs edited or damaged: resume "
                    "from another checkpoint, or mend its param_groups)"
                ) from None
        if own is None:
            return
        if own.get("broken_at") is not None:
            raise ConfigError(
                f"this state was saved after step {own['broken_at']} raised part-way (its "
                "update may have been made without its record): resume from a checkpoint "
                "saved before that step"
            )
        kind, ours = own.get("optimizer_type"), optimizer_name(self.optimizer)
        if kind is not None and kind != ours:
            raise ConfigError(
                f"the state dict was saved from the optimizer {kind}, this one is {ours}: "
                f"build a {kind}, wrapped as the run was, to resume it"
            )
        name = own.get("controller_name")
        replays = getattr(self.controller, "replays_log", False)  # any run's state: the log's
        if name is not None and name != self.controller.name and not replays:
            how = (  # a controller of one's own is no name wrap knows: it is given built
                f"controller={name!r}"
                if name in CONTROLLERS
                else f"the controller named {name!r}, an instance of it as the run was"
            )
            raise ConfigError(
                f"the state dict was saved by controller {name!r}, this optimizer runs "
                f"{self.controller.name!r}: wrap with {how} to resume it"
            )
        mode, ours = own.get("groups", "each"), "each" if self._joint is None else "joint"
        if mode != ours:  # one state for all groups, or one per group: the other's reads wrong
            raise ConfigError(
                f"the state dict was saved by a run wrapped with groups={mode!r}, this optimizer "
                f"tunes its groups {ours!r}: wrap with groups={mode!r} to resume it"
            )
        # the steps the rewinds made since it was saved went back to: this wrapper's own (on
        # every rank), and those rank 0's log notes past its place (a fresh wrapper's)
        count = own.get("rewinds")
        back = [at for n, at, _ in self._rewinds if count is not None and n > count]
        # a checkpoint of another run folder: refused here, before its weights and step load
        if self._log is not None and own.get("log") is not None:
            after = self._log.check_position(own["log"])
            back += [r["step"] for r in after if "rewound_from" in r and "step" in r]
        back = [at for at in back if at < own["step"]]
        if back:
            raise ConfigError(
                f"this state was saved at step {own['step']}, before a load since took the run "
                f"back to step {min(back)}: steps {min(back) + 1}-{own['step']} of it were thrown "
                "away there, and the log and trace no longer hold them. Load a state saved "
                "after that load"
            )
        self._check_own_reads(own)
        # the last update, one tensor per parameter: torch loads the inner state of parameters
        # of other shapes without a word, and the run failed in a later step's arithmetic
        # (a lazy module's parameter not yet initialized has none: the model's load gives it)
        saved = own["tracker"]["prev"] or []
        for i, (group, updates) in enumerate(zip(self.param_groups, saved, strict=False)):
            shapes = [tuple(t.shape) for t in updates]
            here = [None if is_lazy(p) else tuple(p.shape) for p in shards.local_params(group)]
            if len(shapes) != len(here) or any(
                o is not None and o != s for o, s in zip(here, shapes, strict=False)
            ):
                raise ConfigError(
                    f"the state dict was saved from parameters of other shapes (group {i}: "
                    f"{shapes[:4]} against {here[:4]}): load it into the model it was saved from"
                )

    def _check_own_reads(self, own: Mapping[str, Any]) -> None:
        """Refuse selftune's part of a state that does not read (damaged, edited, or saved by
        another version of selftune; its keys were checked first): its parts are loaded here
        into copies of the controller and the guard, which hold no tensors, before anything of
        the wrapper's own loads.  Loaded as it was, it stopped with a bare ``KeyError`` from
        deep inside, after the wrapped optimizer's state, the step count and the rates had
        loaded, and the run went on from that mix."""
        try:
            copy.deepcopy(self.controller).load_state_dict(_clone(own["controller"]))
            tracker = own["tracker"]
            if not isinstance(tracker, Mapping) or not tracker.keys() >= _TRACKER_KEYS:
                raise KeyError("tracker")
            if self.guard is not None and own["guard"] is not None:
                Guard(self.guard.config).load_state_dict(own["guard"])
            if self.average is not None and own.get("average") is not None:
                self.average.check_fits(own["average"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise _unreadable(exc) from None

    def unresumed_folder(self) -> Path | None:
        """The run folder, if its trace holds steps and this optimizer has taken none: a run
        started again over its folder, before (or without) loading its checkpoint."""
        if self.step_count == 0 and self._trace_bytes > 0:
            assert self._log is not None
            return self._log.path
        return None

    def _not_resumed(self) -> ConfigError | None:
        """Why a first step over a folder that holds this run's steps is refused, if it is."""
        folder = self.unresumed_folder()
        if folder is None:
            return None
        return ConfigError(
            f"{folder} already holds steps of this run (its trace.jsonl is not empty), and "
            f"this one starts from step 1: to resume it, {self._resume_how} before the first "
            "step; to start again, log to a new folder"
        )

    def sync(self) -> None:
        """Force the run folder's log and trace to disk, as :meth:`state_dict` does (and so
        :func:`selftune.save_checkpoint`): a checkpoint holds their positions, and resuming
        refuses a log that ends before the position its checkpoint holds.  (``close`` syncs
        them last: a checkpoint saved after it has nothing left to force.)"""
        if self._log is not None:
            self._log.sync()
        if self._trace is not None:
            os.fsync(self._trace)

    def _check_outside_average(self, what: str) -> None:
        """Refuse what the end of an ``averaged()`` block would undo or spoil: it puts the
        training weights back over the parameters (a state loaded there lost its weights to
        the ones of before), and what reads the parameters there reads the average."""
        if self._swapped_out:
            raise ConfigError(
                f"{what} inside an averaged() block: the parameters hold the average there, and "
                "the block's end puts the training weights back over them; evaluate inside the "
                "block, and do this after it"
            )

    def _check_not_given_up(self) -> None:
        """Refuse to go on after the guard gave up (:class:`GuardError`): the run resumes from
        its last checkpoint, which a step or a group added here would not fit."""
        if self._gave_up is not None:
            raise GuardError(
                f"the guard gave up at step {self._gave_up['step']} (GuardError): the run cannot "
                "go on from here; resume from its last checkpoint (load_checkpoint), with the "
                "data or the rate seen to, or start again in a new folder"
            )

    def check_whole(self, what: str, *, own_folder: bool = True) -> None:
        """Refuse ``what`` after a step that raised part-way: the wrapper stands between that
        step's update and its record (a Ctrl-C inside the step, a log write that failed).  A
        state saved there held the step's weights with the step before's count: resumed, it
        ended elsewhere than the run, and the log lacked the step.  ``save_checkpoint`` and
        ``step`` call this; ``state_dict`` saves such a state with a warning (a framework's
        save on an exception goes on) and loading it is refused.  With ``own_folder``, also
        refused: ``what`` from a wrapper whose folder an optimizer wrapped since took over (a
        checkpoint saved from it went over the newer run's, whose next resume then cut that
        run's records from the log); ``unwrap`` hands the optimizer back all the same."""
        if own_folder and self._taken_over:
            self._check_open(what)  # raises: the folder was taken over
        if self._broken_at is None:
            return
        where = " (here, or on another rank)" if shards.across_ranks() else ""
        raise ConfigError(
            f"{what} is refused: step {self._broken_at} raised part-way{where}, and its update "
            "may have been made without its record. Resume from the last checkpoint "
            "(selftune.load_checkpoint, or load_state_dict), which cuts the log back to it"
        )

    def _check_groups(self, *, members: bool = True) -> None:
        """Refuse param groups removed behind selftune's back (``param_groups.pop``): its
        per-group scales, start rates and previous updates would be read against the wrong
        groups, a silently wrong rate and then a shape error deep inside a step.  With
        ``members``, so are parameters added to or removed from a group's ``params`` (torch's
        optimizers take that): the previous update, the weight average and the snapshots hold
        the group's parameters as it joined, and the step failed inside the signals' read,
        leaving the wrapper broken until a load.  (``unwrap`` reads none of those, and hands
        such an optimizer back.)"""
        now, known = len(self.param_groups), len(self._scales)
        if now != known:
            raise ConfigError(  # (unwrap() too needs the groups it tuned, to hand their rates)
                f"the wrapped optimizer holds {now} param groups where selftune tunes {known}: "
                "a group was removed, or added to the wrapped optimizer itself, and selftune "
                "cannot tell which group is which. Put the groups back as they were (a group "
                "set to lr 0 mid-run stops training) and add new ones with add_param_group; "
                "or, with the groups back, unwrap() and wrap again in a new run folder"
            )
        if not members:
            return
        for i, (group, count) in enumerate(zip(self.param_groups, self._counts, strict=True)):
            if len(group["params"]) != count:
                raise ConfigError(
                    f"param group {i} holds {len(group['params'])} parameters where selftune "
                    f"tracks {count}: parameters were added to or removed from its 'params' "
                    "behind selftune's back, and its previous update, weight average and "
                    "snapshots no longer fit them. Put the group back as it was and add new "
                    "parameters as a group of their own (add_param_group), or unwrap() and "
                    "wrap again in a new run folder"
                )

    @property
    def _taken_over(self) -> bool:
        """Whether an optimizer wrapped since on the same ``log_dir`` took the folder over."""
        return self._log is not None and self._log.superseded

    def _check_open(self, what: str) -> None:
        """Refuse what would change the run after ``close`` ended its log, or after another
        optimizer wrapped since on the same ``log_dir`` took the folder over."""
        refusal = self._not_open(what)
        if refusal is not None:
            raise refusal

    def _not_open(self, what: str) -> ConfigError | None:
        """Why :meth:`_check_open` refuses ``what``, if it does."""
        if self._taken_over:
            assert self._log is not None
            return ConfigError(
                f"this selftune optimizer's run folder {self._log.path} was taken over by an "
                f"optimizer wrapped on the same log_dir since, in this process: {what} here "
                "would write into that one's log. Give each optimizer its own log_dir (a run "
                "resumed in a new wrapper goes on there, not in this one)"
            )
        if self._closed_after is not None:
            return ConfigError(
                f"this selftune optimizer's run folder was closed after step "
                f"{self._closed_after} (close()): {what} now would change the run with no record "
                "in its log. To train on, resume a checkpoint in a new wrapper, or take the "
                "optimizer back at the rates found with unwrap() and step it plainly or wrap it "
                "again"
            )
        return None

    def unwrap(self) -> torch.optim.Optimizer:
        """Hand the wrapped optimizer back with the rates selftune found written into its param
        groups, and stop tuning: the way out for a run that tuned early and trains on at the
        settings found, or that moves to a loop without selftune.

        selftune keeps its rate as a scale on the rate in ``param_groups`` (so that a scheduler
        composes with it), so neither that rate nor a state dict loaded into a plain optimizer
        carries what it found; ``unwrap`` writes the effective rate (``hyperparams()``) into each
        group, leaves momentum and the betas as they are, notes the hand-over in the run
        folder's log and closes it.  This wrapper refuses further steps; the returned optimizer
        steps plainly (no longer refused as a step past the wrapper) and can be wrapped again.
        A scheduler that multiplies the rate it finds (StepLR, ExponentialLR,
        CosineAnnealingLR) goes on from the rate handed over; one that sets it
        from its base rates (LambdaLR, OneCycleLR) writes over it.  A weight average is not
        put into the weights: evaluate or copy it (``averaged()``) before.
        """
        if self._swapped_out:
            raise ConfigError(
                "unwrap() inside an averaged() block would hand over the average as the training "
                "weights; call it after the block"
            )
        if self._unwrapped:
            return self.optimizer
        # its note would name the step before, the weights past it
        self.check_whole("unwrap()", own_folder=False)
        self._check_groups(members=False)  # (parameters added to a group change no rate)
        handed = [self._knobs(i) for i in range(len(self.param_groups))]
        for i, group in enumerate(self.param_groups):
            knobs_io.write(group, "lr", handed[i]["lr"])
            self._scales[i] = 1.0
        # a closed log takes no note, nor one another wrapper took over
        if self._log is not None and self._closed_after is None and not self._taken_over:
            self._write_added()
            self._log.append(
                {
                    "kind": "note",
                    "step": self.step_count,
                    "reason": f"unwrapped after step {self.step_count}: the "
                    f"{type(self.optimizer).__name__} goes on untuned from {handed}",
                }
            )
        self.close()
        self._unwrapped = True
        delattr(self.optimizer, _WRAPPED)
        self._gate.remove()  # its steps are its own again
        return self.optimizer

    def close(self) -> None:
        """Close the run folder's files (they are flushed after every write anyway).

        The run's log ends here: in a run that logs (on any rank) a later ``step`` is refused,
        since it would change the weights with no record (``unwrap`` still hands the optimizer
        back); without a run folder, ``close`` does nothing.  A replay's ``close`` warns where
        it ends inside steps its logged run threw away by a rewind it has not made (the log
        holds nothing of them, so its weights there may be none the run had)."""
        if self._closed_after is not None or self._unwrapped:
            return
        for at_close in self._at_close:
            at_close()
        if self._logged:
            self._closed_after = self.step_count
        if self._log is not None and not self._taken_over:  # its records: the new one's
            self._write_added()
            self.sync()
            self._log.close()
        if self._trace_closer is not None:
            self._trace_closer()
            self._trace = self._trace_closer = None

    def _log_end(self) -> tuple[dict[str, Any] | None, int]:
        """Where the log (its position; None with no run folder) and trace.jsonl end now."""
        return None if self._log is None else self._log.position(), self._trace_bytes

    @property
    def rewinds(self) -> tuple[tuple[int, int, int], ...]:
        """Each load of a state this optimizer had stepped past (a script that rewinds in its
        own process), in order: its number in the run, the step loaded, the furthest step
        taken.  The log notes each; a replay matches its own with them."""
        return tuple(self._rewinds)

    def __repr__(self) -> str:
        return f"SelfTuned({optimizer_name(self.optimizer)}, controller={self.controller.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        # torch's own keeps only defaults, state and param_groups: a copy would lack the wrapped
        # optimizer, the controller and the log, and fail far from here on its first use
        raise TypeError(
            "a selftune optimizer cannot be copied or pickled (it holds the wrapped optimizer, "
            "the controller and open log files): save opt.state_dict() or "
            "selftune.save_checkpoint(...), and load it into a fresh selftune.wrap(...)"
        )

    # -- knobs --------------------------------------------------------------------------------
    def _effective(self, i: int) -> float:
        """The rate group ``i`` steps at: for a tensor rate, the product the step's ``mul_``
        holds in the tensor's dtype (the float64 product could be a float32 ulp off it, so the
        log, ``hyperparams()`` and ``unwrap`` each gave another rate)."""
        lr = self.param_groups[i]["lr"]
        if isinstance(lr, torch.Tensor):
            return float((lr * self._scales[i]).item())
        return float(lr) * self._scales[i]

    def _knobs(self, i: int) -> dict[str, float]:
        group = self.param_groups[i]
        return {
            name: self._effective(i) if name == "lr" else knobs_io.read(group, name)
            for name in self._names[i]
        }

    def _note_relevel(self, t: int) -> None:
        """Log the trouble the guard answered this step by learning a new level (a new task,
        a layer unfrozen): a guard record, though nothing was rolled back."""
        relevel = None if self.guard is None else self.guard.relevelled
        self._relevel = None
        if relevel is not None:
            self._relevel = {
                "event": "relevel",
                "signal": relevel.signal,
                "value": relevel.value,
                "reason": relevel.reason,
            }
            if self._log is not None:
                self._log.append({"kind": "guard", "step": t, **self._relevel})

    def _usable_knobs(self, t: int) -> Knobs:
        """The knobs in force at step ``t``, the step refused before anything changes where a
        scheduler or the loop wrote one since the last step that no step can take: a rate that
        is no number, is not finite or is below zero (a ``LambdaLR`` whose linear decay runs
        past its end), a momentum or beta that is not finite.  ``auto`` blamed its own proposal
        for a NaN rate, a rate of None failed inside the wrapper, and either left every later
        step refused as one broken part-way; under ``off`` the weights went NaN; a negative
        rate was tuned as a rate, the weights climbing the loss.  The values are checked as
        read (a scale is finite and above zero, so the effective rate is usable where the
        written one is): no more reads of a tensor knob than the step makes anyway."""
        written = "written since the last step by a scheduler or the training loop"
        fix = f"step {t} was refused and nothing changed: write a usable value and step again"
        for i, group in enumerate(self.param_groups):
            try:
                knobs_io.check_kinds(i, group)
            except ConfigError as err:
                raise RefusedStep(f"{err}; {written}: {fix}") from None
        current = self.hyperparams()
        for i, knobs in enumerate(current):
            for knob, value in knobs.items():
                if math.isfinite(value) and (knob != "lr" or value >= 0.0):
                    continue
                need = "a finite number of at least 0" if knob == "lr" else "a finite number"
                raise RefusedStep(
                    f"param group {i}: {knob}={knobs_io.read(self.param_groups[i], knob):g} was "
                    f"{written}; it must be {need}: {fix}"
                )
        return current

    def _find_outside(self, t: int, current: Knobs) -> None:
        """Hand a knob other than the rate to whoever changed it since the last step.

        OneCycleLR and CyclicLR cycle momentum (or β1) by default, writing it after every step:
        a value selftune then tuned or a rollback restored was overwritten before it was used,
        and the log held decisions that never took effect.  The rate composes with a scheduler
        (a scale on its rate); another knob cannot, so it becomes theirs, with a note and a
        warning.
        """
        if self._left is None:
            return
        for i, (now, left) in enumerate(zip(current, self._left, strict=False)):
            for knob, value in left.items():
                if knob in self._outside[i] or now.get(knob, value) == value:
                    continue
                self._outside[i].add(knob)
                why = (
                    f"group {i}'s {knob} was changed outside selftune before step {t} "
                    f"({value:.6g} -> {now[knob]:.6g}), by a scheduler (OneCycleLR and CyclicLR "
                    "cycle momentum unless given cycle_momentum=False) or by the training loop: "
                    "it is theirs from now on, and selftune neither tunes it nor restores it on "
                    "a rollback"
                )
                self._notes.append({"reason": why})
                warnings.warn(why, stacklevel=outside_frames())

    def _bases(self) -> list[float]:
        """The rate each group holds now: a scheduler's (or the loop's), without the scale."""
        return [knobs_io.read(g, "lr") for g in self.param_groups]

    def _read_rates(self, signals: Signals, bases: list[float]) -> Signals:
        """``signals`` with each group's rise of its rate above the highest set before, and its
        fall below the one the last step read, which this step's rates then become (one read
        of the rates a step, on the path where the controller proposes: a rate met in a
        rollback is read at the next step).

        selftune's scale composes with a scheduler's rate, which suits a decay (a controller
        that lacks one gains it) but not a rise: a warm-up still climbing after ``auto``'s range
        test found the edge of stability at the rate of the time took the run past that edge
        (``bench-results/schedules/``).  A return to a rate set before (a cycle's, a warm
        restart's) is no rise: the controller has seen the run at that rate.  Ranks hold the
        same schedule, so every rank reads the same rises.  ``bases``: :meth:`_bases`.

        A fall is read for a controller that compares the rate in force with its own last
        move: ``auto``'s range test took a decay's cut, a ``StepLR`` halving the rate while it
        grew 1.2x a step, for the policy's bound stopping its growth, and cruised from there,
        a hundred times below the edge it was looking for.
        """
        rises = [
            base / peak if peak is not None and base > peak else 1.0
            for peak, base in zip(self._peaks, bases, strict=True)
        ]
        falls = [
            base / taken if taken is not None and 0.0 < base < taken else 1.0
            for taken, base in zip(self._taken, bases, strict=True)
        ]
        self._peaks = [
            peak if base <= 0.0 else max(base, peak or 0.0)
            for peak, base in zip(self._peaks, bases, strict=True)
        ]
        self._taken = [
            taken if base <= 0.0 else base for taken, base in zip(self._taken, bases, strict=True)
        ]
        if all(r == 1.0 for r in rises) and all(f == 1.0 for f in falls):
            return signals
        groups = tuple(
            dataclasses.replace(g, base_rise=r, base_fall=f)
            for g, r, f in zip(signals.groups, rises, falls, strict=True)
        )
        return dataclasses.replace(signals, groups=groups)

    def _hold_rollback_rates(self, t: int, signals: Signals, bases: list[float]) -> list[Decision]:
        """Hold a rollback's cap against a scheduler that wrote its own rate back since.

        A rollback that lowers a group's base rate to its snapshot's sets the scale on that
        lower rate, at most ``backoff`` times the rate that failed; a scheduler that sets its
        rate from the step count (LambdaLR, OneCycleLR's climb) writes its own back at its
        next step, which the scale then multiplied: a run whose scale was cut since the
        snapshot (``auto`` holding a warm-up's rises) stepped on above half the rate that
        failed.  So at the first step that trains after it, a base rate written back nearer
        the one that failed than the lowered one (a scheduler that multiplies the rate it
        finds goes on from the lower one, and a rate the loop wrote once stays lowered) holds
        the rate to that cap, moved by the schedule since the failure.  A replay makes the
        same cut from the same schedule.  ``bases``: :meth:`_bases`.
        """
        if not any(self._lowered):
            return []  # no rollback pending: the step's usual path
        decisions = []
        for i, base in enumerate(bases):
            allowed = self._rollback_cap(i, base)
            if allowed is None or self._effective(i) <= allowed * _ROUNDING:
                continue
            why = (
                f"guard: the scheduler wrote the rate back up to {base:.6g} since the rollback "
                f"lowered it; held at the rollback's cap moved by the schedule, {allowed:.6g}"
            )
            proposal = Proposal(i, "lr", allowed, why)
            decision = self._apply(t, proposal, self._knobs(i), signals, "guard", False)
            if decision is not None:
                decisions.append(decision)
        self._lowered = [None] * len(self._lowered)
        return decisions

    def _rollback_cap(self, i: int, base: float) -> float | None:
        """The rate a pending rollback's cap allows group ``i`` at base rate ``base`` (see
        :meth:`_hold_rollback_rates`), or None where it holds nothing."""
        pending = self._lowered[i]
        if pending is None:
            return None
        failed_base, lowered_base, cap = pending
        if base * base <= failed_base * lowered_base:
            return None  # nearer the lowered rate: the schedule went on from it
        return cap * base / failed_base

    def _hold_ceiling(self, t: int, signals: Signals, bases: list[float]) -> list[Decision]:
        """Cut each scale that a scheduler's rise took the rate above its upper bound with.

        The policy holds selftune's moves to the bounds, and a scale is checked when a decision
        sets it; but a scale above 1 composes with a rate a scheduler then raises (a warm-up)
        into a rate no decision set, and a bound the user gave is a promise about the rate the
        optimizer steps at.  The floor is left alone: a scheduler's decay below it stays where
        the scheduler put it (a bound stops a move, it never makes one).  A replay computes the
        same cuts from the same schedule and policy, so they are logged (source ``"bound"``)
        but not replayed from the log.  ``bases``: :meth:`_bases`, read before the decisions,
        which set scales only.
        """
        decisions = []
        for i, base in enumerate(bases):
            if base <= 0.0 or self._scales[i] <= 1.0:
                continue  # a scale of at most 1 keeps the rate at or below the scheduler's
            _, cap = self.policy.limits("lr", self._start[i], (base,))
            if base * self._scales[i] <= cap * (1 - 1e-6):
                continue  # clear of the bound by more than a float32 tensor rate's rounding:
                # no need of the exact product (a device sync for a tensor rate)
            old = self._effective(i)
            # a scale is a quotient: a rate set at the bound may round 1 ulp over (of a float32
            # tensor rate's, where the bound itself rounds up)
            held = max(cap, knobs_io.stored(self.param_groups[i], "lr", cap))
            if old <= held * _ROUNDING:
                continue
            self._scales[i] = cap / base
            reason = (
                f"the scheduler raised the rate under a scale of {old / base:.4g} to {old:.6g}, "
                f"above its upper bound {cap:.6g}: scale cut to hold the bound"
            )
            summary = signals.summary(i)
            new = self._effective(i)
            if new == old:
                continue
            decisions.append(
                Decision(t, i, "lr", old, new, reason, summary, True, "bound", self._scales[i])
            )
        return decisions

    def _note_lost_snapshots(self, t: int) -> None:
        """Remember that the guard starts its snapshots again at step ``t``, if the state dict
        loaded mid-run came without them (``opt.state_dict()`` holds none; ``save_checkpoint``
        and the Lightning callback put them back).

        A rollback or restart then goes to a snapshot taken since, not to the one the
        uninterrupted run held, so the next guard record says where they started again
        (``snapshots_since``), and a replay drops its own at that step.  Until a guard event
        comes, the snapshots change nothing, and the log stays the uninterrupted run's.
        """
        self._loaded = False
        if self.guard is not None and not self.guard.snapshots:
            self._snapshots_since = t

    def _leave(self, current: Knobs, decisions: list[Decision]) -> None:
        """Remember the knobs other than the rate as this step leaves them (a float32 tensor
        holds a value rounded from the one a decision wrote)."""
        left = [{k: v for k, v in g.items() if k != "lr"} for g in current]
        for d in decisions:
            if d.knob != "lr":
                group = self.param_groups[d.group]
                left[d.group][d.knob] = knobs_io.stored(group, d.knob, d.value)
        self._left = left

    def _set(self, i: int, knob: str, value: float) -> None:
        if knob == "lr":
            self._scales[i] = value
        else:
            knobs_io.write(self.param_groups[i], knob, value)

    @contextmanager
    def _effective_lr(self) -> Iterator[None]:
        """Apply the scales for the duration of the wrapped step, then put the base rates back.

        An RMSprop group's scale carries its warm-up's correction too, where the controller
        asks for it (see :func:`selftune.knobs.rmsprop_warmup`): applied here, at the step, the
        rate the run reports and logs stays the step's size, with no decision at every step of
        the warm-up, and a replay, which steps through here, applies it alike."""
        saved = []
        for group, scale in zip(self.param_groups, self._scales, strict=True):
            if self._rmsprop_warmup:
                scale *= knobs_io.rmsprop_warmup(group, self.optimizer.state)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                saved.append(lr.clone())
                lr.mul_(scale)
            else:
                saved.append(lr)
                group["lr"] = lr * scale
        try:
            yield
        finally:
            for group, base in zip(self.param_groups, saved, strict=True):
                if isinstance(base, torch.Tensor):
                    self._unalias_rate(group)
                    group["lr"].copy_(base)
                else:
                    group["lr"] = base

    def _unalias_rate(self, group: dict[str, Any]) -> None:
        """Give a state that holds ``group``'s rate tensor itself a copy of the rate it stepped
        with.  L-BFGS keeps the step's rate as its step length (``t = lr``, the same tensor),
        in the state of its first parameter: the base rate put back in place after the step
        became its step length too, and a checkpoint, which saves the two apart, resumed on
        another course than the run's.  (No other torch optimizer keeps the rate in its state,
        and reading every parameter's took milliseconds a step.)"""
        lr = group["lr"]
        state = self.optimizer.state.get(group["params"][0], {}) if group["params"] else {}
        for key in [k for k, value in state.items() if value is lr]:
            state[key] = lr.clone()

    def _decide(
        self, t: int, signals: Signals, proposals: list[Proposal], current: Knobs, limited: bool
    ) -> list[Decision]:
        """Apply the controller's proposals to the knobs ``current`` they were made from.

        A knob proposed twice in a step (the replay's join, then the run's change; a controller
        of one's own) is held to the step's limit from ``current``, and logged from the value
        the one before left it at: the second was logged from the step's value, and one that
        went back to it was dropped, the first left standing.
        """
        if not proposals:
            return []  # most steps: no copy of every group's knobs
        decisions: list[Decision] = []
        now = [dict(k) for k in current]  # the knobs as the decisions so far left them
        bases = self._bases() if self._joint is not None else []  # read once

        def apply(q: Proposal) -> Decision | None:
            d = self._apply(t, q, current[q.group], signals, "controller", limited, now[q.group])
            if d is not None:
                decisions.append(d)
                now[d.group][d.knob] = d.new
            return d

        for p in proposals:
            d = apply(p)
            if d is not None and self._joint is not None:  # the others follow the change the
                why = p.reason + FOLLOWS.format(d.group)  # policy made, saying whose it was
                for q in self._joint.spread(d.group, d.knob, d.value, now, bases, why):
                    apply(q)
        return decisions

    def _apply(
        self,
        t: int,
        p: Proposal,
        current: dict[str, float],
        signals: Signals | None,
        source: str,
        limited: bool = True,
        now: dict[str, float] | None = None,
    ) -> Decision | None:
        """Clip a proposal by the policy and write it; the returned decision says what happened.

        ``current``: the knobs the step started from, which the policy's limit is of; ``now``:
        the knobs in force, if an earlier decision of the step moved them (the decision's
        ``old``, and no decision where the value is the one in force).

        ``limited`` False holds a decision to the bounds only, not to the per-step limit, which
        protects a trajectory from one decision's harm: so for what abandons the trajectory, a
        guard rollback (it restores the snapshot's knobs at once) and the controller's decisions
        in a step that restarts from a snapshot (they set the rate for the restored weights:
        ``auto``'s re-test from a quarter of the rate its shrink found was held to a quarter of
        the rate it was leaving, 13x above the one it meant on the residual CNN).  Replayed
        decisions (``raw``) are set exactly as logged.
        """
        if p.knob not in current or p.knob in self._outside[p.group]:
            return None
        old = current[p.knob]
        base = knobs_io.read(self.param_groups[p.group], "lr")
        if p.knob == "lr" and base <= 0.0:
            return None  # a scheduler holds the rate at zero (a warm-up's start): no scale moves it
        note: str | None = None
        if p.raw:
            value = p.value
            new = value * base if p.knob == "lr" else value
        else:
            # the rate's bounds are factors of its start; another knob's own bounds are widened
            # only to where the user put it (the start of the rate has nothing to say there).
            # The rate's are widened to the rate in force and the one a scheduler set: a decay
            # scheduled below the floor was raised to it (a rollback's halving went x100 up)
            start = self._start[p.group] if p.knob == "lr" else old
            # another knob a rollback restores is a value the run had, where the user may have
            # put it outside the bounds (a beta1 of 0.3 went back as 0.5)
            within = (old, base) if p.knob == "lr" else (p.value,) if source == "guard" else ()
            if not limited:
                if p.knob in self.policy.frozen and source == "controller":
                    return None  # a restart's knobs skip the step limit, not the freeze
                lo, hi = self.policy.limits(p.knob, start, within)
                new = min(max(p.value, lo), hi)
            else:
                rise = (
                    1.0 if signals is None or p.knob != "lr" else signals.groups[p.group].base_rise
                )
                since = old / rise if rise > 1.0 else None  # the rate the last step took
                new, note = self.policy.clip(p.knob, old, p.value, start, within, since)
            value = new / base if p.knob == "lr" else new
            if p.knob == "lr" and new < old:
                self._note_floor(p.group, new, start, source)
        held = old if now is None else now[p.knob]
        if new == held:
            return None
        self._set(p.group, p.knob, value)
        if p.knob == "lr":
            new = self._effective(p.group)
        reason = p.reason if note is None else f"{p.reason} ({note})"
        sig = signals.summary(p.group) if signals is not None else {}
        return Decision(t, p.group, p.knob, held, new, reason, sig, note is not None, source, value)

    def _note_floor(self, group: int, new: float, start: float, by: str) -> None:
        """Keep, once per group, a cut that took the rate to its floor, for :meth:`_warn_floor`
        at the step's end.

        A rate held there trains little, and nothing in the run said so but the rate's curve:
        every miss of ``auto``'s on the benchmark's diffusion model ended at the floor, and the
        most on the matrix factorization and the variational autoencoder, cut on a saddle or a
        slow descent that read as a noise floor (``bench-results/pilots/floor_runs.py``).  The
        warning's advice is what was measured: a floor raised 10x or 100x mended almost none
        of those runs (``bench-results/floor-room/``), a run not told the metric hit in every
        seed of the diffusion model (``bench-results/metric-rule/``).
        """
        if group in self._floored:
            return  # warned of already
        floor, _ = self.policy.limits("lr", start)  # (a start below absolute bounds is its own)
        if new <= floor:
            self._floored.add(group)
            self._floor_cuts.append((group, floor, by))

    def _warn_floor(self, t: int) -> None:
        """Warn of the step's cuts to the floor, and note them in the log: one warning for all
        the groups, which a joint run's one cut takes there together (tens of warnings alike)."""
        if not self._floor_cuts:
            return
        cuts, self._floor_cuts = self._floor_cuts, []
        groups = [g for g, _, _ in cuts]
        floors = [f for _, f, _ in cuts]
        by = " and the ".join(sorted({b for _, _, b in cuts}))
        low = self.policy.bounds["lr"][0]
        each = (
            ", or the starting rate where that is lower"
            if self.policy.lr_bounds_absolute
            else " times the starting rate"
        )
        whose = (
            f"group {groups[0]}'s learning rate was cut to its floor, {floors[0]:.3g}"
            if len(cuts) == 1
            else f"the learning rates of groups {', '.join(map(str, groups))} were cut to their "
            f"floors, {', '.join(f'{f:.3g}' for f in floors)}"
        )
        why = (
            f"{whose} (bounds['lr'] low end {low:g}{each}), by the {by} at step {t}: no cut "
            "takes it further, and the run may train little more. Where the loss or the metric "
            "still has far to go, the cuts read a slow descent or a saddle as a noise floor, and "
            "a higher floor does not mend that (the cuts go on to it). If they were the metric's "
            "('metric plateau' in the log's reasons) on a metric that still creeps, train "
            "without observe(): the training loss's own cuts are undone where they do not help"
        )
        self._notes.append({"reason": why, "groups": groups, "floors": floors})
        warnings.warn(why, RateFloorWarning, stacklevel=outside_frames())

    # -- guard --------------------------------------------------------------------------------
    def _capture(
        self,
        failures: list[tuple[str, Exception]] | None = None,
        taken: tuple[Any] | None = None,
    ) -> dict[str, Any] | None:
        """A snapshot's payload; None where the controller's ``state_dict`` raised, kept in
        ``failures`` (:meth:`_tuning`).  ``taken``: the controller's state taken already, in a
        one-tuple (a state may be None), which the snapshot holds instead of asking again."""
        assert self.guard is not None
        tuning = self._tuning(failures, taken)
        if tuning is None:
            return None
        to = torch.device("cpu") if self.guard.config.offload else None
        buffers = None if self._model is None else dict(self._model.named_buffers())
        return {
            "params": [[_clone(p, to) for p in g["params"]] for g in self.param_groups],
            "buffers": _clone(buffers, to),
            "optimizer": _clone(self.optimizer.state_dict(), to),
            **tuning,
            # the loss statistics, but not the previous update: after a rollback there is none
            "tracker": self._tracker.state_dict(include_update=False),
            "guard": None if self.guard is None else self.guard.statistics(),
            "average": None if self.average is None else _clone(self.average.state_dict(), to),
        }

    def _tuning(
        self, failures: list[tuple[str, Exception]] | None = None, taken: tuple[Any] | None = None
    ) -> dict[str, Any] | None:
        """The controller's state, the knobs and the scales: what a snapshot holds of the
        tuning, and all that a skip's cut changes.  Inside a step (``failures`` given) what the
        controller's ``state_dict`` raises is kept there, as at a rollback (:meth:`_tell`), and
        there is none: the step goes on without this snapshot (:meth:`_kept`).  ``taken``: the
        controller's state taken already (:meth:`_capture`)."""
        if taken is not None:
            (state,) = taken
        elif failures is None:
            state = self._controller_state()
        else:
            held = len(failures)
            state = self._tell(failures, "state_dict()", self._controller_state)
            if len(failures) > held:
                return None
        return {
            "controller": state,
            "knobs": self.hyperparams(),
            "scales": list(self._scales),
        }

    def _roll_back(
        self,
        trouble: Trouble,
        signals: Signals,
        unread: dict[str, Any] | None,
        failures: list[tuple[str, Exception]],
    ) -> tuple[list[Decision], dict]:
        """The guard's rollback (or skip) of the step ``trouble`` found, its decisions and
        event.  What the controller's methods called here raise is kept in ``failures``, and
        the rollback taken whole without them (:meth:`_tell`)."""
        assert self.guard is not None
        # what a skip would cut
        tuning = self._tuning(failures) if not self.guard.snapshots else None
        try:
            snap, factor = self.guard.rollback(trouble)
        except GuardError as err:
            event = {"event": "escalate", "signal": trouble.signal, "value": trouble.value}
            event["reason"] = str(err)
            # first: a listener that raises below replaces err.  The step was taken, as far as
            # a rewind's note goes: its record, which a load cuts, was written
            self._gave_up = {"step": trouble.step, **event}
            self._furthest = max(self._furthest, trouble.step)
            self._before_escalate = self._log_end()
            self._after(trouble.step, signals, [], event)
            raise
        failed = self.hyperparams()  # the knobs in force, before the restore lowers any rate
        if any(self._lowered):  # a rollback's cap no training step has applied yet (trouble
            for i, base in enumerate(self._bases()):  # again at once): the rate that failed is
                allowed = self._rollback_cap(i, base)  # the one it would have set
                if allowed is not None and allowed < failed[i]["lr"]:
                    failed[i]["lr"] = allowed
        note_failure = getattr(self.controller, "before_rollback", None)
        if note_failure is not None:  # what failed, before the restore erases it
            self._tell(failures, "before_rollback()", note_failure, failed)
        lowered: dict[int, float] = {}
        if snap is None:  # nothing held yet: the step's update was never made, only skip it
            # (no snapshot held before the rollback either); none where the controller's
            # state_dict raised: the skip's cut is then never undone (:meth:`_kept`)
            self.guard.skipped = None if tuning is None else Snapshot(trouble.step, tuning)
            saved_knobs = [{"lr": self._effective(i)} for i in range(len(self.param_groups))]
            scales: list[float] | None = None
            reason = f"guard: {trouble.reason}; no snapshot held yet, step skipped"
            assert unread is not None  # taken whenever no snapshot is held
            self._tracker.load_state_dict(unread)  # as a snapshot's: no previous update
            _zero_grads_in_place(self.optimizer)
        else:
            payload = snap.payload
            lowered = self._restore(snap, lower_rates=True)
            state = _clone(payload["controller"])
            self._tell(failures, "load_state_dict()", self.controller.load_state_dict, state)
            # selftune's scale as it was, on the rate a scheduler set now (older snapshots
            # hold no scales: the rate as it was)
            saved_knobs, scales = payload["knobs"], payload.get("scales")
            reason = f"guard: {trouble.reason}; rolled back to step {snap.step}"
        self._tell(failures, "on_backoff()", self.controller.on_backoff, trouble.step)
        decisions = self._put_knobs(
            trouble.step, saved_knobs, scales, factor, reason, failed=failed
        )
        self._lowered = [None] * len(self.param_groups)
        backoff = self.guard.config.backoff if self.guard is not None else 1.0
        for i, base in lowered.items():  # (base that failed, base now, rate it may not pass)
            now = knobs_io.read(self.param_groups[i], "lr")
            self._lowered[i] = (base, now, failed[i]["lr"] * backoff)
        event = {
            "event": "rollback" if snap is not None else "skip",
            "signal": trouble.signal,
            "value": trouble.value,
            "reason": trouble.reason,
            **({} if snap is None else {"restored_step": snap.step}),
            "lr_factor": factor,
        }
        return decisions, event

    def _hold(self, trouble: Trouble, unread: dict[str, Any] | None) -> dict[str, Any]:
        """The guard's hold of a spike (:meth:`selftune.guard.Guard._confirmed`), its event:
        the step's update is not made and nothing else changes, so that the next step judges
        the same weights on another batch.  The signals' reading of the step is undone as a
        skip's is: the spike stays out of the loss statistics the controller reads, and the
        next step reads no previous update (none was made)."""
        assert unread is not None  # taken whenever the guard is on
        self._tracker.load_state_dict(unread)
        _zero_grads_in_place(self.optimizer)
        return {
            "event": "hold",
            "signal": trouble.signal,
            "value": trouble.value,
            "reason": f"{trouble.reason}; update held back: the next step, on the same "
            "weights, shows whether they or this batch spiked",
        }

    def _tell(
        self,
        failures: list[tuple[str, Exception]],
        stage: str,
        method: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """Call the controller's ``method`` (named ``stage``) at the guard's rollback, where it
        puts a snapshot's controller state back (a relevel, a trial gone forward:
        :meth:`_as_kept`), or where it takes one (:meth:`_tuning`), what it raises kept in
        ``failures``.

        Raised from inside the rollback, it left the step broken off, the guard's snapshot
        given up and the weights not yet restored, and every later step was refused until a
        checkpoint loaded.  The rollback's decisions are the guard's, none of the
        controller's: taken whole without the method (the controller's state as its error
        left it), the step is recorded, replays, and is the same on every rank, and ``step``
        raises :class:`ControllerError` as a refused proposal's step does (:meth:`_consult`).
        Returns what ``method`` returned, None where it raised.
        """
        try:
            return method(*args)
        except Exception as exc:
            failures.append(self._failure(stage, exc))
            return None

    def _checkpoint_controller(self) -> Any:
        """The controller's state for :meth:`state_dict`; :class:`ControllerError` where its
        ``state_dict`` raised (:meth:`_failure`).  No gather: each rank saves its own."""
        return self._controller_state_or_refuse(
            "No state was saved (a checkpoint without the controller's state would resume "
            "another run): the run is whole and steps on; save again once it gives one"
        )

    def _controller_state_or_refuse(self, refused: str, alike: bool = False) -> Any:
        """The controller's state (a copy of its own), or :class:`ControllerError` naming the
        controller and its error (the ``__cause__``), followed by ``refused``: what was not
        done and what to do.  Asked before anything of the operation changes (a state saved,
        a group added), so that a refusal leaves the wrapper as it was, to step on; no note
        in the log, which nothing changed.  No gather where each rank asks its own (a save).

        ``alike``: the operation must be taken or refused alike on every rank (a group added:
        a rank without it parts the ranks' groups, and the next step's gather mismatches or the
        runs drift apart).  A controller of one's own may raise on one rank alone, so where its
        failures are shared (:meth:`_shares_failures_now`) one gather of a flag per rank says
        where it raised, and every rank refuses where it raised on any, a rank whose own did not
        raise naming the first that did, with no ``__cause__`` (as :meth:`_controller_error`).
        The controllers selftune ships fail on every rank or none: no gather."""
        failures: list[tuple[str, Exception]] = []
        state = self._tell(failures, "state_dict()", self._controller_state)
        distributed = alike and self._shares_failures_now()
        failed_on, _ = self._failed_ranks(failures, distributed)
        if not failed_on:
            return state
        everywhere = " (refused on every rank)" if distributed else ""
        why, cause = self._why_failed(failures, failed_on, ": state_dict() raised")
        raise ControllerError(f"{why}{everywhere}. {refused}") from cause

    def _controller_state(self) -> Any:
        """The controller's ``state_dict()``, a copy of its own."""
        return _clone(self.controller.state_dict())

    def _go_forward(
        self, t: int, failures: list[tuple[str, Exception]]
    ) -> tuple[list[Decision], dict]:
        """Restore the snapshot a regression's rollback (or a jump's) left, at the knobs and
        controller state it held, after the rollback's trial found the older weights no better
        on the data of now (:meth:`selftune.guard.Guard._judge_trial`); this step's gradient,
        of the trial's weights, is not applied."""
        assert self.guard is not None and self.guard.forward is not None
        snap, restored = self.guard.forward, self.guard.restored
        self._restore(snap, lower_rates=False)
        self._lowered = [None] * len(self._lowered)
        self.guard.went_forward(snap)
        reason = (
            f"guard: the rollback to step {restored} did not bring the loss back below the "
            "level it left: the data got harder, not the weights worse"
        )
        event = {
            "event": "forward",
            "signal": "loss_level",
            "value": self.guard.loss.unscaled(self.guard.loss.mean),
            "reason": f"{reason}; back to step {snap.step}",
            "restored_step": snap.step,
        }
        return self._as_kept(t, snap, reason, failures), event

    def _as_kept(
        self, t: int, snap: Snapshot, reason: str, failures: list[tuple[str, Exception]]
    ) -> list[Decision]:
        """The controller state and knobs ``snap`` holds, with no rollback's cut; what the
        controller's ``load_state_dict`` raises kept in ``failures``, as at a rollback
        (:meth:`_tell`)."""
        state = _clone(snap.payload["controller"])
        self._tell(failures, "load_state_dict()", self.controller.load_state_dict, state)
        return self._put_knobs(t, snap.payload["knobs"], snap.payload.get("scales"), 1.0, reason)

    def _put_knobs(
        self,
        t: int,
        saved_knobs: list[dict[str, float]],
        scales: list[float] | None,
        factor: float,
        reason: str,
        failed: Knobs | None = None,
    ) -> list[Decision]:
        """Set the knobs a snapshot held, the rate times ``factor``: the guard's decisions.

        ``failed``, for a rollback: the knobs in force when the trouble came, read before the
        restore lowers a base rate.  They are each decision's ``old`` (read after the restore,
        ``old`` was the snapshot's rate for a rate of 1e3 the loop had written, a halving the
        report drew as a doubling, and a restore that alone cut the rate logged none), and the
        rate is set at most ``backoff`` times the one that failed (and so held, at the next
        step, where a scheduler writes its own rate back: :meth:`_hold_rollback_rates`).
        """
        decisions = []
        for i, saved in enumerate(saved_knobs):
            current = self._knobs(i) if failed is None else failed[i]
            for knob, value in saved.items():
                if knob == "lr" and scales is not None:
                    value = scales[i] * knobs_io.read(self.param_groups[i], "lr")
                target = value * factor if knob == "lr" else value
                why = f"{reason}, lr x{factor:g}" if knob == "lr" and factor != 1 else reason
                if knob == "lr" and failed is not None and self.guard is not None:
                    # and below the rate that failed: a snapshot older than a cut since (a
                    # regression's, of the lowest level) held a rate whose half was the rate
                    # that regressed, and the run went on at it
                    below = current["lr"] * self.guard.config.backoff
                    if below < target:
                        target = below
                        why = f"{reason}, lr x{self.guard.config.backoff:g} of the rate that failed"
                decision = self._apply(
                    t, Proposal(i, knob, target, why), current, None, "guard", False
                )
                if decision is not None:
                    decisions.append(decision)
        return decisions

    def _forgive(self, t: int, failures: list[tuple[str, Exception]]) -> list[Decision]:
        """Undo the rate cut of a rollback that the guard found needless (the weights it
        restored show the trouble too: the data changed, not the run), and the controller's
        reaction to it: the knobs and controller state of the restored snapshot, as kept."""
        snap = None if self.guard is None else self.guard.mistaken
        if snap is None:
            return []
        weights, cut = (
            (f"the weights of step {snap.step}", "the rollback's")
            if "params" in snap.payload
            else (f"the weights the skip of step {snap.step} left", "the skip's")
        )
        reason = (
            f"guard: {weights} show the trouble too, so the data or the objective changed, "
            f"not the run: {cut} rate cut is undone"
        )
        return self._as_kept(t, snap, reason, failures)

    def _restore(self, snap: Snapshot, lower_rates: bool) -> dict[int, float]:
        """Put the parameters, optimizer state, loss statistics and weight average of a snapshot
        back; ``lower_rates``: and each group's base rate where the snapshot's was lower.
        Returns the base rate in force before, of each group whose base rate it lowered."""
        payload = snap.payload
        finish_offload()  # the clone below reads the snapshot on the host
        for group, saved in zip(self.param_groups, payload["params"], strict=True):
            for p, kept in zip(group["params"], saved, strict=True):
                p.data.copy_(kept)  # from the host too, when the snapshot was offloaded
        if self._model is not None and payload.get("buffers") is not None:
            left = _restore_buffers(self._model, payload["buffers"])
            if left and not self._told_buffers:
                self._told_buffers = True
                warnings.warn(
                    f"the model's buffers {', '.join(left[:4])} changed shape or dtype, or came, "
                    f"since the snapshot of step {snap.step}: the rollback left them as they are "
                    "(a cache that grows is best so; said once)",
                    stacklevel=outside_frames(),
                )
        # torch's load_state_dict moves the state to each parameter's device; it also puts back
        # the groups' settings as they were.  The settings in force now stay instead (the caller
        # sets the knobs the snapshot held): the base rate is the LR scheduler's, and a chained
        # one builds on the rate it finds, so one put back from before its decay stayed that
        # much too high for the rest of the run.  A rollback (``lower_rates``) still takes the
        # snapshot's base rate where it was lower, but not zero: a rate written since the
        # snapshot may be what failed (a scheduler or user code gone wrong; the guard's fault
        # tests write 1e3), and a guard errs on the low side.  The price: a chained warm-up
        # rolled back goes on from the lower rate, below its schedule by that factor.
        # The load builds new group dicts and a new ``state``; the ones in force are kept, the
        # snapshot's state put into them: a loop that held a group (to set its rate later)
        # wrote into a dict no optimizer read any more after a rollback, and lost the write.
        groups, state = self.optimizer.param_groups, held_state(self.optimizer)
        self.optimizer.load_state_dict(_clone(payload["optimizer"]))
        _keep_scalar_dtypes(self.optimizer, payload["optimizer"])  # (as a resume keeps them)
        rates = [knobs_io.read(g, "lr") for g in self.optimizer.param_groups]  # the snapshot's
        _refill(state, self.optimizer.state)
        self.optimizer.param_groups, self.optimizer.state = groups, state
        lowered = {}
        for i, (group, then) in enumerate(zip(groups, rates, strict=True)):
            if lower_rates and 0.0 < then < (now := knobs_io.read(group, "lr")):
                knobs_io.write(group, "lr", then)
                lowered[i] = now
        self._tracker.load_state_dict(payload["tracker"])
        if self.guard is not None and payload.get("guard") is not None:
            self.guard.load_statistics(payload["guard"], snap.step)
        if self.average is not None and payload.get("average") is not None:
            self.average.load_state_dict(payload["average"])
        _zero_grads_in_place(self.optimizer)
        return lowered

    def _take_restart(
        self, proposals: list[Proposal], reason: Any, deferred: bool = False
    ) -> str | None:
        """The controller's ``reason`` to restart at this step (what its ``take_restart``
        returned), if it asked and a snapshot can serve; ``deferred``: the step's own snapshot
        is yet to be kept, once the proposals are made (a controller of one's own under
        torch.distributed), and serves then.

        The restart goes back to the oldest snapshot held once the step's is kept: asked where
        none was held before it (the first step, the first after a load), the restart was
        ignored under torch.distributed, where alone (and under any controller selftune ships)
        it went back to that snapshot.  A restart that stands is made only where no rank failed,
        and so where the step's snapshot is kept.

        A controller asks when its own probing damaged the run (``auto``'s range test found the
        starting rate past the edge of stability).  Without a guard there are no snapshots, and
        the request is ignored; so is one with the rate frozen whose ``proposals`` set no knob
        the policy leaves free.
        """
        if reason is not None and not isinstance(reason, str):  # the log's restart record
            # refused it after the restart had been made, the run left broken part-way
            raise ConfigError(
                f"controller {self.controller.name!r}: take_restart() returned {reason!r}; "
                "return the reason to restart in words, a str, or None for no restart"
            )
        guard = self.guard
        if reason is None or guard is None or (guard.restart_point is None and not deferred):
            return None
        frozen = self.policy.frozen
        if "lr" in frozen and all(p.knob in frozen for p in proposals):
            return None  # no probe moved the rate, and the restart would set no knob: it would
        return reason  # only throw the steps since away (auto's range test, its rate frozen)

    def _restart(self, reason: str) -> dict[str, Any]:
        """Restart from the guard's oldest snapshot, keeping the controller's new knobs.

        The probe's findings, i.e. the knobs the controller has just set and its own state, are
        kept; the weights it damaged are not.  Newer snapshots belong to the abandoned
        trajectory and are dropped.
        """
        guard = self.guard
        assert guard is not None and guard.restart_point is not None  # see _take_restart
        snap = guard.restart_point
        self._restore(snap, lower_rates=False)  # the knobs and scales stay as they are
        guard.restarted_from(snap)
        return {
            "event": "restart",
            "signal": "lr",
            "value": self._effective(0),
            "reason": reason,
            "restored_step": snap.step,
        }

    # -- logging ------------------------------------------------------------------------------
    def _open_log(self, log_dir: Path, initial_sha256: str) -> None:
        from selftune import audit

        enabled = is_rank_zero()  # under torch.distributed only rank 0 writes the run folder
        groups = [
            {
                "index": i,
                "knobs": list(self._names[i]),
                "num_params": sum(p.numel() for p in g["params"]),
            }
            for i, g in enumerate(self.param_groups)
        ]
        config = self._settings()
        del config["controller"]
        manifest = audit.build_manifest(
            controller=self.controller.name,
            config=config,
            seed=self._seed,
            param_groups=groups,
            initial_params_sha256=initial_sha256,
            world_size=shards.world_size(),
        )
        self._log = audit.AuditLog(log_dir, manifest, enabled=enabled)
        if enabled:
            self._trace_file = log_dir / "trace.jsonl"
            try:
                self._trace, self._trace_closer = audit.open_append(self._trace_file, self)
            except BaseException:
                # the wrap is refused: its traceback (a notebook keeps the last) held the log
                # open, and the folder's lock with it, refusing the run's next process
                self._log.close()
                raise
            self._trace_bytes = os.fstat(self._trace).st_size

    def _settings(self) -> dict[str, Any]:
        """What the run was wrapped with: the manifest's record, and what every rank must share."""
        return {
            "controller": self.controller.name,
            "optimizer": optimizer_name(self.optimizer),
            "start": self.hyperparams(),
            "options": [group_options(g, self.optimizer) for g in self.param_groups],
            "policy": _policy_json(self.policy),
            "guard": None if self.guard is None else vars(self.guard.config),
            "average": None if self.average is None else self.average.decay,
            "controller_options": self._controller_options,
            # only where given: the manifest of a run without one reads as before
            **({"rmsprop_warmup": True} if self._rmsprop_warmup else {}),
            **({} if self._model is None else {"model_buffers": len(list(self._model.buffers()))}),
        }

    def _write_added(self) -> None:
        assert self._log is not None
        for record in self._added:
            self._log.append(record)
        self._added = []

    def _after(
        self, t: int, signals: Signals, decisions: list[Decision], guard: dict[str, Any] | None
    ) -> None:
        self._warn_floor(t)
        notes, self._notes = self._notes, []
        relevel, self._relevel = self._relevel, None
        since = None
        if guard is not None:  # the first guard event since the snapshots started again
            since, self._snapshots_since = self._snapshots_since, None
        if self._log is None and self._trace is None and not self._listeners:
            self._recorded = t
            return  # nothing records the step: keep the hot path free of it
        hp = self.hyperparams()
        if self._log is not None:
            self._write_added()
            for note in notes:
                self._log.append({"kind": "note", "step": t, **note})
            if guard is not None:
                where = {} if since is None else {"snapshots_since": since}
                self._log.append({"kind": "guard", "step": t, **guard, **where})
            for d in decisions:
                self._log.append(
                    {
                        "kind": "decision",
                        "step": d.step,
                        "group": d.group,
                        "knob": d.knob,
                        "old": d.old,
                        "new": d.new,
                        "value": d.value,
                        "source": d.source,
                        "signals": d.signals,
                        "reason": d.reason,
                        "clipped": d.clipped,
                    }
                )
        if self._trace is not None:
            loss = signals.loss
            row: dict[str, Any] = {
                "step": t,
                "loss": loss if loss is None or math.isfinite(loss) else str(loss),
            }
            metric = signals.metric
            if metric is not None:
                row["metric"] = metric if math.isfinite(metric) else str(metric)
            line = (json.dumps({**row, "hp": hp}) + "\n").encode("utf-8")
            last = f"the rows before step {t}"
            append_line(self._trace, line, self._trace_bytes, self._trace_file, last)
            self._trace_bytes += len(line)
        self._recorded = t
        if self._listeners:
            # a relevel is logged as the guard judges the step, before the step's own guard
            # event: its listeners hear of both here, in that order
            heard = [g for g in (relevel, guard) if g is not None]
            latest = heard[-1] if heard else None
            event = StepEvent(t, signals.loss, hp, decisions, latest, signals, heard)
            for fn in self._listeners:
                fn(event)


def _refuse_lazy(groups: list[dict[str, Any]], why: str, before: str = "wrapping") -> None:
    """Refuse a lazy module's parameter not yet initialized among ``groups`` where its values
    are read at once (``why``), naming the dry run that gives them: torch's ValueError came
    from inside, after the optimizer was touched."""
    if any(is_lazy(p) for group in groups for p in group["params"]):
        raise ConfigError(
            f"the optimizer holds a lazy module's parameter not yet initialized, and {why}: "
            f"run a forward pass (a dry run with one batch) before {before}"
        )


def _alive(ref: weakref.ref[SelfTuned]) -> SelfTuned:
    """The wrapper a weak reference of its own holds (it is alive while it steps)."""
    tuned = ref()
    assert tuned is not None
    return tuned


#: what every state this version of selftune saves holds, and a load reads without a default
_OWN_KEYS = frozenset({"step", "scales", "start", "controller", "tracker", "guard", "log"})
#: what the signal tracker's load reads without a default
_TRACKER_KEYS = frozenset({"prev", "n", "fast", "slow", "var"})


def _unreadable(exc: Exception) -> ConfigError:
    """The error of a state whose selftune part does not read, naming what did not."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ConfigError(
        f"the state dict's selftune part does not read ({what}): it is damaged, or was saved "
        "by another version of selftune. Load a checkpoint this version saved; or, to go on "
        "from the weights with none of selftune's memory of the run, load the optimizer's own "
        "part (the state dict without its 'selftune' key)"
    )


def _pending_metric(saved: Any) -> dict[str, Any]:
    """The saved pending metric as a dict; states saved before it was one hold a list,
    ``[value, mode]`` or ``[value, mode, at_average, evaluating_average]``, or nothing."""
    if isinstance(saved, dict):
        return saved
    value, mode, at_average, evaluating = [*(saved or [None, None]), False, False][:4]
    return {
        "value": value,
        "mode": mode,
        "at_average": at_average,
        "evaluating_average": evaluating,
    }


def finish_offload() -> None:
    """Wait for the copies of snapshots to the host that are still queued on the GPU.

    Before anything reads a snapshot on the host: a rollback (rare) or a checkpoint.  Usually
    they are long done, since each step's read of its signals waits for the device, but a
    restart in the step that took its snapshot would read it before the copy had landed.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def on_host(tree: Any) -> Any:
    """A copy of ``tree`` (a state dict, say) with every tensor on the CPU, ready to read."""
    out = _clone(tree, torch.device("cpu"))
    finish_offload()  # the copies from a device were queued, not waited for
    return out


def _restore_buffers(model: torch.nn.Module, kept: dict[str, torch.Tensor]) -> list[str]:
    """Copy a snapshot's buffers back into ``model``'s of the same name, shape and dtype;
    return the names of those left as they are (one that grew since, a cache of a longer
    sequence, or came since: a rollback that refused them stopped a run that had survived it).
    """
    left = []
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            saved = kept.get(name)
            if saved is None or saved.shape != buffer.shape or saved.dtype != buffer.dtype:
                left.append(name)
            else:
                buffer.copy_(saved)
    return left


def _zero_grads_in_place(optimizer: torch.optim.Optimizer) -> None:
    """Zero the gradients of a step the guard refused, in place: its non-finite values cannot
    be stepped on later, and ``.grad`` stays the tensor it was, as torch's ``step`` leaves it
    (set to None, a loop that read it after the step, to log its norm, failed on NoneType,
    and one that zeroes in place, ``zero_grad(set_to_none=False)``, lost its buffers)."""
    optimizer.zero_grad(set_to_none=False)


def _refill(state: dict[Any, Any], loaded: dict[Any, Any]) -> None:
    """Make ``state`` (an optimizer's, in force) hold ``loaded`` (the state torch's load built
    from a snapshot), keeping its containers and its tensors where they still fit: each tensor
    loaded is copied into the one it replaces where both are plain dense tensors (a subclass's,
    a sharded or quantized state's, is replaced, as torch's load left it) of one shape, dtype
    and device.  A step compiled with ``torch.compile`` guards on the identity of its state
    tensors: new ones recompiled it at every rollback, until dynamo's limit of recompiles left
    it uncompiled for the rest of the run."""
    for param, entries in loaded.items():
        held = state.get(param)
        if held is None:
            continue
        for key, value in entries.items():
            old = held.get(key)
            if (
                type(value) is torch.Tensor
                and type(old) is torch.Tensor
                and value.layout == old.layout == torch.strided
                and (value.shape, value.dtype, value.device) == (old.shape, old.dtype, old.device)
            ):
                old.copy_(value)
                entries[key] = old
        held.clear()
        held.update(entries)
        loaded[param] = held
    state.clear()
    state.update(loaded)


#: the wrapper that stepped last with each controller instance given to one, by the instance's
#: id (the entry goes with the wrapper, and the instance lives as long as it: no other object
#: takes the id meanwhile)
_STEPPED: weakref.WeakValueDictionary[int, SelfTuned] = weakref.WeakValueDictionary()


def _clone(tree: Any, to: torch.device | None = None) -> Any:
    """A deep copy of a state dict, fast: the guard snapshots one every 25 steps.

    ``copy.deepcopy`` spends most of its time on bookkeeping (the memo, ``__reduce_ex__``) for
    what is only nested dicts, lists and tuples of tensors and numbers; this walks those
    directly, clones tensors, keeps immutable leaves and deep-copies anything else.  ``to``: the
    device the tensors are copied to (None: where each is).  A copy from an accelerator to the
    host is queued, not waited for (torch gives it pinned memory); what reads it on the host
    later waits for it first (:func:`finish_offload`).
    """
    if isinstance(tree, torch.Tensor):
        if to is None:
            return tree.detach().clone()
        return tree.detach().to(to, copy=True, non_blocking=True)
    kind = type(tree)  # exact types: a subclass (OrderedDict, a named tuple) is deep-copied
    if kind is dict:
        return {k: _clone(v, to) for k, v in tree.items()}
    if kind is list:
        return [_clone(v, to) for v in tree]
    if kind is tuple:
        return tuple(_clone(v, to) for v in tree)
    if tree is None or isinstance(tree, (bool, int, float, str, bytes)):
        return tree
    return copy.deepcopy(tree)


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes a closure with no default (L-BFGS's)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a step with no signature to read: it is not refused
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _keep_scalar_dtypes(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Give the optimizer's own scalars beside a parameter the dtypes they were saved in.

    Torch's load casts every floating state tensor to its parameter's dtype, the step count
    alone aside: a scalar that an optimizer keeps in float32 beside float64 parameters came
    back as float64, and where it weighs the update (NAdam's ``mu_product``) the resumed run
    left the uninterrupted one in the last bits.  A state of the parameter's own shape (its
    moments, of a parameter that is a scalar itself) takes the parameter's dtype, as torch
    gives it: the update needs the two alike.  Beside a parameter that is a scalar itself,
    where every state is a scalar, the optimizer's own are told by their keys: those it keeps
    as scalars beside a parameter that is none (a float64 learned temperature's
    ``mu_product`` came back as float64, and the resumed run left the uninterrupted one).
    A parameter's saved state may be None: ``ZeroRedundancyOptimizer``'s load writes that in
    place of the state of the parameters other ranks hold (every rank's resume raised here)."""
    pairs = [
        (param, saved["state"].get(index) or {})
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=False)
        for index, param in zip(saved_group["params"], group["params"], strict=False)
    ]
    own = {
        key
        for param, kept in pairs
        if param.dim() > 0
        for key, value in kept.items()
        if isinstance(value, torch.Tensor) and value.dim() == 0
    }
    for param, kept in pairs:
        state = optimizer.state.get(param, {})
        for key, value in kept.items():
            now = state.get(key)
            if (
                isinstance(value, torch.Tensor)
                and isinstance(now, torch.Tensor)
                and value.dim() == 0
                and (param.dim() > 0 or key in own)
                and value.dtype != now.dtype
            ):
                state[key] = value.to(device=now.device, copy=True)


def _replay_once(closure: Callable[[], Any], result: Any) -> Callable[[], Any]:
    """A closure whose first call returns the loss already computed (the gradients are in place);
    later calls (L-BFGS line searches) evaluate the real closure."""
    calls = 0

    def wrapped() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return result
        with torch.enable_grad():
            return closure()

    return wrapped


#: the packages whose frames stand between a warning and the training loop's call
_OURS = ("selftune", "torch")


def outside_frames() -> int:
    """The ``stacklevel`` of the training loop's call: past selftune and the wrappers torch
    puts around ``step()`` (no_grad, the optimizer's hooks, each scheduler's counter)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__")).split(".")[0] in _OURS:
        frame, level = frame.f_back, level + 1
    return level


def _inner(controller: Controller) -> Controller:
    """The controller that decides: a joint one's inner, else ``controller``."""
    return controller.inner if isinstance(controller, JointController) else controller


def _decides_alike(controller: Controller) -> bool:
    """Whether the controller that decides is one of selftune's own, as registered (no
    subclass), or a replay's: one whose proposals are a function of what every rank holds
    alike (the signals the ranks share, the knobs, its state; the log), and so fail on every
    rank or on none."""
    inner = _inner(controller)
    own = type(inner) is CONTROLLERS.get(inner.name)
    return own or bool(getattr(inner, "replays_log", False))


def _proposals_digest(proposals: list[Proposal], restarts: bool) -> float:
    """What a rank's controller decided at a step, as a whole number below 2**48 (a float64
    holds it exactly, for the gather of :func:`~selftune.signals.flagged_ranks`): a hash of
    each proposal's group, knob, value (to the bit) and whether it restarts.  The reasons are
    left out: only rank 0's are logged, and words that name the rank change no knob."""
    said = [(int(p.group), p.knob, float(p.value).hex(), bool(p.raw)) for p in proposals]
    hashed = hashlib.blake2b(repr((said, restarts)).encode(), digest_size=6).digest()
    return float(int.from_bytes(hashed, "big"))


def _class(controller: Controller) -> str:
    """The qualified class name of the controller that decides."""
    kind = type(_inner(controller))
    return f"{kind.__module__}.{kind.__qualname__}"


def _logged_on_rank_zero(log_dir: str | Path | None) -> bool:
    """Whether any rank was given a run folder; a collective, which raises :class:`ConfigError`
    on every rank where one was but rank 0, which alone writes it, was given none: a folder given
    on the other ranks alone was never written, with no word, and the run had no log."""
    given = shards.gathered(log_dir is not None)
    if any(given) and not given[0]:
        ranks = [str(rank) for rank, folder in enumerate(given) if folder]
        named = f"rank{'s' * (len(ranks) > 1)} {', '.join(ranks)}"
        raise ConfigError(
            f"log_dir was given on {named} but not on rank 0, which alone writes the run folder: "
            "give rank 0 the folder (the other ranks may have it too, or None)"
        )
    return any(given)


def is_rank_zero() -> bool:
    """Whether this process writes a run's records: rank 0 under torch.distributed, where
    every rank holds the same knobs and decisions (and the only process otherwise)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def group_options(group: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A param group's settings of the optimizer's own (the keys of its ``defaults``: weight
    decay, eps, nesterov, amsgrad, foreach, ...) other than the knobs ``start`` records, as
    plain JSON values: a replay through an optimizer built with another weight decay ended on
    other weights, silently.  Keys a scheduler adds (``initial_lr``) or parameter names are
    no setting, and may differ in a replay that ends on the same weights."""
    defaults = defaults_of(optimizer, group)  # (a Combined's group: its optimizer's)
    plain = (bool, int, float, str, type(None))
    options: dict[str, Any] = {}
    for key in defaults:
        if key in ("params", "lr", "momentum", "betas"):
            continue
        value = group.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # as the log writes one
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, plain) or (
            isinstance(value, list) and all(isinstance(v, plain) for v in value)
        ):
            options[key] = value
    return options


def _policy_json(policy: Policy) -> dict[str, Any]:
    return {
        "bounds": {k: list(v) for k, v in policy.bounds.items()},
        "max_change": dict(policy.max_change),
        "frozen": sorted(policy.frozen),
        "lr_bounds_absolute": policy.lr_bounds_absolute,
    }
