"""When is steering applied, and what does it do? Off vs always-on vs CAST vs the controller.

    python bench/conditional_steering.py     # writes bench/conditional_steering.json and .md

On the held-out test split (25 harmful + 25 harmless instructions, never used to extract, train or
select anything), with the shipped refusal-style vector: how often steering is applied, and how
often the answer opens with a refusal phrase, on harmful and on harmless prompts. Also the
harmful-vs-harmless probe's held-out AUROC at its layer.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from steering_lab.controller import Controller, conditional_generate, fit_condition  # noqa: E402
from steering_lab.datasets import instruction_split  # noqa: E402
from steering_lab.extract import auroc  # noqa: E402
from steering_lab.generate import generate  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.metrics import refusal_rate  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.probes import Probe, score_texts_with_probe  # noqa: E402
from steering_lab.vector import SteeringVector  # noqa: E402

TOKENS = 32


def main() -> None:
    lm = load_model()
    vec = SteeringVector.load(ROOT / "steering_lab" / "shipped" / "vectors" / "refusal_style", lm)
    s = vec.recommended_strength
    h_tr, l_tr = instruction_split("train")
    h_va, l_va = instruction_split("val")
    h_te, l_te = instruction_split("test")
    prompts = h_te + l_te
    n = len(h_te)
    rows: dict[str, dict] = {}

    def record(name: str, texts: list[str], applied: list[bool], extra: dict | None = None) -> None:
        rows[name] = {"applied_harmful": sum(applied[:n]) / n, "applied_harmless": sum(applied[n:]) / len(l_te),
                      "refusal_harmful": refusal_rate(texts[:n], opening=True),
                      "refusal_harmless": refusal_rate(texts[n:], opening=True), **(extra or {}),
                      "samples_harmful": texts[:3], "samples_harmless": texts[n:n + 3]}
        print(name, {k: v for k, v in rows[name].items() if not k.startswith("samples")}, flush=True)

    t0 = time.time()
    record("off", generate(lm, prompts, max_new_tokens=TOKENS), [False] * len(prompts))
    record("always on", generate(lm, prompts, Steer(vec, s), max_new_tokens=TOKENS), [True] * len(prompts))
    cond = fit_condition(lm, h_tr, l_tr, h_va, l_va)
    texts, applied = conditional_generate(lm, prompts, cond, vec, s, max_new_tokens=TOKENS)
    record("CAST", texts, applied, {"condition_layer": cond.layer, "threshold": round(cond.threshold, 4),
                                    "val_f1": round(cond.f1, 4)})
    ctl = Controller.load(ROOT / "steering_lab" / "shipped" / "controllers" / "refusal_style", lm)
    texts, scale = ctl.generate(lm, prompts, max_new_tokens=TOKENS)
    record("controller", texts, (scale >= ctl.threshold).tolist(),
           {"steer_layers": ctl.steer_layers, "input_layers": ctl.input_layers,
            "mean_scale_harmful": float(scale[:n].mean()), "mean_scale_harmless": float(scale[n:].mean())})
    probe = Probe.load(ROOT / "steering_lab" / "shipped" / "probes" / "harmful", lm)
    scores = torch.tensor(score_texts_with_probe(lm, probe, prompts))
    report = {"date": str(datetime.date.today()), "machine": f"{platform.machine()} CPU, 2 cores",
              "model": lm.name, "vector": "vectors/refusal_style", "strength": s, "max_new_tokens": TOKENS,
              "split": "test (harmful/harmless lines 80-104)", "harmful_probe": {
                  "layer": probe.layer, "test_auroc": auroc(scores[:n], scores[n:]),
                  "test_accuracy": float(torch.cat([scores[:n] > 0.5, scores[n:] <= 0.5]).float().mean())},
              "conditions": rows, "seconds": round(time.time() - t0, 1)}
    (ROOT / "bench" / "conditional_steering.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| condition | applied (harmful) | applied (harmless) | refusal opening (harmful) | "
             "refusal opening (harmless) |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['applied_harmful']:.0%} | {r['applied_harmless']:.0%} | "
                     f"{r['refusal_harmful']:.0%} | {r['refusal_harmless']:.0%} |")
    (ROOT / "bench" / "conditional_steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(report["harmful_probe"]))


if __name__ == "__main__":
    main()
