"""Integrations with training frameworks and trackers, one module each, imported on demand.

``lightning`` (``SelfTuneCallback``), ``huggingface`` (``wrap_trainer_optimizer``,
``SelfTuneTrainerCallback``), ``tensorboard`` (``TensorBoardWriter``) and ``mlflow``
(``MLflowWriter``).  This package imports none of them, so ``import selftune`` never needs the
frameworks; import the module you use, e.g. ``from selftune.integrations.lightning import ...``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def needs(integration: str) -> Iterator[None]:
    """Around an integration's imports of its framework: a framework not installed is named,
    with the extra that installs it, where the bare error named only a module deep in the
    import (``No module named 'lightning'``) and not how this package gets it."""
    try:
        yield
    except ModuleNotFoundError as err:
        package = (err.name or "").partition(".")[0]  # lightning, of lightning.pytorch
        raise ModuleNotFoundError(
            f"selftune.integrations.{integration} needs the package {package!r}, which is not "
            "installed: pip install 'selftune[integrations]' installs every integration's "
            f"framework (or install {package!r} alone)",
            name=package,
        ) from err


@contextmanager
def another_run_told(how: str) -> Iterator[None]:
    """Around an integration's wrap with a ``log_dir``: a refusal of the folder as another run's
    log, whose advice is a plain loop's (build the model with the run's initial weights and
    wrap before loading any, or give each optimizer of the process its own folder), is raised
    again with ``how``, the framework's ways, after what clashed.

    A later fit or a new ``Trainer`` of a model that trained starts from the weights it was
    left at, another run: the refusal is right, but its advice named steps the framework takes
    for its user, none the user can take (a folder per fit, a checkpoint to resume from).
    """
    from selftune.audit import LogError

    try:
        yield
    except LogError as err:
        if err.another_run is None:
            raise
        raise LogError(f"{err.another_run}: {how}") from None


def check_wrap_options(controller: Any, options: dict[str, Any], owner: str) -> None:
    """Refuse options that :func:`selftune.wrap` would refuse, when an integration is built.

    A callback wraps the optimizers only once the framework hands them over (the fit has
    started); a misspelt keyword would fail then, deep inside the framework's traceback.  So
    the options are tried now on a throwaway optimizer (without ``log_dir``: no folder is made).
    A controller instance is not tried: its state would be bound to the throwaway.
    """
    import torch

    import selftune

    if "wrap_kwargs" in options:
        raise selftune.ConfigError(
            f"{owner}: pass wrap()'s keywords directly, {owner}(average=True), not "
            "wrap_kwargs={...}"
        )
    if not isinstance(controller, str):
        return
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    try:
        # silent: a warning of the throwaway's (a knob this SGD has not, its rate outside
        # absolute bounds) is not the user's optimizer's, which the real wrap warns of
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            selftune.wrap(probe, controller, **options).close()
    except selftune.ConfigError as err:
        raise selftune.ConfigError(f"{owner}: {err}") from None


def wrap_settings_given(controller: Any, log_dir: Any, options: dict[str, Any]) -> list[str]:
    """The names of the :func:`selftune.wrap` settings an integration was given (``None``:
    not given), for :func:`refuse_for_wrapped`."""
    named = (("controller", controller), ("log_dir", log_dir))
    return [name for name, value in named if value is not None] + list(options)


def refuse_for_wrapped(given: list[str], found: str, owner: str, fix: str) -> None:
    """Refuse wrap settings ``given`` to ``owner`` for an optimizer the framework hands over
    already wrapped (``found`` says where), which is only fed: they would be ignored, and a
    ``log_dir`` so given was a log lost without a word."""
    import selftune

    if given:
        raise selftune.ConfigError(
            f"{found} a selftune optimizer, wrapped with its own settings, so "
            f"{', '.join(given)} given to {owner} would be ignored: {fix}"
        )
