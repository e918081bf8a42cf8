"""The app, launched for real and driven through gradio_client (named endpoints) and its callbacks."""

import socket

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.intervene import hook_count
from steering_lab.ui.context import make_context
from steering_lab.ui.library import validate_name
from steering_lab.ui.render import metrics_markdown, token_strip
from steering_lab.ui.steer_tab import build_steering, run_stream, slider_spec
from steering_lab.ui.sweep_tab import parse_strengths
from steering_lab.vector import SteeringVector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_ctx(tiny, tmp_path_factory):
    shipped = tmp_path_factory.mktemp("shipped")
    g = torch.Generator().manual_seed(0)
    rnd = SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                         recommended_layer=1, recommended_strength=3.0, description="random")
    rnd.save(shipped / "vectors" / "rnd")
    SteeringVector(directions={0: torch.randn(16)}).save(shipped / "vectors" / "foreign")  # another model's width
    return make_context(tiny, user_dir=tmp_path_factory.mktemp("user"), shipped_root=shipped)


def test_library_and_names(tiny_ctx, tmp_path):
    assert tiny_ctx.vectors.names() == ["foreign", "rnd"]
    assert tiny_ctx.compatible_vectors() == ["rnd"]  # the foreign one is listed in the table only
    rows = {r[0]: r for r in tiny_ctx.vectors.table()}
    assert rows["rnd"][1] == "shipped" and rows["rnd"][2] == 1
    for bad in ("", "../x", "a/b", "x.safetensors", "-lead", "a" * 65):
        with pytest.raises(UserError):
            validate_name(bad)
    with pytest.raises(UserError, match="shipped"):
        tiny_ctx.vectors.target("rnd")
    vec = tiny_ctx.vectors.get("rnd")
    assert tiny_ctx.vectors.save(vec, "mine") == "mine" and tiny_ctx.vectors.is_user("mine")
    with pytest.raises(UserError, match="exists"):
        tiny_ctx.vectors.save(vec, "mine")
    with pytest.raises(UserError, match="cannot be deleted"):
        tiny_ctx.vectors.delete("rnd")
    tiny_ctx.vectors.delete("mine")
    assert "mine" not in tiny_ctx.vectors.names()
    # upload: safetensors only, validated against the model before it lands in the library
    SteeringVector(directions={0: torch.randn(16)}).save(tmp_path / "narrow")
    with pytest.raises(UserError, match="d_model"):
        tiny_ctx.vectors.import_files(tmp_path / "narrow.safetensors", None, "narrow", tiny_ctx.lm)
    assert "narrow" not in tiny_ctx.vectors.names()
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match="safetensors"):
        tiny_ctx.vectors.import_files(tmp_path / "evil.pt", None, "evil", tiny_ctx.lm)
    vec.save(tmp_path / "ok")
    assert tiny_ctx.vectors.import_files(tmp_path / "ok.safetensors", tmp_path / "ok.json", "ok", tiny_ctx.lm) == "ok"
    tiny_ctx.vectors.delete("ok")


def test_run_stream_equals_library_generation_and_is_superseded(tiny_ctx):
    from steering_lab.generate import generate
    from steering_lab.intervene import Steer

    ctx = tiny_ctx
    run = ctx.new_run("s1")
    outs = list(run_stream(ctx, "s1", run, "How was your weekend?", "", ["rnd"], [3.0, 0, 0], "add", "recommended",
                           "separate", 6, "none", [], None))
    baseline, steered, table, strip, _, record = outs[-1]
    vec = ctx.vectors.get("rnd")
    assert [baseline, steered] == generate(ctx.lm, ["How was your weekend?"] * 2, Steer(vec, [0.0, 3.0]),
                                           max_new_tokens=6)
    assert "done" in table and "mean KL" in table and "<span" in strip
    assert record["text"] == baseline
    # a newer run of the same session stops this one at its next token; hooks come off
    run = ctx.new_run("s1")
    gen = run_stream(ctx, "s1", run, "How was your weekend?", "", ["rnd"], [-3.0, 0, 0], "add", "recommended",
                     "separate", 6, "none", [], record)
    first = next(gen)
    assert first[0] == baseline  # cached baseline reused on a slider release
    ctx.new_run("s1")
    assert list(gen) == []
    assert hook_count(ctx.lm.model) == 0


def test_ui_helpers(tiny_ctx):
    assert slider_spec(20.0, "add") == dict(minimum=-60.0, maximum=60.0, step=0.5, value=20.0)
    assert slider_spec(None, "ablate")["maximum"] == 1.0
    assert slider_spec(5.0, "rotate")["minimum"] == -90.0
    steers, monitors = build_steering(tiny_ctx, ["rnd"], [2.0], "rotate", "2", "separate")
    assert steers[0].layers == [2] and steers[0].operator == "rotate" and monitors[0].layer == 2
    with pytest.raises(UserError):
        build_steering(tiny_ctx, ["rnd", "rnd"], [1.0, 1.0], "ablate", "recommended", "sum")
    assert parse_strengths("0, 5,-5") == [0.0, 5.0, -5.0]
    for bad in ("", "a,b", "1,1"):
        with pytest.raises(UserError):
            parse_strengths(bad)
    html = token_strip(["a", "<b>"], [1.0, -0.5])
    assert "&lt;b&gt;" in html and "rgba(214,39,40,0.75)" in html and "rgba(31,119,180" in html
    md = metrics_markdown(kl=0.5, perplexity=3.2, refusal=True, n_tokens=4, tok_per_s=10.0,
                          probes={"probe:x": (0.25, None)}, done=True)
    assert "0.500" in md and "yes" in md and "0.250" in md and "baseline –" in md


@pytest.mark.real
def test_app_endpoints_with_gradio_client(smol, tmp_path):
    from gradio_client import Client

    from steering_lab.ui.app import build_demo

    ctx = make_context(smol, user_dir=tmp_path)
    assert "sentiment" in ctx.compatible_vectors()
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        client = Client(url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/generate", "/extract"} <= set(api)
        same = client.predict("Tell me about your weekend.", "sentiment", 0.0, 24, api_name="/generate")
        assert set(same) == {"baseline", "steered"} and same["baseline"] == same["steered"]
        rec = ctx.vectors.get("sentiment").recommended_strength
        diff = client.predict("Tell me about your weekend.", "sentiment", -rec, 24, api_name="/generate")
        assert diff["baseline"] == same["baseline"] and diff["steered"] != diff["baseline"]
        summary = client.predict("formality", "mean_diff", "8-12", "formal_api", api_name="/extract")
        assert summary["name"] == "formal_api" and 8 <= summary["recommended_layer"] <= 12
        assert "formal_api" in ctx.vectors.names() and ctx.vectors.is_user("formal_api")
        with pytest.raises(Exception, match="no vector called"):
            client.predict("hi", "nope", 1.0, 8, api_name="/generate")
    finally:
        demo.close()
    assert hook_count(smol.model) == 0


def test_dynamic_composition_in_the_steer_tab(tiny_ctx):
    from steering_lab.compose import compose
    from steering_lab.generate import generate

    ctx = tiny_ctx
    run = ctx.new_run("dyn")
    outs = list(run_stream(ctx, "dyn", run, "How was your weekend?", "", ["rnd"], [3.0, 0, 0], "add", "recommended",
                           "dynamic", 6, "none", [], None, 1e-12))  # tiny tau: always full strength
    baseline, steered, table, strip, _, record = outs[-1]
    vec = ctx.vectors.get("rnd")
    assert steered == generate(ctx.lm, ["How was your weekend?"], compose([(vec, 3.0)]), max_new_tokens=6)[0]
    assert baseline == generate(ctx.lm, ["How was your weekend?"], max_new_tokens=6)[0]
    assert "dynamic composition" in table and "done" in table and record["text"] == baseline
    with pytest.raises(UserError, match="add operator"):
        list(run_stream(ctx, "dyn", ctx.new_run("dyn"), "Hi", "", ["rnd"], [1.0, 0, 0], "rotate", "recommended",
                        "dynamic", 4, "none", [], None, 0.5))
