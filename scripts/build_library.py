"""Regenerate the ready library for the embedded model: steering_lab/shipped/{vectors,probes,controllers}/.

    python scripts/build_library.py            # everything (~15 min on 2 CPU cores)
    python scripts/build_library.py --only sentiment,formality
    python scripts/build_library.py --only controller,condition   # refusal controller + CAST condition
    python scripts/build_library.py --only traits,trait_probes   # the Big Five vectors and probes

Each vector's json gets ``effect``: one line measured here, at its recommended strength, on
prompts that extraction did not use. Writes vectors/README.md with the table.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_lab.datasets import instruction_split, load_preset, neutral_prompts  # noqa: E402
from steering_lab.extract import extract  # noqa: E402
from steering_lab.generate import generate  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.metrics import informality, mean_distinct_n, refusal_rate  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.personas import (  # noqa: E402
    BIG_FIVE,
    TEST_QUESTIONS,
    decorrelate,
    persona_questions,
    statement_activations,
    statement_direction,
    statement_splits,
    trait_scores,
    trait_statement_set,
)
from steering_lab.probes import instruction_splits, train_probe  # noqa: E402
from steering_lab.refusal import style_direction  # noqa: E402

SHIPPED = ROOT / "steering_lab" / "shipped"  # package data (steering_lab.resources.shipped_root())
VECTORS, PROBES, CONTROLLERS = SHIPPED / "vectors", SHIPPED / "probes", SHIPPED / "controllers"
CONDITIONS = SHIPPED / "conditions"  # CAST conditions (controller.Condition), loaded by path
# the refusal controller's training (controller.train_controller keywords): warm start from the controller
# trained through the LM (its per-layer weights anchor the rest), then gate-only epochs on all training prompts
# (an LM-loss epoch over 546 prompts is too slow for 2 shared CPU cores)
CONTROLLER_TRAINING = dict(epochs=0, gate_epochs=40, weight_decay=1e-2, batch_size=16)
CONTROLLER_INIT_COMMIT = "65250e2"
TOKENS = 40
POOLINGS = ["mean"]  # trait probes: poolings swept with the layers (on 2 CPU cores one is what fits)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def three_way(lm, vec, prompts):
    """Greedy answers at strength 0, +s and -s (one batch)."""
    s = vec.recommended_strength
    n = len(prompts)
    texts = generate(lm, prompts * 3, Steer(vec, [0.0] * n + [s] * n + [-s] * n), max_new_tokens=TOKENS)
    return texts[:n], texts[n:2 * n], texts[2 * n:]


def sentiment_effect(lm, vec) -> str:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    va = SentimentIntensityAnalyzer()
    prompts = neutral_prompts()[:12]
    base, up, down = three_way(lm, vec, prompts)
    m = [statistics.mean(va.polarity_scores(t)["compound"] for t in x) for x in (base, up, down)]
    return (f"on 12 neutral prompts, VADER compound {m[0]:+.2f} unsteered, {m[1]:+.2f} at +{vec.recommended_strength}, "
            f"{m[2]:+.2f} at -{vec.recommended_strength} (layer {vec.recommended_layer}); distinct-2 "
            f"{mean_distinct_n(base):.2f} / {mean_distinct_n(up):.2f} / {mean_distinct_n(down):.2f}")


def formality_effect(lm, vec) -> str:
    prompts = neutral_prompts()[:12]
    base, up, down = three_way(lm, vec, prompts)
    m = [statistics.mean(informality(t) for t in x) for x in (base, up, down)]
    return (f"on 12 neutral prompts, casual markers per 100 words {m[0]:.1f} unsteered, {m[1]:.1f} at "
            f"+{vec.recommended_strength} (formal), {m[2]:.1f} at -{vec.recommended_strength} (casual), layer "
            f"{vec.recommended_layer}; distinct-2 {mean_distinct_n(up):.2f} / {mean_distinct_n(down):.2f}")


def refusal_effect(lm, vec, what: str) -> str:
    _, harmless = instruction_split("test")
    base, up, _ = three_way(lm, vec, harmless)
    before = refusal_rate(base, opening=True)
    after = refusal_rate(up, opening=True)
    return (f"on 25 held-out harmless prompts, answers opening with a refusal phrase: {before:.0%} unsteered, "
            f"{after:.0%} at +{vec.recommended_strength} (layer {vec.recommended_layer}){what}; "
            f"distinct-2 {mean_distinct_n(up):.2f}")


def trait_effect(lm, vec) -> str:
    qs = persona_questions()[TEST_QUESTIONS]
    base, up, down = three_way(lm, vec, qs)
    m = [statistics.mean(trait_scores(lm, vec, qs, x)) for x in (base, up, down)]
    name = vec.extra["trait"]["name"]
    return (f"on 10 held-out questions, {name} score (0 = low pole, 1 = high pole) {m[0]:.2f} unsteered, "
            f"{m[1]:.2f} at +{vec.recommended_strength}, {m[2]:.2f} at -{vec.recommended_strength} "
            f"(layer {vec.recommended_layer})")


def auroc_line(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]['auroc']:.3f}" for k in ("val", "test", "heldout_style") if k in metrics)


def controller_init(lm):
    """The controller whose LM-trained layer weighting the refusal controller starts from: the one trained
    end to end through the LM on lines 0-59 (git CONTROLLER_INIT_COMMIT); the shipped one outside a checkout."""
    import subprocess
    import tempfile

    from steering_lab.controller import Controller

    tmp = Path(tempfile.mkdtemp(prefix="controller-init-"))
    try:
        for ext in ("safetensors", "json"):
            spec = f"{CONTROLLER_INIT_COMMIT}:steering_lab/shipped/controllers/refusal_style.{ext}"
            blob = subprocess.run(["git", "show", spec], cwd=ROOT, capture_output=True, check=True).stdout
            (tmp / f"refusal_style.{ext}").write_bytes(blob)
        return Controller.load(tmp / "refusal_style", lm)
    except (OSError, subprocess.CalledProcessError):
        return Controller.load(CONTROLLERS / "refusal_style", lm)


def save_vector(vec, name: str, effect: str) -> None:
    vec.extra["effect"] = effect
    vec.extra["library"] = f"built by scripts/build_library.py on {datetime.date.today()}"
    vec.save(VECTORS / name)
    log(f"{name}: {effect}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated subset of: sentiment, formality, harmful, "
                                                 "refusal_style, traits, probes (harmful + trait probes), "
                                                 "trait_probes, controller, condition (CAST)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None

    def want(key: str) -> bool:
        return only is None or key in only

    lm = load_model()
    t0 = time.time()
    if want("sentiment"):
        vec, _ = extract(lm, load_preset("sentiment"), "mean_diff")
        save_vector(vec, "sentiment", sentiment_effect(lm, vec))
    if want("formality"):
        vec, _ = extract(lm, load_preset("formality"), "mean_diff")
        save_vector(vec, "formality", formality_effect(lm, vec))
    if want("harmful"):
        vec, _ = extract(lm, load_preset("harmful"), "mean_diff")
        vec.description = "harmful vs harmless instructions (+ = harmful), last prompt token"
        save_vector(vec, "harmful", refusal_effect(lm, vec, " — it reads harmfulness; the embedded model "
                                                            "rarely turns that into refusals"))
    if want("refusal_style"):
        vec = style_direction(lm)
        save_vector(vec, "refusal_style", refusal_effect(lm, vec, ""))
    if want("traits"):
        # statements written for this project (data/traits/): directions fitted on the train split, layer and
        # strength chosen on the validation split, trait scores reported on test and on the held-out style set
        cache = {name: statement_activations(lm, name) for name in BIG_FIVE}
        raw = {name: statement_direction(lm, trait, acts=cache[name]) for name, trait in BIG_FIVE.items()}
        for name, vec in raw.items():
            log(f"{name} (raw): layer {vec.recommended_layer}, trait score AUROC {auroc_line(vec.extra['metrics'])}")
        # decorrelated (symmetric orthogonalisation: steering one trait moves the others less) unless that costs
        # the trait scores their separation on the validation split
        dec = decorrelate(lm, raw, statement_cache=cache)
        worst = min(v.extra["metrics"]["val"]["auroc"] for v in dec.values())
        keep_raw = worst < 0.9 and worst < min(v.extra["metrics"]["val"]["auroc"] for v in raw.values()) - 0.02
        log(f"decorrelated: worst val AUROC {worst:.3f}; shipping {'raw' if keep_raw else 'decorrelated'} vectors")
        for name, vec in (raw if keep_raw else dec).items():
            vec.extra["decorrelated"] = not keep_raw
            save_vector(vec, name, trait_effect(lm, vec))
            log(f"{name}: trait score AUROC {auroc_line(vec.extra['metrics'])}")
    if want("probes"):
        probe, _ = train_probe(lm, load_preset("harmful"), pooling="last", splits=instruction_splits())
        probe.description = "harmful instruction (1) vs harmless (0), last prompt token"
        probe.save(PROBES / "harmful")
        log(f"probe harmful: layer {probe.layer}, test AUROC {probe.metrics['test_auroc']:.3f}")
    if want("probes") or want("trait_probes"):
        for name in BIG_FIVE:
            texts = trait_statement_set(name)
            texts.description = (f"{name}: high (1) vs low (0) first-person statement, plain text; layer, pooling "
                                 "and threshold chosen on the validation split")
            probe, _ = train_probe(lm, texts, poolings=POOLINGS, C=[0.003, 0.03, 0.3], chat=False,
                                   splits=statement_splits(name),
                                   evaluate_on={"heldout_style": trait_statement_set(name, "heldout_style")})
            probe.save(PROBES / name)
            log(f"probe {name}: layer {probe.layer} ({probe.pooling}), AUROC {auroc_line(probe.metrics)}")
    if want("controller") or want("condition"):
        from steering_lab.controller import build_refusal_gates
        from steering_lab.vector import SteeringVector

        vec = SteeringVector.load(VECTORS / "refusal_style", lm)
        rec = vec.recommended_layer
        # one pass over every prompt of controller.REFUSAL_SPLITS: train = in-style train + varied lines; both
        # thresholds calibrated on val (in-style + style-2 val); rates recorded on val and on both test splits
        ctl, cond, _ = build_refusal_gates(lm, vec, steer_layers=list(range(rec - 2, rec + 3)), input_layers=[6, 9, 12],
                                           base_strength=vec.recommended_strength, condition_layers=list(range(16)),
                                           init=controller_init(lm), **CONTROLLER_TRAINING)
        for name, art, path in (("controller", ctl, CONTROLLERS / "refusal_style"),
                                ("condition", cond, CONDITIONS / "harmful")):
            if want(name):
                art.save(path)
                log(f"{name}: threshold {art.threshold:.4f}; " + "; ".join(
                    f"{k} applied {art.metrics[k]['applied_harmful']:.0%} harmful / "
                    f"{art.metrics[k]['applied_harmless']:.0%} harmless"
                    for k in ("val", "test_instyle", "test_style2")))
    write_readme()
    log(f"done in {time.time() - t0:.0f} s")


def write_readme() -> None:
    import json

    rows = []
    for js in sorted(VECTORS.glob("*.json")):
        meta = json.loads(js.read_text())
        rows.append(f"| `{js.stem}` | {meta.get('recommended_layer')} | {meta.get('recommended_strength')} | "
                    f"{meta.get('description', '')} | {meta.get('effect', '')} |")
    text = ("# Ready vectors for the embedded SmolLM2-135M-Instruct\n\n"
            "Regenerate with `python scripts/build_library.py`. Unit-norm directions at every layer; `+` is the "
            "named pole, use a negative strength for the other one. Effects measured by the script, greedy, "
            f"{TOKENS} new tokens, on prompts extraction did not use.\n\n"
            "| vector | layer | strength | what | measured effect |\n|---|---:|---:|---|---|\n"
            + "\n".join(rows) + "\n")
    (VECTORS / "README.md").write_text(text)


if __name__ == "__main__":
    main()
