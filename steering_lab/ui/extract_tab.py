"""Extract tab: a contrast set -> layer scan chart -> a vector saved in the library.

A contrast set comes from a bundled preset, from pairs typed into a table, from ActAdd's two prompts,
or from uploaded files; no file is needed for a first visit.
"""

from __future__ import annotations

from collections.abc import Sequence

import gradio as gr

from ..datasets import PRESETS, ContrastSet, load_preset, load_user
from ..errors import check
from ..extract import METHODS, extract
from .charts import layer_scan_figure
from .context import MODEL_QUEUE, AppContext, gpu, user_errors
from .library import validate_name

POSITIONS = ["auto", "last", "mean", "max", "response_mean"]
SOURCES = {"preset": "preset", "type pairs": "table", "ActAdd prompts": "actadd", "upload files": "upload"}
MAX_PAIRS = 500
EXAMPLE_PAIRS = [
    ["I'm thrilled, this is the best day I've had in years!", "I'm furious, this is the worst day I've had in years!"],
    ["What a lovely surprise, thank you so much!", "What a rotten trick, I can't stand you!"],
    ["The concert was a joy from start to finish.", "The concert was a disaster from start to finish."],
    ["I adore how kind everyone has been to me.", "I hate how rude everyone has been to me."],
    ["Our trip went wonderfully and we laughed all week.", "Our trip went terribly and we argued all week."],
    ["This little café makes me so happy.", "This filthy café makes me so angry."],
]
ACTADD_EXAMPLE = ("Love", "Hate")


def pairs_contrast(rows, name: str) -> ContrastSet:
    """A contrast set from typed (positive, negative) rows; empty rows are skipped."""
    if rows is not None and hasattr(rows, "values") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.values.tolist()
    pos, neg = [], []
    for i, row in enumerate(rows or [], 1):
        cells = ["" if c is None else str(c).strip() for c in (list(row) + ["", ""])[:2]]
        if cells == ["", ""]:
            continue
        check(all(cells), f"pair {i}: type both a positive and a negative text (or clear the row)")
        pos.append(cells[0])
        neg.append(cells[1])
    check(bool(pos), "type at least one pair of texts (positive, negative) into the table")
    check(len(pos) <= MAX_PAIRS, f"at most {MAX_PAIRS} pairs")
    return ContrastSet(name=name, positive=pos, negative=neg, description=f"{name}: {len(pos)} typed pairs")


def actadd_contrast(positive: str, negative: str, name: str) -> ContrastSet:
    """ActAdd's two prompts as a one-pair contrast set (the direction is their activation difference)."""
    check(bool((positive or "").strip()) and bool((negative or "").strip()),
          "type both ActAdd prompts (e.g. 'Love' and 'Hate')")
    return ContrastSet(name=name, positive=[positive.strip()], negative=[negative.strip()],
                       description=f"ActAdd: {positive.strip()!r} - {negative.strip()!r}")


def attach_effect_probe(ctx: AppContext, vec, contrast, name: str) -> str:
    """Train the vector's own effect measure (a probe on its contrast set's two poles as text, layer
    chosen on a validation split, AUROC on a test split) and save it as ``NAME-effect`` in the
    visitor's probe library; returns what was done, for the summary."""
    from ..measure.effect import set_measure, train_effect_probe

    if min(len(contrast.positive), len(contrast.negative)) < 6:
        return "none: an effect probe needs at least 6 examples per side (sweeps fall back to refusal)"
    probe_name = f"{name}-effect"[:64]
    probe, measure = train_effect_probe(ctx.lm, contrast, probe_name)
    saved = ctx.probes.save(probe, probe_name, overwrite=ctx.probes.is_user(probe_name))
    set_measure(vec, type(measure)(kind="probe", name=saved, sign=1, description=measure.description))
    return f"probe {saved} (layer {probe.layer}, test AUROC {probe.metrics.get('test_auroc', float('nan')):.3f})"


def run_extract(ctx: AppContext, source: str, preset: str | None, pos_file: str | None, neg_file: str | None,
                method: str, layers: str, position: str, name: str, *, pairs: Sequence | None = None,
                actadd: tuple[str, str] | None = None) -> tuple[dict, object]:
    """Extract and save; returns (summary dict, layer-scan figure). Shared by the tab and the API.

    ``source``: ``preset`` (a bundled set), ``upload`` (``pos_file``/``neg_file``), ``table``
    (``pairs``: rows of positive, negative) or ``actadd`` (``actadd``: two prompts; method actadd)."""
    name = validate_name(name)
    ctx.vectors.target(name)  # fail on a taken name before the long part
    check(method in METHODS, f"unknown method {method!r}")
    if source == "preset":
        check(bool(preset), "choose a preset")
        contrast = load_preset(preset)
    elif source == "table":
        contrast = pairs_contrast(pairs, name)
    elif source == "actadd":
        contrast = actadd_contrast(*(actadd or ("", "")), name)
        method = "actadd"
    else:
        check(source == "upload", f"unknown source {source!r}")
        check(pos_file is not None, "upload a contrast set: a .jsonl/.csv with both classes, or two text files")
        contrast = load_user(pos_file, neg_file, name=name)
    check(method != "pca" or len(contrast.positive) >= 2, "pca needs at least 2 pairs")
    vec, scan = extract(ctx.lm, contrast, method, layers=(layers or "").strip() or None,
                        position=None if position in (None, "", "auto") else position, progress=True)
    effect = attach_effect_probe(ctx, vec, contrast, name)
    saved = ctx.vectors.save(vec, name)
    summary = {"name": saved, "method": method, "dataset": contrast.name,
               "recommended_layer": vec.recommended_layer, "recommended_strength": vec.recommended_strength,
               "heldout_auroc_at_layer": scan.row(vec.recommended_layer).auroc, "in_sample": scan.in_sample,
               "n_pairs": len(contrast.positive), "layers": vec.layers, "effect_measure": effect}
    fig = layer_scan_figure(scan.to_dict()["rows"], scan.recommended_layer,
                            title=f"Layer scan: {contrast.name} ({method})")
    return summary, fig


def build(ctx: AppContext, steer: dict) -> dict:
    with gr.Row():
        source = gr.Radio(list(SOURCES), value="preset", label="Contrast set", elem_id="extract-source",
                          info="a bundled set, pairs you type, ActAdd's two prompts, or your own files")
        method = gr.Dropdown(list(METHODS), value="mean_diff", label="Method",
                             info="ActAdd prompts always use actadd")
    with gr.Group(visible=True) as preset_box:
        preset = gr.Dropdown(sorted(PRESETS), value="sentiment", label="Preset")
    with gr.Group(visible=False) as table_box:
        pairs = gr.Dataframe(value=[list(r) for r in EXAMPLE_PAIRS], headers=["positive", "negative"],
                             datatype=["str", "str"], column_count=2,
                             type="array", interactive=True, wrap=True, elem_id="extract-pairs",
                             label="Contrast pairs: each row one text with the behaviour (positive) and one without "
                                   "(negative); edit, add or delete rows. 4+ pairs give a held-out layer scan.")
    with gr.Group(visible=False) as actadd_box, gr.Row():
        actadd_pos = gr.Textbox(value=ACTADD_EXAMPLE[0], label="ActAdd: the prompt to steer towards",
                                elem_id="actadd-positive")
        actadd_neg = gr.Textbox(value=ACTADD_EXAMPLE[1], label="ActAdd: the prompt to steer away from",
                                elem_id="actadd-negative")
    with gr.Group(visible=False) as upload_box, gr.Row():
        pos_file = gr.File(label="Positive examples (.txt, one per line) — or a .jsonl/.csv with both classes",
                           file_types=[".txt", ".jsonl", ".csv", ".json"], type="filepath")
        neg_file = gr.File(label="Negative examples (.txt, one per line; not needed for .jsonl/.csv)",
                           file_types=[".txt"], type="filepath")
    with gr.Row():
        layers = gr.Textbox(label="Layers (e.g. 4-12; empty = all)", value="")
        position = gr.Dropdown(POSITIONS, value="auto", label="Position",
                               info="auto: response mean for prompt+response sets, else last prompt token")
        name = gr.Textbox(label="Save as", value="my_vector", elem_id="extract-name")
    run = gr.Button("Extract", variant="primary")
    summary = gr.JSON(label="Result")
    chart = gr.Plot(label="Layer scan")

    boxes = [preset_box, table_box, actadd_box, upload_box]

    def on_source(label):
        return [gr.update(visible=SOURCES[label] == kind) for kind in ("preset", "table", "actadd", "upload")]

    source.change(on_source, source, boxes, queue=False, api_visibility="private")

    @gpu
    @user_errors
    def on_extract(src, pre, rows, a_pos, a_neg, pf, nf, meth, lay, posn, nm, progress=gr.Progress(track_tqdm=True)):
        progress(0, desc="collecting activations")
        result, fig = run_extract(ctx, SOURCES.get(src, src), pre, pf, nf, meth, lay, posn, nm, pairs=rows,
                                  actadd=(a_pos, a_neg))
        return result, fig, gr.update(choices=ctx.compatible_vectors())

    run.click(on_extract, [source, preset, pairs, actadd_pos, actadd_neg, pos_file, neg_file, method, layers,
                           position, name],
              [summary, chart, steer["vectors"]], concurrency_id=MODEL_QUEUE, concurrency_limit=1,
              api_visibility="private")
    return {"pairs": pairs, "source": source}
