"""The ``selftune`` command: one sub-command per job, each imported only when it runs.

Each sub-command lives in the module that owns its job and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them, so the core
never imports the command line's optional dependencies.

The exit status is the same in every command: 0 done, 1 a failure or damage found (a log that
fails its check, a file that cannot be read or written), 2 a usage error (an option's value out
of range, argparse's own refusals, a missing extra), 130 interrupted by Ctrl-C (``watch``, which
Ctrl-C ends as it is meant to, 0).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from selftune.terminal import printable

#: sub-command -> (module, the extras its optional dependencies come in, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("selftune.demo", "cli,bench", "train MNIST-1D plain and self-tuned, side by side"),
    "bench": ("selftune.bench.cli", "cli,bench", "run the benchmark and regenerate its report"),
    "report": ("selftune.report", "cli", "write an HTML report of a run folder"),
    "watch": ("selftune.watch", "cli", "follow a run folder live in the terminal"),
    "verify": ("selftune.audit", "", "check a run's audit log and manifest"),
}
#: what the docs name that is no command, and where it is: a bare "invalid choice" from argparse
#: left a reader of the guide's replay looking for the command
NOT_COMMANDS = {
    "replay": "replay is no command but a function: your training script replays a run by "
    "wrapping its optimizer with selftune.replay(optimizer, RUN) in place of selftune.wrap "
    "(docs/guide.md, 'Replay'); `selftune verify RUN` checks a run's log",
}
#: what an interrupted command adds to its one line, where there is more to say than that
ON_INTERRUPT = {"bench": "the finished runs are kept, and the same command resumes from them"}


class UsageError(Exception):
    """An option's value that the command refuses before it starts: said in one line, naming the
    option, with the exit status 2 that argparse gives its own refusals (a ``SystemExit`` of the
    text exited 1, as a failure does)."""


def build_parser() -> argparse.ArgumentParser:
    from selftune import __version__

    parser = argparse.ArgumentParser(
        prog="selftune",
        description="A training run that tunes its own learning rate and momentum: the demo, "
        "the benchmark, and the reading of a run folder (its report, a live view, a check of "
        "its log).",
    )
    parser.add_argument("--version", action="version", version=f"selftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, _, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module).add_arguments(cmd)
        except ImportError as err:  # one command's missing extra must not break the others
            cmd.set_defaults(unavailable=err)
            cmd.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names and return its exit status.

    Ctrl-C is said in one line, not a traceback from wherever the command was (it is how a
    demo or a benchmark is stopped early); exit status 130, as a shell gives a command that
    SIGINT ended.
    """
    name = ""  # the command's, once parsed
    given = sys.argv[1:] if argv is None else argv
    try:
        if given and given[0] in NOT_COMMANDS:
            raise UsageError(NOT_COMMANDS[given[0]])
        args = build_parser().parse_args(argv)
        name = args.command
        return _run(args)
    except UsageError as err:
        said = str(err)
        status = 2
    except KeyboardInterrupt:
        said = "; ".join(filter(None, ("interrupted", ON_INTERRUPT.get(name))))
        status = 130
    print(printable(f"selftune {name}".rstrip() + f": {said}"), file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    """Run the command ``args`` parsed to; say which extra a missing module comes in."""
    if getattr(args, "unavailable", None) is not None:
        return _missing(args.command, args.unavailable)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except ModuleNotFoundError as err:
        # the commands import their optional dependencies when they first need them (a plain
        # ``pip install selftune`` has torch alone); a module of selftune's own is a bug
        if err.name is None or err.name.partition(".")[0] == "selftune":
            raise
        return _missing(args.command, err)


def _missing(command: str, err: ImportError) -> int:
    """Say which module a command lacks and the extra that installs it, instead of a traceback
    from deep inside the command."""
    extras = COMMANDS[command][1]
    fix = (
        f"pip install 'selftune[{extras}]' (from a checkout, pip install '.[{extras}]') installs "
        "what it uses"
        if extras
        else "reinstall it"
    )
    if isinstance(err, ModuleNotFoundError) and err.name:
        what = f"needs the module {err.name.partition('.')[0]!r}, which is not installed"
    else:  # installed, but not importable as it is (a version too old, a broken install)
        what = f"cannot import what it needs ({err})"
    print(printable(f"selftune {command} {what}: {fix}"), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
