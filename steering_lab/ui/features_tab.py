"""Features tab: an SAE's features as a searchable table (label, top tokens, frequency), what a
prompt lights up, a feature strip (the prompt's tokens coloured by one feature's activation),
"steer with this feature" (saves the decoder row as a library vector and selects it in the Steer
tab), and a feature clamp (set a feature's activation, the SAE's error term kept) side by side
with the unclamped answer.

The table comes from the SAE's ``features.json`` (no sae-lens import until an SAE is needed);
loaded SAEs are kept per app in a small read-only cache, like the model.
"""

from __future__ import annotations

import functools
import html
import threading
from typing import Any

import gradio as gr

from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors
from .render import token_strip

TABLE_HEADERS = ["feature", "label", "freq", "max act", "top tokens"]
PROMPT_HEADERS = ["feature", "label", "max act", "at token", "tokens on"]
MAX_ROWS = 300


class SAECache:
    """SAEs loaded for this app (shared read-only, like the model)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._saes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, spec: str):
        from ..sae import load_sae

        check(bool(spec and str(spec).strip()), "choose an SAE")
        spec = str(spec).strip()
        with self._lock:
            if spec not in self._saes:
                self._saes[spec] = load_sae(spec, self.ctx.lm)
            return self._saes[spec]


def compatible_saes(ctx: AppContext) -> list[str]:
    """Shipped and user SAEs whose config fits the loaded model (width and layer), read from cfg.json."""
    import json

    from ..sae import find_sae, hook_to_layer, sae_names

    out = []
    for name in sae_names():
        try:
            cfg = json.loads((find_sae(name) / "cfg.json").read_text())
            hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name", "")
            if int(cfg["d_in"]) == ctx.lm.d_model and hook_to_layer(hook) < ctx.lm.n_layers:
                out.append(name)
        except Exception:  # noqa: BLE001 - a broken or foreign SAE is simply not offered
            continue
    return out


def feature_rows(index: dict, query: str = "", limit: int = MAX_ROWS) -> list[list]:
    """Table rows of the features whose id, label or top tokens contain ``query`` (case-insensitive),
    most frequent first."""
    q = (query or "").strip().lower()
    rows = []
    for fid, info in (index or {}).get("features", {}).items():
        tokens = info.get("top_tokens", [])
        hay = " ".join([fid, info.get("label", ""), *tokens]).lower()
        if q and q not in hay and q != fid:
            continue
        rows.append([int(fid), info.get("label", ""), info.get("freq", 0.0), info.get("max_act", 0.0),
                     " · ".join(repr(t)[1:-1] for t in tokens[:6])])
    rows.sort(key=lambda r: -r[2])
    return rows[:limit]


def feature_details(index: dict, feature: int) -> str:
    """Markdown: a feature's label, numbers and top contexts (the activating token in bold)."""
    info = (index or {}).get("features", {}).get(str(int(feature)))
    if not info:
        return f"feature {int(feature)} never fired on the index text (or the SAE has no features.json)"
    lines = [f"**feature {int(feature)}**: {html.escape(info.get('label', ''))} · fires on "
             f"{100 * info.get('freq', 0):.2f}% of tokens · max activation {info.get('max_act', 0):.2f}", ""]
    for c in info.get("contexts", []):
        text = html.escape(c["text"]).replace("[[", "<b><u>").replace("]]", "</u></b>").replace("\n", "↵")
        lines.append(f"- `{c['act']:.2f}` {text}")
    return "\n".join(lines)


def save_feature_vector(ctx: AppContext, sae, feature: int, name: str, normalize: bool = True) -> str:
    """Save feature ``feature``'s decoder row into the user's vector library; returns the name."""
    from ..sae import feature_vector

    feature = int(feature)
    name = (name or "").strip() or f"sae-{sae.name}-f{feature}"
    vec = feature_vector(sae, feature, normalize=normalize, lm=ctx.lm)
    existing = ctx.vectors.names()
    if name in existing and ctx.vectors.is_user(name):
        return ctx.vectors.save(vec, name, overwrite=True)
    return ctx.vectors.save(vec, name)


def clamp_compare(ctx: AppContext, sae, prompt: str, feature: int, value: float, max_new_tokens: int = 48,
                  only_active: bool = False) -> tuple[str, str]:
    """Greedy answers without and with feature ``feature`` clamped to ``value`` (one batch of two)."""
    from ..generate import generate
    from ..sae import feature_clamp

    check(bool(prompt and prompt.strip()), "prompt is empty")
    clamp = feature_clamp(sae, int(feature), float(value), only_active=only_active, rows=[False, True])
    texts = generate(ctx.lm, [prompt, prompt], clamp, max_new_tokens=int(max_new_tokens))
    return texts[0], texts[1]


@functools.lru_cache(maxsize=8)
def _decoder(folder: str, mtime: float):
    from ..sae import read_decoder

    return read_decoder(folder)


def vector_features_markdown(ctx: AppContext, name: str, k: int = 8) -> str:
    """Library tab: the SAE features a library vector loads on (top-``k`` |cosine| with decoder
    rows), for each SAE that fits the model and reads a layer the vector has."""
    from ..sae import find_sae, top_cosines

    if not name:
        return ""
    vec = ctx.vectors.get(name)
    parts = []
    for sae_name in compatible_saes(ctx):
        folder = find_sae(sae_name)
        layer, W, index = _decoder(str(folder), (folder / "sae_weights.safetensors").stat().st_mtime)
        if layer not in vec.directions or vec.d_model != W.shape[1]:
            continue
        feats = index.get("features", {})
        top = top_cosines(W, layer, vec, k, lambda i, feats=feats: feats.get(str(i), {}).get("label", ""))
        parts.append(f"**SAE features `{name}` loads on** ({sae_name}, layer {layer}; cosine with decoder rows):\n\n"
                     "| feature | cosine | label |\n|---|---|---|\n"
                     + "\n".join(f"| {t['feature']} | {t['cosine']:+.3f} | {_cell(t['label'])} |" for t in top))
    return "\n\n".join(parts)


def build(ctx: AppContext, steer: dict) -> dict:
    """Create the tab's components; ``steer["vectors"]`` is the Steer tab's vector picker."""
    from ..sae import read_index

    cache = SAECache(ctx)
    names = compatible_saes(ctx)
    first = names[0] if names else None
    index0 = read_index(first) if first else {}
    if not names:
        gr.Markdown(f"No shipped SAE fits `{ctx.lm.name}` (d_model {ctx.lm.d_model}). Load one in sae-lens format "
                    "from a folder, or a hub release as `RELEASE:SAE_ID`.")
    with gr.Row():
        pick = gr.Dropdown(names, value=first, allow_custom_value=True, label="SAE (a shipped name, a folder in "
                           "sae-lens format, or RELEASE:SAE_ID from the hub)", elem_id="sae-pick", scale=3)
        load_btn = gr.Button("Load", scale=1)
    summary = gr.Markdown(_summary(index0))
    index_state = gr.State(index0)
    with gr.Row():
        with gr.Column(scale=3):
            search = gr.Textbox(label="Search features (label, token or number)", elem_id="feature-search")
            table = gr.Dataframe(value=feature_rows(index0), headers=TABLE_HEADERS, interactive=False, wrap=True,
                                 max_height=420, elem_id="feature-table")
        with gr.Column(scale=2):
            feature = gr.Number(value=int(feature_rows(index0)[0][0]) if index0.get("features") else 0, precision=0,
                                minimum=0, label="Feature", elem_id="feature-id")
            details = gr.Markdown(elem_id="feature-details")
            vec_name = gr.Textbox(label="Save as vector (empty: sae-NAME-fN)")
            steer_btn = gr.Button("Steer with this feature", variant="primary", elem_id="steer-with-feature")
            steer_msg = gr.Markdown()
    gr.Markdown("### What a prompt lights up")
    with gr.Row():
        prompt = gr.Textbox(label="Text", value="The weather today is sunny and warm, perfect for the beach.", lines=2,
                            scale=3, elem_id="feature-prompt")
        go_btn = gr.Button("Find features", scale=1)
    with gr.Row():
        prompt_table = gr.Dataframe(headers=PROMPT_HEADERS, interactive=False, wrap=True, elem_id="prompt-features")
        strip = gr.HTML(elem_id="feature-strip")
    with gr.Accordion("Clamp this feature while generating (error term kept)", open=False):
        with gr.Row():
            clamp_value = gr.Number(value=0.0, label="Set the feature's activation to (0 = ablate)")
            only_active = gr.Checkbox(value=False, label="only where it fires")
            clamp_tokens = gr.Slider(8, 128, value=48, step=8, label="Max new tokens")
            clamp_btn = gr.Button("Generate")
        with gr.Row():
            clamp_base = gr.Textbox(label="Unclamped", lines=6, interactive=False)
            clamp_out = gr.Textbox(label="Clamped", lines=6, interactive=False)

    @user_errors
    def on_load(spec):
        sae = cache.get(spec)
        index = sae.index
        rows = feature_rows(index)
        return index, _summary(index, sae), rows, gr.update(maximum=sae.d_sae - 1)

    load_btn.click(on_load, pick, [index_state, summary, table, feature], concurrency_id=MODEL_QUEUE,
                   api_visibility="private")
    pick.change(on_load, pick, [index_state, summary, table, feature], concurrency_id=MODEL_QUEUE,
                api_visibility="private")
    search.change(lambda index, q: feature_rows(index, q), [index_state, search], table, queue=False,
                  api_visibility="private")

    def on_row(index, evt: gr.SelectData):
        row = getattr(evt, "row_value", None)
        fid = int(row[0]) if row else int(feature_rows(index)[evt.index[0]][0])
        return fid

    table.select(on_row, index_state, feature, queue=False, api_visibility="private")
    def on_prompt_row(evt: gr.SelectData):
        row = getattr(evt, "row_value", None)
        return int(row[0]) if row else gr.update()

    prompt_table.select(on_prompt_row, None, feature, queue=False, api_visibility="private")
    feature.change(lambda index, f: feature_details(index, int(f or 0)), [index_state, feature], details, queue=False,
                   api_visibility="private")

    @gpu
    @user_errors
    def on_steer(spec, f, name):
        sae = cache.get(spec)
        saved = save_feature_vector(ctx, sae, int(f), name)
        choices = ctx.compatible_vectors()
        return (f"saved **{saved}** (layer {sae.layer}, unit norm); it is selected in the Steer tab",
                gr.update(choices=choices, value=[saved]))

    steer_btn.click(on_steer, [pick, feature, vec_name], [steer_msg, steer["vectors"]], concurrency_id=MODEL_QUEUE,
                    api_visibility="private")

    @gpu
    @user_errors
    def on_prompt(spec, text, f):
        from ..sae import feature_strip, top_features

        sae = cache.get(spec)
        top = top_features(ctx.lm, sae, text, k=15)
        rows = [[t["feature"], t["label"], t["max_act"], repr(t["token"])[1:-1], t["n_tokens"]] for t in top]
        shown = int(f) if f is not None else (top[0]["feature"] if top else 0)
        tokens, values = feature_strip(ctx.lm, sae, text, shown)
        return rows, token_strip(tokens, values, label=f"feature {shown} ({sae.label(shown) or 'unlabelled'})")

    go_btn.click(on_prompt, [pick, prompt, feature], [prompt_table, strip], concurrency_id=MODEL_QUEUE,
                 api_visibility="private")
    prompt.submit(on_prompt, [pick, prompt, feature], [prompt_table, strip], concurrency_id=MODEL_QUEUE,
                  api_visibility="private")

    @gpu
    @user_errors
    def on_clamp(spec, text, f, value, active, n):
        return clamp_compare(ctx, cache.get(spec), text, int(f), float(value), int(n), bool(active))

    clamp_btn.click(on_clamp, [pick, prompt, feature, clamp_value, only_active, clamp_tokens], [clamp_base, clamp_out],
                    concurrency_id=MODEL_QUEUE, concurrency_limit=1, api_visibility="private")
    return {"sae": pick, "feature": feature}


def _summary(index: dict, sae=None) -> str:
    if not index and sae is None:
        return ""
    parts = []
    if sae is not None:
        parts.append(f"**{html.escape(sae.name)}** · layer {sae.layer} (`{sae.hook_name}`) · {sae.d_sae} features")
    if index:
        parts.append(f"index: {index.get('n_tokens', 0)} tokens · L0 {index.get('l0', '?')} · "
                     f"dead {100 * float(index.get('dead_fraction', 0)):.1f}% · "
                     f"{len(index.get('features', {}))} live features")
    return " · ".join(parts)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")
