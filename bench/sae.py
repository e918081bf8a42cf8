"""Bench: the shipped SAE on held-out text, and steering with its features.

    python bench/sae.py --texts corpus.json [--device cuda] [--out bench/sae]

1. Reconstruction on the held-out split of the training text (same hash split as
   scripts/train_sae.py): explained variance, L0, fraction of features that never fire
   (``steering_lab.sae.reconstruction_stats``: the model is run again, not the training cache).
2. Steering with a feature: for a set of labelled features, generate answers to neutral prompts
   with the feature's unit decoder row added at the SAE's layer at a grid of strengths, in one
   batch with unsteered rows (the same-run baseline).
   Measured on the generated tokens: the feature's own mean activation (text read back by the
   unsteered model), the share of generated tokens that are among the feature's top tokens, and
   distinct-2 (share of distinct token bigrams: lower = more repetition).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.train_sae import split  # noqa: E402
from steering_lab.generate import generate  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.sae import feature_vector, iter_codes, load_sae, reconstruction_stats, sae_names  # noqa: E402
from steering_lab.vector import atomic_write_json  # noqa: E402

log = logging.getLogger("bench.sae")


def pick_features(sae, n: int) -> list[int]:
    """Readable features, chosen from the index alone (before any steering): the favourite top
    token is a word (>= 4 letters), the feature fires on 0.01%..0.5% of tokens; most frequent
    first, one per favourite token."""
    out, seen = [], set()
    feats = sae.index.get("features", {})
    ranked = sorted(feats.items(), key=lambda kv: -kv[1]["freq"])
    for fid, info in ranked:
        toks = [t.strip().lower() for t in info["top_tokens"][:3]]
        if not toks or not all(t.isalpha() and len(t) >= 4 for t in toks[:1]):
            continue
        if not 1e-4 <= info["freq"] <= 5e-3 or toks[0] in seen:
            continue
        seen.add(toks[0])
        out.append(int(fid))
        if len(out) == n:
            break
    return out


def distinct2(ids: list[int]) -> float:
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs) if pairs else float("nan")


def measure(lm, sae, feature: int, prompts: list[str], answers: list[str]) -> dict:
    """Mean activation of ``feature`` on the answer tokens, share of answer tokens among its top tokens."""
    top = {t.strip().lower() for t in sae.feature_info(feature).get("top_tokens", [])[:5] if t.strip()}
    seqs, spans = [], []
    for p, a in zip(prompts, answers):
        pid = lm.encode_prompt(p)
        aid = lm.encode(a, special=False)
        seqs.append(pid + aid)
        spans.append(len(aid))
    acts, hits, n, d2 = 0.0, 0, 0, []
    for item in iter_codes(lm, sae, seqs, batch_size=32):
        for b, r in enumerate(item.rows):
            k = spans[r]
            if k == 0:
                continue
            acts += float(item.codes[b, -k:, feature].sum())
            ids = seqs[r][-k:]
            hits += sum(lm.tokenizer.decode([t]).strip().lower() in top for t in ids)
            n += k
            d2.append(distinct2(ids))
    return {"feature_act": acts / max(n, 1), "top_token_share": hits / max(n, 1), "tokens": n,
            "distinct2": sum(d2) / max(len(d2), 1)}


def coherent_strength(rows: list[dict], threshold: float) -> float | None:
    """The largest strength of the grid at which every tested feature's answers stay coherent
    (distinct-2 >= threshold): the SAE's measured default strength for its unit feature vectors."""
    if not rows:
        return None
    grid = [r["strength"] for r in rows[0]["results"][1:]]
    ok = [s for s in grid if all(next(x for x in row["results"] if x["strength"] == s)["distinct2"] >= threshold
                                 for row in rows)]
    return max(ok) if ok else None


def store_strength(sae_dir: Path, report: dict) -> None:
    """Write the measured default strength into the SAE's features.json (feature_vector reads it)."""
    from steering_lab.sae import INDEX_FILE

    path = sae_dir / INDEX_FILE
    index = json.loads(path.read_text())
    index["steering"] = {"recommended_strength": report["summary"]["coherent_strength"],
                         "measured": "bench/sae.py: largest strength of the grid at which all "
                                     f"{report['summary']['features']} tested features stay coherent "
                                     f"(distinct-2 >= {report['summary']['coherent_threshold']})"}
    atomic_write_json(path, index)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default=None, help="SAE folder or shipped name (default: the first shipped)")
    ap.add_argument("--texts", required=True, help="the text sources JSON written by train_sae.py --save-texts")
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--strengths", default="8,16,32,64", help="strengths of the unit-norm feature direction")
    ap.add_argument("--coherent", type=float, default=0.5, help="distinct-2 at or above which a run counts as coherent")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "bench" / "sae"))
    ap.add_argument("--store", action="store_true", help="write the measured strength into the SAE's features.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.time()
    lm = load_model(device=args.device, dtype="float32")
    sae = load_sae(args.sae or sae_names()[0], lm, device=args.device)
    sources = json.loads(Path(args.texts).read_text())
    texts = [t for v in sources.values() for t in v]
    _, held = split(texts, args.held_out)
    recon = reconstruction_stats(lm, sae, held, max_tokens=128, batch_size=32)
    log.info("held-out reconstruction: %s", recon)

    prompts = [p.strip() for p in (ROOT / "steering_lab" / "data" / "persona_questions.txt").read_text().splitlines()
               if p.strip()][:16]
    grid = [float(m) for m in args.strengths.split(",")]
    rows = []
    for f in pick_features(sae, args.features):
        vec = feature_vector(sae, f, lm=lm)
        strengths = [0.0] + grid
        batch = [p for p in prompts for _ in strengths]
        per_row = [s for _ in prompts for s in strengths]
        answers = generate(lm, batch, Steer(vec, per_row), max_new_tokens=args.max_new_tokens)
        row = {"feature": f, "label": sae.label(f), "top_tokens": sae.feature_info(f)["top_tokens"][:5],
               "results": []}
        for j, s in enumerate(strengths):
            got = [answers[i * len(strengths) + j] for i in range(len(prompts))]
            r = measure(lm, sae, f, prompts, got)
            r.update({"strength": s, "example": got[0][:160]})
            row["results"].append(r)
        rows.append(row)
        base = row["results"][0]
        ok = [r for r in row["results"][1:] if r["distinct2"] >= args.coherent]
        row["act_rises"] = any(r["feature_act"] > base["feature_act"] for r in ok)
        row["top_tokens_rise"] = any(r["top_token_share"] > base["top_token_share"] for r in ok)
        row["best"] = max(ok, key=lambda r: r["feature_act"])["strength"] if ok else None
        log.info("feature %d %s: %s", f, row["label"], [(r["strength"], round(r["feature_act"], 3),
                                                          round(r["top_token_share"], 3)) for r in row["results"]])
    summary = {"features": len(rows), "coherent_threshold": args.coherent,
               "act_rises": sum(r["act_rises"] for r in rows),
               "top_tokens_rise": sum(r["top_tokens_rise"] for r in rows),
               "baseline_distinct2": rows[0]["results"][0]["distinct2"] if rows else None,
               "coherent_strength": coherent_strength(rows, args.coherent)}
    report = {"sae": sae.name, "layer": sae.layer, "d_sae": sae.d_sae, "device": args.device, "summary": summary,
              "model": lm.name, "held_out_texts": len(held), "reconstruction": recon,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "steering": rows,
              "seconds": round(time.time() - t0), "torch": torch.__version__}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(render(report))
    log.info("wrote %s.json and .md", out)
    if args.store:
        from steering_lab.sae import find_sae

        store_strength(find_sae(args.sae or sae_names()[0]), report)


def render(report: dict) -> str:
    r = report["reconstruction"]
    lines = [f"# SAE bench: {report['sae']} (layer {report['layer']}, {report['d_sae']} features)", "",
             f"Model {report['model']}, device {report['device']}, torch {report['torch']}.", "",
             "## Reconstruction on held-out text", "",
             f"{report['held_out_texts']} held-out texts, {r['n_tokens']} tokens (position 0 left out):", "",
             "| explained variance | L0 | dead features |", "|---|---|---|",
             f"| {r['explained_variance']:.3f} | {r['l0']:.1f} | {100 * r['dead_fraction']:.1f}% |", "",
             "## Steering with a feature", "",
             f"{report['prompts']} neutral prompts, greedy, {report['max_new_tokens']} new tokens; the feature's unit "
             "decoder row added at the SAE's layer (`add`). Strength 0 is the unsteered baseline from the same batch. "
             "`act` = the feature's mean activation on the generated tokens (read back by the unsteered model); "
             "`top tok` = share of generated tokens among its 5 top tokens; `distinct-2` = share of distinct token "
             f"bigrams (a run counts as coherent if distinct-2 >= {report['summary']['coherent_threshold']}).",
             "",
             f"**Summary**: of {report['summary']['features']} features picked from the index alone, the feature's own "
             f"activation rises over the baseline at a coherent strength for {report['summary']['act_rises']}, and "
             f"the share of its top tokens rises for {report['summary']['top_tokens_rise']}.", "",
             "| feature | label | strength | act | top tok | distinct-2 | first answer |",
             "|---|---|---|---|---|---|---|"]
    for row in report["steering"]:
        for res in row["results"]:
            ex = res["example"].replace("\n", " ").replace("|", "\\|")[:90]
            lines.append(f"| {row['feature']} | {row['label']} | {res['strength']:g} | "
                         f"{res['feature_act']:.3f} | {res['top_token_share']:.3f} | {res['distinct2']:.2f} | {ex} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
