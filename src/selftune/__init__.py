"""selftune: a PyTorch optimizer wrapper that tunes its own learning rate (and momentum).

>>> opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
>>> opt.zero_grad(); loss.backward(); opt.step(loss=loss.detach())
>>> opt.hyperparams()
[{'lr': 0.0123, 'momentum': 0.9}]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from selftune.audit import LogError, verify
from selftune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selftune.combined import Combined, Optimizers, as_one, optimizer_name
from selftune.controllers import CONTROLLERS, Controller, Proposal
from selftune.errors import (
    ConfigError,
    ControllerError,
    GuardError,
    RateFloorWarning,
    SelfTuneError,
)
from selftune.guard import GuardConfig
from selftune.policy import Policy, misfits
from selftune.replay import replay
from selftune.tuner import Decision, SelfTuned, StepEvent

try:
    __version__ = metadata.version("selftune")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"


def wrap(
    optimizer: Optimizers,
    controller: str | Controller = "auto",
    *,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    max_change: Mapping[str, float] | None = None,
    frozen: Iterable[str] | None = None,
    lr_bounds_absolute: bool = False,
    guard: bool | GuardConfig | None = True,
    log_dir: str | Path | None = None,
    seed: int | None = None,
    average: bool | float = False,
    groups: str = "each",
    model: torch.nn.Module | None = None,
    **controller_options: Any,
) -> SelfTuned:
    """Wrap ``optimizer`` so that it tunes its own learning rate while it trains (and, with the
    ``hypergradient`` controller, momentum or β1).

    ``optimizer``: one, or a list of several over parameters of their own (torch's ``Muon``
    for the 2-D weights and an ``AdamW`` for the rest), stepped as one :class:`Combined`: one
    guard rolls them all back together, one log holds every decision.

    ``controller``: one of :data:`CONTROLLERS` (``"auto"``, ``"hypergradient"``, ``"stability"``,
    ``"off"``) or a :class:`Controller` instance; ``controller_options`` go to its constructor.
    ``bounds``, ``max_change`` and ``frozen`` build the :class:`Policy` every decision passes
    (``bounds["lr"]`` is a pair of factors of the starting rate unless ``lr_bounds_absolute``;
    ``max_change`` does not hold a rollback or a restart from a snapshot, only the bounds do).
    ``guard``: roll back and back off on instability (a :class:`GuardConfig` to tune it;
    False or None: no guard).
    ``log_dir``: write the run's manifest, hash-chained decision log and trace there.
    ``seed``: recorded in the manifest, for whoever replays the run; selftune draws no random
    numbers, so it seeds nothing (seed the run's own generators as ever).
    ``average``: keep an exponential moving average of the weights to evaluate in their place
    (``with opt.averaged(): ...``); True means decay 0.9, a float is the decay.
    ``groups``: ``"each"`` tunes every param group from its own signals; ``"joint"`` tunes
    them as one, from the signals of all, and keeps their rates in the ratios given (a rate
    per layer: see the README's "Runs the defaults were not built for").
    ``model``: the module whose parameters ``optimizer`` trains; the guard's snapshots then
    hold its buffers too (BatchNorm's running statistics), and a rollback or restart puts them
    back with the weights.  Without it only the parameters and optimizer state roll back: a
    batch that made a running statistic non-finite leaves it so, and every evaluation NaN.
    """
    if "policy" in controller_options:  # else torch's TypeError, from SelfTuned's arguments
        raise ConfigError(
            "wrap builds its Policy from bounds=, max_change=, frozen= and "
            "lr_bounds_absolute=: pass those (selftune.SelfTuned(optimizer, controller, "
            "policy=...) takes a Policy built beforehand)"
        )
    policy = Policy.build(bounds, max_change, frozen, lr_bounds_absolute=lr_bounds_absolute)
    with as_one(optimizer) as inner:
        wrapped = SelfTuned(
            inner,
            controller,
            policy=policy,
            guard=guard,
            log_dir=log_dir,
            seed=seed,
            average=average,
            groups=groups,
            model=model,
            **controller_options,
        )
    name, starts = optimizer_name(wrapped.optimizer), wrapped.hyperparams()
    for message in misfits(bounds or {}, max_change or {}, policy, name, starts):
        warnings.warn(message, stacklevel=2)
    return wrapped


__all__ = [
    "CONTROLLERS",
    "CheckpointError",
    "Combined",
    "ConfigError",
    "Controller",
    "ControllerError",
    "Decision",
    "GuardConfig",
    "GuardError",
    "LogError",
    "Policy",
    "Proposal",
    "RateFloorWarning",
    "SelfTuneError",
    "SelfTuned",
    "StepEvent",
    "__version__",
    "load_checkpoint",
    "replay",
    "save_checkpoint",
    "verify",
    "wrap",
]
