"""The integrations, each in a real short training with the real framework."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch

import selftune
from selftune.audit import read_log
from selftune.controllers.auto import AutoController

# --------------------------------------------------------------------------- helpers


def _data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable classification task: labels from a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 4, generator=gen)
    return x, (x @ w).argmax(dim=1)


def _trace(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("integration", "framework", "cached"),
    [
        ("lightning", "lightning", ["lightning.pytorch"]),
        ("huggingface", "transformers", ["transformers.trainer"]),
        ("tensorboard", "tensorboard", ["torch.utils.tensorboard"]),
        ("mlflow", "mlflow", []),
    ],
)
def test_an_integration_without_its_framework_names_it_and_the_extra(
    integration: str, framework: str, cached: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each integration imported where its framework is missing (None in ``sys.modules``: the
    import fails as if it were not installed) says which package and which extra."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, framework, None)
    for name in [*cached, f"selftune.integrations.{integration}"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ModuleNotFoundError) as err:
        importlib.import_module(f"selftune.integrations.{integration}")
    assert err.value.name == framework
    assert f"needs the package '{framework}'" in str(err.value)
    assert "pip install 'selftune[integrations]'" in str(err.value)


# --------------------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")


class _TinyModule(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, scheduler: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        self.lr, self.scheduler = lr, scheduler
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader() -> torch.utils.data.DataLoader:
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)


def _trainer(max_steps: int, callback: Any, root: Path, **kw: Any) -> Any:
    kw.setdefault("callbacks", [callback])
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )


def test_lightning_callback_tunes_feeds_the_loss_and_logs(tmp_path: Path) -> None:
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _TinyModule()
    cb = SelfTuneCallback(log_dir=tmp_path / "run")
    trainer = _trainer(60, cb, tmp_path, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer.step\\(\\)")  # scheduler mark kept
        trainer.fit(model, _loader())

    (opt,) = cb.optimizers
    assert trainer.strategy.optimizers[0] is opt
    # the scheduler watches the optimizer the wrapper wraps (LearningRateMonitor's name)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt.optimizer
    assert opt.step_count == 60
    assert opt.hyperparams()[0]["lr"] != pytest.approx(1e-3, rel=1e-3)
    result = selftune.verify(tmp_path / "run")  # raises LogError on any damage
    assert "lr" in result.knobs and not result.torn_tail
    # wrapped with the module: its rollbacks put the module's buffers back with the weights
    config = read_log(tmp_path / "run").manifest["config"]
    assert config["model_buffers"] == len(list(model.buffers()))
    assert any(
        r["kind"] == "decision" and r["knob"] == "lr" for r in read_log(tmp_path / "run").records
    )
    # The loss selftune saw each step is the loss the module computed.
    seen = [row["loss"] for row in _trace(tmp_path / "run")]
    assert seen == pytest.approx(model.losses, rel=1e-5)
    assert trainer.callback_metrics["selftune/group0/lr"] == pytest.approx(
        opt.hyperparams()[0]["lr"]
    )


def test_lightning_callback_refuses_bad_wrap_options_when_built(tmp_path: Path) -> None:
    """Before the fit starts, not inside Lightning's traceback when it does."""
    from selftune.integrations.lightning import SelfTuneCallback

    with pytest.raises(selftune.ConfigError, match=r"SelfTuneCallback\(average=True\), not"):
        SelfTuneCallback(wrap_kwargs={"average": True})
    with pytest.raises(selftune.ConfigError, match=r"SelfTuneCallback: .*'averge'"):
        SelfTuneCallback(averge=True)
    with pytest.raises(selftune.ConfigError, match="SelfTuneCallback: guard="):
        SelfTuneCallback(guard="yes")
    assert SelfTuneCallback(average=True, log_dir=tmp_path / "run").wrap_kwargs == {"average": True}
    assert not (tmp_path / "run").exists()  # the check made no run folder


class _WrappedModule(_TinyModule):
    """Wraps its own optimizer in ``configure_optimizers``."""

    def configure_optimizers(self) -> Any:
        return selftune.wrap(torch.optim.AdamW(self.parameters(), lr=self.lr), "off")


def test_lightning_settings_for_an_optimizer_already_wrapped_are_refused(tmp_path: Path) -> None:
    """``configure_optimizers`` may return a selftune optimizer, which the callback only
    feeds: a ``log_dir`` or other wrap setting given to the callback was ignored without a
    word, and the run wrote no log."""
    from selftune.integrations.lightning import SelfTuneCallback

    for kwargs in ({"log_dir": tmp_path / "run"}, {"controller": "auto"}, {"average": True}):
        trainer = _trainer(4, SelfTuneCallback(**kwargs), tmp_path, enable_checkpointing=False)
        with pytest.raises(selftune.ConfigError, match=f"{next(iter(kwargs))} given to"):
            trainer.fit(_WrappedModule(), _loader())
    assert not (tmp_path / "run").exists()
    cb = SelfTuneCallback()
    model = _WrappedModule()
    _trainer(4, cb, tmp_path, enable_checkpointing=False).fit(model, _loader())
    (opt,) = cb.optimizers
    assert opt.step_count == 4 and opt.controller.name == "off"
    assert opt.last_signals is not None and opt.last_signals.loss == model.losses[-1]


def test_integration_switches_that_are_not_bools_are_refused_by_name() -> None:
    """A ``"False"`` from a config file is truthy: read as True it did the opposite, silently."""
    from selftune.integrations.huggingface import SelfTuneTrainerCallback
    from selftune.integrations.lightning import SelfTuneCallback

    with pytest.raises(selftune.ConfigError, match="log_knobs='False': give True"):
        SelfTuneCallback(log_knobs="False")
    with pytest.raises(selftune.ConfigError, match=r"monitor=3\): give the name of a metric"):
        SelfTuneCallback(monitor=3)
    with pytest.raises(selftune.ConfigError, match="observe_eval='no': give True"):
        SelfTuneTrainerCallback(observe_eval="no")


def test_lightning_gradient_accumulation_feeds_the_mean_loss(tmp_path: Path) -> None:
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _TinyModule(scheduler=False)
    cb = SelfTuneCallback(log_dir=tmp_path / "run")
    trainer = _trainer(10, cb, tmp_path, enable_checkpointing=False, accumulate_grad_batches=4)
    trainer.fit(model, _loader())
    seen = [row["loss"] for row in _trace(tmp_path / "run")]
    assert len(seen) == 10
    means = [sum(model.losses[4 * i : 4 * i + 4]) / 4 for i in range(10)]
    assert seen == pytest.approx(means, rel=1e-5)


@pytest.mark.parametrize("by", ["argument", "scheduler"])
def test_lightning_an_epoch_s_short_last_window_feeds_its_own_mean(tmp_path: Path, by: str) -> None:
    """Lightning divides every micro-batch's loss by ``accumulate_grad_batches``, also in an
    epoch's last window when it holds fewer: the sum fed read a fraction of the loss there.
    A ``GradientAccumulationScheduler`` sets it at each epoch's start, after the fit's: the
    window was read once, at the fit's start, and the short one fed half its loss."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _TinyModule(scheduler=False)
    cb = SelfTuneCallback("off", log_dir=tmp_path / "run")
    if by == "argument":
        accumulate: dict[str, Any] = {"accumulate_grad_batches": 4}
    else:
        accumulate = {"callbacks": [cb, GradientAccumulationScheduler({0: 4})]}
    trainer = _trainer(
        6,
        cb,
        tmp_path,
        enable_checkpointing=False,
        limit_train_batches=10,
        **accumulate,
    )
    trainer.fit(model, _loader())
    seen = [row["loss"] for row in _trace(tmp_path / "run")]
    windows = [(0, 4), (4, 8), (8, 10), (10, 14), (14, 18), (18, 20)]  # two epochs of 4, 4, 2
    means = [sum(model.losses[a:b]) / (b - a) for a, b in windows]
    assert seen == pytest.approx(means, rel=1e-5)


class _HalvingModule(_TinyModule):
    """The tiny module under a rate halved after every step."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_lightning_logs_the_rate_of_the_step_not_the_next(tmp_path: Path) -> None:
    """The knobs are logged after the scheduler stepped: ``hyperparams()`` then gives the next
    step's rate, under this StepLR half the rate the step took."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    cb = SelfTuneCallback("off", log_dir=tmp_path / "run")
    trainer = _trainer(5, cb, tmp_path, enable_checkpointing=False)
    trainer.fit(_HalvingModule(lr=0.01), _loader())
    used = _trace(tmp_path / "run")[-1]["hp"][0]["lr"]
    assert used == pytest.approx(0.01 / 2**4)
    assert cb.optimizers[0].hyperparams()[0]["lr"] == pytest.approx(used / 2)
    assert float(trainer.callback_metrics["selftune/group0/lr"]) == pytest.approx(used)


class _WrappedScheduledModule(_TinyModule):
    """Wraps its own optimizer in ``configure_optimizers`` and builds its scheduler on it."""

    def configure_optimizers(self) -> Any:
        opt = selftune.wrap(torch.optim.AdamW(self.parameters(), lr=self.lr), "off")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("module", [_TinyModule, _WrappedScheduledModule])
def test_lightning_s_lr_monitor_names_the_optimizer_once_as_without_selftune(
    tmp_path: Path, module: type[Any]
) -> None:
    """Lightning's ``LearningRateMonitor`` names a scheduled rate after the class of the
    scheduler's optimizer, which the callback had pointed at the wrapper: it logged
    ``lr-FedSelfTuned`` (an internal class), and the optimizer a second time as ``lr-AdamW``
    (it unwraps ``trainer.optimizers``, and found the inner one unseen).  Now ``lr-AdamW``
    alone, the name the same module logs without selftune, and no scheduler warns."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, SelfTuneCallback()],
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(module(), _loader())
    assert not [w for w in said if "optimizer.step()" in str(w.message)], said  # torch's two
    assert sorted(monitor.lrs) == ["lr-AdamW"]
    assert monitor.lrs["lr-AdamW"] == pytest.approx([1e-3] * 3)


class _ValidatedModule(_TinyModule):
    """The tiny module with a validation loss, logged as ``val_loss`` after every epoch."""

    def __init__(self) -> None:
        super().__init__(scheduler=False)
        self.validations: list[float] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations.append(float(self.trainer.callback_metrics["val_loss"]))


def test_lightning_gives_the_monitored_metric_after_each_validation(tmp_path: Path) -> None:
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _ValidatedModule()
    cb = SelfTuneCallback(log_dir=tmp_path / "run", monitor="val_loss")
    trainer = _trainer(64, cb, tmp_path, enable_checkpointing=False)  # 4 epochs of 16 steps
    trainer.fit(model, _loader(), _loader())
    assert len(model.validations) == 4
    observed = [(row["step"], row["metric"]) for row in _trace(tmp_path / "run") if "metric" in row]
    # each validation reaches the optimizer's next step (the last one has none)
    assert observed == [
        (17 + 16 * i, pytest.approx(value, rel=1e-6))
        for i, value in enumerate(model.validations[:-1])
    ]
    torch.manual_seed(0)
    misnamed = SelfTuneCallback(monitor="val_acc")
    trainer = _trainer(32, misnamed, tmp_path, enable_checkpointing=False)
    with pytest.raises(selftune.ConfigError, match=r"monitor='val_acc'.*logged: .*val_loss"):
        trainer.fit(_ValidatedModule(), _loader(), _loader())
    # a fit in which no validation runs gave it nothing, without a word (Lightning's own
    # ModelCheckpoint and EarlyStopping refuse a monitor they never find)
    unvalidated = SelfTuneCallback(monitor="val_loss")
    trainer = _trainer(32, unvalidated, tmp_path, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"monitor='val_loss'\) observed nothing in this fit"):
        trainer.fit(_ValidatedModule(), _loader())


class _AveragedModule(_ValidatedModule):
    """Records, at each validation, whether its weights were the optimizer's weight average."""

    def __init__(self) -> None:
        super().__init__()
        self.at_average: list[bool] = []
        self.trained: list[torch.Tensor] = []
        self.restored: list[bool] = []  #: at each epoch's end, after its validation

    def on_validation_epoch_start(self) -> None:
        opt = self.trainer.strategy.optimizers[0]
        average = [a for group in opt.average.tensors for a in group]
        self.at_average.append(
            all(torch.equal(p, a) for p, a in zip(self.parameters(), average, strict=True))
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained = [p.detach().clone() for p in self.parameters()]

    def on_train_epoch_end(self) -> None:
        pairs = zip(self.parameters(), self.trained, strict=True)
        self.restored.append(all(torch.equal(p, t) for p, t in pairs))


def test_lightning_validates_at_the_weight_average_and_trains_on(tmp_path: Path) -> None:
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _AveragedModule()
    cb = SelfTuneCallback(monitor="val_loss", average=True)
    trainer = _trainer(48, cb, tmp_path, enable_checkpointing=False)  # 3 epochs of 16 steps
    trainer.fit(model, _loader(), _loader())
    assert model.at_average == [True] * 4  # the sanity check and three validations
    # each validation came after the epoch's last step: the training weights came back after it
    assert model.restored == [True] * 3
    # and the fit ends at the average, which differs from the training weights it last had
    average = [a for group in cb.optimizers[0].average.tensors for a in group]
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average, strict=True))
    assert not all(torch.equal(a, t) for a, t in zip(average, model.trained, strict=True))


def test_lightning_fit_again_starts_new_optimizers_at_the_average(tmp_path: Path) -> None:
    """A second ``fit`` of the module builds its optimizers anew (Lightning calls
    ``configure_optimizers`` again): no momentum or average of the training weights carries
    over, and the new ones start from the module as the first fit left it, at the average."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _AveragedModule()
    cb = SelfTuneCallback(average=True)
    _trainer(16, cb, tmp_path, enable_checkpointing=False).fit(model, _loader(), _loader())
    (first,) = cb.optimizers
    left = [p.detach().clone() for p in model.parameters()]
    started: list[list[torch.Tensor]] = []

    class Start(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            started.append([p.detach().clone() for p in module.parameters()])

    again = _trainer(16, cb, tmp_path, callbacks=[cb, Start()], enable_checkpointing=False)
    again.fit(model, _loader(), _loader())
    (second,) = cb.optimizers
    assert second.optimizer is not first.optimizer and second.step_count == 16
    assert _same(started[0], left)


def test_lightning_evaluates_a_best_checkpoint_at_the_average_that_chose_it(
    tmp_path: Path,
) -> None:
    """``ModelCheckpoint`` keeps the checkpoint whose validation (at the average) was best; an
    evaluation of it reads that average, not the training weights saved beside it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selftune.integrations.lightning import SelfTuneCallback, averaged_state_dict

    torch.manual_seed(0)
    model = _ValidatedModule()
    model.lr = 0.3  # high enough that the last validation is not the best
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    cb = SelfTuneCallback("off", monitor="val_loss", average=True)
    trainer = _trainer(64, cb, tmp_path, callbacks=[cb, best])  # 4 epochs of 16 steps
    trainer.fit(model, _loader(), _loader())
    assert float(best.best_model_score) == min(model.validations) != model.validations[-1]
    # Lightning loads the checkpoint's training weights into the module; the callback then
    # puts the checkpoint's average in their place
    (score,) = trainer.validate(model, _loader(), ckpt_path="best", verbose=False)
    assert score["val_loss"] == pytest.approx(float(best.best_model_score), rel=1e-6)

    saved = torch.load(best.best_model_path, weights_only=False)
    fresh = _ValidatedModule()
    fresh.load_state_dict(saved["state_dict"])  # the training weights: never validated
    (trained,) = _trainer(1, SelfTuneCallback(), tmp_path).validate(fresh, _loader(), verbose=False)
    assert trained["val_loss"] != pytest.approx(score["val_loss"], rel=1e-3)
    fresh.load_state_dict(averaged_state_dict(saved))
    (averaged,) = _trainer(1, SelfTuneCallback(), tmp_path).validate(
        fresh, _loader(), verbose=False
    )
    assert averaged["val_loss"] == pytest.approx(score["val_loss"], rel=1e-6)

    # a weights-only checkpoint has no optimizer state, so no average: asked for, it is refused
    weights = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(weights, weights_only=True)
    with pytest.raises(selftune.ConfigError, match="no selftune weight average"):
        averaged_state_dict(torch.load(weights, weights_only=False))


class _TiedModule(_ValidatedModule):
    """The validated module with two layers sharing one weight, as a language model's input
    embedding and output layer do: its state dict holds that weight under both names."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 4),
        )
        self.net[2].weight = self.net[0].weight


def test_lightning_averaged_state_dict_puts_the_average_under_every_tied_name(
    tmp_path: Path,
) -> None:
    """A tied weight's average went under its first name only: the second kept the training
    weight, which ``load_state_dict`` loads last, so a module loaded by hand held the training
    weights there, unlike the average its checkpoint was chosen by."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selftune.integrations.lightning import SelfTuneCallback, averaged_state_dict

    torch.manual_seed(0)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    cb = SelfTuneCallback("off", average=True)
    trainer = _trainer(32, cb, tmp_path, callbacks=[cb, every])  # 2 epochs of 16 steps
    trainer.fit(_TiedModule(), _loader(), _loader())
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=16.ckpt", weights_only=False)
    (average, *_), *_ = saved["optimizer_states"][0]["selftune"]["average"]["tensors"]
    assert not torch.equal(average, saved["state_dict"]["net.0.weight"])  # not the training one
    fresh = _TiedModule()
    fresh.load_state_dict(averaged_state_dict(saved))
    assert torch.equal(fresh.net[2].weight, average)


class _Manual(_TinyModule):
    """Two optimizers, stepped by hand (manual optimization)."""

    def __init__(self) -> None:
        super().__init__(scheduler=False)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        self.step_all(loss)

    def step_all(self, loss: torch.Tensor) -> None:
        """Step each optimizer, with no loss: a backward does not say whose it is."""
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.AdamW(self.net[0].parameters(), lr=1e-3),
            torch.optim.AdamW(self.net[2].parameters(), lr=1e-3),
        ]


def test_lightning_feeds_no_loss_to_several_optimizers_and_says_so(tmp_path: Path) -> None:
    """A backward does not say whose loss it is: the one feed for all gave one optimizer the
    sum of every loss and the other none."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    cb = SelfTuneCallback("off")
    with pytest.warns(UserWarning, match="with 2 optimizers a backward does not say"):
        _trainer(4, cb, tmp_path, enable_checkpointing=False).fit(_Manual(), _loader())
    assert [opt.last_signals.loss for opt in cb.optimizers] == [None, None]  # type: ignore[union-attr]
    # each network rolls back alone: no optimizer's rollback rewinds the module's buffers
    assert [opt._model for opt in cb.optimizers] == [None, None]  # type: ignore[union-attr]


class _ManualScheduled(_Manual):
    """:class:`_Manual` with a scheduler on each optimizer, stepped by hand after them."""

    def step_all(self, loss: torch.Tensor) -> None:
        for opt in self.optimizers():
            opt.step(loss=loss.detach())
        for scheduler in self.lr_schedulers():
            scheduler.step()

    def configure_optimizers(self) -> Any:
        opts = super().configure_optimizers()
        return opts, [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]


def test_lightning_s_schedulers_of_several_optimizers_see_the_step_they_watch(
    tmp_path: Path,
) -> None:
    """Each scheduler, handed the wrapper, warned that ``optimizer.step()`` had been overridden
    after it was built (the mark it puts on the step it watches was on the inner optimizer's
    alone), as the same module without selftune does not."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    cb = SelfTuneCallback("off")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _trainer(4, cb, tmp_path, enable_checkpointing=False).fit(_ManualScheduled(), _loader())
    assert not [w for w in said if "overridden" in str(w.message)]
    # Lightning's 4 steps count both optimizers': 2 batches; each StepLR halved the rate once
    assert [opt.step_count for opt in cb.optimizers] == [2, 2]  # type: ignore[union-attr]
    assert cb.optimizers[0].hyperparams()[0]["lr"] == pytest.approx(1e-3 / 2)  # type: ignore[union-attr]


def test_lightning_callback_s_trial_of_the_settings_warns_of_nothing() -> None:
    """The settings are tried on a throwaway SGD when the callback is built, and the wrap's
    warnings were that SGD's: a bound on beta1 "a knob no param group of this SGD has", an
    absolute bound "outside" the throwaway's rate; the user's optimizer is warned of at its
    own wrap."""
    from selftune.integrations.lightning import SelfTuneCallback

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SelfTuneCallback(bounds={"beta1": (0.8, 0.95)}, max_change={"beta1": 0.05})
        SelfTuneCallback(bounds={"lr": (1e-5, 5e-4)}, lr_bounds_absolute=True)


def test_lightning_refuses_listeners_several_optimizers_would_share(tmp_path: Path) -> None:
    """Each listener heard both optimizers' steps and wrote their knobs under one name (the
    rates of the two zigzagging in one curve); refused when the fit starts, before any step."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    module = _Manual()
    before = [p.detach().clone() for p in module.parameters()]
    cb = SelfTuneCallback("off", listeners=[lambda event: None])
    trainer = _trainer(4, cb, tmp_path, enable_checkpointing=False)
    with pytest.raises(selftune.ConfigError, match=r"with 2 optimizers: each listener would"):
        trainer.fit(module, _loader())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_lightning_closes_the_listeners_at_the_fit_s_end(tmp_path: Path) -> None:
    """An MLflowWriter uploads its last decisions, and ends a run it started, in ``close``,
    which nothing called: a short fit left its decisions out of the MLflow run, which stayed
    open."""
    from selftune.integrations.lightning import SelfTuneCallback

    class Closing:
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.closed_after: int | None = None

        def __call__(self, event: selftune.StepEvent) -> None:
            self.steps.append(event.step)

        def close(self) -> None:
            self.closed_after = len(self.steps)

    torch.manual_seed(0)
    listener = Closing()
    cb = SelfTuneCallback("off", listeners=[listener])
    _trainer(6, cb, tmp_path, enable_checkpointing=False).fit(_TinyModule(), _loader())
    assert listener.closed_after == 6 == len(listener.steps)


def test_lightning_closes_the_listeners_of_a_fit_that_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning calls no ``teardown`` hook when the fit raises (a ``GuardError``, a Ctrl-C),
    only ``on_exception``: an ``MLflowWriter`` given to the callback never uploaded its last
    decisions, those that led to the error, and a run it started stayed open for as long as
    the process lived (a sweep that catches each run's error)."""
    from mlflow import MlflowClient

    from selftune.integrations.lightning import SelfTuneCallback
    from selftune.integrations.mlflow import MLflowWriter

    class Fails(_TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 12:
                raise RuntimeError("the data broke")
            return super().training_step(batch, batch_idx)

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    torch.manual_seed(0)
    writer = MLflowWriter(flush_every=1000)
    trainer = _trainer(40, SelfTuneCallback(listeners=[writer]), tmp_path)
    with pytest.raises(RuntimeError, match="the data broke"):
        trainer.fit(Fails(), _loader())
    assert writer.run_id is not None and writer.count > 0
    assert client.get_run(writer.run_id).info.status == "FAILED"  # as MLflow's with block's
    (part,) = client.list_artifacts(writer.run_id, "selftune/decisions")
    local = client.download_artifacts(writer.run_id, part.path, str(tmp_path))
    assert len(Path(local).read_text().splitlines()) == writer.count


def test_lightning_copies_a_controller_instance_for_each_optimizer(tmp_path: Path) -> None:
    """One instance given to the callback tuned both optimizers from one state (each one's
    signals read into it) and was saved in both checkpoints."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    given = AutoController()
    cb = SelfTuneCallback(given)
    with pytest.warns(UserWarning, match="with 2 optimizers"):
        _trainer(4, cb, tmp_path, enable_checkpointing=False).fit(_Manual(), _loader())
    first, second = (opt.controller for opt in cb.optimizers)
    assert first is not second and given not in (first, second)


def test_lightning_s_skipped_batch_is_not_warned_of_as_a_missing_backward(tmp_path: Path) -> None:
    """A ``training_step`` that returns None is Lightning's documented skip of a batch: its
    closure skips the backward and returns None, and the step has no gradient.  The wrapper's
    warning of a step with no gradient told the user to call ``loss.backward()``, which they
    never call, and being said once, it was then spent for a real mistake."""
    from selftune.integrations.lightning import SelfTuneCallback

    class Skips(_TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _trainer(4, SelfTuneCallback("off"), tmp_path).fit(Skips(), _loader())
    assert not [w for w in said if "no parameter has a gradient" in str(w.message)]


def test_lightning_fast_dev_run_writes_no_run_folder(tmp_path: Path) -> None:
    """Lightning writes no logs under ``fast_dev_run``; a run folder written then made the real
    run with the same callback refuse its first step (the folder held steps of a run), and a
    ``TensorBoardWriter`` given to the callback, which follows one optimizer, refused the real
    fit's (after its run folder was made).  A fit after the real one, whose writer is taken,
    is refused before anything is wrapped."""
    pytest.importorskip("tensorboard")
    from selftune.integrations.lightning import SelfTuneCallback
    from selftune.integrations.tensorboard import TensorBoardWriter

    torch.manual_seed(0)
    cb = SelfTuneCallback(log_dir=tmp_path / "run", listeners=[TensorBoardWriter(tmp_path / "tb")])
    _trainer(4, cb, tmp_path, fast_dev_run=True).fit(_TinyModule(), _loader())
    assert cb.optimizers[0].step_count == 1 and not (tmp_path / "run").exists()
    assert not (tmp_path / "tb").exists()
    _trainer(4, cb, tmp_path, enable_checkpointing=False).fit(_TinyModule(), _loader())
    assert len(_trace(tmp_path / "run")) == 4 and (tmp_path / "tb").exists()
    trace = (tmp_path / "run" / "trace.jsonl").read_bytes()
    with pytest.raises(selftune.ConfigError, match="anew for each fit"):
        _trainer(4, cb, tmp_path / "again", enable_checkpointing=False).fit(
            _TinyModule(), _loader()
        )
    assert (tmp_path / "run" / "trace.jsonl").read_bytes() == trace


def test_lightning_fast_dev_run_of_an_optimizer_wrapped_with_a_folder_warns(
    tmp_path: Path,
) -> None:
    """An optimizer that ``configure_optimizers`` wrapped with a ``log_dir`` writes its folder
    whatever the callback does, also in a ``fast_dev_run``: the real fit of the same module
    after it was refused as another run's (its weights had moved by the trial's step), with
    advice about initial weights that said nothing of the trial.  The trial now warns."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    module = _LoggedWrappedModule(tmp_path / "run")
    trainer = _trainer(4, SelfTuneCallback(), tmp_path, fast_dev_run=True)
    with pytest.warns(UserWarning, match=r"fast_dev_run.*SelfTuneCallback\(log_dir=") as said:
        trainer.fit(module, _loader())
    assert str(tmp_path / "run") in str(said[0].message)
    with warnings.catch_warnings():  # the callback's own folder: the trial writes none
        warnings.filterwarnings("error", message=".*fast_dev_run")
        callback = SelfTuneCallback(log_dir=tmp_path / "own")
        plain = _LoggedWrappedModule(tmp_path / "own", wrap=False)
        _trainer(4, callback, tmp_path, fast_dev_run=True).fit(plain, _loader())
    assert not (tmp_path / "own").exists()


def test_lightning_amp_step_the_scaler_skips_leaves_no_loss_for_the_next(tmp_path: Path) -> None:
    """The scaler skips the first steps of 16-bit training as it backs off; a skipped step's
    loss stayed in the feed and was added to the next step's."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _TinyModule(scheduler=False)
    seen: list[float | None] = []

    class Listen(pl.Callback):
        def on_fit_start(self, trainer: Any, module: Any) -> None:
            trainer.strategy.optimizers[0].add_listener(lambda e: seen.append(e.loss))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # far too high: it backs off
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    callbacks = [SelfTuneCallback("off"), Listen()]
    trainer = _trainer(16, None, tmp_path, callbacks=callbacks, plugins=[precision])
    trainer.fit(model, _loader())
    assert 0 < len(seen) < len(model.losses)  # some steps were skipped
    # each applied step read its own batch's loss (in fp16), not the sum with skipped ones
    assert all(any(abs(s - m) < 0.02 * m for m in model.losses) for s in seen if s is not None)
    assert max(s for s in seen if s is not None) < 1.1 * max(model.losses)


def test_lightning_manual_amp_step_the_scaler_skips_leaves_no_loss_for_the_next(
    tmp_path: Path,
) -> None:
    """In manual optimization Lightning calls no ``on_before_zero_grad``: the loss of each
    step the scaler skipped stayed in the feed, and the first step it applied read the sum
    of its own and the skipped ones' (three batches' losses, a spike to the guard)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from selftune.integrations.lightning import SelfTuneCallback

    class ManualOne(_TinyModule):
        def __init__(self) -> None:
            super().__init__(scheduler=False)
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    torch.manual_seed(0)
    model = ManualOne()
    seen: list[float | None] = []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # far too high: it backs off
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cb = SelfTuneCallback("off", listeners=[lambda event: seen.append(event.loss)])
    _trainer(16, cb, tmp_path, enable_checkpointing=False, plugins=[precision]).fit(
        model, _loader()
    )
    assert 0 < len(seen) < len(model.losses)  # some steps were skipped
    assert all(s is not None and any(abs(s - m) < 0.02 * m for m in model.losses) for s in seen)


@pytest.mark.parametrize("controller", ["auto", "hypergradient"])
def test_lightning_checkpoint_resume_continues_bit_for_bit(tmp_path: Path, controller: str) -> None:
    """A run resumed from Lightning's checkpoint ends with the weights, trace and decision log
    of the run that never stopped.  The checkpoint is the one a ``ModelCheckpoint`` writes
    during training: one taken by ``trainer.save_checkpoint`` after ``fit`` returned, at an
    epoch's end, resumes with that epoch's loop unfinished, and Lightning then trains on the
    first batch twice (with a plain AdamW too), which once passed for selftune's inexactness."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selftune.integrations.lightning import SelfTuneCallback

    seen: list[int] = []  # a listener given to the callback, as a writer would be

    def run(steps: int, ckpt: Path | None, out: str) -> tuple[Any, SelfTuneCallback]:
        torch.manual_seed(0)
        model = _TinyModule()
        seen.clear()
        listen = [lambda event: seen.append(event.step)]
        cb = SelfTuneCallback(controller, log_dir=tmp_path / out, listeners=listen)
        keep = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{out}-{steps}", every_n_train_steps=32)
        trainer = _trainer(steps, None, tmp_path / out, callbacks=[cb, keep])
        trainer.fit(model, _loader(), ckpt_path=ckpt)
        return model, cb

    _, first = run(32, None, "a")  # two whole epochs
    (ckpt,) = (tmp_path / "ckpt-a-32").iterdir()
    saved = torch.load(ckpt, weights_only=False)
    assert "selftune" in saved["optimizer_states"][0]
    hp_mid = first.optimizers[0].hyperparams()

    # Resumed into the same run folder: the knobs continue, the log stays one valid chain.
    model, resumed = run(64, ckpt, "a")
    assert resumed.optimizers[0].step_count == 64
    assert seen == list(range(33, 65))
    # Uninterrupted reference run in another folder: the resumed run must end where it ends.
    reference, straight = run(64, None, "b")
    mine, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert resumed.optimizers[0].hyperparams() == straight.optimizers[0].hyperparams()
    if controller != "auto":  # auto holds the rate its range test found (by step 32 here)
        assert resumed.optimizers[0].hyperparams()[0]["lr"] != pytest.approx(hp_mid[0]["lr"])
    assert "lr" in selftune.verify(tmp_path / "a").knobs
    for name in ("trace.jsonl", "decisions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_lightning_rerun_over_its_folder_is_told_lightning_s_way_to_resume(tmp_path: Path) -> None:
    """A fit started again over the folder of one that ran (or crashed part-way) is refused at
    its first step, before any update, with Lightning's way to resume: the advice for plain
    loops, to call load_state_dict, left a Lightning user no loop to call it in."""
    from selftune.integrations.lightning import SelfTuneCallback

    def fit() -> None:
        torch.manual_seed(0)
        cb = SelfTuneCallback("hypergradient", log_dir=tmp_path / "run")
        _trainer(8, cb, tmp_path).fit(_TinyModule(), _loader())

    fit()
    rows = (tmp_path / "run" / "trace.jsonl").read_bytes()
    with pytest.raises(selftune.ConfigError, match=r"already holds steps.*ckpt_path=") as told:
        fit()
    assert "load_state_dict" not in str(told.value)
    assert (tmp_path / "run" / "trace.jsonl").read_bytes() == rows


def test_lightning_fit_again_over_the_callback_s_folder_is_told_a_folder_per_fit(
    tmp_path: Path,
) -> None:
    """A second ``fit`` of the module is a run of its own (its optimizers built anew, from the
    weights the first left), refused the first's folder.  The refusal said to build the model
    with the run's initial weights and wrap before loading any, which a Lightning user who
    called fit twice cannot act on; it says Lightning's ways now, and a folder naming the fit
    takes the second fit."""
    from selftune.integrations.lightning import SelfTuneCallback

    torch.manual_seed(0)
    model = _TinyModule()
    callback = SelfTuneCallback(log_dir=tmp_path / "run")
    _trainer(8, callback, tmp_path, enable_checkpointing=False).fit(model, _loader())
    rows = (tmp_path / "run" / "trace.jsonl").read_bytes()
    again = _trainer(8, callback, tmp_path, enable_checkpointing=False)
    with pytest.raises(selftune.LogError, match="another run") as told:
        again.fit(model, _loader())
    said = str(told.value)
    assert "a log_dir of its own" in said and "ckpt_path=" in said
    assert "before loading any weights" not in said
    assert (tmp_path / "run" / "trace.jsonl").read_bytes() == rows
    second = SelfTuneCallback(log_dir=tmp_path / "run" / "fit2")  # the advice
    _trainer(8, second, tmp_path, enable_checkpointing=False).fit(model, _loader())
    assert second.optimizers[0].step_count == 8
    assert len(_trace(tmp_path / "run" / "fit2")) == 8


class _LoggedWrappedModule(_TinyModule):
    """Wraps its own optimizer in ``configure_optimizers``, with a run folder, or returns it
    plain (``wrap=False``)."""

    def __init__(self, log_dir: Path, wrap: bool = True) -> None:
        super().__init__(scheduler=False)
        self.log_dir, self.wrap = log_dir, wrap

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        return selftune.wrap(opt, log_dir=self.log_dir) if self.wrap else opt


def test_lightning_resume_of_an_optimizer_wrapped_in_configure_optimizers_says_how(
    tmp_path: Path,
) -> None:
    """Lightning loads a checkpoint's weights before it calls ``configure_optimizers``, so a
    wrap there with a ``log_dir`` hashed the checkpoint's weights, not the run's initial ones,
    and the resume was refused as another run's, with advice (wrap before loading any weights)
    that no Lightning module can follow.  The refusal now says Lightning's way, and that way
    resumes the run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selftune.integrations.lightning import SelfTuneCallback

    def fit(steps: int, callback: SelfTuneCallback, wrap: bool, ckpt: Path | None) -> None:
        torch.manual_seed(0)
        keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=16)
        trainer = _trainer(steps, None, tmp_path, callbacks=[callback, keep])
        trainer.fit(_LoggedWrappedModule(tmp_path / "run", wrap), _loader(), ckpt_path=ckpt)

    fit(16, SelfTuneCallback(), True, None)  # an epoch
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    with pytest.raises(selftune.LogError, match="initial_params_sha256") as told:
        fit(24, SelfTuneCallback(), True, ckpt)
    (note,) = told.value.__notes__
    assert "before it calls configure_optimizers" in note
    assert "SelfTuneCallback(log_dir=" in note
    # the advice: the plain optimizer, wrapped by the callback over the same folder
    callback = SelfTuneCallback(log_dir=tmp_path / "run")
    fit(24, callback, False, ckpt)
    assert callback.optimizers[0].step_count == 24
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "trace.jsonl").open()]
    assert steps == list(range(1, 25))


def test_lightning_resume_from_mid_epoch_continues_the_log(tmp_path: Path) -> None:
    """A ``ModelCheckpoint`` taken mid-epoch resumes as Lightning resumes a plain optimizer (its
    loop does not continue the uninterrupted run then: AdamW's weights differ too); selftune's
    steps, trace and log go on from the checkpoint's step as one chain that verifies."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selftune.integrations.lightning import SelfTuneCallback

    def run(steps: int, ckpt: Path | None, out: str, tuned: bool = True) -> Any:
        torch.manual_seed(0)
        model = _TinyModule()
        cb = SelfTuneCallback("hypergradient", log_dir=tmp_path / out)
        keep = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{out}-{steps}", every_n_train_steps=24)
        callbacks = [cb, keep] if tuned else [keep]
        _trainer(steps, None, tmp_path / out, callbacks=callbacks).fit(
            model, _loader(), ckpt_path=ckpt
        )
        return cb if tuned else model

    for out, tuned in (("run", True), ("plain", False)):
        run(24, None, out, tuned)  # an epoch and a half
    (ckpt,) = (tmp_path / "ckpt-run-24").iterdir()
    resumed = run(40, ckpt, "run")
    assert resumed.optimizers[0].step_count == 40
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "trace.jsonl").open()]
    assert steps == list(range(1, 41))
    assert selftune.verify(tmp_path / "run").records > 0
    (ckpt,) = (tmp_path / "ckpt-plain-24").iterdir()
    plain, straight = run(40, ckpt, "plain", False), run(40, None, "straight", False)
    pairs = zip(plain.parameters(), straight.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_an_optimizer_wrapped_before_its_scheduler_is_fed_the_loss() -> None:
    """A scheduler built on the wrapper (``Trainer(optimizers=(selftune.wrap(opt), sched))``, or
    ``configure_optimizers`` returning both) replaced its ``step`` with one that called
    ``SelfTuned.step``: once fed, the loss never reached it."""
    from selftune.integrations._feed import LossFeed, feed_from

    model = torch.nn.Linear(16, 4)
    opt = selftune.wrap(torch.optim.AdamW(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    feed = LossFeed()
    fed = feed_from(opt, feed)
    x, y = _data(32)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        fed.zero_grad()
        loss.backward()
        feed.add(loss)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the scheduler still finds its mark on step
            fed.step()
            sched.step()
        assert fed.last_signals is not None and fed.last_signals.loss == loss.item()


def test_a_fed_step_with_a_closure_returns_the_closure_s_result() -> None:
    """The loss fed by the framework is the one read; ``step(closure)`` returns what the closure
    returned, as torch's optimizers do (it returned the fed loss in its place)."""
    from selftune.integrations._feed import feed_from

    model = torch.nn.Linear(16, 4)
    fed = feed_from(selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.01)))
    x, y = _data(32)
    returned: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        fed.zero_grad()
        returned.append(torch.nn.functional.cross_entropy(model(x), y))
        returned[-1].backward()
        fed.loss_feed.add(2 * returned[-1])
        return returned[-1]

    assert fed.step(closure) is returned[-1]
    assert fed.last_signals is not None and fed.last_signals.loss == 2 * returned[-1].item()


# --------------------------------------------------------------------------- Hugging Face


def _hf_trainer(
    out: Path,
    max_steps: int,
    evaluate: bool = False,
    held_out: Callable[[list[Any]], Any] | None = None,
    model_init: bool = False,
    optimizers: Callable[[Any], Any] | None = None,
    **args: Any,
) -> Any:
    """A tiny GPT-2 ``Trainer``; ``evaluate``: held out are the first 64 sequences, or what
    ``held_out`` makes of the data; ``model_init``: given a function that builds the model;
    ``optimizers``: what builds the Trainer's ``optimizers`` pair from the model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    # Sequences that repeat a short random pattern: learnable within a few dozen steps.
    base = torch.randint(0, 64, (256, 4), generator=gen)
    ids = base.repeat(1, 4)
    data = [{"input_ids": row, "labels": row} for row in ids]
    settings: dict[str, Any] = {
        "warmup_steps": 5,
        "lr_scheduler_type": "constant_with_warmup",  # a LambdaLR, like every Trainer schedule
        "logging_steps": 5,
        **args,
    }
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **settings,
    )
    evaluation = (held_out or (lambda d: d[:64]))(data) if evaluate else None
    built: dict[str, Any] = (
        {"model_init": lambda: transformers.GPT2LMHeadModel(config)}
        if model_init
        else {"model": model}
    )
    if optimizers is not None:
        built["optimizers"] = optimizers(model)
    return transformers.Trainer(args=targs, train_dataset=data, eval_dataset=evaluation, **built)


def test_huggingface_trainer_tunes_with_the_training_loss(tmp_path: Path) -> None:
    from selftune.integrations.huggingface import find_selftuned, wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 30, save_strategy="no")
    losses: list[float] = []
    opt = wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    opt.add_listener(lambda event: losses.append(event.loss))
    trainer.train()
    assert opt.step_count == 30
    # The LambdaLR is built on accelerate's wrapper around selftune's.
    assert find_selftuned(trainer.lr_scheduler.optimizer) is opt
    assert all(loss is not None for loss in losses)
    # The Trainer's logged loss every 5 steps is the mean of the losses selftune saw.
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged[0] == pytest.approx(sum(losses[:5]) / 5, rel=1e-3)
    # The schedule is back at 1e-3 after its warm-up; selftune's scale sits on top of it.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    knobs = opt.hyperparams()[0]
    assert knobs["lr"] != pytest.approx(1e-3, rel=1e-3)
    assert "lr" in selftune.verify(tmp_path / "run").knobs
    config = read_log(tmp_path / "run").manifest["config"]  # the model's buffers roll back too
    assert config["model_buffers"] == len(list(trainer.model.buffers()))
    records = [r for r in trainer.state.log_history if "selftune/group0/lr" in r]
    assert records and records[-1]["selftune/group0/lr"] == pytest.approx(knobs["lr"])


def test_huggingface_trainer_given_model_init_is_refused_before_anything_is_built(
    tmp_path: Path,
) -> None:
    """``train()`` rebuilds the model and drops the optimizer when ``model_init`` is set: the
    wrap was accepted, and ``train()`` failed with "found a AcceleratedOptimizer ... call
    wrap_trainer_optimizer before train()", leaving a run folder for a model never trained."""
    from selftune.integrations.huggingface import SelfTuneTrainerCallback, wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 4, save_strategy="no", model_init=True)
    with pytest.raises(selftune.ConfigError, match=r"model_init: trainer.train\(\) builds a new"):
        wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert trainer.optimizer is None
    callbacks = trainer.callback_handler.callbacks
    assert not any(isinstance(cb, SelfTuneTrainerCallback) for cb in callbacks)
    trainer.train()  # the Trainer is left as it was: it trains on its own optimizer
    assert trainer.state.global_step == 4


def test_huggingface_optimizer_replaced_by_create_optimizer_is_named_as_the_cause(
    tmp_path: Path,
) -> None:
    """A ``create_optimizer`` override that builds an optimizer even when one is set replaces
    the wrapper at ``train()``: the refusal said to call ``wrap_trainer_optimizer``, which had
    been called, and named accelerate's wrapper rather than the optimizer found."""
    transformers = pytest.importorskip("transformers")
    from selftune.integrations.huggingface import SelfTuneTrainerCallback, wrap_trainer_optimizer

    class Rebuilding(transformers.Trainer):  # type: ignore[misc]
        def create_optimizer(self, model: Any = None) -> Any:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.args.learning_rate)
            return self.optimizer

    made = _hf_trainer(tmp_path / "out", 4, save_strategy="no")
    kept = {"model": made.model, "args": made.args, "train_dataset": made.train_dataset}
    trainer = Rebuilding(**kept)
    wrap_trainer_optimizer(trainer, "off")
    with pytest.raises(selftune.ConfigError, match="trains with a SGD, not the selftune") as told:
        trainer.train()
    assert "create_optimizer override" in str(told.value)
    # given the callback alone, the optimizer found is named, not accelerate's wrapper
    alone = transformers.Trainer(**kept, callbacks=[SelfTuneTrainerCallback()])
    with pytest.raises(selftune.ConfigError, match="found a AdamW, not a selftune optimizer"):
        alone.train()


def test_huggingface_trainer_that_trained_before_is_wrapped_at_its_own_optimizer(
    tmp_path: Path,
) -> None:
    """A ``Trainer`` that trained once holds its optimizer inside accelerate's wrapper: the
    wrap took that one, its checkpoints named ``AcceleratedOptimizer``, and a resume, which
    wraps the Trainer's own ``AdamW``, was refused them; wrapped again after its selftune
    training, it was told to call ``wrap_trainer_optimizer`` before ``train()``."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 4, save_strategy="steps", save_steps=2)
    trainer.train()  # without selftune
    opt = wrap_trainer_optimizer(trainer, "off", log_dir=tmp_path / "run")
    assert type(opt.optimizer) is torch.optim.AdamW
    trainer.train()  # with it, saving over the first train()'s checkpoints
    assert opt.step_count == 4
    with pytest.raises(selftune.ConfigError, match="log_dir given to wrap_trainer_optimizer"):
        wrap_trainer_optimizer(trainer, log_dir=tmp_path / "other")
    assert wrap_trainer_optimizer(trainer) is opt  # fed again, for another train()
    resumed = _hf_trainer(tmp_path / "out", 4, save_strategy="no")
    again = wrap_trainer_optimizer(resumed, "off")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert again.step_count == 4


def test_huggingface_logs_the_rate_of_the_step_beside_the_trainer_s(tmp_path: Path) -> None:
    """The Trainer logs after its scheduler stepped: ``hyperparams()`` then gives the next
    step's rate, logged beside the Trainer's own ``learning_rate`` of the step."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(
        tmp_path / "out", 8, save_strategy="no", logging_steps=1, lr_scheduler_type="linear"
    )
    wrap_trainer_optimizer(trainer, "off")
    trainer.train()
    records = [r for r in trainer.state.log_history if "selftune/group0/lr" in r]
    assert len(records) == 8
    assert [r["selftune/group0/lr"] for r in records] == pytest.approx(
        [r["learning_rate"] for r in records]
    )


def test_huggingface_settings_for_an_optimizer_already_wrapped_are_refused(tmp_path: Path) -> None:
    """A ``Trainer`` whose optimizer is already a selftune one is only fed: a ``log_dir`` or a
    controller given then was ignored without a word, and the run wrote no log."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 5, save_strategy="no")
    opt = wrap_trainer_optimizer(trainer, "off")
    for kwargs in ({"log_dir": tmp_path / "run"}, {"controller": "auto"}, {"average": True}):
        with pytest.raises(selftune.ConfigError, match=f"{next(iter(kwargs))} given to"):
            wrap_trainer_optimizer(trainer, **kwargs)
    assert not (tmp_path / "run").exists()
    assert wrap_trainer_optimizer(trainer) is opt  # fed again, with the settings it has
    trainer.train()
    assert opt.step_count == 5 and opt.controller.name == "off"


def _hf_evaluating_trainer(tmp_path: Path) -> Any:
    """30 steps, evaluated every 10, nothing saved."""
    return _hf_trainer(
        tmp_path / "out",
        30,
        evaluate=True,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=10,
    )


def test_huggingface_trainer_gives_each_evaluations_loss(tmp_path: Path) -> None:
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_evaluating_trainer(tmp_path)
    opt = wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    trainer.train()
    evaluated = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    assert len(evaluated) == 3
    observed = [(row["step"], row["metric"]) for row in _trace(tmp_path / "run") if "metric" in row]
    assert observed == [(11, pytest.approx(evaluated[0])), (21, pytest.approx(evaluated[1]))]
    assert opt.step_count == 30


def test_huggingface_evaluations_named_otherwise_are_neither_observed_nor_polluted(
    tmp_path: Path,
) -> None:
    """Several evaluation sets (keys ``eval_<name>_loss``) train on, reading the one named by
    ``metric_for_best_model``; an ``evaluate()`` after training, with its own prefix, is not
    observed (it raised that it gave no 'eval_loss') and returns only its own metrics (it
    returned selftune's knobs among them, which ``hyperparameter_search`` then summed)."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(
        tmp_path / "out",
        20,
        evaluate=True,
        held_out=lambda d: {"a": d[:32], "b": d[32:64]},
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=10,
        metric_for_best_model="eval_a_loss",
    )
    data = trainer.train_dataset
    opt = wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match="gave no 'eval_a_loss'"):  # dataset b's, said once
        trainer.train()
    observed = [row["metric"] for row in _trace(tmp_path / "run") if "metric" in row]
    evaluated = [r["eval_a_loss"] for r in trainer.state.log_history if "eval_a_loss" in r]
    assert observed == [pytest.approx(evaluated[0])]  # step 11 read step 10's; 20 was the last
    # step 20's evaluation, observed and not yet shared by a step
    pending = opt.state_dict()["selftune"]["metric"]["observed"]
    assert pending["value"] == pytest.approx(evaluated[-1])
    metrics = trainer.evaluate(data[:32], metric_key_prefix="test")
    assert not [k for k in metrics if k.startswith("selftune/")]
    # the evaluation after training was not observed
    assert opt.state_dict()["selftune"]["metric"]["observed"] == pending
    assert [r for r in trainer.state.log_history if "loss" in r and "selftune/group0/lr" in r]


def test_huggingface_callback_given_observe_eval_false_keeps_it_through_the_wrap(
    tmp_path: Path,
) -> None:
    """A ``Trainer`` given ``SelfTuneTrainerCallback(observe_eval=False)``, then wrapped for
    its loss: the wrap's default turned the callback's choice back to True, and each
    evaluation's loss went to the optimizer."""
    transformers = pytest.importorskip("transformers")
    from selftune.integrations.huggingface import SelfTuneTrainerCallback, wrap_trainer_optimizer

    made = _hf_evaluating_trainer(tmp_path)
    trainer = transformers.Trainer(
        model=made.model,
        args=made.args,
        train_dataset=made.train_dataset,
        eval_dataset=made.eval_dataset,
        callbacks=[SelfTuneTrainerCallback(observe_eval=False)],
    )
    wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    trainer.train()
    assert [r for r in trainer.state.log_history if "eval_loss" in r]
    assert not [row for row in _trace(tmp_path / "run") if "metric" in row]
    with pytest.raises(selftune.ConfigError, match="observe_eval='yes': give True"):
        wrap_trainer_optimizer(trainer, observe_eval="yes")


def test_huggingface_callback_given_to_the_trainer_gives_its_knobs_to_the_reporters(
    tmp_path: Path,
) -> None:
    """A ``SelfTuneTrainerCallback`` given to the ``Trainer`` comes after the reporters of
    ``report_to``: the knobs it added reached ``log_history`` but not TensorBoard."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.huggingface import SelfTuneTrainerCallback, wrap_trainer_optimizer

    made = _hf_trainer(tmp_path / "out", 10, save_strategy="no")
    made.args.report_to = ["tensorboard"]  # its SummaryWriter writes under output_dir/runs
    trainer = transformers.Trainer(
        model=made.model,
        args=made.args,
        train_dataset=made.train_dataset,
        callbacks=[SelfTuneTrainerCallback()],
    )
    wrap_trainer_optimizer(trainer, "off")
    trainer.train()
    (events,) = (tmp_path / "out").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    acc.Reload()
    drawn = [(s.step, s.value) for s in acc.Scalars("train/selftune/group0/lr")]
    logged = [r for r in trainer.state.log_history if "selftune/group0/lr" in r]
    assert drawn == [(r["step"], pytest.approx(r["selftune/group0/lr"])) for r in logged]
    assert [step for step, _ in drawn] == [5, 10]


def test_huggingface_trainer_evaluates_at_the_weight_average(tmp_path: Path) -> None:
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_evaluating_trainer(tmp_path)
    opt = wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run", average=True)
    at_average: list[bool] = []

    class Probe(pytest.importorskip("transformers").TrainerCallback):
        def on_prediction_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            pairs = zip(opt.param_groups, opt.average.tensors, strict=True)
            at_average.append(
                all(
                    torch.equal(p, a)
                    for g, avg in pairs
                    for p, a in zip(g["params"], avg, strict=True)
                )
            )

    trainer.add_callback(Probe())
    trainer.train()
    assert at_average and all(at_average)  # every batch of the three evaluations in training
    with torch.no_grad():  # the run ended at the average: move the weights off it
        for p in trainer.model.parameters():
            p.mul_(1.01)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    averaged = trainer.evaluate()["eval_loss"]
    plain = trainer.evaluate.__wrapped__()["eval_loss"]  # the Trainer's own, at the weights
    with opt.averaged():
        by_hand = trainer.evaluate.__wrapped__()["eval_loss"]
    assert averaged == pytest.approx(by_hand, rel=1e-6) and averaged != pytest.approx(plain)
    assert all(torch.equal(p, w) for p, w in zip(trainer.model.parameters(), weights, strict=True))
    evaluated = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r][:3]
    observed = [row["metric"] for row in _trace(tmp_path / "run") if "metric" in row]
    assert observed == [pytest.approx(v) for v in evaluated[:2]]


def _hf_checkpointing_trainer(tmp_path: Path, steps: int, load_best: bool, **args: Any) -> Any:
    """Evaluated and checkpointed every 5 steps."""
    return _hf_trainer(
        tmp_path / "out",
        steps,
        evaluate=True,
        eval_strategy="steps",
        eval_steps=5,
        save_strategy="steps",
        save_steps=5,
        load_best_model_at_end=load_best,
        **args,
    )


@pytest.mark.parametrize("load_best", [True, False])
def test_huggingface_trainer_ends_at_the_average_it_evaluated(
    tmp_path: Path, load_best: bool
) -> None:
    """The model a run leaves is the one its evaluations measured: the average, and with
    ``load_best_model_at_end`` the average of the best checkpoint, not its training weights."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    # The loss counted as "greater is better" makes the first checkpoint the best: not the last
    trainer = _hf_checkpointing_trainer(
        tmp_path, 20, load_best, metric_for_best_model="loss", greater_is_better=True
    )
    opt = wrap_trainer_optimizer(trainer, "off", average=True)
    trainer.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    if load_best:
        assert trainer.state.best_model_checkpoint.endswith("checkpoint-5")
        from transformers.trainer import OPTIMIZER_NAME

        saved = torch.load(
            Path(trainer.state.best_model_checkpoint) / OPTIMIZER_NAME, weights_only=True
        )
        wanted = [t for g in saved["selftune"]["average"]["tensors"] for t in g]
        # the metric the Trainer chose it by is what the model now scores
        assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric)
    else:
        wanted = [a for g in opt.average.tensors for a in g]
    assert all(torch.equal(p, w) for p, w in zip(params, wanted, strict=True))
    scores = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    assert scores[0] != pytest.approx(scores[3])  # the first and the last differ


def _hf_weights(opt: Any) -> list[torch.Tensor]:
    """A copy of the weights ``opt`` trains."""
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def _hf_saved(model: Any, opt: Any, checkpoint: Path) -> list[torch.Tensor]:
    """The weights the ``Trainer``'s ``checkpoint`` holds of those ``opt`` trains, in its order."""
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    return [saved[names[id(p)]] for g in opt.param_groups for p in g["params"]]


def _hf_weights_probe(trainer: Any, opt: Any) -> Any:
    """A callback added to ``trainer`` that records the weights ``opt`` trains at each
    ``train()``'s start (``at_start``, after selftune's callback, which comes first) and after
    the last optimizer step (``stepped``)."""
    transformers = pytest.importorskip("transformers")

    class Probe(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.at_start: list[list[torch.Tensor]] = []
            self.stepped: list[torch.Tensor] = []

        def on_train_begin(self, *args: Any, **kw: Any) -> None:
            self.at_start.append(_hf_weights(opt))

        def on_step_end(self, *args: Any, **kw: Any) -> None:
            self.stepped = _hf_weights(opt)

    probe = Probe()
    trainer.add_callback(probe)
    return probe


@pytest.mark.parametrize("load_best", [False, True])
def test_huggingface_train_again_goes_on_from_the_training_weights(
    tmp_path: Path, load_best: bool
) -> None:
    """``train()``, evaluate, ``train()`` again with ``average=True``: the first ``train()``
    left the model at the average, and the second trained on from there, while the optimizer's
    momentum and average were those of the training weights.  Each ``train()`` now goes on from
    the training weights the ``Trainer`` ended with (the best checkpoint's with
    ``load_best_model_at_end``) and leaves the model at the average it evaluated."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    # The loss counted as "greater is better" makes the first checkpoint the best: not the last
    trainer = _hf_checkpointing_trainer(
        tmp_path, 10, load_best, metric_for_best_model="loss", greater_is_better=True
    )
    opt = wrap_trainer_optimizer(trainer, "off", average=True)
    probe = _hf_weights_probe(trainer, opt)

    def train() -> list[torch.Tensor]:
        """``train()``, which leaves the model at the average that ``evaluate()`` measures."""
        trainer.train()
        left = _hf_weights(opt)
        assert _same(left, [a for g in opt.average.tensors for a in g])
        score = trainer.evaluate()["eval_loss"]
        with opt.averaged():
            assert score == pytest.approx(trainer.evaluate.__wrapped__()["eval_loss"], rel=1e-6)
        return left

    left = train()
    # the training weights the Trainer ended with, read before the next train() saves over them
    best = tmp_path / "out" / "checkpoint-5"
    trained = _hf_saved(trainer.model, opt, best) if load_best else probe.stepped
    assert not _same(trained, left)
    train()
    assert opt.step_count == 20
    assert _same(probe.at_start[1], trained)  # the second train() went on from the first's


def test_huggingface_train_again_after_a_move_goes_on_from_the_training_weights(
    tmp_path: Path,
) -> None:
    """A model converted between two ``train()`` calls (here from bfloat16, whose average is
    kept in float32, to float32) still holds the average the first left in it, converted.  The
    check compared it with the float32 average itself, not with the bfloat16 one written into
    the model, found it not held, and the second ``train()`` trained on from the average
    instead of the training weights.  (SGD: torch's AdamW keeps its moments at the dtype they
    were made at, and refuses a step of weights converted since, selftune or not.)"""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 10, save_strategy="no", optim="sgd")
    trainer.model.to(torch.bfloat16)
    opt = wrap_trainer_optimizer(trainer, "off", average=True)
    probe = _hf_weights_probe(trainer, opt)
    trainer.train()
    trained = probe.stepped
    assert not _same(trained, _hf_weights(opt))  # the model holds the average, not these
    trainer.model.to(torch.float32)
    trainer.train()
    assert opt.step_count == 20
    assert _same(probe.at_start[1], [t.to(torch.float32) for t in trained])
    assert all(p.dtype == torch.float32 for p in _hf_weights(opt))


def test_huggingface_train_again_from_a_checkpoint_keeps_its_weights(tmp_path: Path) -> None:
    """A second ``train()`` that resumes a checkpoint trains on from the checkpoint's weights,
    not from those the first ``train()`` ended with.  The checkpoint saved at the last step
    holds the training weights, with the average in its optimizer state, and the run resumed
    from it ends where one that never stopped does."""
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    trainer = _hf_trainer(tmp_path / "out", 10, save_strategy="steps", save_steps=5)
    opt = wrap_trainer_optimizer(trainer, "off", average=True)
    probe = _hf_weights_probe(trainer, opt)
    trainer.train()
    last = tmp_path / "out" / "checkpoint-10"
    assert _same(_hf_saved(trainer.model, opt, last), probe.stepped)
    saved = torch.load(last / "optimizer.pt", weights_only=True)["selftune"]["average"]
    assert _same([a for g in saved["tensors"] for a in g], _hf_weights(opt))  # the average
    five = _hf_saved(trainer.model, opt, tmp_path / "out" / "checkpoint-5")
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert _same(probe.at_start[1], five)
    trainer.args.max_steps = 20
    trainer.train(resume_from_checkpoint=str(last))
    straight = _hf_trainer(tmp_path / "straight", 20, save_strategy="no")
    wrap_trainer_optimizer(straight, "off", average=True)
    straight.train()
    mine, theirs = trainer.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_huggingface_best_checkpoint_without_an_optimizer_state_warns(tmp_path: Path) -> None:
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    # the checkpoints hold no optimizer state, so no average
    trainer = _hf_checkpointing_trainer(tmp_path, 10, True, save_only_model=True)
    wrap_trainer_optimizer(trainer, "off", average=True)
    with pytest.warns(UserWarning, match="holds no selftune weight average"):
        trainer.train()


def test_huggingface_checkpoint_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    """Resumed from the ``Trainer``'s checkpoint into its run folder, a run ends with the
    weights, trace and decisions of one that never stopped.  accelerate loads the optimizer's
    own state into it before the ``Trainer`` loads the checkpoint's, which once cut the trace
    back to step 0 and lost every row before the checkpoint."""
    from dist_worker import log_body

    from selftune.integrations.huggingface import wrap_trainer_optimizer

    first = _hf_trainer(tmp_path / "out", 20, save_strategy="steps", save_steps=10)
    opt = wrap_trainer_optimizer(first, log_dir=tmp_path / "run")
    hp_at: dict[int, list[dict[str, float]]] = {}
    opt.add_listener(lambda event: hp_at.__setitem__(event.step, event.hyperparams))
    first.train()
    saved = torch.load(tmp_path / "out" / "checkpoint-10" / "optimizer.pt", weights_only=True)
    assert saved["selftune"]["step"] == 10

    second = _hf_trainer(tmp_path / "out", 20, save_strategy="no")
    resumed = wrap_trainer_optimizer(second, log_dir=tmp_path / "run")
    seen: dict[int, list[dict[str, float]]] = {}
    resumed.add_listener(lambda event: seen.__setitem__(event.step, event.hyperparams))
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    assert min(seen) == 11 and resumed.step_count == 20
    assert all(seen[step] == hp_at[step] for step in range(11, 21))
    assert "lr" in selftune.verify(tmp_path / "run").knobs

    straight = _hf_trainer(tmp_path / "straight", 20, save_strategy="no")
    wrap_trainer_optimizer(straight, log_dir=tmp_path / "ref")
    straight.train()
    mine, theirs = second.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    trace = (tmp_path / "run" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()
    assert log_body(tmp_path / "run") == log_body(tmp_path / "ref")


@pytest.mark.parametrize("how", ["wrap_trainer_optimizer", "given"])
def test_huggingface_rerun_over_its_folder_is_told_the_trainer_s_way_to_resume(
    tmp_path: Path, how: str
) -> None:
    """A train() started again over the folder of one that ran is refused at its first step
    with the ``Trainer``'s way to resume, not the plain loop's call of load_state_dict: with
    the optimizer wrapped by ``wrap_trainer_optimizer``, or wrapped by the user and given to
    the ``Trainer`` with ``SelfTuneTrainerCallback``."""
    import transformers

    from selftune.integrations.huggingface import SelfTuneTrainerCallback, wrap_trainer_optimizer

    def trainer() -> Any:
        made = _hf_trainer(tmp_path / "out", 6, save_strategy="no")
        if how == "wrap_trainer_optimizer":
            wrap_trainer_optimizer(made, log_dir=tmp_path / "run")
            return made
        params = made.model.parameters()
        opt = selftune.wrap(torch.optim.AdamW(params, lr=1e-3), log_dir=tmp_path / "run")
        return transformers.Trainer(
            model=made.model,
            args=made.args,
            train_dataset=made.train_dataset,
            optimizers=(opt, None),
            callbacks=[SelfTuneTrainerCallback()],
        )

    trainer().train()
    rows = (tmp_path / "run" / "trace.jsonl").read_bytes()
    with pytest.raises(selftune.ConfigError, match="resume_from_checkpoint=") as told:
        trainer().train()
    assert "load_state_dict" not in str(told.value)
    assert (tmp_path / "run" / "trace.jsonl").read_bytes() == rows


def test_huggingface_new_trainer_over_the_folder_is_told_a_folder_per_trainer(
    tmp_path: Path,
) -> None:
    """A new ``Trainer`` of a model that trained is a run of its own, from the weights the last
    one left, refused that one's folder.  The refusal said to build the model with the run's
    initial weights and wrap before loading any; it says the ``Trainer``'s ways now (another
    ``train()`` of the same Trainer goes on with its run), and a folder of its own takes it."""
    import transformers

    from selftune.integrations.huggingface import wrap_trainer_optimizer

    first = _hf_trainer(tmp_path / "out", 6, save_strategy="no")
    wrap_trainer_optimizer(first, log_dir=tmp_path / "run")
    first.train()

    def trainer() -> Any:
        return transformers.Trainer(
            model=first.model, args=first.args, train_dataset=first.train_dataset
        )

    with pytest.raises(selftune.LogError, match="another run") as told:
        wrap_trainer_optimizer(trainer(), log_dir=tmp_path / "run")
    said = str(told.value)
    assert "a log_dir of its own" in said and "resume_from_checkpoint=" in said
    assert "before loading any weights" not in said
    second = trainer()
    wrap_trainer_optimizer(second, log_dir=tmp_path / "run2")  # the advice
    second.train()
    assert len(_trace(tmp_path / "run2")) == 6


@pytest.mark.parametrize("framework", ["lightning", "huggingface"])
def test_a_rank_other_than_0_refused_another_run_s_folder_hears_the_framework_s_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    """Under ``torch.distributed`` rank 0 alone opens the run folder, and the other ranks
    hear of its refusal in the gather of ``refuse_on_every_rank``: a ``ConfigError`` that
    carried the plain loop's advice (wrap before loading any weights) inside the fit's or
    ``Trainer``'s, which follows a ``LogError`` of another run alone.  Rank 1 is set up as the
    code reads it: its own check passes, and the gather brings what rank 0 handed it (recorded
    from rank 0's side of the same call, refused as a wrap on another run's folder refuses)."""
    from selftune import shards
    from selftune.integrations import another_run_told

    if framework == "lightning":
        from selftune.integrations.lightning import FIT as how
    else:
        from selftune.integrations.huggingface import NEW_TRAINER as how
    w = torch.nn.Parameter(torch.zeros(3))
    selftune.wrap(torch.optim.SGD([w], lr=0.1), log_dir=tmp_path / "run").close()
    with torch.no_grad():
        w += 1.0  # other initial weights: another run
    with pytest.raises(selftune.LogError, match="before loading any weights") as refused:
        selftune.wrap(torch.optim.SGD([w], lr=0.1), log_dir=tmp_path / "run")

    def on_rank_0() -> None:
        raise refused.value

    handed: list[Any] = []
    monkeypatch.setattr(shards, "gathered", lambda value: handed.append(value) or [value])
    with pytest.raises(selftune.LogError):
        shards.refuse_on_every_rank(on_rank_0, "open its run folder")
    monkeypatch.setattr(shards, "gathered", lambda value: [handed[0], value])  # on rank 1
    with pytest.raises(selftune.LogError) as told, another_run_told(how):
        shards.refuse_on_every_rank(lambda: None, "open its run folder")
    said = str(told.value)
    assert said.startswith("rank 0 could not open its run folder: ") and "another run" in said
    assert said.endswith(f": {how}") and "before loading any weights" not in said


def test_huggingface_resume_with_the_same_trainer_after_an_interrupt(tmp_path: Path) -> None:
    """An interrupt after a step's loss was fed and before its optimizer step, then a resume
    with the same ``Trainer``: the fed loss stayed, and the first resumed step's loss held
    the abandoned step's too (its trace row, the rates after it, the weights went elsewhere)."""
    transformers = pytest.importorskip("transformers")
    from selftune.integrations.huggingface import wrap_trainer_optimizer

    class Interrupt(transformers.TrainerCallback):  # type: ignore[misc]
        armed = True

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.armed and state.global_step == 11:
                self.armed = False
                raise KeyboardInterrupt

    trainer = _hf_trainer(tmp_path / "out", 20, save_strategy="steps", save_steps=10)
    trainer.add_callback(Interrupt())
    wrap_trainer_optimizer(trainer, log_dir=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-10"))
    straight = _hf_trainer(tmp_path / "straight", 20, save_strategy="no")
    wrap_trainer_optimizer(straight, log_dir=tmp_path / "ref")
    straight.train()
    trace = (tmp_path / "run" / "trace.jsonl").read_bytes()
    assert trace == (tmp_path / "ref" / "trace.jsonl").read_bytes()
    mine, theirs = trainer.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


# --------------------------------------------------------------------------- TensorBoard, MLflow


def _plain_loop(opt: selftune.SelfTuned, model: torch.nn.Module, steps: int) -> None:
    """Train on the fixed data; every 10 steps, evaluate the loss on all of it and observe it."""
    x, y = _data()
    for t in range(steps):
        i = (t * 32) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        if (t + 1) % 10 == 0:
            with torch.no_grad():
                opt.observe(torch.nn.functional.cross_entropy(model(x), y))


class _Heads(torch.nn.Module):
    """A sum of linear heads, each weight and bias a param group of its own: a rate per tensor,
    as layer-wise rates have one per layer."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 4) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h(x) for h in self.heads]).sum(0)


def _tuned(
    steps: int, *listeners: Any, heads: int = 0
) -> tuple[selftune.SelfTuned, list[selftune.StepEvent]]:
    """A short run of ``auto`` on AdamW, with ``heads`` heads (a group per tensor) if any."""
    torch.manual_seed(0)
    if heads:
        model: torch.nn.Module = _Heads(heads)
        groups: Any = [{"params": [p]} for p in model.parameters()]
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        groups = model.parameters()
    opt = selftune.wrap(torch.optim.AdamW(groups, lr=1e-3))
    events: list[selftune.StepEvent] = []
    opt.add_listener(events.append)
    for fn in listeners:
        opt.add_listener(fn)
    _plain_loop(opt, model, steps)
    return opt, events


@pytest.mark.parametrize("value", [0, "10", 2.5])
def test_a_writers_count_out_of_range_is_refused_by_name(tmp_path: Path, value: Any) -> None:
    """Before, a ``"10"`` read off a config file failed as a comparison of a str with an int."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from selftune.integrations.mlflow import MLflowWriter
    from selftune.integrations.tensorboard import TensorBoardWriter

    with pytest.raises(selftune.ConfigError, match=r"every=.*\(steps between the knobs written\)"):
        TensorBoardWriter(tmp_path / "tb", every=value)
    with pytest.raises(selftune.ConfigError, match=r"flush_every=.*\(new decisions between"):
        MLflowWriter(run="unused", flush_every=value)
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("run", ["runs/mlflow", Path("runs") / "mlflow", "~/mlruns"])
def test_an_mlflow_writer_given_a_folder_is_refused_naming_the_tracking_uri(run: Any) -> None:
    """A folder, as ``TensorBoardWriter`` takes, was read as a run id: the first step failed
    inside MLflow ("Run 'runs' not found"), after that step was recorded."""
    pytest.importorskip("mlflow")
    from selftune.integrations.mlflow import MLflowWriter

    with pytest.raises(selftune.ConfigError, match=r"not a folder.*set_tracking_uri"):
        MLflowWriter(run=run)


def test_tensorboard_writer_writes_knobs_loss_and_decisions(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.tensorboard import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path / "tb")
    _, events = _tuned(40, writer)
    writer.close()
    decisions = [d for e in events for d in e.decisions]
    assert decisions, "the run must make decisions for this test to mean anything"

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    lr = acc.Scalars("selftune/group0/lr")
    assert [s.step for s in lr] == list(range(1, 41))
    assert [s.value for s in lr] == pytest.approx([e.hyperparams[0]["lr"] for e in events])
    assert [s.value for s in acc.Scalars("selftune/loss")] == pytest.approx(
        [e.loss for e in events]
    )
    assert "selftune/group0/beta1" in acc.Tags()["scalars"]
    # the metric given to observe, at the step whose controller read it (every 10th, from 11)
    metrics = [(e.step, e.signals.metric) for e in events if e.signals and e.signals.metric]
    assert [m[0] for m in metrics] == [11, 21, 31]
    read = acc.Scalars("selftune/metric")
    assert [(s.step, s.value) for s in read] == [(t, pytest.approx(m)) for t, m in metrics]
    texts = acc.Tensors("selftune/decisions/text_summary")
    assert sorted({t.step for t in texts}) == sorted({d.step for d in decisions})
    written = " ".join(t.tensor_proto.string_val[0].decode() for t in texts)
    for d in decisions:
        assert d.reason in written


class _RestartsAt:
    """A controller that proposes nothing and asks the wrapper to restart at ``step``."""

    name = "restarts-at"

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def propose(self, signals: Any, knobs: Any) -> list[Any]:
        self.seen = signals.step
        return []

    def take_restart(self) -> str | None:
        return "asked by the test" if self.seen == self.step else None

    def on_backoff(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


def test_listeners_hear_every_guard_record_of_a_step_in_the_log_s_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gradient-norm spike rolls step 28 back; at 29 the restored weights show it too, and
    the guard relevels, while the controller asks for a restart: two guard records at one step.
    The listeners heard the restart alone (``event.guard``), so the TensorBoard and MLflow
    writers held one guard event fewer than the log.  They hear both now, in the log's order,
    and ``event.guard`` is still the step's last."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.mlflow import MLflowWriter
    from selftune.integrations.tensorboard import TensorBoardWriter

    _mlflow_uri(tmp_path, monkeypatch)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = selftune.wrap(
        torch.optim.SGD(net.parameters(), lr=1e-3),
        _RestartsAt(29),
        log_dir=tmp_path / "run",
        guard=selftune.GuardConfig(confirm=False),  # the spike rolled back at once, not held
    )
    events: list[selftune.StepEvent] = []
    tensorboard, mlflow = TensorBoardWriter(tmp_path / "tb"), MLflowWriter()
    for listener in (events.append, tensorboard, mlflow):
        opt.add_listener(listener)
    for t in range(1, 32):
        for p in net.parameters():  # a steady gradient, but for the spike at steps 28 and 29
            p.grad = torch.full_like(p, 1e6 if t in (28, 29) else 1.0)
        opt.step(loss=torch.tensor(1.0 if t < 4 else 5.0))
    opt.close()
    tensorboard.close()
    mlflow.close()

    records = [r for r in read_log(tmp_path / "run").records if r["kind"] in ("guard", "decision")]
    guards = [r for r in records if r["kind"] == "guard"]
    assert [(r["step"], r["event"]) for r in guards] == [
        (28, "rollback"),
        (29, "relevel"),
        (29, "restart"),
    ]
    assert mlflow.count == len(records)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {
        t.step: t.tensor_proto.string_val[0].decode()
        for t in acc.Tensors("selftune/guard/text_summary")
    }
    assert "guard relevel" in texts[29] and "guard restart" in texts[29]
    heard = [(e.step, g["event"]) for e in events for g in e.guard_events]
    assert heard == [(r["step"], r["event"]) for r in guards]
    (at_29,) = [e for e in events if e.step == 29]
    assert at_29.guard is at_29.guard_events[-1]  # as before: the restart


@pytest.mark.parametrize("optimizers", [1, 2])
def test_tensorboard_writer_draws_each_step_once_through_a_rewind_and_a_resume(
    tmp_path: Path, optimizers: int
) -> None:
    """A state loaded back to step 10 in the same process, then a checkpoint of step 20
    resumed by a new optimizer and writer over the same folders: TensorBoard drew steps 11-20
    twice and went back in step, where the run folder's log and trace cut what was redone.
    The owned writer now purges from where the steps are redone, and each step reads as the
    trace holds it.  Two optimizers' writers over one folder, each with its prefix, each
    purged at the resume's first step, and the second's purge hid the first's points since:
    the first's resumed steps were not drawn."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.tensorboard import TensorBoardWriter
    from selftune.report import iter_trace

    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1) for _ in range(optimizers)]
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    initial = deepcopy([model.state_dict() for model in models])

    def build() -> list[tuple[selftune.SelfTuned, TensorBoardWriter]]:
        built = []
        for k, model in enumerate(models):
            model.load_state_dict(initial[k])  # as a new process builds it, before the checkpoint
            sgd = torch.optim.SGD(model.parameters(), lr=0.01)
            opt = selftune.wrap(sgd, "hypergradient", log_dir=tmp_path / f"run{k}")
            writer = TensorBoardWriter(tmp_path / "tb", prefix=f"selftune/opt{k}")
            opt.add_listener(writer)
            built.append((opt, writer))
        return built

    def steps(built: list[tuple[selftune.SelfTuned, TensorBoardWriter]], n: int) -> None:
        for _ in range(n):
            for model, (opt, _) in zip(models, built, strict=True):
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step(loss=loss.detach())

    def save(built: list[tuple[selftune.SelfTuned, TensorBoardWriter]]) -> Any:
        pairs = zip(models, built, strict=True)
        return deepcopy([(model.state_dict(), opt.state_dict()) for model, (opt, _) in pairs])

    def load(built: list[tuple[selftune.SelfTuned, TensorBoardWriter]], kept: Any) -> None:
        for model, (opt, _), (weights, state) in zip(models, built, kept, strict=True):
            model.load_state_dict(weights)
            opt.load_state_dict(state)

    def close(built: list[tuple[selftune.SelfTuned, TensorBoardWriter]]) -> None:
        for opt, writer in built:
            writer.close()
            opt.close()

    built = build()
    steps(built, 10)
    kept = save(built)
    steps(built, 10)
    load(built, kept)
    steps(built, 10)
    kept = save(built)
    steps(built, 5)
    close(built)
    built = build()  # a new process, from the checkpoint of step 20
    load(built, kept)
    steps(built, 10)
    close(built)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for k in range(optimizers):
        trace = list(iter_trace(tmp_path / f"run{k}"))
        assert [r["step"] for r in trace] == list(range(1, 31))
        drawn = [(s.step, s.value) for s in acc.Scalars(f"selftune/opt{k}/group0/lr")]
        assert drawn == [(r["step"], pytest.approx(r["hp"][0]["lr"])) for r in trace]
        assert len({r["hp"][0]["lr"] for r in trace}) > 10  # the rate moved: the values tell


def test_a_tensorboard_writer_follows_one_optimizer_and_refuses_a_second(tmp_path: Path) -> None:
    """A writer added to a second optimizer, beside the first or after it closed, read that
    one's step 1 as a rewind of the first: the first's points were purged, and the two drew
    their knobs under the same names (after ``close`` the rewind failed on the closed file).
    The second is refused when added, before its first step; the first's points stay, its own
    rewind after ``close`` still purges, and a writer of its own with its own prefix draws the
    second's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.tensorboard import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path / "tb")
    first, events = _tuned(5, writer)
    writer.close()
    for second in (_tuned(0)[0], first):  # another run, and the same optimizer added twice
        with pytest.raises(selftune.ConfigError, match=r"already added to an optimizer.*opt\{k\}"):
            second.add_listener(writer)
    # the first's state of step 2 loaded back after close: its step 3 is redone
    writer(selftune.StepEvent(3, None, [{**events[2].hyperparams[0], "lr": 0.5}], [], None, None))
    writer.close()
    # TensorBoard reads a folder's event files in the order of their names, which begin with
    # the second each was made in and end with a counter of the process's files ("...10" before
    # "...9"): made in the same second, the own writer's file was read first now and then, and
    # the first's rewind, a purge of its step 3 onward, took its step 3 too
    time.sleep(1 - time.time() % 1)
    own = TensorBoardWriter(tmp_path / "tb", prefix="selftune/opt1")
    _tuned(3, own)
    own.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    drawn = [(s.step, s.value) for s in acc.Scalars("selftune/group0/lr")]
    kept = [(t, pytest.approx(e.hyperparams[0]["lr"])) for t, e in enumerate(events[:2], 1)]
    assert drawn == [*kept, (3, 0.5)]
    assert [s.step for s in acc.Scalars("selftune/opt1/group0/lr")] == [1, 2, 3]


def test_an_mlflow_writer_follows_one_optimizer_and_refuses_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``MLflowWriter`` added to a second optimizer wrote both optimizers' knobs and
    decisions under the same names, one run's artifact rows interleaving the two; refused
    when added, naming the run, as a ``TensorBoardWriter`` is."""
    pytest.importorskip("mlflow")
    from selftune.integrations.mlflow import MLflowWriter

    _mlflow_uri(tmp_path, monkeypatch)
    writer = MLflowWriter()
    _tuned(2, writer)
    with pytest.raises(selftune.ConfigError, match=r"MLflowWriter \(of run '\w+', prefix"):
        _tuned(0)[0].add_listener(writer)
    writer.close()


def test_mlflow_writer_logs_metrics_and_a_decisions_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations import mlflow as mlflow_writer
    from selftune.integrations.mlflow import MLflowWriter

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database otherwise
    mlflow.set_tracking_uri(uri)
    monkeypatch.setattr(mlflow_writer, "PART_ROWS", 7)  # parts of 7 rows, flushed every 5
    writer = MLflowWriter(flush_every=5)  # no active run: the writer starts one and ends it
    _, events = _tuned(30, writer)
    # a guard event of a NaN loss: a bare NaN in the tag and the artifact is not JSON
    nan_loss = {"event": "skip", "signal": "loss", "value": math.nan, "reason": "not finite"}
    writer(selftune.StepEvent(31, None, events[-1].hyperparams, [], nan_loss, None))
    writer.close()
    assert mlflow.active_run() is None

    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(writer.run_id, "selftune/group0/lr")
    assert [m.step for m in history] == list(range(1, 32))
    lrs = [e.hyperparams[0]["lr"] for e in events]
    assert [m.value for m in history] == pytest.approx([*lrs, lrs[-1]])
    losses = client.get_metric_history(writer.run_id, "selftune/loss")
    assert [m.value for m in losses] == pytest.approx([e.loss for e in events])
    metrics = [(e.step, e.signals.metric) for e in events if e.signals and e.signals.metric]
    read = client.get_metric_history(writer.run_id, "selftune/metric")
    assert [(m.step, m.value) for m in read] == [(t, pytest.approx(v)) for t, v in metrics]
    assert [m[0] for m in metrics] == [11, 21]

    decisions = [d for e in events for d in e.decisions]
    assert len(decisions) > 3 * 7, "the artifact must take several parts to test them"
    rows = _artifact_rows(client, writer.run_id, tmp_path)
    assert [(r["step"], r["knob"], r["reason"]) for r in rows[:-1]] == [
        (d.step, d.knob, d.reason) for d in decisions
    ]
    assert rows[-1]["value"] == "nan"
    run = client.get_run(writer.run_id)
    assert decisions[-1].reason in run.data.tags["selftune.last_decision"]
    assert _strict(run.data.tags["selftune.last_guard_event"])["value"] == "nan"


def _strict(text: str) -> Any:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def _artifact_rows(client: Any, run_id: str, tmp_path: Path, prefix: str = "selftune") -> list[Any]:
    """The rows of the decisions artifact's parts, concatenated in name order."""
    local = Path(client.download_artifacts(run_id, f"{prefix}/decisions", str(tmp_path)))
    parts = sorted(local.glob("*.jsonl"))
    return [_strict(line) for part in parts for line in part.read_text().splitlines()]


def _mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("mlflow")
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return uri


def test_a_tensorboard_folder_that_cannot_be_made_is_refused_when_built(tmp_path: Path) -> None:
    """The writer makes its folder at the first step, after that step's update and record: a
    mistyped path failed there, and the script run again was refused its run folder, which
    held that step.  Nothing is made when it is built."""
    pytest.importorskip("tensorboard")
    from selftune.integrations.tensorboard import TensorBoardWriter

    (tmp_path / "afile").write_text("")
    with pytest.raises(selftune.ConfigError, match=r"afile is a file, so no folder can be made"):
        TensorBoardWriter(tmp_path / "afile" / "tb")
    TensorBoardWriter(tmp_path / "new" / "tb")
    assert not (tmp_path / "new").exists()


def test_a_tensorboard_folder_under_the_home_folder_is_written_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"~/tb"`` was checked under the home folder and written to a folder named ``~`` in the
    working directory, where ``selftune.wrap(log_dir="~/run")`` writes under the home folder."""
    pytest.importorskip("tensorboard")
    from selftune.integrations.tensorboard import TensorBoardWriter

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    writer = TensorBoardWriter("~/tb")
    _tuned(3, writer)
    writer.close()
    assert [p.name for p in (tmp_path / "work").iterdir()] == []
    assert list((tmp_path / "home" / "tb").glob("events.out.tfevents.*"))


def test_mlflow_writer_ends_its_own_run_and_leaves_the_user_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close`` ended whichever run was active: with a run of the user's nested inside the
    one the writer started, it ended the user's and left its own running.  (MLflow's stack of
    active runs then held the writer's, ended, under the user's, active again once theirs
    ended; the writer's run is never on it now.)"""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    writer = MLflowWriter()
    _tuned(3, writer)  # no run was active: the writer started one at the first step
    with mlflow.start_run(run_name="eval", nested=True) as evaluation:
        writer.close()
        active = mlflow.active_run()
        assert active is not None and active.info.run_id == evaluation.info.run_id
    client = MlflowClient(tracking_uri=uri)
    assert writer.run_id is not None and writer.run_id != evaluation.info.run_id
    assert client.get_run(writer.run_id).info.status == "FINISHED"
    assert client.get_run(evaluation.info.run_id).info.status == "FINISHED"  # by its with
    assert mlflow.active_run() is None


def test_mlflow_writer_built_in_a_parent_run_logs_into_the_nested_run_it_trains_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer built while a parent run was active took that run at once, and logged the
    knobs into the parent while the training, and the metrics it logged itself, ran in a nested
    run started since (a sweep's trial, the Hugging Face Trainer's ``MLFLOW_NESTED_RUN``).  It
    logs into the run active at its first step now, and ends neither: the user started both.
    A run given, or the one active when built where none is active at the first step, is
    still the one logged to."""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    client = MlflowClient(tracking_uri=uri)
    with mlflow.start_run(run_name="sweep") as parent:
        writer, given = MLflowWriter(), MLflowWriter(run=parent.info.run_id)
        with mlflow.start_run(run_name="trial", nested=True) as trial:
            _tuned(3, writer, given)
            mlflow.log_metric("val_loss", 1.0)
            writer.close()
            given.close()
            active = mlflow.active_run()
            assert active is not None and active.info.run_id == trial.info.run_id
        assert client.get_metric_history(trial.info.run_id, "selftune/group0/lr")
        assert not client.get_metric_history(parent.info.run_id, "val_loss")
        assert writer.run_id == trial.info.run_id and given.run_id == parent.info.run_id
        kept = MLflowWriter()
    _tuned(2, kept)  # no run active at its first step: the one it was built in
    kept.close()
    assert kept.run_id == parent.info.run_id and mlflow.active_run() is None
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_mlflow_writer_keeps_its_own_run_off_mlflow_s_stack_of_active_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer given no run, with none active, started one at its first step with
    ``mlflow.start_run`` and left it active until ``close``: the user's ``mlflow.start_run()``
    beside it failed ("Run ... is already active"), and their ``mlflow.log_metric`` with no
    run of theirs landed in the writer's run.  The writer creates its run through its client
    now, in the experiment and with the tags ``start_run`` gives, and never makes it active:
    each run the user starts mid-training is theirs alone, and the stack theirs at every step."""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tuning")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)  # as start_run reads it
    theirs: list[str] = []
    active: list[str | None] = []  # the active run at each step, after the writer's turn

    def user(event: selftune.StepEvent) -> None:
        if event.step == 2:
            theirs.append(mlflow.start_run(run_name="eval").info.run_id)
        if event.step == 4:
            mlflow.log_metric("val_loss", 1.0, step=4)
            mlflow.end_run()
        if event.step == 5:
            mlflow.log_metric("after", 1.0)  # no run active: MLflow starts one of the user's
            theirs.append(mlflow.active_run().info.run_id)  # type: ignore[union-attr]
            mlflow.end_run()
        run = mlflow.active_run()
        active.append(run.info.run_id if run is not None else None)

    writer = MLflowWriter()
    _tuned(6, writer, user)
    writer.close()
    assert active == [None, theirs[0], theirs[0], None, None, None]
    assert mlflow.active_run() is None and writer.run_id not in theirs
    own = client.get_run(writer.run_id)
    assert own.info.experiment_id == experiment and own.info.status == "FINISHED"
    assert own.data.tags["mlflow.runName"] and own.data.tags["mlflow.source.type"] == "LOCAL"
    assert not {"val_loss", "after"} & own.data.metrics.keys()
    steps = [m.step for m in client.get_metric_history(writer.run_id, "selftune/group0/lr")]
    assert steps == [1, 2, 3, 4, 5, 6]
    for run_id, name in zip(theirs, ("val_loss", "after"), strict=True):
        run = client.get_run(run_id)
        assert set(run.data.metrics) == {name} and "mlflow.parentRunId" not in run.data.tags


def test_mlflow_writer_without_mlflow_s_private_reader_takes_the_environment_s_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment ``start_run`` would choose has only a private reader in MLflow; one
    without it gets the experiment ``MLFLOW_EXPERIMENT_NAME`` names, not an ImportError."""
    from mlflow import MlflowClient
    from mlflow.tracking import fluent

    from selftune.integrations.mlflow import MLflowWriter

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    experiment = client.create_experiment("named")
    monkeypatch.delattr(fluent, "_get_experiment_id")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "named")
    writer = MLflowWriter()
    _tuned(2, writer)
    writer.close()
    assert client.get_run(writer.run_id).info.experiment_id == experiment


def test_mlflow_writers_of_one_process_share_the_run_the_first_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GAN's two optimizers, each with a writer and its prefix, no run given and none active:
    each writer started a run of its own, and one training was split across two runs, while
    with a run active both logged into it.  The second shares the run the first started now,
    never active, ended by the last of them to close; writers made once both closed (a
    notebook's next training) start a run of their own."""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    gen, disc = MLflowWriter(prefix="gen"), MLflowWriter(prefix="disc")
    _tuned(8, gen)
    _tuned(6, disc)
    assert gen.run_id is not None and gen.run_id == disc.run_id and mlflow.active_run() is None
    gen.close()
    assert client.get_run(gen.run_id).info.status == "RUNNING"  # disc logs into it still
    disc.close()
    assert client.get_run(gen.run_id).info.status == "FINISHED"
    for writer, steps in ((gen, 8), (disc, 6)):
        history = client.get_metric_history(gen.run_id, f"{writer.prefix}/group0/lr")
        assert [m.step for m in history] == list(range(1, steps + 1))
        rows = _artifact_rows(client, gen.run_id, tmp_path, writer.prefix)
        assert 0 < len(rows) == writer.count
    later = MLflowWriter(prefix="gen")
    _tuned(2, later)
    later.close()
    assert later.run_id not in {gen.run_id, None}
    assert len(client.search_runs(["0"])) == 2


def test_mlflow_writers_of_one_prefix_keep_to_runs_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two open writers with one prefix would write one name twice in a shared run (each
    optimizer's step 1 again): the second starts a run of its own, as every writer did, and
    the next writer of another prefix shares that one.  A run shared ends FAILED if any of its
    writers closed while an error was handled, whichever closed last."""
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    first, second, third = MLflowWriter(), MLflowWriter(), MLflowWriter(prefix="disc")
    _tuned(2, first)
    _tuned(2, second)
    _tuned(2, third)
    assert first.run_id != second.run_id == third.run_id
    try:
        raise RuntimeError("the discriminator broke")
    except RuntimeError:
        third.close()
    second.close()
    first.close()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(second.run_id).info.status == "FAILED"


def test_mlflow_writer_whose_first_step_failed_keeps_the_run_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first step that failed after the writer made its run (the store unreachable as it
    read the run's parts back) is tried again at the next: into that run, not a second."""
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    given = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    listing, failing = given.list_artifacts, [OSError("store unreachable")]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failing:
            raise failing.pop()
        return listing(*args, **kwargs)

    monkeypatch.setattr(given, "list_artifacts", flaky)
    writer = MLflowWriter(client=given)
    event = selftune.StepEvent(1, 0.5, [{"lr": 0.1}], [], None, None)
    with pytest.raises(OSError, match="store unreachable"):
        writer(event)
    writer(event)
    writer.close()
    assert [r.info.run_id for r in given.search_runs(["0"])] == [writer.run_id]
    assert [m.value for m in given.get_metric_history(writer.run_id, "selftune/loss")] == [0.5]


@pytest.mark.parametrize(("last_line", "status"), [("", "FINISHED"), ("1 / 0\n", "FAILED")])
def test_mlflow_writer_never_closed_ends_its_run_at_exit_with_its_decisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last_line: str, status: str
) -> None:
    """MLflow ends the runs ``mlflow.start_run`` left active when the interpreter exits; the
    writer's run, never active now, is ended then by the writer's ``close``, which uploads the
    decisions too (fewer than ``flush_every``: none were uploaded before), FAILED where an
    error ended the script (it showed FINISHED).  Two writers sharing the run (two prefixes)
    each upload theirs, and the last ends it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    monkeypatch.setenv("PYTHONPATH", str(Path(selftune.__file__).parents[1]))  # this selftune
    script = (
        "import torch, selftune\n"
        "from selftune.integrations.mlflow import MLflowWriter\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(4, 1)\n"
        "opt = selftune.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3))\n"
        "writer, other = MLflowWriter(), MLflowWriter(prefix='other')\n"
        "opt.add_listener(writer)\n"
        "opt.add_listener(other)\n"
        "for _ in range(6):\n"
        "    loss = model(torch.randn(8, 4)).pow(2).mean()\n"
        "    opt.zero_grad()\n"
        "    loss.backward()\n"
        "    opt.step(loss=loss.detach())\n"
        "print(writer.run_id, other.run_id, writer.count, flush=True)\n" + last_line
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == (1 if last_line else 0), done.stderr
    assert done.stderr.count("Traceback") == (1 if last_line else 0), done.stderr
    run_id, other, count = done.stdout.split()
    assert client.get_run(run_id).info.status == status and other == run_id
    for prefix in ("selftune", "other"):
        assert 0 < len(_artifact_rows(client, run_id, tmp_path, prefix)) == int(count) < 50


def test_mlflow_writer_logs_into_the_run_mlflow_run_id_names_and_leaves_it_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mlflow run`` names its run in ``MLFLOW_RUN_ID``, which ``mlflow.start_run()`` takes:
    the writer logs into it, leaves it running and the variable set, for the user's own
    ``start_run()`` and for ``mlflow run``, which ends it."""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import MLflowWriter

    client = MlflowClient(tracking_uri=_mlflow_uri(tmp_path, monkeypatch))
    named = client.create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", named)
    writer = MLflowWriter()
    _tuned(3, writer)
    writer.close()
    assert writer.run_id == named and client.get_metric_history(named, "selftune/loss")
    assert client.get_run(named).info.status == "RUNNING" and mlflow.active_run() is None
    with mlflow.start_run() as mine:
        assert mine.info.run_id == named


def test_the_writers_write_the_knobs_every_every_steps_and_each_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``every=10``: the knobs and the loss at steps 10, 20, 30, 40 only, though ``auto``
    decides at most steps (a condition on decisions wrote them at every step); each decision's
    text, and MLflow's count of them, at the step it was made."""
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selftune.integrations.mlflow import MLflowWriter
    from selftune.integrations.tensorboard import TensorBoardWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    board, tracker = TensorBoardWriter(tmp_path / "tb", every=10), MLflowWriter(every=10)
    _, events = _tuned(40, board, tracker)
    board.close()
    tracker.close()
    decided = sorted({d.step for e in events for d in e.decisions})
    assert len(decided) > 20, "auto decides at most steps: the case where every was ignored"

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    client = MlflowClient(tracking_uri=uri)
    for name in ("selftune/group0/lr", "selftune/group0/beta1", "selftune/loss"):
        assert [s.step for s in acc.Scalars(name)] == [10, 20, 30, 40]
        assert [m.step for m in client.get_metric_history(tracker.run_id, name)] == [10, 20, 30, 40]
    lrs = [s.value for s in acc.Scalars("selftune/group0/lr")]
    assert lrs == pytest.approx([events[t - 1].hyperparams[0]["lr"] for t in (10, 20, 30, 40)])
    texts = acc.Tensors("selftune/decisions/text_summary")
    assert sorted({t.step for t in texts}) == decided
    counts = client.get_metric_history(tracker.run_id, "selftune/decisions")
    assert [m.step for m in counts] == decided
    assert counts[-1].value == len(_artifact_rows(client, tracker.run_id, tmp_path))


def test_mlflow_writer_logs_a_rate_per_layer_in_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 param groups of AdamW: 1200 knobs a step (past MLflow's 1000 entities per
    ``log_batch``, which its client splits), and 400 decisions a step, whose artifact takes
    parts of :data:`PART_ROWS` rows, each written in full once it is full, uploaded at most
    twice a step."""
    from mlflow import MlflowClient

    from selftune.integrations.mlflow import PART_ROWS, MLflowWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    given = MlflowClient(tracking_uri=uri)
    writer = MLflowWriter(client=given)
    uploads: list[str] = []
    upload = given.log_text
    monkeypatch.setattr(
        given, "log_text", lambda *a, **kw: (uploads.append(a[2]), upload(*a, **kw))
    )
    _, events = _tuned(6, writer, heads=200)
    writer.close()
    decided = {e.step for e in events if e.decisions}
    # a step's rows go up together, past flush_every: once, and once more where a part ends
    # (one upload per 50 rows before, eight a step here), and the last part again at close
    assert len(uploads) <= 2 * len(decided) + 1
    assert len(events[-1].hyperparams) == 400
    client = MlflowClient(tracking_uri=uri)
    for name in ("selftune/group0/lr", "selftune/group399/beta2", "selftune/loss"):
        assert [m.step for m in client.get_metric_history(writer.run_id, name)] == [
            1,
            2,
            3,
            4,
            5,
            6,
        ]
    last = client.get_metric_history(writer.run_id, "selftune/group399/lr")[-1].value
    assert last == pytest.approx(events[-1].hyperparams[399]["lr"])
    decisions = [d for e in events for d in e.decisions]
    assert len(decisions) > PART_ROWS
    rows = _artifact_rows(client, writer.run_id, tmp_path)
    assert [(r["step"], r["group"], r["knob"]) for r in rows] == [
        (d.step, d.group, d.knob) for d in decisions
    ]
    parts = client.list_artifacts(writer.run_id, "selftune/decisions")
    assert [Path(f.path).name for f in parts] == ["00000.jsonl", "00001.jsonl"][: len(parts)]
    assert len(parts) == -(-len(decisions) // PART_ROWS)


def test_mlflow_writer_resumed_into_its_run_continues_the_parts_and_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run checkpointed at step 6 goes on to step 9 and stops; resumed from that checkpoint
    into the same MLflow run, it runs to 12.  The resumed writer began at part 0 with a count
    of 0: its first flush overwrote the rows uploaded before it, and the count restarted at 1.
    Now it continues: the rows uploaded stay, steps 7 to 9 twice (the run folder cut the first
    pass's), and the resumed rows follow, in parts of ``PART_ROWS`` named in order: the first
    pass's last part, not full, is filled before the next begins."""
    import mlflow
    from mlflow import MlflowClient

    from selftune.integrations import mlflow as mlflow_writer
    from selftune.integrations.mlflow import MLflowWriter

    uri = _mlflow_uri(tmp_path, monkeypatch)
    monkeypatch.setattr(mlflow_writer, "PART_ROWS", 3)  # the first pass's 8 rows: 3, 3, 2
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    folder, checkpoint = tmp_path / "run", tmp_path / "ckpt.pt"

    def train(first: int, last: int) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2)
        opt = selftune.wrap(
            torch.optim.SGD(model.parameters(), lr=0.1), "hypergradient", log_dir=folder
        )
        if first > 1:
            selftune.load_checkpoint(checkpoint, model=model, optimizer=opt)
        writer = MLflowWriter(run=run_id)
        opt.add_listener(writer)
        for step in range(first, last + 1):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
            if step == 6:
                selftune.save_checkpoint(checkpoint, model=model, optimizer=opt, step=step)
        writer.close()
        opt.close()

    train(1, 9)
    train(7, 12)
    client = MlflowClient(tracking_uri=uri)
    rows = _artifact_rows(client, run_id, tmp_path)
    steps = [r["step"] for r in rows]
    assert steps == [*range(2, 10), *range(7, 13)]  # hypergradient decides from step 2 on
    assert rows[5:8] == rows[8:11]  # steps 7 to 9: the resume redid them bit for bit
    logged = [r for r in read_log(folder).records if r["kind"] == "decision"]
    kept = rows[:5] + rows[8:]  # less the first pass's rows past the checkpoint
    assert [(r["step"], r["new"]) for r in kept] == [(r["step"], r["new"]) for r in logged]
    parts = client.list_artifacts(run_id, "selftune/decisions")
    assert [Path(f.path).name for f in parts] == [f"{i:05d}.jsonl" for i in range(5)]
    local = Path(client.download_artifacts(run_id, "selftune/decisions", str(tmp_path)))
    sizes = [len((local / Path(f.path).name).read_text().splitlines()) for f in parts]
    assert sizes == [3, 3, 3, 3, 2]
    counts = client.get_metric_history(run_id, "selftune/decisions")
    assert sorted((m.step, m.value) for m in counts) == sorted(
        (t, i + 1.0) for i, t in enumerate(steps)
    )


# --------------------------------------------------------------------------- torch.compile


def _compiled_run(backend: str, steps: int) -> tuple[list[float], int]:
    """A tensor-lr Adam whose inner step is compiled, wrapped by selftune; the rates it applied."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    inner = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3), foreach=False)
    opt = selftune.wrap(inner)
    inner.step = torch.compile(inner.step, backend=backend)  # type: ignore[method-assign]
    applied: list[float] = []
    opt.add_listener(lambda e: applied.append(e.hyperparams[0]["lr"]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        _plain_loop(opt, model, steps)
    assert isinstance(inner.param_groups[0]["lr"], torch.Tensor)  # still the same tensor
    return applied, int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_compiled_inner_step_does_not_recompile_when_selftune_changes_the_rate() -> None:
    applied, graphs = _compiled_run("eager", 20)
    assert len(set(applied)) > 3, "selftune must change the rate for this test to mean anything"
    assert graphs <= 2  # the first step's graph (state init) and the steady one, nothing more


def test_a_rollback_does_not_recompile_the_compiled_inner_step() -> None:
    """A rollback's restore (torch's ``load_state_dict``) gave the optimizer new state tensors,
    on whose identity a compiled step guards: it recompiled at every rollback, until dynamo's
    limit of recompiles left it uncompiled for the rest of the run."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    inner = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3), foreach=False)
    opt = selftune.wrap(inner, "off")
    inner.step = torch.compile(inner.step, backend="eager")  # type: ignore[method-assign]
    events: list[str] = []
    opt.add_listener(lambda e: events.append(e.guard["event"]) if e.guard else None)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(1, 71):  # (a rollback to step 1's snapshot would start the state anew)
            loss = torch.nn.functional.mse_loss(model(x), y) * (math.nan if t in (30, 60) else 1)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
    assert events == ["rollback", "rollback"]


# --------------------------------------------------------------------------- AMP, accumulation


def _example(name: str) -> Any:
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grad_scaler_with_accumulation_steps_once_per_step_with_the_mean_loss() -> None:
    example = _example("amp_accumulation")
    opt, _, losses = example.train(steps=40, accumulate=4)
    assert opt.step_count == 40  # one selftune step per 4 micro-batches
    assert opt.last_signals.loss == pytest.approx(losses[-1], rel=1e-6)
    assert opt.hyperparams()[0]["lr"] != pytest.approx(1e-3, rel=1e-3)
    assert losses[-1] < losses[0]


def test_a_step_the_grad_scaler_skips_is_not_counted() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    events: list[selftune.StepEvent] = []
    opt.add_listener(events.append)
    for t in range(6):
        opt.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        scaler.scale(loss).backward()
        if t == 3:  # what an overflow leaves behind
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt, loss=loss.detach())
        scaler.update()
    assert opt.step_count == 5 and [e.step for e in events] == [1, 2, 3, 4, 5]
    assert scaler.get_scale() < 2.0**8  # the scaler did see the overflow and backed off


# ------------------------------------------------------------------ a controller of one's own


def test_a_controller_of_ones_own_is_logged_and_replayed_as_the_built_in_ones_are(
    tmp_path: Path,
) -> None:
    """The example's controller, through the wrapper: its options in the manifest, its
    decisions in the log with their reasons, and the run replayed from the log bit for bit."""
    example = _example("custom_controller")
    model, last = example.train(tmp_path / "run", steps=400)
    run = selftune.audit.read_log(tmp_path / "run")
    assert run.manifest["controller"] == "plateau-halver"
    assert run.manifest["config"]["controller_options"] == {"patience": 40, "min_gain": 0.01}
    cuts = [r for r in run.records if r.get("kind") == "decision"]
    assert cuts and all(r["new"] == pytest.approx(r["old"] / 2) for r in cuts)
    assert all("no 1% gain in 40 steps" in r["reason"] for r in cuts)
    selftune.verify(tmp_path / "run")
    again = example.replayed(tmp_path / "run", steps=400)
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert last < 0.05  # from 0.55: the run trained
    with pytest.raises(selftune.ConfigError, match="patience"):
        example.PlateauHalver(patience=0)
    # run again into its own folder (its second run was refused: the folder held steps)
    example.train(example.fresh(tmp_path / "run"), steps=50)
    other = tmp_path / "other"
    example.train(other, steps=5)
    (other / "manifest.json").write_text(
        (other / "manifest.json").read_text().replace("plateau-halver", "auto")
    )
    assert example.fresh(other).exists(), "a folder of another run was emptied"


def test_a_writer_s_line_names_the_bound_and_the_guard_once() -> None:
    """A bound's cut read "by the bound (clipped by the policy)", and a guard's decision "by
    the guard: guard: ...", in TensorBoard's and MLflow's text."""
    from selftune.integrations.events import describe

    bound = selftune.Decision(5, 0, "lr", 0.011, 0.01, "cut", {}, True, "bound", 1.0)
    guard = selftune.Decision(6, 0, "lr", 0.01, 0.005, "guard: loss is nan", {}, False, "guard")
    assert describe(bound) == "step 5, group 0: lr 0.011 → 0.01 by the bound: cut"
    assert describe(guard) == "step 6, group 0: lr 0.01 → 0.005 by the guard: loss is nan"
