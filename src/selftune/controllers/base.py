"""The controller protocol: what every controller implements, and the record it returns."""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any, Protocol, runtime_checkable

from selftune.errors import ConfigError
from selftune.signals import Signals

#: knob values per param group, e.g. ``[{"lr": 0.01, "momentum": 0.9}]`` (effective values)
Knobs = list[dict[str, float]]


@dataclass(frozen=True)
class Proposal:
    """A controller's wish for one knob of one param group, with the reason in words."""

    group: int
    knob: str
    value: float
    reason: str
    #: ``value`` is the stored value itself (the scale, for ``lr``) and bypasses the policy:
    #: only replay, which re-applies values the policy already passed, sets it
    raw: bool = False


@runtime_checkable
class Controller(Protocol):
    """Turns one step's :class:`~selftune.signals.Signals` into proposed knob values.

    ``propose`` is called once per optimizer step that will be applied, before the update, with
    the knobs now in force; it returns only the knobs it wants to change.  The policy then clips
    each proposal (a knob proposed twice ends at the second, held to one step's limit).  What
    the wrapper cannot take (no finite number, no group there is, a negative rate) it refuses
    (:func:`~selftune.controllers.base.checked`).  Where ``propose`` raises, or a proposal is
    refused, the step is taken without the controller's proposals, logged with a note of why,
    and ``step`` then raises :class:`ControllerError` (the original as its ``__cause__``): the
    run goes on from the next step, and replays.  So too where ``before_rollback``,
    ``load_state_dict`` or ``on_backoff`` raises at the guard's rollback (``load_state_dict`` at
    a relevel, or a trial gone forward): the guard's step is taken as the guard made it.  Where
    ``state_dict`` raises as the guard takes a snapshot, the step is taken without that
    snapshot (the guard keeps its older one); as ``opt.state_dict()`` saves, it raises
    :class:`ControllerError` and saves nothing, and the run steps on.
    Under ``torch.distributed`` a controller of one's own that fails on one rank fails the step
    on every rank alike, and so does one that proposes otherwise on some rank than on rank 0
    (its state, or what it read, differs there): a gather of a flag and a digest of the
    proposals more, at its steps.
    ``on_backoff`` tells the controller that the guard rolled the run back and cut the rate, so
    that it does not undo the cut at once.  State must be plain JSON-able values:
    ``load_state_dict(state_dict())`` on a fresh instance must reproduce every future proposal.
    A controller may set ``reads_buffer = False`` to spare the step the momentum-buffer
    alignment signal (one more fused pass over the parameters) when it does not read it.
    One that reads the rate as the step's size may set ``corrects_rmsprop_warmup = True``
    (the built-in ones that tune the rate do): an RMSprop group then steps at its rate times
    :func:`selftune.knobs.rmsprop_warmup`, the run's manifest says so and a replay does so too.
    A controller may also define ``take_restart() -> str | None``, asked once per applied step
    after ``propose``: a reason asks the wrapper to restart from the oldest guard snapshot with
    the knobs just proposed, held to the policy's bounds but not to its per-step limit (``auto``
    does so when its range test damaged the run).  And it may
    define ``before_rollback(knobs)``, called when the guard rolls back, with the knobs that
    failed, before its state is restored to the snapshot's: what it learnt there (which rate
    broke the run) would otherwise be lost with the restore; ``on_backoff`` follows.
    And a dict ``options``, if it has one, of how it was built (the built-in ones: their
    options set off the defaults, :func:`options_set`) goes into the run's manifest.
    An instance tunes one optimizer: its state follows that run, so two wrappers that step
    one instance in turn are refused (give each optimizer its own, ``copy.deepcopy``).
    """

    name: str

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]: ...

    def on_backoff(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Option:
    """The range of one controller option: a real number (a whole one if ``whole``) from ``low``
    to ``high``, each end excluded when ``open_low`` / ``open_high``; ``what`` it sets and an
    ``example`` of a good value, both quoted when a value is refused."""

    what: str
    example: str
    low: float
    _: KW_ONLY
    high: float = math.inf
    open_low: bool = False
    open_high: bool = True
    whole: bool = False

    @property
    def bounds(self) -> str:
        """The range as an interval, e.g. ``(0, 1]``."""
        low, high = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"{low}{self.low:g}, {self.high:g}{high}"


def check_options(ranges: dict[str, Option], values: dict[str, Any]) -> None:
    """Refuse the value in ``values`` of any option of ``ranges`` that lies outside its range,
    with a :class:`ConfigError` that names the option, what it sets, its range and a good value.

    An option out of range does not fail where it is given but steps later, or never: a ramp of
    0.9 shrinks the rate where the range test should grow it, a retreat above 1 climbs after a
    failure.  So each controller's constructor checks all of its options here, at once, passing
    its ``locals()`` (other names in ``values`` are not read).
    """
    for name, r in ranges.items():
        value = values[name]
        kind = "a whole number" if r.whole else "a number"
        number = is_number(value) and (not r.whole or isinstance(value, numbers.Integral))
        if not number or not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} ({r.what}): give {kind}, e.g. {r.example}")
        too_low = value <= r.low if r.open_low else value < r.low
        too_high = value >= r.high if r.open_high else value > r.high
        if too_low or too_high:
            raise ConfigError(
                f"{name}={value!r} ({r.what}) is outside {r.bounds}: use, e.g., {r.example}"
            )


def check_flags(flags: dict[str, str], values: dict[str, Any]) -> None:
    """Refuse a value of any of ``flags`` (name: what True and False do) that is not a bool,
    naming it and both choices: a string "False" from a config file is truthy, and read as
    True it would do the opposite of what was asked, silently."""
    for name, choices in flags.items():
        if not isinstance(values[name], bool):
            raise ConfigError(f"{name}={values[name]!r}: give {choices}")


def options_set(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The options of ``cls``'s constructor that ``values`` (its ``locals()``) sets off their
    defaults, as plain numbers: the run's manifest records them, so that a log of ``auto`` with
    no range test says so whether ``wrap`` built the controller by name or was given one."""
    chosen: dict[str, Any] = {}
    for p in inspect.signature(cls).parameters.values():
        value = values[p.name]
        if p.default is not p.empty and value != p.default:
            if is_number(value):  # numpy's scalars too, which JSON would refuse
                value = int(value) if isinstance(value, numbers.Integral) else float(value)
            chosen[p.name] = value
    return chosen


def is_number(value: object) -> bool:
    """A real number, numpy's scalars too (a value read off a config or a sweep), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def checked(controller: Controller, proposals: Any, knobs: Knobs) -> list[Proposal]:
    """A controller's proposals, refused by name before any is applied where they are not a
    list of :class:`Proposal` for the knobs of a group there is, each a finite number, and a
    rate not below zero.

    A controller of one's own that erred failed deep inside the wrapper (an IndexError, a
    NoneType not iterable), applied a group of -1 to the last group (and the log then failed
    ``verify``), or stored a tensor as the rate or an object as the reason, refused by the log after
    the step was taken.  A negative rate was clipped to the policy's bounds with no word, though
    it is no rate to tune towards: no built-in controller proposes one (each moves the rate in
    force, never below zero, by a positive factor), so it is a bug of the controller.  A rate
    above zero past the bounds is clipped as before, and so is a momentum or beta below zero,
    which ``hypergradient`` with a large ``momentum_gain`` can propose.
    """
    name = getattr(controller, "name", type(controller).__name__)
    if not isinstance(proposals, list | tuple):
        raise ConfigError(
            f"controller {name!r}: propose() returned {type(proposals).__name__}; return a list "
            "of selftune.Proposal (empty for no change)"
        )
    for p in proposals:
        if not isinstance(p, Proposal):
            raise ConfigError(
                f"controller {name!r}: propose() returned a {type(p).__name__} in its list; "
                "return selftune.Proposal(group, knob, value, reason) for each change"
            )
        group = p.group
        whole = isinstance(group, numbers.Integral) and not isinstance(group, bool)
        if not whole or not 0 <= group < len(knobs):
            raise ConfigError(
                f"controller {name!r}: a proposal for group {group!r}, and the optimizer has "
                f"param groups 0 to {len(knobs) - 1}"
            )
        if p.knob not in knobs[group]:
            raise ConfigError(
                f"controller {name!r}: a proposal for knob {p.knob!r} of group {group}, whose "
                f"knobs are {sorted(knobs[group])}"
            )
        value = p.value
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ConfigError(
                f"controller {name!r}: proposed {p.knob}={value!r} for group {group}; give a "
                "finite float (a tensor's .item())"
            )
        if p.knob == "lr" and value < 0:  # no built-in proposes one: a bug, not a wish
            raise ConfigError(
                f"controller {name!r}: proposed lr={value!r} for group {group}, a negative "
                "rate, which climbs the loss; propose a rate of at least 0 (the policy holds "
                "it to its bounds), or no proposal to keep the rate"
            )
        if p.raw and not getattr(controller, "replays_log", False):  # it passed no bound,
            # limit or frozen knob, and was taken as the rate's scale, not the rate
            raise ConfigError(
                f"controller {name!r}: a proposal for {p.knob} of group {group} with raw=True, "
                "which only replay sets (a value the policy passed when it was logged); leave "
                "raw at False and propose the knob's value, which the policy holds to its bounds"
            )
        if not isinstance(p.reason, str):
            raise ConfigError(
                f"controller {name!r}: a proposal for {p.knob} of group {group} gave the reason "
                f"{p.reason!r}; give the reason in words, a str"
            )
    # as plain numbers: numpy's (an index or a value read off an array) are refused by the
    # log's JSON, a float32 after the step was taken
    return [
        p
        if type(p.group) is int and type(p.value) is float  # the usual case: no copy a step
        else replace(p, group=int(p.group), value=float(p.value))
        for p in proposals
    ]
