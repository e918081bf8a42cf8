"""Linear-AcT under the Extract tab: fit transport maps from a preset or uploaded contrast set and
save them in the visitor's library; the Steer tab then steers with them (operator ``transport``,
strength = lambda in [0, 1])."""

from __future__ import annotations

import gradio as gr

from ..datasets import PRESETS, load_preset, load_user
from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors
from .library import validate_name

WHERE = "extract"
TITLE = "Linear-AcT"
SOURCES = ("preset", "upload files")


def run_fit(ctx: AppContext, source: str, preset: str | None, pos_file: str | None, neg_file: str | None,
            layers: str, toward: str, support: bool, causal: bool, name: str) -> dict:
    """Fit and save; returns a summary. Shared by the tab and the tests."""
    from ..directions.transport import METHOD, fit_linear_act

    name = validate_name(name)
    ctx.vectors.target(name)  # fail on a taken name before the long part
    if source == "preset":
        check(bool(preset), "choose a preset")
        contrast = load_preset(preset)
    else:
        check(source == "upload files", f"unknown source {source!r}")
        check(pos_file is not None, "upload a contrast set: a .jsonl/.csv with both classes, or two text files")
        contrast = load_user(pos_file, neg_file, name=name)
    vec = fit_linear_act(ctx.lm, contrast, layers=(layers or "").strip() or None, toward=toward,
                         support=bool(support), causal=bool(causal), progress=True)
    saved = ctx.vectors.save(vec, name)
    info = vec.extra[METHOD]
    return {"name": saved, "method": METHOD, "dataset": contrast.name, "transport": f"{info['source']} -> "
            f"{info['target']}", "layers": vec.layers, "support": info["support"], "causal": info["causal"],
            "pooling": info["pooling"], "n_pairs": len(contrast.positive),
            "steer": "Steer tab: pick this vector, operator 'transport', strength = lambda (0..1)",
            "per_layer": info["layers"]}


def build(ctx: AppContext, steer: dict) -> None:
    gr.Markdown("Linear-AcT (Rodriguez et al. 2024, *Controlling Language and Diffusion Models by Transporting "
                "Activations*): for every unit of the residual stream, an affine map that sends the source class's "
                "activations onto the target class's (sorted samples, least squares). Steer with operator "
                "**transport**: strength lambda in [0, 1] interpolates between unsteered (0) and full transport (1).")
    with gr.Row():
        source = gr.Radio(list(SOURCES), value="preset", label="Contrast set")
        preset = gr.Dropdown(sorted(PRESETS), value="sentiment", label="Preset")
        toward = gr.Radio(["positive", "negative"], value="positive", label="Transport toward",
                          info="the other class is the source")
    with gr.Row(visible=False) as upload_box:
        pos_file = gr.File(label="Positive examples (.txt, one per line) — or a .jsonl/.csv with both classes",
                           file_types=[".txt", ".jsonl", ".csv", ".json"], type="filepath")
        neg_file = gr.File(label="Negative examples (.txt; not needed for .jsonl/.csv)", file_types=[".txt"],
                           type="filepath")
    with gr.Row():
        layers = gr.Textbox(label="Layers (e.g. 4-12; empty = all)", value="")
        support = gr.Checkbox(value=True, label="Transport only inside the source's range per unit (support)")
        causal = gr.Checkbox(value=True, label="Causal estimation (layer k fitted after the earlier maps)")
        name = gr.Textbox(label="Save as", value="my_transport", elem_id="transport-name")
    run = gr.Button("Fit transport maps", variant="primary")
    summary = gr.JSON(label="Result")

    source.change(lambda s: gr.update(visible=s == "upload files"), source, upload_box, queue=False,
                  api_visibility="private")

    @gpu
    @user_errors
    def on_fit(src, pre, pf, nf, lay, tw, sup, cau, nm, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="collecting activations")
        result = run_fit(ctx, src, pre, pf, nf, lay, tw, sup, cau, nm)
        return result, gr.update(choices=ctx.compatible_vectors())

    run.click(on_fit, [source, preset, pos_file, neg_file, layers, toward, support, causal, name],
              [summary, steer["vectors"]], concurrency_id=MODEL_QUEUE, concurrency_limit=1, api_visibility="private")
