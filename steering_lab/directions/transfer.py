"""Command-V: carry a steering vector from a donor model to a recipient model through linear converters.

Method (Wang, Schwarzschild, Robey, Payani, Fleming, Sun, Ippolito, 2025, "Command-V: Pasting LLM Behaviors via
Activation Profiles", arXiv:2506.19140): run both models on the same profiling prompts, record the residual stream
(the output of decoder block k, our layer convention) at the last token of every prompt, and fit for each pair of
corresponding layers a linear converter ``W_k`` (``d_donor x d_recipient``) with ``A_D W_k ~= A_R``. The paper
takes ``W = pinv(A_D) A_R`` (the minimum-norm least-squares map; layers paired by relative depth). Here:

* ``ridge=0`` (default) is ordinary least squares, solved in float64. It needs more activation rows than the
  donor is wide (``rows > d_donor``), else the map is underdetermined and :func:`fit_converter` says so;
  ``ridge > 0`` adds ``ridge * mean(diag(X^T X))`` to the normal equations and works with any number of rows
  (as ``ridge -> 0`` it tends to the paper's pseudo-inverse map).
* ``center=True`` (default) fits the affine map ``(h_D - mu_D) W + mu_R`` (means kept in the file); a steering
  vector is a difference of activations, so only ``W`` acts on it. ``center=False`` is the paper's plain
  ``pinv(A_D) A_R`` form.
* To get many rows from few texts, :func:`profile_prompts` cuts every text into its word-boundary prefixes; the
  last token of each prefix is one row (in a causal model that equals the per-token activation of the full text
  when the prefix tokenizes the same way). The prefixes are plain text (no chat template) by default.

A steering vector ``v`` at donor layer ``k`` becomes ``v @ W_k`` at the matching recipient layer
(:func:`transfer_vector`), to be used with the same strength: the converter carries the scale of the recipient's
residual stream. For the operators that use only the direction (ablate, clamp, rotate) the image of the unit
direction is the natural choice but is exact only for maps that preserve angles (such as a rotation).

:func:`rotated_copy` (``rotation.py``, re-exported here) builds a recipient whose answer is known: the same model
with its residual stream rotated by a random orthogonal ``Q`` (exact after the RMSNorm gains are folded into the
weights that read them). Its logits equal the original's, its block outputs are ``h @ Q``, and a converter fitted
on it must recover ``Q``.

Files: ``NAME.safetensors`` (``converter.{k}``, ``donor_mean.{k}``, ``recipient_mean.{k}``, float32) + ``NAME.json``,
written as one unit by :func:`steering_lab.vector.write_pair` (never pickle).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..activations import Activations, collect
from ..errors import UserError, check
from ..model import LoadedModel
from ..vector import SteeringVector, _now, read_pair, write_pair
from .rotation import ROTATABLE, random_orthogonal, rotated_copy  # noqa: F401 - part of this API

log = logging.getLogger(__name__)

FORMAT = "steering_lab.converter"
PAPER = "Wang et al. 2025, Command-V, arXiv:2506.19140"
_KEY = re.compile(r"(converter|donor_mean|recipient_mean)\.(0|[1-9][0-9]{0,5})")
PROFILE_SETS = ("neutral", "harmless", "harmful", "persona", "refusals")


# ---- profiling prompts ----------------------------------------------------------------------------------
def profile_prompts(texts: Sequence[str], *, prefixes: bool = True, min_words: int = 3) -> list[str]:
    """The profiling prompts made from ``texts``: every word-boundary prefix of at least ``min_words`` words
    (``prefixes=True``; each gives one activation row, so N texts of ~12 words give ~10 N rows), or the texts
    themselves. Duplicates are dropped, order kept."""
    check(min_words >= 1, "min_words must be at least 1")
    out: dict[str, None] = {}
    for text in texts:
        words = str(text).split()
        if not words:
            continue
        if not prefixes:
            out[" ".join(words)] = None
            continue
        for n in range(min(min_words, len(words)), len(words) + 1):
            out[" ".join(words[:n])] = None
    return list(out)


def load_profile_texts(spec: str | os.PathLike | None = None) -> list[str]:
    """Texts to profile with: ``None``/``"all"`` (every bundled prompt set: neutral, harmless, harmful, persona
    questions, refusal answers), one bundled set by name, or a file (one text per line, or .jsonl with 'prompt')."""
    from .. import datasets

    sets = {"neutral": datasets.neutral_prompts, "harmless": datasets.harmless_instructions,
            "harmful": datasets.harmful_instructions, "refusals": datasets.refusal_responses,
            "persona": lambda: datasets._lines(datasets._data_text("persona_questions.txt"))}
    if spec is None or str(spec) == "all":
        return [t for name in PROFILE_SETS for t in sets[name]()]
    if str(spec) in sets:
        return sets[str(spec)]()
    if str(spec) in datasets.PROMPT_SETS:
        return datasets.load_prompts(str(spec))
    path = Path(spec).expanduser()
    check(path.is_file(), f"prompts {str(spec)[:200]!r} is neither a file nor a bundled set "
                          f"(choose all, {', '.join(sorted(set(sets) | set(datasets.PROMPT_SETS)))})")
    return datasets.load_prompts(path=path)


# ---- layers -----------------------------------------------------------------------------------------------
def match_layer(k: int, n_donor: int, n_recipient: int) -> int:
    """The recipient layer at the same relative depth as donor layer ``k`` (layer k is the output of block k,
    at depth (k+1)/n): ``round((k+1) n_R / n_D) - 1``, within range. Equal depths map k to k."""
    check(0 <= k < n_donor, f"donor layer {k} is out of range (the donor has layers 0-{n_donor - 1})")
    r = int(math.floor((k + 1) * n_recipient / n_donor + 0.5)) - 1
    return min(max(r, 0), n_recipient - 1)


def _layer_list(layers: Any, n: int, who: str) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = [int(k) for k in layers]
    check(len(out) > 0, f"no {who} layers given")
    bad = [k for k in out if not 0 <= k < n]
    check(not bad, f"{who} layer(s) {bad} out of range ({who} has layers 0-{n - 1})")
    check(len(set(out)) == len(out), f"{who} layers repeat: {out}")
    return out


# ---- the converter ----------------------------------------------------------------------------------------
@dataclass
class Converter:
    """Linear maps from donor layers to recipient layers: ``matrices[k]`` is ``[d_donor, d_recipient]`` and maps
    donor layer ``k`` to recipient layer ``layer_map[k]``; ``donor_mean``/``recipient_mean`` hold the centering
    (zeros when fitted uncentered). ``fit_error[k]``: relative residual ``|A_R - f(A_D)| / |A_R - mean|``
    (``train`` on the fitted rows, ``holdout`` on rows left out of a first fit)."""

    matrices: dict[int, torch.Tensor]
    layer_map: dict[int, int]
    donor: str
    recipient: str
    d_donor: int
    d_recipient: int
    n_donor_layers: int
    n_recipient_layers: int
    donor_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    recipient_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    fit_error: dict[int, dict[str, float]] = field(default_factory=dict)
    n_prompts: int = 0
    ridge: float = 0.0
    center: bool = True
    prompts: str = ""
    created: str = field(default_factory=_now)
    method: str = "lstsq"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(len(self.matrices) > 0, "a converter needs at least one layer")
        check(set(self.layer_map) == set(self.matrices), "converter layer map and matrices name different layers")
        for k, w in self.matrices.items():
            check(isinstance(w, torch.Tensor) and w.dim() == 2, f"converter matrix for layer {k} is not 2-D")
            check(tuple(w.shape) == (self.d_donor, self.d_recipient),
                  f"converter matrix for layer {k} has shape {tuple(w.shape)}, expected "
                  f"({self.d_donor}, {self.d_recipient})")
            check(bool(torch.isfinite(w).all()), f"converter matrix for layer {k} contains NaN or inf values")
            check(0 <= self.layer_map[k] < self.n_recipient_layers,
                  f"converter maps layer {k} to recipient layer {self.layer_map[k]}, out of range")
            check(0 <= k < self.n_donor_layers, f"converter layer {k} is out of the donor's range")
        for k in self.matrices:
            self.donor_mean.setdefault(k, torch.zeros(self.d_donor))
            self.recipient_mean.setdefault(k, torch.zeros(self.d_recipient))
        self.matrices = dict(sorted(self.matrices.items()))

    @property
    def layers(self) -> list[int]:
        """Donor layers the converter covers."""
        return list(self.matrices)

    def convert(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Donor activations ``h`` [..., d_donor] at donor ``layer`` -> predicted recipient activations."""
        check(layer in self.matrices, f"the converter has no donor layer {layer} (it has {self.layers})")
        check(h.shape[-1] == self.d_donor, f"activations of width {h.shape[-1]}; the donor's width is {self.d_donor}")
        w = self.matrices[layer]
        return (h.float() - self.donor_mean[layer]) @ w + self.recipient_mean[layer]

    def check_models(self, donor: LoadedModel | None = None, recipient: LoadedModel | None = None,
                     *, names: bool = True) -> None:
        """Raise :class:`UserError` saying what does not match: width, depth, and (``names``) model names."""
        for lm, who, d, n, name in ((donor, "donor", self.d_donor, self.n_donor_layers, self.donor),
                                    (recipient, "recipient", self.d_recipient, self.n_recipient_layers,
                                     self.recipient)):
            if lm is None:
                continue
            check(lm.d_model == d, f"the converter's {who} has d_model {d} ({name}) but {lm.name} has {lm.d_model}")
            check(lm.n_layers == n, f"the converter's {who} has {n} layers ({name}) but {lm.name} has {lm.n_layers}")
            check(not names or lm.name == name,
                  f"the converter was fitted with {who} {name!r}, not {lm.name!r}")

    # ---- files ----------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"kind": "converter", "method": self.method, "paper": PAPER, "donor": self.donor,
                "recipient": self.recipient, "d_donor": self.d_donor, "d_recipient": self.d_recipient,
                "n_donor_layers": self.n_donor_layers, "n_recipient_layers": self.n_recipient_layers,
                "layer_map": {str(k): v for k, v in self.layer_map.items()},
                "fit_error": {str(k): v for k, v in self.fit_error.items()}, "n_prompts": self.n_prompts,
                "ridge": self.ridge, "center": self.center, "prompts": self.prompts, "created": self.created,
                **self.extra}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.matrices:
            out[f"converter.{k}"] = self.matrices[k]
            out[f"donor_mean.{k}"] = self.donor_mean[k]
            out[f"recipient_mean.{k}"] = self.recipient_mean[k]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json`` atomically as one unit (float32); returns PATH."""
        return write_pair(path, self.tensors(), self.metadata(), FORMAT, "converter")

    @classmethod
    def load(cls, path: str | os.PathLike, donor: LoadedModel | None = None,
             recipient: LoadedModel | None = None, *, label: str | None = None) -> Converter:
        """Load a converter pair (never unpickles); checks it against ``donor``/``recipient`` when given."""
        base, raw, meta = read_pair(path, "converter", need_json=False, label=label)
        where = label or str(base.with_suffix(".safetensors"))
        conv = cls.from_parts(raw, meta, where)
        conv.check_models(donor, recipient)
        return conv

    @classmethod
    def from_parts(cls, raw: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> Converter:
        check(meta.get("kind") == "converter", f"{where} is not a converter (its metadata has no kind 'converter')")
        parts: dict[str, dict[int, torch.Tensor]] = {"converter": {}, "donor_mean": {}, "recipient_mean": {}}
        for key, t in raw.items():
            m = _KEY.fullmatch(key)
            check(m is not None, f"{where}: unexpected tensor {key!r}")
            check(t.is_floating_point(), f"{where}: {key} has dtype {t.dtype}, expected a float")
            parts[m.group(1)][int(m.group(2))] = t.float()
        try:
            ints = {k: int(meta[k]) for k in ("d_donor", "d_recipient", "n_donor_layers", "n_recipient_layers")}
            layer_map = {int(k): int(v) for k, v in dict(meta["layer_map"]).items()}
            fit_error = {int(k): {str(a): float(b) for a, b in dict(v).items()}
                         for k, v in dict(meta.get("fit_error") or {}).items()}
            known = dict(donor=str(meta["donor"]), recipient=str(meta["recipient"]),
                         n_prompts=int(meta.get("n_prompts", 0)), ridge=float(meta.get("ridge", 0.0)),
                         center=bool(meta.get("center", True)), prompts=str(meta.get("prompts", "")),
                         created=str(meta.get("created", "")), method=str(meta.get("method", "lstsq")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: converter metadata is incomplete or malformed ({type(exc).__name__}: "
                            f"{str(exc)[:100]})") from None
        check(set(parts["converter"]) == set(layer_map),
              f"{where}: tensors cover layers {sorted(parts['converter'])} but the layer map {sorted(layer_map)}")
        std = {"kind", "paper", "layer_map", "fit_error", *ints, *known}
        extra = {k: v for k, v in meta.items() if k not in std}
        return cls(matrices=parts["converter"], layer_map=layer_map, donor_mean=parts["donor_mean"],
                   recipient_mean=parts["recipient_mean"], fit_error=fit_error, extra=extra, **ints, **known)


# ---- fitting ----------------------------------------------------------------------------------------------
def solve_map(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0,
              center: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, mu_x, mu_y)`` minimising ``|(x - mu_x) W + mu_y - y|^2 + lam |W|^2`` in float64, with
    ``lam = ridge * mean(diag(Xc^T Xc))`` (``ridge=0``: plain least squares; needs ``rows > width``)."""
    x64, y64 = x.double(), y.double()
    mu_x = x64.mean(0) if center else torch.zeros(x64.shape[1], dtype=torch.float64)
    mu_y = y64.mean(0) if center else torch.zeros(y64.shape[1], dtype=torch.float64)
    xc, yc = x64 - mu_x, y64 - mu_y
    if ridge > 0:
        gram = xc.T @ xc
        lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), xc.T @ yc)
    else:
        w = torch.linalg.lstsq(xc, yc, driver="gelsd").solution
    return w, mu_x, mu_y


def relative_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mu_x: torch.Tensor,
                   mu_y: torch.Tensor) -> float:
    """``|y - ((x - mu_x) W + mu_y)|_F / |y - mean(y)|_F`` (0 = perfect, 1 = no better than the mean)."""
    y64 = y.double()
    pred = (x.double() - mu_x) @ w + mu_y
    denom = float((y64 - y64.mean(0)).norm())
    return float((y64 - pred).norm()) / max(denom, 1e-30)


def fit_converter(donor_lm: LoadedModel, recipient_lm: LoadedModel, prompts: Sequence[str],
                  donor_layers: Sequence[int] | int | None = None, recipient_layers: Sequence[int] | int | None = None,
                  *, ridge: float = 0.0, center: bool = True, holdout: float = 0.1, chat: bool = False,
                  batch_size: int = 16, progress: bool = False, prompts_name: str = "",
                  on_step: Any = None) -> Converter:
    """Fit one linear converter per donor layer from both models' last-token activations on ``prompts``.

    ``donor_layers``: default all; ``recipient_layers``: default the same relative depth (:func:`match_layer`),
    else one per donor layer. ``holdout``: the fraction of rows left out of a first fit to measure
    ``fit_error[k]["holdout"]`` (the saved map is then refitted on all rows; 0 skips it). ``on_step(i, n, what)``
    is called as work proceeds (the app's progress bar); ``progress`` shows tqdm bars.
    """
    check(isinstance(donor_lm, LoadedModel) and isinstance(recipient_lm, LoadedModel),
          "fit_converter needs two LoadedModels (load them with steering_lab.model.load_model)")
    check(isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0, "ridge must be a number >= 0")
    check(0 <= holdout < 1, "holdout must be in [0, 1)")
    prompts = [str(p) for p in prompts if str(p).strip()]
    d_layers = _layer_list(donor_layers, donor_lm.n_layers, "donor")
    if recipient_layers is None:
        r_layers = [match_layer(k, donor_lm.n_layers, recipient_lm.n_layers) for k in d_layers]
    else:
        r_layers = [int(k) for k in ([recipient_layers] if isinstance(recipient_layers, int) else recipient_layers)]
        check(len(r_layers) == len(d_layers),
              f"{len(d_layers)} donor layers but {len(r_layers)} recipient layers (give one per donor layer)")
        bad = [k for k in r_layers if not 0 <= k < recipient_lm.n_layers]
        check(not bad, f"recipient layer(s) {bad} out of range (recipient has layers 0-{recipient_lm.n_layers - 1})")
    n, width = len(prompts), donor_lm.d_model
    need = width + (1 if center else 0) + 1
    check(n >= 2, f"{n} profiling prompt(s): a converter needs many more (at least {need} for an exact fit)")
    if ridge == 0:
        check(n >= need, f"{n} profiling prompts give {n} activation rows, but an exact least-squares map from the "
                         f"donor's {width} dimensions needs at least {need}: give more prompts (e.g. "
                         f"profile_prompts(texts) cuts texts into prefixes), or pass ridge > 0 (e.g. 1e-3)")
    step = on_step or (lambda i, total, what: None)
    step(0, 3, f"donor activations ({n} prompts)")
    acts_d = collect(donor_lm, prompts, layers=d_layers, position="last", chat=chat, batch_size=batch_size,
                     progress=progress, desc="donor activations")
    step(1, 3, f"recipient activations ({n} prompts)")
    acts_r = collect(recipient_lm, prompts, layers=sorted(set(r_layers)), position="last", chat=chat,
                     batch_size=batch_size, progress=progress, desc="recipient activations")
    step(2, 3, "solving")
    conv = converter_from_activations(donor_lm, recipient_lm, acts_d, acts_r, dict(zip(d_layers, r_layers)),
                                      ridge=ridge, center=center, holdout=holdout, prompts_name=prompts_name)
    conv.extra["chat"] = chat
    step(3, 3, "done")
    return conv


def converter_from_activations(donor_lm: LoadedModel, recipient_lm: LoadedModel, acts_d: Activations,
                               acts_r: Activations, layer_map: dict[int, int], *, ridge: float = 0.0,
                               center: bool = True, holdout: float = 0.1, prompts_name: str = "") -> Converter:
    """The solving half of :func:`fit_converter`, from activations already collected (row i of both = prompt i)."""
    n = acts_d.acts.shape[0]
    check(acts_r.acts.shape[0] == n, f"{n} donor rows but {acts_r.acts.shape[0]} recipient rows")
    need = donor_lm.d_model + (1 if center else 0) + 1
    check(ridge > 0 or n >= need, f"{n} activation rows; an exact least-squares map needs at least {need} "
                                  "(or pass ridge > 0)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = int(round(holdout * n))
    if ridge == 0 and n - n_test < need:
        n_test = 0  # the held-out fit would be underdetermined: report the in-sample error only
    test, train = order[:n_test], order[n_test:]
    matrices, d_mean, r_mean, errors = {}, {}, {}, {}
    for k, r in layer_map.items():
        x, y = acts_d.at(k), acts_r.at(r)
        err: dict[str, float] = {}
        if n_test > 0:
            w, mx, my = solve_map(x[train], y[train], ridge=ridge, center=center)
            err["holdout"] = relative_error(x[test], y[test], w, mx, my)
        w, mx, my = solve_map(x, y, ridge=ridge, center=center)
        err["train"] = relative_error(x, y, w, mx, my)
        matrices[k], d_mean[k], r_mean[k] = w.float(), mx.float(), my.float()
        errors[k] = err
    return Converter(matrices=matrices, layer_map=dict(layer_map), donor=donor_lm.name,
                     recipient=recipient_lm.name, d_donor=donor_lm.d_model, d_recipient=recipient_lm.d_model,
                     n_donor_layers=donor_lm.n_layers, n_recipient_layers=recipient_lm.n_layers, donor_mean=d_mean,
                     recipient_mean=r_mean, fit_error=errors, n_prompts=n, ridge=float(ridge), center=center,
                     prompts=prompts_name, method="ridge" if ridge > 0 else "lstsq",
                     extra={"position": acts_d.position, "n_holdout": n_test})


# ---- transferring a vector --------------------------------------------------------------------------------
def transfer_vector(vector: SteeringVector, converter: Converter, *, layers: Sequence[int] | int | None = None,
                    check_model: bool = True, converter_name: str = "") -> SteeringVector:
    """``vector`` (made on the donor) as a vector for the recipient: ``v_k @ W_k`` at recipient layer
    ``layer_map[k]`` for each donor layer ``k`` the vector and the converter share (``layers`` picks some).
    When several donor layers land on one recipient layer, the one closest in relative depth is used.
    The recommended layer follows the map; the recommended strength is kept (the map carries the scale)."""
    check(isinstance(vector, SteeringVector), "transfer_vector needs a SteeringVector")
    check(vector.d_model == converter.d_donor,
          f"the vector has width {vector.d_model} but the converter's donor ({converter.donor}) has "
          f"{converter.d_donor}")
    if check_model and vector.model and converter.donor:
        check(vector.model == converter.donor,
              f"the vector was made on {vector.model!r} but the converter's donor is {converter.donor!r} "
              "(pass check_model=False if they are the same model under two names)")
    if vector.n_layers is not None:
        check(vector.n_layers == converter.n_donor_layers,
              f"the vector was made for {vector.n_layers} layers but the converter's donor has "
              f"{converter.n_donor_layers}")
    wanted = vector.layers if layers is None else _layer_list(layers, converter.n_donor_layers, "donor")
    shared = [k for k in wanted if k in converter.matrices and k in vector.directions]
    check(bool(shared), f"the vector's layers {wanted} and the converter's {converter.layers} have none in common")
    best: dict[int, int] = {}  # recipient layer -> donor layer
    for k in shared:
        r = converter.layer_map[k]
        depth = abs((k + 1) / converter.n_donor_layers - (r + 1) / converter.n_recipient_layers)
        if r not in best or depth < abs((best[r] + 1) / converter.n_donor_layers
                                        - (r + 1) / converter.n_recipient_layers):
            best[r] = k
    dropped = sorted(set(shared) - set(best.values()))
    if dropped:
        log.info("donor layers %s share a recipient layer with a closer donor layer; not transferred", dropped)
    dirs = {r: (vector.directions[k].double() @ converter.matrices[k].double()).float() for r, k in best.items()}
    rec = vector.recommended_layer
    rec_r = converter.layer_map.get(rec) if rec is not None and rec in best.values() else None
    if rec_r is None and rec is not None:
        rec_r = min(best, key=lambda r: abs(best[r] - rec))
    source_norms = {k: float(vector.directions[k].norm()) for k in best.values()}
    info = {
        "donor_model": converter.donor, "converter": converter_name or f"{converter.donor} -> {converter.recipient}",
        "converter_created": converter.created, "converter_method": converter.method,
        "layer_map": {str(k): r for r, k in sorted(best.items())},
        "fit_error": {str(k): converter.fit_error.get(k, {}) for k in sorted(best.values())},
        "norm_ratio": {str(r): float(dirs[r].norm()) / max(source_norms[k], 1e-30) for r, k in best.items()},
        "source_method": vector.method, "paper": PAPER}
    extra = {k: v for k, v in vector.extra.items() if k not in ("transfer", "layer_scan", "raw_norms")}
    extra["transfer"] = info
    desc = f"{vector.description} [transferred from {converter.donor} by Command-V]".strip()
    return SteeringVector(directions=dirs, model=converter.recipient, d_model=converter.d_recipient,
                          n_layers=converter.n_recipient_layers, method=f"transfer({vector.method or 'vector'})",
                          dataset=vector.dataset, recommended_layer=rec_r,
                          recommended_strength=vector.recommended_strength, normalized=False, description=desc,
                          extra=extra)
