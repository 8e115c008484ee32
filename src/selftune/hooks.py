"""The step hooks of an optimizer that steps others inside its own step (selftune's wrapper,
a :class:`~selftune.combined.Combined`): a gate on each optimizer it steps, which refuses a step
made past it, and torch's global step hooks held back while it steps them.

The outer ``step`` runs the hooks registered for every optimizer once, around itself; the
optimizers it steps inside would run them again.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol

import torch
from torch.optim import optimizer as torch_optimizer

from selftune import shards
from selftune.errors import ConfigError

#: torch's registries of the step hooks registered for every optimizer, by their names in
#: ``torch.optim.optimizer``, whose wrapper around each optimizer's ``step`` reads them there
_GLOBAL_STEP_HOOKS = tuple(
    name
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    if hasattr(torch_optimizer, name)
)


class _HeldHooks:
    """The registries :func:`global_step_hooks_held` took out, and how many inner steps hold
    them: the first to start takes them out and the last to end puts them back, so wrapped
    optimizers stepping at once in two threads (or one inside another's closure) cannot put
    back each other's empty ones, which lost every global hook for good."""

    lock = threading.Lock()
    holders = 0
    saved: ClassVar[dict[str, Any]] = {}


@contextmanager
def global_step_hooks_held() -> Iterator[None]:
    """Hold back the step hooks registered for every optimizer (torch's
    ``register_optimizer_step_pre_hook`` and ``register_optimizer_step_post_hook``) while the
    wrapped optimizer steps.

    They run around the wrapper's ``step``, given the wrapper and the arguments of the call, as
    its own hooks are; run again around the inner step, a profiler's step counter counted two
    steps a call, and an EMA's hook averaged twice.  The wrapped optimizer's own hooks still run
    at its update.  The registries are swapped for empty ones and put back: a hook registered
    meanwhile (by a closure L-BFGS calls again) is dropped, and another thread's optimizer that
    steps meanwhile runs without them.  Were torch to rename them, its hooks would run twice
    again, and nothing else would change.
    """
    with _HeldHooks.lock:
        registered = [getattr(torch_optimizer, name) for name in _GLOBAL_STEP_HOOKS]
        if _HeldHooks.holders == 0 and not any(registered):
            idle = True  # none registered, none held: the common step, nothing to swap
        else:
            idle = False
            if _HeldHooks.holders == 0:
                _HeldHooks.saved = dict(zip(_GLOBAL_STEP_HOOKS, registered, strict=True))
                for name, hooks in _HeldHooks.saved.items():
                    setattr(torch_optimizer, name, type(hooks)())
            _HeldHooks.holders += 1
    if idle:
        yield
        return
    try:
        yield
    finally:
        with _HeldHooks.lock:
            _HeldHooks.holders -= 1
            if _HeldHooks.holders == 0:
                for name, hooks in _HeldHooks.saved.items():
                    setattr(torch_optimizer, name, hooks)


class Outer(Protocol):
    """An optimizer that steps others inside its own step, as :class:`StepGate` reads it."""

    #: whether it is stepping them now (:func:`stepping_inside`): the steps its gates let through
    _stepping_inner: bool

    def _stepped_past(self, optimizer: torch.optim.Optimizer) -> str:
        """Why a step of ``optimizer`` made past it is refused, and what to do instead."""
        ...


@contextmanager
def stepping_inside(outer: Outer) -> Iterator[None]:
    """``outer`` steps the optimizers it holds inside the block: their gates let the steps
    through, and torch's global step hooks, which ran around ``outer``'s step, are held back."""
    outer._stepping_inner = True
    try:
        with global_step_hooks_held():
            yield
    finally:
        outer._stepping_inner = False


class StepGate:
    """The step pre-hook an :class:`Outer` registers on each optimizer it steps: refuses a step
    of that optimizer made past it (a reference the loop kept, ``opt.optimizer.step()``, a
    GradScaler or framework given it), before the update.

    Past selftune's wrapper such a step moved the weights with no guard and no record in the
    log or the trace, and the run could no longer be replayed, with no word; past a
    :class:`~selftune.combined.Combined`, whose groups and state are its optimizers', so too.
    Let through: the outer optimizer's own step (:func:`stepping_inside`: its closure and
    L-BFGS's calls of it inside), and the step by which torch.distributed.checkpoint's helpers,
    given ``opt.optimizer`` as the guide says, fill an empty state with every rate zeroed
    (asked only of a step refused otherwise: the outer step costs one weak reference and one
    flag).  The outer optimizer is held weakly: the loop holds the optimizer, which would keep a
    dropped wrapper, its snapshots and open files alive; once it is gone, the gate lets every
    step through (``unwrap`` removes it).  A copy or a pickle of the gate (an optimizer whose
    ``__getstate__`` keeps its hooks) is one that lets every step through: the optimizer copied
    is no stepped one.
    """

    __slots__ = ("_outer",)

    def __init__(self, outer: Outer | None) -> None:
        self._outer = None if outer is None else weakref.ref(outer)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        outer = None if self._outer is None else self._outer()
        if outer is None or outer._stepping_inner or shards.called_by_dcp():
            return
        raise ConfigError(outer._stepped_past(optimizer))

    def __reduce__(self) -> tuple[type[StepGate], tuple[None]]:
        return StepGate, (None,)
