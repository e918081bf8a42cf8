"""Command-V transfer (steering_lab/directions/transfer.py) on a recipient whose answer is known: the donor with its
residual stream rotated by a random orthogonal Q. Tolerances (float32, separate forward passes): logits and block
outputs agree to 1e-5 relative to their largest magnitude; the fitted converter equals Q to 1e-4; steered
distributions of donor and recipient have KL < 1e-6 while the steering itself moves the donor by KL > 1e-3."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from steering_lab.activations import pad_left
from steering_lab.cli import main
from steering_lab.directions import transfer as tr
from steering_lab.errors import UserError
from steering_lab.generate import generate
from steering_lab.intervene import Steer, capture, steer
from steering_lab.metrics import kl_from_logits
from steering_lab.model import LoadedModel
from steering_lab.vector import SteeringVector

TEXTS = ["Tell me about your weekend plans and the weather.", "Describe a typical day at a busy library.",
         "How do you plan a long trip?"]
REL = 1e-5


def _randomize_gains(lm: LoadedModel, seed: int) -> LoadedModel:
    """Our own tiny model with RMSNorm gains far from 1 (random init leaves them at 1, which would hide a folding
    bug) and larger weights, so logits are not all near zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
            elif p.dim() == 2:
                p.mul_(3.0)
    return lm


@pytest.fixture(scope="module")
def donor(tiny_tokenizer):
    return _randomize_gains(make_tiny("llama", tiny_tokenizer, seed=3), 3)


@pytest.fixture(scope="module")
def rotated(donor):
    return tr.rotated_copy(donor, seed=7)


@pytest.fixture(scope="module")
def prompts():
    return tr.profile_prompts(tr.load_profile_texts("all"))[:400]


@pytest.fixture(scope="module")
def converter(donor, rotated, prompts):
    return tr.fit_converter(donor, rotated[0], prompts)


def _logits(lm: LoadedModel, texts, steering=()):
    seqs = [lm.encode_prompt(t) for t in texts]
    ids, mask, pos = pad_left(seqs, lm.pad_id)
    ctx = steer(lm, list(steering)) if steering else torch.no_grad()
    with torch.no_grad(), ctx:
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return out, mask


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|."""
    return float((a - b).abs().max() / a.abs().max())


# ---- the rotated copy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", tr.ROTATABLE)
def test_rotated_copy_same_logits(arch, tiny_tokenizer):
    lm = _randomize_gains(make_tiny(arch, tiny_tokenizer, seed=1), 1)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    rot, q = tr.rotated_copy(lm, seed=2)
    a, _ = _logits(lm, TEXTS)
    b, _ = _logits(rot, TEXTS)
    assert a.abs().max() > 1.0  # a model whose logits say something
    assert _close(a, b) < REL
    assert torch.allclose(q @ q.T, torch.eye(lm.d_model), atol=1e-5)
    assert float((q - torch.eye(lm.d_model)).abs().max()) > 0.1  # a real rotation, not the identity
    after = dict(lm.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the original is untouched
    assert rot.model.lm_head.weight.data_ptr() != rot.model.model.embed_tokens.weight.data_ptr()


def test_rotated_hidden_states_are_h_times_q(donor, rotated):
    rot, q = rotated
    seqs = [donor.encode_prompt(t) for t in TEXTS]
    ids, mask, pos = pad_left(seqs, donor.pad_id)
    outs = []
    for lm in (donor, rot):
        with torch.no_grad(), capture(lm) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            outs.append({k: cap.last(k) for k in range(lm.n_layers)})
    for k in range(donor.n_layers):
        h, hr = outs[0][k], outs[1][k]
        assert _close(h @ q, hr) < REL, k


def test_rotated_copy_tied_embeddings_untied(tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = _randomize_gains(LoadedModel.wrap(AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer, "tied"), 5)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    rot, _ = tr.rotated_copy(lm, seed=1)
    assert _close(_logits(lm, TEXTS)[0], _logits(rot, TEXTS)[0]) < REL
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # the original still tied


def test_rotated_copy_refuses_other_architectures(tiny_tokenizer):
    gpt2 = make_tiny("gpt2", tiny_tokenizer)
    with pytest.raises(UserError, match="Llama-style"):
        tr.rotated_copy(gpt2)


# ---- fitting the converter --------------------------------------------------------------------------------
def test_converter_recovers_q(converter, rotated, donor):
    _, q = rotated
    assert converter.layer_map == {k: k for k in range(donor.n_layers)}
    assert converter.n_prompts == 400
    for k, w in converter.matrices.items():
        assert float((w - q).abs().max()) < 1e-4, k
        assert converter.fit_error[k]["train"] < 1e-5 and converter.fit_error[k]["holdout"] < 1e-5


def test_transferred_vector_steers_like_the_original(donor, rotated, converter):
    rot, q = rotated
    g = torch.Generator().manual_seed(11)
    v = torch.randn(donor.d_model, generator=g)
    vec = SteeringVector({1: v, 2: -v}, model=donor.name, n_layers=donor.n_layers, recommended_layer=1,
                         recommended_strength=4.0)
    out = tr.transfer_vector(vec, converter)
    assert out.model == rot.name and out.layers == [1, 2] and out.recommended_layer == 1
    assert out.extra["transfer"]["donor_model"] == donor.name
    assert out.extra["transfer"]["fit_error"]["1"]["train"] < 1e-5
    assert torch.allclose(out[1], v @ q, atol=1e-4)
    base, mask = _logits(donor, TEXTS)
    d_steered, _ = _logits(donor, TEXTS, [Steer(vec, 4.0, layers=[1])])
    r_steered, _ = _logits(rot, TEXTS, [Steer(out, 4.0, layers=[1])])
    raw, _ = _logits(rot, TEXTS, [Steer(vec, 4.0, layers=[1])])  # the untransferred vector on the recipient
    moved = kl_from_logits(d_steered, base, mask).max()
    gap = kl_from_logits(d_steered, r_steered, mask).max()
    wrong = kl_from_logits(d_steered, raw, mask).min()
    assert moved > 1e-3  # the steering does something
    assert gap < 1e-6  # ... and the transferred vector does the same to the recipient
    assert wrong > 100 * gap  # while the donor's own vector applied to the recipient does not
    a = generate(donor, TEXTS, Steer(vec, 4.0, layers=[1]), max_new_tokens=8)
    b = generate(rot, TEXTS, Steer(out, 4.0, layers=[1]), max_new_tokens=8)
    assert a == b


def test_different_widths_and_depths(donor, tiny_tokenizer, prompts):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2)
    other = LoadedModel.wrap(AutoModelForCausalLM.from_config(cfg).eval(), tiny_tokenizer, "tiny-wide")
    conv = tr.fit_converter(donor, other, prompts[:60], ridge=1e-3, holdout=0.2)
    assert conv.layer_map == {0: 1, 1: 2, 2: 4, 3: 5}  # same relative depth, last to last
    assert all(tuple(w.shape) == (32, 48) for w in conv.matrices.values())
    assert all(e["holdout"] >= 0 and 0 <= e["train"] < 1 for e in conv.fit_error.values())
    vec = SteeringVector({2: torch.ones(32)}, model=donor.name)
    out = tr.transfer_vector(vec, conv)
    assert out.d_model == 48 and out.layers == [4] and out.n_layers == 6


def test_match_layer():
    assert [tr.match_layer(k, 30, 30) for k in range(30)] == list(range(30))
    m = [tr.match_layer(k, 30, 24) for k in range(30)]
    assert m == sorted(m) and m[-1] == 23 and m[0] == 0
    assert [tr.match_layer(k, 4, 8) for k in range(4)] == [1, 3, 5, 7]


def test_profile_prompts():
    assert tr.profile_prompts(["a b c d", "a b c"], min_words=3) == ["a b c", "a b c d"]
    assert tr.profile_prompts(["x y", " "], prefixes=False) == ["x y"]


# ---- files ------------------------------------------------------------------------------------------------
def test_converter_save_load_bit_exact(converter, tmp_path, donor, rotated):
    path = converter.save(tmp_path / "conv.safetensors")
    back = tr.Converter.load(path, donor, rotated[0])
    assert back.layer_map == converter.layer_map and back.fit_error == converter.fit_error
    for k in converter.matrices:
        assert torch.equal(back.matrices[k], converter.matrices[k])
        assert torch.equal(back.donor_mean[k], converter.donor_mean[k])
        assert torch.equal(back.recipient_mean[k], converter.recipient_mean[k])
    assert back.metadata() == converter.metadata()
    vec = SteeringVector({1: torch.arange(32.0)}, model=donor.name)
    assert torch.equal(tr.transfer_vector(vec, back)[1], tr.transfer_vector(vec, converter)[1])
    meta = json.loads((tmp_path / "conv.json").read_text())
    assert meta["kind"] == "converter" and meta["donor"] == donor.name and "2506.19140" in meta["paper"]


# ---- bad input --------------------------------------------------------------------------------------------
def test_bad_input(converter, donor, rotated, tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="width 16"):
        tr.transfer_vector(SteeringVector({1: torch.ones(16)}), converter)
    with pytest.raises(UserError, match="made on 'other'"):
        tr.transfer_vector(SteeringVector({1: torch.ones(32)}, model="other"), converter)
    assert tr.transfer_vector(SteeringVector({1: torch.ones(32)}, model="other"), converter, check_model=False)
    with pytest.raises(UserError, match="none in common"):
        tr.transfer_vector(SteeringVector({1: torch.ones(32)}), converter, layers=[3]) and None
    with pytest.raises(UserError, match="needs at least 34"):
        tr.fit_converter(donor, rotated[0], ["one prompt", "two prompts", "three"])
    with pytest.raises(UserError, match="needs many more"):
        tr.fit_converter(donor, rotated[0], ["only one"], ridge=0.1)
    with pytest.raises(UserError, match="out of range"):
        tr.fit_converter(donor, rotated[0], ["a", "b"], donor_layers=[9], ridge=0.1)
    with pytest.raises(UserError, match="one per donor layer"):
        tr.fit_converter(donor, rotated[0], ["a", "b"], donor_layers=[0, 1], recipient_layers=[0], ridge=0.1)
    wide = make_tiny("qwen2", tiny_tokenizer)
    wide.d_model = 48  # a stand-in for a model of another width (only the check reads it)
    with pytest.raises(UserError, match="d_model 32"):
        converter.check_models(recipient=wide)
    with pytest.raises(UserError, match="not 'tiny-qwen2'"):
        converter.check_models(donor=make_tiny("qwen2", tiny_tokenizer))
    SteeringVector({0: torch.ones(32)}).save(tmp_path / "vec")
    with pytest.raises(UserError, match="not a converter"):
        tr.Converter.load(tmp_path / "vec")
    with pytest.raises(UserError, match="pickled"):
        tr.Converter.load(tmp_path / "conv.pt")


# ---- CLI and app ------------------------------------------------------------------------------------------
def test_cli_fit_and_vector(tiny_dir, tmp_path, capsys):
    conv = tmp_path / "c"
    assert main(["transfer", "fit", "--donor", str(tiny_dir), "--recipient", "rotated:3", "--prompts", "neutral",
                 "--max-prompts", "120", "--donor-layers", "1,2", "--out", str(conv), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 2 and summary["worst_error"] < 1e-5
    SteeringVector({1: torch.ones(32), 3: torch.ones(32)}, model=str(tiny_dir), n_layers=4).save(tmp_path / "v")
    assert main(["transfer", "vector", "--converter", str(conv), "--vector", str(tmp_path / "v"),
                 "--out", str(tmp_path / "t"), "--json"]) == 0
    out = SteeringVector.load(tmp_path / "t")
    assert out.layers == [1] and out.model.endswith("-rotated-3")
    _, q = tr.rotated_copy(LoadedModel.wrap(*_load_dir(tiny_dir)), seed=3)
    assert torch.allclose(out[1], torch.ones(32) @ q, atol=1e-4)
    capsys.readouterr()
    assert main(["transfer", "fit", "--donor", str(tiny_dir), "--recipient", "rotated:3", "--prompts", "neutral",
                 "--max-prompts", "10", "--out", str(conv)]) == 2  # too few prompts: one line, exit 2
    assert "needs at least" in capsys.readouterr().err
    assert main(["transfer", "vector", "--converter", str(tmp_path / "nope"), "--vector", str(tmp_path / "v"),
                 "--out", str(tmp_path / "t2")]) == 2


def _load_dir(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_app_callback_saves_transferred_vector(donor, rotated, tmp_path):
    from steering_lab.ui.context import make_context
    from steering_lab.ui.method_transfer import pick_vector, transfer_into_library

    rot, q = rotated
    ctx = make_context(rot, user_dir=tmp_path / "lib", library_mode="shared")
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    SteeringVector({2: v}, model=donor.name, n_layers=4, recommended_layer=2, dataset="toy").save(tmp_path / "up")
    vec = pick_vector(ctx, None, str(tmp_path / "up.safetensors"), str(tmp_path / "up.json"))
    steps = []
    saved, text = transfer_into_library(ctx, donor, vec, prompts="all", max_prompts=120,
                                        on_step=lambda i, n, what: steps.append(i))
    assert saved == "toy-transferred" and "| 2 | 2 |" in text and steps == [0, 1, 2, 3]
    got = ctx.vectors.get(saved)
    assert got.model == rot.name and torch.allclose(got[2], v @ q, atol=1e-4)
    with pytest.raises(UserError, match="exists"):
        transfer_into_library(ctx, donor, vec, max_prompts=120)
    with pytest.raises(UserError, match="choose a library vector"):
        pick_vector(ctx, None)


@pytest.mark.real
def test_real_rotation_same_logits(smol):
    rot, q = tr.rotated_copy(smol, seed=0)
    a, _ = _logits(smol, TEXTS[:2])
    b, _ = _logits(rot, TEXTS[:2])
    assert _close(a, b) < 1e-4  # 30 blocks in float32: measured ~5e-6
