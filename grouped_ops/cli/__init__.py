"""``python -m grouped_ops``: demo, prewarm, explain, cache, bench.

One module per subcommand, each with ``add_parser`` and ``run``; every subcommand is a plain
function over parsed arguments, so tests call :func:`main` with an argument list and read what it
printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .._errors import GroupedOpsError
from .._version import __version__
from . import bench, cache, demo, explain, prewarm
from ._common import signatures_from_args, signatures_from_file
from .explain import explain_table

__all__ = ["build_parser", "explain_table", "main", "signatures_from_args", "signatures_from_file"]

# Exit status when stdout's reader went away (`python -m grouped_ops cache list | head`), as a
# process killed by SIGPIPE reports it in a shell.
BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE


def _main(argv: list[str]) -> int:
    try:
        _import_ops(argv)
    except ImportError as e:
        print(f"grouped_ops: error: --import: {e}", file=sys.stderr)
        return 2
    if "bench" in argv and isinstance(why := bench.load(), str):
        print(f"grouped_ops: the benchmark sweep is not available in this build ({why})", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("grouped_ops").setLevel(logging.INFO)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except GroupedOpsError as e:
        print(f"grouped_ops: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. ``argv`` decides whether the bench module is imported (only for ``bench``)."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="grouped_ops: grouped linear layers and weighted combines, autotuned.",
    )
    parser.add_argument("--version", action="version", version=f"grouped_ops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every decision (the 'grouped_ops' logger at INFO)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): a module that registers ops of your own "
                             "(grouped_ops.ops.register), so that explain, prewarm and cache know them")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    demo.add_parser(sub)
    prewarm.add_parser(sub)
    explain.add_parser(sub)
    cache.add_parser(sub)
    bench.add_parser(sub, argv)
    return parser


def _import_ops(argv: list[str]) -> None:
    """Import the ``--import MODULE`` modules before the parser is built: their ops get sub-commands.
    Only options before the command are the program's own (a later ``--import`` is the command's)."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            break  # the command
        if arg == "--import" and i + 1 < len(argv):
            importlib.import_module(argv[i + 1])
        elif arg.startswith("--import="):
            importlib.import_module(arg.partition("=")[2])


def _program_name() -> str:
    """``grouped-ops`` when run as the console script, else how the module is run."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("grouped-ops") else "python -m grouped_ops"


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not raise again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
