"""An exponential moving average of the weights, to evaluate in their place.

A run that tunes its rate upwards trains at the edge of what the rate allows, so its last iterate
carries the noise of its last steps.  Averaging the iterates removes that noise without lowering
the rate, i.e. it does the early work of a decay: measured in the benchmark, ``auto`` reaches
its targets in fewer steps when every evaluation reads the average (``bench-results/pilots``,
pilot 50, and the benchmark's averaged rows, which hold the grid to the same average).

The average follows the parameters of the wrapped optimizer, group by group (a group added
mid-run joins it from its own start), and is updated after every applied step only: a step the
guard rolled back, or a restart, updates nothing, and a rollback restores the average the
snapshot held, so that diverged weights never enter it.

``decay`` 0.9 (about ten steps) is the default for one reason: batch norm's running statistics
are themselves an average over the steps with momentum 0.1, the same horizon, so the averaged
weights are evaluated with statistics of the same window.  Longer horizons need their own
statistics (``torch.optim.swa_utils.update_bn``) for models with batch norm.  Buffers are not
averaged.  The first updates weigh the iterates equally (decay ``k / (k + 1)`` at the ``k``-th,
the running mean) until that reaches ``decay``, so the initial weights do not linger in it.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from selftune.errors import ConfigError
from selftune.shards import local_params

#: The decay that ``average=True`` means (see the module docstring for why).
DEFAULT_DECAY = 0.9


def check_decay(average: bool | float | None) -> float | None:
    """The decay that ``wrap``'s ``average`` argument asks for (None: no average)."""
    if average is False or average is None:
        return None
    if average is True:
        return DEFAULT_DECAY
    if not isinstance(average, numbers.Real) or not 0.0 < float(average) < 1.0:
        raise ConfigError(
            f"average={average!r}: pass True (decay {DEFAULT_DECAY}), or a decay in (0, 1) such "
            "as 0.9 (about ten steps) or 0.99 (about a hundred)"
        )
    return float(average)


def check_averageable(groups: list[dict[str, Any]], first: int = 0) -> None:
    """Refuse a parameter no average can hold: an integer or bool one (``requires_grad=False``,
    which torch's optimizers take and never step), whose update raised after the step had
    moved the weights, and left every later step refused.  ``first``: the index of
    ``groups[0]`` among the optimizer's groups, for the message."""
    for i, group in enumerate(groups, start=first):
        for j, p in enumerate(local_params(group)):
            if not (p.is_floating_point() or p.is_complex()):
                raise ConfigError(
                    f"param group {i} holds a {p.dtype} parameter (its parameter {j}), which a "
                    "weight average cannot hold: keep it out of the optimizer (as a buffer, "
                    "register_buffer, if it is state), or wrap without average="
                )


@contextmanager
def swapped(params: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Copy ``values`` into ``params``, and the weights back when the block ends, even on error.

    Copies, not a swap of ``.data``: whatever holds the parameters' storage (a DDP bucket, a
    flattened view) keeps seeing it.  Costs one copy of the weights while the block runs: the
    block gets that copy (the weights it swapped out), in the order of ``params``.
    """
    if not params:  # an optimizer whose groups are all empty yet: torch's fused copy refuses
        yield []  # empty lists
        return
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, values)
    try:
        yield kept
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, kept)


_HALF = (torch.float16, torch.bfloat16)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's average is kept in: float32 for a half-precision parameter,
    whose own precision rounds away an update once the weights are within about
    ``2**-8 / (1 - decay)`` of the average (bfloat16's; a bfloat16 average of weights at 4.0
    stopped at 3.94 with decay 0.9, at 2.0 of 3.83 with 0.999).  Costs twice the parameter's
    memory there."""
    return torch.float32 if dtype in _HALF else dtype


def _wide_copy(p: torch.Tensor) -> torch.Tensor:
    """A parameter's starting average (see :func:`_wide`)."""
    return p.detach().to(_wide(p.dtype), copy=True)


class WeightAverage:
    """The average of the parameters of ``groups`` (an optimizer's ``param_groups``)."""

    def __init__(self, groups: list[dict[str, Any]], decay: float) -> None:
        self.decay = decay
        self.updates = 0  #: applied steps averaged so far
        self.tensors: list[list[torch.Tensor]] = []
        #: per group, whether some average is kept wider than its parameter (see _wide_copy)
        self.widened: list[bool] = []
        #: the dtypes :meth:`copy_into` wrote the average at, per group and parameter, for
        #: :meth:`held_by` to follow a conversion since; None once the average changed
        self.copied_at: list[list[torch.dtype]] | None = None
        for group in groups:
            self.group_added(group)

    def group_added(self, group: dict[str, Any]) -> None:
        """A param group joined the optimizer: its average starts at its current weights."""
        params = local_params(group)
        self.copied_at = None
        self.tensors.append([_wide_copy(p) for p in params])
        self.widened.append(any(p.dtype in _HALF for p in params))

    @torch.no_grad()
    def restart(self, groups: list[dict[str, Any]]) -> None:
        """Start again from the weights as they are (a state saved without an average was
        loaded: the weights it brought are the only history there is)."""
        for group, avg in zip(groups, self.tensors, strict=True):
            if avg:
                torch._foreach_copy_(avg, local_params(group))
        self.updates = 0
        self.copied_at = None

    @torch.no_grad()
    def follow(self, groups: list[dict[str, Any]]) -> None:
        """Bring each group's average to its parameters' device and dtype where a model moved
        or converted after ``wrap`` left them apart: ``model.to(torch.bfloat16)`` before the
        first step, which plain torch's optimizers allow, or one submodule converted alone
        (``model.head.to(torch.float64)``).  The fused update mixes neither, and raised after
        the step had moved the weights, which left every later step refused.

        A look at every parameter, one comparison each beside the list of them that each
        update builds anyway: a look at each group's first parameter alone missed a submodule
        converted after it.
        """
        for i, (group, avg) in enumerate(zip(groups, self.tensors, strict=True)):
            params = local_params(group)
            half = any(p.dtype in _HALF for p in params)  # the update a half takes: the wide one
            fits = all(
                a.device == p.device and a.dtype == _wide(p.dtype)
                for a, p in zip(avg, params, strict=True)
            )
            if fits and (self.widened[i] or not half):
                continue
            self.tensors[i] = [
                a.to(device=p.device, dtype=_wide(p.dtype))
                for a, p in zip(avg, params, strict=True)
            ]
            self.widened[i] = half

    @torch.no_grad()
    def update(self, groups: list[dict[str, Any]]) -> None:
        """Fold the weights after an applied step into the average (one fused op per group)."""
        self.follow(groups)
        self.copied_at = None
        self.updates += 1
        weight = max(1.0 - self.decay, 1.0 / (self.updates + 1))
        for group, avg, wide in zip(groups, self.tensors, self.widened, strict=True):
            if wide:
                for a, p in zip(avg, local_params(group), strict=True):  # one wide copy at a time
                    a.lerp_(p.to(a.dtype), weight)
            elif avg:  # under no_grad the parameters are read as they are: no detached list
                torch._foreach_lerp_(avg, local_params(group), weight)

    @torch.no_grad()
    def copy_into(self, groups: list[dict[str, Any]]) -> None:
        """Put the average into the parameters for good: the end of a run whose evaluations read
        it, so that the model it leaves is the one they measured."""
        for group, avg in zip(groups, self.tensors, strict=True):
            if avg:
                torch._foreach_copy_(local_params(group), avg)
        self.copied_at = [[p.dtype for p in local_params(group)] for group in groups]

    @torch.no_grad()
    def held_by(self, groups: list[dict[str, Any]]) -> bool:
        """Whether the parameters still hold the average as :meth:`copy_into` put it there (a
        wider average read at its parameter's dtype): no step and no weights loaded since.

        A model moved to another device or converted to another dtype since (``model.to``)
        holds it converted: the average is read at the dtype ``copy_into`` wrote it at, then
        converted as the parameter was, which a conversion rounds the same way wherever it runs.
        Compared at the parameter's new dtype alone, the average was not found in a model
        converted to float64, nor in a bfloat16 one widened to float32 (its average is float32,
        the weights it left bfloat16-rounded), and the caller took it for weights loaded since.
        One comparison per parameter, and one converted copy of it at a time.
        """
        written = self.copied_at
        if written is None or len(written) != len(groups):
            written = [[p.dtype for p in local_params(group)] for group in groups]
        for group, avg, dtypes in zip(groups, self.tensors, written, strict=True):
            params = local_params(group)
            if len(params) != len(avg) or len(dtypes) != len(avg):
                return False
            for p, a, dtype in zip(params, avg, dtypes, strict=True):
                if p.shape != a.shape:
                    return False
                if not torch.equal(p, a.to(dtype).to(device=p.device, dtype=p.dtype)):
                    return False
        return True

    def swapped_in(
        self, groups: list[dict[str, Any]]
    ) -> AbstractContextManager[list[torch.Tensor]]:
        """The average in the parameters for the duration of a block (see :func:`swapped`)."""
        params = [p for group in groups for p in local_params(group)]
        return swapped(params, [a for group in self.tensors for a in group])

    def state_dict(self) -> dict[str, Any]:
        """The average as plain data; the caller clones it where it must outlive the run.  The
        decay is not in it: it is the wrapper's setting (and the manifest's, for replay)."""
        return {"updates": self.updates, "tensors": self.tensors}

    def check_fits(self, state: dict[str, Any]) -> None:
        """Refuse a saved average of other shapes: called before anything of a state loads,
        so that a refused state leaves the wrapper as it was."""
        shapes = [[tuple(t.shape) for t in g] for g in state["tensors"]]
        if shapes != [[tuple(t.shape) for t in g] for g in self.tensors]:
            raise ConfigError(
                "the saved weight average does not fit this optimizer's parameters; load a "
                "state dict saved from the same model setup"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a saved average into this one (the tensors stay where the parameters are).

        A run resumed with another ``average=`` goes on with the decay it asks for, from the
        average it had.
        """
        self.check_fits(state)
        self.copied_at = None
        saved = state["tensors"]
        with torch.no_grad():
            for mine, theirs in zip(self.tensors, saved, strict=True):
                if mine:  # a group with no params: torch's fused ops refuse empty lists
                    torch._foreach_copy_(mine, list(theirs))
        self.updates = int(state["updates"])
