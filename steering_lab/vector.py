"""SteeringVector: one direction per decoder block, plus the metadata that travels with it.

File format (DESIGN.md; llama.cpp and repeng depend on it):
``NAME.safetensors`` holds ``direction.{k}`` float32 tensors of shape ``[d_model]``, where ``k`` is
the 0-based index of the decoder block whose *output* the direction is added to; ``NAME.json``
holds the metadata. Both are written atomically. Loading never unpickles anything.

A Linear-AcT vector (``method: "linear_act"``, ``directions/transport.py``) also carries a per-unit
affine transport map at each of its layers: ``transport.scale.{k}`` and ``transport.shift.{k}``
(``h -> scale * h + shift``, each ``[d_model]``), and, when transport is restricted to the support of
the source distribution, ``transport.lo.{k}`` / ``transport.hi.{k}`` (units outside ``[lo, hi]`` are
left as they are). Its ``direction.{k}`` is the mean shift (mean target - mean source), so add-style
tools still see a direction; arithmetic on such a vector is refused (it would drop the maps), use
:meth:`SteeringVector.additive` for the mean-shift vector alone.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, check

_KEY = re.compile(r"direction\.(0|[1-9][0-9]{0,5})")
_TRANSPORT_KEY = re.compile(r"transport\.(scale|shift|lo|hi)\.(0|[1-9][0-9]{0,5})")
TRANSPORT_PARTS = ("scale", "shift", "lo", "hi")  # scale and shift required; lo and hi together or not at all
_META_FIELDS = ("model", "d_model", "n_layers", "layers", "method", "dataset", "recommended_layer",
                "recommended_strength", "normalized", "created", "description")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def base_path(path: str | os.PathLike) -> Path:
    """``PATH``, ``PATH.safetensors`` or ``PATH.json`` -> ``PATH`` (no extension)."""
    p = Path(path).expanduser()
    if p.suffix in (".safetensors", ".json", ".gguf"):
        p = p.with_suffix("")
    return p


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_finite(t: torch.Tensor, what: str) -> None:
    check(bool(torch.isfinite(t).all()), f"{what} contains NaN or inf values")


# ---- the pair as one unit -------------------------------------------------------------------
# A save is committed by its .safetensors file: that file carries a copy of the metadata
# (``__metadata__["steering_lab.meta"]``) and the .json names the sha256 of the tensors file it
# belongs to. The json is written first, the tensors last, each by an atomic rename; a crash
# between the two leaves the old tensors file (whole, with its own metadata) beside a json whose
# checksum does not match, and the loader then uses the metadata inside the tensors file: the
# previous version, intact. A json with a matching checksum (or none: older files, hand-written
# ones) is the metadata, so hand edits of the json keep working.
PICKLED = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")
SHA_KEY = "sha256"
META_KEY = "steering_lab.meta"
log = logging.getLogger(__name__)


def encode_pair(tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str) -> tuple[bytes, bytes]:
    """``(safetensors bytes, json bytes)`` of one artifact (float32 CPU tensors)."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if k != SHA_KEY}
    st = save(clean, metadata={"format": fmt, META_KEY: json.dumps(meta)})
    js = (json.dumps({**meta, SHA_KEY: hashlib.sha256(st).hexdigest()}, indent=2) + "\n").encode()
    return st, js


def commit_pair(base: Path, st: bytes, js: bytes) -> Path:
    """Write an encoded pair at ``base``: json first, tensors last (see above); returns ``base``."""
    atomic_write_bytes(base.with_suffix(".json"), js)
    atomic_write_bytes(base.with_suffix(".safetensors"), st)
    return base


def write_pair(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               fmt: str, what: str) -> Path:
    """Write ``PATH.safetensors`` (float32 CPU tensors) and ``PATH.json`` as one unit; returns PATH."""
    base = base_path(path)
    check(base.name not in ("", ".", ".."), f"invalid {what} path {str(path)!r}")
    return commit_pair(base, *encode_pair(tensors, meta, fmt))


def _embedded_meta(data: bytes) -> dict[str, Any] | None:
    """The metadata copy inside a (validated) safetensors file, or None."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
        text = (header.get("__metadata__") or {}).get(META_KEY)
        meta = json.loads(text) if isinstance(text, str) else None
    except (ValueError, AttributeError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def read_files(st: Path, js: Path | None, what: str, need_json: bool = True,
               label: str | None = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` from a tensors file and its json (either may be named freely, e.g.
    two uploads); ``label`` replaces the paths in messages (the app shows names, never host paths)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    st_name = label or str(st)
    js_name = f"the metadata of {label}" if label else str(js)
    check(st.is_file(), f"{what} file not found: {st_name}")
    has_json = js is not None and js.is_file()
    check(has_json or not need_json, f"{what} metadata not found: {js_name}")
    try:
        data = st.read_bytes()
        raw = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{st_name} is not a valid safetensors file: {_first_line(exc)}") from None
    embedded = _embedded_meta(data)
    meta: dict[str, Any] = {}
    if has_json:
        try:
            meta = json.loads(js.read_bytes().decode("utf-8"))
        except (ValueError, OSError) as exc:
            raise UserError(f"{js_name} is not valid JSON: {_first_line(exc)}") from None
        check(isinstance(meta, dict), f"{js_name} must hold a JSON object")
        sha = meta.pop(SHA_KEY, None)
        if sha is not None and sha != hashlib.sha256(data).hexdigest():
            # the json belongs to another save (interrupted, or copied from elsewhere)
            check(embedded is not None or not need_json,
                  f"{js_name} does not belong to {st_name} (checksum mismatch: an interrupted save?)")
            log.warning("%s: metadata does not match the tensors; using the copy inside the tensors file", st_name)
            meta = dict(embedded or {})
    elif embedded is not None:
        meta = dict(embedded)
    return raw, meta


def read_pair(path: str | os.PathLike, what: str, need_json: bool = True,
              label: str | None = None) -> tuple[Path, dict, dict]:
    """``(PATH, tensors, metadata)`` of a safetensors + json pair, with clear errors; never unpickles."""
    check(Path(path).suffix.lower() not in PICKLED,
          f"{label or Path(path).name}: pickled formats ({', '.join(PICKLED)}) are never loaded; use .safetensors")
    base = base_path(path)
    raw, meta = read_files(base.with_suffix(".safetensors"), base.with_suffix(".json"), what, need_json, label)
    return base, raw, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "d_model": (int, type(None)), "n_layers": (int, type(None)), "method": (str,),
    "dataset": (str,), "recommended_layer": (int, type(None)), "recommended_strength": (int, float, type(None)),
    "normalized": (bool,), "created": (str,), "description": (str,)}


def _typed_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """The known metadata fields, type-checked (a json from elsewhere may hold anything)."""
    out = {}
    for key, types in _TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        check(ok, f"{where}: metadata field {key!r} has the wrong type ({type(value).__name__})")
        if key == "recommended_strength" and value is not None:
            check(math.isfinite(value), f"{where}: recommended_strength is not finite")
        out[key] = value
    return out


@dataclass
class SteeringVector:
    """Directions keyed by 0-based decoder-block index, with metadata.

    Arithmetic: ``a + b`` and ``a - b`` combine layer-wise (union of layers), ``k * a`` scales,
    ``-a`` negates. Metadata of the left operand is kept.
    """

    directions: dict[int, torch.Tensor]
    model: str = ""
    d_model: int | None = None
    n_layers: int | None = None
    method: str = ""
    dataset: str = ""
    recommended_layer: int | None = None
    recommended_strength: float | None = None
    normalized: bool = False
    created: str = field(default_factory=_now)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Linear-AcT maps: {layer: {"scale", "shift"[, "lo", "hi"]: [d_model] tensors}}; empty for additive vectors
    transport: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(len(self.directions) > 0, "a steering vector needs at least one layer")
        clean: dict[int, torch.Tensor] = {}
        dims = set()
        for k, v in self.directions.items():
            check(isinstance(k, int) and not isinstance(k, bool) and k >= 0,
                  f"layer keys must be non-negative ints, got {k!r}")
            check(isinstance(v, torch.Tensor), f"direction for layer {k} is not a tensor")
            check(v.dim() == 1 and v.shape[0] > 0,
                  f"direction for layer {k} has shape {tuple(v.shape)}, expected [d_model]")
            check(v.is_floating_point(), f"direction for layer {k} has dtype {v.dtype}, expected a float")
            check_finite(v, f"direction for layer {k}")
            dims.add(v.shape[0])
            clean[k] = v
        check(len(dims) == 1, f"directions have different widths: {sorted(dims)}")
        width = dims.pop()
        if self.d_model is None:
            self.d_model = width
        check(self.d_model == width, f"metadata says d_model {self.d_model} but directions have {width}")
        self.directions = dict(sorted(clean.items()))
        if self.transport:
            self.transport = _check_transport(self.transport, self.directions, width)

    @property
    def is_transport(self) -> bool:
        """True for a Linear-AcT vector (it carries transport maps)."""
        return bool(self.transport)

    def transport_at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(scale, shift, lo, hi)`` of the transport map at ``layer`` (``lo``/``hi`` None: no support limit)."""
        check(self.is_transport, f"this vector ({self.method or 'unknown method'}) has no transport maps; the "
                                 "'transport' operator needs a Linear-AcT vector (steering-lab transport fit)")
        parts = self.transport.get(layer)
        check(parts is not None,
              f"vector has no transport map for layer {layer} (it has layers {_ranges(self.layers)})")
        return parts["scale"], parts["shift"], parts.get("lo"), parts.get("hi")

    def additive(self) -> SteeringVector:
        """The same vector without transport maps: its directions (for a Linear-AcT vector, the mean
        shift) as a plain additive vector."""
        if not self.is_transport:
            return self
        return replace(self, transport={}, method=f"{self.method}_mean_shift", extra=dict(self.extra))

    def _no_transport(self, what: str) -> None:
        check(not self.is_transport, f"cannot {what} a Linear-AcT transport vector (its maps would be lost); "
                                     "use .additive() for its mean-shift direction")

    # ---- views -----------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            return self.directions[layer]
        except KeyError:
            raise UserError(f"vector has no direction for layer {layer} (it has layers "
                            f"{_ranges(self.layers)})") from None

    def default_layers(self) -> list[int]:
        """Where to steer when the user names no layer: the recommended layer, else all."""
        if self.recommended_layer is not None and self.recommended_layer in self.directions:
            return [self.recommended_layer]
        return self.layers

    def at(self, layers: int | Iterable[int]) -> SteeringVector:
        """The same vector restricted to ``layers``."""
        keep = [layers] if isinstance(layers, int) else list(layers)
        maps = {k: self.transport[k] for k in keep if k in self.transport}
        return replace(self, directions={k: self[k] for k in keep}, extra=dict(self.extra), transport=maps)

    def norms(self) -> dict[int, float]:
        return {k: float(v.float().norm()) for k, v in self.directions.items()}

    def normalize(self) -> SteeringVector:
        """Unit-norm copy (strengths then mean L2 units in the residual stream)."""
        dirs = {}
        for k, v in self.directions.items():
            n = v.float().norm()
            check(float(n) > 0, f"direction for layer {k} is zero and cannot be normalized")
            dirs[k] = v / n
        return replace(self, directions=dirs, normalized=True, extra=dict(self.extra), transport=dict(self.transport))

    def to(self, *args: Any, **kwargs: Any) -> SteeringVector:
        maps = {k: {name: t.to(*args, **kwargs) for name, t in parts.items()} for k, parts in self.transport.items()}
        return replace(self, directions={k: v.to(*args, **kwargs) for k, v in self.directions.items()},
                       extra=dict(self.extra), transport=maps)

    # ---- arithmetic ------------------------------------------------------------------
    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        check(isinstance(other, SteeringVector), "can only add or subtract another SteeringVector")
        self._no_transport("add to or subtract from")
        other._no_transport("add or subtract")
        check(self.d_model == other.d_model,
              f"cannot combine vectors of width {self.d_model} and {other.d_model}")
        dirs = {k: v.clone() for k, v in self.directions.items()}
        for k, v in other.directions.items():
            dirs[k] = dirs[k] + sign * v if k in dirs else sign * v
        return replace(self, directions=dirs, normalized=False, created=_now(),
                       method=f"{self.method}{'+' if sign > 0 else '-'}{other.method}",
                       extra=dict(self.extra))

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, scalar: float) -> SteeringVector:
        check(isinstance(scalar, (int, float)) and math.isfinite(scalar),
              f"can only scale a vector by a finite number, not {scalar!r}")
        self._no_transport("scale")
        return replace(self, directions={k: v * scalar for k, v in self.directions.items()},
                       normalized=self.normalized and abs(scalar) == 1, extra=dict(self.extra))

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __truediv__(self, scalar: float) -> SteeringVector:
        check(scalar != 0, "cannot divide a vector by zero")
        return self * (1.0 / scalar)

    # ---- validation ------------------------------------------------------------------
    def check_model(self, lm: Any, layers: Iterable[int] | None = None) -> None:
        """Raise :class:`UserError` saying exactly what does not match ``lm`` (a LoadedModel)."""
        check(self.d_model == lm.d_model,
              f"vector was made for d_model {self.d_model} ({self.model or 'unknown model'}) but "
              f"{lm.name} has d_model {lm.d_model}")
        wanted = self.layers if layers is None else list(layers)
        bad = [k for k in wanted if not 0 <= k < lm.n_layers]
        check(not bad, f"vector uses layer(s) {bad} but {lm.name} has {lm.n_layers} blocks "
                       f"(layers 0-{lm.n_layers - 1})")

    # ---- files -----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        meta = {
            "model": self.model,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "layers": self.layers,
            "method": self.method,
            "dataset": self.dataset,
            "recommended_layer": self.recommended_layer,
            "recommended_strength": self.recommended_strength,
            "normalized": self.normalized,
            "created": self.created,
            "description": self.description,
        }
        meta.update(self.extra)
        return meta

    def encode(self) -> tuple[bytes, bytes]:
        """``(safetensors bytes, json bytes)``: what :meth:`save` writes (the library commits these)."""
        tensors = {f"direction.{k}": v for k, v in self.directions.items()}
        for k, parts in self.transport.items():
            tensors.update({f"transport.{name}.{k}": t for name, t in parts.items()})
        return encode_pair(tensors, self.metadata(), "steering_lab")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json`` as one unit; returns ``PATH`` (no extension)."""
        base = base_path(path)
        check(base.name not in ("", ".", ".."), f"invalid vector path {str(path)!r}")
        return commit_pair(base, *self.encode())

    @classmethod
    def load(cls, path: str | os.PathLike, lm: Any = None, *, label: str | None = None) -> SteeringVector:
        """Load ``PATH(.safetensors)`` (+ ``PATH.json`` if present); check against ``lm`` if given.
        ``label`` names the vector in error messages instead of its path."""
        base, raw, meta = read_pair(path, "vector", need_json=False, label=label)
        return cls.from_parts(raw, meta, label or str(base.with_suffix(".safetensors")), lm)

    @classmethod
    def load_files(cls, safetensors: str | os.PathLike, json_file: str | os.PathLike | None = None, lm: Any = None,
                   *, label: str | None = None) -> SteeringVector:
        """Load from a tensors file and an optional json named freely (e.g. two uploads)."""
        st = Path(safetensors)
        raw, meta = read_files(st, None if json_file is None else Path(json_file), "vector", False, label)
        return cls.from_parts(raw, meta, label or str(st), lm)

    @classmethod
    def from_parts(cls, raw: dict[str, torch.Tensor], meta: dict[str, Any], where: str,
                   lm: Any = None) -> SteeringVector:
        dirs: dict[int, torch.Tensor] = {}
        maps: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in raw.items():
            m = _KEY.fullmatch(key)
            tm = None if m is not None else _TRANSPORT_KEY.fullmatch(key)
            check(m is not None or tm is not None,
                  f"{where}: unexpected tensor {key!r} (expected direction.<layer> or transport.<part>.<layer>)")
            check(t.is_floating_point(), f"{where}: {key} has dtype {t.dtype}, expected a float")
            if m is not None:
                dirs[int(m.group(1))] = t.float()
            else:
                maps.setdefault(int(tm.group(2)), {})[tm.group(1)] = t.float()
        check(bool(dirs), f"{where} holds no direction.<layer> tensors")
        known = _typed_meta(meta, where)
        extra = {k: v for k, v in meta.items() if k not in _META_FIELDS and k != SHA_KEY}
        known.setdefault("description", "")
        try:
            vec = cls(directions=dirs, extra=extra, transport=maps, **known)
        except UserError as exc:
            if not maps:
                raise
            raise UserError(f"{where}: {exc}") from None  # say which file has broken maps
        if lm is not None:
            vec.check_model(lm)
        return vec


def _check_transport(maps: Mapping[int, Mapping[str, torch.Tensor]], directions: Mapping[int, torch.Tensor],
                     width: int) -> dict[int, dict[str, torch.Tensor]]:
    """Transport maps checked against the directions: the same layers, scale and shift at each (lo and
    hi together or not at all), float [d_model] tensors, finite, lo <= hi."""
    check(set(maps) == set(directions),
          f"transport maps cover layers {_ranges(sorted(maps))} but the directions cover {_ranges(sorted(directions))}")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k in sorted(maps):
        parts = maps[k]
        check(isinstance(parts, Mapping), f"transport map for layer {k} must map part names to tensors")
        unknown = set(parts) - set(TRANSPORT_PARTS)
        check(not unknown, f"transport map for layer {k} has unknown part(s) {sorted(unknown)}")
        for need in ("scale", "shift"):
            check(need in parts, f"transport map for layer {k} has no {need}")
        check(("lo" in parts) == ("hi" in parts), f"transport map for layer {k} needs both lo and hi, or neither")
        for name in TRANSPORT_PARTS:
            if name not in parts:
                continue
            t = parts[name]
            what = f"transport {name} for layer {k}"
            check(isinstance(t, torch.Tensor) and t.is_floating_point(), f"{what} must be a float tensor")
            check(t.dim() == 1 and t.shape[0] == width, f"{what} has shape {tuple(t.shape)}, expected [{width}]")
            check_finite(t, what)
        if "lo" in parts:
            check(bool((parts["lo"] <= parts["hi"]).all()), f"transport support for layer {k} has lo > hi")
        out[k] = {name: parts[name] for name in TRANSPORT_PARTS if name in parts}
    return out


MAX_ADDED_NORM = 1e6  # strength x direction norm; far past any residual stream (~1-1e3), still finite in fp32/bf16
WARN_ADDED_NORM = 1e3


def check_strength(strength: float, vector: SteeringVector | None = None) -> str | None:
    """Refuse a strength that is not a finite number or would add a vector of norm above
    :data:`MAX_ADDED_NORM`; return a warning (else None) when it is beyond a sane bound: more than
    10x the vector's recommended strength, or an added norm above :data:`WARN_ADDED_NORM`."""
    check(isinstance(strength, (int, float)) and not isinstance(strength, bool) and math.isfinite(strength),
          f"strength must be a finite number, got {strength!r}")
    norm = max(vector.norms().values()) if vector is not None else 1.0
    added = abs(strength) * norm
    check(added <= MAX_ADDED_NORM, f"strength {strength:g} is far beyond any useful range: it would add a vector of "
                                   f"norm {added:.3g} (limit {MAX_ADDED_NORM:g})")
    rec = vector.recommended_strength if vector is not None else None
    if rec and abs(strength) > 10 * abs(rec):
        return f"strength {strength:g} is more than 10x the recommended {rec:g}: expect incoherent text"
    if added > WARN_ADDED_NORM:
        return f"strength {strength:g} adds a vector of norm {added:.3g}: expect incoherent text"
    return None


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for k in layers[1:] + [None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return ",".join(out)


def as_directions(vector: SteeringVector | Mapping[int, torch.Tensor] | torch.Tensor,
                  layers: Iterable[int] | int | None) -> dict[int, torch.Tensor]:
    """Resolve (vector, layers) to ``{layer: direction}``.

    A bare tensor needs ``layers``; a SteeringVector without ``layers`` uses its default layers
    (the recommended one when set).
    """
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(vector, torch.Tensor):
        check(vector.dim() == 1, f"a bare direction must have shape [d_model], got {tuple(vector.shape)}")
        check(layers is not None, "a bare tensor direction needs layers=")
        check_finite(vector, "direction")
        return {int(k): vector for k in layers}
    if not isinstance(vector, SteeringVector):
        vector = SteeringVector(directions=dict(vector))
    keep = vector.default_layers() if layers is None else [int(k) for k in layers]
    return {k: vector[k] for k in keep}
