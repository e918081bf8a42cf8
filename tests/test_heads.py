"""The attention-head hook site (intervene.heads): every tiny architecture, exact invariants."""

import pytest
import torch
from conftest import ARCHS, make_tiny
from test_intervene import batch

from steering_lab.errors import UserError
from steering_lab.intervene import capture, head_output_weight, head_shape, heads, hook_count


@pytest.fixture(scope="module", params=ARCHS)
def lm(request, tiny_tokenizer):
    return make_tiny(request.param, tiny_tokenizer)


def test_heads_read_edit_and_grad(lm):
    inputs = batch(lm)
    n_heads, head_dim = head_shape(lm)
    with torch.no_grad():
        plain = lm.model(**inputs).logits
        with heads(lm, [1]) as cap, capture(lm, [0, 1]) as blocks:
            same = lm.model(**inputs).logits
        z = cap.last(1)
        assert z.shape == (*inputs["input_ids"].shape, n_heads, head_dim)
        assert torch.equal(plain, same)  # reading changes nothing
        # head h's residual contribution: z_h @ W_O[:, h].T ; all heads (+ bias) = the attention output
        w = head_output_weight(lm, 1)
        per_head = torch.einsum("bthd,mhd->bthm", z.float(), w.float().view(w.shape[0], n_heads, head_dim))
        site = getattr(getattr(lm.layers[1], "self_attn", None), "o_proj", None)
        if site is not None:
            bias = 0 if site.bias is None else site.bias.float()
            assert torch.allclose(per_head.sum(2) + bias, site(z.reshape(*z.shape[:2], -1)).float(), atol=1e-5)
        with heads(lm, read=False, edit={1: lambda z: z.clone()}):
            assert torch.equal(lm.model(**inputs).logits, plain)  # identity edit is exact
        with heads(lm, read=False, edit={1: lambda z: torch.zeros_like(z)}), capture(lm, [0]) as c0:
            zeroed = lm.model(**inputs).logits
        assert not torch.allclose(zeroed, plain)
        assert torch.equal(c0.last(0), blocks.outputs[0][-1])  # blocks before the edit see nothing
    # gradients reach every head's output through the graph
    embeds = lm.model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    with torch.enable_grad(), heads(lm, [0, 2], keep_grad=True) as cap:
        out = lm.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"]).logits
        g0, g2 = torch.autograd.grad(out[:, -1].logsumexp(-1).sum(), [cap.last(0), cap.last(2)])
    assert g0.shape == cap.last(0).shape and g0.abs().sum() > 0 and g2.abs().sum() > 0
    assert hook_count(lm.model) == 0


def test_heads_bad_input_and_cleanup(tiny):
    inputs = batch(tiny)
    with pytest.raises(UserError, match="out of range"):
        with heads(tiny, [9]):
            pass
    with pytest.raises(UserError, match="must return a tensor of shape"):
        with torch.no_grad(), heads(tiny, read=False, edit={0: lambda z: z[..., :1, :]}):
            tiny.model(**inputs)
    assert hook_count(tiny.model) == 0
