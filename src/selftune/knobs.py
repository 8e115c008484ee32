"""The one place that reads and writes hyperparameters in an optimizer's ``param_groups``.

A *knob* is a scalar hyperparameter of one param group: ``lr`` always; ``momentum`` for optimizers
that keep one (SGD with momentum, RMSprop); ``beta1`` and ``beta2`` for the Adam family, stored by
torch as ``betas``.  Values may be Python floats or 0-dim tensors (``capturable`` optimizers and
``torch.compile`` use tensors); a tensor is always written in place with ``fill_`` so that a
compiled step sees the same tensor and does not recompile.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from selftune.errors import ConfigError

#: knobs selftune knows how to read and write, in display order
ALL_KNOBS = ("lr", "momentum", "beta1", "beta2")


def knob_names(group: dict[str, Any]) -> tuple[str, ...]:
    """The knobs this param group has.

    SGD with ``momentum=0`` has no momentum knob: switching momentum on would change the algorithm
    the user chose, not tune it.
    """
    names = ["lr"]
    momentum = group.get("momentum")
    if momentum is not None and float(momentum) > 0.0:
        names.append("momentum")
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        # Adam with beta1 = 0 keeps no first moment, as SGD with momentum 0 keeps no buffer
        names += ["beta1", "beta2"] if _as_float(betas[0]) > 0.0 else ["beta2"]
    return tuple(names)


def unshare(defaults: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    """Give each param group its own copy of a tensor knob it shares with the optimizer's
    ``defaults`` or with an earlier group.

    torch hands every group that takes a default the default's own object, so an optimizer
    given ``lr=torch.tensor(...)`` (or tensor ``betas``) holds one tensor in all its groups.
    selftune writes each group's knobs in place, and applies each group's scale to its rate in
    place for the step: through one shared tensor every group stepped at the product of all
    the scales, the rate left behind drifted, one group's beta1 moved every group's, and a
    group added later took the tuned value as its default.  The copies are made once, when
    the groups join, so that a compiled step sees them stay put.
    """
    seen: set[int] = set()

    def own(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            value = value.clone()
        seen.add(id(value))
        return value

    for group in [defaults, *groups]:  # the defaults keep their own objects
        for name in ("lr", "momentum"):
            if name in group:
                group[name] = own(group[name])
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)):
            copies = [own(b) for b in betas]
            if any(c is not b for c, b in zip(copies, betas, strict=True)):
                group["betas"] = type(betas)(copies)


def start_rate(group: dict[str, Any]) -> float:
    """The rate the user gave the group: the ``initial_lr`` an LR scheduler records when it is
    built (a warm-up may already have written its first rate, zero even, into ``lr``), else
    ``lr``."""
    initial = group.get("initial_lr")
    if isinstance(initial, numbers.Real | torch.Tensor) and not isinstance(initial, bool):
        value = _as_float(initial)
        if math.isfinite(value) and value > 0.0:
            return value
    return read(group, "lr")


def check_group(index: int, group: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if a param group cannot be tuned (no ``lr``, non-finite knobs)."""
    if "lr" not in group:
        raise ConfigError(
            f"param group {index} has no 'lr' (keys: {sorted(k for k in group if k != 'params')}); "
            "selftune tunes optimizers whose param groups hold a learning rate"
        )
    if group.get("relative_step") is True:  # (its schedule's lr of 0 was refused as zero)
        raise ConfigError(
            f"param group {index}: relative_step=True, so the optimizer (Hugging Face's "
            "Adafactor) sets its own step size and ignores lr: selftune has no rate to tune. "
            "Give it an lr and relative_step=False (and no AdafactorSchedule)"
        )
    check_kinds(index, group)
    for name, value in _knob_values(group):
        if not math.isfinite(value):
            raise ConfigError(
                f"param group {index}: {name}={value} is not finite; pass a finite value"
            )
    if start_rate(group) <= 0.0:  # zero only where a scheduler's warm-up starts from it
        raise ConfigError(
            f"param group {index}: lr={read(group, 'lr')} must be > 0 (a rate of zero has "
            "nothing to scale; to freeze a part of the model, leave its parameters out of the "
            "optimizer or call requires_grad_(False) on them)"
        )


def check_kinds(index: int, group: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if a param group's knobs are not numbers selftune can read
    and write: a rate that is no number, a tensor knob of other than one floating-point entry.
    Reads no tensor's value (no host sync): a step checks it too, for what the loop wrote."""
    rate = group["lr"]
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real | torch.Tensor):
        raise ConfigError(
            f"param group {index}: lr={rate!r} is not a number; selftune scales a rate the "
            "optimizer holds (an optimizer that sets its own, as Adafactor with lr=None and "
            "relative_step=True, has none to tune: give it an lr, relative_step=False)"
        )
    for name, held in _stored_knobs(group):
        if isinstance(held, torch.Tensor) and (not held.is_floating_point() or held.numel() != 1):
            raise ConfigError(
                f"param group {index}: {name} is a {held.dtype} tensor of shape "
                f"{tuple(held.shape)}: selftune writes the value it tunes into a tensor knob in "
                "place, which needs one floating-point number (an integer tensor would cut a "
                "rate of 0.5 to 0); give a float, or a float tensor of one entry "
                "(torch.tensor(1.0), not torch.tensor(1))"
            )


def _stored_knobs(group: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every knob the group holds, as stored (float or tensor), whether or not
    :func:`knob_names` counts it a knob: a NaN momentum or beta1 is not above zero, so the group
    read as one without momentum, the value went unchecked (torch's SGD takes momentum=nan),
    and the guard gave up on the NaN weights some twenty steps later, blaming the data."""
    stored = [("lr", raw(group, "lr"))]
    if group.get("momentum") is not None:
        stored.append(("momentum", raw(group, "momentum")))
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        stored += [("beta1", raw(group, "beta1")), ("beta2", raw(group, "beta2"))]
    return stored


def _knob_values(group: dict[str, Any]) -> list[tuple[str, float]]:
    """The values of :func:`_stored_knobs`, as floats."""
    return [(name, _as_float(held)) for name, held in _stored_knobs(group)]


def eps_lost_in_half(index: int, group: dict[str, Any]) -> str | None:
    """Why a group's ``eps`` does nothing, or None: float16 parameters keep the Adam family's (and
    RMSprop's, Adagrad's) second moments in float16, where an eps below about 3e-8 rounds to zero,
    so a step divides by zero wherever a gradient entry is zero (a dead ReLU, an unused row) and
    the weights turn non-finite at any learning rate.  A guard that cuts the rate cannot mend
    that, so it is said at wrap time.  A fused step computes in float32 and is spared."""
    eps = group.get("eps")
    if group.get("fused") or isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        return None
    half = sum(p.dtype == torch.float16 for p in group["params"])
    if not half or float(torch.tensor(float(eps), dtype=torch.float16)) != 0.0:
        return None
    return (
        f"param group {index}: eps={eps} is zero in float16, the dtype of {half} of its "
        "parameters and of the optimizer's moments for them: its steps divide by zero wherever "
        "a gradient entry is zero, and the weights turn non-finite at any learning rate (the "
        "guard's rollbacks cannot help). Keep float32 parameters and train under "
        "torch.autocast, or give the optimizer eps=1e-4"
    )


def rate_lost_in_dtype(index: int, group: dict[str, Any], floor: float) -> str | None:
    """Why a group's tensor rate cannot hold the lowest rate selftune may set it to, ``floor``
    (the policy's bound for it: the controller's moves and the guard's cuts stop there), or
    None.  selftune writes a tensor rate in place at the tensor's dtype, and scales it in place
    for each step there too: below that dtype's smallest normal number (float32's 1.2e-38,
    float16's 6.1e-5) a rate keeps fewer digits, the step's rate then differs from the one
    decided and logged by more than rounding, and below its smallest subnormal (1.4e-45,
    6e-8) it is zero, steps that train nothing, with no word.  A float32 rate reaches there
    only under bounds some thirty decades below its start (the default floor is a thousandth
    of it, and float32 holds 1e-12 to seven digits); a float16 one within the defaults.  Said
    once, where the bounds are known (the first step, a group added), at no cost per step."""
    held = group.get("lr")
    if not isinstance(held, torch.Tensor):
        return None  # a Python float is a double: no rate a bound allows is lost in it
    info = torch.finfo(held.dtype)
    if floor >= info.tiny:
        return None
    zero = info.tiny * info.eps  # the smallest subnormal
    return (
        f"param group {index}: lr is a {held.dtype} tensor, and the bounds let selftune lower "
        f"the rate to {floor:.3g}, below {info.tiny:.3g}, the smallest {held.dtype} number "
        f"held to full precision: a rate there keeps fewer digits, and one below {zero:.3g} is "
        "zero, a step that trains nothing. Give bounds={'lr': (low, high)} a floor above it, "
        "or the rate as a float32 tensor (or a float, held as a double)"
    )


def _as_float(value: Any) -> float:
    # A tensor knob on an accelerator makes this a host sync; knobs are read once per step.
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def is_rmsprop(group: dict[str, Any]) -> bool:
    """Whether ``group`` is an RMSprop's (its signature keys), whose warm-up
    :func:`rmsprop_warmup` corrects."""
    return "alpha" in group and "centered" in group


def rmsprop_warmup(group: dict[str, Any], state: Any) -> float:
    """The factor that makes an RMSprop group's next step the size of its rate:
    ``sqrt(1 - alpha^t)`` for its ``t``-th step, 1 for any other optimizer's group.

    RMSprop's running average of squared gradients starts at zero and, unlike Adam's, is not
    corrected for it, so its ``t``-th step is ``1/sqrt(1 - alpha^t)`` times the rate in every
    coordinate: 10x at the first step with torch's ``alpha=0.99``, still 2x at the 27th.
    ``auto``'s range test reads the rate as the step's size, and misread those steps: over
    RMSprop at torch's default rate the guard rolled back its first step, and the range test
    took the inflated steps for overshoot and settled up to 9x below the grid's best rate
    (bench-results/rmsprop).  Multiplying the rate by this factor is
    Adam's correction of the average's bias, applied to the step.  The group's ``t`` is read
    off its first parameter with a step count (a frozen one has none), so that a rollback,
    which restores the optimizer's state, restores the factor with it.
    """
    if not is_rmsprop(group):
        return 1.0
    alpha = _as_float(group["alpha"])
    if not 0.0 < alpha < 1.0:  # no average (0), or one that never moves off zero (1)
        return 1.0
    taken = next((s["step"] for p in group["params"] if "step" in (s := state.get(p, ()))), 0)
    return math.sqrt(1.0 - alpha ** (_as_float(taken) + 1.0))


def read(group: dict[str, Any], name: str) -> float:
    """The current value of knob ``name`` in ``group`` as a float."""
    if name in ("beta1", "beta2"):
        return _as_float(group["betas"][0 if name == "beta1" else 1])
    return _as_float(group[name])


def raw(group: dict[str, Any], name: str) -> Any:
    """The stored object of a knob (float or tensor), for callers that must not sync."""
    if name in ("beta1", "beta2"):
        return group["betas"][0 if name == "beta1" else 1]
    return group[name]


def stored(group: dict[str, Any], name: str, value: float) -> float:
    """The value knob ``name`` holds once ``value`` is written: rounded to its tensor's dtype,
    worked out on the host (reading the knob back would wait for the device)."""
    held = raw(group, name)
    if isinstance(held, torch.Tensor):
        return float(torch.tensor(value, dtype=held.dtype))
    return value


def write(group: dict[str, Any], name: str, value: float) -> None:
    """Set knob ``name`` to ``value``, in place for tensors, keeping ``betas`` a tuple."""
    if name in ("beta1", "beta2"):
        i = 0 if name == "beta1" else 1
        betas = group["betas"]
        if isinstance(betas[i], torch.Tensor):
            betas[i].fill_(value)
        else:
            new = list(betas)
            new[i] = value
            group["betas"] = tuple(new)
        return
    current = group[name]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[name] = value
