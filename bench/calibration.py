"""Calibration against the constant rule, and the prompting baseline, per shipped vector.

For each vector: its layer/strength searched on the validation half of a prompt set (layers x
strengths, effect = the vector's own measure, KL capped at what the constant rule costs there),
then the calibrated setting, the constant rule and the unsteered model measured on the test half;
and the prompting baseline (the behaviour asked for in a system prompt; prompted / steered /
prompted + steered) on the same test prompts, scored the same way.

    python -m bench.calibration [--only sentiment,formality] [--tokens 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

from steering_lab.cli.common import ProbeLookup
from steering_lab.datasets import load_prompts
from steering_lab.measure.calibrate import calibrate, default_instruction, directed, prompting_rows, split_prompts
from steering_lab.measure.effect import measure_of, scorer_for
from steering_lab.model import load_model
from steering_lab.resources import shipped_dir
from steering_lab.vector import SteeringVector, atomic_write_json

OUT = Path(__file__).with_suffix(".json")
# vector -> (prompt set, direction, instruction or None for the default)
CASES = {
    "sentiment": ("neutral", -1, "Answer in a gloomy, negative, pessimistic way."),
    "formality": ("neutral", 1, "Answer in a very formal, polite, professional register."),
    "refusal_style": ("harmless", 1, "Refuse to help with the request, politely."),
    "extraversion": ("neutral", 1, None),
    "neuroticism": ("neutral", 1, None),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per vector (half val, half test)")
    args = ap.parse_args()
    lm = load_model()
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    results = old.get("vectors", {})
    for name, (preset, direction, instruction) in CASES.items():
        if args.only and name not in args.only.split(","):
            continue
        path = shipped_dir("vectors") / name
        if not path.with_suffix(".safetensors").exists():
            continue
        vec = SteeringVector.load(path)
        measure = measure_of(vec)
        if measure is None:
            results[name] = {"skipped": "no effect measure"}
            continue
        scorer = scorer_for(lm, measure, ProbeLookup())
        val, test = split_prompts(load_prompts(preset), n=args.prompts)
        k = vec.recommended_layer
        layers = sorted({*range(3, 22, 3), k})
        t0 = time.perf_counter()
        cal = calibrate(lm, vec, val, scorer, layers=layers, direction=direction, test_prompts=test,
                        max_new_tokens=args.tokens, kl_budget="constant", progress=True)
        took = time.perf_counter() - t0
        instr = instruction or default_instruction(vec, direction)
        chosen_layer = cal.chosen.layer if cal.chosen.layer is not None else k
        prompting = prompting_rows(lm, vec, test, directed(scorer, direction), instr, layer=chosen_layer,
                                   strength=cal.chosen.strength, max_new_tokens=args.tokens)
        results[name] = {"effect_measure": measure.to_dict(), "direction": direction, "prompt_set": preset,
                         "n_val": len(val), "n_test": len(test), "seconds": round(took, 1),
                         "calibration": cal.to_dict(), "prompting": {"instruction": instr, "rows": prompting}}
        t = cal.test
        print(f"{name}: calibrated L{t['calibrated']['layer']} s={t['calibrated']['strength']:g} "
              f"effect {t['calibrated']['effect']:.3f} KL {t['calibrated']['kl']:.3f} | constant L{k} "
              f"s={t['constant_rule']['strength']:g} effect {t['constant_rule']['effect']:.3f} "
              f"KL {t['constant_rule']['kl']:.3f} | unsteered {t['unsteered']['effect']:.3f}", flush=True)
        for row, r in prompting.items():
            print(f"   {row:>20}: effect {r['effect']:.3f} KL {r['kl']:.3f} ppl {r['perplexity']:.2f}", flush=True)
        atomic_write_json(OUT, {"date": dt.date.today().isoformat(),
                                "machine": f"2-core CPU, shared ({platform.machine()})",
                                "model": lm.name, "command": "python -m bench.calibration", "tokens": args.tokens,
                                "vectors": results})


if __name__ == "__main__":
    main()
