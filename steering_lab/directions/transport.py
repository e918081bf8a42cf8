"""Linear-AcT: per-unit affine transport maps between activation distributions.

After Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations"
(2024, arXiv 2410.23054; reference code apple/ml-act). For every unit ``i`` (dimension) of the
residual stream at a layer, the 1-D optimal transport from the *source* distribution (activations on
the behaviour to move away from) to the *target* distribution is estimated from samples: both sides
are sorted (1-D OT pairs the i-th smallest source value with the i-th smallest target value) and an
affine map ``t ~ a s + b`` is fitted to the sorted pairs by least squares
(``a = cov(s, t) / var(s)``, ``b = mean(t) - a mean(s)``; ``a >= 0`` since both are sorted). It is
applied with a strength ``lambda`` in [0, 1] that interpolates between identity and full transport:
``h' = (1 - lambda) h + lambda (a h + b)`` (the ``transport`` operator in ``intervene.py``).

Choices, as in the paper and its code unless said otherwise:

* **Pooling**: one sample per text, the mean over its tokens (``response_mean`` for prompt +
  response contrast sets, ``mean`` over the prompt tokens otherwise); the maps are applied to every
  token. Other positions can be asked for.
* **Transport support** (on by default, the code's ``q_0_100``): a unit is transported only where its
  value lies within ``[min, max]`` of the source samples (inclusive here; the reference code uses
  strict bounds), else left as it is. This keeps the maps off values they were never fitted on
  (the first token's huge attention-sink activations, say). ``support=False`` transports everywhere.
* **Causal (incremental) estimation** (on by default, the code's ``incr``): layers are fitted in order
  and the source activations of layer k are collected with the maps of the earlier layers applied
  at full strength, so each map corrects what the earlier ones left. Unlike the reference code (which
  runs every text, both classes, through the earlier maps), only the source side is transported: the
  target stays the unsteered model's distribution of the target class.
* **Where**: the paper transports layer-norm outputs of every block (Gemma-2, Llama-3: MLP
  projections); here the residual stream (decoder-block outputs, our layer convention), at the
  layers asked for (default: every block).
* **Unequal sample counts**: the smaller side's empirical quantile function is read (linear
  interpolation) at the larger side's ``n`` levels; with equal counts this is plain sorting.

The artifact is a :class:`~steering_lab.vector.SteeringVector` with ``method: "linear_act"``: per
layer ``transport.scale.{k}``, ``transport.shift.{k}`` (and ``transport.lo/hi.{k}`` with support) next
to ``direction.{k}`` = the mean shift the map makes on the source, ``mean(target) - mean(source)``
(with causal estimation: what remains at layer k after the earlier maps), so that ``add`` at strength
1 on all its layers is the paper's mean-only transport and add-style tools still see a direction.
Its recommended strength is 1 (full transport) and, with several layers, no recommended layer: it
steers at all of them by default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..activations import Activations, collect
from ..datasets import ContrastSet
from ..errors import check
from ..extract import parse_layers
from ..intervene import Steer, apply_transport, steer
from ..model import LoadedModel
from ..vector import SteeringVector

log = logging.getLogger(__name__)

METHOD = "linear_act"
TOWARD = ("positive", "negative")


@dataclass
class TransportMap:
    """One layer's maps: ``h -> scale * h + shift`` per unit, only inside ``[lo, hi]`` (when set)."""

    scale: torch.Tensor
    shift: torch.Tensor
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in a vector file (``transport.<part>.<layer>``)."""
        out = {"scale": self.scale, "shift": self.shift}
        if self.lo is not None:
            out.update(lo=self.lo, hi=self.hi)
        return out

    def apply(self, h: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``(1 - strength) h + strength (scale h + shift)`` per unit, outside ``[lo, hi]`` the identity
        (float32; the ``transport`` operator's own arithmetic)."""
        check(0.0 <= strength <= 1.0, f"transport strength must be in [0, 1], got {strength:g}")
        h32 = h.float()
        if strength == 0:
            return h32
        return apply_transport(h32, torch.tensor(float(strength)), self.scale, self.shift, self.lo, self.hi)


def _check_acts(x: torch.Tensor, what: str) -> None:
    check(isinstance(x, torch.Tensor), f"{what} activations must be a tensor")
    check(x.dim() == 2, f"{what} activations must be [N, d_model], got shape {tuple(x.shape)}")
    check(x.shape[0] > 0, f"no {what} activations (the {what} set is empty)")
    check(x.shape[1] > 0, f"{what} activations have width 0")
    check(x.is_floating_point(), f"{what} activations have dtype {x.dtype}, expected floats")
    check(bool(torch.isfinite(x).all()), f"{what} activations contain NaN or inf values")


def _quantiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """The empirical quantile function of each column of ``x`` ([m, d], float64) at ``n`` levels
    ``(i + 0.5) / n``, linear between order statistics; ``n == m`` gives ``x`` sorted, exactly."""
    xs, _ = torch.sort(x, dim=0)
    m = xs.shape[0]
    if m == n:
        return xs
    pos = ((torch.arange(n, dtype=torch.float64) + 0.5) * (m / n) - 0.5).clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(m - 1)
    w = (pos - lo)[:, None]
    return xs[lo] * (1 - w) + xs[hi] * w


def sorted_pairs(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, the 1-D optimal-transport pairing of source and target samples: both sorted, as
    ``[n, d]`` float64 with ``n`` = the larger sample count (the smaller side's quantiles are
    interpolated)."""
    n = max(source.shape[0], target.shape[0])
    return _quantiles(source.double(), n), _quantiles(target.double(), n)


def fit_transport(pos_acts: torch.Tensor, neg_acts: torch.Tensor, *, support: bool = True,
                  toward: str = "positive") -> TransportMap:
    """Linear-AcT map of one layer from pooled activations ``pos [N, d]`` and ``neg [M, d]``.

    ``toward="positive"`` (default) transports the negative class (source) onto the positive one
    (target); ``"negative"`` the other way. Least squares of the sorted target samples on the sorted
    source samples, per unit; a unit whose source values are all equal gets ``scale = 1`` (a pure
    shift of the means). With ``support`` the source's per-unit ``[min, max]`` is kept as ``lo``/``hi``.
    """
    check(toward in TOWARD, f"toward must be one of {', '.join(TOWARD)}, got {toward!r}")
    _check_acts(pos_acts, "positive")
    _check_acts(neg_acts, "negative")
    check(pos_acts.shape[1] == neg_acts.shape[1],
          f"width mismatch: positive activations have {pos_acts.shape[1]} units, negative {neg_acts.shape[1]}")
    source, target = (neg_acts, pos_acts) if toward == "positive" else (pos_acts, neg_acts)
    s, t = sorted_pairs(source, target)
    ms, mt = s.mean(0), t.mean(0)
    ds, dt = s - ms, t - mt
    var = (ds * ds).mean(0)
    cov = (ds * dt).mean(0)
    flat = var <= 1e-12 * (1.0 + ms * ms)  # a constant source unit: nothing to scale, shift the mean
    scale = torch.where(flat, torch.ones_like(var), cov / torch.where(flat, torch.ones_like(var), var))
    shift = mt - scale * ms
    lo = hi = None
    if support:
        lo, hi = source.double().amin(0).float(), source.double().amax(0).float()
    out = TransportMap(scale=scale.float(), shift=shift.float(), lo=lo, hi=hi)
    check(bool(torch.isfinite(out.scale).all() and torch.isfinite(out.shift).all()),
          "the fitted transport map is not finite (activations too large for float32?)")
    return out


def _default_position(contrast: ContrastSet) -> str:
    return "response_mean" if contrast.prompts is not None else "mean"


def fit_linear_act(lm: LoadedModel, contrast: ContrastSet, *, layers: Sequence[int] | str | None = None,
                   position: str | None = None, toward: str = "positive", causal: bool = True,
                   support: bool = True, chat: bool = True, batch_size: int = 8, progress: bool = False,
                   description: str | None = None) -> SteeringVector:
    """Fit Linear-AcT maps from ``contrast`` at ``layers`` (default all; ``"4-12"`` or a list) and
    return them as a vector (see the module docstring for pooling, support and causal estimation).

    Activations are collected with :func:`steering_lab.activations.collect` exactly as ``extract``
    does; with ``causal`` the source side is collected once more per layer after the first, with the
    maps fitted so far applied (each pass stops after the layer it reads).
    """
    check(toward in TOWARD, f"toward must be one of {', '.join(TOWARD)}, got {toward!r}")
    wanted = parse_layers(layers, lm.n_layers) or list(range(lm.n_layers))
    position = position or _default_position(contrast)
    if toward == "positive":
        src_texts, tgt_texts, src_label, tgt_label = contrast.negative, contrast.positive, *contrast.labels[::-1]
    else:
        src_texts, tgt_texts, src_label, tgt_label = contrast.positive, contrast.negative, *contrast.labels

    def gather(texts: Sequence[str], at: list[int], desc: str, steering: Steer | None = None) -> Activations:
        prompts = contrast.prompts if contrast.prompts is not None else list(texts)
        responses = list(texts) if contrast.prompts is not None else None
        with steer(lm, steering) if steering is not None else nullcontext():
            return collect(lm, prompts, responses, layers=at, position=position, chat=chat, batch_size=batch_size,
                           progress=progress, desc=desc)

    target = gather(tgt_texts, wanted, f"target ({tgt_label})")
    source0 = gather(src_texts, wanted, f"source ({src_label})")
    maps: dict[int, TransportMap] = {}
    directions: dict[int, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for k in tqdm(wanted, desc="Linear-AcT layers", disable=not progress, leave=False):
        if causal and maps:
            so_far = _vector(directions, maps, lm)
            src = gather(src_texts, [k], f"source at layer {k}",
                         Steer(so_far, 1.0, layers=list(maps), operator="transport")).at(k)
        else:
            src = source0.at(k)
        tgt = target.at(k)
        m = fit_transport(tgt, src, support=support, toward="positive")  # (target, source) in the positive slot
        maps[k] = m
        directions[k] = (tgt.double().mean(0) - src.double().mean(0)).float()
        stats[str(k)] = {"shift_norm": round(float(directions[k].norm()), 4),
                         "median_scale": round(float(m.scale.median()), 4),
                         "token_norm": round(float(target.token_norms[:, target.layers.index(k)].median()), 4)}
    vec = _vector(directions, maps, lm)
    vec.dataset = contrast.name
    vec.description = description or f"{contrast.name}: Linear-AcT transport {src_label} -> {tgt_label}"
    vec.extra = {"position": position, "chat": chat, "labels": [tgt_label, src_label],
                 "model_type": getattr(lm.model.config, "model_type", None),
                 "n_positive": len(contrast.positive), "n_negative": len(contrast.negative),
                 METHOD: {"source": src_label, "target": tgt_label, "toward": toward, "support": support,
                          "causal": causal, "pooling": position, "strength": "lambda in [0, 1]",
                          "paper": "arXiv:2410.23054", "layers": stats}}
    return vec


def _vector(directions: dict[int, torch.Tensor], maps: dict[int, TransportMap], lm: LoadedModel) -> SteeringVector:
    layers = sorted(directions)
    return SteeringVector(directions=dict(directions), model=lm.name, d_model=lm.d_model, n_layers=lm.n_layers,
                          method=METHOD, recommended_layer=layers[0] if len(layers) == 1 else None,
                          recommended_strength=1.0, normalized=False,
                          transport={k: maps[k].parts() for k in layers})
