"""llama.cpp control-vector GGUF and repeng, both ways (steering_lab/export.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.export import export_gguf, import_vector, load_gguf
from steering_lab.resources import shipped_dir
from steering_lab.vector import SteeringVector

gguf = pytest.importorskip("gguf")


def _repeng():
    """repeng 0.4.0 names numpy aliases removed in numpy 2; add them (only if missing) before importing."""
    for old, new in (("float_", np.float64), ("int_", np.int64), ("complex_", np.complex128),
                     ("string_", np.bytes_), ("unicode_", np.str_)):
        if not hasattr(np, old):
            setattr(np, old, new)
    return pytest.importorskip("repeng")


def make_vector(layers=(0, 1, 2, 3), d=32, seed=0, **meta) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {k: torch.randn(d, generator=g) for k in layers}
    defaults = dict(model="tiny-llama", n_layers=4, method="mean_diff", dataset="sentiment", recommended_layer=2,
                    recommended_strength=3.25, normalized=False, description="test vector",
                    extra={"model_type": "llama", "effect": "x", "raw_norms": {"1": 1.5}})
    defaults.update(meta)
    return SteeringVector(directions=dirs, **defaults)


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.types[0], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


# ---- export and read back -----------------------------------------------------------------------


def test_shipped_safetensors_to_gguf_to_vector_is_bit_exact(tmp_path, caplog):
    src = SteeringVector.load(shipped_dir("vectors") / "sentiment")
    with caplog.at_level(logging.WARNING, logger="steering_lab.export"):
        out = export_gguf(src, tmp_path / "sentiment")
    assert out == tmp_path / "sentiment.gguf" and out.is_file()
    assert "dropping layer 0" in caplog.text
    back = load_gguf(out)
    assert back.layers == [k for k in src.layers if k >= 1]
    for k in back.layers:
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], src[k]), k
    for key in ("model", "d_model", "n_layers", "method", "dataset", "recommended_layer", "recommended_strength",
                "normalized", "created", "description"):
        assert getattr(back, key) == getattr(src, key), key
    assert {k: back.extra[k] for k in src.extra} == src.extra  # layer_scan, raw_norms, effect, ...
    assert back.extra["model_type"] == "llama"  # the embedded SmolLM2 is a Llama
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_header_and_tensor_layout_read_with_gguf_reader(tmp_path):
    vec = make_vector(layers=(1, 3), recommended_layer=3)
    out = export_gguf(vec, tmp_path / "v.gguf")
    r = gguf.GGUFReader(out)
    f = fields(out)
    T = gguf.GGUFValueType
    assert f["general.architecture"] == (T.STRING, "controlvector")
    assert f["controlvector.model_hint"] == (T.STRING, "llama")
    assert f["controlvector.layer_count"] == (T.UINT32, 2)
    assert f["controlvector.recommended_layer"] == (T.UINT32, 3)
    assert f["controlvector.recommended_strength"] == (T.FLOAT64, 3.25)
    assert f["controlvector.method"] == (T.STRING, "mean_diff")
    assert f["controlvector.normalized"] == (T.BOOL, False)
    assert "controlvector.scale" not in f  # strength not baked in unless asked
    assert [t.name for t in r.tensors] == ["direction.1", "direction.3"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(s) for s in t.shape] == [32] and t.n_elements == 32 and t.n_bytes == 128
        assert t.data_offset % 32 == 0  # GGUF default alignment
        assert np.array_equal(np.asarray(t.data), vec[int(t.name.split(".")[1])].numpy())
    assert int(r.fields["GGUF.version"].contents()) == 3


def test_layer_zero_only_is_refused(tmp_path):
    with pytest.raises(UserError, match="layer 0"):
        export_gguf(make_vector(layers=(0,)), tmp_path / "v.gguf")
    assert not list(tmp_path.iterdir())


def test_scale_is_baked_in_only_when_asked(tmp_path):
    vec = make_vector(layers=(1, 2), normalized=True)
    plain = load_gguf(export_gguf(vec, tmp_path / "plain.gguf"))
    scaled_path = export_gguf(vec, tmp_path / "scaled.gguf", scale=-2.5)
    scaled = load_gguf(scaled_path)
    assert torch.equal(plain[2], vec[2]) and plain.normalized
    assert torch.equal(scaled[2], vec[2] * -2.5)
    assert scaled.extra["gguf_scale"] == -2.5 and not scaled.normalized
    # the file stays self-consistent: strength r/S on S*v == strength r on v
    assert scaled.recommended_strength == pytest.approx(3.25 / -2.5)
    assert fields(scaled_path)["controlvector.scale"][1] == -2.5
    with pytest.raises(UserError, match="finite"):
        export_gguf(vec, tmp_path / "bad.gguf", scale=float("nan"))


def test_model_hint_sources(tmp_path, caplog):
    vec = make_vector(layers=(1,))
    assert fields(export_gguf(vec, tmp_path / "a", model_hint="qwen2"))["controlvector.model_hint"][1] == "qwen2"
    vec.extra.pop("model_type")
    vec.model = "SmolLM2-135M-Instruct"
    assert fields(export_gguf(vec, tmp_path / "b"))["controlvector.model_hint"][1] == "llama"
    vec.model = "my-model"
    with caplog.at_level(logging.WARNING, logger="steering_lab.export"):
        assert fields(export_gguf(vec, tmp_path / "c"))["controlvector.model_hint"][1] == "my-model"
    assert "model_type" in caplog.text


def test_export_is_atomic(tmp_path, monkeypatch):
    out = export_gguf(make_vector(layers=(1,)), tmp_path / "v.gguf")
    before = out.read_bytes()

    def boom(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(make_vector(layers=(1, 2), seed=1), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


# ---- files from other tools, and bad files ---------------------------------------------------------


def write_raw(path: Path, arch="controlvector", tensors=None, kv=None, layer_count_i32=None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    if layer_count_i32 is not None:
        w.add_int32("controlvector.layer_count", layer_count_i32)
    for key, (kind, value) in (kv or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_loads_cvector_generator_file_with_int32_layer_count_and_foreign_keys(tmp_path):
    # llama-cvector-generator writes model_hint = the GGUF architecture and layer_count as int32,
    # with direction.1 .. direction.{n-1}; other tools add their own keys
    rng = np.random.default_rng(0)
    arrays = {f"direction.{k}": rng.standard_normal(16).astype(np.float32) for k in range(1, 4)}
    p = write_raw(tmp_path / "cvgen.gguf", tensors=arrays, layer_count_i32=3,
                  kv={"controlvector.model_hint": ("string", "llama"), "general.name": ("string", "happy"),
                      "controlvector.someone_elses": ("float32", 0.5)})
    assert fields(p)["controlvector.layer_count"][0] == gguf.GGUFValueType.INT32
    vec = load_gguf(p)
    assert vec.layers == [1, 2, 3] and vec.d_model == 16
    for k in (1, 2, 3):
        assert np.array_equal(vec[k].numpy(), arrays[f"direction.{k}"])
    assert vec.extra["model_type"] == "llama" and vec.recommended_layer is None
    assert "cvgen.gguf" in vec.description


@pytest.mark.parametrize("case, match", [
    ("model", "general.architecture is 'llama'"),
    ("f16", "F16"),
    ("2d", r"shape \[4, 3\]"),
    ("name", "'blk.1.attn' is not direction"),
    ("empty_tensors", "no direction"),
    ("garbage", "not a readable GGUF"),
    ("empty_file", "not a readable GGUF"),
    ("missing", "not found"),
    ("widths", "different widths"),
])
def test_bad_files_get_clear_errors(tmp_path, case, match):
    p = tmp_path / f"{case}.gguf"
    f32 = np.ones(4, np.float32)
    if case == "model":
        write_raw(p, arch="llama", tensors={"direction.1": f32})
    elif case == "f16":
        write_raw(p, tensors={"direction.1": np.ones(4, np.float16)})
    elif case == "2d":
        write_raw(p, tensors={"direction.1": np.ones((3, 4), np.float32)})
    elif case == "name":
        write_raw(p, tensors={"blk.1.attn": f32})
    elif case == "empty_tensors":
        write_raw(p)
    elif case == "garbage":
        p.write_bytes(b"GGUF" + bytes(range(200)))
    elif case == "empty_file":
        p.write_bytes(b"")
    elif case == "widths":
        write_raw(p, tensors={"direction.1": f32, "direction.2": np.ones(5, np.float32)})
    with pytest.raises(UserError, match=match):
        load_gguf(p)


# ---- repeng, both ways ------------------------------------------------------------------------------


def test_repeng_reads_our_gguf_and_we_read_repengs(tmp_path):
    repeng = _repeng()
    vec = make_vector(layers=(0, 1, 2, 3))
    ours = export_gguf(vec, tmp_path / "ours.gguf")
    cv = repeng.ControlVector.import_gguf(str(ours))
    assert cv.model_type == "llama" and sorted(cv.directions) == [1, 2, 3]
    for k in (1, 2, 3):
        assert np.array_equal(np.asarray(cv.directions[k]), vec[k].numpy())

    made = repeng.ControlVector(model_type="qwen2", directions={
        k: np.random.default_rng(k).standard_normal(24).astype(np.float32) for k in (2, 5, 7)})
    theirs = tmp_path / "theirs.gguf"
    made.export_gguf(str(theirs))
    back = load_gguf(theirs)
    assert back.layers == [2, 5, 7] and back.extra["model_type"] == "qwen2"
    for k in (2, 5, 7):
        assert np.array_equal(back[k].numpy(), made.directions[k])
    via_object = import_vector(made, name="from-repeng")
    assert via_object.extra == {"model_type": "qwen2", "name": "from-repeng"}
    assert all(torch.equal(via_object[k], back[k]) for k in back.layers)


def test_repeng_control_model_steers_like_our_hook(tiny_tokenizer, tmp_path):
    """Our exported file, loaded by repeng's ControlModel, changes the logits exactly as our Steer does."""
    from conftest import make_tiny

    from steering_lab.intervene import Steer, steer

    repeng = _repeng()
    ours_lm = make_tiny("llama", tiny_tokenizer)
    theirs_lm = make_tiny("llama", tiny_tokenizer)  # ControlModel wraps (mutates) its model's layers
    vec = make_vector(layers=(1, 2), seed=3)
    cv = repeng.ControlVector.import_gguf(str(export_gguf(vec, tmp_path / "v.gguf")))
    ids = tiny_tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        with steer(ours_lm, [Steer(vec, 1.75, layers=[2])]):
            ours = ours_lm.model(ids).logits
        plain = ours_lm.model(ids).logits
        cm = repeng.ControlModel(theirs_lm.model, [2])
        cm.set_control(cv, 1.75)
        theirs = cm(ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the vector does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# ---- import_vector from Python objects and plain files -----------------------------------------------


def test_import_steering_vectors_object_and_mappings(tiny):
    sv_mod = pytest.importorskip("steering_vectors")
    t = {2: torch.randn(32), 3: torch.randn(32)}
    vec = import_vector(sv_mod.SteeringVector(layer_activations=t), lm=tiny)
    assert vec.layers == [2, 3] and torch.equal(vec[2], t[2]) and vec.method == "steering-vectors"
    assert vec.n_layers == 4 and vec.model == tiny.name and vec.extra["model_type"] == "llama"
    with pytest.raises(UserError, match="decoder_block"):
        import_vector(sv_mod.SteeringVector(layer_activations=t, layer_type="mlp"))
    arr = {"1": np.arange(32, dtype=np.float32), 3: torch.ones(1, 32)}  # str keys, numpy, a [1, d] row
    m = import_vector(arr)
    assert m.layers == [1, 3] and torch.equal(m[1], torch.arange(32, dtype=torch.float32))
    with pytest.raises(UserError, match="d_model"):
        import_vector({1: torch.ones(48)}, lm=tiny)
    with pytest.raises(UserError, match="4 blocks"):
        import_vector({9: torch.ones(32)}, lm=tiny)
    with pytest.raises(UserError, match="not a layer index"):
        import_vector({"blk.attn": torch.ones(32)})
    with pytest.raises(UserError, match="cannot import a int"):
        import_vector(5)


def test_import_files(tmp_path, tiny):
    from safetensors.torch import save_file

    plain = {"4": torch.randn(32), "6": torch.randn(32)}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    vec = import_vector(tmp_path / "plain.safetensors", name="p")
    assert vec.layers == [4, 6] and torch.equal(vec[6], plain["6"]) and vec.extra["name"] == "p"
    ours = make_vector(layers=(1, 2))
    ours.save(tmp_path / "ours")
    back = import_vector(str(tmp_path / "ours.safetensors"), lm=tiny)
    assert back.recommended_strength == 3.25 and torch.equal(back[1], ours[1])
    g = import_vector(export_gguf(ours, tmp_path / "ours.gguf"))
    assert torch.equal(g[2], ours[2]) and g.description == "test vector"
    (tmp_path / "x.pt").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickled formats are never loaded"):
        import_vector(tmp_path / "x.pt")
    with pytest.raises(UserError, match="not found"):
        import_vector(tmp_path / "nope.safetensors")
