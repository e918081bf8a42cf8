"""Library tab: every vector with its metadata; download (safetensors + json, or a llama.cpp / repeng
GGUF), upload (safetensors or GGUF, validated against the model) and delete (user vectors, with
confirmation). Probes and controllers below."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from ..errors import check
from ..export import export_gguf, load_gguf
from . import features_tab
from .context import AppContext, user_errors

HEADERS = ["name", "source", "layer", "strength", "method", "description", "measured effect", "effect measure",
           "how layer/strength were chosen"]


FORMATS = ["safetensors + json", "GGUF (llama.cpp, repeng)"]
GGUF_LAYERS = ["recommended layer", "all layers (except 0)"]
DOWNLOAD_TTL_S = 6 * 3600  # gradio links straight to these files (no copy): keep them as long as its cache


def download_dir() -> Path:
    """A fresh folder for one download, inside gradio's upload folder (gradio serves files only from
    there, the working directory and the temp dir; a visitor's saved vectors live elsewhere). Folders
    older than DOWNLOAD_TTL_S are removed first."""
    try:
        from gradio.utils import get_upload_folder

        root = Path(get_upload_folder()) / "steering_lab-downloads"
    except ImportError:  # pragma: no cover - older gradio
        root = Path(tempfile.gettempdir()) / "gradio" / "steering_lab-downloads"
    root.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - DOWNLOAD_TTL_S
    for old in root.iterdir():
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="dl-", dir=root))


def download_files(ctx: AppContext, name: str, fmt: str = FORMATS[0], layers: str = GGUF_LAYERS[0],
                   scale: float | None = None) -> list[str]:
    """Files to download for vector ``name``, written to a fresh folder that gradio serves: a copy of
    its ``.safetensors`` + ``.json``, or a GGUF control vector (the recommended layer or all layers
    >= 1; ``scale`` bakes a strength in)."""
    base = ctx.vectors.path(name)
    out = download_dir()
    if fmt == FORMATS[0]:
        files = []
        for suffix in (".safetensors", ".json"):
            if base.with_suffix(suffix).is_file():
                shutil.copyfile(base.with_suffix(suffix), out / f"{base.name}{suffix}")
                files.append(str(out / f"{base.name}{suffix}"))
        return files
    check(fmt == FORMATS[1], f"unknown download format {fmt!r}")
    vec = ctx.vectors.get(name)
    stem = base.name
    if layers == GGUF_LAYERS[0] and vec.recommended_layer is not None and vec.recommended_layer in vec.directions:
        vec = vec.at(vec.recommended_layer)
        stem += f"-L{vec.recommended_layer}"
    if scale is not None:
        stem += f"-x{float(scale):g}"
    model_hint = getattr(getattr(ctx.lm.model, "config", None), "model_type", None) \
        if vec.d_model == ctx.lm.d_model else None
    return [str(export_gguf(vec, out / f"{stem}.gguf", scale=scale, model_hint=model_hint))]


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
            pick = gr.Dropdown(ctx.vectors.names(), label="Vector", elem_id="library-pick")
            details = gr.JSON(label="Metadata")
            sae_features = gr.Markdown(elem_id="library-sae-features")  # which SAE features it loads on
            dl_format = gr.Radio(FORMATS, value=FORMATS[0], label="Download as", elem_id="library-format")
            dl_layers = gr.Radio(GGUF_LAYERS, value=GGUF_LAYERS[0], label="GGUF: layers",
                                 info="llama.cpp adds every direction in the file; the app steers at the "
                                      "recommended layer")
            dl_scale = gr.Number(value=0, label="GGUF: bake in a strength (0: none; then give it at load time "
                                                "with llama.cpp's --control-vector-scaled FILE:S)",
                                 elem_id="library-scale")
            download = gr.File(label="Download", file_count="multiple", interactive=False,
                               elem_id="library-download")
        with gr.Column():
            up_st = gr.File(label="Upload a vector: .safetensors (direction.k tensors) or a llama.cpp / repeng "
                                  "control-vector .gguf", file_types=[".safetensors", ".gguf"], type="filepath",
                            elem_id="library-upload")
            up_js = gr.File(label="Its .json metadata (optional; a .gguf carries its own)", file_types=[".json"],
                            type="filepath")
            up_name = gr.Textbox(label="Save as (empty: the file's name)", elem_id="library-save-as")
            upload = gr.Button("Upload and validate", elem_id="library-upload-button")
            up_msg = gr.Markdown(elem_id="library-upload-message")
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
    def on_pick(name, fmt, layers, scale):
        if not name:
            return None, None
        return ctx.vectors.get(name).metadata(), download_files(ctx, name, fmt, layers, float(scale) if scale else None)

    # (no blur event: it would re-render the links under the click that caused it, losing the download)
    for trigger in (pick.change, dl_format.change, dl_layers.change, dl_scale.input):
        trigger(on_pick, [pick, dl_format, dl_layers, dl_scale], [details, download], queue=False,
                api_visibility="private")
    pick.change(user_errors(lambda name: features_tab.vector_features_markdown(ctx, name)), pick, sae_features,
                queue=False, api_visibility="private")

    @user_errors
    def on_upload(st, js, name):
        check(st is not None, "choose a .safetensors or .gguf file")
        name = (name or "").strip() or Path(st).stem
        if Path(st).suffix.lower() == ".gguf":
            ctx.vectors.target(name)  # name free, room left: before reading anything
            limit = ctx.vectors.visitors.limits.max_upload
            size = Path(st).stat().st_size
            check(size <= limit, f"the uploaded GGUF is {size / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB")
            vec = load_gguf(st, label=f"uploaded vector {name!r}")
            vec.check_model(ctx.lm)
            saved = ctx.vectors.save(vec, name)
        else:
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
