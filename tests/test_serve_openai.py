"""The OpenAI-compatible endpoint: the `openai` client against the launched app over loopback (real
model, short greedy answers), and the routes on a bare FastAPI app with the tiny model."""

import socket

import pytest
import torch

from steering_lab.generate import final, generate, stream
from steering_lab.intervene import Steer, hook_count
from steering_lab.serve.openai import encode_messages, parse_request
from steering_lab.ui.context import make_context
from steering_lab.vector import SteeringVector

PROMPT = "Tell me about your weekend."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(smol, tmp_path_factory):
    from openai import OpenAI

    from steering_lab.serve.launch import launch
    from steering_lab.ui.app import build_demo

    ctx = make_context(smol, user_dir=tmp_path_factory.mktemp("lib"))
    demo = build_demo(ctx)
    demo.queue()
    url = launch(demo, ctx, server_port=free_port(), quiet=True)
    try:
        yield ctx, OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        demo.close()
    assert hook_count(smol.model) == 0


def ask(client, **kw):
    kw.setdefault("messages", [{"role": "user", "content": PROMPT}])
    kw.setdefault("model", "smollm2")
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


@pytest.mark.real
def test_models_and_unsteered_answer_equal_the_library(served):
    ctx, client = served
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "smollm2-135m-instruct"
    rec = ctx.vectors.get("sentiment").recommended_strength
    assert f"smollm2-135m-instruct+sentiment@{rec:g}" in ids

    out = ask(client, max_tokens=12)
    expected = generate(ctx.lm, [PROMPT], max_new_tokens=12)[0]
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    prompt_ids = encode_messages(ctx.lm, [{"role": "user", "content": PROMPT}])
    assert prompt_ids == ctx.lm.encode_prompt(PROMPT)  # one user turn: the same chat template as the app
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt_ids), 12, len(prompt_ids) + 12)


@pytest.mark.real
def test_streamed_chunks_add_up_to_the_answer(served):
    ctx, client = served
    whole = ask(client, max_tokens=12).choices[0].message.content
    chunks = list(ask(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 5 and "".join(deltas) == whole  # token by token, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.real
def test_stop_sequences_and_eos(served):
    ctx, client = served
    whole = ask(client, max_tokens=16).choices[0].message.content
    stop = whole.split()[3]
    cut = whole[:whole.find(stop)]
    out = ask(client, max_tokens=16, stop=[stop, "zzzz"])
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    streamed = list(ask(client, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    # an answer that ends by itself: EOS -> "stop", fewer tokens than allowed
    short = ask(client, max_tokens=64, messages=[{"role": "user", "content": "Reply with just the word: yes"}])
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 64


@pytest.mark.real
def test_steering_by_body_field_and_by_model_name(served):
    ctx, client = served
    vec = ctx.vectors.get("sentiment")
    s = -vec.recommended_strength
    plain = ask(client, max_tokens=16).choices[0].message.content
    by_name = ask(client, model=f"smollm2+sentiment@{s}", max_tokens=16)
    by_body = ask(client, max_tokens=16, extra_body={"steering": [{"vector": "sentiment", "strength": s}]})
    expected = generate(ctx.lm, [PROMPT], Steer(vec, s, layers=vec.default_layers()), max_new_tokens=16)[0]
    assert by_name.choices[0].message.content == by_body.choices[0].message.content == expected != plain
    assert by_body.model_extra["steering"] == [{"vector": "sentiment", "strength": s,
                                                "layers": vec.default_layers(), "operator": "add"}]
    # a layer in the name, several vectors, and a strength of 0 is the unsteered model
    zero = ask(client, model=f"smollm2+sentiment@0:{vec.recommended_layer}+formality@0", max_tokens=16)
    assert zero.choices[0].message.content == plain


@pytest.mark.real
def test_sampling_is_seeded_and_n_choices(served):
    _, client = served
    kw = dict(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, n=2)
    a, b = ask(client, **kw), ask(client, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16


@pytest.mark.real
def test_clear_4xx_errors(served):
    import openai

    _, client = served
    cases = [
        (dict(extra_body={"steering": [{"vector": "nope", "strength": 1}]}), "no vector called 'nope'"),
        (dict(extra_body={"steering": [{"vector": "../etc/passwd", "strength": 1}]}), "invalid name"),
        (dict(extra_body={"steering": [{"vector": "sentiment", "strength": "lots"}]}), "must be a number"),
        (dict(extra_body={"steering": [{"vector": "sentiment", "strength": 1, "layer": 99}]}), "out of range"),
        (dict(extra_body={"steering": [{"vector": "sentiment", "strength": 1, "operator": "melt"}]}), "operator"),
        (dict(model="smollm2+sentiment@x"), "must be a number"),
        (dict(model="smollm2+nope@3"), "no vector called 'nope'"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    ]
    for kw, text in cases:
        with pytest.raises(openai.BadRequestError, match=text) as info:
            ask(client, **kw)
        assert info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        ask(client, model="gpt-4o")


@pytest.mark.real
def test_a_client_leaving_mid_stream_cancels_its_request_and_the_server_keeps_serving(served):
    """Regression: the route cancelled the queued job with a blocking HTTP call on the server's own
    event loop, which deadlocked the whole app (CI hung for 90 minutes)."""
    import time

    from steering_lab.engine import engine_for

    ctx, client = served
    chunks = ask(client, max_tokens=400, stream=True)
    got = [c for _, c in zip(range(4), chunks)]
    chunks.close()  # the client goes away with ~395 tokens left
    assert len(got) == 4
    engine = engine_for(ctx.lm)
    deadline = time.monotonic() + 60
    while not engine.idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.idle, "the abandoned request is still in the engine"
    quick = client.with_options(timeout=60)  # a deadlocked server fails here instead of hanging
    for _ in range(3):
        out = ask(quick, max_tokens=4)
        assert out.usage.completion_tokens == 4
    assert hook_count(ctx.lm.model) == 0


@pytest.fixture(scope="module")
def tiny_ctx(tiny, tmp_path_factory):
    shipped = tmp_path_factory.mktemp("shipped")
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                         recommended_layer=1, recommended_strength=4.0, description="random")
    vec.save(shipped / "vectors" / "rnd")
    return make_context(tiny, user_dir=tmp_path_factory.mktemp("user"), shipped_root=shipped)


def test_routes_on_a_bare_app_with_an_api_key(tiny_ctx):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from steering_lab.serve.openai import mount

    app = FastAPI()
    mount(app, tiny_ctx, api_key="sesame")
    http = TestClient(app)
    body = {"model": "tiny-llama+rnd@4", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "How was your weekend?"},
                                                    {"role": "assistant", "content": "Fine."},
                                                    {"role": "user", "content": "And today?"}],
            "max_tokens": 5, "temperature": 0}
    denied = http.post("/v1/chat/completions", json=body)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sesame"}
    ok = http.post("/v1/chat/completions", json=body, headers=auth).json()
    req = parse_request(tiny_ctx, body)
    assert req.prompt_ids == tiny_ctx.lm.encode(tiny_ctx.lm.tokenizer.apply_chat_template(
        body["messages"], tokenize=False, add_generation_prompt=True), special=False)
    vec = tiny_ctx.vectors.get("rnd")
    want = final(stream(tiny_ctx.lm, ["x"], Steer(vec, 4.0, layers=[1]), max_new_tokens=5,
                        prompt_ids=[req.prompt_ids])).texts[0]
    assert ok["choices"][0]["message"]["content"] == want
    assert ok["usage"]["prompt_tokens"] == len(req.prompt_ids)
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True}, headers=auth)
    lines = [ln for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 4
    bad = http.post("/v1/chat/completions", content=b"{not json", headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert http.get("/v1/models", headers=auth).json()["data"][0]["id"] == "tiny-llama"
    assert hook_count(tiny_ctx.lm.model) == 0
