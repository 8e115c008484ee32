"""TensorBoard: write selftune's knobs, loss and decisions with ``opt.add_listener``.

>>> opt.add_listener(TensorBoardWriter("runs/tb"))          # or an existing SummaryWriter

Scalars ``selftune/group{i}/{knob}`` (the *effective* values: the learning rate includes
selftune's scale on top of any scheduler) and ``selftune/loss`` every ``every`` steps, and
``selftune/metric`` at each step that read a metric given to ``observe``; each decision and
guard event as text under ``selftune/decisions`` and ``selftune/guard``, with the reason in
words, at the step it was made.  Uses ``torch.utils.tensorboard``, which needs the
``tensorboard`` package.

A writer that owns its folder hides what a resume redoes, as the run folder's log cuts it: one
made at a step past the first (a run resumed from a checkpoint into the same folder) purges
the folder's points from that step on, and a step that goes back (a state loaded into the same
optimizer) purges from there, so TensorBoard draws each step once, the run's own.  A writer
shared with the rest of the training is left as given: its owner purges its points on a resume
(``SummaryWriter(purge_step=...)``), since a purge hides every tag of the folder.  For that
reason the writers of a process that own one folder (several optimizers', each with its
``prefix``) share one ``SummaryWriter``, and one purges only where no purge since its last point
hid the steps it redoes: each purging at a resume's first step, the second hid the first's
points since, and that optimizer's resumed steps were not drawn.

A writer follows one optimizer, as it reads a step that goes back as a rewind of that one:
added to a second (another optimizer of the model, or a new run after the first closed) it
is refused there, before the second's first step.  That one's steps, from 1 again, were
drawn under the same names and purged the first's points.  Each optimizer gets a writer of
its own, with its own ``prefix`` or folder, and a run resumed in a new process a new writer
over the same folder, which purges the steps it redoes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from selftune.integrations import needs

with needs("tensorboard"):
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from torch.utils.tensorboard import SummaryWriter

from selftune.errors import ConfigError
from selftune.integrations.events import (
    FollowsOne,
    check_writer_options,
    describe,
    describe_guard,
    event_metric,
)
from selftune.tuner import StepEvent, is_rank_zero


def _check_folder(folder: Path) -> None:
    """Refuse a folder that cannot be made, now: the writer makes it at the first step, after
    that step's update and record, and a mistyped path then failed a run whose folder already
    held its first step (a script run again was refused it).  Nothing is made here, and on no
    rank (which rank writes is known at the first step)."""
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(
            f"TensorBoardWriter({str(folder)!r}): {nearest} is a file, so no folder can be made "
            "there; give the path of a folder"
        )
    if not os.access(nearest, os.W_OK):
        raise ConfigError(f"TensorBoardWriter({str(folder)!r}): {nearest} is not writable")


class _Folder:
    """The ``SummaryWriter`` of a folder, shared by the writers of this process that own it,
    and the steps purged from in it, in order (see the module docstring)."""

    def __init__(self, path: Path, purge: int | None) -> None:
        self.path, self.writer = path, SummaryWriter(str(path), purge_step=purge)
        self.purges: list[int] = [] if purge is None else [purge]
        self.users = 0

    def purge(self, step: int, seen: int) -> None:
        """Hide the folder's points from ``step`` on, unless a purge after the first ``seen``
        (those before a writer's last point) already hid that writer's points there."""
        if min(self.purges[seen:], default=step + 1) <= step:
            return
        # (the file writer as add_scalar gets it: made again after close)
        start = SessionLog(status=SessionLog.START)
        event = Event(wall_time=time.time(), step=step, session_log=start)
        self.writer._get_file_writer().add_event(event)
        self.purges.append(step)


#: the folders the writers of this process own, by their absolute path
_FOLDERS: dict[Path, _Folder] = {}


class TensorBoardWriter(FollowsOne):
    """A listener that writes every step's knobs and loss, and every decision, to TensorBoard.

    ``writer_or_logdir``: a ``SummaryWriter`` (shared with the rest of the training's scalars)
    or a folder for a new one, which this writer then owns, with the other writers of this
    process over that folder, and closes in :meth:`close` (the last of them to close does).
    ``every``: write the knobs and the loss every this many steps (each decision's text, the
    guard's events and the metric at the steps that have them).
    """

    def __init__(
        self,
        writer_or_logdir: SummaryWriter | str | Path,
        *,
        prefix: str = "selftune",
        every: int = 1,
    ) -> None:
        check_writer_options(every=every)
        if not isinstance(writer_or_logdir, SummaryWriter):
            # "~" expanded, as selftune.wrap's log_dir: SummaryWriter makes a folder named "~"
            # under the working directory, beside the home folder checked here
            writer_or_logdir = Path(writer_or_logdir).expanduser()
            _check_folder(writer_or_logdir)
        #: the writer in use: None before the first event, and on ranks other than 0
        self.writer: SummaryWriter | None = None
        self._target, self._resolved = writer_or_logdir, False
        self._folder: _Folder | None = None  # the folder's, if this writer owns one
        self._seen = 0  # the folder's purges made before this writer's last point
        self._released = False  # by close: the folder's writer is closed with its last user
        self.prefix, self.every = prefix, every
        self._last = 0  # the last step written

    def _place(self) -> str:
        target = self._target
        return repr(target.log_dir if isinstance(target, SummaryWriter) else str(target))

    def _resolve(self, step: int) -> SummaryWriter | None:
        """The writer, decided at the first event: on rank 0 only under torch.distributed, as
        the run folder is written (a DDP script adds its writers on every rank, and each wrote
        the whole run again), and not before, since a writer built before the process group
        exists (a Lightning callback's, built before the Trainer starts its processes) took
        every rank for rank 0."""
        if not self._resolved:  # resolved once made: a folder that failed fails again
            if is_rank_zero() and isinstance(self._target, SummaryWriter):
                self.writer = self._target
            elif is_rank_zero():  # a resume's first step purges the steps the run redoes
                assert isinstance(self._target, Path)
                key = self._target.resolve()
                if key not in _FOLDERS:
                    _FOLDERS[key] = _Folder(key, step if step > 1 else None)
                self._folder = _FOLDERS[key]
                self._folder.users += 1
                self.writer = self._folder.writer
            self._resolved = True
        return self.writer

    def __call__(self, event: StepEvent) -> None:
        w, step = self._resolve(event.step), event.step
        if w is None:
            return
        redone = step <= self._last or (self._last == 0 and step > 1)  # a rewind, a resume
        if self._folder is not None and redone:
            self._folder.purge(step, self._seen)
        self._last = step
        # every ``every`` steps only: ``auto`` decides at most steps, and a condition on
        # decisions wrote every step whatever ``every`` was
        if step % self.every == 0:
            for i, knobs in enumerate(event.hyperparams):
                for name, value in knobs.items():
                    w.add_scalar(f"{self.prefix}/group{i}/{name}", value, step)
            if event.loss is not None and math.isfinite(event.loss):
                w.add_scalar(f"{self.prefix}/loss", event.loss, step)
        if (metric := event_metric(event)) is not None:
            w.add_scalar(f"{self.prefix}/metric", metric, step)
        if event.decisions:
            w.add_text(
                f"{self.prefix}/decisions", "  \n".join(describe(d) for d in event.decisions), step
            )
        if event.guard_events:  # each of the step's guard records (a relevel, then a restart)
            said = "  \n".join(describe_guard(step, g) for g in event.guard_events)
            w.add_text(f"{self.prefix}/guard", said, step)
        if self._folder is not None:
            self._seen = len(self._folder.purges)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush; close the ``SummaryWriter`` too if this writer made it (with the last writer
        of this process that owns its folder)."""
        if self.writer is None:
            return
        self.writer.flush()
        if self._folder is not None and not self._released:
            self._released, self._folder.users = True, self._folder.users - 1
            if self._folder.users == 0:
                self.writer.close()
                if _FOLDERS.get(self._folder.path) is self._folder:
                    del _FOLDERS[self._folder.path]
