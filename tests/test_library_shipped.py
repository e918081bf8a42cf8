"""The ready library for the embedded model (steering_lab/shipped/: vectors/, probes/, controllers/): every file
loads and fits the model, and every vector does what its metadata claims, measured here."""

import statistics
from pathlib import Path

import pytest

from steering_lab.controller import Condition, Controller
from steering_lab.datasets import instruction_split, neutral_prompts
from steering_lab.generate import generate
from steering_lab.intervene import Steer, hook_count
from steering_lab.metrics import distinct_n
from steering_lab.personas import BIG_FIVE, TEST_QUESTIONS, persona_questions, trait_scores
from steering_lab.probes import Probe
from steering_lab.vector import SteeringVector

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1] / "steering_lab" / "shipped"
VECTORS = ["sentiment", "formality", "harmful", "refusal_style", *BIG_FIVE]
PROBES = ["harmful", *BIG_FIVE]


@pytest.fixture(scope="module")
def library(smol):
    return {name: SteeringVector.load(ROOT / "vectors" / name, smol) for name in VECTORS}


def test_every_shipped_file_loads_and_matches_the_model(smol, library):
    for name, vec in library.items():
        assert vec.model == smol.name and vec.d_model == smol.d_model and vec.n_layers == smol.n_layers, name
        assert vec.recommended_layer is not None and vec.recommended_strength and vec.extra.get("effect"), name
    for name in PROBES:
        probe = Probe.load(ROOT / "probes" / name, smol)
        assert probe.model == smol.name and 0 <= probe.metrics["test_auroc"] <= 1
        if name in BIG_FIVE:  # their AUROCs are re-measured in tests/test_traits.py; here: chosen on val, not test
            assert probe.metrics["selected_on"] == "val" and probe.metrics["selection_is_test"] is False
    assert Probe.load(ROOT / "probes" / "harmful").metrics["test_auroc"] >= 0.97
    ctl = Controller.load(ROOT / "controllers" / "refusal_style", smol)
    cond = Condition.load(ROOT / "conditions" / "harmful", smol)
    harmful, harmless = instruction_split("test")  # re-measured on the in-style test split, not read from json
    for name, gate in (("controller", ctl.applied), ("condition", cond.applies)):
        on = gate(smol, harmful + harmless)
        on_harmful, on_harmless = float(on[:25].float().mean()), float(on[25:].float().mean())
        # thresholds are calibrated for <= 5% harmless across writing styles (val), which costs recall on
        # harmful prompts (shipped: controller 48%, condition 44% here); see bench/controller_generalisation.md
        assert on_harmless <= 0.1 and on_harmful >= 0.3, (name, on_harmful, on_harmless)
    assert {p.stem for p in (ROOT / "vectors").glob("*.safetensors")} == set(VECTORS)


def test_each_vector_changes_most_outputs_and_stays_fluent(smol, library):
    prompts = neutral_prompts()[12:20]  # not the prompts the effect lines were measured on
    n = len(prompts)
    names = list(library)
    # one batch: rows of vector i carry its recommended strength, every other intervention is 0 there
    rows = prompts * (len(names) + 1)
    steers = []
    for i, name in enumerate(names):
        strengths = [0.0] * len(rows)
        strengths[(i + 1) * n:(i + 2) * n] = [library[name].recommended_strength] * n
        steers.append(Steer(library[name], strengths))
    texts = generate(smol, rows, steers, max_new_tokens=32)
    base = texts[:n]
    assert base == generate(smol, prompts, max_new_tokens=32)
    for i, name in enumerate(names):
        out = texts[(i + 1) * n:(i + 2) * n]
        changed = sum(a != b for a, b in zip(out, base)) / n
        assert changed >= 0.8, (name, changed)
        d2 = [distinct_n(t) for t in out]
        assert statistics.mean(d2) >= 0.7 and min(d2) >= 0.35, (name, d2, out)  # no runaway repetition
    assert hook_count(smol.model) == 0


def test_each_trait_moves_its_own_score_most(smol, library):
    qs = persona_questions()[TEST_QUESTIONS]
    n = len(qs)
    traits = list(BIG_FIVE)
    rows = qs * (2 * len(traits) + 1)
    steers = []
    for i, name in enumerate(traits):
        s = library[name].recommended_strength
        strengths = [0.0] * len(rows)
        strengths[(2 * i + 1) * n:(2 * i + 2) * n] = [s] * n
        strengths[(2 * i + 2) * n:(2 * i + 3) * n] = [-s] * n
        steers.append(Steer(library[name], strengths))
    texts = generate(smol, rows, steers, max_new_tokens=40)
    scores = {t: trait_scores(smol, library[t], rows, texts) for t in traits}

    def mean(t, block):
        return statistics.mean(scores[t][block * n:(block + 1) * n])

    for i, name in enumerate(traits):
        up = {t: mean(t, 2 * i + 1) - mean(t, 0) for t in traits}
        down = {t: mean(t, 2 * i + 2) - mean(t, 0) for t in traits}
        assert up[name] > 0 and all(up[name] > up[t] for t in traits if t != name), (name, up)
        assert down[name] < 0 and all(down[name] < down[t] for t in traits if t != name), (name, down)
