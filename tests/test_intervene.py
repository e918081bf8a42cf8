import math

import pytest
import torch

from steering_lab.activations import pad_left
from steering_lab.errors import UserError
from steering_lab.generate import final, stream
from steering_lab.intervene import Steer, capture, hook_count, steer
from steering_lab.vector import SteeringVector

PROMPTS = ["Tell me about the weather today.", "How was your weekend?", "Describe a library."]


def batch(lm, prompts=PROMPTS):
    seqs = [lm.encode_prompt(p) for p in prompts]
    ids, mask, pos = pad_left(seqs, lm.pad_id)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos)


def logits(lm, inputs, steering=()):
    with torch.no_grad():
        if steering:
            with steer(lm, steering):
                return lm.model(**inputs).logits
        return lm.model(**inputs).logits


def rand_dir(lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.d_model, generator=g)


@pytest.mark.parametrize("operator", ["add", "ablate", "rotate"])
def test_strength_zero_is_exactly_unsteered(tiny, operator):
    inputs = batch(tiny)
    base = logits(tiny, inputs)
    out = logits(tiny, inputs, [Steer(rand_dir(tiny), 0.0, layers=[0, 2], operator=operator)])
    assert torch.equal(base, out)


def test_nonzero_strength_changes_logits(tiny):
    inputs = batch(tiny)
    base = logits(tiny, inputs)
    for op, s in [("add", 2.0), ("ablate", 1.0), ("clamp", 3.0), ("rotate", 30.0)]:
        out = logits(tiny, inputs, [Steer(rand_dir(tiny), s, layers=[1], operator=op)])
        assert not torch.allclose(base, out), op


def test_add_then_subtract_is_identity(tiny):
    inputs = batch(tiny)
    v = rand_dir(tiny)
    base = logits(tiny, inputs)
    out = logits(tiny, inputs, [Steer(v, 3.0, layers=[1]), Steer(v, -3.0, layers=[1])])
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)


def test_per_row_strengths_match_separate_runs(tiny):
    prompt = PROMPTS[0]
    v = rand_dir(tiny)
    strengths = [0.0, 1.5, -2.0]
    inputs = batch(tiny, [prompt] * 3)
    together = logits(tiny, inputs, [Steer(v, strengths, layers=[1, 2])])
    for i, s in enumerate(strengths):
        alone = logits(tiny, batch(tiny, [prompt]), [Steer(v, s, layers=[1, 2])])
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-4)


def test_batched_equals_unbatched_with_padding(tiny):
    v = rand_dir(tiny)
    item = [Steer(v, 1.0, layers=[1])]
    together = logits(tiny, batch(tiny), item)
    for i, p in enumerate(PROMPTS):
        alone = logits(tiny, batch(tiny, [p]), item)
        n = alone.shape[1]
        torch.testing.assert_close(together[i, -n:], alone[0], atol=1e-5, rtol=1e-4)


def test_batched_generation_equals_unbatched(tiny):
    v = rand_dir(tiny)
    item = Steer(v, 2.0, layers=[1])
    last = final(stream(tiny, PROMPTS, item, max_new_tokens=8))
    for i, p in enumerate(PROMPTS):
        single = final(stream(tiny, [p], item, max_new_tokens=8))
        assert single.token_ids[0] == last.token_ids[i]


def test_hooks_removed_on_normal_exit_and_exception(tiny):
    before = hook_count(tiny.model)
    with steer(tiny, Steer(rand_dir(tiny), 1.0, layers=[0, 1], scope="prompt")) as h:
        assert hook_count(tiny.model) == before + 3  # two blocks + the position pre-hook
        h.remove()
        h.remove()  # safe twice
        assert hook_count(tiny.model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny, Steer(rand_dir(tiny), 1.0, layers=[0, 1, 2])):
            assert hook_count(tiny.model) == before + 3
            raise RuntimeError("boom")
    assert hook_count(tiny.model) == before


def test_hooks_removed_when_error_raised_inside_forward(tiny):
    before = hook_count(tiny.model)
    with pytest.raises(UserError, match="per-row strengths"):
        with steer(tiny, Steer(rand_dir(tiny), [1.0, 2.0], layers=[1])):
            logits(tiny, batch(tiny))  # 3 rows, 2 strengths
    assert hook_count(tiny.model) == before


def test_no_hook_between_steps_and_abandoned_stream_leaves_the_batch(tiny):
    from steering_lab.engine import engine_for

    before = hook_count(tiny.model)
    gen = stream(tiny, PROMPTS[:1], Steer(rand_dir(tiny), 1.0, layers=[1]), max_new_tokens=20)
    next(gen)
    assert hook_count(tiny.model) == before  # hooks live only inside the engine's own forward passes
    assert engine_for(tiny).active_rows == 1
    gen.close()  # what the app does when a newer slider value cancels a stream
    engine_for(tiny).step()  # the next step boundary retires the row
    assert engine_for(tiny).active_rows == 0 and engine_for(tiny).idle
    assert hook_count(tiny.model) == before


def test_capture_hooks_removed(tiny):
    before = hook_count(tiny.model)
    with capture(tiny, [0, 3], stop_early=True) as cap:
        assert cap.forward(**batch(tiny)) is None  # stopped after block 3 (the last block here)
    assert hook_count(tiny.model) == before
    assert set(cap.outputs) == {0, 3}


def _project(h, v):
    return h.float() @ (v / v.norm())


def test_ablate_removes_projection_and_clamp_sets_it(tiny):
    v = rand_dir(tiny)
    inputs = batch(tiny)
    for op, s, target in [("ablate", 1.0, 0.0), ("clamp", 0.7, 0.7), ("clamp", -2.0, -2.0)]:
        with torch.no_grad(), steer(tiny, Steer(v, s, layers=[1], operator=op)), capture(tiny, [1]) as cap:
            tiny.model(**inputs)
        proj = _project(cap.last(1), v)
        torch.testing.assert_close(proj, torch.full_like(proj, target), atol=1e-5, rtol=0)


def test_ablate_fraction(tiny):
    v = rand_dir(tiny)
    inputs = batch(tiny)
    with torch.no_grad(), capture(tiny, [1]) as cap:
        tiny.model(**inputs)
    with torch.no_grad(), steer(tiny, Steer(v, 0.25, layers=[1], operator="ablate")), capture(tiny, [1]) as cap2:
        tiny.model(**inputs)
    torch.testing.assert_close(_project(cap2.last(1), v), 0.75 * _project(cap.last(1), v), atol=1e-5, rtol=1e-4)


def test_rotate_preserves_norm_and_turns_by_angle(tiny):
    v = rand_dir(tiny)
    u = v / v.norm()
    inputs = batch(tiny)
    with torch.no_grad(), capture(tiny, [2]) as pre:
        tiny.model(**inputs)
    with torch.no_grad(), steer(tiny, Steer(v, 20.0, layers=[2], operator="rotate")), capture(tiny, [2]) as post:
        tiny.model(**inputs)
    h0, h1 = pre.last(2).float(), post.last(2).float()
    torch.testing.assert_close(h1.norm(dim=-1), h0.norm(dim=-1), atol=1e-5, rtol=1e-5)
    a0 = torch.arccos((h0 @ u / h0.norm(dim=-1)).clamp(-1, 1))
    a1 = torch.arccos((h1 @ u / h1.norm(dim=-1)).clamp(-1, 1))
    expected = (a0 - math.radians(20)).abs()  # stays in the plane of h and u
    torch.testing.assert_close(a1, expected, atol=1e-4, rtol=0)


def test_scopes_prompt_and_generated(tiny):
    """Capture before (pre) and after (post) the steering hook on the same block; the difference
    is what the hook added, checked on the prefill and on a cached decode step."""
    from transformers import DynamicCache

    def _forward(lm, ids, mask, pos, cache):
        return lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)

    def _new_cache(lm):
        return DynamicCache(config=lm.model.config)

    v = rand_dir(tiny)
    seqs = [tiny.encode_prompt(PROMPTS[0])]
    ids, mask, pos = pad_left(seqs, tiny.pad_id)
    for scope in ("prompt", "generated"):
        cache = _new_cache(tiny)
        with torch.no_grad(), capture(tiny, [1]) as pre, \
                steer(tiny, Steer(v, 2.0, layers=[1], scope=scope)), capture(tiny, [1]) as post:
            _forward(tiny, ids, mask, pos, cache)
            nxt = torch.tensor([[5]])
            _forward(tiny, nxt, torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1), pos[:, -1:] + 1, cache)
        prefill_delta = post.outputs[1][0] - pre.outputs[1][0]
        decode_delta = post.outputs[1][1] - pre.outputs[1][1]
        steered, untouched = (prefill_delta, decode_delta) if scope == "prompt" else (decode_delta, prefill_delta)
        assert torch.equal(untouched, torch.zeros_like(untouched)), scope
        torch.testing.assert_close(steered, (2.0 * v).expand_as(steered), atol=1e-5, rtol=1e-5)


def test_generated_scope_keeps_first_token(tiny):
    v = rand_dir(tiny)
    base = list(stream(tiny, PROMPTS[:1], (), max_new_tokens=3))
    gen = list(stream(tiny, PROMPTS[:1], Steer(v, 5.0, layers=[0, 1, 2], scope="generated"), max_new_tokens=3))
    assert gen[0].tokens == base[0].tokens  # the prefill (prompt positions) is untouched


def test_set_strength_in_place(tiny):
    v = rand_dir(tiny)
    inputs = batch(tiny)
    expect = logits(tiny, inputs, [Steer(v, 2.5, layers=[1])])
    base = logits(tiny, inputs)
    with torch.no_grad(), steer(tiny, Steer(v, 0.0, layers=[1])) as h:
        assert torch.equal(tiny.model(**inputs).logits, base)
        h.set_strength(0, 2.5)
        torch.testing.assert_close(tiny.model(**inputs).logits, expect, atol=0, rtol=0)
        with pytest.raises(UserError):
            h.set_strength(0, [1.0, 2.0])


def test_two_vectors_two_layers_equals_nested_hooks(tiny):
    a, b = rand_dir(tiny, 1), rand_dir(tiny, 2)
    inputs = batch(tiny)
    together = logits(tiny, inputs, [Steer(a, 1.0, layers=[0]), Steer(b, -1.5, layers=[2])])
    with torch.no_grad(), steer(tiny, Steer(a, 1.0, layers=[0])), steer(tiny, Steer(b, -1.5, layers=[2])):
        nested = tiny.model(**inputs).logits
    assert torch.equal(together, nested)


def test_steering_vector_uses_recommended_layer(tiny):
    dirs = {k: rand_dir(tiny, k) for k in range(tiny.n_layers)}
    vec = SteeringVector(directions=dirs, recommended_layer=2)
    inputs = batch(tiny)
    a = logits(tiny, inputs, [Steer(vec, 1.0)])
    b = logits(tiny, inputs, [Steer(dirs[2], 1.0, layers=[2])])
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(operator="scale"), "unknown operator"),
    (dict(scope="middle"), "unknown scope"),
    (dict(layers=[9]), "out of range"),
    (dict(strength=float("nan")), "finite"),
])
def test_bad_interventions_are_clear_errors(tiny, bad, match):
    before = hook_count(tiny.model)
    kw = dict(vector=rand_dir(tiny), strength=1.0, layers=[1])
    kw.update(bad)
    with pytest.raises(UserError, match=match):
        with steer(tiny, Steer(**kw)):
            pass
    assert hook_count(tiny.model) == before


def test_width_mismatch(tiny):
    with pytest.raises(UserError, match="width"):
        with steer(tiny, Steer(torch.randn(7), 1.0, layers=[1])):
            pass
    with pytest.raises(UserError, match="zero direction"):
        with steer(tiny, Steer(torch.zeros(tiny.d_model), 1.0, layers=[1], operator="ablate")):
            pass


def test_works_on_every_architecture(tiny_tokenizer):
    from conftest import ARCHS, make_tiny

    for arch in ARCHS:
        lm = make_tiny(arch, tiny_tokenizer)
        inputs = batch(lm)
        base = logits(lm, inputs)
        assert torch.equal(base, logits(lm, inputs, [Steer(rand_dir(lm), 0.0, layers=[1])])), arch
        assert not torch.allclose(base, logits(lm, inputs, [Steer(rand_dir(lm), 5.0, layers=[1])])), arch
        assert hook_count(lm.model) == 0, arch
