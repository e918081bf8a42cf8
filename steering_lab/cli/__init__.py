"""Command line: ``steering-lab <command> ...`` (also ``python -m steering_lab``).

Other tools script against these spellings; keep them stable. Bad flags: argparse's usage line and
one error line, exit code 2. Bad input found later (a missing file, a layer out of range): one line
on stderr, exit code 2, never a traceback. ``--help`` and parsing import nothing heavy.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
