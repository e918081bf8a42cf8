"""Attribution patching (AtP / AtP*, Kramár et al. 2024, arXiv 2403.00745): for a preset or uploaded
clean/corrupt pairs, estimate how much each layer (residual stream at the last token) and each attention
head carries the contrast, as a layers x heads heat map and a per-layer bar, and suggest layers to extract
a direction at. Callbacks only call ``steering_lab.measure.attribution``.

The two figures live here rather than in ``charts.py`` (edited by others at the same time); they can
move there unchanged.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import plotly.graph_objects as go

from ..datasets import PRESETS
from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors

TITLE = "Attribution patching"
WHERE = "extract"
SOURCES = ("preset", "upload pairs")
METHOD_LABELS = {"AtP* (QK fix + GradDrop, magnitude)": "atp_star", "AtP (signed)": "atp"}
MAX_APP_PAIRS = 16


def heads_figure(result: Any, method: str = "atp_star") -> go.Figure:
    """Heat map of the per-head estimates (layers down, heads across)."""
    z = result.get("heads", method)
    signed = method != "atp_star"
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=list(range(z.shape[1])), y=list(range(z.shape[0])),
                               colorscale="RdBu" if signed else "Viridis", zmid=0 if signed else None,
                               colorbar=dict(title="effect"),
                               hovertemplate="layer %{y} head %{x}<br>%{z:.4f}<extra></extra>"))
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer (decoder block)", autorange="reversed")
    fig.update_layout(title=f"Heads: {method} estimate of patching each head's output (last token)",
                      height=max(360, 16 * z.shape[0] + 120))
    return fig


def layers_figure(result: Any, method: str = "atp_star", suggested: list[int] | None = None) -> go.Figure:
    """Bar chart of the per-layer estimates; suggested layers in red."""
    y = result.get("layers", method).tolist()
    chosen = set(suggested or [])
    fig = go.Figure(go.Bar(x=list(range(len(y))), y=y, marker_color=["#d62728" if k in chosen else "#1f77b4"
                                                                     for k in range(len(y))],
                           hovertemplate="layer %{x}<br>%{y:.4f}<extra></extra>"))
    fig.update_xaxes(title_text="layer (decoder block)", dtick=2)
    fig.update_yaxes(title_text=f"{method} effect on {result.metric}")
    fig.update_layout(title="Layers: patching the residual stream at the last token (suggested in red)", height=360)
    return fig


def run_attribution(ctx: AppContext, source: str, preset: str | None, pairs_file: str | None, n_pairs: int,
                    method: str = "atp_star", graddrop: bool = True, k: int = 3, progress: bool = False
                    ) -> tuple[str, go.Figure, go.Figure, list[int]]:
    """Compute the estimates; returns (markdown summary, heads heat map, layers bar, suggested layers)."""
    from ..measure import attribution as atp

    check(method in ("atp", "atp_qk", "atp_star"), f"unknown method {method!r}")
    n_pairs = int(n_pairs or 1)
    check(1 <= n_pairs <= MAX_APP_PAIRS, f"use 1-{MAX_APP_PAIRS} pairs here (the CLI takes more)")
    if source == "preset":
        check(bool(preset), "choose a preset")
        pairs = atp.preset_pairs(ctx.lm, preset, n_pairs)
    else:
        check(source == "upload pairs", f"unknown source {source!r}")
        check(bool(pairs_file), "upload a .jsonl file: one {\"clean\", \"corrupt\", \"answer\", \"wrong\"} per line")
        pairs = atp.load_pairs_file(ctx.lm, pairs_file)[:n_pairs]
    res = atp.attribute(ctx.lm, pairs, graddrop=bool(graddrop), progress=progress)
    suggested = atp.suggest_layers(res, int(k), method=method)
    onset = atp.suggest_layers(res, 1, method=method, rule="onset")[0]
    heads = atp.top_nodes(res, "heads", 5, method)
    text = "\n".join([
        f"**{res.n_pairs} pairs**, metric `{res.metric}`: clean {res.clean_metric:+.3f}, corrupt "
        f"{res.corrupt_metric:+.3f} ({res.seconds:.1f} s; ranked by `{method}`"
        + ("" if graddrop or method != "atp_star" else ", GradDrop off") + ")", "",
        f"**Suggested layers** (largest |effect| of patching the residual at the last token): "
        f"**{', '.join(map(str, suggested))}**; the contrast reaches the last token (half the largest effect) "
        f"at layer **{onset}**", "",
        "Top heads: " + ", ".join(f"L{h['layer']}H{h['head']} ({h['effect']:+.3f})" for h in heads), "",
        "Estimates are first-order (AtP) or their GradDrop magnitude (AtP*); `steering-lab attribution --validate` "
        "checks them against exact activation patching.",
    ])
    return text, heads_figure(res, method), layers_figure(res, method, suggested), suggested


def build(ctx: AppContext, steer: dict) -> dict:
    gr.Markdown("**Attribution patching** (AtP; AtP* of Kramár et al. 2024, arXiv:2403.00745) estimates, for every "
                "layer and attention head at once, how much the model's answer changes when that component's "
                "activation is taken from a *corrupt* prompt (the negative text) into the *clean* one (the positive "
                "text): one forward and backward pass per pair instead of one pass per component. Presets ask the "
                "model whether a text is positive or negative (formal or informal, ...); uploaded pairs are jsonl "
                "rows with `clean`, `corrupt`, `answer` and optionally `wrong`.")
    with gr.Row():
        source = gr.Radio(list(SOURCES), value="preset", label="Pairs")
        preset = gr.Dropdown(sorted(PRESETS), value="sentiment", label="Preset")
        pairs_file = gr.File(label="Pairs (.jsonl)", file_types=[".jsonl", ".json"], type="filepath", visible=False)
    with gr.Row():
        n_pairs = gr.Slider(1, MAX_APP_PAIRS, value=4, step=1, label="Pairs used")
        method = gr.Dropdown(list(METHOD_LABELS), value=list(METHOD_LABELS)[0], label="Rank by")
        graddrop = gr.Checkbox(value=True, label="GradDrop (one more backward pass per layer and pair)")
    run = gr.Button("Compute", variant="primary", elem_id="atp-run")
    summary = gr.Markdown(elem_id="atp-summary")
    with gr.Row():
        bar = gr.Plot(label="Layers")
        heat = gr.Plot(label="Heads")
    suggested_state = gr.State([])
    target = steer.get("extract_layers") or steer.get("layer")
    use_btn = gr.Button("Use the top layer", visible=False, elem_id="atp-use-layer")

    source.change(lambda s: (gr.update(visible=s == "preset"), gr.update(visible=s != "preset")), source,
                  [preset, pairs_file], queue=False, api_visibility="private")

    @gpu
    @user_errors
    def on_run(src, pre, f, n, meth, gd, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="attribution patching")
        text, fig_heads, fig_layers, top = run_attribution(ctx, src, pre, f, int(n), METHOD_LABELS.get(meth, meth),
                                                           bool(gd), progress=True)
        return text, fig_layers, fig_heads, top, gr.update(visible=target is not None and bool(top),
                                                           value=f"Use layer {top[0]} in the Extract tab"
                                                           if top else "Use the top layer")

    run.click(on_run, [source, preset, pairs_file, n_pairs, method, graddrop],
              [summary, bar, heat, suggested_state, use_btn], concurrency_id=MODEL_QUEUE, concurrency_limit=1,
              api_visibility="private")
    if target is not None:  # a layer field of the Extract/Steer tab reachable through ``steer``
        use_btn.click(lambda top: str(top[0]) if top else gr.update(), suggested_state, target, queue=False,
                      api_visibility="private")
    return {"summary": summary, "suggested": suggested_state}
