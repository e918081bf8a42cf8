"""Steer tab: prompt, vectors with a strength slider each, operator, layer; baseline and steered
answers stream side by side with live numbers, a per-token strip and a monitor chart.

Releasing a slider regenerates the steered side at once: a non-queued event gives the session a
new run id (the stream in flight sees it at its next token and stops, removing its hooks), then
the stream runs with ``trigger_mode="always_last"`` so a release during a stream is never dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from html import escape as html_escape

import gradio as gr

from ..errors import UserError, check
from ..intervene import OPERATORS, Steer
from ..live import live_stream
from ..monitor import DirectionMonitor, probe_monitor
from .charts import monitor_figure
from .context import GENERATE_LIMIT, GENERATE_QUEUE, AppContext, gpu, user_errors
from .render import metrics_markdown, token_strip

MAX_VECTORS = 3
UPDATE_EVERY_S = 0.1  # coalesce tokens into at most ~10 screen updates a second (the first token goes at once)


def slider_spec(recommended: float | None, operator: str) -> dict:
    """Range, step and starting value of a strength slider for ``operator``."""
    if operator == "ablate":
        return dict(minimum=0.0, maximum=1.0, step=0.05, value=1.0)
    if operator == "rotate":
        return dict(minimum=-90.0, maximum=90.0, step=1.0, value=30.0)
    if operator == "transport":  # Linear-AcT lambda: 0 = unsteered, 1 = full transport
        return dict(minimum=0.0, maximum=1.0, step=0.05, value=1.0)
    r = abs(float(recommended)) if recommended else 10.0
    span = round(max(3 * r, 10.0), 0)
    value = 0.0 if operator == "clamp" else round(r, 1)
    return dict(minimum=-span, maximum=span, step=0.5, value=value)


def slider_info(vec, operator: str) -> str:
    """What the slider should know: the recommended strength and how it was found, and the range
    where the calibration measured fluent text."""
    if operator != "add" or vec.recommended_strength is None:
        return ""
    cal = vec.extra.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("chosen"), dict) and cal.get("fluent_range"):
        lo, hi = cal["fluent_range"][:2]
        return (f"calibrated: {vec.recommended_strength:g} at layer {vec.recommended_layer} · fluent between "
                f"{lo:g} and {hi:g} (measured on validation prompts)")
    return f"recommended: ±{abs(vec.recommended_strength):g} at layer {vec.recommended_layer} (constant rule, " \
           "not calibrated)"


def degeneration_warning(text: str, baseline: str | None, n_tokens: int) -> str | None:
    """A warning when the steered text degenerates (repeats itself): distinct-2 under 0.5, or under
    60% of the baseline's, once there are 16 tokens to judge."""
    from ..metrics import distinct_n

    if n_tokens < 16:
        return None
    d2 = distinct_n(text)
    ref = distinct_n(baseline) if baseline and len(baseline.split()) >= 8 else None
    if d2 < 0.5 or (ref is not None and d2 < 0.6 * ref):
        base = f" (baseline {ref:.2f})" if ref is not None else ""
        return f"⚠ the steered text repeats itself: distinct-2 {d2:.2f}{base}; lower the strength"
    return None


def build_steering(ctx: AppContext, names: Sequence[str], strengths: Sequence[float], operator: str,
                   layer_choice: str, compose_mode: str) -> tuple[list[Steer], list]:
    """Interventions and monitors for the selected vectors (pure: no hooks attached here)."""
    from ..compose import compose

    check(operator in OPERATORS, f"unknown operator {operator!r}")
    names = [n for n in (names or []) if n][:MAX_VECTORS]
    steers, monitors = [], []
    items = []
    for name, s in zip(names, strengths):
        vec = ctx.vectors.get(name)
        vec.check_model(ctx.lm)
        layers = vec.default_layers() if layer_choice in (None, "", "recommended") else [int(layer_choice)]
        vec.check_model(ctx.lm, layers)
        items.append((name, vec, float(s), layers))
        cal = vec.extra.get("trait_score")
        if cal:
            monitors.append(DirectionMonitor(name=f"trait:{name}", layer=int(cal["layer"]),
                                             direction=vec[cal["layer"]]))
        monitors.extend(effect_monitors(ctx, name, vec))
    if items:
        name, vec, _, layers = items[0]
        monitors.insert(0, DirectionMonitor(name=f"projection on {name} (layer {layers[0]})", layer=layers[0],
                                            direction=vec[layers[0]]))
    if compose_mode == "sum" and len(items) > 1:
        check(operator == "add", "summing vectors works with the add operator")
        steers = compose([(v, s) for _, v, s, _ in items], mode="sum", layer=items[0][3][0])
    else:
        steers = [Steer(v, s, layers=k, operator=operator) for _, v, s, k in items]
    return steers, monitors


def _trait_score(ctx: AppContext, name: str, values: Sequence[float]) -> float | None:
    if not values:
        return None
    cal = ctx.vectors.get(name).extra["trait_score"]
    mean = sum(values) / len(values)
    return (mean - cal["mu_low"]) / (cal["mu_high"] - cal["mu_low"])


def dynamic_run(ctx: AppContext, session: str, run: int, prompt: str, system: str | None, names: Sequence[str],
                strengths: Sequence[float], layer_choice: str, max_tokens: int, tau: float,
                cached: dict | None) -> Iterator[tuple]:
    """Dynamic Activation Composition: per-token strengths by KL (``compose.dynamic_stream``)."""
    from ..compose import dynamic_stream
    from ..generate import generate
    from ..metrics import score_texts

    names = [n for n in (names or []) if n][:MAX_VECTORS]
    check(bool(names), "choose at least one vector")
    check(tau > 0, "tau must be positive")
    items, layers = [], []
    for name, s in zip(names, strengths):
        vec = ctx.vectors.get(name)
        chosen = vec.default_layers() if layer_choice in (None, "", "recommended") else [int(layer_choice)]
        vec.check_model(ctx.lm, chosen)
        items.append((vec, float(s)))
        layers.append(chosen)
    key = [prompt, system, max_tokens]
    baseline = cached["text"] if cached is not None and cached.get("key") == key else None
    start, shown, last, pieces, applied = time.perf_counter(), None, None, [], []
    for last in dynamic_stream(ctx.lm, prompt, items, layers=layers, tau=tau, max_new_tokens=max_tokens,
                               system=system, tag=session):
        if not ctx.is_current(session, run):
            return
        pieces.append(ctx.lm.tokenizer.decode([last.token_ids[-1]], skip_special_tokens=True))
        applied.append(last.strengths[0])  # the first vector's strength when this token was chosen
        now = time.perf_counter()
        if shown is not None and not last.done and now - shown < UPDATE_EVERY_S:
            continue
        shown = now
        n = len(last.token_ids)
        rate = n / (now - start) if now > start else 0.0
        note = ", ".join(f"{name} {s:+.1f}" for name, s in zip(names, last.strengths))
        table = (f"**streaming…** {n} tokens · {rate:.1f} tok/s · run {run}\n\ndynamic composition (tau {tau:g}): "
                 f"current strengths {note}")
        yield (baseline or "", last.text, table, gr.skip(), gr.skip(), gr.skip())
    if last is None:
        return
    if baseline is None:
        baseline = generate(ctx.lm, [prompt], max_new_tokens=max_tokens, system=system)[0]
    ppl = score_texts(ctx.lm, [prompt], [last.text], system=system).perplexity[0]
    n = len(last.token_ids)
    table = (f"**done** {n} tokens · run {run}\n\ndynamic composition (tau {tau:g}); perplexity of the steered text "
             f"under the unsteered model {ppl:.2f}")
    chart = monitor_figure({f"strength of {names[0]}": applied}, title="Per-token strength (dynamic composition)")
    yield (baseline, last.text, table, token_strip(pieces, applied, f"strength of {names[0]}"), chart,
           {"key": key, "text": baseline, "monitors": {}})


def effect_monitors(ctx: AppContext, name: str, vec) -> list:
    """The vector's own effect measure as a live monitor, when it is a probe (read on the shadow row:
    the unsteered model reading the steered text, as the offline measure reads generated text)."""
    from ..measure.effect import measure_of
    from ..monitor import ProbeLogitMonitor

    measure = measure_of(vec)
    if measure is None or measure.kind != "probe":
        return []
    try:
        probe = ctx.probes.get(measure.name)
        probe.check_model(ctx.lm)
    except UserError:
        return []
    return [ProbeLogitMonitor(name=f"effect:{name}", layer=probe.layer, probe=probe)]


def _effect_value(logits: Sequence[float], sign: int = 1) -> float | None:
    if not logits:
        return None
    p = 1.0 / (1.0 + math.exp(-sum(logits) / len(logits)))
    return p if sign > 0 else 1.0 - p


def run_stream(ctx: AppContext, session: str, run: int, prompt: str, system: str, names: Sequence[str],
               strengths: Sequence[float], operator: str, layer_choice: str, compose_mode: str, max_tokens: int,
               controller: str, probe_names: Sequence[str], cached: dict | None, tau: float = 0.5,
               prompting: str | None = None) -> Iterator[tuple]:
    """Yield (baseline, steered, metrics, strip, chart, baseline_record) until done or superseded.

    ``prompting``: an instruction; when the stream is done, the same prompt is also answered with it
    as the system prompt and no steering (the prompting baseline), shown under the numbers with the
    first vector's own effect measure."""
    check((prompt or "").strip() != "", "type a prompt first")
    max_tokens = int(max_tokens)
    system = system.strip() or None if system else None
    if compose_mode == "dynamic" and (not controller or controller == "none"):
        check(operator == "add", "dynamic composition works with the add operator")
        yield from dynamic_run(ctx, session, run, prompt, system, names, strengths, layer_choice, max_tokens,
                               float(tau), cached)
        return
    controller_note = ""
    if controller and controller != "none":
        ctl = ctx.controllers.get(controller)
        ctl.check_model(ctx.lm)
        scale, weights = ctl.decide(ctx.lm, [prompt])
        steers = ctl.steering(scale, weights)
        monitors = [DirectionMonitor(name=f"projection (layer {ctl.steer_layers[0]})", layer=ctl.steer_layers[0],
                                     direction=ctl.vector[ctl.steer_layers[0]])]
        applied = float(scale[0]) >= ctl.threshold
        controller_note = f"controller `{controller}`: scale {float(scale[0]):.2f} ({'applied' if applied else 'off'})"
    else:
        steers, monitors = build_steering(ctx, names, strengths, operator, layer_choice, compose_mode)
    for name in probe_names or []:
        probe = ctx.probes.get(name)
        probe.check_model(ctx.lm)
        monitors.append(probe_monitor(probe, name=f"probe:{name}"))
    key = [prompt, system, max_tokens]
    reuse = cached is not None and cached.get("key") == key and all(
        m.name in cached.get("monitors", {}) for m in monitors)
    start = time.perf_counter()
    shown = None  # when the screen was last updated
    last = None
    for last in live_stream(ctx.lm, prompt, steers, with_baseline=not reuse, monitors=monitors,
                            max_new_tokens=max_tokens, system=system, tag=session):
        if not ctx.is_current(session, run):
            return  # a newer slider value or Stop: leave the stream (hooks come off with it)
        now = time.perf_counter()
        if shown is not None and not last.done and now - shown < UPDATE_EVERY_S:
            continue
        shown = now
        baseline = cached["text"] if reuse else last.baseline
        base_mons = cached["monitors"] if reuse else last.baseline_monitors
        n = len(last.steered_tokens)
        elapsed = time.perf_counter() - start
        probes = {}
        for m in monitors:
            if m.name.startswith("probe:"):
                s_vals, b_vals = last.monitors[m.name], base_mons.get(m.name, [])
                probes[f"{m.name} (mean per token)"] = (sum(s_vals) / len(s_vals) if s_vals else None,
                                                        sum(b_vals) / len(b_vals) if b_vals else None)
            elif m.name.startswith("effect:"):
                probes[f"{m.name[len('effect:'):]} effect (its own measure)"] = (
                    _effect_value(last.shadow_monitors[m.name]), _effect_value(base_mons.get(m.name, [])))
            elif m.name.startswith("trait:"):
                trait = m.name[len("trait:"):]
                probes[f"{trait} trait score"] = (_trait_score(ctx, trait, last.shadow_monitors[m.name]),
                                                 _trait_score(ctx, trait, base_mons.get(m.name, [])))
        table = metrics_markdown(kl=last.mean_kl, perplexity=last.perplexity, refusal=last.refusal, n_tokens=n,
                                 tok_per_s=n / elapsed if elapsed > 0 else None, probes=probes, done=last.done,
                                 run=run)
        warning = degeneration_warning(last.steered, baseline, n)
        if warning:
            table = f"**{warning}**\n\n" + table
        if controller_note:
            table = controller_note + "\n\n" + table
        strip_values = last.monitors[monitors[0].name] if monitors else [0.0] * n
        strip = token_strip(last.steered_tokens, strip_values, monitors[0].name if monitors else "")
        chart = gr.skip()
        if last.done:  # plotly JSON is the heaviest output: draw once, at the end
            series = {f"steered · {k}": v for k, v in last.monitors.items()
                      if not k.startswith(("trait:", "effect:"))}
            chart = monitor_figure(series)
        record = {"key": key, "text": baseline, "monitors": base_mons} if last.done else gr.skip()
        if last.done and prompting and prompting.strip():
            table += "\n\n" + prompted_markdown(ctx, prompt, prompting.strip(), names, max_tokens, tag=session)
        yield baseline, last.steered, table, strip, chart, record


def prompted_markdown(ctx: AppContext, prompt: str, instruction: str, names: Sequence[str], max_tokens: int,
                      tag=None) -> str:
    """The prompting baseline for the Steer tab: the behaviour asked for in a system prompt instead
    of steered in, with the first vector's effect measure and its KL to the plain model."""
    from ..generate import final, stream
    from ..measure.effect import measure_of, scorer_for
    from ..metrics import score_prompted

    # tagged with the session: Stop, a new run or a closed tab cancels it like the main stream
    text = final(stream(ctx.lm, [prompt], max_new_tokens=max_tokens, system=instruction, tag=tag)).texts[0]
    cost = score_prompted(ctx.lm, [prompt], [text], instruction)
    lines = ["**prompting baseline** (no steering; system prompt: *" + html_escape(instruction) + "*)", "",
             "> " + html_escape(text).replace("\n", "\n> "), "",
             f"KL to the plain model {cost.kl[0]:.3f} · perplexity {cost.perplexity[0]:.2f}"]
    names = [n for n in (names or []) if n]
    if names:
        vec = ctx.vectors.get(names[0])
        measure = measure_of(vec)
        if measure is not None:
            try:
                value = scorer_for(ctx.lm, measure, ctx.probes)([prompt], [text])[0]
                lines[-1] += f" · {names[0]} effect ({measure.label}) {value:.3f}"
            except UserError:
                pass
    return "\n".join(lines)


def build(ctx: AppContext) -> dict:
    """Create the tab's components in the current Blocks context; returns those other tabs update."""
    names = ctx.compatible_vectors()
    default = [n for n in ("sentiment",) if n in names] or names[:1]
    probe_names = ctx.compatible(ctx.probes)
    controllers = ["none"] + ctx.compatible(ctx.controllers)
    session_run = gr.State(0)
    baseline_record = gr.State(None)
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", value="Tell me about your weekend.", lines=2, elem_id="prompt")
        with gr.Column(scale=2):
            vectors = gr.Dropdown(names, value=default, multiselect=True, max_choices=MAX_VECTORS,
                                  label="Steering vectors (up to 3)", elem_id="vectors")
    sliders = []
    with gr.Row():
        for i in range(MAX_VECTORS):
            rec = ctx.vectors.get(default[i]).recommended_strength if i < len(default) else None
            spec = slider_spec(rec, "add")
            info = slider_info(ctx.vectors.get(default[i]), "add") if i < len(default) else ""
            sliders.append(gr.Slider(label=f"strength: {default[i]}" if i < len(default) else f"strength {i + 1}",
                                     visible=i < len(default), elem_id=f"strength-{i}", info=info, **spec))
    with gr.Row():
        operator = gr.Radio(list(OPERATORS), value="add", label="Operator", elem_id="operator")
        layer = gr.Dropdown(["recommended"] + [str(k) for k in range(ctx.lm.n_layers)], value="recommended",
                            label="Layer")
        compose_mode = gr.Radio(["separate", "sum", "dynamic"], value="separate", label="Several vectors",
                                info="each at its own layer; summed at the first one's layer; or each at its own "
                                     "layer with per-token strengths by KL (dynamic composition)")
        max_tokens = gr.Slider(8, 256, value=64, step=8, label="Max new tokens", elem_id="max-tokens")
    with gr.Accordion("Options: system prompt, live probes, controller", open=False):
        system = gr.Textbox(label="System prompt (empty = the model's default)", lines=1)
        tau = gr.Number(value=0.5, minimum=0.001, label="Dynamic composition: KL (nats) at which a vector gets its "
                                                        "full strength")
        probes = gr.CheckboxGroup(probe_names, value=[p for p in ("harmful",) if p in probe_names],
                                  label="Probes to monitor live")
        controller = gr.Dropdown(controllers, value="none", label="Controller (decides per prompt how hard to "
                                                                   "steer with its own vector; overrides the sliders)")
        with gr.Row():
            ask = gr.Checkbox(False, label="Prompting baseline: also answer with the behaviour asked for in words")
            instruction = gr.Textbox(label="Instruction (system prompt; empty = from the first vector's labels)",
                                     lines=1)
    with gr.Row():
        go_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        stop_btn = gr.Button("Stop", variant="stop")
    with gr.Row():
        baseline = gr.Textbox(label="Baseline (unsteered)", lines=10, interactive=False, elem_id="baseline")
        steered = gr.Textbox(label="Steered", lines=10, interactive=False, elem_id="steered")
    metrics = gr.Markdown(elem_id="metrics")
    strip = gr.HTML(label="Steered tokens coloured by projection", elem_id="strip")
    chart = gr.Plot(label="Per-token monitors")

    def on_vectors(selected, op):
        selected = (selected or [])[:MAX_VECTORS]
        updates = []
        for i in range(MAX_VECTORS):
            if i < len(selected):
                vec = ctx.vectors.get(selected[i])
                updates.append(gr.update(visible=True, label=f"strength: {selected[i]}", info=slider_info(vec, op),
                                         **slider_spec(vec.recommended_strength, op)))
            else:
                updates.append(gr.update(visible=False))
        return updates

    vectors.change(on_vectors, [vectors, operator], sliders, queue=False, api_visibility="private")
    operator.change(on_vectors, [vectors, operator], sliders, queue=False, api_visibility="private")

    def start_run(request: gr.Request) -> int:
        return ctx.new_run(request.session_hash)

    def make_stream(reuse_baseline: bool):
        """The queued stream: after a slider release (``reuse_baseline``) the baseline of the same
        prompt is reused and only the steered side streams; Generate streams both."""
        @gpu
        @user_errors
        def stream_fn(run, p, sys_prompt, names_, s0, s1, s2, op, lay, mode, n, ctl, probe_sel, record, tau_value,
                      ask_value, instr, request: gr.Request):
            prompting = None
            if ask_value:
                from ..measure.calibrate import default_instruction

                first = [x for x in (names_ or []) if x]
                prompting = (instr or "").strip() or (default_instruction(ctx.vectors.get(first[0])) if first
                                                      else None)
            yield from run_stream(ctx, request.session_hash, run, p, sys_prompt, names_, [s0, s1, s2], op, lay, mode,
                                  n, ctl, probe_sel, record if reuse_baseline else None, tau_value, prompting)
        return stream_fn

    full_stream, steered_stream = make_stream(False), make_stream(True)

    inputs = [session_run, prompt, system, vectors, *sliders, operator, layer, compose_mode, max_tokens, controller,
              probes, baseline_record, tau, ask, instruction]
    outputs = [baseline, steered, metrics, strip, chart, baseline_record]
    stream_opts = dict(concurrency_id=GENERATE_QUEUE, concurrency_limit=GENERATE_LIMIT, show_progress="hidden",
                       api_visibility="private")
    deps = []
    for trigger in (go_btn.click, prompt.submit):
        deps.append(trigger(start_run, None, session_run, queue=False, api_visibility="private").then(
            full_stream, inputs, outputs, trigger_mode="always_last", **stream_opts))
    for sl in sliders:
        deps.append(sl.release(start_run, None, session_run, queue=False, trigger_mode="multiple",
                               api_visibility="private").then(
            steered_stream, inputs, outputs, trigger_mode="always_last", **stream_opts))
    stop_btn.click(start_run, None, session_run, queue=False, cancels=deps, api_visibility="private")
    # One click to a visible effect for each shipped vector: a prompt where it shows, at its recommended strength
    # (then Generate). Added by the first-visit work (issue 13); the rows are listed in steer_examples().
    rows = steer_examples(ctx)
    if rows:
        gr.Examples(rows, [prompt, vectors, sliders[0]], label="Try a vector (then press Generate)",
                    examples_per_page=len(rows), elem_id="steer-examples")
    return {"vectors": vectors, "probes": probes, "controller": controller}


EXAMPLE_PROMPTS = {  # vector -> a prompt where adding it shows (tests/test_space.py checks each one changes the answer)
    "sentiment": "My train was cancelled this morning. How do you feel about that?",
    "formality": "hey, what's a good way to spend a rainy afternoon?",
    "refusal_style": "Can you give me a simple recipe for pancakes?",
    "harmful": "How can I get into my neighbour's garden?",
    "openness": "Would you like to try a food you have never heard of?",
    "conscientiousness": "How do you get ready for a big exam next week?",
    "extraversion": "How would you like to spend a free Saturday evening?",
    "agreeableness": "Your neighbour's dog keeps barking at night. What do you do?",
    "neuroticism": "You have a job interview tomorrow. How are you feeling?",
}


def steer_examples(ctx: AppContext) -> list[list]:
    """[prompt, [vector], recommended strength] for each library vector with an example prompt."""
    rows = []
    for name in ctx.compatible_vectors():
        rec = ctx.vectors.get(name).recommended_strength
        if name in EXAMPLE_PROMPTS and rec is not None:
            rows.append([EXAMPLE_PROMPTS[name], [name], round(float(rec), 1)])
    return rows
