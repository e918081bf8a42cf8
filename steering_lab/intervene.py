"""The one place where hooks are attached to a model.

``steer(lm, Steer(...), ...)`` is a context manager: for the duration of the block, each listed
decoder block's output ``h`` is transformed by the interventions that target it, and on every exit
path (normal, exception, generator closed mid-stream) every hook is removed.

Hooks act only on forward passes run by the thread that attached them: a forward pass on another
thread (the decode engine serving other users, an extraction) sees the model unsteered.

Operators on a direction ``v`` (``u = v / |v|``) with per-row strength ``s``:

* ``add``    ``h + s * v``                                   (s = 0 is the identity)
* ``ablate`` ``h - s * (h.u) u``                             (s = 1 removes the projection; 0 = identity)
* ``clamp``  ``h + (s - h.u) u``                             (sets the projection to the value s)
* ``rotate`` turn ``h`` by ``s`` degrees toward ``u`` in the plane of ``h`` and ``u``, norm kept
                                                             (s = 0 is the identity)
* ``transport`` Linear-AcT: per unit, ``(1 - s) h + s (a h + b)`` with the vector's maps ``a``, ``b``
             (``transport.scale/shift.{k}``), only where ``lo <= h <= hi`` when the vector stores a
             support; ``s`` in [0, 1] (0 = identity, 1 = full transport; outside: an error)

``s`` is a scalar or one value per batch row, held in a tensor buffer on the block's device that
``SteeringHandle.set_strength`` updates in place: a captured CUDA graph keeps working when a
slider moves. ``scope`` picks positions: ``all``, ``prompt`` (positions < prompt length) or
``generated`` (positions >= prompt length). The prompt length is the length of the first forward
pass of the block (the prefill) unless given.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UserError, check
from .vector import SteeringVector, as_directions

OPERATORS = ("add", "ablate", "clamp", "rotate", "transport")
SCOPES = ("all", "prompt", "generated")


@dataclass
class Steer:
    """One intervention: a vector, how strongly, where, and how."""

    vector: SteeringVector | Mapping[int, torch.Tensor] | torch.Tensor
    strength: float | Sequence[float] | torch.Tensor = 1.0
    layers: Sequence[int] | int | None = None
    operator: str = "add"
    scope: str = "all"
    rows: Sequence[bool] | None = None  # batch rows it acts on (default all); others are left exactly as they are
    # operator "transform": ``transform(h, s) -> h'`` on block outputs ``h`` [B, T, d] with strengths ``s``
    # [B or 1, 1, 1] (e.g. an SAE feature clamp that keeps the reconstruction error); eager path only
    transform: Any = None

    def __post_init__(self) -> None:
        if self.operator == "transform":
            check(callable(self.transform), "operator 'transform' needs a callable transform(h, strength)")
            return
        check(self.operator in OPERATORS, f"unknown operator {self.operator!r} (choose {', '.join(OPERATORS)})")
        check(self.scope in SCOPES, f"unknown scope {self.scope!r} (choose {', '.join(SCOPES)})")
        if self.operator == "transport":
            check(isinstance(self.vector, SteeringVector) and self.vector.is_transport,
                  "operator 'transport' needs a Linear-AcT vector with transport maps (steering-lab transport fit); "
                  "this one only has directions")
            check_transport_strength(self.strength)


def check_transport_strength(strength: float | Sequence[float] | torch.Tensor) -> None:
    """A transport strength is the interpolation weight lambda in [0, 1]; anything else is refused."""
    t = torch.as_tensor(strength.detach() if isinstance(strength, torch.Tensor) else strength,
                        dtype=torch.float32).reshape(-1)
    check(bool(((t >= 0) & (t <= 1)).all()),
          f"transport strength must be in [0, 1] (0 = unsteered, 1 = full transport), got {t.tolist()[:8]}")


def transport_maps(item: Steer) -> dict[int, tuple]:
    """``{layer: (scale, shift, lo, hi)}`` at the layers ``item`` steers (``lo``/``hi`` None: no support)."""
    return {k: item.vector.transport_at(k) for k in as_directions(item.vector, item.layers)}


def strength_tensor(strength: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A 1-D float32 CPU tensor of strengths (one per row, or one for all rows)."""
    t = torch.as_tensor(strength, dtype=torch.float32).detach().cpu().reshape(-1).clone()
    check(t.numel() > 0, "strength list is empty")
    check(bool(torch.isfinite(t).all()), f"strength must be finite, got {t.tolist()}")
    return t


class _PositionState:
    """Where in the sequence the current forward pass starts (for prompt/generated scopes)."""

    def __init__(self, prompt_len: int | torch.Tensor | None) -> None:
        self.thread = threading.get_ident()
        self.fixed = prompt_len is not None
        self.prompt_len = prompt_len
        self.offset = 0

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self.thread:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        offset = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            offset = int(cache.get_seq_length())
        self.offset = offset
        if not self.fixed and offset == 0 and ids is not None:
            self.prompt_len = ids.shape[1]

    def mask(self, h: torch.Tensor, scope: str) -> torch.Tensor:
        """Bool mask ``[B or 1, T, 1]`` of positions the scope covers."""
        check(self.prompt_len is not None, "scope needs a prompt length; none was seen")
        pos = torch.arange(self.offset, self.offset + h.shape[1], device=h.device)
        plen = torch.as_tensor(self.prompt_len, device=h.device).reshape(-1, 1)
        inside = pos[None, :] < plen
        if scope == "generated":
            inside = ~inside
        return inside[..., None]


class _Op:
    """One intervention at one layer, with its buffers on the block's device."""

    def __init__(self, direction: torch.Tensor, strength: torch.Tensor, operator: str, scope: str,
                 device: torch.device, dtype: torch.dtype, rows: Sequence[bool] | None = None,
                 transform: Any = None, maps: tuple | None = None) -> None:
        self.operator = operator
        self.transform = transform
        self.scope = scope
        self.rows = None if rows is None else torch.as_tensor(list(rows), dtype=torch.bool, device=device)
        d32 = direction.detach().to(device=device, dtype=torch.float32)
        norm = d32.norm()
        if operator not in ("add", "transform", "transport"):
            check(float(norm) > 0, f"cannot {operator} along a zero direction")
        if operator == "transport":  # float32 maps on the block's device; lo/hi None = no support limit
            self.maps = tuple(None if t is None else t.detach().to(device=device, dtype=torch.float32) for t in maps)
        self.unit = d32 / norm if float(norm) > 0 else d32
        self.vec = direction.detach().to(device=device, dtype=dtype)  # add uses the raw vector
        self.strength = strength.to(device)

    def coef(self, batch: int) -> torch.Tensor:
        s = self.strength
        if s.numel() != 1 and s.numel() != batch:
            raise UserError(f"{s.numel()} per-row strengths for a batch of {batch} rows")
        return s.view(-1, 1, 1)

    def apply(self, h: torch.Tensor, positions: _PositionState | None) -> torch.Tensor:
        c = self.coef(h.shape[0])
        if self.operator == "add":
            new = h + c.to(h.dtype) * self.vec.to(h.dtype)
        elif self.operator == "transform":
            new = self.transform(h, c)
            check(new.shape == h.shape, f"transform returned shape {tuple(new.shape)} for {tuple(h.shape)}")
            new = new.to(h.dtype)
        elif self.operator == "transport":
            new = torch.where(c == 0, h, apply_transport(h.float(), c, *self.maps).to(h.dtype))  # exact identity at 0
        else:
            h32 = h.float()
            proj = h32 @ self.unit  # [B, T]
            proj = proj[..., None]
            if self.operator == "ablate":
                new32 = h32 - c * proj * self.unit
            elif self.operator == "clamp":
                new32 = h32 + (c - proj) * self.unit
            else:
                new32 = _rotate(h32, proj, self.unit, c)
            new = new32.to(h.dtype)
            if self.operator in ("ablate", "rotate"):
                new = torch.where(c == 0, h, new)  # exact identity at strength 0
        if self.scope != "all":
            new = torch.where(positions.mask(h, self.scope), new, h)
        if self.rows is not None:
            check(self.rows.numel() == h.shape[0],
                  f"rows mask has {self.rows.numel()} entries for {h.shape[0]} rows")
            new = torch.where(self.rows.view(-1, 1, 1), new, h)
        return new


def apply_transport(h: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """Linear-AcT on float32 ``h``: ``(1 - c) h + c (scale h + shift)`` per unit (at c = 1 exactly
    ``scale h + shift``), units outside ``[lo, hi]`` left as they are."""
    out = (1 - c) * h + c * (scale * h + shift)
    if lo is not None:
        out = torch.where((h >= lo) & (h <= hi), out, h)
    return out


def _rotate(h: torch.Tensor, proj: torch.Tensor, unit: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Norm-preserving rotation of ``h`` toward ``unit`` by ``degrees`` in span(h, unit)."""
    ortho = h - proj * unit
    rho = ortho.norm(dim=-1, keepdim=True)
    norm = h.norm(dim=-1, keepdim=True)
    phi = torch.atan2(rho, proj)  # angle between h and unit, in [0, pi]
    new_phi = phi - degrees * (math.pi / 180.0)
    e2 = ortho / rho.clamp_min(1e-12)
    out = norm * (torch.cos(new_phi) * unit + torch.sin(new_phi) * e2)
    return torch.where(rho > 1e-12 * norm.clamp_min(1e-30), out, h)  # parallel to u: plane undefined


class _LayerHook:
    def __init__(self, ops: list[_Op], positions: _PositionState | None) -> None:
        self.ops = ops
        self.positions = positions
        self.thread = threading.get_ident()

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            return output  # another thread's forward pass (e.g. the engine or an extraction) is not ours
        h = output[0] if isinstance(output, tuple) else output
        for op in self.ops:
            h = op.apply(h, self.positions)
        if isinstance(output, tuple):
            return (h, *output[1:])
        return h


@dataclass
class SteeringHandle:
    """What ``steer`` yields: live access to strengths, and removal of the hooks."""

    model: nn.Module
    handles: list = field(default_factory=list)
    strengths: list[torch.Tensor] = field(default_factory=list)  # one per Steer, CPU master copies
    ops: list[list[_Op]] = field(default_factory=list)  # per Steer, its per-layer ops
    positions: _PositionState | None = None

    def set_strength(self, index: int, strength: float | Sequence[float] | torch.Tensor) -> None:
        """Change the strength of intervention ``index`` in place (same number of rows)."""
        new = strength_tensor(strength)
        check(new.numel() == self.strengths[index].numel(),
              f"intervention {index} has {self.strengths[index].numel()} strength(s), got {new.numel()}")
        if any(op.operator == "transport" for op in self.ops[index]):
            check_transport_strength(new)
        self.strengths[index].copy_(new)
        for op in self.ops[index]:
            op.strength.copy_(new.to(op.strength.device))

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        while self.handles:
            self.handles.pop().remove()


def _resolve_model(target: Any) -> tuple[nn.Module, nn.ModuleList]:
    from .model import LoadedModel, find_layers

    if isinstance(target, LoadedModel):
        return target.model, target.layers
    if isinstance(target, nn.Module):
        return target, find_layers(target)[1]
    raise UserError(f"cannot steer a {type(target).__name__}; pass a LoadedModel or a torch model")


def _block_dtype(block: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for p in block.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


@contextmanager
def steer(target: Any, interventions: Steer | Sequence[Steer], *,
          prompt_len: int | Sequence[int] | torch.Tensor | None = None,
          differentiable: bool = False) -> Iterator[SteeringHandle]:
    """Steer ``target`` (a LoadedModel or HF model) for the duration of the ``with`` block.

    Several interventions may target the same or different layers; at one layer they apply in
    the order given. Hooks are removed on every exit path. With ``differentiable`` the strength
    tensors are used as given (not copied), so gradients flow back to whatever produced them.
    """
    model, layers = _resolve_model(target)
    items = [interventions] if isinstance(interventions, Steer) else list(interventions)
    for item in items:
        check(isinstance(item, Steer), f"expected Steer(...), got {type(item).__name__}")
    n_layers = len(layers)
    width = _width(model)
    handle = SteeringHandle(model=model)
    needs_positions = any(item.scope != "all" for item in items)
    if needs_positions:
        plen = prompt_len
        if plen is not None and not isinstance(plen, int):
            plen = torch.as_tensor(plen, dtype=torch.long).reshape(-1)
        handle.positions = _PositionState(plen)
    per_layer: dict[int, list[_Op]] = {}
    for item in items:
        directions = as_directions(item.vector, item.layers)
        if differentiable:
            strength = torch.as_tensor(item.strength, dtype=torch.float32).reshape(-1)
        else:
            strength = strength_tensor(item.strength)
        handle.strengths.append(strength)
        maps = transport_maps(item) if item.operator == "transport" else {}
        ops = []
        for k, direction in directions.items():
            check(0 <= k < n_layers, f"layer {k} is out of range: the model has {n_layers} blocks "
                                     f"(layers 0-{n_layers - 1})")
            check(direction.shape[0] == width,
                  f"direction for layer {k} has width {direction.shape[0]} but the model's is {width}")
            block = layers[k]
            device = next((p.device for p in block.parameters()), strength.device)
            op = _Op(direction, strength if differentiable else strength.clone(), item.operator, item.scope, device,
                     _block_dtype(block, direction.dtype), item.rows, item.transform, maps.get(k))
            ops.append(op)
            per_layer.setdefault(k, []).append(op)
        handle.ops.append(ops)
    try:
        if handle.positions is not None:
            handle.handles.append(model.register_forward_pre_hook(handle.positions.pre_forward, with_kwargs=True))
        for k, ops in sorted(per_layer.items()):
            handle.handles.append(layers[k].register_forward_hook(_LayerHook(ops, handle.positions)))
        yield handle
    finally:
        handle.remove()


def _width(model: nn.Module) -> int:
    from .model import hidden_size

    return hidden_size(model.config)


@contextmanager
def project_out(modules: Sequence[nn.Module], direction: torch.Tensor, strength: float = 1.0) -> Iterator[None]:
    """Remove ``strength`` x the component along ``direction`` from the outputs of ``modules``
    (e.g. every module that writes to the residual stream: directional ablation, Arditi et al.)."""
    d32 = direction.detach().float()
    check(d32.dim() == 1 and float(d32.norm()) > 0, "ablation needs a non-zero 1-D direction")
    unit = d32 / d32.norm()
    cache: dict[torch.device, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if threading.get_ident() != owner:
            return output
        h = output[0] if isinstance(output, tuple) else output
        u = cache.get(h.device)
        if u is None:
            u = cache[h.device] = unit.to(h.device)
        check(h.shape[-1] == u.shape[0], f"ablation direction has width {u.shape[0]}, output has {h.shape[-1]}")
        h32 = h.float()
        new = (h32 - strength * (h32 @ u)[..., None] * u).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# ---- reading activations ---------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by a capture hook after the last wanted block, to skip the rest of the forward."""


class _Recorded:
    """What a recording context yields: ``outputs[k]`` is a list, one tensor per forward pass."""

    outputs: dict[int, list[torch.Tensor]]

    def last(self, k: int) -> torch.Tensor:
        return self.outputs[k][-1]

    def clear(self) -> None:
        for v in self.outputs.values():
            v.clear()


@dataclass
class Capture(_Recorded):
    """Block outputs recorded during forward passes: ``outputs[k]`` is a list, one per pass."""

    model: nn.Module
    layers: list[int]
    stop_early: bool
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def forward(self, **inputs: Any) -> Any:
        """Run ``model(**inputs)``; with ``stop_early`` the pass ends after the last wanted block."""
        try:
            return self.model(**inputs)
        except _StopForward:
            return None



@contextmanager
def capture(target: Any, layers: Sequence[int] | None = None, *, stop_early: bool = False,
            to_cpu: bool = False, fn: Any = None) -> Iterator[Capture]:
    """Record the outputs of decoder blocks ``layers`` (default all) while the block runs.

    ``fn(k, h)`` may map each output before it is stored (e.g. pooling, to save memory). With
    ``to_cpu`` stored tensors are moved to the CPU (gathering from a model split across devices).
    """
    model, blocks = _resolve_model(target)
    wanted = list(range(len(blocks))) if layers is None else sorted({int(k) for k in layers})
    for k in wanted:
        check(0 <= k < len(blocks), f"layer {k} is out of range: the model has {len(blocks)} blocks")
    cap = Capture(model=model, layers=wanted, stop_early=stop_early, outputs={k: [] for k in wanted})
    last = wanted[-1] if wanted else None
    handles = []
    owner = threading.get_ident()

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if threading.get_ident() != owner:
                return
            h = output[0] if isinstance(output, tuple) else output
            h = h.detach()
            if fn is not None:
                h = fn(k, h)
            if to_cpu:
                h = h.to("cpu")
            cap.outputs[k].append(h)
            if stop_early and k == last:
                raise _StopForward
        return hook

    try:
        for k in wanted:
            handles.append(blocks[k].register_forward_hook(make_hook(k)))
        yield cap
    finally:
        for h in handles:
            h.remove()


def hook_count(model: nn.Module, *, ours_only: bool = True) -> int:
    """Number of forward hooks and pre-hooks attached anywhere in ``model`` (for tests). By default
    only hooks that steering lab attached (their code lives in this package): transformers installs
    its own, permanent output-capturing hooks the first time a model runs with
    ``output_hidden_states=True``, and those are not ours to remove."""
    total = 0
    for m in model.modules():
        for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            if not ours_only or _is_ours(fn):
                total += 1
    return total


def _is_ours(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if module is None or module == "functools":
        module = getattr(getattr(fn, "func", None), "__module__", "") or ""
    return module.split(".")[0] == __name__.split(".")[0]


# ---- per-row steering for a batch of independent requests (used by the decode engine) --------

OPCODES = {"add": 1, "ablate": 2, "clamp": 3, "rotate": 4, "transform": 5, "transport": 6}
NO_END = 1 << 62


@dataclass
class RowOp:
    """One intervention on one batch row: a direction at one layer, its strength, operator and the
    range of positions ``[start, end)`` (position ids) where it acts."""

    direction: torch.Tensor
    strength: float
    operator: str = "add"
    start: int = 0
    end: int = NO_END
    transform: Any = None
    maps: tuple | None = None  # operator "transport": (scale, shift, lo, hi) at this layer (lo/hi may be None)


class Slot:
    """The ``j``-th intervention at one layer for every row of a batch, as device tensors: a row
    without one has opcode 0 (left exactly as it is). Strengths live in ``strength`` (updated in place)."""

    TRANSPORT = ("scale", "shift", "lo", "hi")  # [n, 1, width] float32 buffers, made when "transport" is present

    def __init__(self, ops: Sequence[RowOp | None], device: torch.device, dtype: torch.dtype, width: int) -> None:
        n = len(ops)
        self.n, self.width, self.device = n, width, device
        self.scale = self.shift = self.lo = self.hi = None
        self.opcode = torch.tensor([OPCODES[o.operator] if o is not None else 0 for o in ops], dtype=torch.long,
                                   device=device)
        self.present = {o.operator for o in ops if o is not None}
        self._fill_transport(ops)
        vecs = torch.zeros((n, width), dtype=torch.float32)
        for i, o in enumerate(ops):
            if o is not None and o.operator != "transform":
                vecs[i] = o.direction.detach().float().cpu()
        self.vec = vecs.to(device=device, dtype=dtype)[:, None, :]  # add uses the raw vector, in the model's dtype
        unit = vecs.clone()
        for i, o in enumerate(ops):
            if o is not None and o.operator not in ("add", "transform", "transport"):
                norm = unit[i].norm()
                check(float(norm) > 0, f"cannot {o.operator} along a zero direction")
                unit[i] = unit[i] / norm
        self.unit = unit.to(device)[:, None, :]
        self.strength = torch.tensor([o.strength if o is not None else 0.0 for o in ops], dtype=torch.float32,
                                     device=device)
        self.start = torch.tensor([o.start if o is not None else 0 for o in ops], dtype=torch.long, device=device)
        self.end = torch.tensor([o.end if o is not None else NO_END for o in ops], dtype=torch.long, device=device)
        self.scoped = any(o is not None and (o.start > 0 or o.end < NO_END) for o in ops)
        self.transforms = [(i, o.transform) for i, o in enumerate(ops) if o is not None and o.operator == "transform"]

    @property
    def present(self) -> set[str]:
        """Operators this slot computes (a captured graph computes exactly these)."""
        return self._present

    @present.setter
    def present(self, operators) -> None:
        self._present = set(operators)
        if "transport" in self._present and self.scale is None:  # identity maps, no support limit
            shape = (self.n, 1, self.width)
            f32 = dict(dtype=torch.float32, device=self.device)
            self.scale, self.shift = torch.ones(shape, **f32), torch.zeros(shape, **f32)
            self.lo, self.hi = torch.full(shape, -math.inf, **f32), torch.full(shape, math.inf, **f32)

    def _fill_transport(self, ops: Sequence[RowOp | None]) -> None:
        rows = [(i, o) for i, o in enumerate(ops) if o is not None and o.operator == "transport"]
        if not rows:
            return
        bufs = {name: getattr(self, name).cpu() for name in self.TRANSPORT}
        for i, o in rows:
            check(0.0 <= o.strength <= 1.0, f"transport strength must be in [0, 1], got {o.strength:g}")
            check(o.maps is not None, "a transport row needs its maps (scale, shift, lo, hi)")
            for name, t in zip(self.TRANSPORT, o.maps):
                if t is not None:
                    check(t.shape[-1] == self.width, f"transport {name} has width {t.shape[-1]}, the model's is "
                                                     f"{self.width}")
                    bufs[name][i, 0] = t.detach().float().cpu()
        for name, t in bufs.items():
            getattr(self, name).copy_(t)

    def load_(self, src: Slot) -> None:
        """Copy ``src``'s rows into this slot's buffers in place (a captured graph reads these buffers)."""
        for name in ("opcode", "vec", "unit", "strength", "start", "end") + self.TRANSPORT:
            mine, theirs = getattr(self, name), getattr(src, name)
            if mine is not None and theirs is not None:
                mine.copy_(theirs)

    def apply(self, h: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        c = self.strength.view(-1, 1, 1)
        new = h
        if "add" in self.present:
            new = torch.where((self.opcode == 1).view(-1, 1, 1), h + c.to(h.dtype) * self.vec.to(h.dtype), new)
        if self.present & {"ablate", "clamp", "rotate"}:
            h32 = h.float()
            proj = (h32 * self.unit).sum(-1, keepdim=True)
            if "ablate" in self.present:
                out = (h32 - c * proj * self.unit).to(h.dtype)
                new = torch.where(((self.opcode == 2) & (self.strength != 0)).view(-1, 1, 1), out, new)
            if "clamp" in self.present:
                out = (h32 + (c - proj) * self.unit).to(h.dtype)
                new = torch.where((self.opcode == 3).view(-1, 1, 1), out, new)
            if "rotate" in self.present:
                out = _rotate(h32, proj, self.unit, c).to(h.dtype)
                new = torch.where(((self.opcode == 4) & (self.strength != 0)).view(-1, 1, 1), out, new)
        if "transport" in self.present:
            out = apply_transport(h.float(), c, self.scale, self.shift, self.lo, self.hi).to(h.dtype)
            new = torch.where(((self.opcode == 6) & (self.strength != 0)).view(-1, 1, 1), out, new)
        for i, fn in self.transforms:
            out = fn(h[i:i + 1], c[i:i + 1])
            check(out.shape == h[i:i + 1].shape, f"transform returned shape {tuple(out.shape)}")
            new = new.clone() if new is h else new
            new[i:i + 1] = out.to(h.dtype)
        if self.scoped and pos is not None:
            inside = (pos >= self.start[:, None]) & (pos < self.end[:, None])
            new = torch.where(inside[..., None], new, h)
        return new


class BatchPlan:
    """Per-row steering of a batch: ``slots[k]`` are applied in order to the output of block ``k``.
    ``positions`` (``[B, T]`` position ids of the current forward pass) is set by the caller."""

    def __init__(self, slots: dict[int, list[Slot]]) -> None:
        self.slots = slots
        self.positions: torch.Tensor | None = None

    @classmethod
    def build(cls, target: Any, rows: Sequence[Sequence[tuple[int, RowOp]]]) -> BatchPlan:
        """``rows[i]``: the ``(layer, op)`` pairs of row ``i``, in the order they apply."""
        model, layers = _resolve_model(target)
        width = _width(model)
        per_layer: dict[int, list[list[RowOp | None]]] = {}
        for i, items in enumerate(rows):
            seen: dict[int, int] = {}
            for k, op in items:
                check(0 <= k < len(layers), f"layer {k} is out of range: the model has {len(layers)} blocks "
                                            f"(layers 0-{len(layers) - 1})")
                if op.operator != "transform":
                    check(op.direction.shape[-1] == width,
                          f"direction for layer {k} has width {op.direction.shape[-1]} but the model's is {width}")
                check(op.operator != "transport" or op.maps is not None, "a transport row needs its maps")
                j = seen.get(k, 0)
                seen[k] = j + 1
                table = per_layer.setdefault(k, [])
                while len(table) <= j:
                    table.append([None] * len(rows))
                table[j][i] = op
        slots = {}
        for k, table in sorted(per_layer.items()):
            block = layers[k]
            device = next((p.device for p in block.parameters()), torch.device("cpu"))
            dtype = _block_dtype(block, torch.float32)
            slots[k] = [Slot(ops, device, dtype, width) for ops in table]
        return cls(slots)

    def set_strength(self, layer: int, slot: int, row: int, value: float) -> None:
        self.slots[layer][slot].strength[row] = float(value)


class _PlanHook:
    def __init__(self, plan: BatchPlan, k: int) -> None:
        self.plan, self.k, self.thread = plan, k, threading.get_ident()

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            return output
        h = output[0] if isinstance(output, tuple) else output
        pos = self.plan.positions
        if pos is not None and pos.device != h.device:
            pos = pos.to(h.device)
        for slot in self.plan.slots[self.k]:
            h = slot.apply(h, pos)
        return (h, *output[1:]) if isinstance(output, tuple) else h


@contextmanager
def steer_batch(target: Any, plan: BatchPlan | None) -> Iterator[BatchPlan | None]:
    """Apply ``plan`` (per-row steering) to forward passes run by this thread inside the block;
    every hook is removed on exit."""
    if plan is None or not plan.slots:
        yield plan
        return
    _, layers = _resolve_model(target)
    handles = []
    try:
        for k in plan.slots:
            handles.append(layers[k].register_forward_hook(_PlanHook(plan, k)))
        yield plan
    finally:
        for h in handles:
            h.remove()


# ---- attention-head outputs -------------------------------------------------------------------
#
# The second hook site: the input of each block's attention output projection, ``z`` of shape
# [B, T, n_heads * head_dim], seen per head as [B, T, n_heads, head_dim]. Head h's contribution to
# the residual stream is ``z[..., h, :] @ W_O[:, h*hd:(h+1)*hd].T`` (see :func:`head_output_weight`).
# Function vectors and attribution patching read and edit heads here; no other module hooks heads.

HEAD_SITES = ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attn.c_proj",
              "attn.out_proj", "attention.dense", "attn.attention.out_proj")


def head_site(block: nn.Module) -> nn.Module:
    """The attention output projection of a decoder block (its input is the heads' outputs)."""
    for path in HEAD_SITES:
        m = block
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Module):
            return m
    raise UserError(f"cannot find the attention output projection in {type(block).__name__} "
                    f"(tried {', '.join(HEAD_SITES)})")


def head_shape(target: Any) -> tuple[int, int]:
    """``(n_heads, head_dim)`` of the model's attention (query heads)."""
    model, _ = _resolve_model(target)
    cfg = model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    check(n_heads, f"cannot tell the number of attention heads of {type(model).__name__}")
    head_dim = getattr(cfg, "head_dim", None) or _width(model) // int(n_heads)
    return int(n_heads), int(head_dim)


def head_output_weight(target: Any, layer: int) -> torch.Tensor:
    """``W_O`` of block ``layer`` as [d_model, n_heads * head_dim] (``nn.Linear`` layout; GPT-2's
    ``Conv1D`` is transposed to it)."""
    _, blocks = _resolve_model(target)
    check(0 <= layer < len(blocks), f"layer {layer} is out of range: the model has {len(blocks)} blocks")
    site = head_site(blocks[layer])
    w = site.weight
    return w.t() if type(site).__name__ == "Conv1D" else w


@dataclass
class HeadCapture(_Recorded):
    """Head outputs recorded during forward passes: ``outputs[k]`` is a list (one per pass) of
    [B, T, n_heads, head_dim] tensors."""

    layers: list[int]
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@contextmanager
def heads(target: Any, layers: Sequence[int] | None = None, *, read: bool = True,
          edit: Mapping[int, Any] | None = None, keep_grad: bool = False) -> Iterator[HeadCapture]:
    """Read and/or edit attention-head outputs of blocks ``layers`` (default all, plus every layer
    in ``edit``) for forward passes run by this thread inside the block; hooks removed on exit.

    ``edit[k](z) -> z'`` maps block k's head outputs [B, T, n_heads, head_dim] before the output
    projection (patch a head with a mean activation, zero it, add to it); ``read`` records them
    (after the edit). With ``keep_grad`` the recorded tensors stay in the autograd graph, so
    ``torch.autograd.grad(metric, cap.outputs[k])`` gives the gradient at each head (run the forward
    with grad enabled and something upstream requiring grad, e.g. ``inputs_embeds``)."""
    model, blocks = _resolve_model(target)
    edit = dict(edit or {})
    wanted = sorted(set(range(len(blocks)) if layers is None else {int(k) for k in layers}) | set(edit))
    for k in wanted:
        check(0 <= k < len(blocks), f"layer {k} is out of range: the model has {len(blocks)} blocks")
    for k, fn in edit.items():
        check(callable(fn), f"edit for layer {k} must be a callable z -> z")
    n_heads, head_dim = head_shape(model)
    cap = HeadCapture(layers=wanted, outputs={k: [] for k in wanted} if read else {})
    owner = threading.get_ident()

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if threading.get_ident() != owner:
                return None
            z = args[0] if args else kwargs["hidden_states"]
            check(z.shape[-1] == n_heads * head_dim,
                  f"block {k}: attention output has width {z.shape[-1]}, expected {n_heads} x {head_dim}")
            z4 = z.view(*z.shape[:-1], n_heads, head_dim)
            if k in edit:
                new = edit[k](z4)
                check(isinstance(new, torch.Tensor) and new.shape == z4.shape,
                      f"head edit for layer {k} must return a tensor of shape {tuple(z4.shape)}")
                z4 = new.to(z.dtype)
            if read:
                cap.outputs[k].append(z4 if keep_grad else z4.detach())
            if k not in edit and not (read and keep_grad):
                return None
            z = z4.reshape(z.shape)  # with keep_grad the recorded z4 itself feeds the projection
            return ((z, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": z})
        return hook

    handles = []
    try:
        for k in wanted:
            handles.append(head_site(blocks[k]).register_forward_pre_hook(make_hook(k), with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()


# ---- attribution patching: queries, keys, attention re-runs, per-block gradient drop ------------
#
# Used by measure/attribution.py (AtP*): the query/key projections per head (read with or without
# gradients, edit), the recorded inputs of each attention module (to re-run one attention exactly
# with a patched query or key: the QK fix), and a block whose residual contribution passes no
# gradient (GradDrop). Only architectures with separate ``q_proj``/``k_proj`` have query/key sites.

QK_SITES = (("self_attn.q_proj", "self_attn.k_proj"),)


def _path(block: nn.Module, path: str) -> nn.Module | None:
    m = block
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m if isinstance(m, nn.Module) else None


def has_qk_sites(target: Any) -> bool:
    """Whether the model's blocks have separate query and key projections (``q_proj``/``k_proj``)."""
    _, blocks = _resolve_model(target)
    return any(all(_path(blocks[0], p) is not None for p in pair) for pair in QK_SITES)


def qk_site(block: nn.Module, which: str) -> nn.Module:
    """The query (``which="q"``) or key (``"k"``) projection of a decoder block."""
    check(which in ("q", "k"), f"unknown projection {which!r} (choose q or k)")
    for pair in QK_SITES:
        m = _path(block, pair[0 if which == "q" else 1])
        if m is not None:
            return m
    raise UserError(f"cannot find separate query/key projections in {type(block).__name__} "
                    f"(tried {', '.join(p for pair in QK_SITES for p in pair)}); fused-QKV models are not supported")


def kv_heads(target: Any) -> int:
    """Number of key/value heads (grouped-query attention), the query heads' count without GQA."""
    model, _ = _resolve_model(target)
    n_heads, _ = head_shape(model)
    return int(getattr(model.config, "num_key_value_heads", None) or n_heads)


def attention_module(target: Any, layer: int) -> nn.Module:
    """The attention module of block ``layer`` (the parent of its output projection)."""
    _, blocks = _resolve_model(target)
    check(0 <= layer < len(blocks), f"layer {layer} is out of range: the model has {len(blocks)} blocks")
    for path in HEAD_SITES:
        parent, _, _ = path.rpartition(".")
        if _path(blocks[layer], path) is not None:
            return _path(blocks[layer], parent)
    raise UserError(f"cannot find the attention module of {type(blocks[layer]).__name__}")


@contextmanager
def projections(target: Any, which: str, layers: Sequence[int] | None = None, *, read: bool = True,
                edit: Mapping[int, Any] | None = None, keep_grad: bool = False) -> Iterator[HeadCapture]:
    """Read and/or edit the query (``which="q"``) or key (``"k"``) projection outputs of blocks ``layers``
    (before rotary embeddings and any q/k norm), for forward passes of this thread inside the block.

    ``edit[k](x) -> x'`` maps [B, T, n, head_dim] (n = query heads for q, key/value heads for k);
    ``read`` records the outputs (after the edit) as [B, T, n * head_dim], in the autograd graph with
    ``keep_grad``. Hooks removed on exit."""
    model, blocks = _resolve_model(target)
    edit = dict(edit or {})
    wanted = sorted(set(range(len(blocks)) if layers is None else {int(k) for k in layers}) | set(edit))
    for k in wanted:
        check(0 <= k < len(blocks), f"layer {k} is out of range: the model has {len(blocks)} blocks")
    for k, fn in edit.items():
        check(callable(fn), f"edit for layer {k} must be a callable x -> x")
    n_heads, head_dim = head_shape(model)
    n = n_heads if which == "q" else kv_heads(model)
    cap = HeadCapture(layers=wanted, outputs={k: [] for k in wanted} if read else {})
    owner = threading.get_ident()

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
            if threading.get_ident() != owner:
                return None
            check(output.shape[-1] == n * head_dim,
                  f"block {k}: {which} projection has width {output.shape[-1]}, expected {n} x {head_dim}")
            out = output
            if k in edit:
                x4 = output.view(*output.shape[:-1], n, head_dim)
                new = edit[k](x4)
                check(isinstance(new, torch.Tensor) and new.shape == x4.shape,
                      f"{which} edit for layer {k} must return a tensor of shape {tuple(x4.shape)}")
                out = new.to(output.dtype).reshape(output.shape)
            if read:
                cap.outputs[k].append(out if keep_grad else out.detach())
            return out if k in edit else None
        return hook

    handles = []
    try:
        for k in wanted:
            handles.append(qk_site(blocks[k], which).register_forward_hook(make_hook(k)))
        yield cap
    finally:
        for h in handles:
            h.remove()


@dataclass
class AttentionCalls:
    """``calls[k]``: the ``(args, kwargs)`` of each forward call of block k's attention module (tensors
    detached), so :func:`rerun_attention` can run that attention again alone."""

    calls: dict[int, list[tuple[tuple, dict]]] = field(default_factory=dict)


def _detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detached(v) for v in x)
    if isinstance(x, list):
        return [_detached(v) for v in x]
    return x


@contextmanager
def attention_calls(target: Any, layers: Sequence[int] | None = None) -> Iterator[AttentionCalls]:
    """Record the inputs of the attention modules of blocks ``layers`` (default all) for forward
    passes of this thread inside the block; hooks removed on exit."""
    _, blocks = _resolve_model(target)
    wanted = list(range(len(blocks))) if layers is None else sorted({int(k) for k in layers})
    rec = AttentionCalls(calls={k: [] for k in wanted})
    owner = threading.get_ident()

    def make_hook(k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if threading.get_ident() == owner:
                rec.calls[k].append((_detached(args), {n: _detached(v) for n, v in kwargs.items()}))
        return hook

    handles = []
    try:
        for k in wanted:
            handles.append(attention_module(target, k).register_forward_pre_hook(make_hook(k), with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def rerun_attention(target: Any, layer: int, call: tuple[tuple, dict], repeat: int = 1) -> Any:
    """Run block ``layer``'s attention module alone on a recorded call (from :func:`attention_calls`),
    its hidden states repeated ``repeat`` times along the batch (other inputs broadcast); hooks of
    :func:`heads` / :func:`projections` attached by the caller act on it as in a full pass."""
    args, kwargs = call
    module = attention_module(target, layer)
    if args:
        hs = args[0]
        args = (hs.repeat(repeat, *([1] * (hs.dim() - 1))), *args[1:])
    else:
        hs = kwargs["hidden_states"]
        kwargs = {**kwargs, "hidden_states": hs.repeat(repeat, *([1] * (hs.dim() - 1)))}
    check(hs.shape[0] == 1, "rerun_attention needs a recorded call of batch size 1")
    return module(*args, **kwargs)


@contextmanager
def drop_block_grad(target: Any, layer: int) -> Iterator[None]:
    """Block ``layer``'s residual contribution (output minus input) passes no gradient backwards; the
    forward pass is unchanged (GradDrop, Kramár et al. 2024). Hook removed on exit."""
    _, blocks = _resolve_model(target)
    check(0 <= layer < len(blocks), f"layer {layer} is out of range: the model has {len(blocks)} blocks")
    owner = threading.get_ident()

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        h = output[0] if isinstance(output, tuple) else output
        new = x + (h - x).detach()
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = blocks[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
