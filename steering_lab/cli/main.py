"""The ``steering-lab`` parser and entry point. Command groups live in sibling modules, each with
``register(subparsers)`` that sets ``run``; heavy imports happen inside ``run`` only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import UserError
from . import (
    app,
    attribution,
    calibrate,
    common,
    crosslingual,
    export,
    extract,
    function_vectors,
    generate,
    library,
    pplm,
    probes,
    refusal,
    sae,
    sweep,
    transfer,
    transport,
)

GROUPS = (extract, generate, sweep, calibrate, refusal, probes, export, sae, transport, function_vectors, pplm,
          attribution, transfer, crosslingual, library, app)


class _Version(argparse.Action):
    """``--version``: ours and the versions that matter for reproducing a run, read without importing them."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        from .. import __version__

        found = []
        for dist in ("torch", "transformers", "gradio"):
            try:
                found.append(f"{dist} {metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                found.append(f"{dist} missing")
        py = ".".join(map(str, sys.version_info[:3]))
        sys.stdout.write(f"{common.PROG} {__version__} (python {py}, {', '.join(found)})\n")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = common.Parser(prog=common.PROG,
                           description="Activation steering lab for causal language models: extract directions, "
                                       "steer with them, measure what changes, take the vectors elsewhere.",
                           epilog="`steering-lab COMMAND --help` shows a command's flags.")
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=common.Parser)
    for group in GROUPS:
        group.register(sub)
    for child in _leaf_parsers(parser):
        child.set_defaults(command_parser=child)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every (sub-)parser that runs a command, so an error can show that command's usage line."""
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _leaf_parsers(child)
                yield child


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 130 interrupted), also for
    ``--help``/``--version`` and flag errors, so callers in Python get a code rather than SystemExit."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "passthrough", False):
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse has printed help, the version, or the usage line and the error
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("steering_lab").setLevel(logging.INFO)
    try:
        if getattr(args, "passthrough", False):
            return args.run(args, extra)
        if args.command not in ("list",):
            _quiet_libraries()
        return args.run(args)
    except UserError as exc:
        print(f"{common.PROG}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"{common.PROG}: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"{common.PROG}: error: permission denied: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{common.PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `steering-lab list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
