import math

import pytest
import torch
from conftest import make_tiny

from steering_lab.activations import pad_left
from steering_lab.datasets import harmful_instructions, harmless_instructions
from steering_lab.errors import UserError
from steering_lab.intervene import capture, hook_count
from steering_lab.model import load_model
from steering_lab.refusal import (
    Candidate,
    ablated,
    choose_candidate,
    orthogonalize,
    post_instruction_length,
    refusal_score,
    residual_writers,
    save_orthogonalized,
    select_refusal_direction,
    style_contrast,
)

PROMPTS = ["Explain how a bicycle gear system works.", "Write a short poem about autumn leaves.", "Hi"]


def batch(lm, prompts=PROMPTS):
    ids, mask, pos = pad_left([lm.encode_prompt(p) for p in prompts], lm.pad_id)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "phi3"])
def test_ablation_hooks_equal_orthogonalized_weights(tiny_tokenizer, tmp_path, arch):
    lm = make_tiny(arch, tiny_tokenizer, seed=3)
    with torch.no_grad():  # make the residual stream visibly carry the direction
        r = torch.randn(lm.d_model)
        inputs = batch(lm)
        with ablated(lm, r):
            hooked = lm.model(**inputs).logits
        plain = lm.model(**inputs).logits
        assert not torch.allclose(hooked, plain, atol=1e-4)
        ortho = orthogonalize(lm, r)
        torch.testing.assert_close(ortho.model(**inputs).logits, hooked, atol=2e-5, rtol=1e-4)
    assert hook_count(lm.model) == 0 and hook_count(ortho.model) == 0
    # the original is untouched (orthogonalize works on a copy)
    with torch.no_grad():
        assert torch.equal(lm.model(**inputs).logits, plain)
    # and the saved copy loads with from_pretrained and behaves the same
    out = save_orthogonalized(lm, r, tmp_path / "ortho")
    again = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again.model(**inputs).logits, hooked, atol=2e-5, rtol=1e-4)
    with pytest.raises(UserError, match="not empty"):
        save_orthogonalized(lm, r, tmp_path / "ortho")


def test_ablation_removes_the_direction_everywhere(tiny):
    r = torch.randn(tiny.d_model)
    u = r / r.norm()
    with torch.no_grad(), ablated(tiny, r), capture(tiny) as cap:
        tiny.model(**batch(tiny))
    for k in range(tiny.n_layers):
        assert float((cap.last(k) @ u).abs().max()) < 1e-5


def test_sandwich_norm_models_fall_back_and_refuse_orthogonalization(tiny_tokenizer):
    lm = make_tiny("gemma2", tiny_tokenizer)
    assert residual_writers(lm) is None
    r = torch.randn(lm.d_model)
    u = r / r.norm()
    with torch.no_grad(), ablated(lm, r), capture(lm) as cap:
        lm.model(**batch(lm))
    assert all(float((cap.last(k) @ u).abs().max()) < 1e-4 for k in range(lm.n_layers))
    with pytest.raises(UserError, match="not supported"):
        orthogonalize(lm, r)


def test_refusal_score_on_fixed_logits():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]))
    score = refusal_score(logits, [0, 1])
    assert float(score[0]) == pytest.approx(math.log(0.5 / 0.5), abs=1e-5)
    assert float(score[1]) == pytest.approx(math.log(0.75 / 0.25), abs=1e-5)


def test_choose_candidate():
    cands = [Candidate(-1, 0, 1.0, bypass=-5.0, kept=False, reason="kl"),
             Candidate(-1, 1, 1.0, bypass=-2.0, kept=True),
             Candidate(-2, 1, 1.0, bypass=-3.0, kept=True),
             Candidate(-2, 2, 1.0)]
    best = choose_candidate(cands)
    assert (best.position, best.layer) == (-2, 1)
    assert [c.bypass for c in cands[:2]] == [-3.0, -2.0] and not cands[2].kept
    nothing = [Candidate(-1, 0, 1.0, bypass=-1.0), Candidate(-1, 1, 1.0, bypass=-4.0)]
    assert choose_candidate(nothing).layer == 1  # falls back to the lowest bypass


def test_select_refusal_direction_on_tiny(tiny):
    assert post_instruction_length(tiny) >= 3  # <|im_end|> \n <|im_start|> assistant \n
    vec, cands = select_refusal_direction(
        tiny, harmful_train=harmful_instructions()[:8], harmless_train=harmless_instructions()[:8],
        harmful_val=harmful_instructions()[60:64], harmless_val=harmless_instructions()[60:64], n_positions=2)
    top = int(0.8 * tiny.n_layers)
    assert len(cands) == 2 * top and {c.layer for c in cands} == set(range(top))
    assert {c.position for c in cands} == {-1, -2}
    assert all(not math.isnan(c.bypass) and not math.isnan(c.kl) for c in cands)
    best = cands[0]
    assert (vec.recommended_layer, vec.extra["position"]) == (best.layer, best.position)
    assert vec.layers == list(range(tiny.n_layers))
    assert all(torch.equal(vec[k], vec[0]) for k in vec.layers)  # one direction, every layer
    assert vec.recommended_strength == pytest.approx(best.norm, rel=1e-3)
    assert len(vec.extra["candidates"]) == len(cands)
    assert hook_count(tiny.model) == 0


def test_style_contrast_on_tiny(tiny):
    cs = style_contrast(tiny, PROMPTS, max_new_tokens=6)
    assert cs.prompts == PROMPTS and len(cs.positive) == 3
    assert all("sorry" in p.lower() or "can't" in p.lower() or "cannot" in p.lower() for p in cs.positive)
    assert cs.default_position == "response_mean" and cs.labels == ("refusal", "compliance")
