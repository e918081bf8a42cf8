"""The decode engine: continuous batching with per-row steering, cancellation, isolation of other
forward passes. Greedy decoding, so the checks are on exact token ids."""

from __future__ import annotations

import threading

import pytest
import torch

from steering_lab.engine import Engine, Request
from steering_lab.errors import UserError
from steering_lab.generate import stream
from steering_lab.intervene import Steer, hook_count

PROMPTS = ["Tell me about your weekend.", "What is a good breakfast?", "Describe the sea in winter.",
           "How do I fix a flat tyre?"]


def rand_dir(lm, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.d_model, generator=g) * scale


def alone(lm, prompt_ids, steering=(), n=12, **kw):
    eng = Engine(lm)
    return eng.submit(Request(prompt_ids=prompt_ids, steering=steering, max_new_tokens=n, **kw)).result().token_ids


def test_request_tokens_equal_alone_when_joining_and_leaving_a_running_batch(tiny):
    ids = [tiny.encode_prompt(p) for p in PROMPTS]
    a_steer = [Steer(rand_dir(tiny, 1), 1.5, layers=[1])]
    b_steer = [Steer(rand_dir(tiny, 2), -2.0, layers=[2], operator="add"),
               Steer(rand_dir(tiny, 3), 0.5, layers=[2], operator="ablate")]
    c_steer = [Steer(rand_dir(tiny, 4), 20.0, layers=[0, 3], operator="rotate")]
    want_a = alone(tiny, [ids[0]], a_steer, n=20)
    want_b = alone(tiny, [ids[1], ids[2]], b_steer, n=6)
    want_c = alone(tiny, [ids[3]], c_steer, n=10)

    eng = Engine(tiny)
    a = iter(eng.submit(Request(prompt_ids=[ids[0]], steering=a_steer, max_new_tokens=20)))
    for _ in range(3):
        next(a)
    b = eng.submit(Request(prompt_ids=[ids[1], ids[2]], steering=b_steer, max_new_tokens=6))  # joins mid-stream
    steps_a = [next(a) for _ in range(4)]
    assert eng.active_rows == 3  # one batch: A's row and B's two rows
    c = eng.submit(Request(prompt_ids=[ids[3]], steering=c_steer, max_new_tokens=10))
    got_b = b.result().token_ids  # B finishes and leaves while A and C go on
    got_c = c.result().token_ids
    got_a = list(a)[-1].token_ids if not steps_a[-1].done[0] else steps_a[-1].token_ids
    assert got_b == want_b
    assert got_c == want_c
    assert got_a == want_a
    assert eng.idle and hook_count(tiny.model) == 0


def test_rows_of_one_batch_carry_their_own_vectors_and_strengths(tiny):
    ids = tiny.encode_prompt(PROMPTS[0])
    vecs = [rand_dir(tiny, s) for s in range(4)]
    strengths = [0.0, 2.0, -3.0, 5.0]
    want = [alone(tiny, [ids], [Steer(v, s, layers=[1])], n=8)[0] for v, s in zip(vecs, strengths)]
    eng = Engine(tiny)
    handles = [eng.submit(Request(prompt_ids=[ids], steering=[Steer(v, s, layers=[1])], max_new_tokens=8))
               for v, s in zip(vecs, strengths)]
    got = [h.result().token_ids[0] for h in handles]
    assert got == want
    assert got[0] == alone(tiny, [ids], (), n=8)[0]  # strength 0 == unsteered
    assert len({tuple(g) for g in got}) > 1  # the strengths do change the text


def test_cancelling_one_request_leaves_the_others_unchanged(tiny):
    ids = [tiny.encode_prompt(p) for p in PROMPTS[:3]]
    steers = [[Steer(rand_dir(tiny, i), 2.0, layers=[i % 4])] for i in range(3)]
    want = [alone(tiny, [ids[i]], steers[i], n=15)[0] for i in range(3)]
    eng = Engine(tiny)
    hs = [eng.submit(Request(prompt_ids=[ids[i]], steering=steers[i], max_new_tokens=15)) for i in range(3)]
    it = iter(hs[1])
    for _ in range(4):
        next(it)
    hs[1].cancel()
    assert hs[0].result().token_ids[0] == want[0]
    assert hs[2].result().token_ids[0] == want[2]
    assert list(it) == []  # the cancelled request ends without more steps
    assert eng.idle and hook_count(tiny.model) == 0


def test_forward_passes_outside_the_engine_are_unsteered_while_it_runs(tiny):
    """Another thread runs a plain forward pass while the engine's thread is inside a steered forward
    pass (held there by a test hook): it must see the unsteered model exactly."""
    inputs = {"input_ids": torch.tensor([tiny.encode_prompt(PROMPTS[1])])}
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
    eng = Engine(tiny)
    entered, release = threading.Event(), threading.Event()
    engine_thread = []

    def hold(module, args):
        if threading.get_ident() == engine_thread[0] and not release.is_set():
            entered.set()
            release.wait(10)

    seen = {}

    def other():
        entered.wait(10)
        with torch.no_grad():
            seen["logits"] = tiny.model(**inputs).logits
        release.set()

    handle = tiny.layers[3].register_forward_pre_hook(hold)
    try:
        t = threading.Thread(target=other)
        t.start()
        engine_thread.append(threading.get_ident())
        eng.submit(Request(prompt_ids=[tiny.encode_prompt(PROMPTS[0])], max_new_tokens=2,
                           steering=[Steer(rand_dir(tiny, 5, 50.0), 3.0, layers=[0, 1, 2, 3])])).result()
        t.join(10)
    finally:
        handle.remove()
    assert entered.is_set() and "logits" in seen
    assert torch.equal(seen["logits"], plain)
    assert hook_count(tiny.model) == 0


def test_concurrent_consumers_share_the_batch_and_get_their_own_tokens(tiny):
    ids = [tiny.encode_prompt(p) for p in PROMPTS]
    steers = [[Steer(rand_dir(tiny, 10 + i), 1.0 + i, layers=[1 + i % 3])] for i in range(4)]
    want = [alone(tiny, [ids[i]], steers[i], n=12)[0] for i in range(4)]
    eng = Engine(tiny)
    got: dict[int, list[int]] = {}
    errors = []

    def consume(i):
        try:
            got[i] = eng.submit(Request(prompt_ids=[ids[i]], steering=steers[i], max_new_tokens=12)).result() \
                .token_ids[0]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [got[i] for i in range(4)] == want
    # fewer engine steps than four requests run one after another (they shared forward passes)
    assert eng.steps_run < 4 * 12


def test_bad_requests_fail_at_submit_and_leave_the_engine_usable(tiny):
    eng = Engine(tiny)
    ids = tiny.encode_prompt(PROMPTS[0])
    with pytest.raises(UserError, match="out of range"):
        eng.submit(Request(prompt_ids=[ids], steering=[Steer(rand_dir(tiny), 1.0, layers=[9])]))
    with pytest.raises(UserError, match="width"):
        eng.submit(Request(prompt_ids=[ids], steering=[Steer(torch.ones(7), 1.0, layers=[1])]))
    with pytest.raises(UserError, match="empty"):
        eng.submit(Request(prompt_ids=[[]]))
    with pytest.raises(UserError, match="strengths"):
        eng.submit(Request(prompt_ids=[ids], steering=[Steer(rand_dir(tiny), [1.0, 2.0], layers=[1])]))
    assert eng.submit(Request(prompt_ids=[ids], max_new_tokens=3)).result().token_ids == alone(tiny, [ids], n=3)


def test_failing_callback_ends_only_its_request(tiny):
    ids = tiny.encode_prompt(PROMPTS[0])

    def boom(ctl):
        if ctl.step == 2:
            raise UserError("callback failed")

    eng = Engine(tiny)
    good = eng.submit(Request(prompt_ids=[ids], max_new_tokens=6))
    bad = eng.submit(Request(prompt_ids=[ids], max_new_tokens=6, control=boom))
    with pytest.raises(UserError, match="callback failed"):
        bad.result()
    assert good.result().token_ids == alone(tiny, [ids], n=6)
    assert hook_count(tiny.model) == 0


def test_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    ids = tiny.encode_prompt(PROMPTS[2])
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    want = alone(tiny, [ids], n=10, **kw)
    eng = Engine(tiny)
    other = eng.submit(Request(prompt_ids=[tiny.encode_prompt(PROMPTS[0])], max_new_tokens=10, temperature=1.0,
                               seed=3))
    mine = eng.submit(Request(prompt_ids=[ids], max_new_tokens=10, **kw))
    assert mine.result().token_ids == want
    other.result()


def test_stream_is_a_thin_use_of_the_engine(tiny):
    ids = [tiny.encode_prompt(p) for p in PROMPTS[:2]]
    v = rand_dir(tiny, 3)
    steps = list(stream(tiny, PROMPTS[:2], Steer(v, [0.0, 2.0], layers=[1]), max_new_tokens=5))
    assert steps[-1].token_ids == alone(tiny, ids, [Steer(v, [0.0, 2.0], layers=[1])], n=5)
    assert [len(s.token_ids[0]) for s in steps] == list(range(1, len(steps) + 1))


@pytest.mark.real
def test_real_model_request_equal_alone_and_in_a_running_batch(smol, sentiment_vector):
    vec, _ = sentiment_vector
    k = vec.recommended_layer
    ids = [smol.encode_prompt(p) for p in PROMPTS[:3]]
    steers = [[Steer(vec, -8.0, layers=[k])], [], [Steer(vec, 8.0, layers=[k])]]
    want = [alone(smol, [ids[i]], steers[i], n=24)[0] for i in range(3)]
    eng = Engine(smol)
    first = iter(eng.submit(Request(prompt_ids=[ids[0]], steering=steers[0], max_new_tokens=24)))
    for _ in range(5):
        next(first)
    others = [eng.submit(Request(prompt_ids=[ids[i]], steering=steers[i], max_new_tokens=24)) for i in (1, 2)]
    got0 = list(first)
    assert got0[-1].token_ids[0] == want[0]
    assert [h.result().token_ids[0] for h in others] == want[1:]
    assert hook_count(smol.model) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_layout_gives_the_eager_tokens(tiny_tokenizer, arch):
    """The fast path's layout (static KV buffers, every row writing at one shared slot, rows joining
    into free slots) run without CUDA-graph capture on CPU: the same tokens as the eager engine."""
    from conftest import make_tiny

    from steering_lab.monitor import direction_monitor
    from steering_lab.vector import SteeringVector

    lm = make_tiny(arch, tiny_tokenizer)
    ids = [lm.encode_prompt(p) for p in PROMPTS]
    mon = direction_monitor(SteeringVector(directions={2: rand_dir(lm, 9)}), layer=2, name="m")
    reqs = [
        dict(prompt_ids=[ids[0]], steering=[Steer(rand_dir(lm, 1), 1.5, layers=[1])], max_new_tokens=20),
        dict(prompt_ids=[ids[1], ids[2]], steering=[Steer(rand_dir(lm, 2), [-2.0, 1.0], layers=[2]),
                                                    Steer(rand_dir(lm, 3), 0.5, layers=[2], operator="ablate")],
             max_new_tokens=9, monitors=[mon]),
        dict(prompt_ids=[ids[3]] * 2, steering=[Steer(rand_dir(lm, 4), 3.0, layers=[0], rows=[True, False],
                                                       scope="generated")], max_new_tokens=12, follow={1: 0},
             want_logits=True),
        dict(prompt_ids=[ids[2]], steering=[Steer(rand_dir(lm, 5), 30.0, layers=[3], operator="rotate"),
                                            Steer(rand_dir(lm, 6), 0.7, layers=[1], operator="clamp")],
             max_new_tokens=7),
    ]
    results = {}
    for mode in ("eager", "static"):
        eng = Engine(lm, fast=mode, min_capacity=2, min_length=8)
        first = iter(eng.submit(Request(**reqs[0])))
        for _ in range(3):
            next(first)
        hs = [eng.submit(Request(**r)) for r in reqs[1:3]]
        mid = [next(first) for _ in range(2)]
        hs.append(eng.submit(Request(**reqs[3])))  # joins later, with a longer prompt than the slot offset
        outs = [h.result() for h in hs]
        rest = list(first)
        last_first = rest[-1] if rest else mid[-1]
        results[mode] = ([last_first.token_ids] + [o.token_ids for o in outs], outs[0].monitor["m"])
        assert eng.idle and hook_count(lm.model) == 0
    assert results["static"][0] == results["eager"][0]
    torch.testing.assert_close(torch.tensor(results["static"][1]), torch.tensor(results["eager"][1]),
                               atol=1e-4, rtol=1e-4)  # separate passes over different cache layouts


@pytest.mark.real
def test_real_model_static_layout_equals_eager(smol, sentiment_vector):
    """The fast path's cache layout on the embedded model (without graph capture on CPU): the same
    greedy tokens as the eager engine, steered and unsteered, with rows joining mid-stream."""
    vec, _ = sentiment_vector
    k = vec.recommended_layer
    ids = [smol.encode_prompt(p) for p in PROMPTS[:3]]
    steers = [[Steer(vec, -10.0, layers=[k])], [], [Steer(vec, 6.0, layers=[k - 2, k])]]
    got = {}
    for mode in ("eager", "static"):
        eng = Engine(smol, fast=mode)
        first = iter(eng.submit(Request(prompt_ids=[ids[0]], steering=steers[0], max_new_tokens=20)))
        for _ in range(4):
            next(first)
        others = [eng.submit(Request(prompt_ids=[ids[i]], steering=steers[i], max_new_tokens=20)) for i in (1, 2)]
        got[mode] = [list(first)[-1].token_ids[0]] + [h.result().token_ids[0] for h in others]
    assert got["static"] == got["eager"]
