import json

import pytest
import torch
from safetensors.torch import load_file

from steering_lab.activations import pad_left
from steering_lab.errors import UserError
from steering_lab.intervene import Steer, capture, steer
from steering_lab.vector import SteeringVector


def make(layers=(1, 2), d=32, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(directions={k: torch.randn(d, generator=g) for k in layers}, **meta)


def test_round_trip_is_bit_exact(tmp_path):
    vec = make(model="tiny", method="mean_diff", dataset="unit", recommended_layer=2,
               recommended_strength=4.5, description="test vector", extra={"layer_scan": {"rows": []}})
    base = vec.save(tmp_path / "v.safetensors")
    assert base == tmp_path / "v"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.safetensors"]
    back = SteeringVector.load(tmp_path / "v")
    assert back.layers == vec.layers
    for k in vec.layers:
        assert torch.equal(back[k], vec[k])
    assert back.metadata() == vec.metadata()
    again = SteeringVector.load(str(tmp_path / "v.json"))  # any of the three spellings
    assert again.metadata() == vec.metadata()


def test_file_format_matches_design(tmp_path):
    vec = make(layers=(0, 5), model="m", recommended_layer=5, recommended_strength=3.0)
    vec.save(tmp_path / "x")
    tensors = load_file(str(tmp_path / "x.safetensors"))
    assert set(tensors) == {"direction.0", "direction.5"}
    assert all(t.dtype == torch.float32 and t.shape == (32,) for t in tensors.values())
    meta = json.loads((tmp_path / "x.json").read_text())
    for key in ("model", "d_model", "n_layers", "layers", "method", "dataset", "recommended_layer",
                "recommended_strength", "normalized", "created", "description"):
        assert key in meta
    assert meta["layers"] == [0, 5] and meta["d_model"] == 32


def test_bf16_vector_saved_as_float32(tmp_path):
    vec = make().to(torch.bfloat16)
    vec.save(tmp_path / "b")
    back = SteeringVector.load(tmp_path / "b")
    assert back[1].dtype == torch.float32
    assert torch.equal(back[1], vec[1].float())


def test_arithmetic():
    a, b = make((1, 2), seed=1), make((2, 3), seed=2)
    s = a + b
    assert s.layers == [1, 2, 3]
    assert torch.equal(s[2], a[2] + b[2]) and torch.equal(s[1], a[1]) and torch.equal(s[3], b[3])
    d = a - b
    assert torch.equal(d[3], -b[3])
    assert torch.equal((2 * a)[1], 2 * a[1]) and torch.equal((a * 2)[1], 2 * a[1])
    assert torch.equal((-a)[2], -a[2])
    assert torch.allclose((a / 4)[1], a[1] / 4)
    n = a.normalize()
    assert all(abs(v - 1) < 1e-6 for v in n.norms().values()) and n.normalized
    with pytest.raises(UserError, match="width"):
        a + make(d=16)
    with pytest.raises(UserError, match="finite"):
        a * float("inf")


def test_validation_rejects_bad_tensors():
    with pytest.raises(UserError, match="NaN"):
        SteeringVector(directions={0: torch.tensor([1.0, float("nan")])})
    with pytest.raises(UserError, match="shape"):
        SteeringVector(directions={0: torch.zeros(2, 3)})
    with pytest.raises(UserError, match="float"):
        SteeringVector(directions={0: torch.zeros(4, dtype=torch.long)})
    with pytest.raises(UserError, match="at least one"):
        SteeringVector(directions={})
    with pytest.raises(UserError, match="widths"):
        SteeringVector(directions={0: torch.zeros(4), 1: torch.zeros(5)})
    with pytest.raises(UserError, match="no direction for layer 7"):
        make()[7]


def test_check_model_says_what_does_not_match(tiny):
    with pytest.raises(UserError, match=r"d_model 16 .* has d_model 32"):
        make(d=16, model="other").check_model(tiny)
    with pytest.raises(UserError, match=r"layer\(s\) \[9\] .* 4 blocks"):
        make(layers=(1, 9)).check_model(tiny)
    make().check_model(tiny)


def test_load_rejects_bad_files(tmp_path, tiny):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a valid safetensors"):
        SteeringVector.load(tmp_path / "junk")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="unexpected tensor 'weight'"):
        SteeringVector.load(tmp_path / "w")
    make().save(tmp_path / "ok")
    (tmp_path / "ok.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        SteeringVector.load(tmp_path / "ok")
    with pytest.raises(UserError, match="not found"):
        SteeringVector.load(tmp_path / "missing")
    make(d=16).save(tmp_path / "narrow")
    with pytest.raises(UserError, match="d_model"):
        SteeringVector.load(tmp_path / "narrow", tiny)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    vec = make()
    vec.save(tmp_path / "a")
    vec.save(tmp_path / "a")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


def test_layer_convention_is_block_output(tiny):
    """direction.k is added to the output of block k, i.e. hidden_states[k + 1] (DESIGN.md)."""
    seqs = [tiny.encode_prompt("How was your weekend?")]
    ids, mask, pos = pad_left(seqs, tiny.pad_id)
    with torch.no_grad():
        hs = tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states
        with capture(tiny) as cap:
            tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos)
        for k in range(tiny.n_layers - 1):  # the last entry of hidden_states is after the final norm
            assert torch.equal(cap.last(k), hs[k + 1])
        v = torch.randn(tiny.d_model)
        with steer(tiny, Steer(v, 1.0, layers=[1])), capture(tiny, [1]) as cap2:
            tiny.model(input_ids=ids, attention_mask=mask, position_ids=pos)
        torch.testing.assert_close(cap2.last(1), hs[2] + v, atol=1e-6, rtol=0)
