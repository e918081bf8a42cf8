"""Cross-lingual refusal (Wang et al. 2025, arXiv:2505.17306): does the English harmful/refusal
direction, and the English harmful probe, separate harmful from harmless prompts written in French,
German, Spanish, Chinese and Russian? A per-language table and two charts (AUROC per language; the
cosine of each language's own direction with the English one, per layer). The callbacks only call
``steering_lab.measure.crosslingual``."""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..measure.crosslingual import LANGUAGES, OTHER_LANGUAGES, TABLE_HEADERS, CrosslingualReport, separation
from .context import MODEL_QUEUE, AppContext, gpu, user_errors

TITLE = "Cross-lingual refusal"
WHERE = "extract"
NO_PROBE = "(no probe)"


def crosslingual_figure(report: CrosslingualReport) -> go.Figure:
    """Left: AUROC per language (English direction, English probe, the language's own direction);
    right: cosine of each language's own direction with the English reference, per layer."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], subplot_titles=(
        f"harmful vs harmless AUROC (layer {report.layer})", "cos(own direction, English direction) per layer"))
    langs = [r.language for r in report.rows]
    fig.add_trace(go.Bar(x=langs, y=[r.direction_auroc for r in report.rows], name="English direction"), row=1, col=1)
    if report.probe is not None:
        fig.add_trace(go.Bar(x=langs, y=[r.probe_auroc for r in report.rows],
                             name=f"English probe (layer {report.probe_layer})"), row=1, col=1)
    fig.add_trace(go.Bar(x=langs, y=[r.own_auroc for r in report.rows], name="own direction (in-sample)",
                         opacity=0.45), row=1, col=1)
    for lang, curve in report.cosines.items():
        fig.add_trace(go.Scatter(x=report.layers, y=curve, mode="lines+markers", name=f"cos {lang}",
                                 line=dict(dash="dash" if lang == "en" else "solid")), row=1, col=2)
    fig.add_vline(x=report.layer, line_dash="dot", line_color="#d62728", row=1, col=2)
    fig.add_hline(y=0.5, line_dash="dot", line_color="#7f7f7f", row=1, col=1)
    fig.update_yaxes(title_text="AUROC", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="cosine", range=[-0.2, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="layer (decoder block)", row=1, col=2)
    fig.update_layout(title=f"Cross-lingual check: {report.vector} — {report.model}", height=420, barmode="group",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def run_check(lm, vector, probe, languages, limit: int | None = None, *, vector_name: str = "",
              probe_name: str = "", progress: bool = False) -> tuple[list[list], go.Figure, dict]:
    """The separation check as the tab shows it: table rows, figure, summary (``limit`` prompts per side
    and language, and for the English reference direction)."""
    report = separation(lm, vector, probe, languages, limit=limit, reference_limit=limit, progress=progress,
                        vector_name=vector_name, probe_name=probe_name)
    summary = {"vector": report.vector, "layer": report.layer, "probe": report.probe,
               "probe_layer": report.probe_layer, "model": report.model,
               "english_split": "held-out test split of the bundled English set",
               "reference": f"English train+val mean-difference direction (the cosine curve), first {limit} "
                            "prompts per side"}
    return report.table_rows(), crosslingual_figure(report), summary


def run_from_library(ctx: AppContext, vector_name: str, probe_name: str | None, languages, limit,
                     progress: bool = False) -> tuple[list[list], go.Figure, dict]:
    """The tab's button: library names in, :func:`run_check` out."""
    from ..errors import check

    check(bool(vector_name), "choose a vector")
    check(bool(languages), "choose at least one language")
    vector = ctx.vectors.get(vector_name)
    probe = None if not probe_name or probe_name == NO_PROBE else ctx.probes.get(probe_name)
    return run_check(ctx.lm, vector, probe, list(languages), int(limit), vector_name=vector_name,
                     probe_name="" if probe is None else probe_name, progress=progress)


def build(ctx: AppContext, steer: dict) -> dict:
    vectors = ctx.compatible_vectors()
    probes = [NO_PROBE, *ctx.compatible(ctx.probes)]
    gr.Markdown("Does the English harmful/refusal direction carry over to other languages (Wang et al. 2025, "
                "arXiv:2505.17306)? Harmful and harmless instructions written in each language are projected on "
                "the English direction at its layer and scored by the English probe; AUROC 0.5 = no separation. "
                "English (held-out test split) is the reference row.")
    with gr.Row():
        vec = gr.Dropdown(vectors, value="harmful" if "harmful" in vectors else (vectors[0] if vectors else None),
                          label="English direction (vector)", elem_id="crosslingual-vector")
        prb = gr.Dropdown(probes, value="harmful" if "harmful" in probes else NO_PROBE, label="English probe",
                          elem_id="crosslingual-probe")
        langs = gr.CheckboxGroup([(f"{LANGUAGES[c]} ({c})", c) for c in OTHER_LANGUAGES], value=list(OTHER_LANGUAGES),
                                 label="Languages", elem_id="crosslingual-languages")
        limit = gr.Slider(4, 42, value=42, step=1, label="Prompts per side (at most)")
        go_btn = gr.Button("Run separation check", variant="primary", elem_id="crosslingual-run")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="crosslingual-table")
    chart = gr.Plot(label="AUROC per language; cosine per layer")
    info = gr.JSON(label="Settings")

    @gpu
    @user_errors
    def on_run(vname, pname, codes, n, progress=gr.Progress(track_tqdm=True)):
        return run_from_library(ctx, vname, pname, codes, n, progress=True)

    go_btn.click(on_run, [vec, prb, langs, limit], [table, chart, info], concurrency_id=MODEL_QUEUE,
                 concurrency_limit=1, api_visibility="private")
    return {}
