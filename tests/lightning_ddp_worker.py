"""A Lightning fit under ``torchrun --nproc_per_node=2`` (gloo, CPU), ``strategy="ddp"``, with
``SelfTuneCallback(monitor="val_loss")``: each rank validates on its own shard and logs its own
``val_loss`` (no ``sync_dist``), and a ``ModelCheckpoint`` saves after each validation.

Each rank writes ``rank<r>.json`` into ``--out``: the warnings selftune gave it, and the metric
the optimizer's state held when the checkpoint was saved; rank 0's run folder is ``--out/run``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from selftune.integrations.lightning import SelfTuneCallback


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        self.saved: list[Any] = []  #: the optimizer state's metric in each checkpoint

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saved.append(checkpoint["optimizer_states"][0]["selftune"]["metric"]["observed"])

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(dim=1)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    torch.manual_seed(0)
    module = _Module()
    trainer = pl.Trainer(
        max_steps=8,  # two epochs of 4 steps a rank
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[
            SelfTuneCallback(log_dir=out / "run", monitor="val_loss"),
            ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1),
        ],
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(module, loader, loader)
    selftune_said = [str(w.message) for w in said if "rank" in str(w.message)]
    result = {"warnings": selftune_said, "saved": module.saved}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
