"""MLflow: log selftune's knobs, loss and decisions with ``opt.add_listener``.

>>> with mlflow.start_run():
...     writer = MLflowWriter()
...     opt.add_listener(writer)
...     train()
...     writer.close()

Metrics ``selftune/group{i}/{knob}`` (effective values) and ``selftune/loss`` every ``every``
steps, and ``selftune/metric`` at each step that read a metric given to ``observe``, in one
``log_batch`` call per step, plus ``selftune/decisions``, the running count of decisions and
guard events, at each step that had one.  The decisions themselves, with their reasons and
signals, go to the artifacts ``selftune/decisions/00000.jsonl``, ``00001.jsonl``, ... of
:data:`PART_ROWS` rows each (concatenated in name order: the run folder's rows, in the MLflow
run), the latest decision to the tag ``selftune.last_decision`` and the latest guard event to
``selftune.last_guard_event``.

The writer logs by run id through an ``MlflowClient`` and never touches MLflow's stack of
active runs: a run it starts is not made active, so ``mlflow.start_run()`` beside it starts
the user's own run, and ``mlflow.log_metric`` goes to the user's run, never to the writer's
(:attr:`MLflowWriter.run_id` names that one).  A run the user has active stays theirs: the
writer logs into it and leaves it active, and the stack is as the user left it throughout.

The writers of a process given no run that find none active (a GAN's generator's and
discriminator's, each with its ``prefix``) share the run the first of them started, as they
share a run the user has active; each started a run of its own, and one training was split
across two runs.  The last of them to close ends it, FAILED (KILLED) if any of them closed
while an error was handled.  Sharing ends with the run: writers made once all of its writers
closed (a notebook's next training) start a run of their own.  So does a writer whose
``prefix`` one of the run's writers took, and the writers after it share that run: the two
would write the same names into one run (each optimizer's step 1 again), and the run is
chosen at the first step, too late to refuse the writer without breaking off the training.

A writer given a run that already holds parts (a run resumed from a checkpoint into the same
MLflow run) continues them: its rows follow the ones uploaded, in the last part or the next
one, and the count goes on from theirs.  What was uploaded stays, as MLflow keeps every metric
logged: after a resume from a checkpoint older than the last step uploaded, the rows uploaded
past the checkpoint stay and the resumed run's rows of the same steps follow them, so those
steps appear twice (the count counts both) and the steps go back where the resume began.  The
run folder's ``decisions.jsonl`` cut those rows (a note says how many): it holds the second
pass's only, and it is the record ``verify`` and ``replay`` read.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selftune.audit import canonical
from selftune.errors import ConfigError
from selftune.integrations import needs

with needs("mlflow"):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import fluent
    from mlflow.tracking.context.registry import resolve_tags

from selftune.integrations.events import (
    FollowsOne,
    check_writer_options,
    describe,
    event_metric,
)
from selftune.tuner import StepEvent, is_rank_zero

#: rows per part of the decisions artifact.  A part is rewritten at each flush while it fills
#: and never after, so the bytes uploaded grow with the decisions; one file rewritten at each
#: flush grew with their square, and ``auto`` decides at most steps of a run.
PART_ROWS = 1000

_PART_NAME = re.compile(r"\d{5}\.jsonl")


def _experiment_id() -> str:
    """The experiment ``mlflow.start_run()`` would start a run in: ``set_experiment``'s, else
    ``MLFLOW_EXPERIMENT_ID``'s or ``MLFLOW_EXPERIMENT_NAME``'s, else the default one.

    MLflow reads the first with a private function alone; an MLflow without it still gets the
    environment's choice rather than an ImportError of the whole integration.
    """
    private = getattr(fluent, "_get_experiment_id", None)
    if private is not None:
        return str(private() or "0")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    found = mlflow.get_experiment_by_name(name) if name else None
    return found.experiment_id if found else os.environ.get("MLFLOW_EXPERIMENT_ID", "0")


class _Started:
    """A run the writers of this process started, shared by those of them given no run that
    find none active, each under its prefix (see the module docstring), and ended by the
    last of them to close."""

    def __init__(self, key: tuple[str, str], run_id: str) -> None:
        self.key, self.run_id = key, run_id
        #: of every writer that logged into it, closed or not: a closed writer's points stay
        self.prefixes: set[str] = set()
        self.users = 0  # the writers using it that have not closed
        self.status = "FINISHED"  # FAILED (KILLED) once a writer closed while an error was handled


#: the run the writers of this process started last, by tracking URI and experiment, while one
#: of its writers is open (a writer given another store or experiment gets a run there)
_STARTED: dict[tuple[str, str], _Started] = {}


class MLflowWriter(FollowsOne):
    """A listener that logs selftune's knobs, loss and decisions to an MLflow run.

    ``run``: a run id, an ``mlflow.entities.Run``, or ``None`` for the run active at the first
    step (the innermost: a nested run the training runs in, not its parent), else the one
    active when the writer was built, else the one ``MLFLOW_RUN_ID`` names (as
    ``mlflow.start_run()`` takes it: ``mlflow run`` sets it), else one started then, in the
    experiment and with the tags ``mlflow.start_run()`` gives, but never made active, and
    ended in :meth:`close` (or at the interpreter's exit, as MLflow ends its active runs).
    The writers of this process that find no run share the run the first of them started, one
    ``prefix`` each, and the last of them to close ends it (see the module docstring).  Only a
    run the writers started is ended by them.
    ``every``: log the knobs and the
    loss every this many steps (the decisions' count and the metric at the steps that have
    them).  ``prefix``: the first part of every metric's, tag's and artifact's name.
    ``flush_every``: write the decisions artifact's open part after this many new decisions
    (and at :meth:`close`): a run that dies before ``close`` loses up to that many from the
    artifact (the run folder's log keeps them all).  Only the open part is held in memory.
    A run that already holds decision parts under ``prefix`` is continued (see the module
    docstring): its last part is read back at the first step.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        prefix: str = "selftune",
        every: int = 1,
        flush_every: int = 50,
        client: MlflowClient | None = None,
    ) -> None:
        check_writer_options(every=every, flush_every=flush_every)
        if isinstance(run, os.PathLike) or (isinstance(run, str) and any(c in run for c in "/\\~")):
            # a folder, as TensorBoardWriter takes: read as a run id, which failed at the first
            # step, inside MLflow, after that step was recorded
            raise ConfigError(
                f"MLflowWriter(run={str(run)!r}): run takes an MLflow run or its id, not a "
                "folder; the store is MLflow's tracking URI: mlflow.set_tracking_uri(...) "
                "or MLFLOW_TRACKING_URI, with run left out (a run is started at the first step)"
            )
        #: the run the writers started that this one logs into, until it closes
        self._started: _Started | None = None
        #: the run given, else None: the run active at the first event is taken then
        self._run = run
        #: the run active now (no store is touched to read it), taken at the first event if no
        #: run is active then (a process the training was handed to, as Lightning's
        #: ddp_spawn's, has no active run of its own)
        self._built_in = None if run is not None else mlflow.active_run()
        self._client = client
        #: decided at the first event: False on a rank other than 0 under torch.distributed, as
        #: the run folder is written (no run started, nothing logged, no store touched)
        self.active: bool | None = None
        #: the run logged to, and the client, from the first event on rank 0
        self.run_id: str | None = None
        self.client: MlflowClient | None = None
        self.prefix, self.every, self.flush_every = prefix, every, flush_every
        #: decisions and guard events so far (the artifact's rows)
        self.count = 0
        self._part: list[str] = []  # the lines of the part still filling, as uploaded
        self._parts_done = 0  # parts written full, never written again
        self._unflushed = 0

    def _place(self) -> str:
        run = self._run if self._run is not None else self._built_in
        given = run if run is None or isinstance(run, str) else run.info.run_id
        return f"run {self.run_id or given or 'to be started'!r}, prefix {self.prefix!r}"

    def _start(self) -> bool:
        """Whether this process logs, decided at the first event, where the run and the client
        are made too.  Decided when built, a writer built before the process group existed (a
        Lightning callback's) took every rank for rank 0 and each logged a run of its own; and
        every rank's client made MLflow's default store at once, whose setup then failed."""
        if self.active is None:  # decided once made: a start that failed is tried again
            active = is_rank_zero()
            if active:
                # the run active at the first step before the one active when built: a writer
                # built in a parent run logged into the parent while the training, and the
                # metrics it logged, ran in a nested run started since
                run = self._run
                if self._started is not None:  # joined by a try that failed
                    run = self._started.run_id
                if run is None:
                    run = mlflow.active_run() or self._built_in or os.environ.get("MLFLOW_RUN_ID")
                self.client = self._client if self._client is not None else MlflowClient()
                if not run:
                    run = self._join().run_id
                self.run_id = run if isinstance(run, str) else run.info.run_id
                self._continue_parts()
            self.active = active
        return self.active

    def _join(self) -> _Started:
        """Take the run the writers of this process started, if open and this writer's prefix
        is free in it, else start one: not with mlflow.start_run(), whose run stays active
        until ended, and the user's own start_run() beside the writer failed ("already
        active")."""
        assert self.client is not None
        # set_experiment's, MLFLOW_EXPERIMENT_NAME's...: no public reader but start_run's
        experiment = _experiment_id()
        key = (self.client.tracking_uri, experiment)
        started = _STARTED.get(key)
        if started is None or self.prefix in started.prefixes:
            tags = resolve_tags()  # as start_run's: source, user, git commit
            run = self.client.create_run(experiment, tags=tags)
            started = _STARTED[key] = _Started(key, run.info.run_id)
        started.prefixes.add(self.prefix)
        started.users += 1
        self._started = started
        atexit.register(self._close_at_exit)  # as MLflow ends the runs start_run left active
        return started

    def _continue_parts(self) -> None:
        """Go on after the decision parts the run already holds: a resume into the same run
        started at part 0 with a count of 0, and its first flush overwrote the rows uploaded
        before it.  Full parts are counted, not read (each holds :data:`PART_ROWS` rows); the
        last is read back, to be written again with the new rows after its own."""
        assert self.client is not None and self.run_id is not None
        folder = f"{self.prefix}/decisions"
        names = [
            Path(f.path).name
            for f in self.client.list_artifacts(self.run_id, folder)
            if not f.is_dir and _PART_NAME.fullmatch(Path(f.path).name)
        ]
        if not names:
            return
        last = max(names)
        with tempfile.TemporaryDirectory() as into:
            local = self.client.download_artifacts(self.run_id, f"{folder}/{last}", into)
            lines = [line for line in Path(local).read_text().splitlines() if line]
        index = int(last[:5])
        self.count = index * PART_ROWS + len(lines)
        if len(lines) >= PART_ROWS:
            self._parts_done = index + 1
        else:
            self._parts_done, self._part = index, lines

    def __call__(self, event: StepEvent) -> None:
        if not self._start():
            return
        assert self.client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics: list[Metric] = []
        # the knobs every ``every`` steps only: ``auto`` decides at most steps, and a condition
        # on decisions wrote every step whatever ``every`` was
        if event.step % self.every == 0:
            for i, knobs in enumerate(event.hyperparams):
                metrics += [
                    Metric(f"{self.prefix}/group{i}/{name}", float(v), now, event.step)
                    for name, v in knobs.items()
                ]
            if event.loss is not None and math.isfinite(event.loss):
                metrics.append(Metric(f"{self.prefix}/loss", float(event.loss), now, event.step))
        if (metric := event_metric(event)) is not None:
            metrics.append(Metric(f"{self.prefix}/metric", metric, now, event.step))
        tags: list[RunTag] = []
        rows = [{**dataclasses.asdict(d), "text": describe(d)} for d in event.decisions]
        if event.decisions:
            tags = [RunTag(f"{self.prefix}.last_decision", describe(event.decisions[-1])[:5000])]
        if event.guard_events:  # each of the step's guard records, as the log holds them
            rows += [{"step": event.step, "kind": "guard", **g} for g in event.guard_events]
            tag = canonical(rows[-1]).decode()  # a NaN as "nan", as the log holds it: valid JSON
            tags.append(RunTag(f"{self.prefix}.last_guard_event", tag[:5000]))
        if rows:
            self.count += len(rows)
            metrics.append(Metric(f"{self.prefix}/decisions", float(self.count), now, event.step))
        if metrics or tags:  # MLflow's client splits a batch past its limit (a rate per layer)
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        for row in rows:  # a part ends at PART_ROWS whatever a step brings (a rate per layer)
            self._part.append(canonical(row).decode())
            self._unflushed += 1
            if len(self._part) >= PART_ROWS:
                self.flush()
        if self._unflushed >= self.flush_every:  # once a step: a step's rows go up together
            self.flush()

    def flush(self) -> None:
        """Write the part of the decisions artifact still filling (``<prefix>/decisions/``)."""
        if not self.active or not self._part:
            return
        assert self.client is not None and self.run_id is not None
        part, index = self._part, self._parts_done
        if len(part) >= PART_ROWS:  # full: the next rows start the next part, even if this
            self._part, self._parts_done = [], index + 1  # upload fails (the run folder has it)
        self._unflushed = 0
        text = "".join(line + "\n" for line in part)
        self.client.log_text(self.run_id, text, f"{self.prefix}/decisions/{index:05d}.jsonl")

    def close(self) -> None:
        """Flush the decisions; end the run if the writers started it and this is the last of
        them open (a run of the user's, active or not, is theirs to end, and MLflow's stack of
        active runs is left as is).

        Closed while an exception is handled (Lightning's ``on_exception``, a ``with`` block
        an error leaves), the run ends FAILED (KILLED for Ctrl-C), as a ``with
        mlflow.start_run()`` block ends its run: a run that crashed showed FINISHED.  A run the
        writers share ends FAILED if any of them closed so."""
        self._end(sys.exc_info()[0])

    def _close_at_exit(self) -> None:
        """:meth:`close` as the interpreter exits, FAILED where an exception nobody handled
        ended the script (Python keeps its type as ``sys.last_type`` then)."""
        self._end(getattr(sys, "last_type", None))

    def _end(self, raised: type[BaseException] | None) -> None:
        """Leave the run the writers started, if this one uses one, and end it with the last
        of them; left only once ended, so that a close that failed to end it can be tried
        again."""
        self.flush()
        started = self._started
        if started is None:
            return
        assert self.client is not None
        if raised is not None and started.status == "FINISHED":
            started.status = "KILLED" if issubclass(raised, KeyboardInterrupt) else "FAILED"
        if started.users == 1:
            self.client.set_terminated(started.run_id, status=started.status)
            if _STARTED.get(started.key) is started:
                del _STARTED[started.key]
        started.users -= 1
        self._started = None
        atexit.unregister(self._close_at_exit)
