"""Bench: PPLM (Dathathri et al. 2020) against mean-difference steering on sentiment, same run.

    python -m bench.pplm [--prompts 5] [--tokens 15]

On the embedded SmolLM2-135M-Instruct (CPU), for the first N neutral prompts of
``steering_lab/data/neutral.txt``, greedy, T new tokens, toward positive and toward negative:

* unsteered (the decode engine, one prompt at a time);
* mean-diff: the shipped ``sentiment`` vector at its recommended layer and +/- its recommended strength;
* PPLM-BoW: word lists ``data/pplm/positive.txt`` / ``negative.txt``;
* PPLM-probe: the shipped ``sentiment`` probe (a linear probe on the sentiment contrast set's answer
  texts, mean pooling; if it is missing, one is trained here with ``probes.train_probe`` at layer 20),
  class positive / negative.

Effect: VADER compound sentiment of the generated text (vaderSentiment, a lexicon we did not write;
-1..+1). Fluency: perplexity of the text under the unsteered model, distinct-2 (mean per text).
Speed: generated tokens per second, batch 1, one torch thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP (shared machine)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_lab.control import pplm  # noqa: E402
from steering_lab.datasets import ContrastSet, load_preset  # noqa: E402
from steering_lab.generate import generate  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.metrics import distinct_n, nanmean, score_texts  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.probes import Probe, train_probe  # noqa: E402
from steering_lab.vector import SteeringVector, atomic_write_bytes, atomic_write_json  # noqa: E402

log = logging.getLogger("bench.pplm")
OUT = Path(__file__).resolve().parent
PROBE_LAYER = 20
BOW_CFG = dict(stepsize=0.05, iterations=3, kl_scale=0.01, gm_scale=0.9, gamma=1.5)
PROBE_CFG = dict(stepsize=0.05, iterations=3, kl_scale=0.01, gm_scale=0.9, gamma=1.0, horizon_length=1)


def sentiment_probe(lm):
    shipped = ROOT / "steering_lab/shipped/probes/sentiment"
    if shipped.with_suffix(".safetensors").exists():
        return Probe.load(shipped, lm)
    cs = load_preset("sentiment")
    texts = ContrastSet(name="sentiment (answers)", positive=cs.positive, negative=cs.negative,
                        description="cheerful (1) vs gloomy (0) answer text, mean over its tokens")
    probe, _ = train_probe(lm, texts, pooling="mean", chat=False, layer=PROBE_LAYER)
    probe.description = "sentiment: cheerful (1) vs gloomy (0) answer text, mean over its tokens"
    return probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=15)
    ap.add_argument("--render", action="store_true", help="only rewrite pplm.md from pplm.json")
    args = ap.parse_args()
    if args.render:
        atomic_write_bytes(OUT / "pplm.md", render(json.loads((OUT / "pplm.json").read_text())).encode())
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    lm = load_model()
    prompts = [p for p in (ROOT / "steering_lab/data/neutral.txt").read_text().splitlines() if p.strip()]
    prompts = prompts[: args.prompts]
    vec = SteeringVector.load(ROOT / "steering_lab/shipped/vectors/sentiment")
    layer, strength = vec.recommended_layer, vec.recommended_strength
    probe = sentiment_probe(lm)
    log.info("probe layer %d held-out AUROC %.3f", probe.layer, probe.metrics["test_auroc"])

    def engine_run(steering):
        texts, secs, n = [], 0.0, 0
        for p in prompts:
            t0 = time.perf_counter()
            text = generate(lm, p, steering, max_new_tokens=args.tokens)[0]
            secs += time.perf_counter() - t0
            texts.append(text)
            n += len(lm.encode(text, special=False))
        return texts, n / secs

    def pplm_run(attr, cfg):
        texts, secs, n = [], 0.0, 0
        for i, p in enumerate(prompts):
            r = pplm.generate(lm, p, attr, pplm.PPLMConfig(max_new_tokens=args.tokens, **cfg))
            texts.append(r.text)
            secs += r.seconds
            n += len(r.token_ids)
            log.info("%s %d/%d %.2f tok/s: %s", attr.name, i + 1, len(prompts), r.tokens_per_s, r.text[:80])
        return texts, n / secs

    runs = {}
    runs["unsteered"] = ("none", *engine_run(()))
    for sign, target in ((1, "positive"), (-1, "negative")):
        steer = [Steer(vec, sign * strength, layers=[layer])]
        runs[f"mean-diff {target}"] = (target, *engine_run(steer))
        runs[f"PPLM-BoW {target}"] = (target, *pplm_run(pplm.bag_of_words(lm, target), BOW_CFG))
        runs[f"PPLM-probe {target}"] = (target, *pplm_run(pplm.probe_attribute(lm, probe, 1 if sign > 0 else 0),
                                                          PROBE_CFG))
    rows = []
    for name, (target, texts, speed) in runs.items():
        ppl = score_texts(lm, prompts, texts).perplexity
        rows.append({"method": name, "target": target,
                     "vader": statistics.mean(vader.polarity_scores(t)["compound"] for t in texts),
                     "perplexity": nanmean(ppl), "distinct2": statistics.mean(distinct_n(t, 2) for t in texts),
                     "tokens_per_s": speed, "first": texts[0], "texts": texts})
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python -m bench.pplm", *sys.argv[1:]])
    meta = {"date": now, "machine": "2-core CPU, shared", "command": command, "model": lm.name,
            "torch": torch.__version__, "python": platform.python_version(), "prompts": prompts,
            "max_new_tokens": args.tokens, "decoding": "greedy", "threads": 1,
            "mean_diff": {"layer": layer, "strength": strength}, "pplm_bow": BOW_CFG, "pplm_probe": PROBE_CFG,
            "probe": {"layer": probe.layer, "pooling": probe.pooling, "test_auroc": probe.metrics["test_auroc"]},
            "rows": rows}
    atomic_write_json(OUT / "pplm.json", meta)
    atomic_write_bytes(OUT / "pplm.md", render(meta).encode())
    print(render(meta))


def reading(rows: dict, u: dict) -> str:
    def cmp(a: float, b: float) -> str:
        return "about as far as" if abs(a - b) < 0.1 else ("further than" if abs(a) > abs(b) else "less far than")

    parts = []
    for kind in ("BoW", "probe"):
        for t in ("positive", "negative"):
            a = rows[f"PPLM-{kind} {t}"]["vader"] - u["vader"]
            b = rows[f"mean-diff {t}"]["vader"] - u["vader"]
            parts.append(f"PPLM-{kind} moves VADER toward {t} {cmp(a, b)} mean-diff ({a:+.2f} vs {b:+.2f})")
    return ("- Reading: " + "; ".join(parts) + ". PPLM needs no steering vector but costs an order of magnitude in "
            "speed. Few prompts and tokens (the shared machine's budget), one greedy sample each and a lexicon "
            "score: differences under ~0.1-0.2 VADER are within noise; PPLM's step sizes were not tuned here.")


def render(meta: dict) -> str:
    rows = {r["method"]: r for r in meta["rows"]}
    u = rows["unsteered"]

    def shift(name):
        return rows[name]["vader"] - u["vader"]

    speed_md = rows["mean-diff positive"]["tokens_per_s"]
    speed_bow = nanmean([rows[f"PPLM-BoW {t}"]["tokens_per_s"] for t in ("positive", "negative")])
    speed_probe = nanmean([rows[f"PPLM-probe {t}"]["tokens_per_s"] for t in ("positive", "negative")])
    lines = [
        "# PPLM bench: sentiment, PPLM vs mean-diff steering (same run)", "",
        "## README snippet", "",
        "| method | paper (authors, year, arXiv id) | library / CLI / app |",
        "|---|---|---|",
        "| PPLM: gradient steps on the KV cache toward a bag of words or a linear probe, KL to the unsteered "
        "distribution, post-norm fusion (slow: several forward+backward passes per token) | Dathathri et al., 2020, "
        "arXiv 1912.02164 | `steering_lab.control.pplm` / `steering-lab pplm` / Steer tab > More ways to steer > "
        "PPLM (slow) |", "",
        f"- Sentiment on {len(meta['prompts'])} neutral prompts, {meta['max_new_tokens']} greedy tokens, "
        f"SmolLM2-135M on a shared 2-core CPU. VADER compound (unsteered {u['vader']:+.2f}) moves by "
        f"{shift('mean-diff positive'):+.2f} / {shift('mean-diff negative'):+.2f} with mean-diff steering "
        f"(positive / negative), {shift('PPLM-BoW positive'):+.2f} / {shift('PPLM-BoW negative'):+.2f} with "
        f"PPLM-BoW and {shift('PPLM-probe positive'):+.2f} / {shift('PPLM-probe negative'):+.2f} with PPLM and a "
        "linear sentiment probe.",
        f"- Fluency: perplexity under the unsteered model {u['perplexity']:.1f} unsteered; mean-diff "
        f"{rows['mean-diff positive']['perplexity']:.1f} / {rows['mean-diff negative']['perplexity']:.1f}, PPLM-BoW "
        f"{rows['PPLM-BoW positive']['perplexity']:.1f} / {rows['PPLM-BoW negative']['perplexity']:.1f}, PPLM-probe "
        f"{rows['PPLM-probe positive']['perplexity']:.1f} / {rows['PPLM-probe negative']['perplexity']:.1f}.",
        f"- Speed (batch 1, one thread): engine with mean-diff {speed_md:.1f} tok/s, PPLM-BoW {speed_bow:.2f} tok/s, "
        f"PPLM-probe {speed_probe:.2f} tok/s ({speed_md / speed_bow:.0f}x / {speed_md / speed_probe:.0f}x slower).",
        reading(rows, u), "",
        "## Setup", "",
        f"Date {meta['date']}; machine {meta['machine']}; `{meta['command']}`; model {meta['model']}, "
        f"torch {meta['torch']}, {meta['threads']} thread.",
        f"Mean-diff: shipped `sentiment` vector, layer {meta['mean_diff']['layer']}, strength "
        f"+/-{meta['mean_diff']['strength']}. PPLM-BoW: {json.dumps(meta['pplm_bow'])}. PPLM-probe: "
        f"{json.dumps(meta['pplm_probe'])}; probe at layer {meta['probe']['layer']} ({meta['probe']['pooling']} "
        f"pooling, held-out AUROC {meta['probe']['test_auroc']:.3f}). Top-k 10 and window 0 (all past "
        "positions) as in the reference code; greedy decoding.", "",
        "## Results", "",
        "| method | target | VADER | perplexity | distinct-2 | tok/s | first answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in meta["rows"]:
        first = r["first"].replace("|", "\\|").replace("\n", " ")[:110]
        lines.append(f"| {r['method']} | {r['target']} | {r['vader']:+.3f} | {r['perplexity']:.2f} | "
                     f"{r['distinct2']:.3f} | {r['tokens_per_s']:.2f} | {first} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
