"""Hugging Face ``transformers``: tune the ``Trainer``'s optimizer with selftune.

>>> trainer = Trainer(model=model, args=args, train_dataset=ds)
>>> wrap_trainer_optimizer(trainer, log_dir="runs/a")   # before trainer.train()
>>> trainer.train()

The ``Trainer`` builds its optimizer and a ``LambdaLR`` schedule itself and calls
``optimizer.step()`` without a loss.  :func:`wrap_trainer_optimizer` therefore

* builds the optimizer the ``TrainingArguments`` ask for (``trainer.create_optimizer()``, weight
  decay groups included) and wraps it with :func:`selftune.wrap`; the ``Trainer`` keeps an
  optimizer it already has and builds its schedule on the wrapper.  The schedule writes
  ``param_groups[i]["lr"]`` and selftune multiplies it by its own scale at step time, so warm-up
  and decay compose with the tuning;
* feeds the loss: ``trainer.training_step`` returns each micro-batch's loss already divided for
  gradient accumulation, and the sum over the micro-batches of one step is the step's loss (the
  same number the ``Trainer`` logs);
* with ``average=True`` (a ``wrap`` keyword), runs ``trainer.evaluate`` at the optimizer's weight
  average (:meth:`~selftune.SelfTuned.averaged`), so that the evaluation's metrics, and what
  ``auto`` reads of them, are the average's; checkpoints still hold the training weights (what
  a resume needs), with the average in the optimizer's state.  At the end of training the model
  is left holding the weights the evaluations measured: the average of the best checkpoint's
  optimizer state when ``load_best_model_at_end`` (the ``Trainer`` itself would load that
  checkpoint's training weights, which were never evaluated), else the last average, as
  ``torch.optim.swa_utils`` users end with theirs; ``trainer.save_model()`` then saves it.
  A later ``trainer.train()`` goes on from the training weights the last one ended with (the
  best checkpoint's with ``load_best_model_at_end``, as the ``Trainer``'s own would), whose
  momentum and average the optimizer holds; they are kept in CPU memory in between.  Weights
  loaded into the model since are kept instead: ``resume_from_checkpoint`` loads its own.  A
  new ``Trainer`` of the model is another run, refused the last one's ``log_dir``
  (:data:`NEW_TRAINER` says what to do);
* adds :class:`SelfTuneTrainerCallback`, which puts the effective knobs into every log record
  and gives the optimizer each evaluation's metric (:meth:`~selftune.SelfTuned.observe`): the
  one the ``Trainer`` picks its best model by, ``metric_for_best_model`` (default: the
  evaluation loss), in the direction ``greater_is_better`` says.

Checkpoints need nothing more: the ``Trainer`` saves ``optimizer.state_dict()``, which carries
selftune's state under ``"selftune"``, and ``trainer.train(resume_from_checkpoint=...)`` loads it.
The guard's in-memory snapshots are not saved: after resuming, a rollback can only go back to a
snapshot taken since (trouble before the first is skipped, with the rate cut), and the first
guard record after the resume says where they started again, for a replay.  An optimizer
passed as ``Trainer(optimizers=(selftune.wrap(opt), None))`` works with the callback too, but
steps on gradient signals alone: no loss reaches it.  And a callback given to the ``Trainer``
comes after the reporters of ``report_to``, which then log no knobs:
``wrap_trainer_optimizer(trainer)`` feeds that optimizer and puts the callback first.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune.controllers.base import check_flags
from selftune.integrations import (
    another_run_told,
    needs,
    refuse_for_wrapped,
    wrap_settings_given,
)
from selftune.integrations._feed import FedSelfTuned, feed_from
from selftune.integrations.events import StepKnobs
from selftune.shards import local_params
from selftune.tuner import SelfTuned

with needs("huggingface"):
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer import OPTIMIZER_NAME

#: the switch of the evaluation's metric, and what each choice does (see ``check_flags``)
OBSERVE_EVAL = {"observe_eval": "True (give the optimizer each evaluation's metric) or False"}
#: how a run the Trainer steps is resumed, said when one is started again over its run folder
RESUME = (
    "pass the checkpoint the Trainer saved to trainer.train(resume_from_checkpoint=...) (True: "
    "the last one in output_dir), which loads selftune's state with the optimizer's"
)

#: what a refusal of the run folder as another run's says here (a new Trainer of a model that
#: trained, the optimizer of an earlier one still logging there), in place of a plain loop's
NEW_TRAINER = (
    "this Trainer's run is another. The optimizer wrapped now starts from the model's weights "
    "as they are (where an earlier Trainer's training left them), and the folder is one run's. "
    "Give each Trainer a log_dir of its own. To go on with the folder's run instead, call "
    "train() again on the Trainer that ran it, or build the model as that run did (same seed), "
    "call wrap_trainer_optimizer on a Trainer of it with this log_dir and pass a checkpoint "
    "that run saved: trainer.train(resume_from_checkpoint=...)"
)


def _nested(optimizer: Any) -> list[Any]:
    """``optimizer`` and the ones it wraps, outermost first (accelerate wraps the Trainer's)."""
    found: list[Any] = []
    while optimizer is not None and len(found) < 8:
        found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return found


def find_selftuned(optimizer: Any) -> SelfTuned | None:
    """The :class:`SelfTuned` inside ``optimizer`` (accelerate wraps it), or ``None``."""
    return next((opt for opt in _nested(optimizer) if isinstance(opt, SelfTuned)), None)


class SelfTuneTrainerCallback(TrainerCallback):
    """Log selftune's effective knobs with the ``Trainer``'s metrics (``selftune/group0/lr`` ...).

    Added by :func:`wrap_trainer_optimizer`.  At the start of training it checks that the
    optimizer is a selftune one and says what to do if it is not.  ``observe_eval``: after each
    evaluation, give the optimizer the metric the ``Trainer`` judges its best model by.
    """

    def __init__(self, observe_eval: bool = True) -> None:
        check_flags(OBSERVE_EVAL, {"observe_eval": observe_eval})
        self.optimizer: SelfTuned | None = None
        self.observe_eval = observe_eval
        self._training = False  #: between on_train_begin and on_train_end
        self._missing: set[str] = set()  #: metric keys an evaluation lacked (warned once)
        self._knobs = StepKnobs()  #: the knobs at the optimizer's last step, for ``on_log``
        #: the optimizer :func:`wrap_trainer_optimizer` made, to tell a replaced one from none
        self._wrapped: SelfTuned | None = None
        #: with a weight average: the optimizer, and the training weights (in CPU memory) that
        #: the last ``train()``'s end put its average in place of, for the next one to go on from
        self._trained: tuple[SelfTuned, list[torch.Tensor]] | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.optimizer = find_selftuned(optimizer)
        self._training = True
        if self.optimizer is not None and self._knobs not in self.optimizer._listeners:
            self.optimizer.add_listener(self._knobs)
        if self.optimizer is None:
            raise selftune.ConfigError(self._refusal(optimizer))
        self._go_on_from_trained()
        self.optimizer._resume_how = RESUME  # (one given to the Trainer wrapped)
        if isinstance(self.optimizer, FedSelfTuned):
            # the losses of a step an interrupt cut short before its optimizer step: a resume
            # with the same Trainer added them to its first step's
            self.optimizer.loss_feed.clear()
        else:
            warnings.warn(
                "the Trainer steps its selftune optimizer without a loss, so it tunes on gradient "
                "signals alone; wrap_trainer_optimizer(trainer) also feeds it the training loss "
                "(and puts this callback before the reporters, which log the knobs it adds)",
                stacklevel=2,
            )

    def _go_on_from_trained(self) -> None:
        """Put back the training weights that the last ``train()``'s end put the average in
        place of (``on_train_end``): the optimizer's momentum and average are theirs, and a
        ``train()`` that went on from the average stepped it with the state of other weights.
        Only while the model still holds that average: a checkpoint resumed
        (``resume_from_checkpoint``), or weights loaded by hand, are the ones to go on from.  A
        model moved or converted since (``model.to``) still holds it (``held_by`` follows the
        conversion), and the training weights are copied in at its new device and dtype."""
        kept, self._trained = self._trained, None
        if kept is None or kept[0] is not self.optimizer:
            return
        opt, trained = kept
        params = _weights(opt)
        if opt.average is None or len(params) != len(trained):
            return  # (a group added since: the weights kept are not all of them)
        if opt.average.held_by(opt.param_groups):
            with torch.no_grad():
                for p, t in zip(params, trained, strict=True):
                    p.copy_(t)

    def _refusal(self, optimizer: Any) -> str:
        """Why training cannot start on ``optimizer``, which holds no selftune optimizer.

        A ``create_optimizer`` override that builds an optimizer even when ``trainer.optimizer``
        is set (``Trainer.create_optimizer`` builds one only when it is ``None``) replaced the
        wrapper at ``train()``: the refusal said to call ``wrap_trainer_optimizer``, which the
        script had done.
        """
        found = type(_nested(optimizer)[-1]).__name__ if optimizer is not None else "None"
        if self._wrapped is None:
            return (
                f"SelfTuneTrainerCallback found a {found}, not a selftune optimizer: call "
                "selftune.integrations.huggingface.wrap_trainer_optimizer(trainer) before "
                "trainer.train()"
            )
        return (
            f"the Trainer trains with a {found}, not the selftune optimizer that "
            "wrap_trainer_optimizer gave it: something replaced that one since, such as a "
            "create_optimizer override that builds an optimizer even when self.optimizer is set; "
            "build one only when self.optimizer is None, as Trainer.create_optimizer does"
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A step the AMP scaler skipped never took its loss; do not add it to the next one's.
        if isinstance(self.optimizer, FedSelfTuned):
            self.optimizer.loss_feed.clear()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # during training only: an evaluate() after it has no step left to read the metric
        if self.optimizer is None or not self.observe_eval or metrics is None or not self._training:
            return
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            # one of several evaluation sets, whose keys carry its name, may not hold it; say
            # so once, and go on (the Trainer's own best-model choice also reads this key)
            if key not in self._missing:
                self._missing.add(key)
                warnings.warn(
                    f"an evaluation gave no {key!r} (it gave {', '.join(sorted(metrics))}), so "
                    "selftune did not read it; set TrainingArguments(metric_for_best_model=...) "
                    "to the metric to tune by, or pass observe_eval=False to "
                    "wrap_trainer_optimizer",
                    stacklevel=2,
                )
            return
        self.optimizer.observe(metrics[key], mode="max" if args.greater_is_better else "min")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With a weight average, leave the model at the weights the evaluations measured (see
        the module docstring).  After ``load_best_model_at_end`` the ``Trainer`` has loaded the
        best checkpoint's *training* weights, chosen by the metric of its average; that average
        is in the checkpoint's optimizer state, so it is read back from there.  The training
        weights are kept, in CPU memory, for a later ``train()`` to go on from
        (:meth:`_go_on_from_trained`)."""
        self._training = False
        opt = self.optimizer
        if opt is None or opt.average is None:
            return
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best is not None:
            path = Path(best) / OPTIMIZER_NAME
            saved = (
                torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
            )
            average = saved.get("selftune", {}).get("average")
            if average is None:
                warnings.warn(
                    f"{path} holds no selftune weight average (an optimizer state saved with "
                    "save_only_model, or by a sharded strategy): the model keeps the best "
                    "checkpoint's training weights, not the average its metric was measured at",
                    stacklevel=2,
                )
                return
            opt.average.load_state_dict(average)
        self._trained = (opt, [p.detach().to("cpu", copy=True) for p in _weights(opt)])
        opt.average.copy_into(opt.param_groups)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # a training log only: an evaluation's logs are the dict that evaluate() returns
        if self.optimizer is None or logs is None or "loss" not in logs:
            return
        # the knobs of the last step: the scheduler has stepped since (StepKnobs)
        in_force = self._knobs.knobs
        values = {
            f"selftune/group{g}/{name}": value
            for g, knobs in enumerate(
                in_force if in_force is not None else self.optimizer.hyperparams()
            )
            for name, value in knobs.items()
        }
        # ``logs`` goes on to the reporters (TensorBoard, MLflow, ...) that come after this
        # callback; the Trainer appended a copy to ``log_history`` before calling it.
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def wrap_trainer_optimizer(
    trainer: Trainer,
    controller: str | selftune.Controller | None = None,
    log_dir: str | Path | None = None,
    *,
    observe_eval: bool | None = None,
    **wrap_kwargs: Any,
) -> SelfTuned:
    """Wrap ``trainer``'s optimizer with selftune and feed it the loss; call before ``train()``.

    ``controller`` (default ``"auto"``), ``log_dir`` and any other keyword go to
    :func:`selftune.wrap`; ``observe_eval``: give the optimizer each evaluation's metric (see
    the module docstring; default: yes, or what a ``SelfTuneTrainerCallback`` the ``Trainer``
    was given says).  An optimizer passed to the ``Trainer`` is wrapped as it is;
    otherwise the one the ``TrainingArguments`` describe is built first.  One that is already a
    selftune optimizer is only fed, and :func:`selftune.wrap`'s settings given here are
    refused: they would be ignored, and a ``log_dir`` given for a run that writes none is a
    log lost without a word.  Returns the wrapper, whose ``hyperparams()`` give the knobs in
    force.  A ``Trainer(model_init=...)`` is refused before anything is built: its ``train()``
    builds a new model and a new optimizer, so the one wrapped here would never step.
    """
    if observe_eval is not None:
        check_flags(OBSERVE_EVAL, {"observe_eval": observe_eval})
    if getattr(trainer, "model_init", None) is not None:
        # Refused here, not at train(): there the Trainer had already dropped the wrapper for
        # a plain optimizer of its new model, the callback could only say it found no selftune
        # optimizer, and the run folder made by the wrap was left for a model never trained.
        raise selftune.ConfigError(
            "wrap_trainer_optimizer cannot tune a Trainer given model_init: trainer.train() "
            "builds a new model and a new optimizer, so the one wrapped now would never step; "
            "build the model and pass Trainer(model=...) instead (hyperparameter_search, which "
            "needs model_init, is not supported)"
        )
    # A train() left the optimizer inside accelerate's wrapper, which the next train() prepares
    # again.  Wrapped, it named accelerate's class in the checkpoints, and a resume, which wraps
    # the Trainer's own optimizer, was refused them; a selftune one in it was refused, told to
    # call wrap_trainer_optimizer before train(), which had been done.
    while isinstance(trainer.optimizer, AcceleratedOptimizer):
        trainer.optimizer = trainer.optimizer.optimizer
    if trainer.optimizer is None:
        trainer.create_optimizer()
    if trainer.optimizer is None:
        raise selftune.ConfigError("trainer.create_optimizer() built no optimizer")
    if isinstance(trainer.optimizer, SelfTuned):
        refuse_for_wrapped(
            wrap_settings_given(controller, log_dir, wrap_kwargs),
            "the Trainer's optimizer is already",
            "wrap_trainer_optimizer",
            "pass them to selftune.wrap, or give the Trainer the plain optimizer",
        )
        opt = feed_from(trainer.optimizer)
    else:
        chosen = "auto" if controller is None else controller
        # the model's buffers are rolled back with its weights (wrap's model=)
        given = {"model": trainer.model, **wrap_kwargs}
        with another_run_told(NEW_TRAINER):
            opt = feed_from(selftune.wrap(trainer.optimizer, chosen, log_dir=log_dir, **given))
    opt._resume_how = RESUME
    trainer.optimizer = opt
    if getattr(trainer.training_step, "_selftune_feed", None) is None:
        trainer.training_step = _feeding(trainer.training_step, opt)  # type: ignore[method-assign]
    else:
        trainer.training_step._selftune_feed[0] = opt  # type: ignore[attr-defined]
    if getattr(trainer.evaluate, "_selftune_average", None) is None:
        trainer.evaluate = _averaging(trainer.evaluate, opt)  # type: ignore[method-assign]
    else:
        trainer.evaluate._selftune_average[0] = opt  # type: ignore[attr-defined]
    callbacks = trainer.callback_handler.callbacks
    ours = [cb for cb in callbacks if isinstance(cb, SelfTuneTrainerCallback)]
    callback = ours[0] if ours else SelfTuneTrainerCallback()
    if ours:
        callbacks.remove(callback)
    # First in line, so that the reporters called after it log the knobs it adds: one given to
    # the Trainer came after those of report_to, and TensorBoard or MLflow got none.
    callbacks.insert(0, callback)
    if observe_eval is not None:  # else the callback's own: one given observe_eval=False keeps it
        callback.observe_eval = observe_eval
    callback._wrapped = opt
    return opt


def _weights(opt: SelfTuned) -> list[torch.Tensor]:
    """The (local) tensors of the parameters ``opt`` trains, in the order of its groups."""
    return [p for group in opt.param_groups for p in local_params(group)]


def _feeding(training_step: Any, opt: FedSelfTuned) -> Any:
    """``training_step`` that also adds the loss it returns to ``opt``'s feed."""
    target = [opt]

    @functools.wraps(training_step)
    def step(*args: Any, **kwargs: Any) -> Any:
        loss = training_step(*args, **kwargs)
        target[0].loss_feed.add(loss)
        return loss

    step._selftune_feed = target  # type: ignore[attr-defined]
    return step


def _averaging(evaluate: Any, opt: SelfTuned) -> Any:
    """``evaluate`` run at ``opt``'s weight average when it keeps one (``average=True``)."""
    target = [opt]

    @functools.wraps(evaluate)
    def run(*args: Any, **kwargs: Any) -> Any:
        if target[0].average is None:
            return evaluate(*args, **kwargs)
        with target[0].averaged():
            return evaluate(*args, **kwargs)

    run._selftune_average = target  # type: ignore[attr-defined]
    return run
