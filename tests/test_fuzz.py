"""Fuzzing the loaders that take files from strangers: random bytes and random structurally valid
files (real safetensors headers, real JSON) into the vector, probe and controller loaders and the
contrast-set parsers. The only acceptable failure is our typed UserError; anything else (a
KeyError, a RecursionError, a crash, an unpickling) is a bug. Example counts are kept small so the
whole file runs in well under 30 s; hypothesis' database replays any failure it finds."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from steering_lab.controller import Controller
from steering_lab.datasets import load_user
from steering_lab.errors import UserError
from steering_lab.probes import Probe
from steering_lab.vector import SteeringVector

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LOADERS = {"vector": SteeringVector.load, "probe": Probe.load, "controller": Controller.load}

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=3), max_leaves=8)

KEYS = ["direction.0", "direction.1", "direction.3", "direction.01", "direction.-1", "direction.x", "weight", "mean",
        "scale", "bias", "net.in_mean", "net.in_scale", "net.body.0.weight", "net.body.0.bias", "net.body.2.weight",
        "net.body.2.bias", "other"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]
META_KEYS = ["kind", "layer", "pooling", "d_model", "model", "labels", "metrics", "input_layers", "steer_layers",
             "hidden", "base_strength", "threshold", "vector", "recommended_layer", "recommended_strength",
             "normalized", "description", "sha256", "created", "chat"]
META_VALUES = (json_values | st.sampled_from(["linear_probe", "steering_controller", "last", "mean"])
               | st.lists(st.integers(-2, 6), max_size=3) | st.integers(-3, 70))


@st.composite
def tensors(draw):
    out = {}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=2))
        dtype = draw(st.sampled_from(DTYPES))
        t = torch.randn(shape) * draw(st.sampled_from([1.0, 1e30, float("inf"), float("nan")]))
        out[key] = t.to(dtype)
    return out


@st.composite
def metadata(draw):
    return {k: draw(META_VALUES) for k in draw(st.lists(st.sampled_from(META_KEYS), max_size=10, unique=True))}


def only_user_errors(fn, *args) -> None:
    try:
        fn(*args)
    except UserError:
        pass


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FAST
@given(data=st.binary(max_size=300), kind=st.sampled_from(list(LOADERS)), with_json=st.booleans())
def test_random_bytes_into_loaders(folder, data, kind, with_json):
    (folder / "x.safetensors").write_bytes(data)
    js = folder / "x.json"
    if with_json:
        js.write_bytes(data[::-1])
    else:
        js.unlink(missing_ok=True)
    only_user_errors(LOADERS[kind], folder / "x")


@FAST
@given(raw=tensors(), meta=metadata(), kind=st.sampled_from(list(LOADERS)), header_meta=st.booleans())
def test_structured_files_into_loaders(folder, raw, meta, kind, header_meta):
    """Valid safetensors holding random tensors, with random (valid JSON) metadata beside and inside it."""
    extra = {"steering_lab.meta": json.dumps(meta, allow_nan=True)} if header_meta else None
    try:
        data = save(raw, metadata=extra)
    except Exception:  # noqa: BLE001 - a combination safetensors itself cannot write is not a test case
        return
    (folder / "y.safetensors").write_bytes(data)
    (folder / "y.json").write_text(json.dumps(meta, allow_nan=True))
    only_user_errors(LOADERS[kind], folder / "y")


lines = st.text(alphabet=string.printable + "é€\x00\ufeff", max_size=40)


@FAST
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
       data=st.binary(max_size=200) | lines.map(str.encode))
def test_random_bytes_into_contrast_parsers(folder, suffix, data):
    pos = folder / f"pos{suffix}"
    pos.write_bytes(data)
    if suffix == ".txt":
        (folder / "neg.txt").write_bytes(data[::-1])
        only_user_errors(load_user, pos, folder / "neg.txt")
    else:
        only_user_errors(load_user, pos)


row = st.dictionaries(st.sampled_from(["positive", "negative", "prompt", "other"]),
                      json_values | st.text(max_size=10), max_size=4)


@FAST
@given(rows=st.lists(row | json_values, max_size=5), as_array=st.booleans())
def test_structured_rows_into_contrast_parsers(folder, rows, as_array):
    if as_array:
        (folder / "rows.json").write_text(json.dumps(rows))
        only_user_errors(load_user, folder / "rows.json")
    else:
        (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        only_user_errors(load_user, folder / "rows.jsonl")
    header = ["positive", "negative", "prompt"]
    text = ",".join(header) + "\n" + "\n".join(",".join(json.dumps(r.get(h, "")) if isinstance(r, dict) else "x"
                                                        for h in header) for r in rows)
    (folder / "rows.csv").write_text(text)
    only_user_errors(load_user, folder / "rows.csv")
