"""Holding back torch's global optimizer step hooks while an optimizer steps inside another.

A wrapper's ``step`` (selftune's, or :class:`~selftune.combined.Combined`'s) runs the hooks
registered for every optimizer once, around itself; the optimizers it steps inside would run
them again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from torch.optim import optimizer as torch_optimizer

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
