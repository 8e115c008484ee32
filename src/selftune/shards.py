"""Parameters as this rank holds them: a DTensor's local shard, any other tensor as it is.

FSDP2's ``fully_shard`` makes every parameter (and its gradient and optimizer state) a DTensor,
whose fused ops either run collectives of their own or have no rule at all (``_foreach_copy_``).
What selftune reads and keeps of a parameter (its signals, the weight average, the hash of the
initial weights) is per rank anyway, so it works on the local shard, which aliases the DTensor's
storage: an in-place write to it is a write to the parameter.  The ranks' scalars are then
reduced as sums (:func:`selftune.signals._group_sums`), which makes the alignments the whole
parameter's, and the ranks' hashes are combined (:func:`whole_sha256`) into the whole model's.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from selftune.audit import LogError
from selftune.errors import ConfigError


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``t``: its local shard if it is a DTensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_params(group: dict[str, Any]) -> list[torch.Tensor]:
    """The local tensors of a param group's parameters."""
    return [local(p) for p in group["params"]]


#: the module of torch.distributed.checkpoint's optimizer helpers (``get_optimizer_state_dict``,
#: ``set_optimizer_state_dict``), and how many callers up a wrapper's method looks for it: its
#: own decorators and torch's step wrapper stand between
_DCP_HELPERS, _DCP_DEPTH = "torch.distributed.checkpoint.state_dict", 8

#: what those helpers do given the wrapper, and what to give them
DCP_ADVICE = (
    "torch.distributed.checkpoint's get_optimizer_state_dict and set_optimizer_state_dict were "
    "given the selftune wrapper: they keep only 'state' and 'param_groups' of its state dict, "
    "dropping selftune's part (a run resumed from it starts afresh, and a folder that holds "
    "its steps refuses it), and fill an empty state by a step. Give them opt.optimizer, and "
    "save opt.state_dict()['selftune'] in a file of each rank beside the checkpoint "
    "(docs/guide.md, under 'torch.distributed')"
)


#: why the guard cannot run over ZeroRedundancyOptimizer, and what to do
ZERO_GUARD_ADVICE = (
    "the guard cannot snapshot a ZeroRedundancyOptimizer: each rank holds its shard of the "
    "optimizer's state, and its state_dict() is refused until consolidate_state_dict() has run "
    "on every rank (the first step raised inside torch, after its update). Wrap it with "
    "guard=False; to checkpoint, call consolidate_state_dict(to=0) on every rank, then save "
    "on rank 0 and load on every rank"
)


#: why a ZeroRedundancyOptimizer that steps inside DDP's communication hook cannot be wrapped
ZERO_OVERLAP_ADVICE = (
    "a ZeroRedundancyOptimizer built with overlap_with_ddp=True takes its steps inside DDP's "
    "communication hook (hook_with_zero_step), on its own shard's optimizer: they would move "
    "the weights past the wrapper, with no guard, no tuning and no record in the run's log. "
    "Build it with overlap_with_ddp=False (the default) to wrap it"
)


def zero_redundancy(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's ``ZeroRedundancyOptimizer``, whose state is sharded."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def consolidation(optimizer: torch.optim.Optimizer) -> object | None:
    """What a ``ZeroRedundancyOptimizer``'s last ``consolidate_state_dict()`` gathered (each call
    makes a new list, which its ``state_dict()`` returns the state of); None for any other."""
    return getattr(optimizer, "_all_state_dicts", None) if zero_redundancy(optimizer) else None


def check_consolidated(optimizer: torch.optim.Optimizer, before: object | None) -> None:
    """Raise :class:`ConfigError` where a ``ZeroRedundancyOptimizer``'s state was consolidated
    ``before`` its last step or load (:func:`consolidation` then): its ``state_dict()`` returns
    that state, steps since or not, so a checkpoint saved steps later held the moments of then
    beside this step's weights and selftune's state, and resumed to another run with no word."""
    if before is not None and consolidation(optimizer) is before:
        raise ConfigError(
            "the ZeroRedundancyOptimizer's state_dict() is the state consolidated before its "
            "last step, not its state now: call consolidate_state_dict(to=0) on every rank "
            "again just before saving"
        )


def called_by_dcp() -> bool:
    """Whether torch.distributed.checkpoint's optimizer helpers called the wrapper's method
    that asks.  Read off the callers' modules: the helpers call ``state_dict``,
    ``load_state_dict`` and, to fill an empty state, ``step`` with every rate set to zero, as
    any caller may, and only the caller tells them apart."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_DCP_DEPTH):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == _DCP_HELPERS:
            return True
        frame = frame.f_back
    return False


def across_ranks() -> bool:
    """Whether this process is one of several ranks of ``torch.distributed``."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """How many ranks train the run: ``torch.distributed``'s world size, 1 without it.

    Each rank's batch adds to the step's, so a run resumed on another number of ranks than
    saved it goes on at another effective batch size (its log notes that), with one process
    counted as one rank, whether or not it started a process group."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gathered(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (``[value]`` without torch.distributed): a
    collective, which every rank must call."""
    if not across_ranks():
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a collective: every rank calls it)."""
    return any(gathered(flag))


def refuse_on_every_rank(
    check: Callable[[], object], what: str, raises: type[Exception] = ConfigError
) -> None:
    """Run ``check``; what it raises on any rank (whatever the error) is raised there, and
    under ``torch.distributed`` a ``raises`` naming that rank on every other: a rank that raised
    alone (rank 0, whose folder holds another run's log, or which alone reads the log a state
    is checked against) left the others at their next collective, which failed with a closed
    connection or waited out its timeout, and no word of why.  A collective: every rank calls
    it.

    A refusal of a run folder as another run's (a :class:`~selftune.audit.LogError` whose
    ``another_run`` says what clashed) is a ``LogError`` on the other ranks too, with its own
    ``another_run``: an integration follows that with its framework's advice
    (:func:`selftune.integrations.another_run_told`), which the other ranks' ``raises`` did not
    carry, so they heard the plain loop's advice that rank 0's refusal had dropped.
    """
    error: Exception | None = None
    try:
        check()
    except Exception as err:  # raised below, where it was raised, and named on the others
        error = err
    every = gathered(
        None
        if error is None
        else (f"{type(error).__name__}: {error}", getattr(error, "another_run", None))
    )
    if error is not None:
        raise error
    for rank, said in enumerate(every):
        if said is None:
            continue
        text, clash = said
        message = f"rank {rank} could not {what} ({text}); it is refused on every rank"
        if clash is None:
            raise raises(message)
        refusal = LogError(message)
        refusal.another_run = f"rank {rank} could not {what}: {clash}"
        raise refusal


def check_same_settings(settings: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` on every rank if any rank's ``settings`` differ from rank 0's.

    Every rank reads the same signals and so takes the same decisions only if every rank runs
    the same controller, bounds and guard from the same rates: ranks given different ones (a
    guard on rank 0 alone, a controller chosen per rank) drifted apart with no error, and the
    log rank 0 wrote verified.  A collective: every rank calls it, and every rank raises.
    """
    every = gathered(settings)
    for rank, theirs in enumerate(every):
        differ = sorted(k for k in settings if theirs.get(k) != every[0].get(k))
        if differ:
            shown = "; ".join(f"{k}: {every[0].get(k)!r} against {theirs.get(k)!r}" for k in differ)
            raise ConfigError(
                f"rank {rank} wrapped its optimizer with other settings than rank 0 ({shown}): "
                "every rank must call wrap with the same settings, or their decisions and "
                "weights drift apart"
            )


def whole_sha256(digest: str) -> str:
    """The hash of the whole model from each rank's ``digest`` of what it holds.

    Where every rank holds the same weights (a single process, DDP) that is their common
    digest; where they differ (FSDP's shards) it is the sha256 of the ranks' digests in rank
    order, so that a replay checks every shard, not rank 0's alone.  A collective: every rank
    calls it.
    """
    digests = gathered(digest)
    if len(set(digests)) == 1:
        return digest
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()
