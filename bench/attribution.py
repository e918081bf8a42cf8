"""Attribution patching on the embedded SmolLM2-135M-Instruct: AtP and AtP* against exact activation
patching (Pearson/Spearman per node type), the time of each, and the suggested layers against the layer
the shipped sentiment vector recommends.

    python -m bench.attribution [--pairs 3] [--contrasts sentiment,formality]

Writes bench/attribution.json and bench/attribution.md. CPU, 2 shared cores: the numbers are from
few pairs (the exact reference costs one forward row per node and pair).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_contrast(lm, name: str, n_pairs: int) -> dict:
    from steering_lab.measure import attribution as atp

    pairs = atp.preset_pairs(lm, name, n_pairs)
    fast, fast_wall, fast_cpu = _timed(lambda: atp.attribute(lm, pairs, graddrop=False))
    star, star_wall, star_cpu = _timed(lambda: atp.attribute(lm, pairs, graddrop=True))
    exact, ex_wall, ex_cpu = _timed(lambda: atp.activation_patching(lm, pairs, batch_size=24))
    # the GradDrop run recomputes atp/atp_qk too: take those from the run without GradDrop (same numbers)
    star.estimates["atp"], star.estimates["atp_qk"] = fast.estimates["atp"], fast.estimates["atp_qk"]
    corr = atp.correlations(star, exact)
    n_nodes = sum(v.numel() for v in exact["effects"].values())
    suggested = {m: atp.suggest_layers(star, 3, method=m) for m in atp.METHODS}
    suggested["exact"] = atp.suggest_layers(exact["effects"]["layers"], 3)
    suggested["atp_star_heads"] = atp.suggest_layers(star, 3, method="atp_star", source="heads")
    suggested["exact_heads"] = atp.suggest_layers(exact["effects"]["heads"], 3)
    suggested["atp_star_onset"] = atp.suggest_layers(star, 1, method="atp_star", rule="onset")
    suggested["exact_onset"] = atp.suggest_layers(exact["effects"]["layers"], 1, rule="onset")
    return {
        "contrast": name, "n_pairs": len(pairs), "metric": star.metric,
        "clean_metric": star.clean_metric, "corrupt_metric": star.corrupt_metric,
        "prompt_tokens": [len(p.clean) for p in pairs],
        "n_nodes": n_nodes, "nodes": {t: int(v.numel()) for t, v in exact["effects"].items()},
        "timing": {"atp_qk": {"wall_s": fast_wall, "cpu_s": fast_cpu},
                   "atp_star_graddrop": {"wall_s": star_wall, "cpu_s": star_cpu},
                   "activation_patching": {"wall_s": ex_wall, "cpu_s": ex_cpu,
                                           "forward_rows": exact["n_forward_rows"]}},
        "correlations": corr, "suggested_layers": suggested,
        "exact_layers": exact["effects"]["layers"].tolist(),
        "atp_layers": fast.estimates["atp"]["layers"].tolist(),
        "atp_star_layers": star.estimates["atp_star"]["layers"].tolist(),
        "top_heads_exact": _top(exact["effects"]["heads"]), "top_heads_atp_star": atp.top_nodes(star, "heads", 5),
    }


def _top(t: torch.Tensor, k: int = 5) -> list[dict]:
    flat = t.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True)[:k].tolist()
    return [{"layer": i // t.shape[1], "head": i % t.shape[1], "effect": float(flat[i])} for i in order]


def _f(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _onset(r: dict) -> tuple[int, int]:
    from steering_lab.measure.attribution import suggest_layers

    return (suggest_layers(torch.tensor(r["atp_star_layers"]), 1, rule="onset")[0],
            suggest_layers(torch.tensor(r["exact_layers"]), 1, rule="onset")[0])


def markdown(report: dict) -> str:
    rs = report["results"]
    sent = next((r for r in rs if r["contrast"] == "sentiment"), rs[0])
    corr = {(c["node_type"], c["method"], c["compare"]): c for c in sent["correlations"]}

    def cell(t, m, kind):
        c = corr.get((t, m, kind))
        return "—" if c is None else f"{_f(c['pearson'])} / {_f(c['spearman'])}"

    tm = sent["timing"]
    lines = [
        "# Attribution patching (AtP, AtP*) on the embedded model", "",
        "## README snippet", "",
        "| attribution patching: AtP and AtP* (QK fix, GradDrop) | Kramár, Lieberum, Shah, Nanda, 2024, "
        "arXiv 2403.00745; Nanda 2023 (AtP) | `steering_lab.measure.attribution` / `steering-lab attribution` / "
        "Extract tab > Attribution patching |", "",
        f"- On SmolLM2-135M, {sent['contrast']} ({sent['n_pairs']} pairs, metric {sent['metric']}: clean "
        f"{sent['clean_metric']:+.2f}, corrupt {sent['corrupt_metric']:+.2f}), {sent['n_nodes']} nodes at the last "
        "position, estimate vs exact patching (Pearson / Spearman, by |effect|): "
        f"layers AtP {cell('layers', 'atp', 'abs')}, AtP* {cell('layers', 'atp_star', 'abs')}; "
        f"heads AtP {cell('heads', 'atp', 'abs')}, AtP* {cell('heads', 'atp_star', 'abs')}; "
        f"queries AtP {cell('queries', 'atp', 'abs')}, QK-fixed {cell('queries', 'atp_qk', 'abs')}.",
        f"- Cost: AtP (+QK fix) {tm['atp_qk']['cpu_s']:.0f} s CPU, AtP* with GradDrop "
        f"{tm['atp_star_graddrop']['cpu_s']:.0f} s, exact patching {tm['activation_patching']['cpu_s']:.0f} s "
        f"({tm['activation_patching']['forward_rows']} forward rows: one per node and pair).",
        f"- Suggested layers (top |effect|): AtP* {sent['suggested_layers']['atp_star']}, exact "
        f"{sent['suggested_layers']['exact']}; by summed heads: AtP* {sent['suggested_layers']['atp_star_heads']}, "
        f"exact {sent['suggested_layers']['exact_heads']}; onset (first layer with half the largest effect): "
        f"AtP* {_onset(sent)[0]}, exact {_onset(sent)[1]}; the shipped sentiment vector uses layer "
        f"{report.get('shipped_sentiment_layer')}.",
        "- Reading: " + report.get("reading", ""), "",
        "## Setup", "",
        f"- date: {report['date']}; machine: {report['machine']}; command: `{report['command']}`",
        f"- model: {report['model']}; torch {report['torch']}",
        "- pairs: each preset text in one chat turn 'Is this text A or B? \"TEXT\"' with the answer begun "
        "'The text is'; clean = positive text, corrupt = negative one; metric = logit(' A') - logit(' B') "
        "at the last position; nodes at the last position (aligned at the last token).",
        "- baseline (same run): exact activation patching, one forward row per node and pair.", "",
    ]
    for r in rs:
        lines += [f"## {r['contrast']}: {r['n_pairs']} pairs, {r['n_nodes']} nodes {r['nodes']}", "",
                  "| node type | method | compare | n nodes | Pearson | Spearman |", "|---|---|---|---|---|---|"]
        for c in r["correlations"]:
            lines.append(f"| {c['node_type']} | {c['method']} | {c['compare']} | {c['n_nodes']} | {_f(c['pearson'])} | "
                         f"{_f(c['spearman'])} |")
        t = r["timing"]
        lines += ["", "| run | wall s | CPU s |", "|---|---|---|"]
        for k, v in t.items():
            lines.append(f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |")
        lines += ["", f"suggested layers: {json.dumps(r['suggested_layers'])}; onset (AtP*, exact): {_onset(r)}", "",
                  "per-layer effect (exact): " + ", ".join(f"{x:+.2f}" for x in r["exact_layers"]), "",
                  "per-layer AtP: " + ", ".join(f"{x:+.2f}" for x in r["atp_layers"]), "",
                  f"top heads, exact: {r['top_heads_exact']}", "", f"top heads, AtP*: {r['top_heads_atp_star']}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--contrasts", default="sentiment")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="keep the other contrasts' results of bench/attribution.json")
    ap.add_argument("--render", action="store_true", help="only rewrite attribution.md from attribution.json")
    args = ap.parse_args(argv)
    prev = HERE / "attribution.json"
    if args.render:
        (HERE / "attribution.md").write_text(markdown(json.loads(prev.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    from steering_lab.measure.attribution import save_json
    from steering_lab.model import load_model
    from steering_lab.resources import resolve
    from steering_lab.vector import SteeringVector

    lm = load_model()
    shipped = SteeringVector.load(resolve("vectors", "sentiment")).recommended_layer
    results = [run_contrast(lm, name.strip(), args.pairs) for name in args.contrasts.split(",") if name.strip()]
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": "2-core CPU, shared", "platform": platform.platform(),
              "command": "python -m bench.attribution " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": lm.name, "torch": torch.__version__, "shipped_sentiment_layer": shipped, "results": results}
    if prev.exists():  # keep a hand-written reading across re-runs
        old = json.loads(prev.read_text())
        report["reading"] = old.get("reading", "")
        if args.append:
            done = {r["contrast"] for r in results}
            report["results"] = [r for r in old.get("results", []) if r["contrast"] not in done] + results
            report["command"] = old.get("command", "") + "; " + report["command"]
    save_json(report, HERE / "attribution.json")
    (HERE / "attribution.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
