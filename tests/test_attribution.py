"""Attribution patching (measure/attribution.py): exact invariants on tiny models, bad input, cleanup."""

import json

import pytest
import torch
from conftest import make_tiny

from steering_lab.errors import UserError
from steering_lab.intervene import head_shape, hook_count, kv_heads
from steering_lab.measure import attribution as atp
from steering_lab.measure.attribution import Pair


def _pairs(lm):
    return atp.make_pairs(lm, ["The cat sat on the mat today", "I love this song"],
                          ["The dog sat on a rug", "I hate this song so much"], " happy", " sad")


def _no_grads(lm):
    return all(p.grad is None for p in lm.model.parameters())


def test_shapes_and_exact_reference(tiny):
    pairs = _pairs(tiny)
    res = atp.attribute(tiny, pairs)
    n_heads, _ = head_shape(tiny)
    L, kv = tiny.n_layers, kv_heads(tiny)
    want = {"layers": (L,), "heads": (L, n_heads), "queries": (L, n_heads), "keys": (L, kv)}
    for m in atp.METHODS:
        for t, shape in want.items():
            assert tuple(res.get(t, m).shape) == shape, (m, t)
    assert bool((res.get("heads", "atp_star") >= 0).all())  # GradDrop estimates a magnitude
    ex = atp.activation_patching(tiny, pairs, batch_size=7)
    assert {t: tuple(v.shape) for t, v in ex["effects"].items()} == want
    assert ex["n_forward_rows"] == len(pairs) * (L + 2 * L * n_heads + L * kv)
    # the last block's residual at the last position feeds only the final norm and the unembedding:
    # patching it gives exactly the corrupt run's metric
    assert ex["effects"]["layers"][-1].item() == pytest.approx(res.corrupt_metric - res.clean_metric, abs=1e-4)
    rows = atp.correlations(res, ex)
    assert {r["node_type"] for r in rows} == set(want) and all(r["n_pairs"] == 2 for r in rows)
    assert hook_count(tiny.model) == 0 and _no_grads(tiny)
    json.dumps(res.to_dict())


def test_clean_equals_corrupt_gives_zero(tiny):
    ids = tiny.encode("The cat sat on the mat", special=True)
    pair = Pair(clean=ids, corrupt=list(ids), answer=5, wrong=6)
    res = atp.attribute(tiny, [pair])
    for m in atp.METHODS:
        for t, v in res.estimates[m].items():
            assert torch.equal(v, torch.zeros_like(v)), (m, t)
    ex = atp.activation_patching(tiny, [pair])
    for t, v in ex["effects"].items():
        assert torch.equal(v, torch.zeros_like(v)), t
    assert hook_count(tiny.model) == 0


def test_atp_exact_for_a_linear_metric(tiny_tokenizer):
    """With the final norm removed, the logits are linear in the last block's output, so the metric
    (a logit difference) is linear in that node and the first-order estimate is exact for it."""
    lm = make_tiny("llama", tiny_tokenizer, seed=3)
    lm.model.model.norm = torch.nn.Identity()
    pairs = _pairs(lm)
    last = lm.n_layers - 1
    res = atp.attribute(lm, pairs, "logit_diff", graddrop=False)
    ex = atp.activation_patching(lm, pairs, "logit_diff", node_types=["layers"])
    est, eff = res.get("layers", "atp")[last], ex["effects"]["layers"][last]
    assert abs(float(eff)) > 1e-3
    assert float(est) == pytest.approx(float(eff), rel=1e-4, abs=1e-6)
    # the exact effect at the last block is the whole corrupt-minus-clean difference
    assert float(eff) == pytest.approx(res.corrupt_metric - res.clean_metric, rel=1e-4, abs=1e-6)
    assert hook_count(lm.model) == 0


def test_qk_fix_matches_exact_query_patching_better(tiny):
    """The QK fix recomputes the attention exactly: for a query node its estimate is first-order only
    after the head output, so on this model it tracks the exact effect at least as well as AtP."""
    pairs = _pairs(tiny)
    res = atp.attribute(tiny, pairs, graddrop=False)
    ex = atp.activation_patching(tiny, pairs, node_types=["queries", "keys"])
    for t in ("queries", "keys"):
        err_plain = (res.get(t, "atp") - ex["effects"][t]).abs().sum()
        err_fixed = (res.get(t, "atp_qk") - ex["effects"][t]).abs().sum()
        assert err_fixed <= err_plain + 1e-7, t


def test_suggest_layers_and_top_nodes(tiny):
    res = atp.attribute(tiny, _pairs(tiny), graddrop=False)
    top = atp.suggest_layers(res, k=2, method="atp")
    scores = res.get("layers", "atp").abs()
    assert len(top) == 2 and scores[top[0]] == scores.max()
    assert atp.suggest_layers(torch.tensor([0.1, -3.0, 2.0]), k=1) == [1]
    assert atp.suggest_layers(torch.tensor([[0.1, 0.1], [0.0, 0.0], [1.0, -1.0]]), k=1) == [2]
    ramp = torch.tensor([0.0, 0.1, -0.6, -0.9, -1.0])
    assert atp.suggest_layers(ramp, k=2, rule="onset") == [2, 3]
    assert atp.suggest_layers(ramp, k=9, rule="onset", frac=0.95) == [4]
    with pytest.raises(UserError, match="rule"):
        atp.suggest_layers(ramp, rule="middle")
    rows = atp.top_nodes(res, "heads", k=3, method="atp")
    assert len(rows) == 3 and abs(rows[0]["effect"]) >= abs(rows[-1]["effect"])


def test_bad_input_and_cleanup(tiny, tmp_path):
    with pytest.raises(UserError, match="no pairs"):
        atp.attribute(tiny, [])
    with pytest.raises(UserError, match="no pairs"):
        atp.make_pairs(tiny, [], [], " a")
    with pytest.raises(UserError, match="pair up"):
        atp.make_pairs(tiny, ["a b", "c d"], ["e f"], " a")
    with pytest.raises(UserError, match="unknown preset"):
        atp.preset_pairs(tiny, "no-such-preset")
    with pytest.raises(UserError, match="unknown metric"):
        atp.attribute(tiny, _pairs(tiny), "nope")
    with pytest.raises(UserError, match="vocabulary"):
        atp.attribute(tiny, [Pair(clean=[1, 2], corrupt=[1, 3], answer=10**7)])
    with pytest.raises(UserError, match="unknown node type"):
        atp.activation_patching(tiny, _pairs(tiny), node_types=["mlp"])
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"clean": "a b", "answer": " c"}\n')
    with pytest.raises(UserError, match="corrupt"):
        atp.load_pairs_file(tiny, bad)

    def broken(logits, pair):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        atp.attribute(tiny, _pairs(tiny), broken)
    with pytest.raises(RuntimeError, match="metric failed"):
        atp.activation_patching(tiny, _pairs(tiny), broken)
    assert hook_count(tiny.model) == 0 and _no_grads(tiny)


def test_pairs_file_and_preset(tiny, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"clean": "The cat sat", "corrupt": "The dog sat", "answer": " happy", "wrong": " sad"}\n'
                 '{"clean": "I love it", "corrupt": "I hate it", "answer": " happy", "wrong": " sad"}\n')
    pairs = atp.load_pairs_file(tiny, f)
    assert len(pairs) == 2 and atp.resolve_metric(None, pairs)[0] == "logit_diff"
    pre = atp.preset_pairs(tiny, "sentiment", n_pairs=3)
    assert len(pre) == 3 and pre[0].clean[-4:] == pre[0].corrupt[-4:]  # aligned at the shared question suffix


def test_cli(tiny_dir, tmp_path, capsys):
    from steering_lab.cli.main import main

    code = main(["attribution", "--preset", "sentiment", "-n", "1", "--model", str(tiny_dir), "--heads",
                 "--no-graddrop", "--validate", "-k", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_pairs"] == 1 and len(out["suggested_layers"]) == 2 and len(out["top_heads"]) == 2
    assert out["suggested_layers"][0] == out["top_layers"][0]["layer"]
    assert {c["node_type"] for c in out["validation"]["correlations"]} == {"layers", "heads", "queries", "keys"}
    f = tmp_path / "p.jsonl"
    f.write_text('{"clean": "I love it", "corrupt": "I hate it", "answer": " good"}\n')
    assert main(["attribution", "--pairs", str(f), "--model", str(tiny_dir), "--no-graddrop"]) == 0
    assert "suggested layers" in capsys.readouterr().out
    assert main(["attribution", "--pairs", str(tmp_path / "missing.jsonl"), "--model", str(tiny_dir)]) == 2
    assert main(["attribution", "--preset", "no-such-preset"]) == 2
    assert "error" in capsys.readouterr().err


def test_app_callback_and_build(tiny, tmp_path):
    from types import SimpleNamespace

    import gradio as gr

    from steering_lab.ui import method_attribution as ui

    ctx = SimpleNamespace(lm=tiny)
    text, heat, bar, top = ui.run_attribution(ctx, "preset", "sentiment", None, 1, "atp", graddrop=False, k=2)
    assert len(top) == 2 and f"**{', '.join(map(str, top))}**" in text
    assert len(bar.data[0].y) == tiny.n_layers and len(heat.data[0].z) == tiny.n_layers
    with pytest.raises(UserError, match="upload"):
        ui.run_attribution(ctx, "upload pairs", None, None, 1)
    with pytest.raises(UserError, match="pairs"):
        ui.run_attribution(ctx, "preset", "sentiment", None, 99)
    assert ui.WHERE == "extract" and ui.TITLE == "Attribution patching"
    with gr.Blocks():
        layer = gr.Textbox()
        out = ui.build(ctx, {"layer": layer})
    assert "summary" in out
    assert hook_count(tiny.model) == 0


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_other_architectures(arch, tiny_tokenizer):
    """q/k-normed attention (qwen3: the QK fix is what makes query estimates track exact patching) and a
    fused-QKV model (gpt2: layers and heads only)."""
    lm = make_tiny(arch, tiny_tokenizer)
    pairs = _pairs(lm)
    res = atp.attribute(lm, pairs, graddrop=False)
    ex = atp.activation_patching(lm, pairs)
    assert set(ex["effects"]) == ({"layers", "heads"} if arch == "gpt2" else set(atp.NODE_TYPES))
    assert ex["effects"]["layers"][-1].item() == pytest.approx(res.corrupt_metric - res.clean_metric, abs=1e-4)
    if arch == "qwen3":
        for t in ("queries", "keys"):
            assert ((res.get(t, "atp_qk") - ex["effects"][t]).abs().sum()
                    <= (res.get(t, "atp") - ex["effects"][t]).abs().sum() + 1e-7)
    else:
        with pytest.raises(UserError, match="q_proj"):
            atp.attribute(lm, pairs, qk=True)
    assert hook_count(lm.model) == 0 and _no_grads(lm)


@pytest.mark.real
def test_real_model_layers_track_exact_patching(smol):
    """SmolLM2, one sentiment pair, layer nodes: the last block's node reproduces the corrupt run, and AtP
    ranks the layers like exact patching (bench/attribution.md: Spearman 0.99 on 3 pairs; 0.8 allowed here)."""
    from scipy.stats import spearmanr

    pairs = atp.preset_pairs(smol, "sentiment", 1)
    res = atp.attribute(smol, pairs, graddrop=False, qk=False)
    ex = atp.activation_patching(smol, pairs, node_types=["layers"])
    assert res.clean_metric > res.corrupt_metric  # the clean (positive) text favours " positive"
    assert ex["effects"]["layers"][-1].item() == pytest.approx(res.corrupt_metric - res.clean_metric, abs=1e-3)
    rho = spearmanr(res.get("layers", "atp").abs().numpy(), ex["effects"]["layers"].abs().numpy())[0]
    assert rho > 0.8
    assert hook_count(smol.model) == 0
