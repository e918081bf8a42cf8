"""Bench: does the English harmful direction, refusal-style direction and harmful probe carry over
to other languages on the embedded SmolLM2-135M-Instruct (after Wang et al. 2025, arXiv:2505.17306)?

    python -m bench.crosslingual [--sep-limit 30] [--limit 8] [--max-new-tokens 16] [--render]

1. Separation, the first ``--sep-limit`` prompts per side (fr/de/es/zh/ru have 42 harmful + 42
   harmless each; English: the held-out test split, 25 + 25): AUROC of the projection on the
   shipped ``harmful`` vector (layer 9) and on ``refusal_style`` (layer 12), and of the shipped
   ``harmful`` probe (layer 13); cosine of each language's own mean-difference direction with the
   vector and with the English reference
   (train+val split, first ``--sep-limit`` per side), at every layer.
2. Interventions, the first ``--limit`` prompts per side and language, greedy, ``--max-new-tokens``:
   each vector added at its layer with its recommended strength on harmless prompts, and ablated at
   every block output on harmful prompts; the same-run baseline is the unsteered answers (shared by
   both vectors). Judge: refusal phrases in English and in the prompt's language.
``--render`` rewrites the markdown from the json without running the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_lab.vector import atomic_write_bytes, atomic_write_json  # noqa: E402

log = logging.getLogger("bench.crosslingual")
OUT = ROOT / "bench" / "crosslingual"
VECTORS = ("harmful", "refusal_style")
PROBE = "harmful"


def run(limit: int, max_new_tokens: int, sep_limit: int) -> dict:
    import torch

    from steering_lab import resources
    from steering_lab.measure import crosslingual as cl
    from steering_lab.model import load_model
    from steering_lab.probes import Probe
    from steering_lab.vector import SteeringVector

    torch.manual_seed(0)
    lm = load_model()
    vecs = {name: SteeringVector.load(resources.resolve("vectors", name)) for name in VECTORS}
    probe = Probe.load(resources.resolve("probes", PROBE))
    t0 = time.time()
    report = cl.separation(lm, vecs["harmful"], probe, None, others={"refusal_style": vecs["refusal_style"]},
                           limit=sep_limit, reference_limit=sep_limit, progress=True, vector_name="harmful",
                           probe_name=PROBE)
    t_sep = time.time() - t0
    langs = [r.language for r in report.rows]
    t0 = time.time()
    iv = {}
    iv["harmful"] = cl.refusal_interventions(lm, vecs["harmful"], langs, limit=limit, max_new_tokens=max_new_tokens,
                                             progress=True)
    iv["refusal_style"] = cl.refusal_interventions(lm, vecs["refusal_style"], langs, limit=limit,
                                                   max_new_tokens=max_new_tokens, baseline=iv["harmful"],
                                                   progress=True)
    t_iv = time.time() - t0
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"2-core CPU, shared ({platform.machine()}, torch threads {torch.get_num_threads()})",
        "command": f"python -m bench.crosslingual --sep-limit {sep_limit} --limit {limit} "
                   f"--max-new-tokens {max_new_tokens}",
        "model": lm.name, "seconds": {"separation": round(t_sep, 1), "interventions": round(t_iv, 1)},
        "vectors": {n: {"layer": v.recommended_layer, "strength": v.recommended_strength} for n, v in vecs.items()},
        "probe": {"name": PROBE, "layer": probe.layer},
        "separation": report.to_dict(), "interventions": iv,
    }


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render(res: dict) -> str:
    sep, iv = res["separation"], res["interventions"]
    rows = sep["rows"]
    layer, style_layer = sep["layer"], res["vectors"]["refusal_style"]["layer"]
    others = [r for r in rows if r["language"] != "en"]
    en = rows[0]

    def rng(key, sub=None):
        vals = [(r["others"][sub][key] if sub else r[key]) for r in others]
        return f"{min(vals):.2f} to {max(vals):.2f}"

    def rate(vec, lang, key):
        return iv[vec]["languages"][lang]["refusal"][key]

    add_style = [rate("refusal_style", r["language"], "harmless_add") for r in others]
    add_harm = [rate("harmful", r["language"], "harmless_add") for r in others]
    base = [rate("harmful", r["language"], "harmless_base") for r in others]
    abl_harm = [rate("harmful", r["language"], "harmful_ablate") for r in others]
    abl_style = [rate("refusal_style", r["language"], "harmful_ablate") for r in others]
    hbase = [rate("harmful", r["language"], "harmful_base") for r in others]
    peak = {r["language"]: max(range(len(sep["layers"])), key=lambda k, c=sep["cosines"][r["language"]]: c[k])
            for r in others}
    best = ", ".join(f"{code} {sep['cosines'][code][k]:.2f} (L{k})" for code, k in peak.items())
    top = max(max(r["direction_auroc"], r["probe_auroc"] or 0.0) for r in others)
    s_style = res["vectors"]["refusal_style"]["strength"]
    s_harm = res["vectors"]["harmful"]["strength"]
    n = iv["harmful"]["settings"]["limit"]
    lines = [
        "# Cross-lingual refusal on the embedded model", "",
        "## README snippet", "",
        "| method | paper (authors, year, arXiv id) | library / CLI / app |",
        "|---|---|---|",
        "| Cross-lingual refusal check: the English harmful/refusal direction and harmful probe on French, German, "
        "Spanish, Chinese and Russian prompts (AUROC, per-layer cosine with each language's own direction, add/ablate "
        "refusal rates) | Refusal Direction is Universal Across Safety-Aligned Languages (Wang, Wang, Liu, Schütze, "
        "Plank, 2025, arXiv:2505.17306) | `steering_lab.measure.crosslingual` / `steering-lab crosslingual "
        "[--languages fr,de,...] [--interventions]` / Extract tab > More ways to find a direction > Cross-lingual "
        "refusal |",
        "",
        f"- Separation (SmolLM2-135M, {rows[1]['n_harmful']} prompts per side and language): the English "
        f"`harmful` direction (layer {layer}) gives "
        f"AUROC {rng('direction_auroc')} on the other languages vs {en['direction_auroc']:.2f} on English (test "
        f"split, seen by the vector); the English probe (layer {sep['probe_layer']}) {rng('probe_auroc')} vs "
        f"{en['probe_auroc']:.2f} (held out).",
        f"- Geometry: each language's own harmful-minus-harmless direction has cosine {rng('cosine_reference')} with "
        f"the English one at layer {layer} (English test split vs English train+val: {en['cosine_reference']:.2f}, "
        f"the same-language noise level); best layer per language: {best}.",
        f"- Adding `refusal_style` (layer {style_layer}, strength {s_style}) to harmless prompts: refusal "
        f"{min(add_style):.0%}-{max(add_style):.0%} across the other languages vs "
        f"{rate('refusal_style', 'en', 'harmless_add'):.0%} in English (unsteered {min(base):.0%}-{max(base):.0%}), "
        "mostly as English 'I'm sorry…' openings; adding `harmful` (layer "
        f"{layer}, strength {s_harm}): {min(add_harm):.0%}-{max(add_harm):.0%}. Ablating `harmful` on harmful "
        f"prompts: {min(abl_harm):.0%}-{max(abl_harm):.0%} (unsteered {min(hbase):.0%}-{max(hbase):.0%}); ablating "
        f"`refusal_style` *raises* refusal phrases to {min(abl_style):.0%}-{max(abl_style):.0%} with degenerate "
        "text ('I can't I can't'): zeroing the projection moves ordinary answers toward the refusal side.",
        "- Reading: this small, mostly English model has no safety-aligned language besides English, and the "
        "paper's universality does not show here: the English harmful *reading* and probe are near chance to weak "
        f"on the other languages (AUROC at most {top:.2f}), and their own directions are near-orthogonal to the "
        "English one at the chosen layer "
        "(partly aligned in later layers for some). What makes the model refuse in any language is the "
        f"response-style direction, which carries over when added ({n} prompts per side and language for the rates, "
        "phrase judge in English + the prompt's language).",
        "",
        "## Run", "",
        f"- date: {res['date']}; machine: {res['machine']}; model: {res['model']}",
        f"- command: `{res['command']}`",
        f"- wall time: separation {res['seconds']['separation']} s, interventions {res['seconds']['interventions']} s "
        "(the machine was shared with other jobs)",
        "",
        f"## Separation and geometry ({rows[1]['n_harmful']} prompts per side and language; English "
        f"{en['n_harmful']})", "",
        f"AUROC harmful vs harmless prompts (last prompt token). `harmful` at layer {layer}, `refusal_style` at layer "
        f"{style_layer}, probe `{PROBE}` at layer {sep['probe_layer']}. `own` = the language's own mean-difference "
        "direction, in-sample (a ceiling). cos = cosine of the language's own direction with the shipped vector / with "
        "the English train+val reference, at the vector's layer.", "",
        "| lang | n+ / n- | AUROC harmful dir | AUROC probe | AUROC own | cos(own, harmful) | cos(own, English ref) "
        "| AUROC refusal_style | cos(own, refusal_style) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        st = r["others"]["refusal_style"]
        lines.append(f"| {r['language']} | {r['n_harmful']} / {r['n_harmless']} | {_f(r['direction_auroc'])} | "
                     f"{_f(r['probe_auroc'])} | {_f(r['own_auroc'])} | {_f(r['cosine_vector'])} | "
                     f"{_f(r['cosine_reference'])} | {_f(st['auroc'])} | {_f(st['cosine_vector'])} |")
    lines += ["", "Cosine of each language's own direction with the English reference, every third layer:", ""]
    shown = list(range(0, len(sep["layers"]), 3))
    lines.append("| lang | " + " | ".join(f"L{k}" for k in shown) + " |")
    lines.append("|---|" + "---:|" * len(shown))
    for lang, curve in sep["cosines"].items():
        lines.append(f"| {lang} | " + " | ".join(f"{curve[k]:.2f}" for k in shown) + " |")
    lines += ["", f"## Interventions ({n} prompts per side and language, greedy, "
              f"{iv['harmful']['settings']['max_new_tokens']} new tokens)", "",
              "Refusal rate (phrase judge, English + the prompt's language). Baseline = the same run's unsteered "
              "answers, shared by both vectors. add: on harmless prompts, at the vector's layer and recommended "
              "strength; ablate: on harmful prompts, the vector's unit direction at its layer projected out of every "
              "block output.", "",
              "| lang | harmless unsteered | + harmful | + refusal_style | harmful unsteered | harmful ablated "
              "| refusal_style ablated |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        code = r["language"]
        lines.append(f"| {code} | {rate('harmful', code, 'harmless_base'):.2f} | "
                     f"{rate('harmful', code, 'harmless_add'):.2f} | {rate('refusal_style', code, 'harmless_add'):.2f} "
                     f"| {rate('harmful', code, 'harmful_base'):.2f} | {rate('harmful', code, 'harmful_ablate'):.2f} | "
                     f"{rate('refusal_style', code, 'harmful_ablate'):.2f} |")
    lines += ["", "First answer of each group (refusal_style added / unsteered, harmless prompts):", ""]
    for r in rows:
        code = r["language"]
        ex = iv["refusal_style"]["languages"][code]["examples"]
        add = ex["harmless_add"].replace("\n", " ").replace("|", "/")[:110]
        b = ex["harmless_base"].replace("\n", " ").replace("|", "/")[:110]
        lines.append(f"- {code}: added: “{add}” — unsteered: “{b}”")
    lines += ["", "## Caveats", "",
              "- SmolLM2-135M-Instruct is small and trained mostly on English; it seldom refuses by itself, so "
              "'ablate' has little refusal to remove and the add results carry the signal.",
              "- The refusal judge is a phrase list (English + each language, written for this project); answers "
              "that refuse without a listed phrase are missed, and a listed phrase inside a compliant answer counts "
              "as a refusal.",
              "- The shipped `harmful` vector and probe were fitted on English data (the vector on all 105 English "
              "pairs, so its English AUROC is in-sample; the probe on the train split, so its English row is "
              "held out). The other languages were never seen by either.",
              f"- The prompts are short instructions; English has {en['n_harmful']} per side here, the other "
              f"languages {rows[1]['n_harmful']}, so an AUROC moves by a few hundredths with one prompt; the "
              f"refusal rates rest on {n} prompts per side and language (steps of {1 / n:.0%})."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sep-limit", type=int, default=30,
                   help="prompts per side and language (and English reference prompts per side) for the separation")
    p.add_argument("--limit", type=int, default=8, help="prompts per side and language for the interventions")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--render", action="store_true", help="rewrite the markdown from the json, no model run")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.render:
        res = json.loads(OUT.with_suffix(".json").read_text())
    else:
        res = run(args.limit, args.max_new_tokens, args.sep_limit)
        atomic_write_json(OUT.with_suffix(".json"), res)
    atomic_write_bytes(OUT.with_suffix(".md"), render(res).encode())
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
