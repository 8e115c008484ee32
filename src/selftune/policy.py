"""The user's limits, applied to every proposal a controller makes.

A controller proposes; the policy disposes.  Every proposal is clipped to the knob's bounds and to
the largest change allowed in one step, and knobs the user froze never move.  A clipped decision
says so in its reason, so the audit log shows both what the controller wanted and what happened.
The per-step limit guards a trajectory against one decision's harm, so what abandons the
trajectory is held to the bounds only: a guard rollback's knobs, and the decisions of a step in
which the controller restarts from a snapshot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from selftune.controllers.base import is_number
from selftune.errors import ConfigError
from selftune.knobs import ALL_KNOBS

#: Default bounds.  ``lr`` is bounded *relative to the rate the run started with*: three decades
#: below, since a rate driven towards zero stalls the run silently and no guard sees it; five
#: above, since a rate too high shows as a spike the guard rolls back, and a start as low as
#: 1e-5 must be able to reach the rates SGD trains at (up to 3 in the benchmark).  The bound is a
#: safety limit, not a tuner: at three decades above it had stopped ramps at the good rate by
#: coincidence in some runs and below it in others (pilot 49 in ``bench-results/pilots``).
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "lr": (1e-3, 1e5),
    "momentum": (0.0, 0.995),
    "beta1": (0.5, 0.995),
    "beta2": (0.9, 0.99999),
}
#: Largest change per step: a factor for ``lr`` (multiplicative, so scale-free), an absolute
#: amount for the momentum-like knobs (which live in [0, 1)).
DEFAULT_MAX_CHANGE: dict[str, float] = {"lr": 4.0, "momentum": 0.02, "beta1": 0.02, "beta2": 0.001}


@dataclass(frozen=True)
class Policy:
    """Bounds per knob, the largest change per step, and the knobs that must not move.

    ``bounds["lr"]`` is a pair of factors applied to each group's starting learning rate unless
    ``lr_bounds_absolute`` is set, in which case it is a pair of learning rates.  ``beta2`` is
    frozen by default: changing Adam's second-moment horizon mid-run rescales every past step size.
    """

    #: the knobs given, each other knob at its default (so that one given by hand is known)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    max_change: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_CHANGE))
    #: knob names, kept as a frozenset (one name given as a str is one knob)
    frozen: Iterable[str] = frozenset({"beta2"})
    lr_bounds_absolute: bool = False

    def __post_init__(self) -> None:
        # checked here, not only in build: a Policy built by hand for SelfTuned(policy=...)
        # took frozen="lr" for the knobs "l" and "r", and a bounds of 5 raised dict()'s TypeError
        for arg, given, example in (
            ("bounds", self.bounds, '{"lr": (1e-3, 1e5)}'),
            ("max_change", self.max_change, '{"lr": 2.0}'),
        ):
            if not isinstance(given, Mapping):
                raise ConfigError(
                    f"{arg}={given!r}: give a mapping from knob to value, e.g. {arg}={example}"
                )
        frozen = self.frozen
        if not isinstance(frozen, str | Iterable):
            raise ConfigError(f"frozen={frozen!r}: give knob names, e.g. frozen={{'beta2'}}")
        if not isinstance(self.lr_bounds_absolute, bool):
            raise ConfigError(f"lr_bounds_absolute={self.lr_bounds_absolute!r}: give True or False")
        if self.lr_bounds_absolute and "lr" not in self.bounds:
            # the default factors read as rates: (1e-3, 1e5) put the floor above most starts
            raise ConfigError(
                'lr_bounds_absolute=True needs bounds={"lr": (low, high)}, the rates it makes '
                "absolute; without it the rate's bounds are factors of its start"
            )
        for name, pair in dict(self.bounds).items():
            if not (
                isinstance(pair, tuple | list) and len(pair) == 2 and all(map(is_number, pair))
            ):
                raise ConfigError(f"bounds for {name}: give a pair (low, high), got {pair!r}")
        for name, limit in dict(self.max_change).items():
            if not is_number(limit):
                raise ConfigError(f"max_change for {name}: give a number, got {limit!r}")
        bounds = {**DEFAULT_BOUNDS, **dict(self.bounds)}
        max_change = {**DEFAULT_MAX_CHANGE, **dict(self.max_change)}
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "max_change", max_change)
        # one name is one knob, not the letters of one
        object.__setattr__(
            self, "frozen", frozenset([frozen] if isinstance(frozen, str) else frozen)
        )
        for name in [*bounds, *max_change, *self.frozen]:
            if name not in ALL_KNOBS:
                raise ConfigError(f"unknown knob {name!r} in policy; knobs are {list(ALL_KNOBS)}")
        for name, (lo, hi) in bounds.items():
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ConfigError(f"bounds for {name} must be finite, got ({lo}, {hi})")
            if not lo < hi:
                raise ConfigError(
                    f"bounds for {name} are out of order: ({lo}, {hi}); pass (low, high)"
                )
            if name == "lr" and lo <= 0:
                raise ConfigError(f"bounds for lr must be > 0, got ({lo}, {hi})")
            if name != "lr" and not (lo >= 0.0 and hi < 1.0):
                raise ConfigError(f"bounds for {name} must lie in [0, 1), got ({lo}, {hi})")
        for name, limit in max_change.items():
            floor = 1.0 if name == "lr" else 0.0
            if not (math.isfinite(limit) and limit > floor):
                raise ConfigError(
                    f"max_change for {name} must be finite and > {floor}, got {limit}"
                    + (" (it is a factor per step, e.g. 2.0)" if name == "lr" else "")
                )

    @classmethod
    def build(
        cls,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        max_change: Mapping[str, float] | None = None,
        frozen: Iterable[str] | None = None,
        *,
        lr_bounds_absolute: bool = False,
    ) -> Policy:
        """The policy :func:`selftune.wrap` builds from its keyword arguments."""
        return cls(
            bounds={} if bounds is None else bounds,
            max_change={} if max_change is None else max_change,
            frozen={"beta2"} if frozen is None else frozen,
            lr_bounds_absolute=lr_bounds_absolute,
        )

    def limits(self, knob: str, start: float, within: Iterable[float] = ()) -> tuple[float, float]:
        """The absolute bounds of ``knob`` for a group whose starting value was ``start``,
        widened to the values of ``within``.

        A run that starts outside the bounds may stay where the user put it; so may a value a
        bound did not put there (``within``: the rate now in force, and the rate an LR scheduler
        set, which may decay below the floor): a bound stops a move, it never makes one.
        """
        lo, hi = self.bounds[knob]
        if knob == "lr" and not self.lr_bounds_absolute:
            lo, hi = lo * start, hi * start
        kept = (start, *within)
        return min(lo, *kept), max(hi, *kept)

    def clip(
        self,
        knob: str,
        old: float,
        proposed: float,
        start: float,
        within: Iterable[float] = (),
        since: float | None = None,
    ) -> tuple[float, str | None]:
        """Return the value allowed and, if it differs from the proposal, why (``within``: see
        :meth:`limits`).

        ``since``: the rate the last step took, where a scheduler has raised it since to
        ``old``.  A move back between the two is no step at all for the run, so the per-step
        limit is counted from whichever is nearer (``auto``'s hold of a warm-up that rose more
        than the limit in one step was clipped, and the run stepped at the rest of the rise).
        """
        if knob in self.frozen:
            return old, f"{knob} is frozen by the policy"
        if not math.isfinite(proposed):
            return old, f"proposal {proposed} is not finite; kept {old:.6g}"
        value, notes = proposed, []
        limit = self.max_change[knob]
        if knob == "lr":
            low, high = (old, old) if since is None else (min(old, since), max(old, since))
            lo_step, hi_step = low / limit, high * limit
        else:
            lo_step, hi_step = old - limit, old + limit
        if not lo_step <= value <= hi_step:
            value = min(max(value, lo_step), hi_step)
            notes.append(f"step limited to {'x' if knob == 'lr' else '+-'}{limit:g}")
        lo, hi = self.limits(knob, start, within)
        if not lo <= value <= hi:
            value = min(max(value, lo), hi)
            notes.append(f"bounded to [{lo:.3g}, {hi:.3g}]")
        return value, ("clipped: " + ", ".join(notes)) if notes else None


def misfits(
    bounds: Mapping[str, tuple[float, float]],
    max_change: Mapping[str, float],
    policy: Policy,
    optimizer: str,
    starts: list[dict[str, float]],
) -> list[str]:
    """What the settings given to :func:`selftune.wrap` ask that this optimizer cannot do, in
    words for a warning: a knob no param group has (``momentum`` for Adam, whose is ``beta1``),
    or one the policy freezes (``beta2`` by default), whose bound or limit does nothing; factors
    for the rate that leave out its start; and a momentum or beta1 that starts outside the
    bounds given for it, where the run may stay (a bound stops a move and never makes one),
    though a user who gave the bounds meant it inside them.  All were silent.  (A rate outside
    absolute bounds is told at the first step, :func:`start_misfits`: a scheduler built after
    the wrap sets its start then.)

    ``bounds`` and ``max_change`` as given, not the defaults (``frozen`` does what it says of a
    knob the optimizer has not, which never moves); ``starts``: each group's knobs at the wrap.
    """
    given = {"bounds": bounds, "max_change": max_change}
    out = []
    has = {name for group in starts for name in group}
    twin = {"momentum": "beta1", "beta1": "momentum"}
    for knob in ALL_KNOBS:
        args = [arg for arg, names in given.items() if knob in names]
        verb = "names" if len(args) == 1 else "name"
        if args and knob not in has:
            hint = (
                f" ({optimizer}'s counterpart of {knob} is {twin[knob]})"
                if twin.get(knob) in has
                else ""
            )
            out.append(
                f"{' and '.join(args)} {verb} {knob}, a knob no param group of this {optimizer} "
                f"has (its knobs: {', '.join(k for k in ALL_KNOBS if k in has)}): the setting "
                f"does nothing{hint}"
            )
        elif args and knob in policy.frozen and knob != "lr":  # a frozen rate's bounds still
            # hold the guard's rollbacks
            out.append(
                f"{' and '.join(args)} {verb} {knob}, which the policy freezes (frozen="
                f"{sorted(policy.frozen)}): it never moves, and the setting does nothing. To "
                f"tune {knob}, give frozen without it"
            )
    lr = bounds.get("lr")
    if lr is not None and not policy.lr_bounds_absolute and not lr[0] <= 1.0 <= lr[1]:
        out.append(
            f"the bounds given for lr, ({lr[0]:g}, {lr[1]:g}), are factors of each group's "
            "starting rate that leave out the start itself (1): the run may stay at its start, "
            "and a controller may take it back there. Give factors around 1, or "
            "lr_bounds_absolute=True for bounds that are rates"
        )
    for i, group in enumerate(starts):
        for knob, (lo, hi) in bounds.items():
            start = group.get(knob)
            if start is None or knob == "lr" or knob in policy.frozen:
                continue
            if not lo <= start <= hi:
                out.append(
                    f"param group {i} starts its {knob} at {start:.6g}, outside the bounds "
                    f"given for it ({lo:.6g}, {hi:.6g}): a bound stops a move and never makes "
                    f"one, so the run may stay at {start:.6g}, and a controller may take it "
                    f"back there. Give the optimizer a {knob} within its bounds"
                )
    return out


def start_misfits(bounds: tuple[float, float], starts: list[float]) -> list[str]:
    """Each group's starting rate outside absolute bounds (``lr_bounds_absolute``), read at the
    first step where a scheduler recorded it: see :func:`misfits`."""
    lo, hi = bounds
    return [
        f"param group {i} starts its rate at {start:.6g}, outside the bounds given for it "
        f"({lo:.6g}, {hi:.6g}): a bound stops a move and never makes one, so the run may stay "
        f"at {start:.6g}, and a controller may take it back there. Give the optimizer (or its "
        "scheduler) a starting rate within the bounds"
        for i, start in enumerate(starts)
        if not lo <= start <= hi
    ]
