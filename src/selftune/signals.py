"""What selftune reads at every optimizer step, computed once with batched tensor ops.

The central signal is the alignment of the new gradient ``g_t`` with the previous *applied update*
``Δθ_{t-1} = θ_t − θ_{t-1}``.  For any optimizer whose update scales with the learning rate,
``∂L(θ_t)/∂lr_{t-1} = ⟨g_t, Δθ_{t-1}⟩ / lr_{t-1}`` (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent"), so its sign says whether the last step was too short
(positive ``cos_update``: the loss still falls along it) or too long (negative: it overshot).
Normalising it to a cosine makes it free of the scale of the loss, the gradient and the rate.

Cost per step: one copy of the parameters kept as the previous update (one flat buffer per param
group, so that its norm and its dot product with the gradient are one reduction each), a few
fused passes over the parameters, and exactly one host sync (``tolist`` on a stacked tensor of
scalars).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from selftune.errors import ConfigError
from selftune.shards import across_ranks, local, local_params

#: state keys of the running average of gradients that acts as a momentum buffer
_BUFFER_KEYS = ("momentum_buffer", "exp_avg")
FAST_DECAY, SLOW_DECAY = 0.9, 0.98  # loss EMA decay rates: about 10 and 50 steps of memory


@dataclass(frozen=True)
class GroupSignals:
    """Per-param-group signals of one step."""

    grad_norm: float  #: ‖g_t‖ over the group's parameters
    update_norm: float  #: ‖Δθ_{t-1}‖, 0 before the first update
    #: cos(−g_t, Δθ_{t-1}): > 0 the last step was too short, < 0 it overshot.  ``g_t`` is the
    #: gradient of what the optimizer lowers: with ``maximize=True``, minus the one in ``.grad``.
    #: 0 where either is 0: before the first update, and where the group has no gradient (see
    #: ``has_gradient``), a 0 that was not measured
    cos_update: float
    dot_update: float  #: ⟨−g_t, Δθ_{t-1}⟩, the unnormalised form (= −lr·∂L/∂lr)
    cos_buffer: float  #: cos(g_t, momentum buffer), NaN when the optimizer keeps none
    #: how far a scheduler (or the loop) raised the group's rate since the last step above the
    #: highest it had set before (a warm-up's rise, not a cycle's return to its top); 1 when
    #: it did not: the wrapper fills it in, the tracker never sees the rate
    base_rise: float = 1.0
    #: how far a scheduler (or the loop) cut the group's rate since the last step (its rate now
    #: over the one the last step read, when lower; 1 when it is not): a decay's cut is no
    #: move of the controller's, nor a bound on it.  The wrapper fills it in too
    base_fall: float = 1.0
    buffer_norm: float = math.nan  #: ‖momentum buffer‖, NaN when the optimizer keeps none

    @property
    def has_gradient(self) -> bool:
        """Whether the group holds a gradient at this step with an entry other than zero.

        Without one (a frozen group, whose ``.grad`` is None; a branch the batch did not take; a
        loss multiplied by 0) ``cos_update`` is 0 by convention, not measured, and says nothing
        of the group's rate: a controller that reads it as a step neither short nor
        overshooting moves a rate on no evidence (``stability`` grew a frozen group's at every
        step)."""
        return self.grad_norm != 0.0  # a non-finite norm is a gradient: the guard's to judge


@dataclass(frozen=True)
class Signals:
    """Everything a controller or the guard may read about one optimizer step."""

    step: int  #: the optimizer step, from 1
    loss: float | None  #: the loss passed to ``step``, if any
    loss_ema: float | None  #: bias-corrected EMA of the loss (about 10 steps)
    loss_ema_slow: float | None  #: bias-corrected EMA of the loss (about 50 steps)
    loss_std: float | None  #: running standard deviation of the loss about its fast EMA
    loss_slope: float | None  #: (fast − slow) / |slow|: < 0 while the loss falls
    grad_norm: float  #: ‖g_t‖ over all groups
    groups: tuple[GroupSignals, ...]  #: one per param group
    #: the evaluation metric given to ``observe`` since the last step, if any (averaged over
    #: the ranks that observed one)
    metric: float | None = None
    metric_mode: str = "min"  #: "min" if a lower metric is better, "max" if a higher one
    #: whether that metric was measured at the weight average (``observe`` came after an
    #: ``averaged()`` block, on every rank that observed): the evaluation then sees no noise
    #: floor of the last iterate's
    metric_at_average: bool = False

    def summary(self, group: int) -> dict[str, float]:
        """The scalars that drove a decision for ``group``, for the audit log."""
        g = self.groups[group]
        out = {
            "grad_norm": g.grad_norm,
            "update_norm": g.update_norm,
            "cos_update": g.cos_update,
            "cos_buffer": g.cos_buffer,
        }
        for name in ("loss", "loss_ema", "loss_std", "loss_slope", "metric"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def pooled(signals: Signals, among: Sequence[int] = ()) -> Signals:
    """The step's signals with every group's replaced by those of the groups ``among`` (empty:
    all) as one, for the controller of a run whose groups are tuned jointly
    (``wrap(..., groups="joint")``).

    Norms and dot products add over groups, so the pooled alignments are those of the whole
    parameter vector: what one group holding every parameter reads.  The momentum buffer's
    alignment pools the groups that keep a buffer (none: NaN), a group with no gradient adding
    its buffer's norm and nothing to the product.  Each group keeps its own ``base_rise`` and
    ``base_fall``, the moves of its own rate.
    """
    gs = [signals.groups[i] for i in among] if among else signals.groups
    if len(gs) == 1:  # itself, to the bit (a root of a square can differ by an ulp)
        return dataclasses.replace(
            signals, groups=tuple(_own_rate(gs[0], g) for g in signals.groups)
        )
    gg = sum(g.grad_norm**2 for g in gs)
    dd = sum(g.update_norm**2 for g in gs)
    gd = sum(g.dot_update for g in gs)
    with_buffer = [g for g in gs if math.isfinite(g.buffer_norm)]
    bb = sum(g.buffer_norm**2 for g in with_buffer)
    gb = sum(
        g.cos_buffer * g.grad_norm * g.buffer_norm
        for g in with_buffer
        if math.isfinite(g.cos_buffer)  # else no gradient, or no buffer yet: no product
    )
    gb_norm = math.sqrt(sum(g.grad_norm**2 for g in with_buffer) * bb)
    gn, dn = math.sqrt(gg), math.sqrt(dd)
    pool = GroupSignals(
        grad_norm=gn,
        update_norm=dn,
        cos_update=gd / (gn * dn) if gn * dn > 0 and math.isfinite(gn * dn) else 0.0,
        dot_update=gd,
        cos_buffer=gb / gb_norm if gb_norm > 0 else math.nan,
        buffer_norm=math.sqrt(bb) if with_buffer else math.nan,
    )
    return dataclasses.replace(signals, groups=tuple(_own_rate(pool, g) for g in signals.groups))


def _own_rate(pool: GroupSignals, group: GroupSignals) -> GroupSignals:
    """The pooled signals with the moves of ``group``'s own rate."""
    return dataclasses.replace(pool, base_rise=group.base_rise, base_fall=group.base_fall)


class SignalTracker:
    """Measures :class:`Signals` each step and keeps what that needs between steps.

    Call :meth:`measure` after ``backward`` (before the update), :meth:`before_update` right before
    the inner optimizer's step and :meth:`after_update` right after it.
    """

    def __init__(self, param_groups: Callable[[], list[dict[str, Any]]]) -> None:
        #: the optimizer's param groups, read afresh each time: torch's ``load_state_dict``
        #: (a rollback's, a resume's) replaces the list, and a group added after it must count
        self._param_groups = param_groups
        # previous update per param, stored negated (θ_{t-1} − θ_t) to save a pass; None until set
        self._prev: list[list[torch.Tensor]] | None = None
        # per group, the flat buffer those tensors are views of (None: params of mixed kinds)
        self._flat: list[torch.Tensor | None] = []
        #: per group, the tensors of ``_prev`` this step's update moves and their parameters
        #: (see :meth:`before_update`)
        self._moving: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        #: per group, which params the last update moved (those with a gradient; None: all)
        self._moved: list[list[bool] | None] = []
        #: per group, which params hold a gradient this step (None: all), read by ``measure``
        #: for :meth:`before_update`
        self._stepping: list[list[bool] | None] = []
        self._n = 0  # loss observations so far
        self._fast = self._slow = self._var = 0.0

    @property
    def _groups(self) -> list[dict[str, Any]]:
        return self._param_groups()

    @property
    def no_gradient(self) -> bool:
        """Whether no parameter held a gradient at the last :meth:`measure`: a step that moves
        nothing, which torch takes without a word (``zero_grad()`` between the backward and the
        step, or no backward at all)."""
        return bool(self._stepping) and all(
            held is not None and not any(held) for held in self._stepping
        )

    # -- per step ---------------------------------------------------------------------------
    @torch.no_grad()
    def measure(
        self,
        step: int,
        loss: torch.Tensor | float | None,
        state: dict,
        buffers: bool = True,
        ranks: RankState | None = None,
    ) -> Signals:
        """Compute this step's signals from the gradients now in ``.grad``.

        Every per-tensor scalar goes into one stacked vector, so the step costs a few fused
        passes over the parameters and exactly one host sync; the sums over tensors and groups
        are done on the host afterwards.  ``buffers=False`` skips the momentum-buffer alignment
        for controllers that do not read it.  ``loss`` is one passed by :func:`check_loss`,
        which the wrapper calls before the step starts.  ``ranks``: under torch.distributed, what
        this rank brings to the step's collective besides its signals (see :class:`RankState`),
        which the metric the ranks share is written back into.
        """
        distributed = across_ranks()
        parts: list[torch.Tensor] = []
        # per group: gradients, update parts, buffer, and the sign of the gradient it descends
        layout: list[tuple[int, int, bool, float]] = []
        self._stepping = []
        for gi, group in enumerate(self._groups):
            start = len(parts)
            params = group["params"]
            with_grad = [i for i, p in enumerate(params) if p.grad is not None]
            grads = [local(params[i].grad) for i in with_grad]
            every_grad = len(with_grad) == len(params)
            self._stepping.append(None if every_grad else [p.grad is not None for p in params])
            # torch's ``maximize=True`` steps along +g (its momentum buffers hold −g): the
            # alignments are read against −g, or every step of an ascent reads as an overshoot
            sign = -1.0 if group.get("maximize", False) else 1.0
            if not grads:
                layout.append((0, 0, False, sign))
                if distributed:
                    parts.extend(_group_sums([], layout[-1]))
                continue
            # sparse gradients (nn.Embedding(sparse=True)) have no fused kernels: per tensor
            sparse = any(g.is_sparse for g in grads)
            parts.extend(_norms(grads, sparse))
            # complex parameters: the products are read over real views (see _real)
            dots_of = _real if not sparse and any(g.is_complex() for g in grads) else _same
            n_prev = 0
            if self._prev is not None:
                moved = self._moved[gi]  # which params the last update moved (None: all)
                # the usual case, the whole flat buffer: every param has a gradient and moved
                every = every_grad and moved is None
                prev, against = self._prev[gi], grads
                if not every:
                    read = [k for k, i in enumerate(with_grad) if moved is None or moved[i]]
                    # none moved last step (another network's turn): read each against the
                    # update it last received, since the one-step alignment is zero by design
                    read = read or list(range(len(with_grad)))
                    prev = [self._prev[gi][with_grad[k]] for k in read]
                    against = [grads[k] for k in read]
                # float16 products of finite entries overflow: per tensor, widened (_dots)
                whole = every and not sparse and not _has_half(grads)
                flat = self._flat[gi] if whole else None
                # prev holds −Δθ, so ⟨−g, Δθ⟩ = ⟨g, prev⟩; it is overwritten before the update
                if flat is not None:  # one reduction each over the whole group
                    (flat,) = dots_of([flat])
                    # accumulated in float32 at least (float64 stays: norms refuse to narrow)
                    acc = torch.promote_types(flat.dtype, torch.float32)
                    parts.append(torch.linalg.vector_norm(flat, dtype=acc))
                    torch._foreach_mul_(dots_of(prev), dots_of(grads))
                    parts.append(flat.sum(dtype=acc))
                    n_prev = 1
                else:
                    parts.extend(_norms(prev, sparse))
                    parts.extend(_dots(dots_of(prev), dots_of(against), sparse, in_place=True))
                    n_prev = len(against)
            bufs = _buffers([params[i] for i in with_grad], state) if buffers else None
            if bufs is not None:
                # SGD's momentum buffer of a sparse gradient is sparse too
                parts.extend(_norms(bufs, sparse))
                parts.extend(_dots(dots_of(bufs), dots_of(grads), sparse, in_place=False))
            layout.append((len(grads), n_prev, bufs is not None, sign))
            if distributed:
                parts[start:] = _group_sums(parts[start:], layout[-1])
        if distributed:  # every rank stacks a loss and whether it had one (see _ranks_loss)
            had = loss is not None
            if not isinstance(loss, torch.Tensor):  # a number is averaged as a tensor is,
                value = _maybe_float(loss) if had else 0.0  # with its digits (float64 here)
                loss = torch.tensor(value, dtype=torch.float64)
            parts += [loss.detach().reshape(()), torch.tensor(float(had))]
        elif isinstance(loss, torch.Tensor):
            scalar = loss.detach()
            parts.append(scalar if scalar.dim() == 0 else scalar.reshape(()))
        if parts:
            device = parts[0].device
            if distributed:  # where the model's sums are (a group with no gradient made its
                # on the host), then moved at once to where the ranks gather them (see below)
                device = next((t.device for t in parts if t.device.type != "cpu"), device)
            # float32, or float64 where the model's own scalars are (its loss keeps its digits);
            # across ranks always float64: the gather needs one dtype on every rank, and a
            # float64 loss on one rank alone (or given on one only) aborted gloo's
            wide = distributed or any(t.dtype == torch.float64 for t in parts)
            dtype = torch.float64 if wide else torch.float32
            stacked = torch.stack([_as(t, device, dtype) for t in parts])
        ranks = ranks or RankState()
        if distributed:
            # one device on every rank: NCCL's where it is the backend, whatever device this
            # rank's own scalars were made on (a rank whose first group held nothing made them
            # on the host, where NCCL has none, or, beside gloo, crossed backends)
            where = _gather_device()
            tail = torch.tensor(ranks.tail(), dtype=torch.float64, device=where)
            rows = gather_ranks(torch.cat([stacked.to(where), tail]))
            at, width = stacked.numel(), tail.numel()
            # the means on the device, each rank alike; then one read of them and the tails
            means = ranks_mean(rows[:, :at])
            host = torch.cat([means, rows[:, at:].reshape(-1)]).tolist()  # the one host sync
            values = host[:at]
            tails = [host[at + r * width : at + (r + 1) * width] for r in range(rows.shape[0])]
            try:
                ranks.agree(tails)
                loss_value = _ranks_loss(values[-2], values[-1])
            except RefusedStep:
                self._prev = None  # read into above: the next step reads no previous update
                raise
        else:
            values = stacked.tolist() if parts else []  # the one host sync of the step
            if ranks.metric is not None:  # a metric observed since: this rank's alone
                ranks.agree([ranks.tail()])
            loss_value = float(values[-1]) if isinstance(loss, torch.Tensor) else _maybe_float(loss)
        sums = _from_group_sums(values, layout) if distributed else _sum_groups(values, layout)
        return self._assemble(step, loss_value, sums)

    def _assemble(self, step: int, loss: float | None, sums: list[GroupSums]) -> Signals:
        groups = []
        total_sq = 0.0
        for gg, dd, gd, bb, gb in sums:
            total_sq += gg
            gn, dn, bn = math.sqrt(gg), math.sqrt(dd), math.sqrt(bb)
            groups.append(
                GroupSignals(
                    grad_norm=gn,
                    update_norm=dn if math.isfinite(dn) else 0.0,
                    cos_update=gd / (gn * dn) if gn * dn > 0 and math.isfinite(gn * dn) else 0.0,
                    dot_update=gd,
                    cos_buffer=gb / (gn * bn) if gn * bn > 0 else math.nan,
                    buffer_norm=math.nan if math.isnan(bn) else bn,  # one NaN: records compare
                )
            )
        finite = math.isfinite(total_sq) and (loss is None or math.isfinite(loss))
        ema, slow, std, slope = self._loss_stats(loss if finite else None)
        return Signals(
            step=step,
            loss=loss,
            loss_ema=ema,
            loss_ema_slow=slow,
            loss_std=std,
            loss_slope=slope,
            grad_norm=math.sqrt(total_sq),
            groups=tuple(groups),
        )

    def _loss_stats(self, loss: float | None) -> tuple[float | None, ...]:
        """Update the loss EMAs and return the fast and slow ones, the deviation and the slope.

        A non-finite loss is not folded in."""
        if loss is not None:
            if self._n > 0:
                off = square(loss - self._fast_ema())
                self._var = FAST_DECAY * self._var + (1 - FAST_DECAY) * off
            self._n += 1
            self._fast = FAST_DECAY * self._fast + (1 - FAST_DECAY) * loss
            self._slow = SLOW_DECAY * self._slow + (1 - SLOW_DECAY) * loss
        if self._n == 0:
            return None, None, None, None
        fast, slow = self._fast_ema(), self._slow / (1 - SLOW_DECAY**self._n)
        std = math.sqrt(self._var / (1 - FAST_DECAY ** max(self._n - 1, 1)))
        slope = (fast - slow) / abs(slow) if slow != 0 else 0.0
        return fast, slow, std, slope

    def _fast_ema(self) -> float:
        return self._fast / (1 - FAST_DECAY**self._n)

    @torch.no_grad()
    def before_update(self) -> None:
        """Remember θ_t so that the update this step applies can be measured.

        Only for the parameters that hold a gradient (as :meth:`measure` found them this
        step), the ones torch's optimizers update: a
        parameter without one (a branch this batch did not take) keeps its last update, and
        :meth:`measure` reads a gradient against it when no parameter with a gradient moved
        in the last step.  Two networks trained by turns in one optimizer are such a case:
        each gradient's one-step alignment is zero by design (the last step moved the other
        network), and ``auto``, reading only that, never moved the rate.  Where some did move
        (a shared trunk with a head per task) the one-step alignment is read as always: read
        against each head's own last update as well, ``auto`` went to higher rates, and on
        ``bench-results/multi-task/`` the second task's error rose from 0.019 to 0.030 in
        turns of one step and from 0.015 to 0.033 in turns of 20 (medians of five seeds).
        """
        if self._prev is None:
            self._allocate()
        assert self._prev is not None
        self._moving = []
        self._moved = list(self._stepping)  # which params have gradients, as measure read them
        for prev, group, has_grad in zip(self._prev, self._groups, self._moved, strict=True):
            ps = local_params(group)
            if has_grad is not None:
                prev = [t for t, h in zip(prev, has_grad, strict=True) if h]
                ps = [p for p, h in zip(ps, has_grad, strict=True) if h]
            self._moving.append((prev, ps))
            if prev:  # a group may hold no params; torch's fused ops refuse empty lists
                torch._foreach_copy_(prev, ps)

    def _allocate(self) -> None:
        """Storage for the previous update of every group."""
        self._prev, self._flat, self._moved = [], [], []
        for group in self._groups:
            self._add_storage(group)

    def _add_storage(self, group: dict[str, Any]) -> None:
        """Zeroed storage for one group's previous update: views into one flat buffer when its
        params share a dtype and device (the usual case), else a tensor per param."""
        assert self._prev is not None
        self._moved.append(None)  # zeros: as if every param had moved by nothing
        ps = [p.detach() for p in local_params(group)]
        if ps and all(p.dtype == ps[0].dtype and p.device == ps[0].device for p in ps):
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            chunks = flat.split([p.numel() for p in ps])
            self._prev.append([c.view(p.shape) for c, p in zip(chunks, ps, strict=True)])
            self._flat.append(flat)
        else:
            self._prev.append([torch.zeros_like(p) for p in ps])
            self._flat.append(None)

    def group_added(self) -> None:
        """A param group was appended mid-run: it has no previous update (zero), so its first
        step gives no update signal, and the next update is measured as for any other."""
        if self._prev is not None:
            self._add_storage(self._groups[-1])

    @torch.no_grad()
    def after_update(self) -> None:
        """Turn the remembered θ_t into −Δθ_t = θ_t − θ_{t+1} (see :meth:`before_update`)."""
        assert self._prev is not None, "before_update must run first"
        for prev, ps in self._moving:  # the parameters, updated in place by the step
            if prev:
                torch._foreach_sub_(prev, ps)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self, include_update: bool = True) -> dict[str, Any]:
        prev = self._prev if include_update else None
        return {
            "prev": None if prev is None else [[t.clone() for t in ts] for ts in prev],
            "moved": None if prev is None else [m if m is None else list(m) for m in self._moved],
            "n": self._n,
            "fast": self._fast,
            "slow": self._slow,
            "var": self._var,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        prev = sd["prev"]
        if prev is None:
            self._prev = None
        else:
            if len(prev) != len(self._groups):
                raise ValueError(f"saved updates for {len(prev)} groups, not {len(self._groups)}")
            self._allocate()
            assert self._prev is not None
            for saved, own in zip(prev, self._prev, strict=True):
                if own:
                    torch._foreach_copy_(own, list(saved))
            moved = sd.get("moved")  # absent in states saved before it was kept: all moved
            if moved is not None:
                self._moved = [m if m is None else list(m) for m in moved]
        self._n, self._fast, self._slow, self._var = sd["n"], sd["fast"], sd["slow"], sd["var"]


#: a group's sums: squared gradient norm, squared update norm, the update's dot product with
#: the descent direction, squared buffer norm and the buffer's dot product (NaN: no buffer)
GroupSums = tuple[float, float, float, float, float]
#: the scalars each group contributes under ``torch.distributed`` (see :func:`_group_sums`)
_SUMS = 6


def _group_sums(
    parts: list[torch.Tensor], layout: tuple[int, int, bool, float]
) -> list[torch.Tensor]:
    """A group's per-tensor scalars as a fixed number of sums, for the ranks' gather.

    Under ``torch.distributed`` every rank must stack as many scalars as every other, or the
    gather mismatches (gloo aborts the process).  The per-tensor layout does not hold that
    where a rank's parameters lack a gradient another's have: FSDP's empty shards, a branch one
    rank did not use.  So each group gives the sums of squared gradient, update and buffer
    norms, of the two alignments' dot products, and whether it had a buffer.  For
    replicated parameters (DDP) their mean over ranks is each rank's own; for parameters that
    are each rank's shard it is the whole's over the number of ranks, so the alignments, ratios
    of sums, are the whole parameter's exactly.
    """
    n, n_prev, has_buf, _ = layout
    grads, prev, dots = parts[:n], parts[n : n + n_prev], parts[n + n_prev : n + 2 * n_prev]
    bufs = parts[n + 2 * n_prev : 2 * n + 2 * n_prev]
    buf_dots = parts[2 * n + 2 * n_prev :]
    device = parts[0].device if parts else torch.device("cpu")
    wide = any(t.dtype == torch.float64 for t in parts)
    dtype = torch.float64 if wide else torch.float32

    def flag(on: bool) -> torch.Tensor:
        return torch.full((), float(on), device=device, dtype=dtype)

    def total(ts: list[torch.Tensor], squared: bool) -> torch.Tensor:
        if not ts:
            return flag(False)
        stacked = torch.stack([_as(t, device, dtype) for t in ts])
        return (stacked.square() if squared else stacked).sum()

    return [
        total(grads, squared=True),
        total(prev, squared=True),
        total(dots, squared=False),
        total(bufs, squared=True),
        total(buf_dots, squared=False),
        flag(has_buf),
    ]


def _sum_groups(values: list[float], layout: list[tuple[int, int, bool, float]]) -> list[GroupSums]:
    """Each group's sums from its per-tensor scalars, in the order :meth:`SignalTracker.measure`
    stacks them: gradient norms, update norms and dots, buffer norms and dots."""
    sums, at = [], 0

    def take(n: int) -> list[float]:
        nonlocal at
        at += n
        return values[at - n : at]

    for n, n_prev, has_buf, sign in layout:
        gg = sum(x * x for x in take(n))
        dd = sum(x * x for x in take(n_prev))
        gd = sign * sum(take(n_prev))
        bb = sum(x * x for x in take(n)) if has_buf else math.nan
        gb = sign * sum(take(n)) if has_buf else math.nan
        sums.append((gg, dd, gd, bb, gb))
    return sums


def _from_group_sums(
    values: list[float], layout: list[tuple[int, int, bool, float]]
) -> list[GroupSums]:
    """Each group's sums from the ranks' mean of :func:`_group_sums`.  A buffer counts only
    where every rank had one (a partial buffer has no alignment to read)."""
    sums = []
    for gi, (_, _, _, sign) in enumerate(layout):
        gg, dd, gd, bb, gb, had_buf = values[gi * _SUMS : (gi + 1) * _SUMS]
        buf = had_buf == 1.0
        sums.append((gg, dd, sign * gd, bb if buf else math.nan, sign * gb if buf else math.nan))
    return sums


def gather_ranks(stacked: torch.Tensor) -> torch.Tensor:
    """Under ``torch.distributed``, every rank's ``stacked`` scalars, one row per rank.

    One collective per step, called on every rank in the same order, so that every rank sees the
    same signals and takes the same decisions even when per-rank losses differ.  A gather, not a
    sum: the ranks' mean of a value every rank holds alike (DDP's gradients, rank 0's metric
    loaded on every rank) is then that value to the bit (see :func:`ranks_mean`), and a refusal
    or a metric is known by rank.  The stacked sizes have to match: every rank stacks a slot
    for the loss, given or not (:func:`_ranks_loss`), and the slots of its :class:`RankState`.
    """
    every = [torch.empty_like(stacked) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, stacked)
    return torch.stack(every)


def flagged_ranks(flag: bool, digest: float = 0.0) -> tuple[list[int], list[float]]:
    """The ranks on which ``flag`` holds, in rank order, and every rank's ``digest``, by rank:
    two numbers per rank gathered where the step's gather meets (:func:`gather_ranks`).  A
    collective: every rank calls it.  ``digest`` rides in the same gather, so that what one
    rank alone decided is found without a collective more; a whole number below 2**53, which
    a float64 holds exactly."""
    values = [float(flag), float(digest)]
    here = torch.tensor(values, dtype=torch.float64, device=_gather_device())
    rows: list[list[float]] = gather_ranks(here).tolist()
    return [rank for rank, (held, _) in enumerate(rows) if held], [d for _, d in rows]


def _gather_device() -> torch.device:
    """Where the ranks' scalars meet: the current GPU under NCCL (which has no host tensors),
    else the host; the same on every rank, whatever device its own scalars were made on."""
    if "nccl" in str(torch.distributed.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks_mean(rows: torch.Tensor) -> torch.Tensor:
    """The ranks' means of scalars gathered one row per rank: a value they all hold is itself
    (a sum over ``n`` ranks divided by ``n`` can end an ulp off it), else their sum over ``n``,
    which every rank computes alike."""
    first = rows[0]
    return torch.where((rows == first).all(0), first, rows.sum(0) / rows.shape[0])


class RefusedStep(ConfigError):
    """A step refused before anything that a record would have to follow changed: the run
    stays whole and goes on from the next call."""


@dataclass
class RankState:
    """What a rank brings to the step's collective besides its signals, and the metric every
    rank reads after it.

    Under ``torch.distributed`` every rank must take or refuse a step alike, and read one
    metric: a rank that refused alone, before the collective (its folder taken over or closed,
    its last step broken), left the others' paired with its next one, and a metric averaged in
    a collective of its own, when ``observe`` ran on rank 0 alone (as an evaluation often
    does), met the other ranks' step.  gloo aborts the processes from its transport thread,
    past any handler, and NCCL waits out its timeout.  So all of it travels in the step's one
    gather, as a few numbers more.
    """

    broken: bool = False  #: this rank's last step raised part-way
    refusal: ConfigError | None = None  #: why this rank cannot take the step, if it cannot
    metric: float | None = None  #: a metric observed here since the ranks last shared one
    at_average: bool = False  #: measured at the weight average
    high: bool = False  #: higher is better (``mode="max"``)
    #: the metric observed here that a state was saved with before the ranks shared it
    saved: float | None = None
    #: after the collective: the mean of the metrics the ranks observed, whether every one
    #: was measured at the average, and whether higher is better; None where no rank observed
    shared: tuple[float, bool, bool] | None = None

    def tail(self) -> list[float]:
        """This rank's part of the step's gather: a :class:`_Tail`, as floats."""
        given = self.metric is not None
        return [
            float(v)
            for v in _Tail(
                metric=self.metric if self.metric is not None else 0.0,
                given=given,
                at_average=given and self.at_average,
                high=given and self.high,
                refused=self.refusal is not None,
                broken=self.broken,
            )
        ]

    def agree(self, tails: list[list[float]]) -> None:
        """Read every rank's :meth:`tail`, in rank order (a single process: its own): refuse
        the step on every rank where any rank must refuse it, else share the metric over the
        ranks that observed one (every rank, or rank 0 alone), which the wrapper then holds."""
        self.shared = None
        ranks = [_Tail(*tail) for tail in tails]
        broken = [r for r, tail in enumerate(ranks) if tail.broken]
        if broken:
            raise ConfigError(
                f"a step is refused on every rank: a step raised part-way on rank {broken[0]}, "
                "and its update may have been made without its record. Resume every rank from "
                "the last checkpoint (selftune.load_checkpoint, or load_state_dict)"
            )
        refused = [r for r, tail in enumerate(ranks) if tail.refused]
        if refused:
            raise RefusedStep(
                str(self.refusal)
                if self.refusal is not None
                else f"a step is refused on every rank: rank {refused[0]} cannot take it (its "
                "error says why)"
            )
        observed = [tail for tail in ranks if tail.given]
        if not observed:
            return
        if len({tail.high for tail in observed}) > 1:  # each rank would judge the mean its way
            self.metric = self.saved = None  # dropped on every rank: observe again, one mode
            raise RefusedStep(
                'observe() was given mode="max" on some ranks and mode="min" on others: a run '
                "has one metric; give every rank the same mode"
            )
        metrics = torch.tensor([[t.metric] for t in observed], dtype=torch.float64)
        metric = float(ranks_mean(metrics)[0])
        self.shared = (metric, all(tail.at_average for tail in observed), bool(observed[0].high))


class _Tail(NamedTuple):
    """A rank's :class:`RankState` as the gather carries it (flags as 0.0 or 1.0)."""

    metric: float  #: the metric observed here since the ranks last shared one (0.0: none)
    given: float  #: whether one was
    at_average: float
    high: float
    refused: float  #: this rank cannot take the step
    broken: float  #: this rank's last step raised part-way


def _ranks_loss(mean: float, share: float) -> float | None:
    """The ranks' mean loss from the mean of each rank's loss (zero where it had none) and the
    share of ranks that had one; a loss some ranks gave and others did not is refused, on every
    rank alike.  A fixed pair on every rank: a loss stacked only where given made the ranks'
    collective differ in size, which gloo aborts on and NCCL waits on until its timeout."""
    if share not in (0.0, 1.0):
        raise RefusedStep(
            "step(loss=...) was given on some ranks and not on others: give each rank's loss on "
            "every rank, or on none"
        )
    return mean if share == 1.0 else None


def check_loss(loss: Any, *, returned: bool = False) -> Any:
    """Refuse a loss that is not one number, by name (an unreduced loss failed in a reshape);
    return it, a one-element NumPy array as its number.  ``returned``: the loss is what the
    closure given to ``step`` returned, which the refusal names (it named ``step(loss=...)``,
    which the loop never passed, for a closure that returned its loss with its outputs)."""
    what = (
        "step(closure) reads what the closure returns as the loss, which"
        if returned
        else "step(loss=...)"
    )
    fix = " (or pass the loss by name: step(closure, loss=loss))" if returned else ""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigError(
                f"{what} needs one number, got a tensor of shape {tuple(loss.shape)}: "
                f"reduce it first (its mean, say){fix}"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ConfigError(f"{what} needs a real number, got a {loss.dtype} tensor{fix}")
    elif _one_numpy_number(loss):
        value = loss.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{what} needs a real number, got a {loss.dtype} array{fix}")
        return value
    elif loss is not None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real)):
        raise ConfigError(
            f"{what} needs a number or a one-element tensor, got {type(loss).__name__}{fix}"
        )
    return loss


def _one_numpy_number(loss: Any) -> bool:
    """Whether ``loss`` is a one-element NumPy array (``np.array(0.5)``), which reads as its
    number as a one-element tensor does."""
    return type(loss).__module__ == "numpy" and getattr(loss, "size", None) == 1


def _buffers(params: list[torch.Tensor], state: dict) -> list[torch.Tensor] | None:
    """The optimizer's running average of gradients for each param, or None if any lacks one."""
    out = []
    for p in params:
        st = state.get(p)
        buf = None if not st else next((st[k] for k in _BUFFER_KEYS if k in st), None)
        if not isinstance(buf, torch.Tensor):
            return None
        out.append(local(buf))
    return out


#: float16, whose largest number is 65504: a gradient of finite entries (a million of 0.07)
#: had an infinite norm, which the guard took for a non-finite gradient, and its buffer an
#: infinite inner product, which left the hypergradient's momentum where it stood.  Its norms
#: and products are taken in float32.  (bfloat16 has float32's range, and torch's reductions
#: accumulate it in float32 already; float32 copies of its tensors cost memory for no gain.)
_HALF = torch.float16


def _has_half(tensors: list[torch.Tensor]) -> bool:
    return any(t.dtype == _HALF for t in tensors)


def _norms(tensors: list[torch.Tensor], sparse: bool) -> list[torch.Tensor]:
    """The 2-norm of each tensor: one fused kernel, or one at a time where a tensor is sparse
    or float16 (``_foreach_norm`` takes one ``dtype`` for all, and copies every tensor to it
    at once)."""
    if sparse or _has_half(tensors):
        return [_norm(t) for t in tensors]
    return list(torch._foreach_norm(tensors))


def _norm(g: torch.Tensor) -> torch.Tensor:
    """The 2-norm of a tensor, dense or sparse (the norm of its coalesced values), in float32
    if it is float16."""
    values = g.coalesce().values() if g.is_sparse else g
    return torch.linalg.vector_norm(values, dtype=torch.float32 if values.dtype == _HALF else None)


def _dots(
    tensors: list[torch.Tensor], grads: list[torch.Tensor], sparse: bool, in_place: bool
) -> list[torch.Tensor]:
    """⟨t, g⟩ per tensor: one fused multiply when all are dense (``in_place``: into ``tensors``,
    whose contents are not needed after), else one product at a time over a sparse one's
    entries, or a float16 pair's as float32 copies that live for that product (see
    ``_HALF``)."""
    if sparse or _has_half(tensors) or _has_half(grads):
        return [_dot(*_wide_pair(t, g)) for t, g in zip(tensors, grads, strict=True)]
    if in_place:
        torch._foreach_mul_(tensors, grads)
        products = tensors
    else:
        products = list(torch._foreach_mul(tensors, grads))
    return [t.sum() for t in products]


def _wide_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as float32 copies if either is float16, else as it is."""
    if _HALF in (a.dtype, b.dtype):
        return a.float(), b.float()
    return a, b


def _real(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Complex tensors as real ones of twice the entries (``view_as_real``, no copy).

    torch's optimizers step a complex parameter as the real pairs of its entries, where the
    inner product of two updates is Re Σ conj(a)·b.  The product of the complex entries summed
    is Re Σ a·b instead, which turns with the phases: steps along the gradient read as
    reversals, and ``auto`` cut the rate to its floor.  A sum
    of products of the real views is the true inner product, and a norm of them the same norm.
    """
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩, either or both sparse: a sparse one contributes only the entries it holds."""
    if a.is_sparse and b.is_sparse:
        return torch.sparse.sum(a * b)
    if a.is_sparse:
        a, b = b, a
    if not b.is_sparse:
        return (a * b).sum()
    b = b.coalesce()
    return (a[tuple(b.indices())] * b.values()).sum()


def _as(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # a no-op for the usual float32 scalars; half-precision norms and a loss on another device
    # are brought to one dtype and device so that a single stack (and sync) holds them all
    if t.dtype != dtype or t.device != device:
        return t.to(device=device, dtype=dtype)
    return t


def square(x: float) -> float:
    """``x ** 2``, infinite where that is past float64's range: Python raises OverflowError
    there (a float64 loss diverging past 1e154), where a product, which rounds otherwise than
    ``** 2`` in about one case in a thousand, would move every trajectory."""
    try:
        return x**2
    except OverflowError:
        return math.inf


def _maybe_float(loss: float | None) -> float | None:
    """The loss as a float; an integer too large for one is infinite (the guard's to judge)."""
    if loss is None:
        return None
    try:
        return float(loss)
    except OverflowError:
        return math.inf
