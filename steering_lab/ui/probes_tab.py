"""Probes tab: train a logistic-regression probe with a layer sweep and save it to the library."""

from __future__ import annotations

import gradio as gr

from ..datasets import load_preset, load_user
from ..errors import check
from ..probes import POOLINGS, instruction_splits, train_probe
from .charts import probe_sweep_figure
from .context import MODEL_QUEUE, AppContext, gpu, user_errors
from .library import validate_name


def build(ctx: AppContext, steer: dict) -> dict:
    gr.Markdown("Probes read pooled block outputs of a text and give P(positive class). Trained probes appear in "
                "the Steer tab's live monitors. Texts are classified as user prompts (chat template applied).")
    with gr.Row():
        preset = gr.Dropdown(["harmful", "(upload)"], value="harmful", label="Data",
                             info="harmful: harmful vs harmless instructions, with the bundled train/val/test split")
        pos_file = gr.File(label="Upload: .jsonl/.csv with both classes, or positive .txt", type="filepath")
        neg_file = gr.File(label="Negative .txt (with a positive .txt)", type="filepath")
    with gr.Row():
        pooling = gr.Radio(list(POOLINGS), value="last", label="Pooling")
        name = gr.Textbox(label="Save as", value="my_probe")
        run = gr.Button("Train probe", variant="primary")
    summary = gr.JSON(label="Result")
    chart = gr.Plot(label="Layer sweep")

    @gpu
    @user_errors
    def on_train(data, pf, nf, pool, nm, progress=gr.Progress(track_tqdm=True)):
        nm = validate_name(nm)
        target = ctx.probes.target(nm)
        if data == "harmful":
            contrast, splits = load_preset("harmful"), instruction_splits()
        else:
            check(pf is not None, "upload a data file")
            contrast, splits = load_user(pf, nf), None
        probe, rows = train_probe(ctx.lm, contrast, pooling=pool, splits=splits, progress=True)
        probe.save(target)
        m = probe.metrics
        result = {"name": nm, "layer": probe.layer, "pooling": pool, "test_auroc": m["test_auroc"],
                  "test_accuracy": m["test_accuracy"], "selection_is_test": m["selection_is_test"]}
        fig = probe_sweep_figure([r.__dict__ for r in rows], probe.layer)
        return result, fig, gr.update(choices=ctx.compatible(ctx.probes))

    run.click(on_train, [preset, pos_file, neg_file, pooling, name], [summary, chart, steer["probes"]],
              concurrency_id=MODEL_QUEUE, concurrency_limit=1, api_visibility="private")
    return {}
