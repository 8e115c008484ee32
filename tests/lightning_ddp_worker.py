"""Lightning fits under ``torchrun --nproc_per_node=2`` (gloo, CPU), ``strategy="ddp"``, with
``SelfTuneCallback``, in one process group (``tests/test_distributed.py`` reads what they wrote):

- ``metric``: ``monitor="val_loss"``, each rank validating on its own shard and logging its own
  ``val_loss`` (no ``sync_dist``), a ``ModelCheckpoint`` saving after each validation;
- ``rank0-folder``: a run whose folder is given on rank 0 alone (as a folder on rank 0's node
  alone is), fitted for an epoch, then resumed from its checkpoint by a new fit for another.

Each rank writes ``rank<r>.json`` into ``--out``: per scenario, the warnings selftune gave it,
the metric the optimizer's state held in each checkpoint, the steps its optimizer took; rank 0's
run folders are ``--out/<scenario>/run``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = (x @ torch.randn(16, 4, generator=gen)).argmax(dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _fit(
    out: Path, steps: int, callback: SelfTuneCallback, ckpt: Path | None = None
) -> dict[str, Any]:
    """Fit a fresh module for ``steps`` (4 an epoch a rank), validating and saving a checkpoint
    at each epoch's end; what the rank saw."""
    torch.manual_seed(0)
    module = _Module()
    trainer = pl.Trainer(
        max_steps=steps,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1)],
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(module, _loader(), _loader(), ckpt_path=ckpt)
    return {
        "warnings": [str(w.message) for w in said if "rank" in str(w.message)],
        "saved": module.saved,
        "steps": callback.optimizers[0].step_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    rank = int(os.environ["RANK"])
    result = {
        "metric": _fit(
            out / "metric", 8, SelfTuneCallback(log_dir=out / "metric" / "run", monitor="val_loss")
        )
    }
    folder = out / "rank0-folder"
    given = folder / "run" if rank == 0 else None
    _fit(folder, 4, SelfTuneCallback(log_dir=given))
    ckpt = folder / "ckpt" / "epoch=0-step=4.ckpt"
    try:
        result["rank0-folder"] = _fit(folder, 8, SelfTuneCallback(log_dir=given), ckpt)
    except Exception as err:  # what the test reads, on the rank that raised it
        result["rank0-folder"] = {"error": f"{type(err).__name__}: {err}"}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
