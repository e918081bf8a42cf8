"""Linear-AcT (directions/transport.py) and the ``transport`` operator: the fitted maps, the operator
on both hook paths (``steer`` and the engine's per-row batch plan, eager and static), files, the CLI,
the app, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from steering_lab.activations import pad_left
from steering_lab.datasets import ContrastSet
from steering_lab.directions.transport import TransportMap, fit_linear_act, fit_transport, sorted_pairs
from steering_lab.engine import Engine, Request
from steering_lab.errors import UserError
from steering_lab.intervene import BatchPlan, RowOp, Steer, capture, hook_count, steer, steer_batch
from steering_lab.vector import SteeringVector

PROMPTS = ["Tell me about your weekend.", "What is a good breakfast?", "Describe the sea in winter."]
SMALL = ContrastSet(
    name="mood", prompts=["How was your day?", "How is the weather?", "How was the film?", "How was lunch?",
                          "How is your new job?", "How was the trip?"],
    positive=["Wonderful, I loved every minute.", "Sunny and bright, a lovely day!", "Brilliant, truly moving.",
              "Delicious, I enjoyed it a lot.", "Great, my colleagues are so kind.", "Fantastic, we laughed all week."],
    negative=["Awful, I hated every minute.", "Grey and cold, a miserable day.", "Dreadful, truly boring.",
              "Disgusting, I regret it.", "Terrible, my colleagues are so rude.", "Horrible, we argued all week."])


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def act(tiny):
    """Linear-AcT maps of the tiny model at every layer (support on, causal)."""
    return fit_linear_act(tiny, SMALL)


def amplified(vec: SteeringVector, factor: float = 40.0) -> SteeringVector:
    """The same vector with shifts blown up, so that steering visibly changes a random tiny model's
    greedy tokens (its fitted shifts are tiny); the maps stay valid maps."""
    maps = {k: {**p, "shift": p["shift"] * factor + 0.5} for k, p in vec.transport.items()}
    maps = {k: {n: t for n, t in p.items() if n not in ("lo", "hi")} for k, p in maps.items()}
    return SteeringVector(directions=dict(vec.directions), transport=maps, method="linear_act",
                          d_model=vec.d_model, recommended_strength=1.0)


def inputs(lm, prompts=PROMPTS):
    ids, mask, pos = pad_left([lm.encode_prompt(p) for p in prompts], lm.pad_id)
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos)


def logits(lm, batch, steering=()):
    with torch.no_grad():
        if steering:
            with steer(lm, steering):
                return lm.model(**batch).logits
        return lm.model(**batch).logits


def alone(lm, ids, steering=(), n=10, fast="eager"):
    return Engine(lm, fast=fast).submit(Request(prompt_ids=ids, steering=steering, max_new_tokens=n)).result().token_ids


# ---------------------------------------------------------------------------------------------- the fit

def test_recovers_a_known_affine_map_exactly_when_the_target_is_one():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.1]) + 4.0
    a = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.25, 10.0])
    b = torch.tensor([1.0, -2.0, 0.0, 5.0, 3.0, -1.0])
    m = fit_transport(a * src + b, src)  # (target = pos, source = neg)
    torch.testing.assert_close(m.scale, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.shift, b, atol=1e-4, rtol=1e-4)
    s, t = sorted_pairs(src, a * src + b)
    torch.testing.assert_close((m.scale * s + m.shift).float(), t.float(), atol=1e-4, rtol=1e-5)
    # a decreasing map is no transport map: sorted pairs give an increasing one (a >= 0; ~2 as the
    # Gaussian sample is nearly symmetric)
    flipped = fit_transport(-2.0 * src + 1.0, src)
    assert bool((flipped.scale >= 0).all())
    torch.testing.assert_close(flipped.scale, torch.full((6,), 2.0), atol=0.05, rtol=0.05)


def test_recovers_the_map_between_independent_gaussian_samples():
    g = torch.Generator().manual_seed(1)
    mu_s, sd_s = torch.tensor([0.0, 3.0, -2.0, 10.0]), torch.tensor([1.0, 0.5, 2.0, 4.0])
    a, b = torch.tensor([1.5, 3.0, 0.5, 0.8]), torch.tensor([2.0, -1.0, 0.5, -6.0])
    src = mu_s + sd_s * torch.randn(20000, 4, generator=g)
    tgt = (a * mu_s + b) + a * sd_s * torch.randn(20000, 4, generator=g)  # N(a mu + b, a sd): T(x) = a x + b
    m = fit_transport(tgt, src, support=False)
    torch.testing.assert_close(m.scale, a, atol=0.03, rtol=0.03)
    torch.testing.assert_close(m.shift, b, atol=0.1, rtol=0.03)
    assert m.lo is None and m.hi is None
    # the map sends the source's quantiles onto the target's
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(m.scale * torch.quantile(src, q, dim=0) + m.shift, torch.quantile(tgt, q, dim=0),
                               atol=0.1, rtol=0.02)
    # unequal sample counts: the smaller side's quantiles are interpolated
    m2 = fit_transport(tgt[:7000], src, support=False)
    torch.testing.assert_close(m2.scale, a, atol=0.06, rtol=0.05)
    torch.testing.assert_close(m2.shift, b, atol=0.2, rtol=0.05)
    # toward="negative" fits the inverse map
    inv = fit_transport(tgt, src, toward="negative", support=False)
    torch.testing.assert_close(inv.scale, 1 / a, atol=0.03, rtol=0.03)


def test_support_is_the_source_range_and_outside_it_is_the_identity():
    src = torch.tensor([[0.0, -1.0], [1.0, 1.0], [2.0, 3.0]])
    tgt = src * 2 + 1
    m = fit_transport(tgt, src)
    assert torch.equal(m.lo, torch.tensor([0.0, -1.0])) and torch.equal(m.hi, torch.tensor([2.0, 3.0]))
    h = torch.tensor([[1.0, 5.0], [-0.5, 0.0]])
    out = m.apply(h)
    torch.testing.assert_close(out, torch.tensor([[3.0, 5.0], [-0.5, 1.0]]))  # outside [lo, hi]: unchanged
    assert torch.equal(m.apply(h, 0.0), h)
    # a constant source unit gets scale 1 (a pure shift)
    flat = fit_transport(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.0]]), support=False)
    assert float(flat.scale) == 1.0 and float(flat.shift) == 0.0


def test_bad_input_is_refused_clearly():
    x = torch.randn(5, 4)
    with pytest.raises(UserError, match="width mismatch"):
        fit_transport(x, torch.randn(5, 3))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        fit_transport(x, bad)
    with pytest.raises(UserError, match="NaN"):
        fit_transport(torch.full((3, 4), float("inf")), x)
    with pytest.raises(UserError, match="empty"):
        fit_transport(torch.empty(0, 4), x)
    with pytest.raises(UserError, match=r"\[N, d_model\]"):
        fit_transport(torch.randn(4), x)
    with pytest.raises(UserError, match="toward"):
        fit_transport(x, x, toward="up")
    with pytest.raises(UserError, match="strength"):
        TransportMap(scale=torch.ones(4), shift=torch.zeros(4)).apply(x, 1.5)
    with pytest.raises(UserError):  # an empty contrast set never reaches the fit
        ContrastSet(name="e", positive=[], negative=["x"])


# ---------------------------------------------------------------------------------------------- the operator

def test_lambda_zero_is_exactly_unsteered_with_steer(tiny, act):
    batch = inputs(tiny)
    base = logits(tiny, batch)
    assert torch.equal(logits(tiny, batch, [Steer(act, 0.0, operator="transport")]), base)
    assert torch.equal(logits(tiny, batch, [Steer(amplified(act), [0.0, 0.0, 0.0], operator="transport")]), base)
    assert not torch.allclose(logits(tiny, batch, [Steer(amplified(act), 1.0, operator="transport")]), base)
    assert hook_count(tiny.model) == 0


@pytest.mark.parametrize("fast", ["eager", "static"])
def test_lambda_zero_is_exactly_unsteered_in_the_engine(tiny, act, fast):
    ids = [tiny.encode_prompt(p) for p in PROMPTS]
    want = alone(tiny, ids, (), fast=fast)
    assert alone(tiny, ids, [Steer(amplified(act), 0.0, operator="transport")], fast=fast) == want
    # and on the batch plan directly: a lambda-0 transport row is bit-identical to an unsteered row
    vec = amplified(act)
    rows = [[(k, RowOp(vec[k], 0.0, "transport", maps=vec.transport_at(k))) for k in vec.layers], []]
    batch = inputs(tiny, PROMPTS[:2])
    with torch.no_grad(), steer_batch(tiny, BatchPlan.build(tiny, rows)):
        got = tiny.model(**batch).logits
    assert torch.equal(got, logits(tiny, batch))


@pytest.mark.parametrize("support", [True, False])
def test_lambda_one_is_the_affine_map_at_that_layer(tiny, act, support):
    vec = fit_linear_act(tiny, SMALL, layers=[2], support=support)
    scale, shift, lo, hi = vec.transport_at(2)
    assert (lo is not None) == support
    batch = inputs(tiny)
    with torch.no_grad(), capture(tiny, [2]) as plain:
        tiny.model(**batch)
    with torch.no_grad(), steer(tiny, Steer(vec, 1.0, operator="transport")), capture(tiny, [2]) as moved:
        tiny.model(**batch)
    h = plain.last(2)
    want = scale * h + shift
    if support:
        inside = (h >= lo) & (h <= hi)
        assert bool(inside.any()) and not bool(inside.all())  # both cases occur
        want = torch.where(inside, want, h)
    assert torch.equal(moved.last(2), want)
    # the engine's per-row path computes the same block output for a row at lambda 1
    rows = [[(2, RowOp(vec[2], 1.0, "transport", maps=vec.transport_at(2)))]] * len(PROMPTS)
    with torch.no_grad(), steer_batch(tiny, BatchPlan.build(tiny, rows)), capture(tiny, [2]) as planned:
        tiny.model(**batch)
    assert torch.equal(planned.last(2), want)


def test_intermediate_lambda_interpolates(tiny, act):
    vec = fit_linear_act(tiny, SMALL, layers=[1], support=False)
    scale, shift, _, _ = vec.transport_at(1)
    batch = inputs(tiny)
    with torch.no_grad(), capture(tiny, [1]) as plain:
        tiny.model(**batch)
    with torch.no_grad(), steer(tiny, Steer(vec, 0.3, operator="transport")), capture(tiny, [1]) as moved:
        tiny.model(**batch)
    h = plain.last(1)
    torch.testing.assert_close(moved.last(1), 0.7 * h + 0.3 * (scale * h + shift))


@pytest.mark.parametrize("fast", ["eager", "static"])
def test_a_transport_row_batched_with_add_rows_equals_alone(tiny, act, fast):
    ids = [tiny.encode_prompt(p) for p in PROMPTS]
    vec = amplified(act)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(tiny.d_model, generator=g) * 4
    t_steer = [Steer(vec, 0.7, operator="transport")]
    a_steer = [Steer(v, 2.0, layers=[1])]
    want_a = alone(tiny, [ids[0]], a_steer, n=12, fast=fast)
    want_t = alone(tiny, [ids[1]], t_steer, n=12, fast=fast)
    want_b = alone(tiny, [ids[2]], (), n=12, fast=fast)
    assert want_t != alone(tiny, [ids[1]], (), n=12, fast=fast)  # the transport does change the text
    eng = Engine(tiny, fast=fast)
    a = iter(eng.submit(Request(prompt_ids=[ids[0]], steering=a_steer, max_new_tokens=12)))
    next(a)  # an add row is running; the transport request joins it, then an unsteered one
    t = eng.submit(Request(prompt_ids=[ids[1]], steering=t_steer, max_new_tokens=12))
    next(a)
    b = eng.submit(Request(prompt_ids=[ids[2]], max_new_tokens=12))
    steps = [next(a)]
    assert eng.active_rows == 3
    got_t, got_b = t.result().token_ids, b.result().token_ids
    got_a = (list(a) or steps)[-1].token_ids
    assert (got_a, got_t, got_b) == (want_a, want_t, want_b)
    assert eng.idle and hook_count(tiny.model) == 0
    # one request, three rows: lambda per row, rows of one batch
    lam = [0.0, 0.5, 1.0]
    together = alone(tiny, [ids[1]] * 3, [Steer(vec, lam, operator="transport")], fast=fast)
    assert together == [alone(tiny, [ids[1]], [Steer(vec, s, operator="transport")], fast=fast)[0] for s in lam]
    assert together[0] == alone(tiny, [ids[1]], (), fast=fast)[0]


def test_strength_outside_zero_one_is_refused(tiny, act):
    for bad in (1.5, -0.1, [0.2, 2.0]):
        with pytest.raises(UserError, match=r"\[0, 1\]"):
            Steer(act, bad, operator="transport")
    with steer(tiny, Steer(act, 0.5, operator="transport")) as handle:
        handle.set_strength(0, 1.0)
        with pytest.raises(UserError, match=r"\[0, 1\]"):
            handle.set_strength(0, 3.0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        BatchPlan.build(tiny, [[(1, RowOp(act[1], 1.2, "transport", maps=act.transport_at(1)))]])
    plain = act.additive()
    assert not plain.is_transport and plain.layers == act.layers and torch.equal(plain[1], act[1])
    with pytest.raises(UserError, match="Linear-AcT"):
        Steer(plain, 0.5, operator="transport")
    with pytest.raises(UserError, match="Linear-AcT"):
        Steer(torch.ones(tiny.d_model), 0.5, layers=[1], operator="transport")
    # add-style tools still see a direction: the mean shift
    assert Steer(act, 3.0, operator="add").vector is act
    assert hook_count(tiny.model) == 0


# ---------------------------------------------------------------------------------------------- the artifact

def test_the_vector_records_the_fit(tiny, act):
    assert act.method == "linear_act" and act.is_transport and act.layers == list(range(tiny.n_layers))
    assert act.recommended_layer is None and act.default_layers() == act.layers and act.recommended_strength == 1.0
    info = act.extra["linear_act"]
    assert info["source"] == "negative" and info["target"] == "positive" and info["causal"] and info["support"]
    assert info["pooling"] == "response_mean" and set(info["layers"]) == {str(k) for k in act.layers}
    for k in act.layers:
        scale, shift, lo, hi = act.transport_at(k)
        assert scale.shape == shift.shape == lo.shape == hi.shape == (tiny.d_model,)
        assert bool((scale >= 0).all()) and bool((lo <= hi).all())
    # direction = the mean shift the map makes on the source; without causal estimation, the mean difference
    from steering_lab.activations import collect

    flat = fit_linear_act(tiny, SMALL, causal=False, support=False, layers="1-2")
    pos = collect(tiny, SMALL.prompts, SMALL.positive, layers=[1, 2], position="response_mean")
    neg = collect(tiny, SMALL.prompts, SMALL.negative, layers=[1, 2], position="response_mean")
    for j, k in enumerate([1, 2]):
        torch.testing.assert_close(flat[k], pos.acts[:, j].double().mean(0).float() - neg.acts[:, j].double().mean(0)
                                   .float(), atol=1e-6, rtol=1e-5)
        want = fit_transport(pos.acts[:, j], neg.acts[:, j], support=False)
        assert torch.equal(flat.transport_at(k)[0], want.scale) and torch.equal(flat.transport_at(k)[1], want.shift)
    assert act[0].shape == (tiny.d_model,) and torch.allclose(act[0], fit_linear_act(tiny, SMALL, layers=[0])[0])
    # causal estimation: layers after the first are fitted on source activations already transported
    assert not torch.equal(act.transport_at(2)[0], fit_linear_act(tiny, SMALL, causal=False).transport_at(2)[0])


def test_save_load_is_bit_exact_and_validated(tmp_path, act):
    base = act.save(tmp_path / "sub" / "act.safetensors")
    back = SteeringVector.load(base)
    assert back.is_transport and back.layers == act.layers and back.metadata() == act.metadata()
    for k in act.layers:
        assert torch.equal(back[k], act[k])
        assert set(back.transport[k]) == set(act.transport[k]) == {"scale", "shift", "lo", "hi"}
        for name, t in act.transport[k].items():
            assert torch.equal(back.transport[k][name], t) and back.transport[k][name].dtype == torch.float32
    from safetensors.torch import load_file

    raw = load_file(str(base.with_suffix(".safetensors")))
    again = load_file(str(back.save(tmp_path / "again").with_suffix(".safetensors")))
    assert raw.keys() == again.keys() and all(raw[k].numpy().tobytes() == again[k].numpy().tobytes() for k in raw)
    meta = json.loads(base.with_suffix(".json").read_text())
    assert meta["method"] == "linear_act" and meta["layers"] == act.layers
    meta.pop("sha256")
    assert meta == {k: v for k, v in json.loads((tmp_path / "again.json").read_text()).items() if k != "sha256"}
    assert {f"transport.scale.{k}" for k in act.layers} <= set(raw) and f"direction.{act.layers[0]}" in raw
    # views keep the maps; arithmetic would lose them and is refused
    part = act.at([1, 2])
    assert part.layers == [1, 2] and set(part.transport) == {1, 2}
    moved = act.to(torch.float64)
    assert moved.transport[1]["scale"].dtype == torch.float64 and moved.is_transport
    assert act.normalize().is_transport
    for bad in (lambda v: v * 2, lambda v: -v, lambda v: v + v, lambda v: v.additive() - v, lambda v: v / 3):
        with pytest.raises(UserError, match="additive"):
            bad(act)
    # files with broken maps are refused on load, naming what is wrong
    def broken(edit, match):
        raw2 = {k: v.clone() for k, v in raw.items()}
        edit(raw2)
        from safetensors.torch import save_file

        save_file(raw2, str(tmp_path / "bad.safetensors"))
        with pytest.raises(UserError, match=match):
            SteeringVector.load(tmp_path / "bad")

    broken(lambda r: r.pop("transport.shift.1"), "no shift")
    broken(lambda r: r.pop("transport.hi.2"), "both lo and hi")
    broken(lambda r: r.__setitem__("transport.scale.0", torch.ones(5)), "shape")
    broken(lambda r: r.__setitem__("transport.scale.0", torch.full_like(r["transport.scale.0"], float("nan"))),
           "NaN")
    broken(lambda r: r.pop("direction.3"), "transport maps cover layers")
    broken(lambda r: r.__setitem__("transport.lo.1", r["transport.hi.1"] + 1), "lo > hi")
    broken(lambda r: r.__setitem__("transport.bias.1", r["transport.hi.1"].clone()), "unexpected tensor")


def test_export_refuses_transport_vectors_and_import_keeps_them(tmp_path, act):
    from steering_lab.export import export_gguf, import_vector

    with pytest.raises(UserError, match="additive directions only"):
        export_gguf(act, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    path = export_gguf(act.additive(), tmp_path / "shift.gguf")  # the explicit way to take the mean shift
    assert path.is_file()
    act.save(tmp_path / "act")
    back = import_vector(tmp_path / "act.safetensors")
    assert back.is_transport and torch.equal(back.transport[1]["scale"], act.transport[1]["scale"])
    assert import_vector(act).is_transport


# ---------------------------------------------------------------------------------------------- front ends

def test_cli_fit_then_generate_with_the_transport_operator(tiny_dir, tmp_path, capsys):
    from steering_lab.cli import main

    data = tmp_path / "mood.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "positive": a, "negative": b}) + "\n"
                            for p, a, b in zip(SMALL.prompts, SMALL.positive, SMALL.negative)))
    out = tmp_path / "mood_act"
    code = main(["transport", "fit", "--pos", str(data), "--layers", "1-2", "--model", str(tiny_dir), "--out",
                 str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "saved" in stdout and "--operator transport" in stdout
    vec = SteeringVector.load(out)
    assert vec.is_transport and vec.layers == [1, 2] and vec.extra["linear_act"]["pooling"] == "response_mean"
    args = ["generate", "--prompt", "How was your weekend?", "--vector", str(out), "--operator", "transport",
            "--model", str(tiny_dir), "--max-new-tokens", "5", "--json"]
    assert main([*args, "--strength", "0.7"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["steered"], str) and "kl" in result
    assert main([*args, "--strength", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steered"] == result["baseline"] and result["kl"] == 0.0
    assert main([*args, "--strength", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["export", "--vector", str(out), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "additive directions only" in capsys.readouterr().err
    assert main(["transport", "fit", "--preset", "sentiment", "--neg", str(data), "--out", str(out)]) == 2


def test_app_fits_into_the_library_and_the_steer_tab_steers_with_it(tiny, tmp_path_factory):
    from steering_lab.serve.steering import resolve
    from steering_lab.ui.context import make_context
    from steering_lab.ui.method_transport import TITLE, WHERE, run_fit
    from steering_lab.ui.steer_tab import build_steering, slider_spec

    assert (WHERE, TITLE) == ("extract", "Linear-AcT")
    ctx = make_context(tiny, user_dir=tmp_path_factory.mktemp("user"), shipped_root=tmp_path_factory.mktemp("ship"))
    data = tmp_path_factory.mktemp("data")
    (data / "pos.txt").write_text("\n".join(SMALL.positive) + "\n")
    (data / "neg.txt").write_text("\n".join(SMALL.negative) + "\n")
    summary = run_fit(ctx, "upload files", None, str(data / "pos.txt"), str(data / "neg.txt"), "1-2", "positive",
                      True, False, "mood")
    assert summary["name"] == "mood" and summary["layers"] == [1, 2] and summary["pooling"] == "mean"
    assert "mood" in ctx.compatible_vectors() and ctx.vectors.get("mood").is_transport
    with pytest.raises(UserError, match="exists"):
        run_fit(ctx, "preset", "sentiment", None, None, "1", "positive", True, True, "mood")
    assert slider_spec(1.0, "transport") == dict(minimum=0.0, maximum=1.0, step=0.05, value=1.0)
    steers, monitors = build_steering(ctx, ["mood"], [0.6], "transport", "recommended", "separate")
    assert steers[0].operator == "transport" and steers[0].layers == [1, 2] and monitors[0].layer == 1
    steers, _ = build_steering(ctx, ["mood"], [0.6], "transport", "2", "separate")
    assert steers[0].layers == [2]
    # the OpenAI/MCP steering items take the operator too, with the same range
    steers, specs = resolve(ctx, [{"vector": "mood", "strength": 0.5, "operator": "transport"}])
    assert specs[0].operator == "transport" and steers[0].vector.is_transport
    assert resolve(ctx, [{"vector": "mood", "operator": "transport"}])[1][0].strength == 1.0
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        resolve(ctx, [{"vector": "mood", "strength": 2, "operator": "transport"}])
