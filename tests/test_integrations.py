"""The integrations, each in a real short training with the real framework."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import selftune
from selftune.audit import read_log

# --------------------------------------------------------------------------- helpers


def _data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable classification task: labels from a fixed random linear map of the inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 4, generator=gen)
    return x, (x @ w).argmax(dim=1)


def _trace(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]


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
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
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
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.step_count == 60
    assert opt.hyperparams()[0]["lr"] != pytest.approx(1e-3, rel=1e-3)
    result = selftune.verify(tmp_path / "run")  # raises LogError on any damage
    assert "lr" in result.knobs and not result.torn_tail
    assert any(
        r["kind"] == "decision" and r["knob"] == "lr" for r in read_log(tmp_path / "run").records
    )
    # The loss selftune saw each step is the loss the module computed.
    seen = [row["loss"] for row in _trace(tmp_path / "run")]
    assert seen == pytest.approx(model.losses, rel=1e-5)
    assert trainer.callback_metrics["selftune/group0/lr"] == pytest.approx(
        opt.hyperparams()[0]["lr"]
    )


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


def test_lightning_checkpoint_resume_continues_with_the_same_knobs(tmp_path: Path) -> None:
    from selftune.integrations.lightning import SelfTuneCallback

    def run(steps: int, ckpt: Path | None, out: str) -> tuple[Any, SelfTuneCallback]:
        torch.manual_seed(0)
        model = _TinyModule()
        cb = SelfTuneCallback(log_dir=tmp_path / out)
        trainer = _trainer(steps, cb, tmp_path / out, enable_checkpointing=False)
        trainer.fit(model, _loader(), ckpt_path=ckpt)
        return trainer, cb

    trainer, first = run(32, None, "a")  # two whole epochs: the data order resumes exactly
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert "selftune" in saved["optimizer_states"][0]
    hp_mid = first.optimizers[0].hyperparams()

    # Resumed into the same run folder: the knobs continue, the log stays one valid chain.
    trainer, resumed = run(64, ckpt, "a")
    opt = resumed.optimizers[0]
    assert opt.step_count == 64
    # Uninterrupted reference run in another folder: the resumed run must end where it ends.
    _, straight = run(64, None, "b")
    ref = straight.optimizers[0]
    assert opt.hyperparams()[0] == pytest.approx(ref.hyperparams()[0], rel=1e-6)
    assert opt.hyperparams()[0]["lr"] != pytest.approx(hp_mid[0]["lr"])
    assert "lr" in selftune.verify(tmp_path / "a").knobs
    decisions = [r for r in read_log(tmp_path / "a").records if r["kind"] == "decision"]
    reference = [r for r in read_log(tmp_path / "b").records if r["kind"] == "decision"]
    assert [(r["step"], r["knob"], r["new"]) for r in decisions] == [
        (r["step"], r["knob"], r["new"]) for r in reference
    ]
