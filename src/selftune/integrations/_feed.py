"""Hand the training loss to a selftune optimizer that a framework steps without one.

Lightning and the Hugging Face ``Trainer`` call ``optimizer.step()`` (or ``step(closure)``)
themselves, so the loss a user would pass as ``step(loss=...)`` never reaches selftune.  The
integrations capture each micro-batch's loss where the framework exposes it and add it to a
:class:`LossFeed`; :class:`FedSelfTuned` takes the sum when it steps.  Frameworks divide each
micro-batch's loss by the number of accumulation steps before backward, so the sum is the mean
loss of the whole optimizer step, not just of its last micro-batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from selftune.tuner import SelfTuned


class LossFeed:
    """The losses added since the last :meth:`take`, summed on their device (no host sync).

    ``window``: the number of micro-batches the framework divides each loss by, whatever the
    number in the window at hand (Lightning's ``accumulate_grad_batches``).  An epoch's last
    window may be shorter: its sum is then rescaled to the mean of the micro-batches it has
    (it read only that share of the loss at every epoch's end).
    """

    def __init__(self, window: int = 1) -> None:
        self._total: torch.Tensor | None = None
        self._count = 0
        self.window = window

    def add(self, loss: torch.Tensor | float) -> None:
        """Add one micro-batch's (already accumulation-normalised) loss."""
        value = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        self._total = value if self._total is None else self._total + value
        self._count += 1

    def take(self) -> torch.Tensor | None:
        """The mean loss since the last call (``None`` if nothing was added), and start again."""
        total, count = self._total, self._count
        self.clear()
        if total is not None and 0 < count < self.window:
            total = total * (self.window / count)
        return total

    def clear(self) -> None:
        """Forget what was added (micro-batches whose step never came)."""
        self._total, self._count = None, 0


class FedSelfTuned(SelfTuned):
    """A :class:`SelfTuned` whose ``step()`` without a loss takes it from its :class:`LossFeed`.

    Made from an optimizer returned by :func:`selftune.wrap` with :func:`feed_from`, so that it is
    built by exactly the code users call.  A loss passed explicitly always wins.
    """

    loss_feed: LossFeed

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        if loss is not None:
            return super().step(closure, loss=loss)
        if closure is None:
            return super().step(loss=self.loss_feed.take())
        feed = self.loss_feed
        results: list[Any] = []  # the closure's own, which the step returns as torch's do

        # The closure runs the forward and backward passes, which is when the framework's hooks
        # add the loss; SelfTuned takes the closure's result as the loss, so return the fed sum.
        def fed_closure() -> Any:
            results.append(closure())
            total = feed.take()
            return results[-1] if total is None else total

        super().step(fed_closure)
        return results[0]


def feed_from(optimizer: SelfTuned, feed: LossFeed | None = None) -> FedSelfTuned:
    """Make ``optimizer`` (a plain :class:`SelfTuned`) take its loss from ``feed``; returns it.

    Changing the class of the instance keeps every attribute and the wrapped optimizer as they
    are: :class:`FedSelfTuned` adds no state beyond ``loss_feed`` and overrides only ``step``.
    """
    if type(optimizer) is not SelfTuned and not isinstance(optimizer, FedSelfTuned):
        raise TypeError(f"expected a SelfTuned from selftune.wrap, got {type(optimizer).__name__}")
    optimizer.__class__ = FedSelfTuned
    fed: FedSelfTuned = optimizer  # type: ignore[assignment]
    if feed is not None or not hasattr(fed, "loss_feed"):
        fed.loss_feed = feed if feed is not None else LossFeed()
    keep_scheduler_mark(fed)
    return fed


def keep_scheduler_mark(opt: SelfTuned) -> SelfTuned:
    """Keep the mark torch's LR schedulers put on the step of the optimizer they watch, on the
    wrapper's ``step`` (its class's: a fed one takes the feed); returns ``opt``.

    A scheduler built on the wrapper replaced its ``step`` with one that calls the method it
    found, ``SelfTuned.step``, which knows no feed: the loss never reached the tuning.  One
    built on the inner optimizer marked that one's ``step``; without the mark on the wrapper it
    warns that ``optimizer.step()`` was overridden (Lightning hands the scheduler the wrapper).
    """
    patched = getattr(opt.__dict__.get("step"), "_wrapped_by_lr_sched", False)
    if not patched and not getattr(opt.optimizer.step, "_wrapped_by_lr_sched", False):
        return opt
    _mark_step(opt, None)
    return opt


def mark_inner_step(opt: SelfTuned) -> torch.optim.Optimizer:
    """The optimizer ``opt`` wraps, its ``step`` carrying the mark of torch's LR schedulers, for a
    scheduler to watch it in the wrapper's place; returns it.

    A scheduler checks that the optimizer it watches was stepped before it steps (and warns
    that ``optimizer.step()`` was overridden where its mark is gone).  One built on the inner
    optimizer marked that one's ``step`` already, which the wrapper's step calls; one built on
    the wrapper marked the wrapper's, so the inner one is marked here as torch marks it.
    """
    inner = opt.optimizer
    if getattr(inner.step, "_wrapped_by_lr_sched", False):
        return inner
    _mark_step(inner, inner.__dict__.get("step"))  # a step patched on the instance, kept
    return inner


def _mark_step(opt: torch.optim.Optimizer, found: Callable[..., Any] | None) -> None:
    """Give ``opt`` a ``step`` as torch's LR schedulers patch it: one that sets the flag they
    check and calls ``found`` (else the step of ``opt``'s class), marked as theirs."""
    ref = weakref.ref(opt)  # as torch's own patch: no cycle through the instance

    def step(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        assert target is not None
        target._opt_called = True  # type: ignore[attr-defined]  # what the scheduler checks
        if found is not None:
            return found(*args, **kwargs)
        return type(target).step(target, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = step  # type: ignore[method-assign]
