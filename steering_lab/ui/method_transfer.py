"""Transfer (Command-V, Wang et al. 2025, arXiv:2506.19140): bring a vector made on another model (the donor) to
the app's model (the recipient). Both models read the same profiling prompts, one linear converter per layer pair
is fitted, and the donor vector is carried through it and saved to the visitor's library.

The donor loads through the normal ``load_model`` path (an HF id needs the hub; offline it fails with the
library's message). Loaded donors are kept per app in a one-model read-only cache, like the app's model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors

TITLE = "Transfer (Command-V)"
WHERE = "extract"
PROMPT_CHOICES = ("all", "neutral", "harmless", "harmful", "persona", "refusals")
LAYER_CHOICES = ("recommended layer", "all layers of the vector")


class DonorCache:
    """The last donor model loaded by this app (read-only, shared like the app's model)."""

    def __init__(self) -> None:
        self._spec: str | None = None
        self._lm = None
        self._lock = threading.Lock()

    def get(self, spec: str):
        from ..model import load_model

        spec = (spec or "").strip()
        with self._lock:
            if self._lm is None or self._spec != spec:
                self._lm = None  # drop the old one before loading the next
                self._lm = load_model(spec or None)
                self._spec = spec
            return self._lm


def pick_vector(ctx: AppContext, name: str | None, upload: str | None = None, upload_json: str | None = None):
    """The donor vector: an uploaded ``.safetensors`` (+ optional json) if given, else the library vector ``name``."""
    from ..vector import SteeringVector

    if upload:
        src = Path(upload)
        check(src.suffix.lower() == ".safetensors", "upload a .safetensors vector (pickled formats are never loaded)")
        limit = ctx.vectors.visitors.limits.max_upload
        check(src.is_file() and src.stat().st_size <= limit, f"the uploaded vector is missing or over "
                                                             f"{limit / 2**20:.0f} MiB")
        return SteeringVector.load_files(src, upload_json or None, label="the uploaded vector")
    check(bool(name), "choose a library vector or upload one")
    return ctx.vectors.get(name)


def transfer_into_library(ctx: AppContext, donor, vector, *, prompts: str = "all", max_prompts: int = 1200,
                          ridge: float = 0.0, layers: str = LAYER_CHOICES[0], name: str = "",
                          on_step: Any = None) -> tuple[str, str]:
    """Fit converters from ``donor`` (a LoadedModel) to the app's model on the profiling ``prompts`` at the vector's
    layers, carry ``vector`` across, save it in the visitor's library; returns ``(saved name, summary markdown)``."""
    from ..directions import transfer as tr

    recipient = ctx.lm
    vector.check_model(donor)
    wanted = vector.default_layers() if layers == LAYER_CHOICES[0] else vector.layers
    name = (name or "").strip() or f"{(vector.dataset or vector.method or 'vector')[:40]}-transferred"
    ctx.vectors.target(name)  # name free, room left: before the long job
    texts = tr.load_profile_texts(prompts)
    rows = tr.profile_prompts(texts)
    if max_prompts and len(rows) > int(max_prompts):
        step = len(rows) / int(max_prompts)
        rows = [rows[int(i * step)] for i in range(int(max_prompts))]
    conv = tr.fit_converter(donor, recipient, rows, wanted, ridge=float(ridge or 0.0), on_step=on_step,
                            prompts_name=f"{prompts} ({len(rows)} prompts)")
    out = tr.transfer_vector(vector, conv, check_model=False, converter_name=f"app: {donor.name} -> {recipient.name}")
    saved = ctx.vectors.save(out, name)
    lines = [f"saved **{saved}** for `{recipient.name}`: layers {out.layers}, recommended layer "
             f"{out.recommended_layer}, strength {out.recommended_strength}", "",
             "| donor layer | recipient layer | fit error (held-out) | norm ratio |", "|---:|---:|---:|---:|"]
    info = out.extra["transfer"]
    for k, r in info["layer_map"].items():
        err = conv.fit_error[int(k)]
        lines.append(f"| {k} | {r} | {err.get('holdout', err['train']):.4f} | {info['norm_ratio'][str(r)]:.3f} |")
    if vector.model and vector.model != donor.name:
        lines.append(f"\nnote: the vector says it was made on `{vector.model}`, the donor is `{donor.name}`")
    return saved, "\n".join(lines)


def build(ctx: AppContext, steer: dict) -> dict:
    cache = DonorCache()
    gr.Markdown("Bring a vector made on **another model** (the donor) to this app's model: both read the same "
                "profiling prompts, a linear converter is fitted per layer pair (least squares), and the vector is "
                "carried across (Command-V, Wang et al. 2025, arXiv:2506.19140).")
    with gr.Row():
        donor = gr.Textbox(label="Donor model (HF id or local folder; empty: the embedded SmolLM2)", scale=2,
                           elem_id="transfer-donor")
        pick = gr.Dropdown(ctx.vectors.names(), label="Donor vector from the library", scale=2,
                           elem_id="transfer-vector")
    with gr.Row():
        up_st = gr.File(label="...or upload a donor vector (.safetensors)", file_types=[".safetensors"],
                        type="filepath")
        up_js = gr.File(label="its .json (optional)", file_types=[".json"], type="filepath")
    with gr.Row():
        prompts = gr.Dropdown(list(PROMPT_CHOICES), value="all", label="Profiling prompts (bundled texts, cut "
                              "into prefixes)")
        max_prompts = gr.Slider(100, 3000, value=1200, step=50, label="Max prompts (more than the donor's width "
                                "for least squares)")
        ridge = gr.Number(value=0.0, label="Ridge (0: least squares)")
        layers = gr.Radio(list(LAYER_CHOICES), value=LAYER_CHOICES[0], label="Layers")
    with gr.Row():
        name = gr.Textbox(label="Save as (empty: DATASET-transferred)", scale=3)
        go = gr.Button("Fit and transfer", variant="primary", scale=1, elem_id="transfer-go")
    msg = gr.Markdown(elem_id="transfer-message")

    @gpu
    @user_errors
    def on_go(spec, vname, st, js, pset, n, rg, lay, nm, progress=gr.Progress()):
        progress(0, desc="loading the donor")
        vec = pick_vector(ctx, vname, st, js)
        donor_lm = cache.get(spec)

        def on_step(i, total, what):
            progress(i / total, desc=what)

        saved, text = transfer_into_library(ctx, donor_lm, vec, prompts=pset, max_prompts=int(n), ridge=float(rg or 0),
                                            layers=lay, name=nm, on_step=on_step)
        return text, gr.update(choices=ctx.compatible_vectors(), value=[saved])

    go.click(on_go, [donor, pick, up_st, up_js, prompts, max_prompts, ridge, layers, name], [msg, steer["vectors"]],
             concurrency_id=MODEL_QUEUE, api_visibility="private")
    return {"donor": donor, "vector": pick}
