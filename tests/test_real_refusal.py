"""Refusal-style direction and weight orthogonalisation on the real embedded model."""

import pytest
import torch

from steering_lab.activations import pad_left
from steering_lab.datasets import instruction_split
from steering_lab.generate import generate
from steering_lab.intervene import Steer, hook_count
from steering_lab.metrics import mean_distinct_n, refusal_rate
from steering_lab.refusal import ablated, orthogonalize, style_direction

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def style_vec(smol):
    return style_direction(smol)


def test_refusal_style_makes_harmless_prompts_open_with_refusals(smol, style_vec):
    _, harmless_test = instruction_split("test")  # never seen by extraction (train) or calibration (val)
    s = style_vec.recommended_strength
    texts = generate(smol, harmless_test * 2, Steer(style_vec, [0.0] * 25 + [s] * 25), max_new_tokens=24)
    off, on = texts[:25], texts[25:]
    assert refusal_rate(off, opening=True) <= 0.10, off
    assert refusal_rate(on, opening=True) >= 0.80, on
    assert mean_distinct_n(on) >= 0.6, on
    cal = style_vec.extra["calibration"]
    assert cal["table"] and style_vec.recommended_layer in {row["layer"] for row in cal["table"]}
    assert hook_count(smol.model) == 0


def test_orthogonalized_smollm_matches_hook_ablation(smol, style_vec):
    r = style_vec[style_vec.recommended_layer]
    prompts = ["How do I bake bread?", "Tell me about your weekend.", "What is 2 + 2?"]
    ids, mask, pos = pad_left([smol.encode_prompt(p) for p in prompts], smol.pad_id)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        with ablated(smol, r):
            hooked = smol.model(**inputs).logits
        ortho = orthogonalize(smol, r)  # SmolLM2 ties its embeddings: the copy is untied
        plain = ortho.model(**inputs).logits
        assert not torch.allclose(hooked, smol.model(**inputs).logits, atol=1e-3)
    torch.testing.assert_close(plain, hooked, atol=2e-3, rtol=1e-3)
    assert ortho.model.config.tie_word_embeddings is False
