"""Extract tab: a preset or uploaded contrast set -> layer scan chart -> a vector saved in the library."""

from __future__ import annotations

import gradio as gr

from ..datasets import PRESETS, load_preset, load_user
from ..errors import check
from ..extract import METHODS, extract
from .charts import layer_scan_figure
from .context import MODEL_QUEUE, AppContext, gpu, user_errors
from .library import validate_name

POSITIONS = ["auto", "last", "mean", "max", "response_mean"]


def run_extract(ctx: AppContext, source: str, preset: str | None, pos_file: str | None, neg_file: str | None,
                method: str, layers: str, position: str, name: str) -> tuple[dict, object]:
    """Extract and save; returns (summary dict, layer-scan figure). Shared by the tab and /extract."""
    name = validate_name(name)
    ctx.vectors.target(name)  # fail on a taken name before the long part
    check(method in METHODS, f"unknown method {method!r}")
    if source == "preset":
        check(bool(preset), "choose a preset")
        contrast = load_preset(preset)
    else:
        check(pos_file is not None, "upload a contrast set: a .jsonl/.csv with both classes, or two text files")
        contrast = load_user(pos_file, neg_file, name=name)
    vec, scan = extract(ctx.lm, contrast, method, layers=(layers or "").strip() or None,
                        position=None if position in (None, "", "auto") else position, progress=True)
    saved = ctx.vectors.save(vec, name)
    summary = {"name": saved, "method": method, "dataset": contrast.name,
               "recommended_layer": vec.recommended_layer, "recommended_strength": vec.recommended_strength,
               "heldout_auroc_at_layer": scan.row(vec.recommended_layer).auroc, "layers": vec.layers}
    fig = layer_scan_figure(scan.to_dict()["rows"], scan.recommended_layer,
                            title=f"Layer scan: {contrast.name} ({method})")
    return summary, fig


def build(ctx: AppContext, steer: dict) -> dict:
    with gr.Row():
        source = gr.Radio(["preset", "upload"], value="preset", label="Contrast set")
        preset = gr.Dropdown(sorted(PRESETS), value="sentiment", label="Preset")
        method = gr.Dropdown(list(METHODS), value="mean_diff", label="Method")
    with gr.Row():
        pos_file = gr.File(label="Positive examples (.txt, one per line) — or a .jsonl/.csv with both classes",
                           file_types=[".txt", ".jsonl", ".csv", ".json"], type="filepath")
        neg_file = gr.File(label="Negative examples (.txt, one per line; not needed for .jsonl/.csv)",
                           file_types=[".txt"], type="filepath")
    with gr.Row():
        layers = gr.Textbox(label="Layers (e.g. 4-12; empty = all)", value="")
        position = gr.Dropdown(POSITIONS, value="auto", label="Position",
                               info="auto: response mean for prompt+response sets, else last prompt token")
        name = gr.Textbox(label="Save as", value="my_vector", elem_id="extract-name")
    run = gr.Button("Extract", variant="primary")
    summary = gr.JSON(label="Result")
    chart = gr.Plot(label="Layer scan")

    @gpu
    @user_errors
    def on_extract(src, pre, pf, nf, meth, lay, posn, nm, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="collecting activations")
        result, fig = run_extract(ctx, src, pre, pf, nf, meth, lay, posn, nm)
        return result, fig, gr.update(choices=ctx.compatible_vectors())

    run.click(on_extract, [source, preset, pos_file, neg_file, method, layers, position, name],
              [summary, chart, steer["vectors"]], concurrency_id=MODEL_QUEUE, concurrency_limit=1,
              api_visibility="private")
    return {}
