"""Steer tab > More ways to steer > PPLM (slow): plug-and-play LM steering (Dathathri et al. 2020)
toward a bundled word list or one of the library's probes; the unsteered answer (the decode engine)
and the PPLM answer side by side with perplexity and distinct-2 under them. Generate shows progress
per token; Stop ends the loop at its next forward pass (the session's run id changes, as in the
Steer tab)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr

from ..errors import check
from .context import MODEL_QUEUE, AppContext, gpu, user_errors

TITLE = "PPLM (slow)"
WHERE = "steer"
ARROW = " → "


def attribute_choices(ctx: AppContext) -> list[str]:
    """``words: NAME`` for each bundled word list, ``probe: NAME → LABEL`` for each class of each
    library probe that fits the model."""
    from ..control.pplm import bow_lists

    out = [f"words: {name}" for name in bow_lists()]
    for name in ctx.compatible(ctx.probes):
        try:
            labels = ctx.probes.get(name).labels
        except Exception:  # noqa: BLE001 - a broken file is shown in the Library tab, not here
            continue
        out += [f"probe: {name}{ARROW}{label}" for label in labels]
    return out


def attribute_from_choice(ctx: AppContext, choice: str):
    """The PPLM attribute a choice names (see :func:`attribute_choices`)."""
    from ..control import pplm

    choice = (choice or "").strip()
    check(choice != "", "choose an attribute (a word list or a probe class)")
    kind, _, rest = choice.partition(": ")
    if kind == "words":
        return pplm.bag_of_words(ctx.lm, rest)
    check(kind == "probe" and ARROW in rest, f"unknown attribute {choice[:80]!r}")
    name, label = rest.rsplit(ARROW, 1)
    probe = ctx.probes.get(name)
    labels = list(probe.labels)
    check(label in labels, f"probe {name!r} has no class {label!r}")
    return pplm.probe_attribute(ctx.lm, probe, 1 if labels.index(label) == 0 else 0)


def run_pplm(ctx: AppContext, prompt: str, choice: str, stepsize: float, iterations: int, kl_scale: float,
             gm_scale: float, max_tokens: int, *, progress: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> Iterator[tuple[str, str, str]]:
    """Yield ``(unsteered, pplm, numbers)``: the unsteered answer first, then the PPLM answer with
    perplexity (under the unsteered model), distinct-2 and speed of both."""
    from ..control import pplm
    from ..generate import generate
    from ..metrics import distinct_n, score_texts

    check(bool(prompt and prompt.strip()), "prompt is empty")
    config = pplm.PPLMConfig(stepsize=float(stepsize), iterations=int(iterations), kl_scale=float(kl_scale),
                             gm_scale=float(gm_scale), max_new_tokens=int(max_tokens))
    config.validate()
    attr = attribute_from_choice(ctx, choice)
    base = generate(ctx.lm, prompt, max_new_tokens=config.max_new_tokens)[0]
    yield base, "", "running PPLM (several forward and backward passes per token)..."
    res = pplm.generate(ctx.lm, prompt, attr, config, progress=progress, cancel=cancel)
    texts = [base, res.text] if res.text.strip() else [base]
    ppl = score_texts(ctx.lm, [prompt] * len(texts), texts).perplexity + [float("nan")]
    note = " · stopped" if res.cancelled else ""
    numbers = (f"| | unsteered | PPLM |\n|---|---|---|\n"
               f"| perplexity (unsteered model) | {ppl[0]:.2f} | {ppl[1]:.2f} |\n"
               f"| distinct-2 | {distinct_n(base, 2):.2f} | {distinct_n(res.text, 2):.2f} |\n\n"
               f"{len(res.token_ids)} PPLM tokens in {res.seconds:.1f} s ({res.tokens_per_s:.2f} tok/s){note}")
    if getattr(attr, "skipped", ()):
        numbers += f" · word list: {len(attr.words)} single-token words used, {len(attr.skipped)} skipped"
    yield base, res.text, numbers


def build(ctx: AppContext, steer: dict) -> None:
    choices = attribute_choices(ctx)
    default = next((c for c in choices if c == "words: positive"), choices[0] if choices else None)
    session_run = gr.State(0)
    gr.Markdown("Plug-and-play LM (Dathathri et al. 2020): at every token a few gradient steps on the cached keys "
                "and values toward a word list or a probe class, a KL term to the unsteered distribution, and a "
                "fusion of both. Needs no steering vector, but is **much slower** than vector steering.")
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="Tell me about your weekend.", lines=2, scale=3,
                            elem_id="pplm-prompt")
        attribute = gr.Dropdown(choices, value=default, label="Attribute (word list, or probe class)", scale=2,
                                elem_id="pplm-attribute")
    with gr.Row():
        stepsize = gr.Slider(0.0, 0.2, value=0.03, step=0.005, label="Step size", elem_id="pplm-stepsize")
        iterations = gr.Slider(1, 10, value=3, step=1, label="Iterations per token")
        kl_scale = gr.Slider(0.0, 0.2, value=0.01, step=0.005, label="KL scale")
        gm_scale = gr.Slider(0.0, 1.0, value=0.9, step=0.05, label="Fusion (gm scale; 1 = perturbed only)")
        max_tokens = gr.Slider(4, 64, value=24, step=4, label="Max new tokens")
    with gr.Row():
        go_btn = gr.Button("Generate", variant="primary", elem_id="pplm-generate")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="pplm-stop")
    with gr.Row():
        base_out = gr.Textbox(label="Unsteered", lines=8, interactive=False)
        pplm_out = gr.Textbox(label="PPLM", lines=8, interactive=False)
    numbers = gr.Markdown()

    def start_run(request: gr.Request) -> int:
        return ctx.new_run(request.session_hash)

    @gpu
    @user_errors
    def on_generate(run, p, choice, ss, it, kl, gm, n, request: gr.Request, progress=gr.Progress()):
        session = request.session_hash

        def tick(done: int, total: int) -> None:
            progress((done, total), desc="PPLM", unit="tokens")

        yield from run_pplm(ctx, p, choice, ss, it, kl, gm, n, progress=tick,
                            cancel=lambda: not ctx.is_current(session, run))

    inputs = [session_run, prompt, attribute, stepsize, iterations, kl_scale, gm_scale, max_tokens]
    dep = go_btn.click(start_run, None, session_run, queue=False, api_visibility="private").then(
        on_generate, inputs, [base_out, pplm_out, numbers], concurrency_id=MODEL_QUEUE, api_visibility="private")
    stop_btn.click(start_run, None, session_run, queue=False, cancels=[dep], api_visibility="private")
