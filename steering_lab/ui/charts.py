"""Every plotly chart of the lab, in one place (the app, the CLI's HTML reports and bench/)."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

VECTOR_COLOUR = "#1f77b4"
RANDOM_COLOUR = "#7f7f7f"


def _series(results: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    return [r["strength"] for r in results], [r.get(key) for r in results]


def sweep_figure(report: dict, behaviour: str | None = None) -> go.Figure:
    """Behaviour and coherence cost against strength, and the trade-off between them.

    Solid: the vector; dashed grey: the mean of the random directions of the same norm.
    """
    behaviour = behaviour or report.get("behaviour_key", "refusal_rate")
    results = report["results"]
    rand = report.get("random_baseline_mean")
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"{behaviour} vs strength", "coherence cost vs strength", f"{behaviour} vs KL (trade-off)"),
        specs=[[{}, {"secondary_y": True}, {}]])
    x, y = _series(results, behaviour)
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{behaviour} (vector)",
                             line=dict(color=VECTOR_COLOUR)), row=1, col=1)
    x, d2 = _series(results, "distinct2")
    fig.add_trace(go.Scatter(x=x, y=d2, mode="lines+markers", name="distinct-2 (vector)",
                             line=dict(color="#2ca02c")), row=1, col=1)
    x, kl = _series(results, "kl")
    fig.add_trace(go.Scatter(x=x, y=kl, mode="lines+markers", name="KL to unsteered (vector)",
                             line=dict(color="#d62728")), row=1, col=2)
    x, ppl = _series(results, "perplexity")
    fig.add_trace(go.Scatter(x=x, y=ppl, mode="lines+markers", name="perplexity (vector)",
                             line=dict(color="#9467bd")), row=1, col=2, secondary_y=True)
    fig.add_trace(go.Scatter(x=kl, y=[r.get(behaviour) for r in results], mode="lines+markers+text",
                             text=[f"{r['strength']:g}" for r in results], textposition="top center",
                             name="vector", line=dict(color=VECTOR_COLOUR)), row=1, col=3)
    if rand:
        x, y = _series(rand, behaviour)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{behaviour} (random, mean)",
                                 line=dict(color=RANDOM_COLOUR, dash="dash")), row=1, col=1)
        x, y = _series(rand, "kl")
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="KL (random, mean)",
                                 line=dict(color=RANDOM_COLOUR, dash="dash")), row=1, col=2)
        fig.add_trace(go.Scatter(x=[r["kl"] for r in rand], y=[r.get(behaviour) for r in rand],
                                 mode="lines+markers", name="random (mean)",
                                 line=dict(color=RANDOM_COLOUR, dash="dash")), row=1, col=3)
    prompted = (report.get("prompted") or {}).get("results")
    if prompted:  # the prompting baseline: the behaviour asked for in a system prompt (+ the same steering)
        x, y = _series(prompted, behaviour)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{behaviour} (prompted)",
                                 line=dict(color="#17becf", dash="dot")), row=1, col=1)
        fig.add_trace(go.Scatter(x=[r["kl"] for r in prompted], y=y, mode="lines+markers+text",
                                 text=[f"{r['strength']:g}" for r in prompted], textposition="bottom center",
                                 name="prompted (+ steered)", line=dict(color="#17becf", dash="dot")), row=1, col=3)
    fig.update_xaxes(title_text="strength", row=1, col=1)
    fig.update_xaxes(title_text="strength", row=1, col=2)
    fig.update_xaxes(title_text="mean KL to the plain unsteered model", row=1, col=3)
    values = [r.get(behaviour) for r in results + list(rand or []) + list(prompted or [])]
    rate = all(isinstance(v, (int, float)) and -1e-9 <= v <= 1 + 1e-9 for v in values if v == v)
    fig.update_yaxes(title_text="rate / score", range=[-0.05, 1.05] if rate else None, row=1, col=1)
    fig.update_yaxes(title_text="KL (nats/token)", row=1, col=2)
    fig.update_yaxes(title_text="perplexity", row=1, col=2, secondary_y=True)
    fig.update_yaxes(title_text=behaviour, row=1, col=3)
    title = f"Sweep: {report.get('vector', 'vector')} — {report.get('model', '')}, layers {report.get('layers')}"
    fig.update_layout(title=title, height=430, legend=dict(orientation="h", y=-0.2), margin=dict(t=70))
    return fig


def layer_scan_figure(rows: Sequence[dict], recommended_layer: int | None, title: str = "Layer scan") -> go.Figure:
    """Held-out separability per layer (AUROC, accuracy; separation on a second axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    layers = [r["layer"] for r in rows]
    fig.add_trace(go.Scatter(x=layers, y=[r["auroc"] for r in rows], mode="lines+markers", name="held-out AUROC"))
    fig.add_trace(go.Scatter(x=layers, y=[r["accuracy"] for r in rows], mode="lines+markers", name="held-out accuracy"))
    fig.add_trace(go.Bar(x=layers, y=[r["separation"] for r in rows], name="separation (d')", opacity=0.3),
                  secondary_y=True)
    if recommended_layer is not None:
        fig.add_vline(x=recommended_layer, line_dash="dash", line_color="#d62728",
                      annotation_text=f"recommended: {recommended_layer}")
    fig.update_xaxes(title_text="layer (decoder block)")
    fig.update_yaxes(title_text="AUROC / accuracy", range=[0.4, 1.02])
    fig.update_yaxes(title_text="separation", secondary_y=True)
    fig.update_layout(title=title, height=380, legend=dict(orientation="h", y=-0.25))
    return fig


def probe_sweep_figure(rows: Sequence[dict], best: int | None, title: str = "Probe layer sweep") -> go.Figure:
    """Probe AUROC and accuracy per layer on the selection split."""
    fig = go.Figure()
    layers = [r["layer"] for r in rows]
    fig.add_trace(go.Scatter(x=layers, y=[r["auroc"] for r in rows], mode="lines+markers", name="AUROC"))
    fig.add_trace(go.Scatter(x=layers, y=[r["accuracy"] for r in rows], mode="lines+markers", name="accuracy"))
    if best is not None:
        fig.add_vline(x=best, line_dash="dash", line_color="#d62728", annotation_text=f"best: {best}")
    fig.update_xaxes(title_text="layer (decoder block)")
    fig.update_yaxes(title_text="held-out score", range=[0.4, 1.02])
    fig.update_layout(title=title, height=360, legend=dict(orientation="h", y=-0.25))
    return fig


def monitor_figure(series: dict[str, Sequence[float]], title: str = "Per-token monitors") -> go.Figure:
    """One line per monitor over the generated tokens."""
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(y=list(values), mode="lines+markers", name=name, marker=dict(size=4)))
    fig.update_xaxes(title_text="generated token")
    fig.update_yaxes(title_text="value")
    fig.update_layout(title=title, height=300, margin=dict(t=40, b=40), legend=dict(orientation="h", y=-0.3))
    return fig


def pareto_figure(report: dict) -> go.Figure:
    """Calibration: every (layer, strength) tried as effect against KL (fluent: filled; not: open),
    the Pareto front as a line, the chosen point, the constant rule and (when measured) the
    prompting baseline's rows."""
    pts = report.get("points", [])
    fig = go.Figure()
    for fluent in (True, False):
        sel = [p for p in pts if bool(p.get("fluent")) == fluent]
        if sel:
            fig.add_trace(go.Scatter(
                x=[p["kl"] for p in sel], y=[p["effect"] for p in sel], mode="markers",
                name="fluent" if fluent else "not fluent",
                marker=dict(color=[p["layer"] for p in sel], colorscale="Viridis", showscale=fluent,
                            symbol="circle" if fluent else "circle-open", size=9,
                            colorbar=dict(title="layer") if fluent else None),
                text=[f"layer {p['layer']}, strength {p['strength']:g}" for p in sel],
                hovertemplate="%{text}<br>KL %{x:.3f}<br>effect %{y:.3f}<extra></extra>"))
    front = report.get("front", [])
    if front:
        fig.add_trace(go.Scatter(x=[p["kl"] for p in front], y=[p["effect"] for p in front], mode="lines",
                                 name="Pareto front", line=dict(color=RANDOM_COLOUR, dash="dot")))
    for key, name, colour, symbol in (("chosen", "calibrated", "#d62728", "star"),
                                      ("constant_rule", "constant rule", "#ff7f0e", "diamond"),
                                      ("unsteered", "unsteered", "#000000", "x")):
        p = report.get(key)
        if p:
            fig.add_trace(go.Scatter(x=[p["kl"]], y=[p["effect"]], mode="markers", name=name,
                                     marker=dict(color=colour, symbol=symbol, size=15)))
    rows = report.get("prompting", {}).get("rows", {})
    for name in ("prompted", "prompted + steered"):
        r = rows.get(name)
        if r:
            fig.add_trace(go.Scatter(x=[r["kl"]], y=[r["effect"]], mode="markers", name=f"{name} (test)",
                                     marker=dict(color="#17becf", symbol="square" if name == "prompted" else "cross",
                                                 size=13)))
    fig.update_layout(title="calibration: effect against cost (validation prompts)", xaxis_title="mean KL to unsteered",
                      yaxis_title="effect (the vector's own measure)", height=460)
    return fig
