"""Library tab: every vector with its metadata; download, upload (safetensors only, validated
against the model) and delete (user vectors, with confirmation). Probes and controllers below."""

from __future__ import annotations

import json

import gradio as gr

from ..errors import check
from .context import AppContext, user_errors

HEADERS = ["name", "source", "layer", "strength", "method", "description", "measured effect"]


def vector_files(ctx: AppContext, name: str) -> list[str]:
    base = ctx.vectors.path(name)
    files = [str(base.with_suffix(".safetensors"))]
    for suffix in (".json", ".gguf"):
        if base.with_suffix(suffix).is_file():
            files.append(str(base.with_suffix(suffix)))
    return files


def other_table(library) -> list[list]:
    rows = []
    for name in library.names():
        meta_path = library.path(name).with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        metrics = meta.get("metrics", {})
        summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()
                   if not isinstance(v, (list, dict))}
        rows.append([name, "user" if library.is_user(name) else "shipped", meta.get("layer", meta.get("steer_layers")),
                     meta.get("description", meta.get("kind", "")), json.dumps(summary)])
    return rows


def build(ctx: AppContext, steer: dict, sweep: dict) -> dict:
    table = gr.Dataframe(value=ctx.vectors.table(), headers=HEADERS, label="Vectors", interactive=False,
                         wrap=True, elem_id="library-table")
    refresh = gr.Button("Refresh")
    with gr.Row():
        with gr.Column():
            pick = gr.Dropdown(ctx.vectors.names(), label="Vector")
            details = gr.JSON(label="Metadata")
            download = gr.File(label="Download", file_count="multiple", interactive=False)
        with gr.Column():
            up_st = gr.File(label="Upload a vector: .safetensors (direction.k tensors)", file_types=[".safetensors"],
                            type="filepath")
            up_js = gr.File(label="Its .json metadata (optional)", file_types=[".json"], type="filepath")
            up_name = gr.Textbox(label="Save as")
            upload = gr.Button("Upload and validate")
            up_msg = gr.Markdown()
        with gr.Column():
            del_pick = gr.Dropdown([n for n in ctx.vectors.names() if ctx.vectors.is_user(n)],
                                   label="Delete a saved vector")
            confirm = gr.Checkbox(label="Yes, delete its files", value=False)
            delete = gr.Button("Delete", variant="stop")
            del_msg = gr.Markdown()
    gr.Markdown("### Probes")
    gr.Dataframe(value=other_table(ctx.probes), headers=["name", "source", "layer", "description", "metrics"],
                 interactive=False, wrap=True)
    gr.Markdown("### Controllers")
    gr.Dataframe(value=other_table(ctx.controllers), headers=["name", "source", "layers", "kind", "metrics"],
                 interactive=False, wrap=True)

    def refreshed():
        names = ctx.vectors.names()
        return (ctx.vectors.table(), gr.update(choices=names), gr.update(choices=[n for n in names
                                                                                   if ctx.vectors.is_user(n)]),
                gr.update(choices=ctx.compatible_vectors()), gr.update(choices=ctx.compatible_vectors()))

    outs = [table, pick, del_pick, steer["vectors"], sweep["vector"]]
    refresh.click(refreshed, None, outs, queue=False, api_visibility="private")

    @user_errors
    def on_pick(name):
        if not name:
            return None, None
        return ctx.vectors.get(name).metadata(), vector_files(ctx, name)

    pick.change(on_pick, pick, [details, download], queue=False, api_visibility="private")

    @user_errors
    def on_upload(st, js, name):
        check(st is not None, "choose a .safetensors file")
        saved = ctx.vectors.import_files(st, js, name, ctx.lm)
        return (f"saved **{saved}**: it matches {ctx.lm.name} (d_model {ctx.lm.d_model}, {ctx.lm.n_layers} layers)",
                *refreshed())

    upload.click(on_upload, [up_st, up_js, up_name], [up_msg, *outs], api_visibility="private")

    @user_errors
    def on_delete(name, sure):
        check(bool(name), "choose a vector")
        check(bool(sure), "tick the confirmation box first")
        ctx.vectors.delete(name)
        return f"deleted **{name}**", gr.update(value=False), *refreshed()

    delete.click(on_delete, [del_pick, confirm], [del_msg, confirm, *outs], api_visibility="private")
    return {"outputs": outs, "refreshed": refreshed}  # app.py refreshes these on page load (per-visitor lists)
