import math

import pytest
import torch

from steering_lab.cli import main
from steering_lab.compose import compose, dynamic_stream
from steering_lab.errors import UserError
from steering_lab.generate import final, generate, stream
from steering_lab.intervene import Steer, hook_count, steer
from steering_lab.personas import BIG_FIVE, get_trait, trait_contrast, trait_direction, trait_openings, trait_scores
from steering_lab.vector import SteeringVector

QUESTIONS = ["How do you usually spend your weekends?", "What do you think about meeting new people?",
             "How do you plan a trip?", "What would you do with a free afternoon?"]


def rand_vec(lm, seed, layer):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(directions={k: torch.randn(lm.d_model, generator=g) for k in range(lm.n_layers)},
                          recommended_layer=layer, recommended_strength=1.0)


def test_traits():
    assert set(BIG_FIVE) == {"openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism"}
    t = get_trait("Extraversion")
    assert "outgoing" in t.system("high") and "reserved" in t.system("low")
    custom = get_trait("pirate", "talks like a pirate, says arr a lot")
    assert "pirate" in custom.system("high") and "opposite" in custom.system("low")
    assert trait_openings(custom)["high"][0].startswith("As someone who is pirate")
    assert len(trait_openings(BIG_FIVE["openness"])["low"]) == 4
    with pytest.raises(UserError, match="--description"):
        get_trait("humour")


def test_trait_direction_on_tiny(tiny):
    trait = BIG_FIVE["extraversion"]
    contrast = trait_contrast(tiny, trait, QUESTIONS, max_new_tokens=4)
    assert contrast.prompts == QUESTIONS
    openings = trait_openings(trait)
    assert all(a.startswith(openings["high"][i % 4].split()[0]) for i, a in enumerate(contrast.positive))
    vec, prompt_vec = trait_direction(tiny, trait, contrast=contrast)
    cal = vec.extra["trait_score"]
    assert cal["layer"] == vec.recommended_layer and vec.layers == prompt_vec.layers
    scores = trait_scores(tiny, vec, QUESTIONS + QUESTIONS, contrast.positive + contrast.negative)
    # calibration: the mean score of the high answers is 1, of the low answers 0 (by construction)
    assert sum(scores[:4]) / 4 == pytest.approx(1.0, abs=1e-4)
    assert sum(scores[4:]) / 4 == pytest.approx(0.0, abs=1e-4)
    assert math.isnan(trait_scores(tiny, vec, ["q"], [" "])[0])  # an empty answer has no score


def test_compose_separate_equals_both_hooks(tiny):
    a, b = rand_vec(tiny, 1, 0), rand_vec(tiny, 2, 2)
    items = compose([(a, 1.5), (b, -2.0)])
    prompts = QUESTIONS[:2]
    together = generate(tiny, prompts, items, max_new_tokens=6)
    with steer(tiny, Steer(a, 1.5, layers=[0])), steer(tiny, Steer(b, -2.0, layers=[2])):
        nested = generate(tiny, prompts, max_new_tokens=6)
    assert together == nested
    summed = compose([(a, 1.5), (b, -2.0)], mode="sum", layer=1)
    assert len(summed) == 1 and summed[0].layers == [1]
    torch.testing.assert_close(summed[0].vector, 1.5 * a[1] - 2.0 * b[1])
    with pytest.raises(UserError, match="composition mode"):
        compose([(a, 1.0)], mode="average")


def test_dynamic_composition(tiny):
    a, b = rand_vec(tiny, 1, 1), rand_vec(tiny, 2, 2)
    steps = list(dynamic_stream(tiny, QUESTIONS[0], [(a, 2.0), (b, 1.0)], tau=1e9, max_new_tokens=5))
    # with a huge tau the strengths fade to ~0 after the first token: the rest follows the unsteered model
    assert steps[0].strengths == [2.0, 1.0]
    assert all(max(s.strengths) < 1e-3 for s in steps[1:])
    assert all(len(s.kl) == 2 and min(s.kl) >= 0 for s in steps)
    # with a tiny tau the strengths stay at their maxima: same as static composition
    full = list(dynamic_stream(tiny, QUESTIONS[0], [(a, 2.0), (b, 1.0)], tau=1e-12, max_new_tokens=5))
    static = final(stream(tiny, [QUESTIONS[0]], compose([(a, 2.0), (b, 1.0)]), max_new_tokens=5))
    assert full[-1].token_ids == static.token_ids[0]
    assert hook_count(tiny.model) == 0


def test_generate_cli_with_two_vectors(tiny_dir, tmp_path, capsys, tiny):
    import json

    rand_vec(tiny, 1, 0).save(tmp_path / "a")
    rand_vec(tiny, 2, 2).save(tmp_path / "b")
    base = ["generate", "--prompt", QUESTIONS[0], "--model", str(tiny_dir), "--max-new-tokens", "5", "--json",
            "--vector", str(tmp_path / "a"), "--strength", "1.5", "--vector", str(tmp_path / "b"), "--strength", "-2"]
    assert main(base) == 0
    separate = json.loads(capsys.readouterr().out)
    a, b = rand_vec(tiny, 1, 0), rand_vec(tiny, 2, 2)
    assert separate["steered"] == generate(tiny, [QUESTIONS[0]], compose([(a, 1.5), (b, -2.0)]), max_new_tokens=5)[0]
    assert main(base + ["--compose", "sum"]) == 0
    summed = json.loads(capsys.readouterr().out)
    assert summed["steered"] == generate(tiny, [QUESTIONS[0]], compose([(a, 1.5), (b, -2.0)], mode="sum"),
                                         max_new_tokens=5)[0]
    assert main(base + ["--dynamic", "0.5"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"baseline", "steered"}
    assert main(["persona", "--trait", "humour", "--out", str(tmp_path / "h")]) == 2
