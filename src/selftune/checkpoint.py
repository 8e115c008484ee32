"""Checkpoints that survive a crash at any moment and resume a run exactly.

>>> save_checkpoint("runs/a/ckpt.pt", model=model, optimizer=opt, step=step)
>>> step = load_checkpoint("runs/a/ckpt.pt", model=model, optimizer=opt)["step"]

A checkpoint holds the model's weights, the optimizer's state dict (for a selftune optimizer that
includes the controller, the guard, the signal tracker, the weight average if one is kept and the
audit log's position), the guard's in-memory snapshots, the random number generators (torch CPU,
CUDA when it is in use, Python's ``random``, numpy's global generator when numpy is installed)
and the step.

**Atomic.** The file is written to a temporary file in the same folder, flushed, fsynced and
renamed over the old one, and the folder is fsynced, so a crash (or a power cut) at any moment
leaves either the previous checkpoint or the new one, never a mix.  One writer per path: under
``torch.distributed`` save on rank 0 only (every rank holds the same weights and optimizer state)
and load on every rank.  Every rank then gets rank 0's random generator states: draw per-rank
randomness (data order, dropout) from generators seeded by ``(seed, step, rank)``, or keep it in
``extra`` per rank.  A checkpoint loads on another number of ranks than saved it too (a single
process's under ``torchrun``, or the reverse), and the log notes that the run went on at another
effective batch size.

**Resuming after a crash** is loading the last checkpoint into a freshly built model and a freshly
wrapped optimizer with the *same* ``log_dir``: the optimizer's ``load_state_dict`` cuts
``decisions.jsonl`` back to the checkpoint's position (the records of steps that will be redone
go, and a note says how many), so the hash chain stays valid and the log ends up holding each
decision once.  Build the model from the same seed and wrap it *before* loading the weights: the
run folder recognises its run by the hash of the initial weights.  Save a checkpoint before the
first step too, so that a crash before the first periodic checkpoint also resumes cleanly.

**Exactly.** With a deterministic model on the CPU and data that depends only on the step (or on
a generator restored from ``extra``), a resumed run ends bit-identical to an uninterrupted one:
weights, optimizer state and log records.  That is why the guard's snapshots are saved too: they
live in memory only, and without them a rollback after resuming would restore a different step
than the uninterrupted run restores (a run resumed from a plain ``state_dict``, which holds none,
says in its next guard record where its snapshots started again, so that ``selftune.replay``
follows it).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from selftune import shards
from selftune.audit import LogError
from selftune.errors import ConfigError, SelfTuneError
from selftune.tuner import SelfTuned, finish_offload, on_host

#: Written into every checkpoint so that a later reader can tell which layout it follows.
FORMAT = "selftune-checkpoint/1"
_REQUIRED = ("format", "step", "model", "optimizer", "rng", "extra")


class CheckpointError(SelfTuneError):
    """A checkpoint file is missing, damaged, or does not fit the model and optimizer given."""


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of the run at ``step`` to ``path`` atomically; return the path.

    ``extra`` holds anything else the training loop needs to resume (a data generator's state, an
    epoch counter); it must be made of tensors and plain Python values, because loading refuses
    to unpickle arbitrary objects: anything else raises :class:`CheckpointError` naming it, and
    the previous checkpoint is kept.  A ``DistributedDataParallel`` model is saved unwrapped, so the
    checkpoint loads into a plain model too.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(
            f"model= takes the torch.nn.Module being trained, got a {type(model).__name__}"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CheckpointError(
            f"optimizer= takes the optimizer (the one wrap() returned), got a "
            f"{type(optimizer).__name__}"
        )
    _refuse_sharded_model(model)
    check_whole = getattr(optimizer, "check_whole", None)
    if check_whole is not None:  # refused at once, not at the load
        check_whole("saving a checkpoint")
    target = Path(path).expanduser()
    if target.is_dir():
        raise CheckpointError(
            f"{target} is a folder: pass a file path such as {target / 'ckpt.pt'}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot make the folder {target.parent} for the checkpoint ({exc.strerror or exc}): "
            "pass a writable path"
        ) from exc
    folder = optimizer.unresumed_folder() if isinstance(optimizer, SelfTuned) else None
    if folder is not None:
        # a crashed run started again without its resume: the step-0 checkpoint went over the
        # run's last one, and the run was refused at its first step, with nothing to resume
        raise CheckpointError(
            f"{folder} already holds steps of a run, and this optimizer has taken none: to "
            "resume that run, load its checkpoint first (selftune.load_checkpoint); to start "
            f"again, log to a new folder. Nothing was written to {target}"
        )
    finish_offload()  # the guard's last snapshot may still be on its way to the host
    optimizer_state = optimizer.state_dict()  # (a selftune one forces its log to disk)
    payload = {
        "format": FORMAT,
        "step": step,
        "model": _model_state(model, optimizer),
        "optimizer": optimizer_state,
        "guard_snapshots": _guard_snapshots(optimizer),
        "rng": _rng_states(),
        "extra": dict(extra) if extra is not None else None,
    }
    _remove_stale_temporaries(target)
    _refuse_unloadable(payload, target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error(exc)
        if cause is not None:  # a full disk, a read-only folder: named, not a temporary
            raise CheckpointError(
                f"cannot write the checkpoint {target} ({cause.strerror or cause}); a checkpoint "
                "already there is kept as it was: free space or pass a writable path"
            ) from exc
        raise
    _fsync_folder(target.parent)
    return target


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    map_location: str | torch.device | None = "cpu",
    every_rank: bool = False,
) -> dict[str, Any]:
    """Restore ``model``, ``optimizer`` and the random generators from ``path``.

    Returns ``{"step": int, "extra": dict | None}``: continue the loop at ``step + 1``.  Raises
    :class:`CheckpointError` naming the file when it is missing, damaged, not a selftune
    checkpoint, or saved from a different model, before anything loads.  The file is read with
    ``weights_only=True``: a checkpoint cannot run code on load.  Under ``torch.distributed``,
    with a selftune optimizer or into a ``DistributedDataParallel`` model, a collective: what
    one rank refuses (a file its node lacks), every rank refuses, naming it, as it refuses a
    file of another step on some rank (each node's own disk holding its own checkpoint, one
    older).  A plain module with a plain optimizer loads on the calling rank alone, so that
    rank 0 may load a checkpoint by itself (into ``model.module`` or a model of its own, to
    evaluate it); a refusal there is that rank's.  ``every_rank=True`` makes that load a
    collective too, for a plain module and optimizer that every rank trains (gradients synced
    by hand, a run with tuning off): a file one rank lacked was refused there alone, and a loop
    that starts afresh when no checkpoint loads resumed on one rank and started over on the
    other.
    """
    if not isinstance(every_rank, bool):
        raise CheckpointError(
            f"every_rank={every_rank!r}: True (every rank calls this load, a collective) or False"
        )
    _refuse_sharded_model(model, "load")  # (every rank holds a shard alike)
    source = Path(path).expanduser()
    payload: dict[str, Any] = {}

    def refused_here() -> None:  # before anything loads: a refused checkpoint changes nothing
        payload.update(_read(source, map_location))
        _check_model_fits(source, _unwrap(model), payload["model"])
        _check_groups(source, payload["optimizer"], optimizer)

    # a selftune optimizer's load is a collective already (its check of the state)
    collective = every_rank or isinstance(optimizer, SelfTuned) or _loaded_on_every_rank(model)
    if shards.across_ranks() and collective:
        # in one collective: a file missing on one rank's node, or a model built otherwise
        # there, was refused on that rank alone, and the others waited in the optimizer's check
        # of the state or in DDP's next all-reduce; and a file of its own on each node, one of
        # them older, loaded, and the ranks went their own ways
        shards.refuse_on_every_rank(refused_here, f"load {source}", raises=CheckpointError)
        _check_same_step(source, payload)
    elif shards.across_ranks():
        try:
            refused_here()
        except CheckpointError as err:  # the other ranks were not told: say so, and how
            raise CheckpointError(
                f"{err} (this rank loaded alone, a plain module with a plain optimizer, and no "
                "other rank was told: where every rank loads, pass every_rank=True, and every "
                "rank refuses what one refuses)"
            ) from None
    else:
        refused_here()
    _check_tuning(source, payload["optimizer"], optimizer)
    try:
        _unwrap(model).load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source} does not fit this model: {exc}. Build the model the run was saved from"
        ) from None
    optimizer.load_state_dict(payload["optimizer"])
    _restore_guard_snapshots(optimizer, payload.get("guard_snapshots"))
    _set_rng_states(payload["rng"])
    return {"step": payload["step"], "extra": payload["extra"]}


def _refuse_sharded_model(model: torch.nn.Module, doing: str = "save") -> None:
    """A checkpoint is one file written by rank 0, which holds only its shard of a model that
    FSDP shards (``FullyShardedDataParallel``, ``fully_shard``): refuse it by name rather than
    save a part, or load into the shards a file of a whole model (whose check of fit gathered
    the whole model's state on every rank)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    kinds = (FullyShardedDataParallel, FSDPModule)
    if any(isinstance(m, kinds) for m in model.modules()):
        raise CheckpointError(
            "the model is sharded by FSDP (FullyShardedDataParallel or fully_shard), and a "
            "selftune checkpoint is one "
            f"file from rank 0, which holds only its shard: {doing} the model and the "
            "optimizer's own state with torch.distributed.checkpoint, and each rank's "
            "optimizer.state_dict()['selftune'] (the controller, the guard, the log position, "
            "a weight average of that rank's shard) in a file of that rank"
        )


def _loaded_on_every_rank(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one every rank loads, as DDP's is: its backward is a collective,
    and it syncs gradients, never weights, so a rank that loaded alone would train on other
    weights.  A plain optimizer's load was on the calling rank alone, and a file missing on
    one rank's node raised there while the others went on to DDP's next all-reduce and
    waited."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return any(isinstance(m, ddp) for m in model.modules())


def _model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's state dict, with its training weights where ``optimizer.averaged()`` has the
    weight average in their place (a save inside the block, after validating the average): a
    resume trains on from the training weights, as the run that saved it does."""
    module = _unwrap(model)
    state = module.state_dict()
    training = optimizer.training_weights() if isinstance(optimizer, SelfTuned) else {}
    if training:
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) in training and name in state:
                state[name] = training[id(param)]
    return state


#: containers walked entry by entry, and leaves a ``weights_only`` load always accepts
_CONTAINERS = (dict, OrderedDict, list, tuple, set)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _refuse_unloadable(payload: dict[str, Any], target: Path) -> None:
    """Raise :class:`CheckpointError` naming an entry that ``load_checkpoint`` could not read.

    Loading uses ``weights_only=True``, whose unpickler refuses what plain ``pickle`` writes
    happily (a numpy scalar, a Namespace, a dataclass): without this check such a checkpoint
    would replace the last good one and then be refused as damaged.  Tensors and plain values
    pass unexamined; any other value is saved and loaded on its own, in memory.
    """
    pending: list[tuple[str, Any]] = list(payload.items())
    seen: set[int] = set()  # a container met again (shared, or holding itself) is walked once
    while pending:
        where, value = pending.pop()
        if is_lazy(value):  # a Tensor that weights_only refuses
            raise CheckpointError(
                f"cannot save {where}, a lazy module's parameter not yet initialized, in "
                f"{target}: load_checkpoint could never read it. Run a forward pass first, "
                "which gives it its shape; the previous checkpoint is kept"
            )
        if isinstance(value, torch.Tensor) or type(value) in _PLAIN or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict) and type(value) in _CONTAINERS:
            for key, item in value.items():
                pending += [(f"a key of {where}", key), (f"{where}[{key!r}]", item)]
            continue
        if type(value) in _CONTAINERS:
            named = not isinstance(value, set)  # a set's items have no place to name
            pending += [
                (f"{where}[{i}]" if named else f"an item of {where}", item)
                for i, item in enumerate(value)
            ]
            continue
        try:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception:  # refused when pickled (a lambda) or when loaded (a numpy scalar)
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise CheckpointError(
                f"cannot save {where} (a {kind}) in {target}: load_checkpoint reads with "
                "weights_only=True, whose unpickler refuses it, so the checkpoint could never "
                "be loaded. Store tensors and plain Python values instead (float(x), x.item(), "
                "torch.from_numpy(x), vars(namespace)); the previous checkpoint is kept"
            ) from None


# --------------------------------------------------------------------------- reading


def _check_model_fits(source: Path, module: torch.nn.Module, saved: Any) -> None:
    """Refuse weights that do not fit ``module``, naming the keys and shapes that differ, before
    any is loaded: torch's strict load copies every tensor that fits and only then raises, so a
    refused checkpoint had overwritten part of the model."""
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{source} holds no model state dict: the checkpoint is damaged")
    if any(m._load_state_dict_pre_hooks for m in module.modules()):
        return  # a hook may rename the saved keys (a layer renamed since): torch's load judges
    ours = module.state_dict()
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    # the parameters' shapes alone: a buffer's may be the saved one's to take (a per-channel
    # quantization observer's scale, a module's extra state), which its own load resizes to
    shapes = [
        f"{k} saved {tuple(saved[k].shape)}, here {tuple(p.shape)}"
        for k, p in module.named_parameters(remove_duplicate=False)
        if isinstance(saved.get(k), torch.Tensor) and not is_lazy(p) and saved[k].shape != p.shape
    ]
    said = [
        f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
        for what, keys in [
            ("the checkpoint lacks", missing),
            ("the checkpoint has more", unexpected),
            ("shapes", shapes),
        ]
        if keys
    ]
    if not said:
        return
    compiled = "_orig_mod."  # the prefix of a torch.compile'd model's keys
    if {k.removeprefix(compiled) for k in saved} == {k.removeprefix(compiled) for k in ours}:
        said.append(
            "the run's model or this one was torch.compile'd and the other not: compile both, "
            "or neither"
        )
    else:
        said.append("build the model the run was saved from")
    raise CheckpointError(f"{source} does not fit this model ({'; '.join(said[:-1])}): {said[-1]}")


def _check_same_step(source: Path, payload: dict[str, Any]) -> None:
    """Refuse, on every rank, a checkpoint saved at another step on some rank than on rank 0
    (the loop's step, or the optimizer's own): a run folder on each node's own disk, one of
    them holding an older checkpoint, resumed the ranks at different steps and weights, with
    no word.  Files each rank saved itself (its own generators' states, a pipeline stage's
    weights) load.  A collective: every rank calls it."""
    own = payload["optimizer"].get("selftune") if isinstance(payload["optimizer"], dict) else None
    steps = (payload["step"], own.get("step") if isinstance(own, dict) else None)
    every = shards.gathered(steps)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            raise CheckpointError(
                f"rank {rank} loads another checkpoint than rank 0 (here {source}; rank "
                f"{rank}'s saved at step {theirs[0]}, its optimizer's at {theirs[1]}; rank 0's "
                f"at step {every[0][0]}, its optimizer's at {every[0][1]}): every rank resumes "
                "the same step, so save the checkpoint in a folder every node reads, or copy "
                "rank 0's to each"
            )


def _check_groups(source: Path, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state for other param groups than ``optimizer``'s, naming them."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        return  # not torch's layout: the optimizer's own load_state_dict judges it
    theirs = [len(g.get("params", ())) for g in groups]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise CheckpointError(
            f"{source} holds an optimizer state for param groups of {theirs} tensors, this "
            f"optimizer has {ours}: build the optimizer the run was saved from (and add the "
            "groups a run added mid-way again) before loading"
        )


def _check_tuning(source: Path, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse selftune's state that does not fit ``optimizer`` (another controller, another
    run folder's), naming why; warn where an unwrapped optimizer gets it."""
    own = saved.get("selftune") if isinstance(saved, dict) else None
    if not isinstance(own, dict):
        return
    if not isinstance(optimizer, SelfTuned):
        warnings.warn(
            f"{source} holds selftune's state (the tuned rates among it), and this optimizer is "
            "not wrapped: it resumes at its base rates, untuned. Wrap it with selftune.wrap "
            "before loading to resume the tuning",
            stacklevel=3,
        )
        return
    try:
        optimizer.check_fits(saved)
    except (ConfigError, LogError) as err:  # (LogError: a checkpoint of another run folder)
        raise CheckpointError(f"{source}: {err}") from None


def _read(source: Path, map_location: str | torch.device | None) -> dict[str, Any]:
    if not source.exists():
        if shards.across_ranks():  # the others may have it, on their nodes
            raise CheckpointError(
                f"no checkpoint at {source} on this rank's node: every rank loads the "
                "checkpoint, so save it in a folder every node reads, or copy it to each"
            )
        raise CheckpointError(
            f"no checkpoint at {source}: pass the path save_checkpoint wrote (a run that crashed "
            "before its first checkpoint starts from the beginning)"
        )
    if source.is_dir():
        raise CheckpointError(f"{source} is a folder, not a checkpoint file")
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # a damaged file fails deep in the unpickler, in many ways
        # named with its kind: a text file's is a KeyError whose message is a number, "101"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
        raise CheckpointError(
            f"{source} is damaged or is not a checkpoint ({what}); resume from an older "
            "checkpoint or start over"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{source} is not a selftune checkpoint (no format {FORMAT!r}); "
            "write it with selftune.checkpoint.save_checkpoint"
        )
    missing = [key for key in _REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}: the checkpoint is incomplete")
    return payload


# --------------------------------------------------------------------------- pieces


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` (and ``DataParallel``), else the model."""
    wrapped = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrapped) else model


def _guard_snapshots(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The guard's in-memory snapshots as plain data (``Snapshot`` itself is not loadable)."""
    guard = getattr(optimizer, "guard", None)
    return None if guard is None else guard.snapshots_state()


def _restore_guard_snapshots(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any] | list[dict[str, Any]] | None
) -> None:
    """Put the snapshots back after ``load_state_dict`` (which clears them)."""
    guard = getattr(optimizer, "guard", None)
    if guard is not None and saved is not None:
        # back to the host if the guard offloads (map_location may have put them on a device)
        guard.load_snapshots_state(on_host(saved) if guard.config.offload else saved)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": None,
        "numpy": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        # a plain form: weights_only loading refuses numpy arrays
        name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        states["numpy"] = {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    # a map_location such as "cuda" moved the saved states to the device; torch's generators and
    # numpy take them on the host
    states = on_host(states)
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if states.get("cuda") is not None and torch.cuda.is_available():
        _set_cuda_rng_states(states["cuda"])
    np = _numpy()
    saved = states.get("numpy")
    if np is not None and saved is not None:
        key = saved["key"].numpy().astype(np.uint32)
        np.random.set_state((saved["name"], key, saved["pos"], saved["has_gauss"], saved["gauss"]))


def _set_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Give each CUDA device here the generator state of the saved device of its index.

    A checkpoint of a machine with more devices (eight GPUs, resumed on one) set generators of
    devices that do not exist here: torch raised an IndexError from inside its generators (or,
    before CUDA's first use, at that use), after the model and the optimizer had loaded.  The
    states of the devices missing here are dropped, and said to be.
    """
    count = torch.cuda.device_count()
    for i, state in enumerate(saved[:count]):
        torch.cuda.set_rng_state(state, i)
    if len(saved) > count:
        warnings.warn(
            f"the checkpoint holds the random generator states of {len(saved)} CUDA devices, "
            f"this machine has {count}: those of devices {count}-{len(saved) - 1} are not "
            "restored, so what is drawn there is not what the run drew",
            stacklevel=4,
        )


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


# --------------------------------------------------------------------------- files


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries that writers killed mid-save left behind (one writer per path)."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every platform lets a folder be opened for this."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError that ``exc`` is or came from, if any.  torch.save meets a full disk in its
    zip writer's write, then raises a RuntimeError of its own as the writer closes ("unexpected
    pos 704 vs 598"), the OSError only its context: the user saw torch's message, which names
    neither the disk nor the checkpoint."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        if isinstance(found, OSError):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None
