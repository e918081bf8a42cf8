"""Give every shipped vector its own effect measure (``effect_measure`` in its json).

* sentiment, formality: an effect probe trained on the answer texts of the vector's own contrast set
  (train / val / test split; layer chosen on val, AUROC reported on test), shipped as
  ``shipped/probes/{name}.*``;
* refusal_style, harmful: the refusal judge (what adding them is for: refusals);
* the Big Five trait vectors: the trait probe of the same name (shipped/probes/{trait}.*).

    python scripts/effect_measures.py [--only sentiment,formality]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_lab.datasets import load_preset  # noqa: E402
from steering_lab.measure.effect import EffectMeasure, set_measure, train_effect_probe  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.resources import shipped_dir  # noqa: E402
from steering_lab.vector import SteeringVector  # noqa: E402

PROBED = ("sentiment", "formality")
REFUSAL = ("refusal_style", "harmful")
TRAITS = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated vector names")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = set(args.only.split(",")) if args.only else set(PROBED + REFUSAL + TRAITS)
    vdir, pdir = shipped_dir("vectors"), shipped_dir("probes")
    lm = load_model() if wanted & set(PROBED) else None
    for name in PROBED + REFUSAL + TRAITS:
        if name not in wanted or not (vdir / f"{name}.safetensors").exists():
            continue
        vec = SteeringVector.load(vdir / name)
        if name in PROBED:
            contrast = load_preset(name)
            probe, measure = train_effect_probe(lm, contrast, name, progress=True)
            probe.save(pdir / name)
            logging.info("%s: effect probe at layer %d, test AUROC %.3f (val %.3f; %d train / %d test)", name,
                         probe.layer, probe.metrics["test_auroc"], probe.metrics["select_auroc"],
                         probe.metrics["n_train"], probe.metrics["n_test"])
        elif name in REFUSAL:
            measure = EffectMeasure(kind="refusal", sign=1, description="the answer opens with a refusal")
        else:
            if not (pdir / f"{name}.safetensors").exists():
                logging.info("%s: no trait probe shipped, skipped", name)
                continue
            measure = EffectMeasure(kind="probe", name=name, sign=1,
                                    description=f"the shipped {name} probe on the generated text")
        set_measure(vec, measure)
        vec.save(vdir / name)
        logging.info("%s: effect measure %s", name, measure.to_dict())


if __name__ == "__main__":
    main()
