"""Several optimizers over disjoint parameters, stepped as one: what selftune wraps when a model
trains under two (``selftune.wrap([muon, adamw])``).

torch's ``Muon`` orthogonalizes the updates of 2-D weights only, and trains beside an optimizer
that takes the rest (the biases, norms and embeddings); a sparse embedding's ``SparseAdam``
trains beside a dense optimizer.  Wrapped one by one, each optimizer had a guard of its own that
rolled back its own parameters alone, so a spike seen in one optimizer's gradients rolled back
half the model and left the other half where it stood, and the run's decisions lay in two logs
that replayed apart.  Combined, one guard judges the whole step and rolls every part back
together, one log holds every decision, and each param group is still tuned from its own
signals (or all as one, with ``groups="joint"``).

A :class:`Combined` is a ``torch.optim.Optimizer`` of its own: its ``param_groups`` are its
optimizers' groups in order (the same dicts, so a rate written into one is the rate that
optimizer steps at), its ``state`` is theirs, merged, and its ``state_dict`` is torch's format
over all their parameters, numbered in that order, so checkpoint code written for one optimizer
saves and loads it unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from selftune import shards
from selftune.errors import ConfigError
from selftune.hooks import StepGate, stepping_inside

#: an attribute set on each optimizer a :class:`Combined` holds (two would both step it)
_COMBINED = "_selftune_combined"


class Combined(torch.optim.Optimizer):
    """The optimizers given, stepped one after another as one optimizer.

    ``Combined(muon, adamw)`` or ``Combined([muon, adamw])``: each over parameters of its own.
    ``step(closure)`` calls the closure once and steps every optimizer; ``zero_grad`` zeroes
    every one's gradients.  Each optimizer is then stepped through this one only: a step of
    one alone (a reference the loop kept) is refused before it moves a weight, since the
    groups and state this one holds are theirs.  ``add_param_group`` is refused: which of them
    a new group would join is not for torch's signature to say, so add it to that optimizer
    before combining.
    """

    def __init__(
        self, *optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
    ) -> None:
        given: tuple[Any, ...] = optimizers
        if len(optimizers) == 1 and isinstance(optimizers[0], list | tuple):
            given = tuple(optimizers[0])
        _check_parts(given)
        self._setup(given)

    def _setup(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        """Hold ``optimizers``: at the build, and in a copy, around the copied ones."""
        self.optimizers = optimizers
        #: each parameter's optimizer, by the parameter's id (the state's keys are parameters)
        self._owner = {id(p): o for o in optimizers for g in o.param_groups for p in g["params"]}
        self._view = _MergedState(self)
        # torch's __setstate__ sets up the hook registries and patches ``step`` for them, as
        # __init__ would, without building groups of its own: the groups are the optimizers'.
        # The defaults are those every optimizer shares, and each group holds already: torch
        # (and a wrapper) fill a group's missing settings from them, and another optimizer's
        # setting in a group (Adam's betas in Muon's) is a knob selftune would tune there.
        shared = set.intersection(*(set(o.defaults) for o in optimizers))
        defaults = {k: v for k, v in optimizers[0].defaults.items() if k in shared}
        super().__setstate__({"defaults": dict(defaults)})
        self.defaults = defaults  # (torch's adds "differentiable", which not every group has)
        self._stepping_inner = False  #: stepping its optimizers now (``hooks.stepping_inside``)
        self._gates = [o.register_step_pre_hook(StepGate(self)) for o in optimizers]
        for o in optimizers:
            setattr(o, _COMBINED, True)

    def _take_apart(self) -> None:
        """Hand the optimizers back as they were given (no gate, no mark), for a combination
        that ``wrap`` or ``replay`` built from a list and then refused: the list given again,
        mended, was refused as already combined."""
        for gate in self._gates:
            gate.remove()
        for o in self.optimizers:
            if in_combined(o):
                delattr(o, _COMBINED)

    # -- the optimizers' containers, shared rather than copied --------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        """Hand each optimizer its own groups back (torch's ``load_state_dict`` builds new
        ones for all, in order)."""
        groups = list(groups)
        counts = [len(o.param_groups) for o in self.optimizers]
        if len(groups) != sum(counts):
            raise ConfigError(
                f"{len(groups)} param groups given to a Combined of {sum(counts)} "
                f"({', '.join(map(str, counts))} per optimizer): each keeps the groups it had"
            )
        at = 0
        for o, count in zip(self.optimizers, counts, strict=True):
            o.param_groups = groups[at : at + count]
            at += count

    @property  # type: ignore[override]
    def state(self) -> MutableMapping[torch.Tensor, Any]:
        return self._view

    @state.setter
    def state(self, value: Mapping[torch.Tensor, Any]) -> None:
        """Hand each optimizer the state of its own parameters (torch's ``load_state_dict``
        builds a new state for all)."""
        if value is self._view:
            return
        parts: dict[int, defaultdict[torch.Tensor, Any]] = {
            id(o): defaultdict(dict) for o in self.optimizers
        }
        for param, entries in value.items():
            parts[id(self._owner_of(param))][param] = entries
        for o in self.optimizers:
            o.state = parts[id(o)]

    def _owner_of(self, param: Any) -> torch.optim.Optimizer:
        owner = self._owner.get(id(param))
        if owner is None:
            raise KeyError(f"{type(param).__name__} is no parameter of this Combined's")
        return owner

    # -- stepping ----------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Call ``closure`` once, if given, and step every optimizer in turn; return what the
        closure returned."""
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        with stepping_inside(self):
            for o in self.optimizers:
                o.step()
        return result

    def _stepped_past(self, optimizer: torch.optim.Optimizer) -> str:
        """Why its :class:`~selftune.hooks.StepGate` refuses a step of one of its optimizers
        made past it: their groups and state are its own."""
        return (
            f"this {type(optimizer).__name__} is one of a {self!r}'s optimizers and was "
            "stepped alone, past it: step the Combined (or the selftune wrapper around it), "
            "which steps every optimizer it holds"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ConfigError(
            "Combined.add_param_group: which of its optimizers a new group joins is not for "
            "torch's add_param_group to say. Add the group to that optimizer before combining "
            "(build it with every group it will train), or combine anew"
        )

    # -- copies and pickles ------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "optimizers": self.optimizers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` sets the groups and state through here: they go to the
        optimizers.  An unpickled copy arrives with its optimizers instead, and is set up
        around them (their copied gates let every step through)."""
        if "optimizers" in state:
            self._setup(tuple(state["optimizers"]))
        if state.get("param_groups") is not None:
            self.param_groups = state["param_groups"]
        if state.get("state") is not None:
            self.state = state["state"]

    def __repr__(self) -> str:
        return f"Combined({', '.join(type(o).__name__ for o in self.optimizers)})"


def defaults_of(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> Mapping[str, Any]:
    """The defaults that ``group``'s settings are read against (:func:`~selftune.tuner.
    group_options`): inside a :class:`Combined`, those of the optimizer that holds it (the
    Combined's own are only those every optimizer shares)."""
    for part in parts(optimizer):
        if any(g is group for g in part.param_groups):
            return part.defaults
    return optimizer.defaults


#: what ``wrap`` and ``replay`` take: an optimizer, or several to combine
Optimizers = torch.optim.Optimizer | list[torch.optim.Optimizer] | tuple[torch.optim.Optimizer, ...]


@contextmanager
def as_one(optimizer: Optimizers) -> Iterator[torch.optim.Optimizer]:
    """``optimizer``, or the :class:`Combined` of a list or tuple of them, taken apart again
    where what is built on it inside the block is refused (a refused wrap leaves the
    optimizers as they were, free to be wrapped again)."""
    if not isinstance(optimizer, list | tuple):
        yield optimizer
        return
    combined = Combined(*optimizer)
    try:
        yield combined
    except BaseException:
        combined._take_apart()
        raise


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What a run's manifest and state dict name its optimizer by, and a resume or replay
    checks: its class, or for a :class:`Combined` its optimizers' in order
    (``Combined(Muon, AdamW)``), which a replay through them in another order would not be."""
    return repr(optimizer) if isinstance(optimizer, Combined) else type(optimizer).__name__


def in_combined(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is one of a :class:`Combined`'s, which steps it."""
    return bool(getattr(optimizer, _COMBINED, False))


def held_state(optimizer: torch.optim.Optimizer) -> defaultdict[torch.Tensor, Any]:
    """``optimizer``'s state as a container that outlives a ``load_state_dict`` (a rollback
    fills it with what it loads, and puts it back): the state itself, or a :class:`Combined`'s
    entries in a dict of their own, since its merged state reads its optimizers' states, which
    the load replaces."""
    state = optimizer.state
    return defaultdict(dict, state.items()) if isinstance(optimizer, Combined) else state


def parts(optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers that step ``optimizer``'s groups: a :class:`Combined`'s, or itself."""
    return optimizer.optimizers if isinstance(optimizer, Combined) else (optimizer,)


class _MergedState(MutableMapping[torch.Tensor, Any]):
    """Every optimizer's state as one mapping, read and written through to the optimizer that
    holds the parameter: entries an optimizer creates at its first step are seen at once, and
    torch's ``state_dict`` of a :class:`Combined` packs them all."""

    def __init__(self, combined: Combined) -> None:
        self._combined = combined

    def _holder(self, param: torch.Tensor) -> MutableMapping[torch.Tensor, Any]:
        return self._combined._owner_of(param).state

    def __getitem__(self, param: torch.Tensor) -> Any:
        return self._holder(param)[param]  # (an optimizer's defaultdict makes an empty entry)

    def __setitem__(self, param: torch.Tensor, value: Any) -> None:
        self._holder(param)[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._holder(param)[param]

    def __contains__(self, param: object) -> bool:
        owner = self._combined._owner.get(id(param))
        return owner is not None and param in owner.state

    def get(self, param: torch.Tensor, default: Any = None) -> Any:
        owner = self._combined._owner.get(id(param))
        return default if owner is None else owner.state.get(param, default)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for o in self._combined.optimizers:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._combined.optimizers)

    def clear(self) -> None:
        for o in self._combined.optimizers:
            o.state.clear()


def _check_parts(optimizers: tuple[Any, ...]) -> None:
    """Refuse what cannot be combined, before any optimizer is touched."""
    from selftune.tuner import _WRAPPED, SelfTuned  # (the wrapper wraps a Combined: late)

    if not optimizers:
        raise ConfigError("Combined needs at least one optimizer: Combined(muon, adamw)")
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ConfigError("the same optimizer was given twice: give each once")
    seen: dict[int, int] = {}  # parameter id -> the position of its optimizer
    for k, o in enumerate(optimizers):
        name = type(o).__name__
        if isinstance(o, SelfTuned):
            raise ConfigError(
                f"optimizer {k} is a selftune wrapper: combine the plain optimizers, and wrap "
                "the combination once (selftune.wrap([muon, adamw]))"
            )
        if not isinstance(o, torch.optim.Optimizer):
            raise ConfigError(f"optimizer {k} is a {name}, not a torch.optim.Optimizer")
        if in_combined(o) or getattr(o, _WRAPPED, False):
            raise ConfigError(
                f"optimizer {k} ({name}) already belongs to a Combined or a selftune wrapper, "
                "which steps it: build a new optimizer"
            )
        if isinstance(o, torch.optim.LBFGS):
            raise ConfigError(
                f"optimizer {k} is an LBFGS, which calls its closure again in its line search: "
                "a Combined calls the closure once for all its optimizers. Use LBFGS alone"
            )
        if shards.zero_redundancy(o):
            raise ConfigError(
                f"optimizer {k} is a ZeroRedundancyOptimizer, whose state lives sharded across "
                "ranks: it cannot be combined. Wrap it alone"
            )
        for g in o.param_groups:
            for p in g["params"]:
                if id(p) in seen and seen[id(p)] != k:
                    raise ConfigError(
                        f"a parameter of shape {tuple(p.shape)} is trained by optimizers "
                        f"{seen[id(p)]} and {k}: each parameter must belong to one optimizer "
                        "(Muon takes the 2-D weights, the other optimizer the rest)"
                    )
                seen[id(p)] = k
