"""Vectors that travel: llama.cpp control-vector GGUF (which repeng reads and writes too) and imports
from repeng, steering-vectors, plain ``{layer: tensor}`` files and Python mappings.

The layer convention needs no translation (DESIGN.md): our layer ``k`` is added to the output of
decoder block ``k``, which is llama.cpp's ``direction.k`` and repeng's ``directions[k]``.

A control-vector GGUF as llama.cpp reads it (``common_control_vector_load_one``): every tensor must
be named ``direction.<k>`` with ``k >= 1``, be F32 and 1-D, and all must have the same width; one bad
tensor makes llama.cpp skip the **whole file**. It reads no metadata key at all; repeng's
``ControlVector.import_gguf`` needs ``controlvector.model_hint``. We write:

- ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the HF ``model_type``),
  ``controlvector.layer_count`` (uint32, the number of direction tensors),
- ``direction.{k}`` float32 tensors of shape ``[d_model]`` (layer 0 is dropped with a warning),
- our metadata as extra ``controlvector.*`` keys (``method``, ``recommended_layer``,
  ``recommended_strength``, ``description``, ...) and ``controlvector.extra`` (a JSON object for the
  rest); tools that do not know them ignore them. ``controlvector.scale`` says a strength was baked in.

A Linear-AcT vector (``transport.*`` maps) is refused: these formats hold additive directions only,
and writing its mean-shift direction alone would silently turn "transport" into "add". Export
``vector.additive()`` to take that direction anyway (it then steers with ``add`` there, not transport).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError, check
from .vector import SteeringVector, base_path, check_finite

log = logging.getLogger(__name__)

ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(-?\d+)$")
_PLAIN_KEY = re.compile(r"^(?:direction\.|layers?\.|layer_)?(\d+)$")
# metadata fields written as typed controlvector.* keys: name -> kind
_TYPED = {"model": "str", "method": "str", "dataset": "str", "description": "str", "created": "str",
          "d_model": "uint", "n_layers": "uint", "recommended_layer": "uint", "recommended_strength": "float",
          "normalized": "bool"}


# ---------------------------------------------------------------------------------------------
# export


def gguf_path(path: str | os.PathLike) -> Path:
    """``PATH`` with a ``.gguf`` suffix (added when missing)."""
    p = Path(path).expanduser()
    return p if p.suffix == ".gguf" else p.with_name(p.name + ".gguf")


def _model_hint(vector: SteeringVector, model_hint: str | None) -> str:
    if model_hint:
        return str(model_hint)
    hint = vector.extra.get("model_type")
    if isinstance(hint, str) and hint:
        return hint
    from .model import EMBEDDED_NAME

    if vector.model == EMBEDDED_NAME or vector.model.endswith("/" + EMBEDDED_NAME):
        return "llama"  # the embedded SmolLM2 is a Llama-architecture model
    hint = vector.model or "unknown"
    log.warning("the vector's metadata has no model_type; writing controlvector.model_hint=%r "
                "(pass model_hint='llama', 'qwen2', ... to set the HF model_type)", hint)
    return hint


def export_gguf(vector: SteeringVector, path: str | os.PathLike, *, scale: float | None = None,
                model_hint: str | None = None) -> Path:
    """Write ``vector`` as a llama.cpp control vector (``PATH.gguf``, atomically); returns the path.

    Layer 0 is dropped with a warning (llama.cpp rejects ``direction.0`` and would skip the whole
    file); a vector that has only layer 0 is refused. With ``scale`` the directions are multiplied
    by it (llama.cpp's ``--control-vector FILE`` then applies that strength); without it they are
    written as they are and the strength is chosen at load time (``--control-vector-scaled FILE S``).
    """
    import gguf

    check(isinstance(vector, SteeringVector), f"export_gguf needs a SteeringVector, not {type(vector).__name__}")
    check(not vector.is_transport,
          "this is a Linear-AcT transport vector: llama.cpp and repeng control vectors hold additive directions "
          "only, so its per-unit transport maps cannot be exported (steer with it here, operator 'transport'). "
          "To export just its mean-shift direction for additive steering, export vector.additive()")
    if scale is not None:
        check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and np.isfinite(scale),
              f"scale must be a finite number, got {scale!r}")
        scale = float(scale)
    layers = [k for k in vector.layers if k >= 1]
    check(bool(layers), "llama.cpp control vectors cannot hold layer 0 (it rejects direction.0) and this "
                        "vector has no other layer; extract it at a layer >= 1")
    if 0 in vector.directions:
        log.warning("dropping layer 0 from the GGUF export: llama.cpp rejects direction.0 and would skip the "
                    "whole file (kept layers: %s)", ", ".join(map(str, layers)))
    out = gguf_path(path)
    check(out.name not in (".gguf",), f"invalid output path {str(path)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)

    meta = vector.metadata()
    meta.pop("layers", None)
    if scale is not None:
        if meta.get("recommended_strength") is not None and scale != 0:
            # the file is self-consistent: strength r/S on S*v is strength r on v
            meta["recommended_strength"] = float(meta["recommended_strength"]) / scale
        meta["normalized"] = bool(meta.get("normalized")) and abs(scale) == 1.0
    extra = {k: v for k, v in meta.items() if k not in _TYPED and k != "model_type"}

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)  # writes general.architecture
        writer.add_string(f"{ARCH}.model_hint", _model_hint(vector, model_hint))
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        for key, kind in _TYPED.items():
            value = meta.get(key)
            if value is None:
                continue
            name = f"{ARCH}.{key}"
            if kind == "str":
                writer.add_string(name, str(value))
            elif kind == "uint":
                writer.add_uint32(name, int(value))
            elif kind == "float":
                writer.add_float64(name, float(value))
            else:
                writer.add_bool(name, bool(value))
        if scale is not None:
            writer.add_float64(f"{ARCH}.scale", scale)
        if extra:
            try:
                writer.add_string(f"{ARCH}.extra", json.dumps(extra, sort_keys=True, default=str))
            except (TypeError, ValueError) as exc:  # metadata that is not JSON: keep the file usable
                log.warning("metadata not written to the GGUF (%s)", exc)
        for k in layers:
            t = vector.directions[k].detach().to("cpu", torch.float32)
            if scale is not None:
                t = t * scale
            writer.add_tensor(f"direction.{k}", t.contiguous().numpy().copy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# import


def _field_value(field: Any) -> Any:
    """Value of a GGUFReader field (str, number, bool or list)."""
    try:
        value = field.contents()
    except Exception:  # noqa: BLE001 - a malformed field reads as absent
        return None
    if isinstance(value, np.generic):
        value = value.item()
    return value


def load_gguf(path: str | os.PathLike, *, label: str | None = None) -> SteeringVector:
    """Read a llama.cpp control-vector GGUF (ours, repeng's, ``llama-cvector-generator``'s, or any file
    with extra keys) into a SteeringVector. Our extra ``controlvector.*`` keys come back as metadata;
    the model hint as ``extra["model_type"]``. ``label`` names the file in error messages instead of
    its path (the app shows names, never host paths)."""
    from gguf import GGMLQuantizationType, GGUFReader

    p = Path(path).expanduser()
    where = label or str(p)
    check(p.is_file(), f"GGUF file not found: {where}")
    try:
        reader = GGUFReader(p)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user's file is a user error
        raise UserError(f"{where} is not a readable GGUF file: {exc}") from None
    fields = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    check(arch == ARCH, f"{where} is not a control vector: its general.architecture is "
                        f"{arch!r} (a control vector has 'controlvector'; a model GGUF cannot be imported as a vector)")

    dirs: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        check(m is not None and int(m.group(1)) >= 0,
              f"{where}: tensor {t.name!r} is not direction.<layer> (llama.cpp would reject this file too)")
        layer = int(m.group(1))
        check(t.tensor_type == GGMLQuantizationType.F32,
              f"{where}: {t.name} is {t.tensor_type.name}, but control vectors must be F32 (llama.cpp rejects others)")
        shape = [int(s) for s in t.shape]
        check(len(shape) >= 1 and all(s == 1 for s in shape[1:]),
              f"{where}: {t.name} has shape {shape}, but a direction must be 1-D [d_model]")
        data = torch.from_numpy(np.array(t.data, dtype=np.float32, copy=True).reshape(-1))
        check(layer not in dirs, f"{where}: two tensors for layer {layer}")
        dirs[layer] = data
    check(bool(dirs), f"{where} holds no direction.<layer> tensors")
    del reader  # releases the memory map
    count = fields.get(f"{ARCH}.layer_count")
    if isinstance(count, int) and count != len(dirs):
        log.info("%s: controlvector.layer_count is %d but the file holds %d direction tensors", p, count, len(dirs))

    known: dict[str, Any] = {}
    for key, kind in _TYPED.items():
        value = fields.get(f"{ARCH}.{key}")
        if value is None:
            continue
        ok = {"str": isinstance(value, str), "uint": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "bool": isinstance(value, bool)}[kind]
        if ok:
            known[key] = float(value) if kind == "float" else value
    extra: dict[str, Any] = {}
    raw_extra = fields.get(f"{ARCH}.extra")
    if isinstance(raw_extra, str):
        try:
            parsed = json.loads(raw_extra)
            if isinstance(parsed, dict):
                extra.update(parsed)
        except ValueError:
            log.warning("%s: controlvector.extra is not JSON; ignored", p)
    hint = fields.get(f"{ARCH}.model_hint")
    if isinstance(hint, str) and hint:
        extra["model_type"] = hint
    scale = fields.get(f"{ARCH}.scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        extra["gguf_scale"] = float(scale)
    if "description" not in known:
        known["description"] = f"imported from {p.name}"
    if "method" not in known:
        known["method"] = "gguf"
    if known.get("recommended_layer") is not None and known["recommended_layer"] not in dirs:
        known["recommended_layer"] = None
    return SteeringVector(directions=dirs, extra=extra, **known)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
    else:
        try:
            t = torch.from_numpy(np.array(value, copy=True))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{what} is not an array of numbers: {exc}") from None
    check(t.is_floating_point(), f"{what} has dtype {t.dtype}, expected floats")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    check(t.dim() == 1, f"{what} has shape {tuple(t.shape)}, expected [d_model]")
    t = t.to(torch.float32).contiguous().clone()
    check_finite(t, what)
    return t


def _layer_key(key: Any, what: str) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        layer = int(key)
    else:
        m = _PLAIN_KEY.match(str(key))
        check(m is not None, f"{what}: key {key!r} is not a layer index (expected 5, '5' or 'direction.5')")
        layer = int(m.group(1))
    check(layer >= 0, f"{what}: layer {layer} is negative; give 0-based decoder-block indices")
    return layer


def _from_mapping(mapping: Mapping, what: str) -> dict[int, torch.Tensor]:
    dirs: dict[int, torch.Tensor] = {}
    for key, value in mapping.items():
        layer = _layer_key(key, what)
        check(layer not in dirs, f"{what}: layer {layer} appears twice")
        dirs[layer] = _tensor(value, f"{what}: direction for layer {layer}")
    check(bool(dirs), f"{what} holds no directions")
    return dirs


def _from_safetensors(path: Path) -> SteeringVector:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a valid safetensors file: {exc}") from None
    if raw and all(re.fullmatch(r"direction\.\d+|transport\.(scale|shift|lo|hi)\.\d+", k) for k in raw):
        vec = SteeringVector.load(path)  # our own format, with its metadata (json beside it or inside)
        if not vec.description:
            vec.description = f"imported from {path.name}"
        return vec
    return SteeringVector(directions=_from_mapping(raw, str(path)), method="import",
                          description=f"imported from {path.name}")


def import_vector(source: Any, *, name: str | None = None, lm: Any = None) -> SteeringVector:
    """Turn ``source`` into a SteeringVector.

    ``source`` may be a path (``.gguf`` control vector, or a ``.safetensors`` file holding ``direction.k``
    or plain ``{"k": tensor}`` tensors, with our ``.json`` metadata when present), a repeng
    ``ControlVector``, a steering-vectors ``SteeringVector`` (decoder-block layers), one of ours, or a
    mapping ``{layer: tensor or array}``. With ``lm`` (a LoadedModel) the width and layers are checked
    against the model and missing model metadata is filled in. ``name`` is recorded in the metadata.
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.suffix == ".gguf":
            vec = load_gguf(p)
        else:
            st = base_path(p).with_suffix(".safetensors") if p.suffix in ("", ".json") else p
            check(st.suffix == ".safetensors",
                  f"cannot import {p.name}: give a .gguf or .safetensors file (pickled formats are never loaded)")
            check(st.is_file(), f"vector file not found: {st}")
            vec = _from_safetensors(st)
    elif isinstance(source, SteeringVector):
        vec = SteeringVector(directions={k: _tensor(v, f"direction for layer {k}") for k, v in
                                         source.directions.items()},
                             **{k: v for k, v in source.metadata().items() if k in _TYPED}, extra=dict(source.extra),
                             transport={k: dict(parts) for k, parts in source.transport.items()})
    elif hasattr(source, "layer_activations") and isinstance(source.layer_activations, Mapping):
        layer_type = getattr(source, "layer_type", "decoder_block")
        check(layer_type == "decoder_block",
              f"this steering-vectors vector acts on {layer_type!r} layers; only 'decoder_block' vectors match "
              "our layer convention (the output of block k)")
        vec = SteeringVector(directions=_from_mapping(source.layer_activations, "steering-vectors vector"),
                             method="steering-vectors", description="imported from a steering-vectors SteeringVector")
    elif hasattr(source, "directions") and isinstance(source.directions, Mapping):
        vec = SteeringVector(directions=_from_mapping(source.directions, "repeng ControlVector"),
                             method="repeng", description="imported from a repeng ControlVector")
        model_type = getattr(source, "model_type", None)
        if isinstance(model_type, str) and model_type:
            vec.extra["model_type"] = model_type
    elif isinstance(source, Mapping):
        vec = SteeringVector(directions=_from_mapping(source, "mapping"), method="import")
    else:
        raise UserError(f"cannot import a {type(source).__name__}: give a .gguf/.safetensors path, a repeng "
                        "ControlVector, a steering-vectors SteeringVector or a {layer: tensor} mapping")
    if name is not None:
        check(isinstance(name, str) and bool(name.strip()), f"invalid name {name!r}")
        vec.extra["name"] = name.strip()
    if lm is not None:
        vec.check_model(lm)
        if vec.n_layers is None:
            vec.n_layers = lm.n_layers
        if not vec.model:
            vec.model = lm.name
        model_type = getattr(getattr(lm.model, "config", None), "model_type", None)
        if model_type and "model_type" not in vec.extra:
            vec.extra["model_type"] = model_type
    return vec
