"""Replay a logged run: re-apply every knob change and guard rollback at the step it happened.

Given the same seed, data order and code, the replayed run's final weights are bit-identical to the
original's: logged values are stored exactly (JSON floats round-trip), the learning rate's *scale*
is logged as well as its effective value, and guard rollbacks are re-executed from snapshots taken
on the same schedule, with the same configuration, read back from the manifest.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import torch

from selftune import audit
from selftune import knobs as knobs_io
from selftune.controllers.base import Knobs, Proposal
from selftune.errors import SelfTuneError
from selftune.guard import Guard, GuardConfig, Trouble
from selftune.policy import Policy
from selftune.signals import Signals
from selftune.tuner import SelfTuned


class ReplayController:
    """Proposes, at each step, exactly the controller decisions the log holds for that step."""

    name = "replay"

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self._by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            if r.get("kind") == "decision" and r.get("source", "controller") == "controller":
                self._by_step[int(r["step"])].append(r)

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        return [
            Proposal(r["group"], r["knob"], float(r["value"]), f"replay: {r['reason']}", raw=True)
            for r in self._by_step.get(signals.step, [])
        ]

    def on_backoff(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class ReplayGuard(Guard):
    """Declares trouble exactly at the logged rollback steps, and nowhere else."""

    def __init__(self, config: GuardConfig, records: list[dict[str, Any]]) -> None:
        super().__init__(config)
        self._events = {
            int(r["step"]): r
            for r in records
            if r.get("kind") == "guard" and r.get("event") == "rollback"
        }

    def judge(self, s: Signals) -> Trouble | None:
        r = self._events.get(s.step)
        if r is None:
            return None
        value = r["value"]
        return Trouble(s.step, r["signal"], float(value), f"replay: {r['reason']}")


def replay(optimizer: torch.optim.Optimizer, log_dir: str | os.PathLike[str]) -> SelfTuned:
    """An optimizer that re-applies the run logged in ``log_dir`` to ``optimizer``.

    Refuses (with :class:`~selftune.audit.LogError` or :class:`~selftune.SelfTuneError`) a log
    whose chain is broken or whose manifest does not match ``optimizer``'s param groups and knobs.
    """
    run = audit.read_log(log_dir)
    _check_matches(run.manifest, optimizer, log_dir)
    config = run.manifest.get("config", {})
    policy = _policy_from(config.get("policy"))
    guard_cfg = config.get("guard")
    guard: Any = False
    if guard_cfg is not None:
        guard = ReplayGuard(GuardConfig(**guard_cfg), run.records)
    tuned = SelfTuned(optimizer, ReplayController(run.records), policy=policy, guard=False)
    tuned.guard = guard if guard is not False else None
    return tuned


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
        if list(entry.get("knobs", [])) != knobs or int(entry.get("num_params", -1)) != count:
            raise SelfTuneError(
                f"{where}: param group {i} does not match the log (logged knobs "
                f"{entry.get('knobs')} and {entry.get('num_params')} parameters; this optimizer "
                f"{knobs} and {count}); replay needs the same model and optimizer"
            )


def _policy_from(saved: dict[str, Any] | None) -> Policy:
    if saved is None:
        return Policy()
    return Policy(
        bounds={k: (float(v[0]), float(v[1])) for k, v in saved["bounds"].items()},
        max_change=dict(saved["max_change"]),
        frozen=frozenset(saved["frozen"]),
        lr_bounds_absolute=bool(saved["lr_bounds_absolute"]),
    )
