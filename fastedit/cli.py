"""The ``fastedit`` command: ``demo | edit | stats | eval | ask | testbed | build-ext``.

Each subcommand lives beside the code it drives, as a module with ``configure(parser)`` and
``run(args) -> int``; this file only wires them up, so ``fastedit --help`` stays fast (the
subcommand's module is imported only when it runs). A :class:`fastedit.errors.FastEditError`
is printed as one line with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("fastedit.testbed.demo", "edit 100 facts of the bundled testbed model and show the result"),
    "edit": ("fastedit.editing.cli", "edit a model with a requests file and save it with a JSON report"),
    "stats": ("fastedit.stats.cli", "collect the covariance statistics of a model over a corpus"),
    "eval": ("fastedit.eval.cli", "evaluate a model on CounterFact or zsRE records, before and after an edit"),
    "ask": ("fastedit.eval.ask", "print a model's greedy continuation of prompts (edited or not)"),
    "testbed": ("fastedit.testbed.cli", "write records of the synthetic world or retrain the testbed model"),
    "build-ext": ("fastedit._ext", "compile the C++/CUDA extension now instead of on first use"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastedit", description=__doc__.splitlines()[0])
    from fastedit import __version__

    parser.add_argument("--version", action="version", version=f"fastedit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fastedit.errors import FastEditError

    argv = list(sys.argv[1:] if argv is None else argv)
    top = _parser()
    if not argv or argv[0] not in COMMANDS:
        args = top.parse_args(argv)  # handles --help/--version and unknown commands
        top.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fastedit {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except FastEditError as exc:
        print(f"fastedit {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastedit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
