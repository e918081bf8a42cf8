"""Linear-AcT against mean-difference addition on the embedded model, at matched KL.

    python bench/transport.py [--toward negative|positive|both] [--prompts 16] [--tokens 32] [--cache DIR]

Sentiment preset (toward negative: the positive answers are the source, the default, since the
unsteered answers to neutral prompts already read positive; toward positive: the negative ones are).
For each method a strength sweep on neutral prompts (greedy), scored by

* effect: the mean VADER compound of the generated answers (vaderSentiment, a lexicon we did not
  write; the same score bench/calibrate_strength.py uses), -1..1;
* cost: mean KL(steered || unsteered) over the generated tokens (``metrics.score_texts``: the
  unsteered model reading the steered text, teacher-forced), perplexity under the unsteered model,
  distinct-2 (1 = no repeated word pairs).

Methods: ``mean_diff`` = the existing extraction (``extract(..., "mean_diff")``: unit direction at its
recommended layer, ``add`` at strengths +-fraction x the layer's median token norm); ``linear_act`` =
``fit_linear_act`` at every block (pooling over response tokens, support, causal estimation), operator
``transport`` at lambda 0..1; and ablations of it (``_1layer``: at the mean-diff layer only;
``_nosupport``: every value transported).
The effect of each method is interpolated (piecewise linear in KL, sweeps sorted by strength) at
common KL levels up to the smaller of the two maximum KLs of mean_diff and linear_act (the largest
lambda is 1, full transport), so the comparison is at equal cost.
Writes ``OUT.json`` (every sweep point, with two samples each) and ``OUT.md`` (the tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: E402

from steering_lab.datasets import load_preset, neutral_prompts  # noqa: E402
from steering_lab.directions.transport import fit_linear_act  # noqa: E402
from steering_lab.extract import extract  # noqa: E402
from steering_lab.generate import sweep_generate  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.metrics import mean_distinct_n, nanmean, score_texts  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.vector import SteeringVector  # noqa: E402

# mean_diff: strength = fraction x median |h| at the layer
FRACTIONS = [0.0, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3]
LAMBDAS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0]
VARIANTS = {"linear_act": {}, "linear_act_1layer": "layer", "linear_act_nosupport": {"support": False}}
KL_LEVELS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0]  # nats/token, where methods are compared
VADER = SentimentIntensityAnalyzer()


def vader(text: str) -> float:
    return VADER.polarity_scores(text)["compound"]


def sweep(lm, prompts, vector, strengths, layers, operator, tokens, rows) -> list[dict]:
    texts = sweep_generate(lm, prompts, vector, strengths, layers=layers, operator=operator, batch_rows=rows,
                           max_new_tokens=tokens)
    flat = [(s, i) for s in strengths for i in range(len(prompts))]
    scores = score_texts(lm, [prompts[i] for _, i in flat], [texts[float(s)][i] for s, i in flat],
                         Steer(vector, [s for s, _ in flat], layers=layers, operator=operator), batch_size=32)
    n, out = len(prompts), []
    for j, s in enumerate(strengths):
        t = texts[float(s)]
        out.append({"strength": float(s), "vader": statistics.mean(vader(x) for x in t),
                    "kl": nanmean(scores.kl[j * n:(j + 1) * n]),
                    "perplexity": nanmean(scores.perplexity[j * n:(j + 1) * n]),
                    "distinct2": mean_distinct_n(t), "samples": t[:2]})
    return out


def at_kl(points: list[dict], levels: list[float], key: str) -> list[float | None]:
    """``key`` interpolated at KL ``levels`` along the sweep (by strength; KL made non-decreasing)."""
    kl = np.maximum.accumulate(np.array([p["kl"] for p in points]))
    val = np.array([p[key] for p in points])
    return [float(np.interp(x, kl, val)) if x <= kl[-1] + 1e-9 else None for x in levels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--toward", default="negative", choices=("negative", "positive", "both"))
    ap.add_argument("--variants", default="linear_act,linear_act_1layer,linear_act_nosupport",
                    help=f"Linear-AcT variants to run (of {', '.join(VARIANTS)})")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rows", type=int, default=128, help="rows per generation batch")
    ap.add_argument("--cache", default=None, help="folder for the fitted vectors (reused when present)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("transport")))
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json (no model run)")
    args = ap.parse_args()
    if args.report_only:
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return
    torch.manual_seed(0)
    t0 = time.time()
    lm = load_model(device=args.device)
    contrast = load_preset("sentiment")
    prompts = neutral_prompts()[:args.prompts]
    md, scan = extract(lm, contrast, "mean_diff", batch_size=33)
    layer = md.recommended_layer
    norm = scan.row(layer).token_norm
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    towards = ["negative", "positive"] if args.toward == "both" else [args.toward]
    out = Path(args.out)
    report = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype), "n_prompts": len(prompts),
              "max_new_tokens": args.tokens, "mean_diff_layer": layer, "token_norm": norm, "fractions": FRACTIONS,
              "lambdas": LAMBDAS, "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} "
              "torch threads", "date": str(datetime.date.today()), "runs": {}, "timing_s": {}}

    def save() -> None:
        report["timing_s"]["total"] = round(time.time() - t0, 1)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(report))

    for toward in towards:
        sign = 1.0 if toward == "positive" else -1.0
        runs = report["runs"].setdefault(toward, {})
        t = time.time()
        runs["mean_diff"] = sweep(lm, prompts, md, [sign * round(f * norm, 3) + 0.0 for f in FRACTIONS], [layer], "add",
                                  args.tokens, args.rows)
        report["timing_s"][f"sweep mean_diff toward {toward}"] = round(time.time() - t, 1)
        save()
        for name in variants:
            kw = {"layers": [layer]} if VARIANTS[name] == "layer" else dict(VARIANTS[name])
            cached = Path(args.cache) / f"{name}_{toward}" if args.cache else None
            t = time.time()
            if cached is not None and cached.with_suffix(".safetensors").is_file():
                vec = SteeringVector.load(cached)
            else:
                vec = fit_linear_act(lm, contrast, toward=toward, batch_size=33, **kw)
                report["timing_s"][f"fit {name} toward {toward}"] = round(time.time() - t, 1)
                if cached is not None:
                    vec.save(cached)
            t = time.time()
            runs[name] = sweep(lm, prompts, vec, LAMBDAS, vec.layers, "transport", args.tokens, args.rows)
            report["timing_s"][f"sweep {name} toward {toward}"] = round(time.time() - t, 1)
            save()
            print(f"toward {toward}, {name}: done at {time.time() - t0:.0f} s", flush=True)
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# Linear-AcT vs mean-difference addition at matched KL ({report['model']}, sentiment)", "",
             f"Generated by `python bench/transport.py` on {report['machine']} ({report['device']}, {report['dtype']}),"
             f" {report['date']}: {report['n_prompts']} neutral prompts, greedy, {report['max_new_tokens']} new "
             "tokens. Effect = mean VADER compound of the answers (-1..1); cost = mean KL(steered || unsteered) "
             "over the generated tokens (nats/token). mean_diff: `add` of the unit mean-difference direction at "
             f"layer {report['mean_diff_layer']} (strength = fraction x median token norm {report['token_norm']:.1f}); "
             "linear_act: `transport` at every block (support, causal estimation); _nosupport: without the support "
             f"limit; _1layer: at layer {report['mean_diff_layer']} only. Values between sweep points are interpolated "
             "linearly in KL; '-' = the method never reaches that KL in its sweep.", "",
             "## README snippet", "",
             "| method | paper (authors, year, arXiv id) | library / CLI / app |", "|---|---|---|",
             "| Linear-AcT: per-unit affine transport maps (sorted samples, least squares) from the source to the "
             "target class, applied with lambda in [0, 1] | Rodriguez et al., 2024, *Controlling Language and "
             "Diffusion Models by Transporting Activations*, arXiv 2410.23054 | `steering_lab.directions.transport` "
             "(`fit_transport`, `fit_linear_act`), "
             "operator `transport` / `steering-lab transport fit`, `generate --operator transport --strength L` / "
             "Extract tab > Linear-AcT, Steer tab operator transport |", ""]
    for toward, runs in report["runs"].items():
        if "linear_act" in runs:
            top = min(max(p["kl"] for p in runs[n]) for n in ("mean_diff", "linear_act"))
            md_v, act_v = (at_kl(runs[n], [top], "vader")[0] for n in ("mean_diff", "linear_act"))
            lines.append(f"- Sentiment toward {toward}, {report['n_prompts']} neutral prompts, "
                         f"{report['max_new_tokens']} greedy tokens, {report['model']} on {report['device']}: at "
                         f"matched KL {top:.3f} nats/token, VADER (unsteered {runs['mean_diff'][0]['vader']:+.2f}) "
                         f"{md_v:+.2f} with mean-difference addition, {act_v:+.2f} with Linear-AcT (all blocks). "
                         f"Linear-AcT's reach is bounded: lambda 1 (full transport) costs "
                         f"{runs['linear_act'][-1]['kl']:.3f}, distinct-2 {runs['linear_act'][-1]['distinct2']:.2f}; "
                         f"mean-difference addition goes on to KL {runs['mean_diff'][-1]['kl']:.3f}, distinct-2 "
                         f"{runs['mean_diff'][-1]['distinct2']:.2f}.")
    lines.append("")
    for toward, runs in report["runs"].items():
        names = list(runs)
        top = min(max(p["kl"] for p in runs[n]) for n in ([n for n in ("mean_diff", "linear_act") if n in runs]))
        levels = [x for x in KL_LEVELS if x < top - 1e-3] + [top]
        base = runs["mean_diff"][0]["vader"]
        lines += [f"## Toward {toward} (unsteered VADER {base:+.3f})", "",
                  "| KL | " + " | ".join(f"{n} VADER" for n in names) + " | " + " | ".join(
                      f"{n} d2" for n in names) + " | mean_diff strength | linear_act lambda |",
                  "|---:|" + "---:|" * (2 * len(names) + 2)]
        eff = {n: at_kl(runs[n], levels, "vader") for n in names}
        d2 = {n: at_kl(runs[n], levels, "distinct2") for n in names}
        st = {n: at_kl(runs[n], levels, "strength") if n in runs else [None] * len(levels)
              for n in ("mean_diff", "linear_act")}

        def f(x, fmt="{:+.3f}"):
            return "-" if x is None else fmt.format(x)

        for j, lv in enumerate(levels):
            lines.append(f"| {lv:.3f} | " + " | ".join(f(eff[n][j]) for n in names) + " | "
                         + " | ".join(f(d2[n][j], "{:.2f}") for n in names) + f" | {f(st['mean_diff'][j], '{:+.1f}')}"
                         + f" | {f(st['linear_act'][j], '{:.2f}')} |")
        lines += ["", "Sweep points (strength: VADER / KL / perplexity / distinct-2):", ""]
        for n in names:
            pts = "; ".join(f"{p['strength']:g}: {p['vader']:+.2f}/{p['kl']:.3f}/{p['perplexity']:.1f}/"
                            f"{p['distinct2']:.2f}" for p in runs[n])
            lines.append(f"- {n}: {pts}")
        lines.append("")
    lines.append(f"Timing (s): {json.dumps(report['timing_s'])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
