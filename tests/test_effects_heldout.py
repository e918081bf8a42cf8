"""Each shipped vector's stated effect, re-measured by its own effect measure on prompts no vector was
extracted or calibrated on (data/heldout/effect_prompts.txt), at its recommended layer and strength.

Margins: probe measures are probabilities (0..1) averaged over 12 greedy answers (deterministic). Asked of
every probe-measured vector: +s and -s move its own measure apart by at least 0.1 and at least one of them by
0.1 from the unsteered answers, each the way its json claims (+ raises, - lowers; 0.05 of slack where the
unsteered answers already sit near a pole, e.g. agreeableness at 0.89). Measured 2026-11-29: sentiment 0.12 /
0.62 / 0.91, formality 0.16 / 0.62 / 0.96, neuroticism 0.38 / 0.44 / 0.75, agreeableness 0.62 / 0.89 / 0.91,
conscientiousness 0.56 / 0.68 / 0.74, extraversion 0.57 / 0.68 / 0.73 (-s / 0 / +s): the trait vectors move their
traits less than sentiment and formality move theirs.
"""

import pytest

from steering_lab.cli.common import ProbeLookup
from steering_lab.datasets import _data_text, _lines
from steering_lab.generate import generate
from steering_lab.intervene import Steer, hook_count
from steering_lab.measure.effect import measure_of, scorer_for
from steering_lab.resources import names, resolve
from steering_lab.vector import SteeringVector

pytestmark = pytest.mark.real
TOKENS = 24


def shipped_with_measure():
    out = []
    for name in names("vectors", user=False):
        vec = SteeringVector.load(resolve("vectors", name))
        if measure_of(vec) is not None:
            out.append(name)
    return out


@pytest.fixture(scope="module")
def prompts():
    return _lines(_data_text("heldout/effect_prompts.txt"))


@pytest.fixture(scope="module")
def unsteered(smol, prompts):
    return generate(smol, prompts, max_new_tokens=TOKENS)


def test_every_steering_vector_states_an_effect_measure():
    have = set(shipped_with_measure())
    assert {"sentiment", "formality", "refusal_style", "harmful"} <= have


@pytest.mark.parametrize("name", shipped_with_measure())
def test_the_stated_effect_holds_on_held_out_prompts(smol, prompts, unsteered, name):
    vec = SteeringVector.load(resolve("vectors", name))
    measure = measure_of(vec)
    score = scorer_for(smol, measure, ProbeLookup())
    k, s = vec.recommended_layer, abs(vec.recommended_strength)
    texts = {0.0: unsteered}
    for sign in (1, -1):
        texts[sign * s] = generate(smol, prompts, Steer(vec, sign * s, layers=[k]), max_new_tokens=TOKENS)
    mean = {st: sum(score(prompts, t)) / len(t) for st, t in texts.items()}
    seen = f"{name}: effect at -s/0/+s = {mean[-s]:.3f} / {mean[0.0]:.3f} / {mean[s]:.3f}"
    print(seen)
    if measure.kind == "refusal":
        if "4% at" in vec.extra.get("effect", ""):  # the json says adding it does not produce refusals
            assert mean[s] <= 0.25, seen
        else:
            assert mean[0.0] <= 0.25 and mean[s] >= 0.75, seen
    else:
        assert mean[s] - mean[-s] >= 0.1, seen
        assert mean[s] >= mean[0.0] - 0.05 and mean[-s] <= mean[0.0] + 0.05, seen
        assert max(mean[s] - mean[0.0], mean[0.0] - mean[-s]) >= 0.1, seen
    assert hook_count(smol.model) == 0
