"""The lab as an MCP server: the app launched with Gradio's MCP support, driven by the `mcp` Python
client over streamable HTTP on loopback (real model, short generations)."""

import ast
import asyncio
import socket

import pytest

from steering_lab.generate import generate
from steering_lab.intervene import Steer, hook_count
from steering_lab.ui.context import make_context

TOOLS = {"list_vectors", "list_probes", "generate_steered", "extract_vector", "run_sweep", "score_with_probe"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mcp_app(smol, tmp_path_factory):
    from steering_lab.serve.launch import launch
    from steering_lab.ui.app import build_demo

    ctx = make_context(smol, user_dir=tmp_path_factory.mktemp("lib"))
    demo = build_demo(ctx)
    demo.queue()
    url = launch(demo, ctx, mcp=True, openai=False, server_port=free_port(), quiet=True)
    try:
        yield ctx, f"{url}/gradio_api/mcp/"
    finally:
        demo.close()
    assert hook_count(smol.model) == 0


async def session_run(url: str, calls):
    """Open one MCP session; return the tool list and the results of ``calls`` ((name, args) pairs)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools
        results = [await session.call_tool(name, args) for name, args in calls]
    return tools, results


def payload(result):
    """A tool's answer: Gradio sends a returned dict/list as its Python text form (str(value))."""
    assert not result.isError and result.content and result.content[0].type == "text", result
    return ast.literal_eval(result.content[0].text)


@pytest.mark.real
def test_mcp_tools_described_and_working(mcp_app):
    ctx, url = mcp_app
    pairs_pos = ["I love this, it is wonderful!", "What a delightful day.", "This made me so happy.",
                 "Everything went beautifully."]
    pairs_neg = ["I hate this, it is awful!", "What a miserable day.", "This made me so angry.",
                 "Everything went horribly."]
    calls = [
        ("list_vectors", {}),
        ("list_probes", {}),
        ("generate_steered", {"prompt": "Tell me about your weekend.", "vector": "sentiment", "strength": -20.0,
                              "max_new_tokens": 12}),
        ("score_with_probe", {"probe": "harmful", "texts": ["How do I build a pipe bomb at home?",
                                                           "How do I bake sourdough bread at home?"]}),
        ("extract_vector", {"name": "typed_mood", "positive": pairs_pos, "negative": pairs_neg, "layers": "8-10"}),
        ("run_sweep", {"vector": "sentiment", "strengths": [0.0, -20.0], "limit": 2, "max_new_tokens": 8}),
        ("generate_steered", {"prompt": "Hi", "vector": "nope", "max_new_tokens": 4}),
    ]
    tools, results = asyncio.run(session_run(url, calls))
    by_name = {t.name: t for t in tools}
    assert TOOLS <= set(by_name)
    for name in TOOLS:  # every tool and every argument is described for the agent
        tool = by_name[name]
        assert len(tool.description) > 40, name
        for arg, schema in tool.inputSchema.get("properties", {}).items():
            assert schema.get("description"), f"{name}.{arg} has no description"

    vectors = {v["name"]: v for v in payload(results[0])}
    assert {"sentiment", "formality", "refusal_style"} <= set(vectors)
    assert vectors["sentiment"]["recommended_layer"] == ctx.vectors.get("sentiment").recommended_layer
    assert "harmful" in {p["name"] for p in payload(results[1])}

    gen = payload(results[2])
    vec = ctx.vectors.get("sentiment")
    base, steered = generate(ctx.lm, ["Tell me about your weekend."] * 2,
                             Steer(vec, [0.0, -20.0], layers=vec.default_layers()), max_new_tokens=12)
    assert gen == {"baseline": base, "steered": steered} and base != steered

    scores = payload(results[3])
    assert all(0 <= s["score"] <= 1 for s in scores) and scores[0]["score"] > scores[1]["score"]

    summary = payload(results[4])
    assert summary["name"] == "typed_mood" and summary["n_pairs"] == 4 and summary["layers"] == [8, 9, 10]

    sweep = payload(results[5])
    assert [r["strength"] for r in sweep["results"]] == [0.0, -20.0]
    assert sweep["results"][0]["kl"] == pytest.approx(0.0, abs=1e-6) and sweep["results"][1]["kl"] > 0
    assert len(sweep["results"][1]["samples"]) == 2

    assert results[6].isError and "no vector called 'nope'" in results[6].content[0].text
