"""Controllers, selectable by name.  A new controller is one module and one entry below."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from selftune.controllers.auto import AutoController
from selftune.controllers.base import Controller, Knobs, Proposal
from selftune.controllers.hypergradient import HypergradientController
from selftune.controllers.off import OffController
from selftune.controllers.stability import StabilityController
from selftune.errors import ConfigError

CONTROLLERS: dict[str, Callable[..., Controller]] = {
    "auto": AutoController,
    "hypergradient": HypergradientController,
    "stability": StabilityController,
    "off": OffController,
}


def make_controller(name: str | Controller, **kwargs: Any) -> Controller:
    """A controller from its registry name (or an instance, returned as is)."""
    if not isinstance(name, str):
        if isinstance(name, type):  # the protocol's check passes a class, whose methods exist
            raise ConfigError(
                f"controller={name.__name__} is a class: pass an instance, "
                f"{name.__name__}(...), or a name such as 'auto'"
            )
        if isinstance(name, Controller):
            if kwargs:  # they would be dropped silently
                raise ConfigError(
                    f"controller options {sorted(kwargs)} go with a controller's name; an "
                    f"instance is built with its own: {type(name).__name__}(...)"
                )
            if not isinstance(name.name, str) or not name.name:  # the log, a state dict and
                # a resume tell controllers apart by it: one of None took any other's state
                raise ConfigError(
                    f"controller {type(name).__name__}: its name is {name.name!r}; give it a "
                    "name in words, a non-empty str (the run's manifest records it)"
                )
            _check_methods(name)
            options = getattr(name, "options", {})
            if not isinstance(options, Mapping):  # dict() of it raised from inside the wrap
                raise ConfigError(
                    f"controller {name.name!r}: its options are {options!r}; give a dict of "
                    "how it was built, e.g. {'patience': 50}, which goes into the run's manifest"
                )
            return name
        members = ("name", "propose", "on_backoff", "state_dict", "load_state_dict")
        missing = [m for m in members if not hasattr(name, m)]
        lacks = f": it lacks {', '.join(missing)}" if missing else ""
        raise ConfigError(
            f"controller must be a name or a Controller, got {type(name).__name__}{lacks} "
            "(a controller of one's own has a name: str and the four methods of Controller)"
        )
    if name not in CONTROLLERS:
        raise ConfigError(f"unknown controller {name!r}; choose one of {sorted(CONTROLLERS)}")
    try:
        return CONTROLLERS[name](**kwargs)
    except TypeError as err:
        takes = [p for p in inspect.signature(CONTROLLERS[name]).parameters if p != "self"]
        import selftune  # wrap's own keywords, read off its signature

        own = inspect.signature(selftune.wrap).parameters.values()
        wraps = [p.name for p in own if p.kind is p.KEYWORD_ONLY or p.name == "controller"]
        raise ConfigError(
            f"bad options for controller {name!r}: {err}. wrap() hands every keyword it does "
            f"not take itself ({', '.join(wraps)}) to the controller, which takes "
            + (", ".join(takes) if takes else "none")
        ) from None


#: the arguments the wrapper calls each method of a controller with, and a signature for words
_CALLS: dict[str, tuple[int, str]] = {
    "propose": (2, "propose(self, signals, knobs)"),
    "on_backoff": (1, "on_backoff(self, step)"),
    "state_dict": (0, "state_dict(self)"),
    "load_state_dict": (1, "load_state_dict(self, state)"),
    "take_restart": (0, "take_restart(self)"),
    "before_rollback": (1, "before_rollback(self, knobs)"),
}


def _check_methods(controller: Controller) -> None:
    """Refuse a controller whose method cannot take the arguments the wrapper calls it with.

    ``on_backoff(self)`` without its step raised a TypeError from inside the guard at the
    first rollback, hours into a run, and left the step broken part-way.
    """
    for method, (count, signature) in _CALLS.items():
        call = getattr(controller, method, None)
        if call is None:  # take_restart and before_rollback are optional
            continue
        try:
            inspect.signature(call).bind(*[None] * count)
        except ValueError:  # no signature to read (a builtin): it is taken on trust
            continue
        except TypeError:
            raise ConfigError(
                f"controller {controller.name!r}: {method} cannot be called as the wrapper "
                f"calls it; define it as {signature}"
            ) from None


__all__ = ["CONTROLLERS", "Controller", "Knobs", "Proposal", "make_controller"]
