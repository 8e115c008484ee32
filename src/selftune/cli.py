"""The ``selftune`` command: one sub-command per job, each imported only when it runs.

Each sub-command lives in the module that owns its job and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes to them, so the core
never imports the command line's optional dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("selftune.demo", "train MNIST-1D plain and self-tuned, side by side"),
    "bench": ("selftune.bench.cli", "run the benchmark and regenerate its report"),
    "report": ("selftune.report", "write an HTML report of a run folder"),
    "watch": ("selftune.watch", "follow a run folder live in the terminal"),
    "verify": ("selftune.audit", "check a run's audit log and manifest"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selftune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(module).add_arguments(cmd)
        except ImportError as err:  # one command's missing extra must not break the others
            cmd.set_defaults(unavailable=f"selftune {name} is unavailable: {err}")
            cmd.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "unavailable", None):
        print(
            f"{args.unavailable}; install the extras: pip install 'selftune[cli,bench]'",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
