"""selftune on a two-player loss: a GAN on the ring of eight Gaussians, with and without it.

A generator's loss is no measure of its progress: it rises whenever the discriminator gets
better, by design, and the discriminator's falls as it wins.  This trains the GAN of
``tests/problems.py`` (the toy of the GAN literature: eight Gaussians on a circle of radius 2,
standard deviation 0.05; Adam at ``lr=1e-3, betas=(0.5, 0.999)`` for both players, 3,000
rounds) with both optimizers wrapped alike, each told its own player's loss:

- ``plain``: no selftune;
- ``auto``: ``selftune.wrap(adam)`` at its defaults (``auto`` and the guard);
- ``auto-no-regress``: the same with the guard's regression checks off
  (``GuardConfig(regress=1e9, relapse=1e9)``, the README's advice for a loss that rises by
  design);
- ``auto-no-guard``: ``auto`` without a guard: what the controller alone does;
- ``guard-only``: ``controller="off"`` (the rates never change) with the default guard: what
  the guard alone does;
- ``off-nonfinite``: ``controller="off"`` with ``GuardConfig(nonfinite_only=True)``: the audit
  log and a rollback on a NaN, and nothing else;
- ``auto-10x-nonfinite``: ``auto`` with that guard and its rate's rise bounded at 10x the start
  (``bounds={"lr": (1e-3, 10.0)}``), the setting that kept a fine-tune's and a policy
  gradient's gains (``bench-results/finetune/``, ``policy-gradient/``).

Quality, on 2,500 samples of the last generator (Srivastava et al. 2017, VEEGAN): the share of
samples within three standard deviations of a mode, and how many of the eight modes hold at
least 20 of them.  A run the guard stopped (``GuardError``) is measured where it stopped.  Each
row also has both players' final rates and the guard's events from their logs.

Run from the repository root: ``PYTHONPATH=src python bench-results/gan/gan.py`` (about five
minutes on two cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "tests"), str(HERE.parent)]

from faults import guard_records  # noqa: E402
from probe_grid import Column, run_grid  # noqa: E402
from problems import RING_MODES, gan_adam, gan_players, ring_quality, train_gan  # noqa: E402

import selftune  # noqa: E402

STEPS, SEEDS = 3000, range(10)
VARIANTS = (
    "plain",
    "auto",
    "auto-no-regress",
    "auto-no-guard",
    "guard-only",
    "off-nonfinite",
    "auto-10x-nonfinite",
)
PLAYERS = ("generator", "discriminator")


def wrapped(adam: torch.optim.Optimizer, variant: str, folder: Path) -> Any:
    """The optimizer as ``variant`` runs it."""
    settings: dict[str, dict[str, Any]] = {
        "auto": {},
        "auto-no-regress": {"guard": selftune.GuardConfig(regress=1e9, relapse=1e9)},
        "auto-no-guard": {"guard": False},
        "guard-only": {"controller": "off"},
        "off-nonfinite": {
            "controller": "off",
            "guard": selftune.GuardConfig(nonfinite_only=True),
        },
        "auto-10x-nonfinite": {
            "bounds": {"lr": (1e-3, 10.0)},
            "guard": selftune.GuardConfig(nonfinite_only=True),
        },
    }
    if variant == "plain":
        return adam
    return selftune.wrap(adam, log_dir=folder, **settings[variant])


def guard_events(folder: Path) -> dict[str, int]:
    """How many guard events of each kind a player's log holds."""
    return dict(Counter(r["event"] for r in guard_records(folder)))


def run(variant: str, seed: int) -> dict[str, Any]:
    """One GAN trained with ``variant``: its quality, final rates and guard events."""
    torch.set_num_threads(1)
    players = gan_players(seed)
    row: dict[str, Any] = {"variant": variant, "seed": seed, "stopped": None}
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / name for name in PLAYERS]
        opts = [wrapped(gan_adam(p), variant, f) for p, f in zip(players, folders, strict=True)]
        try:
            train_gan(players, (opts[0], opts[1]), seed, STEPS)
        except selftune.GuardError as err:  # the run stopped: measured where it stopped
            row["stopped"] = {"round": opts[0].step_count + 1, "error": str(err)[:160]}
        if variant != "plain":
            for name, opt, folder in zip(PLAYERS, opts, folders, strict=True):
                opt.close()
                row[f"{name}_lr"] = opt.hyperparams()[0]["lr"]
                row[f"{name}_guard"] = guard_events(folder)
    return {**row, **ring_quality(players[0], seed)}


def _rates(rows: list[dict[str, Any]]) -> str:
    """Each player's median rate at the end (a plain run's are fixed)."""
    if rows[0]["variant"] == "plain":
        return "1e-3, 1e-3 (fixed)"
    return ", ".join(f"{statistics.median(r[f'{p}_lr'] for r in rows):.2g}" for p in PLAYERS)


def _events(rows: list[dict[str, Any]]) -> str:
    """Each player's guard events over all the rows, summed by kind."""
    if rows[0]["variant"] == "plain":
        return "no guard"
    per = []
    for p in PLAYERS:
        seen: Counter[str] = Counter()
        for r in rows:
            seen.update(r[f"{p}_guard"])
        per.append(" ".join(f"{k} {v}" for k, v in sorted(seen.items())) or "none")
    return "; ".join(per)


#: medians over seeds per variant; runs stopped by the guard; its events summed
COLUMNS: list[Column] = [
    (
        "high-quality samples (median)",
        "---:",
        lambda m: f"{statistics.median(r['high_quality'] for r in m):.3f}",
    ),
    ("modes of 8 (median)", "---:", lambda m: f"{statistics.median(r['modes'] for r in m):g}"),
    (
        "runs with all 8",
        "---:",
        lambda m: f"{sum(r['modes'] == RING_MODES for r in m)} of {len(m)}",
    ),
    ("runs stopped by GuardError", "---:", lambda m: str(sum(r["stopped"] is not None for r in m))),
    ("rates at the end (median; generator, discriminator)", "---", _rates),
    ("guard events (all seeds; generator, discriminator)", "---", _events),
]


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE, workers)


if __name__ == "__main__":
    main()
