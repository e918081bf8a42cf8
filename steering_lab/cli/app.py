"""``steering-lab app``: start the web app (the same launcher as ``python app.py``)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="start the web app",
                       description="Start the Gradio web app. Flags not listed here (e.g. --mcp, --api-key KEY, "
                                   "--no-openai) are passed on to the app's launcher; see `python app.py --help`.")
    p.add_argument("--model", default=None,
                   help="HF id, local dir or .gguf (default: $STEERING_LAB_MODEL, else the embedded SmolLM2)")
    p.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT, else 7860")
    p.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME, else 127.0.0.1")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.set_defaults(run=run, passthrough=True)


def launcher_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The argv for ``steering_lab.ui.app.main``: the flags given here, then the passed-on ones."""
    argv: list[str] = []
    for flag, value in (("--model", args.model), ("--port", args.port), ("--host", args.host)):
        if value is not None:
            argv += [flag, str(value)]
    if args.share:
        argv.append("--share")
    return argv + list(extra)


def run(args: argparse.Namespace, extra: list[str] = ()) -> int:
    from ..ui.app import main as app_main

    app_main(launcher_argv(args, list(extra)))
    return 0
