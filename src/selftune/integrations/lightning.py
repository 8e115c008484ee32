"""Lightning: ``Trainer(callbacks=[SelfTuneCallback()])`` tunes the module's optimizers.

>>> trainer = lightning.pytorch.Trainer(callbacks=[SelfTuneCallback(log_dir="runs/a")])
>>> trainer.fit(model)                        # configure_optimizers stays as it is

What the callback does, and when:

* ``on_fit_start`` (after Lightning built the optimizers and schedulers): wraps every optimizer
  with :func:`selftune.wrap` (an optimizer that ``configure_optimizers`` already wrapped is kept),
  puts the wrapper in ``trainer.strategy.optimizers`` and points every LR scheduler's
  ``scheduler.optimizer`` at the optimizer it wraps (``LearningRateMonitor`` names the rate
  after that one's class, ``lr-AdamW``, as without selftune).  Schedulers keep writing
  ``param_groups[i]["lr"]``, which the wrapper shares; selftune's adjustment is a scale on top
  of it, so both compose.
* ``on_before_backward``: adds each micro-batch's loss to the optimizer's feed, so ``step`` sees
  the mean loss of the whole optimizer step (gradient accumulation included), also on the AMP
  path where Lightning calls ``scaler.step(optimizer)`` without a closure; the first backward
  after a step was tried (``on_before_optimizer_step``) drops what a step the scaler skipped
  left there, in manual optimization too, as ``on_before_zero_grad`` does in automatic.  With
  several optimizers (manual optimization) a backward does not say whose loss it is: none is
  fed (a warning says so), and ``training_step`` may pass each its own,
  ``opt.step(loss=loss.detach())``.
* ``on_validation_start``/``on_validation_end``: with ``average=True`` (a ``wrap`` keyword), the
  module is validated at each optimizer's weight average (:meth:`~selftune.SelfTuned.averaged`)
  and its training weights come back afterwards.
* ``on_fit_end``: with ``average=True``, the module is left at the average, the weights its
  validations measured, so that ``trainer.test(model)`` and a model saved after ``fit`` are
  those weights.  A later ``fit`` of the module builds its optimizers anew (Lightning calls
  ``configure_optimizers`` again: no momentum, average or tuned rate carries over) and starts
  them from the module as it is, at the average; ``fit(..., ckpt_path=...)`` goes on from a
  checkpoint's training weights and state.  With a ``log_dir`` any later fit is another
  run, refused the folder of the last (:data:`FIT` says what to do): give each fit its own.
  Checkpoints saved during the run hold the training weights (what a resume needs) with the
  average in the optimizer state, and the callback names each averaged parameter in them
  (``on_save_checkpoint``).  So ``trainer.test(ckpt_path="best")`` (or ``validate``,
  ``predict``) through a trainer with the callback evaluates the average of the checkpoint
  that ``ModelCheckpoint`` chose by that average's metric, not training weights no validation
  measured (``on_load_checkpoint``), and :func:`averaged_state_dict` gives the same weights to
  a module loaded without a trainer.  A weights-only checkpoint holds no average.
* ``on_validation_end``, with ``monitor`` set: gives every optimizer the monitored metric
  (:meth:`~selftune.SelfTuned.observe`), as ``ReduceLROnPlateau`` would be given it; ``auto``
  halves the rate once it has gone more than three validations without a new best.  Under DDP
  every rank gives the ranks' mean (each logs its own without ``sync_dist``), which the run
  reads and the checkpoint saved after the validation holds.
* Checkpoints: Lightning saves ``optimizer.state_dict()``, which carries selftune's controller,
  guard, signal and log state under ``"selftune"``; the callback's own state adds the guard's
  in-memory snapshots.  ``trainer.fit(model, ckpt_path=...)`` from a ``ModelCheckpoint``'s
  checkpoint taken at an epoch's end continues bit for bit: the weights, trace and log end as
  the run's that never stopped (tested without validation).  With ``monitor`` set, that is
  the default ``ModelCheckpoint``'s, saved after the epoch's validation.  A step-based one
  (``every_n_train_steps``) whose step is an epoch's last batch is saved in
  ``on_train_batch_end``, before that validation, and a resume does not run it again: the
  optimizer never reads its metric, so the trace lacks that row and what ``auto`` decides
  on metrics may differ.  Without validation either kind qualifies.
  With a ``log_dir`` the run folder recognises its run by the hash of the *initial* weights, and
  Lightning loads the checkpoint's weights before ``on_fit_start``; the callback therefore keeps
  the freshly initialised weights from ``setup`` while resuming and wraps with those in place
  (on every rank under DDP, also where the folder is rank 0's alone), which requires the
  resumed module to be built the same way (same seed) as the first one.
  An optimizer that ``configure_optimizers`` wraps with a ``log_dir`` cannot resume so:
  Lightning calls it after loading the checkpoint's weights, and the refusal of its folder then
  says to give the ``log_dir`` to the callback instead (``on_exception``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune import shards
from selftune.average import swapped
from selftune.controllers.base import check_flags
from selftune.integrations import (
    another_run_told,
    check_wrap_options,
    needs,
    refuse_for_wrapped,
    wrap_settings_given,
)
from selftune.integrations._feed import (
    LossFeed,
    feed_from,
    keep_scheduler_mark,
    mark_inner_step,
)
from selftune.integrations.events import FollowsOne, StepKnobs
from selftune.signals import ranks_mean
from selftune.tuner import SelfTuned, StepEvent

with needs("lightning"):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

#: The checkpoint key naming each averaged parameter, per optimizer and param group.
AVERAGED = "selftune_averaged_parameters"
#: what a refusal of the run folder as another run's says in a fit (a later fit of the module,
#: see the module docstring), in place of a plain loop's advice, to wrap before loading any
#: weights, which the callback does itself
FIT = (
    "this fit is another run. Lightning builds a fit's optimizers anew, from the module's "
    "weights as they are (where an earlier fit of it left them), and the folder is one run's. "
    "Give each fit a log_dir of its own: a SelfTuneCallback(log_dir=...) per fit, or a log_dir "
    "that names the fit (runs/a/fit2). To go on with the folder's run instead, build the "
    "module as its first fit did (same seed) and pass a checkpoint that run saved: "
    "trainer.fit(model, ckpt_path=...)"
)


class SelfTuneCallback(Callback):
    """Wrap the LightningModule's optimizers with selftune and feed them the training loss.

    ``controller`` (default ``"auto"``), ``log_dir`` and any other keyword (``average=True``,
    ``guard=...``) go to :func:`selftune.wrap`, checked here rather than when the fit starts;
    with several optimizers, optimizer ``i`` logs to ``log_dir/opt{i}``.  An optimizer that
    ``configure_optimizers`` already wrapped is only fed, and those settings are then refused
    (they would be ignored, a ``log_dir`` without a word).  A controller given as an instance
    is copied for each optimizer it wraps.  Under ``fast_dev_run`` no run folder is written, as
    Lightning writes no logs (an optimizer ``configure_optimizers`` wrapped with a ``log_dir``
    writes its own, which a warning says).  ``log_knobs``: log the effective knobs of each step
    (``selftune/group{g}/lr`` ...) through ``pl_module.log``, for the Lightning logger
    (Lightning's ``LearningRateMonitor`` shows the scheduler's rate, not the effective one).
    ``monitor``: the name of a metric the module logs in validation (``"val_loss"``), given to
    the optimizers after each validation (a fit in which no validation ran warns at its end,
    as it gave them nothing); ``mode``: "min" if lower is better, "max" if higher.
    ``listeners``: added to the optimizer once it is wrapped (a ``TensorBoardWriter``, an
    ``MLflowWriter``), since it exists only when the fit starts, and closed at the fit's end;
    refused with several optimizers, whose knobs they would write under one name.  With
    ``log_knobs`` the knobs already reach the Lightning logger: a writer on that logger's own
    ``SummaryWriter`` or MLflow run writes them twice, a step apart (selftune counts steps
    from 1, Lightning's logging from 0); give the writer its own folder or run.
    """

    def __init__(
        self,
        controller: str | selftune.Controller | None = None,
        log_dir: str | Path | None = None,
        *,
        log_knobs: bool = True,
        monitor: str | None = None,
        mode: str = "min",
        listeners: Sequence[Callable[[StepEvent], None]] = (),
        **wrap_kwargs: Any,
    ) -> None:
        if mode not in ("min", "max"):
            raise selftune.ConfigError(f'SelfTuneCallback(mode={mode!r}): use "min" or "max"')
        check_flags(
            {"log_knobs": "True (log the effective knobs through pl_module.log) or False"},
            {"log_knobs": log_knobs},
        )
        if monitor is not None and not isinstance(monitor, str):
            raise selftune.ConfigError(
                f"SelfTuneCallback(monitor={monitor!r}): give the name of a metric the module "
                'logs in validation, e.g. "val_loss"'
            )
        self.monitor, self.mode = monitor, mode
        #: the wrap settings given, by name: refused for an optimizer already wrapped
        self._given = wrap_settings_given(controller, log_dir, wrap_kwargs)
        self.controller = "auto" if controller is None else controller
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.log_knobs = log_knobs
        self.listeners = list(listeners)
        check_wrap_options(self.controller, wrap_kwargs, "SelfTuneCallback")
        self.wrap_kwargs = wrap_kwargs
        self.optimizers: list[SelfTuned] = []
        self._knobs: list[StepKnobs] = []  #: each optimizer's knobs at its last step
        self._feed = LossFeed()
        #: a validation of this fit gave the monitored metric to the optimizers
        self._observed = False
        #: an optimizer step was tried since the last backward (``on_before_optimizer_step``)
        self._step_tried = False
        self._pending_snapshots: list[list[dict[str, Any]] | None] | None = None
        self._initial: list[torch.Tensor] | None = None
        #: the weight averages swapped in for the validation under way
        self._averaged = ExitStack()

    # -- wrapping ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before Lightning restores a checkpoint's weights (``trainer.ckpt_path`` is not
        # known yet): when the log folder already holds a run, this may be its resumption, so
        # keep the initial weights for the folder to recognise its run (module docstring).
        # That costs one copy of the weights, until on_fit_start.  Under DDP every rank keeps
        # them where rank 0 does: the wrap hashes every rank's weights, and a rank not given the
        # folder (or on a node without it) wrapped the checkpoint's, refused as another run's.
        holds = self.log_dir is not None and _holds_a_run(self.log_dir)
        if stage == "fit" and shards.any_rank(holds):
            self._initial = [p.detach().clone() for p in pl_module.parameters()]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        originals = list(strategy.optimizers)
        if not originals:
            raise selftune.ConfigError(
                "SelfTuneCallback found no optimizer: configure_optimizers returned none"
            )
        if len(originals) > 1 and self.listeners:
            # checked before anything is wrapped: a refusal leaves the fit as it was
            raise selftune.ConfigError(
                f"SelfTuneCallback(listeners=...) with {len(originals)} optimizers: each "
                "listener would hear every optimizer's steps and write their knobs under the "
                "same names (one optimizer's rates zigzagging into another's). Leave listeners "
                "empty and add a writer with its own prefix to each optimizer once the fit has "
                "wrapped them, e.g. in the module's on_train_start: for k, opt in "
                "enumerate(callback.optimizers): opt.add_listener(TensorBoardWriter(..., "
                "prefix=f'selftune/opt{k}')), and close them in on_train_end"
            )
        if len(originals) > 1:
            warnings.warn(
                f"SelfTuneCallback: with {len(originals)} optimizers a backward does not say "
                "which optimizer's loss it is, so none is fed one: each tunes on its gradient "
                "signals, unless training_step passes its own, opt.step(loss=loss.detach())",
                stacklevel=2,
            )
        # a fast_dev_run writes no run folder, as Lightning writes no logs or checkpoints then:
        # a folder it wrote made the real run that followed refuse its first step; nor does it
        # give the listeners its steps (a TensorBoardWriter's points, before the real run's)
        trial = bool(getattr(trainer, "fast_dev_run", False))
        log_dir = None if trial else self.log_dir
        listeners = [] if trial else self.listeners
        for listener in listeners:  # before anything is wrapped: a refusal leaves no folder
            if isinstance(listener, FollowsOne):
                try:
                    listener.check_unused()
                except selftune.ConfigError as exc:
                    raise selftune.ConfigError(
                        "SelfTuneCallback: a listener given it follows the optimizer of a fit "
                        "before this one: build the callback and its writers anew for each "
                        f"fit ({exc})"
                    ) from None
        with _weights_swapped(list(pl_module.parameters()), self._initial), another_run_told(FIT):
            wrapped = [
                self._wrap(i, opt, len(originals), log_dir, pl_module, trial)
                for i, opt in enumerate(originals)
            ]
        self._initial = None
        self._knobs = [StepKnobs() for _ in wrapped]
        for opt, knobs in zip(wrapped, self._knobs, strict=True):
            opt.add_listener(knobs)
            for listener in listeners:
                opt.add_listener(listener)
        strategy.optimizers = list(wrapped)  # the setter also rebuilds the LightningOptimizers
        # Each scheduler watches the optimizer the wrapper wraps (whose param_groups it shares),
        # also one built on a wrapper configure_optimizers returned: LearningRateMonitor names
        # a scheduled rate after its optimizer's class, and pointed at the wrapper it logged
        # ``lr-FedSelfTuned``, and the optimizer again as ``lr-AdamW`` (it unwraps
        # trainer.optimizers, and found the inner one unwatched).
        for config in strategy.lr_scheduler_configs:
            target = getattr(config.scheduler, "optimizer", None)
            for original, new in zip(originals, wrapped, strict=True):
                if target is original or target is new or target is new.optimizer:
                    config.scheduler.optimizer = mark_inner_step(new)
        self.optimizers = wrapped
        self._observed = trial  # (a trial of a step: nothing to say)

    def _wrap(
        self,
        index: int,
        optimizer: torch.optim.Optimizer,
        count: int,
        log_dir: Path | None,
        module: torch.nn.Module,
        trial: bool,
    ) -> SelfTuned:
        opt = optimizer  # already wrapped in configure_optimizers, or wrapped here
        if isinstance(opt, SelfTuned):
            refuse_for_wrapped(
                self._given,
                "configure_optimizers returned",
                "SelfTuneCallback",
                "pass them to selftune.wrap there, or return the plain optimizer",
            )
            if trial and opt._log is not None:
                # its wrap made the folder, which the trial's step writes to: the real fit of
                # the module it moved was then refused as another run's, its advice silent on
                # the trial
                warnings.warn(
                    f"SelfTuneCallback: this fast_dev_run steps an optimizer that "
                    f"configure_optimizers wrapped with log_dir {str(opt._log.path)!r}, which "
                    "writes the step there, and a fit over that folder after it is refused as "
                    "another run's. Return the plain optimizer and give log_dir and the other "
                    "wrap settings to SelfTuneCallback(log_dir=..., ...), which writes no "
                    "folder in a fast_dev_run",
                    stacklevel=2,
                )
        if not isinstance(opt, SelfTuned):
            if log_dir is not None and count > 1:
                log_dir = log_dir / f"opt{index}"
            # a controller given as an instance is copied for each optimizer and each fit: one
            # instance read every optimizer's signals into one state, saved in each checkpoint
            controller = self.controller
            if not isinstance(controller, str):
                controller = copy.deepcopy(controller)
            # one optimizer trains the module: its rollbacks put the module's buffers back
            # too; of several (a GAN's), each rolls back alone, and one's rollback must not
            # rewind the statistics of the other's network
            kwargs = {"model": module} if count == 1 else {}
            opt = selftune.wrap(
                optimizer, controller, log_dir=log_dir, **{**kwargs, **self.wrap_kwargs}
            )
        opt._resume_how = (
            "pass the checkpoint Lightning saved to trainer.fit(..., ckpt_path=...), which "
            "loads selftune's state with the optimizer's"
        )
        return feed_from(opt, self._feed) if count == 1 else keep_scheduler_mark(opt)

    # -- the loss -----------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # Lightning scales the loss before this hook under 16-bit AMP; undo it (one sync).
            loss = loss.detach() / scaler.get_scale()
        if self._step_tried:
            # the first backward since an optimizer step was tried: what the feed still holds
            # is that step's, which the scaler skipped (or a loss passed to it explicitly won)
            self._feed.clear()
            self._step_tried = False
        # read at each micro-batch: a GradientAccumulationScheduler sets it at each epoch's start
        self._feed.window = trainer.accumulate_grad_batches
        self._feed.add(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Every step Lightning tries, in automatic and manual optimization alike, before the
        # AMP scaler decides whether to make it: the losses fed so far are this step's.
        self._step_tried = True

    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        # Before each step's first backward in automatic optimization (manual optimization
        # calls no such hook: on_before_backward drops what a skipped step left there): a loss
        # still in the feed belongs to a step the AMP scaler skipped, not to the next one.
        self._feed.clear()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not self.log_knobs or not self.optimizers:
            return
        values: dict[str, float] = {}
        for k, (opt, stepped) in enumerate(zip(self.optimizers, self._knobs, strict=True)):
            prefix = "selftune/" if len(self.optimizers) == 1 else f"selftune/opt{k}/"
            # the knobs of the step just taken: the scheduler has stepped since (StepKnobs)
            in_force = stepped.knobs if stepped.knobs is not None else opt.hyperparams()
            for g, knobs in enumerate(in_force):
                values.update({f"{prefix}group{g}/{name}": v for name, v in knobs.items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=trainer.logger is not None)

    # -- the metric ---------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validate at the weight average of every optimizer that keeps one (average=True), so
        # that the monitored metric, and what auto reads of it, is the average's.  Only while
        # fitting: a later ``validate`` reads the module as it is (the average the fit ended at,
        # or a checkpoint's, on_load_checkpoint).
        if trainer.state.fn != "fit":
            return
        for opt in self.optimizers:
            if opt.average is not None:
                self._averaged.enter_context(opt.averaged())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._averaged.close()  # the training weights back
        if self.monitor is None or trainer.sanity_checking or not self.optimizers:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise selftune.ConfigError(
                f"SelfTuneCallback(monitor={self.monitor!r}) found no such metric after "
                f"validation (logged: {logged}); log it with self.log in validation_step"
            )
        shared = _ranks_mean(trainer, value)
        for opt in self.optimizers:
            opt.observe(shared, mode=self.mode)
        self._observed = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._averaged.close()
        if self.monitor is not None and self.optimizers and not self._observed:
            # Lightning's own ModelCheckpoint and EarlyStopping refuse a monitor they never
            # find; a fit with no validation (limit_val_batches=0, no val dataloader, no
            # validation_step, fewer steps than an epoch) gave it nothing, without a word
            warnings.warn(
                f"SelfTuneCallback(monitor={self.monitor!r}) observed nothing in this fit: no "
                "validation ran, so the optimizers never read the metric (auto's cut on its "
                "plateau never acted). Give the fit a validation that runs (val dataloader, "
                "validation_step, val_check_interval), or leave monitor unset",
                stacklevel=2,
            )
        for opt in self.optimizers:
            if opt.average is not None:  # end at the weights the validations measured
                opt.average.copy_into(opt.param_groups)

    # -- checkpoints --------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning loads the optimizer state (selftune's included) after on_fit_start;
        # load_state_dict clears the guard's snapshots, so they go back only now.
        if self._pending_snapshots is not None:
            for opt, saved in zip(self.optimizers, self._pending_snapshots, strict=False):
                if opt.guard is not None and saved is not None:
                    opt.guard.load_snapshots_state(saved)
            self._pending_snapshots = None
        self._feed.clear()

    def state_dict(self) -> dict[str, Any]:
        """The guard's in-memory snapshots; the rest of selftune's state is in the optimizer's."""
        return {
            "guard_snapshots": [
                None if opt.guard is None else opt.guard.snapshots_state()
                for opt in self.optimizers
            ]
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_snapshots = list(state_dict.get("guard_snapshots", []))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Name each averaged parameter as the module's state dict does, for an evaluation of
        # this checkpoint to find its average (the optimizer state lists parameters by position).
        # A weights-only checkpoint holds no optimizer state, so no average to name.
        if "optimizer_states" in checkpoint and any(o.average is not None for o in self.optimizers):
            checkpoint[AVERAGED] = _averaged_names(pl_module, self.optimizers)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning loaded the module's (training) weights just before this hook.  A fit resumes
        # from them; an evaluation reads the average the checkpoint's validations measured.
        # (Lightning calls no callback for a weights-only checkpoint: it holds no average.)
        if trainer.state.fn == "fit" or AVERAGED not in checkpoint:
            return
        averaged = averaged_state_dict(checkpoint)
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                param.copy_(averaged[name])

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._averaged.close()  # a validation that failed must not leave the average in place
        if self.log_dir is None and trainer.state.fn == "fit" and trainer.ckpt_path is not None:
            _say_how_to_resume(exception)
        if trainer.state.fn == "fit":
            # Lightning calls no teardown hook after an exception: without this, the writers'
            # last decisions (those that led to the error) were never uploaded, and a run the
            # MLflow writer started stayed open as long as the process lived
            self._close_listeners()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The fit's end: the optimizers' run folders are closed, and so are the listeners
        given (an ``MLflowWriter`` uploads its last decisions and ends a run it started only in
        ``close``: left open, a short fit left no decisions in the MLflow run).  A fit that
        raised gets no teardown from Lightning: ``on_exception`` closes the listeners."""
        self._averaged.close()
        if stage == "fit":
            for opt in self.optimizers:
                opt.close()
            self._close_listeners()

    def _close_listeners(self) -> None:
        """Close each listener given that has a ``close`` (the writers; each closes once)."""
        for listener in self.listeners:
            close = getattr(listener, "close", None)
            if callable(close):
                close()


def averaged_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's module state dict with every averaged parameter at its weight average.

    Those are the weights the checkpoint's validations measured with ``average=True``, and so the
    weights ``ModelCheckpoint`` chose a best checkpoint by; its ``state_dict`` holds the training
    weights, which a resume needs.  For a module loaded without a trainer::

        ckpt = torch.load(path, weights_only=False)
        model.load_state_dict(averaged_state_dict(ckpt))
    """
    names = checkpoint.get(AVERAGED)
    if names is None:
        raise selftune.ConfigError(
            "the checkpoint holds no selftune weight average: it was saved without "
            "SelfTuneCallback(average=True), or with its weights only; its 'state_dict' holds "
            "the training weights"
        )
    out = dict(checkpoint["state_dict"])
    for opt_names, state in zip(names, checkpoint["optimizer_states"], strict=True):
        if opt_names is None:  # an optimizer without an average
            continue
        tensors = state["selftune"]["average"]["tensors"]
        for group_names, group in zip(opt_names, tensors, strict=True):
            for held, average in zip(group_names, group, strict=True):
                # one name or None in a checkpoint saved before every tied name was listed
                out.update((n, average) for n in ([held] if isinstance(held, str) else held or []))
    return out


def _averaged_names(
    module: torch.nn.Module, optimizers: list[SelfTuned]
) -> list[list[list[list[str]]] | None]:
    """Per optimizer that keeps an average (else None), per group, each parameter's names in the
    module's state dict: every one of a tied parameter (an embedding shared with the output
    layer), whose state dict holds it under each, and loads the last; none for one the module
    does not hold."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [
        None
        if opt.average is None
        else [[names.get(id(p), []) for p in group["params"]] for group in opt.param_groups]
        for opt in optimizers
    ]


@contextmanager
def _weights_swapped(
    params: list[torch.Tensor], initial: list[torch.Tensor] | None
) -> Iterator[None]:
    """Put ``initial`` into ``params`` for the duration of the block, then restore them."""
    if initial is None:
        yield
        return
    if len(initial) != len(params):
        raise selftune.ConfigError(
            f"the module has {len(params)} parameters at fit start but had {len(initial)} at "
            "setup; SelfTuneCallback cannot resume its log"
        )
    with swapped(params, initial):
        yield


def _ranks_mean(trainer: pl.Trainer, value: torch.Tensor | float) -> torch.Tensor | float:
    """The ranks' mean of the metric each rank logged, on every rank (``value`` itself in one
    process).

    A metric logged without ``sync_dist`` is each rank's own.  The optimizers' step shares
    the mean of what the ranks observed, but a checkpoint saved before that step (Lightning's
    ``ModelCheckpoint`` saves after the validation) held rank 0's own, which a resume read in
    the mean's place, and each rank warned of it at every validation.  Every rank validates, so
    this collective meets its peers; the mean is the step's own (:func:`ranks_mean`), which a
    value every rank holds (``sync_dist=True``) passes to the bit.
    """
    if trainer.world_size <= 1:
        return value
    mine = torch.tensor(float(value), dtype=torch.float64, device=trainer.strategy.root_device)
    rows = trainer.strategy.all_gather(mine).reshape(-1, 1)
    return float(ranks_mean(rows)[0])


def _say_how_to_resume(exception: BaseException) -> None:
    """Add Lightning's way to resume to a refusal of a resumed fit's run folder as another run's.

    Given no ``log_dir``, the callback wraps nothing with a folder: such a refusal comes from
    an optimizer wrapped in ``configure_optimizers``, which Lightning calls after it loaded the
    checkpoint's weights (before ``on_fit_start``), so that wrap hashed them, not the run's
    initial weights.  The refusal's own advice, to wrap before loading any weights, is what no
    module can do there; the callback can (see the module docstring).
    """
    from selftune.audit import LogError

    if isinstance(exception, LogError) and "initial_params_sha256" in str(exception):
        exception.add_note(
            "SelfTuneCallback: Lightning loads a checkpoint's weights before it calls "
            "configure_optimizers, so an optimizer wrapped there with a log_dir cannot resume "
            "its run folder. Return the plain optimizer from configure_optimizers and give "
            "log_dir and the other wrap settings to SelfTuneCallback(log_dir=..., ...), which "
            "wraps it at the run's initial weights; the run's folder resumes so, with the "
            "settings it ran with"
        )


def _holds_a_run(log_dir: Path) -> bool:
    return (log_dir / "manifest.json").exists() or (log_dir / "opt0" / "manifest.json").exists()
