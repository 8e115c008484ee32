"""Hand the training loss to a selftune optimizer that a framework steps without one.

Lightning and the Hugging Face ``Trainer`` call ``optimizer.step()`` (or ``step(closure)``)
themselves, so the loss a user would pass as ``step(loss=...)`` never reaches selftune.  The
integrations capture each micro-batch's loss where the framework exposes it and add it to a
:class:`LossFeed`; :class:`FedSelfTuned` takes the sum when it steps.  Frameworks divide each
micro-batch's loss by the number of accumulation steps before backward, so the sum is the mean
loss of the whole optimizer step, not just of its last micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from selftune.tuner import SelfTuned


class LossFeed:
    """The losses added since the last :meth:`take`, summed on their device (no host sync)."""

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None

    def add(self, loss: torch.Tensor | float) -> None:
        """Add one micro-batch's (already accumulation-normalised) loss."""
        value = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        self._total = value if self._total is None else self._total + value

    def take(self) -> torch.Tensor | None:
        """The sum since the last call (``None`` if nothing was added), and start again."""
        total, self._total = self._total, None
        return total

    def clear(self) -> None:
        """Forget what was added (micro-batches whose step never came)."""
        self._total = None


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

        # The closure runs the forward and backward passes, which is when the framework's hooks
        # add the loss; SelfTuned takes the closure's result as the loss, so return the fed sum.
        def fed_closure() -> Any:
            result = closure()
            total = feed.take()
            return result if total is None else total

        return super().step(fed_closure)


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
    return fed
