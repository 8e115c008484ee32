"""Parameters as this rank holds them: a DTensor's local shard, any other tensor as it is.

FSDP2's ``fully_shard`` makes every parameter (and its gradient and optimizer state) a DTensor,
whose fused ops either run collectives of their own or have no rule at all (``_foreach_copy_``).
What selftune reads and keeps of a parameter (its signals, the weight average, the hash of the
initial weights) is per rank anyway, so it works on the local shard, which aliases the DTensor's
storage: an in-place write to it is a write to the parameter.  The ranks' scalars are then
reduced as sums (:func:`selftune.signals._group_sums`), which makes the alignments the whole
parameter's.
"""

from __future__ import annotations

from typing import Any

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``t``: its local shard if it is a DTensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_params(group: dict[str, Any]) -> list[torch.Tensor]:
    """The local tensors of a param group's parameters."""
    return [local(p) for p in group["params"]]
