"""``selftune demo``: train MNIST-1D twice, side by side: the optimizer as it comes, then tuned.

Both trainings start from the same weights and see the same minibatches; they run interleaved,
one step each in turn, in one process, so that both get the same share of a busy machine and the
seconds to target compare fairly.  The plain optimizer uses its usual defaults (AdamW at 1e-3, or
SGD with momentum 0.9 at 0.01); the tuned one is the same optimizer wrapped by
``selftune.wrap(..., controller="auto")``, given the loss at every step and the test accuracy
after every evaluation (``observe``), and logs to ``<out>/selftune``, the run folder that
``selftune report`` and ``selftune verify`` read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selftune.audit import LogError
from selftune.bench.data import DataUnavailable
from selftune.cli import UsageError
from selftune.files import write_whole
from selftune.terminal import printable

_MARKER = "demo.json"  #: written into --out, so a later demo may replace the folder it made
SAMPLES = 10_000  #: the MNIST-1D examples the demo generates
TRAIN_EXAMPLES = SAMPLES * 4 // 5  #: those the package's 80/20 split keeps for training


@dataclass
class Trainee:
    """One of the two trainings: model, optimizer, and what was measured so far."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    seconds: float = 0.0  #: time spent in this training's steps and evaluations
    accuracy: float = 0.0
    hit_step: int | None = None
    hit_seconds: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default="adamw",
        help="adamw (lr 1e-3) or sgd (momentum 0.9, lr 0.01); default %(default)s",
    )
    parser.add_argument(
        "--steps", type=int, default=1500, help="training steps (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights and batches (default %(default)s)"
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    parser.add_argument(
        "--target", type=float, default=0.9, help="test accuracy to reach (default %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="examples per training step (default %(default)s)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=25, help="evaluate every N steps (default %(default)s)"
    )
    parser.add_argument("--no-live", action="store_true", help="no live display, table only")


def load_data() -> Any:
    """MNIST-1D as the benchmark uses it (generated offline by ``mnist1d``, cached as .npz)."""
    from selftune.bench.data import mnist1d

    return mnist1d(SAMPLES)


def build_model() -> torch.nn.Module:
    """The MNIST-1D reference 1-D CNN: three 5-wide convolutions (the last two strided), 10 classes.

    Wider than the benchmark's ``Cnn1d`` in its first layer (no stride), as in the MNIST-1D
    paper's CNN; at AdamW's default rate it does not reach 90% within 2,000 steps.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 32, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 10),
    )


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def _check(args: argparse.Namespace) -> None:
    """Refuse an option's value before anything is loaded or written (UsageError: exit 2)."""
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: pass at least 1")
    if not 0.0 < args.target <= 1.0:
        raise UsageError(f"--target {args.target}: pass an accuracy in (0, 1]")
    for option, value in (("--eval-every", args.eval_every), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{option} {value}: pass at least 1")
    if args.batch_size > TRAIN_EXAMPLES:  # drawn with replacement: a batch of repeats
        raise UsageError(
            f"--batch-size {args.batch_size}: pass at most {TRAIN_EXAMPLES}, the size of "
            "MNIST-1D's training set"
        )
    if not -(2**63) <= args.seed <= 2**64 - 2:  # torch's range; a generator takes seed + 1
        raise UsageError(f"--seed {args.seed}: pass one from -2**63 to 2**64 - 2")


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder that holds files no demo made: the demo
    writes its own files there (``summary.json``, ``demo.json``) and replaces its run folder,
    and a user's file of one of those names was written over."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: pass a folder for the demo's runs")
    if out.is_dir() and any(out.iterdir()) and not _made_by_demo(out):
        names = sorted(path.name for path in out.iterdir())
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UsageError(
            f"--out {out} holds files no demo made ({listed}): pass a new or empty folder, or "
            "the folder of an earlier demo, which this one replaces"
        )


def _made_by_demo(out: Path) -> bool:
    """Whether ``out`` holds an earlier demo's marker, the demo's arguments (``"command"`` is
    argparse's name of the sub-command): a ``demo.json`` of the user's own is not one."""
    try:
        marker = json.loads((out / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("command") == "demo"


def _unwritable(out: Path, exc: OSError | LogError) -> str:
    """What to say when a file of the demo's cannot be written (a folder of another user's, a
    read-only one), instead of the traceback of PermissionError or LogError from deep inside."""
    if isinstance(exc, LogError):  # the run's log: its text names the file and why
        return f"{exc}: pass --out a folder you can write to"
    where = Path(exc.filename) if exc.filename else out
    said = f"cannot write {where} ({exc.strerror or exc})"
    # (an OSError elsewhere, in the data's cache folder, is no fault of --out's)
    return (
        f"{said}: pass --out a folder you can write to" if out in (where, *where.parents) else said
    )


def run(args: argparse.Namespace) -> int:
    """``selftune demo``: 0 done; 1 when a file cannot be written or the data read; UsageError
    on a bad option.

    The previous demo's run in ``--out`` is removed only once the data is loaded, when this
    one can start: a demo stopped before (Ctrl-C while MNIST-1D is generated, the first time)
    keeps it.
    """
    _check(args)
    # the report at the end draws with matplotlib, and the closing table is rich's (with
    # --no-live too): either missing, say so now, not after the whole run
    import matplotlib  # noqa: F401
    import rich  # noqa: F401

    out = Path(args.out).expanduser()
    _check_out(out)
    try:
        # the marker first: a folder the demo wrote in is one a later demo may replace, and
        # one it cannot write in is said before the data loads
        out.mkdir(parents=True, exist_ok=True)
        (out / _MARKER).write_text(json.dumps(vars(args)) + "\n")
        data = load_data()
        run_dir = _remove_run(out / "selftune")
        _demo(args, out, run_dir, data)
    except DataUnavailable as exc:  # its message names the file and what to do
        print(printable(f"selftune demo: {exc}"), file=sys.stderr)
        return 1
    except (OSError, LogError) as exc:
        print(printable(f"selftune demo: {_unwritable(out, exc)}"), file=sys.stderr)
        return 1
    _report(run_dir)
    return 0


def _remove_run(run_dir: Path) -> Path:
    """Remove the previous demo's run folder, if any; an OSError names the folder (rmtree's
    names a file by its name alone, ``plots``)."""
    try:
        shutil.rmtree(run_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(run_dir)) from None
    return run_dir


def _demo(args: argparse.Namespace, out: Path, run_dir: Path, data: Any) -> None:
    """Train both, then write ``summary.json`` and print the table."""
    import selftune

    torch.manual_seed(args.seed)
    plain_model = build_model()
    tuned_model = build_model()
    tuned_model.load_state_dict(plain_model.state_dict())  # the same starting weights
    tuned_opt = selftune.wrap(
        _optimizer(args.optimizer, tuned_model), "auto", log_dir=run_dir, seed=args.seed
    )
    label = "AdamW lr=1e-3" if args.optimizer == "adamw" else "SGD lr=0.01 momentum=0.9"
    trainees = [
        Trainee(label, plain_model, _optimizer(args.optimizer, plain_model), _gen(args.seed)),
        Trainee(f"selftune({label})", tuned_model, tuned_opt, _gen(args.seed)),
    ]
    # One thread: the two trainings are stepped in turn, and on a small shared machine extra
    # threads per matmul mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(trainees, data, args)
    finally:
        torch.set_num_threads(threads)
        tuned_opt.close()
    summary = _summary(trainees, tuned_opt, args)
    write_whole(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    _print_table(trainees, args, summary)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 1)


def _train(trainees: list[Trainee], data: Any, args: argparse.Namespace) -> None:
    """Step both trainings in turn; evaluate each every ``--eval-every`` steps."""
    from selftune.tuner import SelfTuned

    live = None
    if not args.no_live:
        from rich.console import Console
        from rich.live import Live

        console = Console()
        if console.is_terminal:
            live = Live(_live_table(trainees, 0, args), console=console, auto_refresh=False)
            live.start()
    n = data.x_train.shape[0]
    try:
        for step in range(1, args.steps + 1):
            for t in trainees:
                start = time.perf_counter()
                idx = torch.randint(0, n, (args.batch_size,), generator=t.gen)
                loss = torch.nn.functional.cross_entropy(
                    t.model(data.x_train[idx]), data.y_train[idx]
                )
                t.optimizer.zero_grad()
                loss.backward()
                if isinstance(t.optimizer, SelfTuned):
                    t.optimizer.step(loss=loss.detach())
                else:
                    t.optimizer.step()
                if step % args.eval_every == 0 or step == args.steps:
                    t.accuracy = _accuracy(t.model, data)
                    t.curve.append((step, t.accuracy))
                    if isinstance(t.optimizer, SelfTuned):  # as a loop that evaluates can
                        t.optimizer.observe(t.accuracy, mode="max")
                t.seconds += time.perf_counter() - start
                evaluated = bool(t.curve) and t.curve[-1][0] == step
                if t.hit_step is None and evaluated and t.accuracy >= args.target:
                    t.hit_step, t.hit_seconds = step, t.seconds
            if live is not None and (step % args.eval_every == 0 or step == args.steps):
                live.update(_live_table(trainees, step, args), refresh=True)
    finally:
        if live is not None:
            live.stop()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, data: Any) -> float:
    model.eval()
    pred = model(data.x_test).argmax(dim=1)
    model.train()
    return float((pred == data.y_test).float().mean())


def _live_table(trainees: list[Trainee], step: int, args: argparse.Namespace) -> Any:
    from rich.table import Table

    table = Table(title=f"MNIST-1D, step {step}/{args.steps}, target {args.target:.0%}")
    table.add_column("optimizer")
    table.add_column("test accuracy", justify="right")
    table.add_column("reached target at", justify="right")
    table.add_column("lr", justify="right")
    for t in trainees:
        hp = getattr(t.optimizer, "hyperparams", None)
        lr = hp()[0]["lr"] if hp is not None else t.optimizer.param_groups[0]["lr"]
        hit = "-" if t.hit_step is None else f"step {t.hit_step}"
        table.add_row(t.name, f"{t.accuracy:.3f}", hit, f"{float(lr):.3g}")
    return table


def _summary(trainees: list[Trainee], tuned: Any, args: argparse.Namespace) -> dict[str, Any]:
    plain, self_tuned = trainees
    rows = [
        {
            "name": t.name,
            "steps_to_target": t.hit_step,
            "seconds_to_target": t.hit_seconds,
            "final_accuracy": t.accuracy,
            "best_accuracy": max((a for _, a in t.curve), default=0.0),
            "seconds": t.seconds,
            "curve": t.curve,
        }
        for t in trainees
    ]
    speedup: float | None = None
    note = ""
    if plain.hit_step is not None and self_tuned.hit_step is not None:
        speedup = plain.hit_step / self_tuned.hit_step
    elif self_tuned.hit_step is not None:
        # The plain optimizer missed within the budget: the speed-up is at least this.
        speedup, note = args.steps / self_tuned.hit_step, "at least"
    return {
        "optimizer": args.optimizer,
        "steps": args.steps,
        "target": args.target,
        "seed": args.seed,
        "results": rows,
        "speedup_steps": speedup,
        "speedup_note": note,
        "final_knobs": tuned.hyperparams(),
    }


def _print_table(trainees: list[Trainee], args: argparse.Namespace, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"MNIST-1D 1-D CNN, {args.steps} steps, target test accuracy "
        f"{args.target:.0%} (seed {args.seed})"
    )
    for name in ("optimizer", "steps to target", "seconds to target", "final accuracy"):
        table.add_column(name, justify="left" if name == "optimizer" else "right")
    for t in trainees:
        table.add_row(
            t.name,
            "not reached" if t.hit_step is None else str(t.hit_step),
            "-" if t.hit_seconds is None else f"{t.hit_seconds:.1f}",
            f"{t.accuracy:.3f}",
        )
    console = Console(width=max(100, Console().width))
    console.print(table)
    speedup = summary["speedup_steps"]
    if speedup is None:
        console.print("speed-up: n/a (selftune did not reach the target within the budget)")
    else:
        prefix = "≥ " if summary["speedup_note"] else ""
        console.print(f"speed-up in steps to target: {prefix}{speedup:.2f}x")
    knobs = ", ".join(f"{k}={v:.4g}" for k, v in summary["final_knobs"][0].items())
    console.print(f"selftune's final knobs: {knobs}")


def _report(run_dir: Path) -> None:
    """Verify the run folder and write its HTML report, when the report module is there."""
    import selftune

    print(selftune.verify(run_dir).summary())
    try:
        from selftune.report import write_report
    except ImportError as err:
        print(
            f"no HTML report: selftune.report is not available ({err}); the run folder is "
            f"{run_dir}",
            file=sys.stderr,
        )
        return
    print(f"report: {write_report(run_dir)}")
