"""MLflow: log selftune's knobs, loss and decisions with ``opt.add_listener``.

>>> with mlflow.start_run():
...     writer = MLflowWriter()
...     opt.add_listener(writer)
...     train()
...     writer.close()

Metrics ``selftune/group{i}/{knob}`` (effective values) and ``selftune/loss`` every step, and
``selftune/metric`` at each step that read a metric given to ``observe``, in one ``log_batch``
call per step, plus ``selftune/decisions``, the running count of decisions and guard events
(the artifact's rows).  The decisions themselves, with their reasons and signals, go to the
artifact ``selftune/decisions.jsonl`` (rewritten every ``flush_every`` new decisions and at
:meth:`MLflowWriter.close`), and the latest one to the tag ``selftune.last_decision``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from selftune.audit import canonical
from selftune.integrations.events import check_writer_options, describe, event_metric
from selftune.tuner import StepEvent, is_rank_zero


class MLflowWriter:
    """A listener that logs selftune's knobs, loss and decisions to an MLflow run.

    ``run``: a run id, an ``mlflow.entities.Run``, or ``None`` for the active run (one is
    started, and ended in :meth:`close`, if none is active).  ``every``: log the knob metrics
    every this many steps (steps with decisions are always logged).  ``prefix``: the first
    part of every metric's, tag's and artifact's name.  ``flush_every``: rewrite the decisions
    artifact after this many new decisions (and at :meth:`close`): a run that dies before
    ``close`` loses up to that many from the artifact (the run folder's log keeps them all).
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
        self._owned = False
        #: False on a rank other than 0 under torch.distributed, as the run folder is written:
        #: no run started (one per rank, before), nothing logged
        self.active = is_rank_zero()
        if run is None and not self.active:
            run = ""
        elif run is None:
            active = mlflow.active_run()
            if active is None:
                active, self._owned = mlflow.start_run(), True
            run = active
        self.run_id: str = run if isinstance(run, str) else run.info.run_id
        self.client = client if client is not None else MlflowClient()
        self.prefix, self.every, self.flush_every = prefix, every, flush_every
        self.decisions: list[dict[str, Any]] = []
        self._unflushed = 0

    def __call__(self, event: StepEvent) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        metrics: list[Metric] = []
        if event.step % self.every == 0 or event.decisions:
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
        for d in event.decisions:
            self.decisions.append({**dataclasses.asdict(d), "text": describe(d)})
            tags = [RunTag(f"{self.prefix}.last_decision", describe(d)[:5000])]
        if event.guard is not None:
            record = {"step": event.step, "kind": "guard", **event.guard}
            self.decisions.append(record)
            tag = canonical(record).decode()  # a NaN as "nan", as the log holds it: valid JSON
            tags.append(RunTag(f"{self.prefix}.last_guard_event", tag[:5000]))
        if event.decisions or event.guard is not None:
            metrics.append(
                Metric(f"{self.prefix}/decisions", float(len(self.decisions)), now, event.step)
            )
            self._unflushed += len(event.decisions) + (event.guard is not None)
        if metrics or tags:
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        if self._unflushed >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write every decision so far to the artifact ``<prefix>/decisions.jsonl``."""
        if not self.active:
            return
        text = "".join(canonical(r).decode() + "\n" for r in self.decisions)
        self.client.log_text(self.run_id, text, f"{self.prefix}/decisions.jsonl")
        self._unflushed = 0

    def close(self) -> None:
        """Flush the decisions; end the run if this writer started it."""
        self.flush()
        if self._owned:
            mlflow.end_run()
            self._owned = False
