"""Function vectors (Todd et al., ICLR 2024, arXiv 2310.15213): pick a task, measure which attention heads
carry it (average indirect effect of each head, a layers x heads heat map), sum the top heads' outputs into one
vector, save it to the visitor's library, and compare zero-shot accuracy on held-out pairs without and with it
(next to few-shot prompting). Callbacks only call ``steering_lab.directions.function_vectors``."""

from __future__ import annotations

from typing import Any

import gradio as gr
import plotly.graph_objects as go

from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors

TITLE = "Function vectors"
WHERE = "extract"


def aie_figure(stats: Any, chosen: list[tuple[int, int]] | None = None) -> go.Figure:
    """Heat map of the AIE matrix (layers down, heads across); the chosen heads ringed."""
    aie = stats.aie
    n_layers, n_heads = aie.shape
    fig = go.Figure(go.Heatmap(z=aie.tolist(), x=list(range(n_heads)), y=list(range(n_layers)), colorscale="RdBu",
                               zmid=0, colorbar=dict(title="AIE"),
                               hovertemplate="layer %{y} head %{x}<br>AIE %{z:.4f}<extra></extra>"))
    if chosen:
        fig.add_trace(go.Scatter(x=[h for _, h in chosen], y=[k for k, _ in chosen], mode="markers", name="top heads",
                                 marker=dict(symbol="circle-open", size=14, color="black", line=dict(width=2))))
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer (decoder block)", autorange="reversed")
    fig.update_layout(title=f"Average indirect effect per head: {stats.task} ({stats.shots}-shot, "
                            f"P(answer) clean {stats.clean_prob:.2f}, labels shuffled {stats.corrupt_prob:.2f})",
                      height=max(360, 16 * n_layers + 120), showlegend=False)
    return fig


def measure_heads(ctx: AppContext, task: str, shots: int = 10, n_clean: int = 32, n_corrupt: int = 16,
                  n_heads: int | None = None, progress: Any = None) -> tuple[Any, go.Figure]:
    """Head statistics of ``task`` on the app's model and their heat map."""
    from ..directions import function_vectors as fv

    check(bool(task), "choose a task")
    stats = fv.head_stats(ctx.lm, task, shots=int(shots), n_clean=int(n_clean), n_corrupt=int(n_corrupt),
                          progress=progress)
    n = fv.default_top_heads(ctx.lm) if not n_heads else int(n_heads)
    return stats, aie_figure(stats, fv.top_heads(stats.aie, min(n, stats.aie.numel())))


def build_and_save(ctx: AppContext, stats: Any, n_heads: int | None = None, name: str = "", scope: str = "last",
                   shots_baseline: int = 5, select_on: str = "zero_shot",
                   progress: Any = None) -> tuple[str, str, go.Figure]:
    """The function vector from measured ``stats``, saved to the visitor's library; returns
    ``(saved name, markdown with held-out accuracies, heat map with the chosen heads)``."""
    from ..directions import function_vectors as fv

    check(stats is not None, "find the heads first")
    name = (name or "").strip() or f"fv-{stats.task}"[:64]
    ctx.vectors.target(name)  # name free and room left, before the work
    vec = fv.function_vector(ctx.lm, stats.task, n_heads=int(n_heads) if n_heads else None, seed=stats.seed,
                             scope=scope, select_on=select_on, stats=stats, progress=progress)
    saved = ctx.vectors.save(vec, name)
    zero = fv.evaluate(ctx.lm, stats.task, seed=stats.seed)
    steered = fv.evaluate(ctx.lm, stats.task, vec, seed=stats.seed, scope=scope)
    icl = fv.evaluate(ctx.lm, stats.task, shots=int(shots_baseline), seed=stats.seed)
    shuffled = fv.evaluate(ctx.lm, stats.task, shots=stats.shots, shuffle_labels=True, seed=stats.seed)
    shuffled_fv = fv.evaluate(ctx.lm, stats.task, vec, shots=stats.shots, shuffle_labels=True, seed=stats.seed,
                              scope=scope)
    heads = ", ".join(f"L{k}H{h}" for k, h in vec.extra["heads"])
    text = "\n".join([
        f"saved **{saved}**: the sum of {len(vec.extra['heads'])} heads ({heads}); added at layer "
        f"**{vec.recommended_layer}**, strength **{vec.recommended_strength:g}**, {scope} token(s) "
        f"(chosen on the validation split, {select_on.replace('_', '-')} prompts: accuracy "
        f"{vec.extra['valid_accuracy']:.2f})", "",
        f"First-token accuracy on the {zero.n} held-out test pairs:", "",
        "| prompt | accuracy | mean P(answer) |", "|---|---:|---:|",
        f"| zero-shot | {zero.accuracy:.2f} | {zero.mean_prob:.3f} |",
        f"| zero-shot + function vector | {steered.accuracy:.2f} | {steered.mean_prob:.3f} |",
        f"| {int(shots_baseline)}-shot (no vector) | {icl.accuracy:.2f} | {icl.mean_prob:.3f} |",
        f"| {stats.shots}-shot, labels shuffled | {shuffled.accuracy:.2f} | {shuffled.mean_prob:.3f} |",
        f"| {stats.shots}-shot, labels shuffled + function vector | {shuffled_fv.accuracy:.2f} | "
        f"{shuffled_fv.mean_prob:.3f} |", "",
        "Examples with the vector: " + "; ".join(f"`{q}` → `{p.strip()}` ({a})" for q, a, p in steered.predictions[:6]),
    ])
    return saved, text, aie_figure(stats, [tuple(h) for h in vec.extra["heads"]])


def build(ctx: AppContext, steer: dict) -> dict:
    from ..directions import function_vectors as fv

    tasks = fv.task_names()
    gr.Markdown("A **function vector** (Todd et al. 2024, arXiv:2310.15213) is what a few attention heads write when "
                "the model does a task from examples (`hot: cold`, `big: small`, ..., `fast:`). Heads are ranked by "
                "how much patching their mean output into prompts with shuffled example labels restores the right "
                "answer; the top heads' outputs are summed into one residual-stream vector, and added to a zero-shot "
                "prompt (`fast:`) it should make the model do the task without examples.")
    with gr.Row():
        task = gr.Dropdown(tasks, value=tasks[0] if tasks else None, label="Task", elem_id="fv-task")
        shots = gr.Slider(2, 20, value=10, step=1, label="Examples per prompt (shots)")
        n_corrupt = gr.Slider(4, 64, value=16, step=4, label="Shuffled-label prompts (AIE)")
        n_heads = gr.Number(value=fv.default_top_heads(ctx.lm), precision=0, minimum=1, label="Top heads summed")
    heads_btn = gr.Button("1. Find the heads", variant="primary", elem_id="fv-heads")
    plot = gr.Plot(elem_id="fv-heatmap")
    stats_state = gr.State(None)
    with gr.Row():
        scope = gr.Radio(["last", "all"], value="last", label="Add at (last token: the paper; all: every position)")
        select_on = gr.Radio(["zero_shot", "shuffled"], value="zero_shot",
                             label="Choose layer and strength on (validation split)")
        name = gr.Textbox(label="Save as (empty: fv-TASK)", scale=2)
        build_btn = gr.Button("2. Build, save and evaluate", variant="primary", elem_id="fv-build")
    msg = gr.Markdown(elem_id="fv-message")

    @gpu
    @user_errors
    def on_heads(t, s, nc, nh, progress=gr.Progress()):
        stats, fig = measure_heads(ctx, t, int(s), n_corrupt=int(nc), n_heads=int(nh or 0) or None,
                                   progress=lambda f, text: progress(f, desc=text))
        return stats, fig, (f"measured {t}: label-shuffled prompts give P(answer) {stats.corrupt_prob:.3f}, clean "
                            f"ones {stats.clean_prob:.3f}; the ringed heads restore it most")

    heads_btn.click(on_heads, [task, shots, n_corrupt, n_heads], [stats_state, plot, msg], concurrency_id=MODEL_QUEUE,
                    api_visibility="private")

    @gpu
    @user_errors
    def on_build(stats, nh, sc, sel, nm, progress=gr.Progress()):
        saved, text, fig = build_and_save(ctx, stats, int(nh or 0) or None, nm, sc, select_on=sel,
                                          progress=lambda f, t: progress(f, desc=t))
        return text, fig, gr.update(choices=ctx.compatible_vectors(), value=[saved])

    build_btn.click(on_build, [stats_state, n_heads, scope, select_on, name], [msg, plot, steer["vectors"]],
                    concurrency_id=MODEL_QUEUE, api_visibility="private")
    return {"task": task}
