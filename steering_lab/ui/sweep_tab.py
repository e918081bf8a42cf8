"""Sweep tab: one vector, a list of strengths, a prompt set -> behaviour vs coherence cost, per
strength, with samples and a random-direction control. All strengths run as one batch."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr

from ..datasets import PROMPT_SETS, load_prompts
from ..errors import UserError, check
from ..intervene import OPERATORS
from ..sweep import run_sweep, write_report
from .charts import sweep_figure
from .context import MODEL_QUEUE, AppContext, gpu, user_errors


class ReportDirs:
    """Sweep reports for download: one folder per run under one app-owned temp folder; only the
    newest ``keep`` are kept (gradio has copied older ones into its own cache by then), and the
    whole folder goes when the process exits."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._root: Path | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None or not self._root.is_dir():
                self._root = Path(tempfile.mkdtemp(prefix="steering-lab-reports-"))
                atexit.register(shutil.rmtree, self._root, True)
            return self._root

    def new(self) -> Path:
        root = self.root
        path = Path(tempfile.mkdtemp(prefix="sweep-", dir=root))
        with self._lock:
            runs = sorted(root.glob("sweep-*"), key=lambda d: d.stat().st_mtime_ns)
            for old in runs[: max(0, len(runs) - self.keep)]:
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def cleanup(self) -> None:
        with self._lock:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in (text or "").replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"strengths must be comma-separated numbers, got {text!r}") from None
    check(bool(values), "give at least one strength")
    check(len(set(values)) == len(values), "strengths must not repeat")
    check(len(values) <= 16, "at most 16 strengths")
    return values


HEADERS = ["direction", "strength", "effect", "refusal rate", "compliance", "KL", "perplexity", "distinct-2"]


def results_table(report: dict) -> list[list]:
    def row(name: str, r: dict) -> list:
        eff = r.get("effect")
        return [name, r["strength"], None if eff is None else round(eff, 4), r["refusal_rate"], r["compliance"],
                round(r["kl"], 4), round(r["perplexity"], 3), round(r["distinct2"], 3)]

    rows = [row("vector", r) for r in report["results"]]
    rows += [row("prompted" if r["strength"] == 0 else "prompted + steered", r)
             for r in (report.get("prompted") or {}).get("results", [])]
    rows += [row("random (mean)", r) for r in report.get("random_baseline_mean", [])]
    return rows


def vector_effect(ctx: AppContext, vec):
    """``(scorer, label)`` of the vector's own effect measure, read with the app's probe library."""
    from ..measure.effect import effect_for

    return effect_for(ctx.lm, vec, ctx.probes)


def build(ctx: AppContext, steer: dict) -> dict:
    reports = ReportDirs()
    names = ctx.compatible_vectors()
    with gr.Row():
        vector = gr.Dropdown(names, value=("refusal_style" if "refusal_style" in names else (names or [None])[0]),
                             label="Vector")
        strengths = gr.Textbox(label="Strengths (comma-separated)", value="0, 15, 25, 35, 45")
        operator = gr.Radio(list(OPERATORS), value="add", label="Operator")
        layer = gr.Dropdown(["recommended"] + [str(k) for k in range(ctx.lm.n_layers)], value="recommended",
                            label="Layer")
    with gr.Row():
        prompt_set = gr.Dropdown(sorted(PROMPT_SETS) + ["custom"], value="harmless-test", label="Prompts")
        custom = gr.Textbox(label="Custom prompts (one per line, when 'custom')", lines=3)
        limit = gr.Slider(1, 105, value=12, step=1, label="Number of prompts")
        random_k = gr.Slider(0, 3, value=1, step=1, label="Random-direction controls (K)")
        max_tokens = gr.Slider(8, 128, value=32, step=8, label="Max new tokens")
    with gr.Row():
        prompting = gr.Checkbox(False, label="Prompting baseline: also ask for the behaviour in a system prompt")
        instruction = gr.Textbox(label="Instruction (system prompt; empty = from the vector's labels)", lines=1)
    run = gr.Button("Run sweep", variant="primary")
    effect_note = gr.Markdown()
    chart = gr.Plot(label="Effect vs coherence cost")
    table = gr.Dataframe(headers=HEADERS, label="Results", interactive=False)
    samples = gr.JSON(label="Samples (per strength, in prompt order)")
    files = gr.File(label="Report (json + html chart)", file_count="multiple")

    @gpu
    @user_errors
    def on_run(name, strengths_text, op, lay, pset, custom_text, n, k, tokens, ask, instr,
               progress=gr.Progress(track_tqdm=True)):
        check(bool(name), "choose a vector")
        values = parse_strengths(strengths_text)
        if pset == "custom":
            prompts = [line.strip() for line in (custom_text or "").splitlines() if line.strip()]
            check(bool(prompts), "type at least one custom prompt")
        else:
            prompts = load_prompts(pset)
        prompts = prompts[: int(n)]
        vec = ctx.vectors.get(name)
        layers = None if lay in (None, "", "recommended") else [int(lay)]
        effect, label = vector_effect(ctx, vec)
        instruction_text = None
        if ask:
            from ..measure.calibrate import default_instruction

            instruction_text = (instr or "").strip() or default_instruction(vec)
        progress(0, desc="generating all strengths as one batch")
        report = run_sweep(ctx.lm, vec, values, prompts, layers=layers, operator=op, random_baseline=int(k),
                           max_new_tokens=int(tokens), progress=True, effect=effect, effect_label=label,
                           instruction=instruction_text, source={"prompt_source": pset, "vector_name": name})
        out = reports.new() / f"sweep_{name}.json"
        path, html = write_report(report, out)
        sample_view = {f"{r['strength']:g}": r["samples"] for r in report["results"]}
        for r in (report.get("prompted") or {}).get("results", []):
            sample_view[f"prompted {r['strength']:g}"] = r["samples"]
        note = (f"**effect** = {label}: the vector's own measure (higher = more of its + direction); refusal is "
                "one of the cost columns." if label else
                "This vector has no effect measure of its own: the chart shows the refusal rate.")
        if instruction_text:
            note += f" Prompting baseline instruction: *{instruction_text}*"
        return (note, sweep_figure(report), results_table(report), json.loads(json.dumps(sample_view)),
                [str(path), str(html)])

    run.click(on_run, [vector, strengths, operator, layer, prompt_set, custom, limit, random_k, max_tokens,
                       prompting, instruction],
              [effect_note, chart, table, samples, files], concurrency_id=MODEL_QUEUE, concurrency_limit=1,
              api_visibility="private")
    return {"vector": vector, "reports": reports}
