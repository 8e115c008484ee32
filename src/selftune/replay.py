"""Replay a logged run: re-apply every knob change and guard rollback at the step it happened.

Given the same seed, data order and code, the replayed run's final weights are bit-identical to the
original's: logged values are stored exactly (JSON floats round-trip), the learning rate's *scale*
is logged as well as its effective value, and guard rollbacks are re-executed from snapshots taken
on the same schedule, with the same configuration, read back from the manifest.  A run the guard
gave up on (an "escalate" record) ends the same way: the replay raises the logged
:class:`~selftune.GuardError` at that step, leaving the weights as the original left them.

A replay that leaves the logged run (another scheduler, a loss that goes NaN where the run's
did not) is stopped at the first step where it and the run folder disagree: a decision's
knob that stood elsewhere, a logged rollback that went back elsewhere, or the knobs after a
step, which the run's ``trace.jsonl`` holds, that differ (a scheduler changed after the last
decision, or in a run under ``off``, which logs none, moved the weights with no word).  A
loss that differs from the logged one is told once, not refused (see :class:`_FollowsTrace`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from selftune import audit
from selftune import knobs as knobs_io
from selftune.average import check_decay
from selftune.combined import Optimizers, as_one, optimizer_name
from selftune.controllers.base import Knobs, Proposal
from selftune.errors import ConfigError, GuardError, SelfTuneError
from selftune.guard import Guard, GuardConfig, Snapshot, Trouble
from selftune.policy import Policy
from selftune.report import as_float, iter_trace
from selftune.shards import whole_sha256
from selftune.signals import Signals
from selftune.tuner import SelfTuned, StepEvent, group_options, outside_frames


class Decided:
    """The controller's decisions of a log, as the proposals a replay makes again at each step,
    each beside the knob's value before it: all a replay keeps of a decision, in columns, some
    50 bytes a decision (the records, held all at once, took some 2 KB a decision, and the
    proposals built for every step at once some 400 bytes).

    They are taken in as the log is read (:func:`~selftune.audit.iter_log`), so that a record
    whose step or value is not a number is refused up front, naming the record, not halfway
    through the replayed run.  A guard's or a bound's decision is the replay's own to make
    again, and is left out.
    """

    def __init__(self) -> None:
        self._steps, self._groups = array("q"), array("q")
        self._values, self._olds = array("d"), array("d")
        #: each decision's knob and reason: one string for each that recurs (a controller's
        #: reasons repeat: a hypergradient run's 12,000 decisions give some 800)
        self._knobs: list[str] = []
        self._reasons: list[str] = []
        #: whether the steps never go back, as a log's do (they are sorted before a look-up
        #: otherwise, each step's decisions kept in log order)
        self._ordered = True

    def add(self, record: dict[str, Any]) -> None:
        """Take in one decision record of the log."""
        if record.get("source", "controller") != "controller":
            return
        step = _number(record, "step", int)
        self._ordered &= not self._steps or self._steps[-1] <= step
        self._steps.append(step)
        self._groups.append(record["group"])
        self._values.append(_number(record, "value", float))
        self._olds.append(_number(record, "old", float))
        self._knobs.append(sys.intern(record["knob"]))
        self._reasons.append(sys.intern(f"replay: {record['reason']}"))

    def at(self, step: int) -> tuple[list[Proposal], list[float]]:
        """The proposals of ``step``, in log order, and the knob's value before each."""
        if not self._ordered:
            order = sorted(range(len(self._steps)), key=self._steps.__getitem__)  # (stable)
            self._steps = array("q", (self._steps[i] for i in order))
            self._groups = array("q", (self._groups[i] for i in order))
            self._values = array("d", (self._values[i] for i in order))
            self._olds = array("d", (self._olds[i] for i in order))
            self._knobs = [self._knobs[i] for i in order]
            self._reasons = [self._reasons[i] for i in order]
            self._ordered = True
        lo, hi = bisect_left(self._steps, step), bisect_right(self._steps, step)
        proposals = [
            Proposal(self._groups[i], self._knobs[i], self._values[i], self._reasons[i], raw=True)
            for i in range(lo, hi)
        ]
        return proposals, list(self._olds[lo:hi])


class ReplayController:
    """Proposes, at each step, exactly the controller decisions the log holds for that step
    (``decided``); ``records``: the log's other records (guard events, notes, added groups).
    It keeps no state of its own: the log's decisions are its state."""

    name = "replay"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal
    #: its proposals are the log's values, which the policy passed in the run (``raw``); and a
    #: state the run's script loads, saved under the run's controller (a resume from its
    #: checkpoint, a fine-tune from a saved run), loads into it, since its decisions are the
    #: log's: refused as another controller's, the same script could not replay
    replays_log = True

    def __init__(
        self,
        records: list[dict[str, Any]],
        decided: Decided,
        passes: _Passes,
        corrects_rmsprop_warmup: bool = False,
    ) -> None:
        #: as the logged run did, which its manifest says (a run logged before the correction
        #: existed was not corrected)
        self.corrects_rmsprop_warmup = corrects_rmsprop_warmup
        self._passes = passes
        self._decided = decided
        self._restarts = {
            _number(r, "step", int): f"replay: {r['reason']}"
            for r in records
            if r.get("kind") == "guard" and r.get("event") == "restart"
        }
        self._step = 0
        #: the step after which the logged run added each param group beyond its first ones
        self.added = {
            _number(r, "group", int): _number(r, "step", int)
            for r in records
            if r.get("kind") == "group"
        }

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        self._step = signals.step
        if self._passes.thrown_away(signals.step):  # the log holds nothing of this pass
            return []
        proposals, olds = self._decided.at(signals.step)
        # a knob's first decision in the step is checked against the knobs in force; a later one
        # starts where an earlier one left it (a joint group's join, then the run's change)
        first: set[tuple[int, str]] = set()
        for p, old in zip(proposals, olds, strict=True):
            if p.group >= len(knobs):
                raise SelfTuneError(
                    f"replay: step {signals.step} holds a decision for param group {p.group}, "
                    f"and this optimizer has {len(knobs)} groups{_when(self.added, p.group)}: "
                    "add it with add_param_group where the run did"
                )
            if (p.group, p.knob) in first:
                continue
            first.add((p.group, p.knob))
            now = knobs[p.group].get(p.knob)
            if now != old:  # a knob set otherwise since: a scheduler missing, another one
                _left(signals.step, f"group {p.group}'s {p.knob} stood at {now!r}, not at {old!r}")
        return proposals

    def take_restart(self) -> str | None:
        """The logged restart of this step, if there was one."""
        if self._passes.thrown_away(self._step):
            return None
        return self._restarts.pop(self._step, None)

    def on_backoff(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads nothing: a state saved under the run's controller holds what made its
        decisions, and the log holds the decisions."""
        return None


class ReplayGuard(Guard):
    """Declares trouble exactly at the logged hold, skip, rollback and escalate steps, and
    nowhere else."""

    def __init__(self, config: GuardConfig, records: list[dict[str, Any]], passes: _Passes) -> None:
        super().__init__(config)
        self._passes = passes
        self._events = {
            _number(r, "step", int): Trouble(
                _number(r, "step", int),
                str(r["signal"]),
                _number(r, "value", float),
                f"replay: {r['reason']}",
                hold=r["event"] == "hold",
            )
            for r in records
            if r.get("kind") == "guard"
            and r.get("event") in ("hold", "skip", "rollback", "escalate")
        }
        #: the steps where the logged run's guard started its snapshots again after a state
        #: dict loaded without them: the replay drops its own there, so that its rollbacks and
        #: restarts go where the logged run's did
        self._resets = {
            _number(r, "snapshots_since", int)
            for r in records
            if r.get("kind") == "guard" and "snapshots_since" in r
        }
        #: the steps whose snapshot (or skip's cut) the logged run's guard did not keep, its
        #: controller having failed there: the replay's, whose controller does not, drops its
        #: own there, so that its rollbacks and relevels go where the logged run's did
        self._unkept = {
            _number(r, "unkept", int) for r in records if r.get("kind") == "note" and "unkept" in r
        }
        #: the snapshot each logged rollback went back to
        self._restored = {
            _number(r, "step", int): _number(r, "restored_step", int)
            for r in records
            if r.get("kind") == "guard" and "restored_step" in r
        }
        #: the logged GuardError message of each step where the guard gave up
        self._escalations = {
            _number(r, "step", int): str(r["reason"])
            for r in records
            if r.get("kind") == "guard" and r.get("event") == "escalate"
        }

    def begin_step(self, step: int) -> None:
        if step in self._resets and not self._passes.thrown_away(step):
            self.forget_snapshots()

    def keep(self, step: int, payload: dict[str, Any]) -> None:
        if step not in self._unkept or self._passes.thrown_away(step):
            super().keep(step, payload)

    def _forgive(self, skipped: Snapshot | None) -> None:
        if skipped is not None and skipped.step in self._unkept:
            skipped = None if not self._passes.thrown_away(skipped.step) else skipped
        super()._forgive(skipped)

    def judge(self, s: Signals) -> Trouble | None:
        # the levels the logged run's guard learnt: its snapshots' levels, and so where its
        # regressions went back to, follow from them
        last_hold = self.last_hold
        found = super().judge(s)
        escalation = self._passes.gave_up(s.step)  # in a pass a rewind threw away
        if escalation is not None:
            return escalation[0]
        if self._passes.thrown_away(s.step):  # whatever it met there, the log holds none of it
            return None
        logged = self._events.get(s.step)
        # the next steps judge by the logged run's holds, not this guard's own
        self.last_hold = s.step if logged is not None and logged.hold else last_hold
        if found is not None and logged is None and not math.isfinite(found.value):
            # the logged run had no trouble here, and every non-finite value is trouble: a
            # replay that trained on into it ended on non-finite weights without a word
            _left(s.step, f"its {found.signal} is {found.value}, where the logged run's was finite")
        return logged

    def rollback(self, trouble: Trouble) -> tuple[Snapshot | None, float]:
        """Raise the logged GuardError where the original run gave up, else roll back as it did.

        The original stopped there; a replay that rolled back instead (or trained on, as when
        only rollbacks were replayed) would go past the end of the run it reproduces.
        """
        escalation = self._passes.gave_up(trouble.step)
        message = self._escalations.get(trouble.step) if escalation is None else escalation[1]
        if message is not None:
            raise GuardError(message)
        snap, factor = super().rollback(trouble)
        logged = self._restored.get(trouble.step)
        if snap is not None and logged is not None and snap.step != logged:
            _left(trouble.step, f"it rolled back to step {snap.step}, the logged run to {logged}")
        return snap, factor


def replay(
    optimizer: Optimizers,
    log_dir: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
) -> SelfTuned:
    """An optimizer that re-applies the run logged in ``log_dir`` to ``optimizer`` (a list of
    optimizers, for a run that wrapped one: they are combined as it combined them).

    ``model``: the model, where the run was wrapped with one (``wrap(..., model=)``): its
    rollbacks put the model's buffers back, and so must the replay's.  Refuses (with
    :class:`~selftune.audit.LogError` or :class:`~selftune.SelfTuneError`) a log whose chain is
    broken or whose manifest does not match ``optimizer``'s param groups and knobs, or the model
    given (or not) with it.
    """
    with as_one(optimizer) as inner:
        return _replay(inner, log_dir, model)


def _replay(
    optimizer: torch.optim.Optimizer,
    log_dir: str | os.PathLike[str],
    model: torch.nn.Module | None,
) -> SelfTuned:
    """:func:`replay` of one optimizer (a list given is combined first)."""
    if isinstance(optimizer, SelfTuned):
        raise ConfigError(
            "replay got a selftune optimizer: pass the plain one it wraps (replay wraps it "
            "itself, with the logged run's settings)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"replay needs a torch.optim.Optimizer, got {type(optimizer).__name__}: build the "
            "optimizer as the logged run did, over the model's parameters"
        )
    # iter_log checks the manifest's keys and every record's fields besides the chain, as
    # verify does: a damaged log is refused as such, not failed below as a KeyError
    log = audit.iter_log(log_dir)
    decided = Decided()
    records: list[dict[str, Any]] = []  # guard events, notes and added groups: few, kept whole
    for record in log:
        if record["kind"] == "decision":
            decided.add(record)
        else:
            records.append(record)
    _check_matches(log.manifest, optimizer, log_dir)
    _warn_of_versions(log.manifest)
    config = log.manifest["config"]
    where = os.path.join(os.path.expanduser(os.fspath(log_dir)), audit.MANIFEST)
    if not isinstance(config, dict):
        raise audit.LogError(f"{where}: 'config' is a {type(config).__name__}, not an object")
    kind, ours = config.get("optimizer"), optimizer_name(optimizer)
    if kind is not None and kind != ours:
        raise SelfTuneError(
            f"{where}: the logged run stepped a {kind}, this optimizer is a {ours}: replay needs "
            "the optimizer built as in the logged run"
        )
    try:
        policy = _policy_from(config.get("policy"))
        guard_cfg = config.get("guard")
        guard_config = None if guard_cfg is None else GuardConfig(**guard_cfg)
        average = check_decay(config.get("average"))  # absent in logs from before averages
    # (LookupError: a bound that is no pair; ArithmeticError: a whole number past a float's
    # range, which JSON reads exactly: an edited manifest ended the replay in their tracebacks)
    except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
        raise audit.LogError(
            f"{where}: the policy, guard or average settings in 'config' cannot be read back "
            f"({exc}); "
            "the manifest was damaged or written by another version"
        ) from None
    passes = _Passes(records)
    controller = ReplayController(
        records, decided, passes, corrects_rmsprop_warmup=config.get("rmsprop_warmup") is True
    )
    guard: Any = False
    if guard_config is not None:
        guard = ReplayGuard(guard_config, records, passes)
    # before the wrap, which marks the optimizer wrapped: one refused, then built right, could
    # not be passed again
    groups = optimizer.param_groups
    knobs = [{n: knobs_io.read(g, n) for n in knobs_io.knob_names(g)} for g in groups]
    _check_start(config.get("start"), knobs, where)
    options = [group_options(g, optimizer) for g in groups]
    _check_options(config.get("options"), options, where)
    _check_model(config.get("model_buffers"), model, where)
    _warn_of_model_changed(records)
    tuned = SelfTuned(
        optimizer, controller, policy=policy, guard=False, average=average or False, model=model
    )
    tuned.guard = guard if guard is not False else None
    passes.made = lambda: tuned.rewinds
    tuned._at_close.append(lambda: _tell_end(passes, tuned.step_count))
    tuned.add_listener(_FollowsTrace(log_dir, controller.added, passes))
    return tuned


def _tell_end(passes: _Passes, step: int) -> None:
    """Say where a replay is closed at ``step``, inside steps its logged run threw away by a
    rewind the replay has not made (its script stopped early): the log holds nothing of those
    steps (the run's decisions and rollbacks there went with the load that cut them), so the
    replay decided nothing there, and its weights may be none the run had.  A replay closed
    anywhere else ends on the run's weights at that step, and is told nothing."""
    inside = passes.ended_inside(step)
    if inside is None:
        return
    at, furthest = inside
    steps = f"step {furthest}" if furthest == at + 1 else f"steps {at + 1}-{furthest}"
    warnings.warn(
        f"replay: closed at step {step}, inside {steps} that the logged run threw away (it went "
        f"back from step {furthest} to step {at}): the log holds nothing of them, so these "
        "weights may not be any the run had; run the replay on past that rewind, as the run did",
        stacklevel=outside_frames(),
    )


def _warn_of_versions(manifest: dict[str, Any]) -> None:
    """Say, once, which versions the logged run ran under that this replay does not: another
    torch's kernels may round otherwise, and the weights then differ from the run's in the last
    bits (the knobs are the log's all the same, checked at every step)."""
    running = audit.running_versions()
    differ = [k for k, v in running.items() if k in manifest and manifest[k] != v]
    if differ:
        then = ", ".join(f"{k} {manifest[k]}" for k in differ)
        now = ", ".join(f"{k} {running[k]}" for k in differ)
        warnings.warn(
            f"replay: the logged run ran under {then}, this replay under {now}: their kernels "
            "may round otherwise, and the weights then not be the run's to the bit",
            stacklevel=outside_frames(),
        )


def _warn_of_model_changed(records: list[dict[str, Any]]) -> None:
    """Say where the run was resumed with ``model=`` given where its start had none, or none
    where it had one: the replay follows the first manifest, and its rollbacks after that
    step may put back other buffers than the run's (a Lightning or Trainer run begun before
    the integrations passed the model, resumed after)."""
    for record in records:
        reason = str(record.get("reason", "")) if record.get("kind") == "note" else ""
        if audit.CHANGED_MANIFEST in reason and "model_buffers" in reason:
            warnings.warn(
                f"replay: the logged run was resumed with model= changed (the log's note at "
                f"seq {record.get('seq')}): the replay puts the model's buffers back as the "
                "run's first wrap did, so after that resume a rollback's buffers may not be "
                "the run's",
                stacklevel=outside_frames(),
            )
            return


def _check_model(logged: Any, model: torch.nn.Module | None, where: str) -> None:
    """The model is given where the run had one, with as many buffers: its rollbacks put them
    back, and a replay that did not would go on from other running statistics."""
    if logged is None and model is not None:
        raise ConfigError(
            f"{where}: the logged run was wrapped without a model (its rollbacks left the "
            "model's buffers as they were), so pass none to replay"
        )
    if logged is None:
        return
    if model is None:
        raise ConfigError(
            f"{where}: the logged run was wrapped with its model (its rollbacks put the model's "
            f"{logged} buffers back): pass it, replay(optimizer, log_dir, model=model)"
        )
    count = len(list(model.buffers()))
    if count != logged:
        raise SelfTuneError(
            f"{where}: the logged run's model had {logged} buffers, this one has {count}: "
            "replay needs the model built as in the logged run"
        )


class _Passes:
    """Which of the replay's steps the logged run threw away, and left no record of.

    A script that rewinds in its own process (loads a state into the optimizer that stepped
    past it) runs some steps twice; the load cut the records of the first pass, and the steps
    after it hold their numbers in the log and the trace.  The run noted each rewind
    (``rewound_from``), numbered; the replay, running the same script, makes the same ones, and
    until it has made a logged one, the steps that rewind went back over are a pass the log
    holds nothing of: nothing is decided or checked there.  A rewind that a later one cut from
    the log leaves a gap in the numbers, which the replay's own pass through (a log written
    before the notes were numbered is matched in order, by step and reach).  Where the run's
    guard gave up in a pass (a retry after GuardError), the note of the rewind that ended it,
    or of the one that cut that note, holds the escalate record, and the replay raises the same
    GuardError there, in the pass of that number alone.
    """

    def __init__(self, records: list[dict[str, Any]]) -> None:
        notes = [r for r in records if r.get("kind") == "note" and "rewound_from" in r]
        reach = [(_number(r, "step", int), _number(r, "rewound_from", int)) for r in notes]
        #: the run's rewinds by number: the step it went back to and the furthest step taken
        pairs = list(zip(notes, reach, strict=True))
        self._logged = {_number(r, "rewind", int): e for r, e in pairs if "rewind" in r}
        #: those of a log written before they were numbered, in order, until the replay's match
        self._unnumbered = [e for r, e in pairs if "rewind" not in r]
        #: where the guard gave up in the pass each numbered rewind ended, as the replay raises it
        self._escalations = {n: e for r in notes for n, e in _escalations(r)}
        #: the replay's own rewinds so far, in order (its optimizer's, once it is built)
        self.made: Callable[[], Sequence[tuple[int, int, int]]] = tuple
        self._read = 0  # of the replay's rewinds, those already matched
        #: what the replay has still to meet: the run's rewinds it has not made, in order, and
        #: where the guard gave up in the pass it is in; read again after each of its rewinds
        self._pending = [e for _, e in sorted(self._logged.items())] + self._unnumbered
        self._escalation = self._escalations.get(1)

    def thrown_away(self, step: int) -> bool:
        """Whether ``step``, in the replay's pass now, is one a logged rewind went back over,
        or the one where the run's guard gave up in this pass; raises where the replay has
        stepped past where the run rewound, or rewound elsewhere."""
        if self.gave_up(step) is not None:
            return True
        pending = self._pending
        if pending and step > pending[0][1]:
            _left(
                step,
                f"the logged run had gone back from step {pending[0][1]} to step "
                f"{pending[0][0]} (a state loaded into its optimizer), and the replay has not",
            )
        return self.ended_inside(step) is not None

    def ended_inside(self, step: int) -> tuple[int, int] | None:
        """The run's rewind (the step it went back to, the furthest step it had taken) whose
        thrown-away steps hold ``step``, in the replay's pass now (it has not made that rewind):
        where it steps there, and where it is closed there."""
        self._catch_up()
        return next(((at, far) for at, far in self._pending if at < step <= far), None)

    def gave_up(self, step: int) -> tuple[Trouble, str] | None:
        """The trouble and GuardError message where the run's guard gave up at ``step`` in the
        pass the replay is in, which a rewind since threw away."""
        self._catch_up()
        escalation = self._escalation
        return escalation if escalation is not None and escalation[0].step == step else None

    def _catch_up(self) -> None:
        """Match the rewinds the replay has made since the last call with the run's."""
        made = self.made()
        if len(made) == self._read:  # (every call but the one after a rewind)
            return
        for number, at, furthest in made[self._read :]:
            if self._unnumbered and self._unnumbered[0] == (at, furthest):
                self._logged[number] = self._unnumbered.pop(0)
            logged = self._logged.get(number)
            if logged is not None and logged != (at, furthest):
                _left(
                    furthest,
                    f"the replay went back to step {at} (its rewind {number}), the logged run "
                    f"from step {logged[1]} to step {logged[0]}",
                )
            done = number
        self._read = len(made)
        self._pending = [e for n, e in sorted(self._logged.items()) if n > done]
        self._pending += self._unnumbered
        self._escalation = self._escalations.get(done + 1)


def _escalations(note: dict[str, Any]) -> list[tuple[int, tuple[Trouble, str]]]:
    """A rewind note's records of the guard giving up (``gave_up``), by the number of the
    rewind that ended each one's pass, as the replay raises them."""
    gave_up = note.get("gave_up", [])
    if not isinstance(gave_up, list) or not all(isinstance(e, dict) for e in gave_up):
        raise audit.LogError(
            f"record seq {note.get('seq')}: gave_up is {gave_up!r}, not a list of objects; the "
            "log was damaged or written by another version"
        )
    found = []
    for entry in gave_up:
        e = {**entry, "seq": note.get("seq")}  # (an error names the note)
        reason = str(e.get("reason"))
        step, value = _number(e, "step", int), _number(e, "value", float)
        trouble = Trouble(step, str(e.get("signal")), value, f"replay: {reason}")
        found.append((_number(e, "rewind", int), (trouble, reason)))
    return found


class _FollowsTrace:
    """Stops a replay whose knobs after a step differ from those the run's trace holds, and
    says once where its loss first differs from the logged one.

    The loss is told, not refused: the knobs replay as logged whatever the data, so a replay
    on other data (or on a machine whose kernels round otherwise) ran to its end on other
    weights with no word; a loss the same to the bit is the check the knobs cannot give.

    The trace is read as the replay goes, one row at a time (a long run's trace held whole
    took hundreds of megabytes, on every rank), and again from its start where the replay
    rewinds; the steps a logged rewind threw away are left out (:class:`_Passes`).
    """

    def __init__(
        self, log_dir: str | os.PathLike[str], added: dict[int, int], passes: _Passes
    ) -> None:
        self._folder = Path(os.path.expanduser(os.fspath(log_dir)))
        self._added = added
        self._passes = passes
        self._rows: Iterator[tuple[int, dict[str, Any]]] | None = None
        self._at = 0  # the step of the last row read
        self._row: dict[str, Any] = {}  # that row
        self._damaged = False  # a damaged row ends the check, told once
        self._loss_told = False  # the first loss that differs from the logged one, told once

    def __call__(self, event: StepEvent) -> None:
        if self._passes.thrown_away(event.step):
            return
        row = self._find(event.step)
        if row is None:  # past the trace's end, a folder without one, or a damaged one
            return
        logged = row["hp"]
        if len(event.hyperparams) < len(logged):
            missing = len(event.hyperparams)
            raise SelfTuneError(
                f"replay: after step {event.step} the logged run had {len(logged)} param "
                f"groups, and this optimizer has {missing}{_when(self._added, missing)}: add "
                f"param group {missing} with add_param_group where the run did"
            )
        now, then = json.dumps(event.hyperparams), json.dumps(logged)
        if now != then:
            _left(event.step, f"the knobs after it are {now}, the logged run's were {then}")
        was = row.get("loss")
        if not self._loss_told and not _same_loss(event.loss, was):
            self._loss_told = True
            warnings.warn(
                f"replay: at step {event.step} the loss is {event.loss!r}, the logged run's was "
                f"{was!r}: the data, the model or the machine (its kernels' rounding) differ, "
                "so the weights will not be the run's to the bit; the logged decisions are "
                "applied on (said once)",
                stacklevel=outside_frames(),
            )

    def _find(self, step: int) -> dict[str, Any] | None:
        """The trace's row of ``step``, read forward from the last one (again from the start
        for a step before it: a replay that rewinds)."""
        if self._damaged:
            return None
        if self._rows is None or step < self._at:
            self._rows, self._at, self._row = self._read(), 0, {}
        while self._at < step:
            row = next(self._rows, None)
            if row is None:  # its end: nothing further to check, until a rewind
                return None
            self._at, self._row = row
        return self._row if self._at == step else None

    def _read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The trace's complete rows in order, by step; a damaged one is told of, and ends the
        check (the trace has no chain: the log alone is the record)."""
        try:
            for row in iter_trace(self._folder):
                yield row["step"], row
        except audit.LogError as err:
            self._damaged = True
            warnings.warn(f"replay checks the logged decisions alone: {err}", stacklevel=5)


def _same_loss(loss: float | None, logged: Any) -> bool:
    """Whether a step's loss is the logged one (a non-finite one is logged as its text); one
    not given on either side is no difference: a replay may step without it."""
    was = as_float(logged)  # (None too for a trace's own damage: not the replay's to judge)
    if loss is None or was is None:
        return True
    return loss == was or (math.isnan(loss) and math.isnan(was))


def _when(added: dict[int, int], group: int) -> str:
    """Where the logged run added param group ``group``, if its log says."""
    step = added.get(group)
    return "" if step is None else f"; the logged run added param group {group} after step {step}"


def _left(step: int, what: str) -> None:
    """Refuse a replay that has left the logged run, naming the step and what differs."""
    raise SelfTuneError(
        f"replay: at step {step} {what}: the replay has left the logged run, and its weights "
        "would not be the run's. Replay with the code, data order, scheduler and settings of "
        "the run (a resume with other settings, such as another GuardConfig, is not replayed)"
    )


def _check_start(logged: Any, own: list[dict[str, float]], where: str) -> None:
    """Refuse an optimizer built with other starting knobs than the logged run's (logs that
    record none are not checked): its decisions would replay onto other rates, silently."""
    if logged is None or logged == own:
        return
    raise SelfTuneError(
        f"{where}: the logged run's optimizer started with {logged}, this one with {own}; "
        "replay needs the optimizer built as in the logged run (same lr, momentum, betas)"
    )


def _check_options(logged: Any, own: list[dict[str, Any]], where: str) -> None:
    """Refuse an optimizer built with other settings than the logged run's (weight decay, eps,
    nesterov, ...; logs that record none are not checked): it ends on other weights, silently.
    A list that holds something else than objects is a damaged manifest (it ended the replay
    in an AttributeError)."""
    if not isinstance(logged, list) or logged == own:
        return
    if not all(isinstance(then, dict) for then in logged):
        raise audit.LogError(
            f"{where}: 'config.options' is {logged!r:.80}, not a list of objects (one a param "
            "group): the manifest was damaged or written by another version"
        )
    for i, (then, now) in enumerate(zip(logged, own, strict=False)):
        # keys both torch versions have: a setting a newer torch added is no difference
        differ = sorted(k for k in then.keys() & now.keys() if then[k] != now[k])
        if differ:
            pairs = ", ".join(f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in differ)
            raise SelfTuneError(
                f"{where}: param group {i} was built with other settings than the logged run's "
                f"({pairs}); replay needs the optimizer built as in the logged run"
            )


def _check_matches(manifest: dict[str, Any], optimizer: torch.optim.Optimizer, where: Any) -> None:
    logged = manifest.get("param_groups", [])
    groups = optimizer.param_groups
    if len(logged) != len(groups):
        raise SelfTuneError(
            f"{where}: the log is of a run with {len(logged)} param groups, this optimizer has "
            f"{len(groups)}; replay needs the optimizer built as in the logged run"
        )
    for i, (entry, group) in enumerate(zip(logged, groups, strict=True)):
        knobs = list(knobs_io.knob_names(group))
        count = sum(p.numel() for p in group["params"])
        if list(entry.get("knobs", [])) != knobs or entry.get("num_params") != count:
            raise SelfTuneError(
                f"{where}: param group {i} does not match the log (logged knobs "
                f"{entry.get('knobs')} and {entry.get('num_params')} parameters; this optimizer "
                f"{knobs} and {count}); replay needs the same model and optimizer"
            )
    params = [p for g in groups for p in g["params"]]
    logged_hash = manifest.get("initial_params_sha256")
    # the whole model's hash, from every rank's shard (a collective): every rank refuses alike
    if logged_hash is not None and whole_sha256(audit.params_sha256(params)) != logged_hash:
        raise SelfTuneError(
            f"{where}: the model's parameters differ from those the logged run started from "
            "(initial_params_sha256); replay the run from the same initialisation (same seed, "
            "same checkpoint) and call replay before the first step"
        )


def _number(record: dict[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    """``record[key]`` as an int or float ("nan" and "inf" are how the log stores those)."""
    value: Any = record.get(key)  # (missing: None, refused as any other)
    try:
        if isinstance(value, bool) or (kind is int and not isinstance(value, int)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # (a whole number past a float's range)
        raise audit.LogError(
            f"record seq {record.get('seq')}: {key} is {value!r}, not a number; the log was "
            "damaged or written by another version"
        ) from None


def _policy_from(saved: dict[str, Any] | None) -> Policy:
    if saved is None:
        return Policy()
    return Policy(
        bounds={k: (float(v[0]), float(v[1])) for k, v in saved["bounds"].items()},
        max_change=dict(saved["max_change"]),
        frozen=frozenset(saved["frozen"]),
        lr_bounds_absolute=bool(saved["lr_bounds_absolute"]),
    )
