"""Steering that decides per prompt whether (and how hard) to steer.

* **Lightweight controller** (after "Guiding Giants"): a small torch network reads pooled
  activations of a few layers of the prompt and predicts a global scale in [0, 1] and per-layer
  weights in [0, 1] for a steering vector applied across several layers during generation
  (strength at layer l = scale x weight_l x base_strength). Trained on harmful vs harmless
  prompts: on harmful ones the steered model should continue with a refusal (teacher-forced
  cross-entropy through the frozen LM, so gradients shape the per-layer weights), on harmless
  ones it should keep its own answer; the scale also gets a gating loss. Saved as safetensors + json.
* **Conditional activation steering** (CAST): a condition direction and a threshold on the
  cosine similarity of the prompt's pooled activation at one layer decide whether the behaviour
  vector is applied. Saved as safetensors + json like the controller.

Thresholds (the controller's gate, the condition's cut) are calibrated on a validation split with
:func:`calibrate_threshold`: the highest rate on the positive (harmful) prompts subject to a rate of
at most ``max_negative_rate`` on the negative (harmless) ones, read off ``sklearn.metrics.roc_curve``.
Artifacts record which split every number comes from and that the selection did not see the test split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import collect, pad_left
from .errors import UserError, check
from .intervene import Steer, steer
from .model import LoadedModel
from .vector import SteeringVector, _now, base_path, commit_pair, encode_pair, read_pair

# ---- threshold calibration ----------------------------------------------------------------------

THRESHOLD_RULE = ("highest applied rate on harmful prompts subject to applied rate <= {rate:g} on harmless "
                  "prompts of the validation split (sklearn.metrics.roc_curve); the cut sits halfway between "
                  "the chosen score and the next lower one")


def calibrate_threshold(positive: torch.Tensor | Sequence[float], negative: torch.Tensor | Sequence[float], *,
                        max_negative_rate: float = 0.05) -> dict[str, Any]:
    """Pick a cut on scores (higher = positive): the largest positive rate with a negative rate of at most
    ``max_negative_rate``, both measured on these (validation) scores. A score counts as positive when
    ``score >= threshold`` (equivalently ``> threshold``: the cut lies strictly between two observed scores).

    Returns ``threshold``, the rates it gives on these scores, their AUROC and the rule, all of this split."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    pos = np.asarray(torch.as_tensor(positive, dtype=torch.float64).flatten().cpu())
    neg = np.asarray(torch.as_tensor(negative, dtype=torch.float64).flatten().cpu())
    check(pos.size > 0 and neg.size > 0, "calibration needs positive and negative scores")
    check(bool(np.isfinite(pos).all() and np.isfinite(neg).all()), "calibration scores must be finite")
    check(0 <= max_negative_rate <= 1, "max_negative_rate must be in [0, 1]")
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    ok = np.flatnonzero(fpr <= max_negative_rate + 1e-12)  # index 0 (nothing positive) always qualifies
    i = int(ok[np.argmax(tpr[ok])])  # first index reaching the best rate: the lowest negative rate for it
    scores = np.unique(np.r_[pos, neg])
    if i == 0:
        threshold = float(scores[-1]) + max(1e-6, 1e-6 * abs(float(scores[-1])))
    else:
        below = scores[scores < thr[i]]
        threshold = float((thr[i] + below[-1]) / 2) if below.size else float(thr[i]) - max(1e-6, 1e-6 * abs(thr[i]))
    return {"threshold": threshold, "positive_rate": float((pos >= threshold).mean()),
            "negative_rate": float((neg >= threshold).mean()), "auroc": float(roc_auc_score(y, np.r_[pos, neg])),
            "max_negative_rate": float(max_negative_rate), "n_positive": int(pos.size), "n_negative": int(neg.size),
            "rule": THRESHOLD_RULE.format(rate=max_negative_rate)}


def gate_rates(positive: torch.Tensor, negative: torch.Tensor, threshold: float, strict: bool = False) -> dict:
    """Applied rates on positive (harmful) and negative (harmless) scores at ``threshold`` (``>`` when
    ``strict``, else ``>=``), and the scores' AUROC (``sklearn.metrics.roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    pos, neg = torch.as_tensor(positive).float().flatten(), torch.as_tensor(negative).float().flatten()
    on_p, on_n = (pos > threshold, neg > threshold) if strict else (pos >= threshold, neg >= threshold)
    return {"applied_harmful": float(on_p.float().mean()), "applied_harmless": float(on_n.float().mean()),
            "auroc": float(roc_auc_score([1] * len(pos) + [0] * len(neg), torch.cat([pos, neg]).tolist())),
            "n_harmful": len(pos), "n_harmless": len(neg)}


# ---- the controller network ---------------------------------------------------------------------

class ControllerNet(nn.Module):
    """Standardise the pooled activations (statistics of the training prompts, saved with the
    weights), one hidden layer, then a gate (global scale) and per-layer weights, all in [0, 1]."""

    def __init__(self, n_inputs: int, d_model: int, n_steer: int, hidden: int = 64) -> None:
        super().__init__()
        width = n_inputs * d_model
        self.register_buffer("in_mean", torch.zeros(width))
        self.register_buffer("in_scale", torch.ones(width))
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1 + n_steer))

    def set_input_stats(self, pooled: torch.Tensor) -> None:
        flat = pooled.flatten(1).float()
        self.in_mean.copy_(flat.mean(0))
        self.in_scale.copy_(flat.std(0).clamp_min(1e-4) if flat.shape[0] > 1 else torch.ones_like(self.in_scale))

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pooled [B, n_inputs, d]`` -> ``(scale [B], weights [B, n_steer])``, both in [0, 1]."""
        x = (pooled.flatten(1).float() - self.in_mean) / self.in_scale
        out = self.body(x)
        return torch.sigmoid(out[:, 0]), torch.sigmoid(out[:, 1:])


@dataclass
class Controller:
    net: ControllerNet
    input_layers: list[int]
    steer_layers: list[int]
    vector: SteeringVector
    base_strength: float
    pooling: str = "last"
    threshold: float = 0.5  # "steering applied" when scale >= threshold
    model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    def check_model(self, lm: LoadedModel) -> None:
        self.vector.check_model(lm, self.steer_layers)
        bad = [k for k in self.input_layers if not 0 <= k < lm.n_layers]
        check(not bad, f"controller reads layer(s) {bad} but {lm.name} has {lm.n_layers} blocks")

    def pooled(self, lm: LoadedModel, prompts: Sequence[str], chat: bool = True) -> torch.Tensor:
        return collect(lm, prompts, layers=self.input_layers, position=self.pooling, chat=chat).acts

    def decide(self, lm: LoadedModel, prompts: Sequence[str], chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per prompt: (scale [B], weights [B, n_steer]) from a short forward up to the last input layer."""
        self.check_model(lm)
        with torch.no_grad():
            return self.net(self.pooled(lm, prompts, chat))

    def gate(self, scale: torch.Tensor) -> torch.Tensor:
        """Per prompt: is steering applied (``scale >= threshold``)?"""
        return scale >= self.threshold

    def applied(self, lm: LoadedModel, prompts: Sequence[str], chat: bool = True) -> torch.Tensor:
        """Per prompt (bool [B]): does the controller steer it?"""
        return self.gate(self.decide(lm, prompts, chat)[0])

    def steering(self, scale: torch.Tensor, weights: torch.Tensor) -> list[Steer]:
        """One Steer per steered layer, with per-row strengths; rows whose scale is below the gate
        threshold get exactly 0 (steering is applied or not, as :meth:`applied` reports)."""
        kept = torch.where(self.gate(scale), scale, torch.zeros_like(scale))
        strengths = kept[:, None] * weights * self.base_strength  # [B, n_steer]
        return [Steer(self.vector, strengths[:, j], layers=[k]) for j, k in enumerate(self.steer_layers)]

    def calibrate(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], *,
                  max_negative_rate: float = 0.05, split: str = "val") -> dict[str, Any]:
        """Set the gate threshold on a validation split (see :func:`calibrate_threshold`) and record it in
        ``metrics['threshold_selection']`` with the split's name; returns that record."""
        scale, _ = self.decide(lm, list(harmful) + list(harmless))
        return self.calibrate_scores(scale[:len(harmful)], scale[len(harmful):], max_negative_rate=max_negative_rate,
                                     split=split)

    def calibrate_scores(self, harmful_scale: torch.Tensor, harmless_scale: torch.Tensor, *,
                         max_negative_rate: float = 0.05, split: str = "val") -> dict[str, Any]:
        """:meth:`calibrate` from the gate's scales on the validation prompts."""
        record = calibrate_threshold(harmful_scale, harmless_scale, max_negative_rate=max_negative_rate)
        self.threshold = record["threshold"]
        record = {"split": split, "selection_is_test": False, **record}
        self.metrics["threshold_selection"] = record
        self.metrics["selection_is_test"] = False
        return record

    def measure(self, lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str]) -> dict[str, float]:
        """Applied rates (and the gate's AUROC) on labelled prompts, at the current threshold."""
        scale, _ = self.decide(lm, list(harmful) + list(harmless))
        return gate_rates(scale[:len(harmful)], scale[len(harmful):], self.threshold)

    def generate(self, lm: LoadedModel, prompts: Sequence[str], **kw) -> tuple[list[str], torch.Tensor]:
        """Generate with the controller's steering; returns (texts, scales)."""
        from .generate import generate

        scale, weights = self.decide(lm, prompts)
        return generate(lm, list(prompts), self.steering(scale, weights), **kw), scale

    # ---- files -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"kind": "steering_controller", "model": self.model, "d_model": self.vector.d_model,
                "input_layers": self.input_layers, "steer_layers": self.steer_layers, "pooling": self.pooling,
                "hidden": self.net.body[0].out_features, "base_strength": self.base_strength,
                "threshold": self.threshold, "vector": self.vector.metadata(), "metrics": self.metrics,
                "created": self.created}

    def encode(self) -> tuple[bytes, bytes]:
        """``(safetensors bytes, json bytes)``: what :meth:`save` writes (the library commits these)."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"direction.{k}": self.vector[k] for k in self.steer_layers})
        return encode_pair(tensors, self.metadata(), "steering_lab.controller")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json`` as one unit; returns ``PATH``."""
        base = base_path(path)
        check(base.name not in ("", ".", ".."), f"invalid controller path {str(path)!r}")
        return commit_pair(base, *self.encode())

    @classmethod
    def load(cls, path: str | os.PathLike, lm: LoadedModel | None = None, *, label: str | None = None) -> Controller:
        """Load ``PATH.safetensors`` + ``PATH.json``; ``label`` names it in messages instead of its path."""
        base, raw, meta = read_pair(path, "controller", label=label)
        where = label or str(base.with_suffix(".safetensors"))
        check(meta.get("kind") == "steering_controller", f"{label or base.with_suffix('.json')} is not a controller")
        try:
            ctl = cls._from_parts(raw, meta, where)
        except UserError as exc:
            raise UserError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
            raise UserError(f"{where} is not a valid controller: {type(exc).__name__}: {exc}") from None
        if lm is not None:
            ctl.check_model(lm)
        return ctl

    @classmethod
    def _from_parts(cls, raw: dict[str, torch.Tensor], meta: dict[str, Any], where: str) -> Controller:
        def ints(key: str) -> list[int]:
            value = meta[key]
            check(isinstance(value, list) and bool(value) and all(isinstance(k, int) and not isinstance(k, bool)
                                                                   and 0 <= k < 10_000 for k in value),
                  f"'{key}' must be a non-empty list of layer indices")
            return list(value)

        d, hidden = meta["d_model"], meta["hidden"]
        inputs, steered = ints("input_layers"), ints("steer_layers")
        check(isinstance(d, int) and isinstance(hidden, int) and d > 0 and hidden > 0,
              "'d_model' and 'hidden' must be positive integers")
        state = {k[4:]: v for k, v in raw.items() if k.startswith("net.")}
        # shapes are checked against the file before anything is allocated from the json's numbers
        want = {"in_mean": (len(inputs) * d,), "in_scale": (len(inputs) * d,),
                "body.0.weight": (hidden, len(inputs) * d), "body.0.bias": (hidden,),
                "body.2.weight": (1 + len(steered), hidden), "body.2.bias": (1 + len(steered),)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        check(got == want, f"controller weights do not match its json (tensors {got}, expected {want})")
        net = ControllerNet(len(inputs), d, len(steered), hidden)
        net.load_state_dict(state, strict=True)
        for k, v in net.state_dict().items():
            check(bool(torch.isfinite(v).all()), f"controller weight {k} contains NaN or inf values")
        check(bool((net.in_scale > 0).all()), "controller input scale must be positive")
        vmeta = meta.get("vector", {})
        check(isinstance(vmeta, dict), "'vector' must be an object")
        dirs = {}
        for key, v in raw.items():
            if key.startswith("direction."):
                check(key[10:].isdigit() and len(key) < 17, f"unexpected tensor {key!r}")
                dirs[int(key[10:])] = v
        vec = SteeringVector(directions=dirs, model=str(vmeta.get("model", "")), d_model=d,
                             n_layers=vmeta.get("n_layers") if isinstance(vmeta.get("n_layers"), int) else None,
                             method=str(vmeta.get("method", "")), description=str(vmeta.get("description", "")))
        check(set(steered) <= set(vec.layers), f"steer_layers {steered} are not all in the directions {vec.layers}")
        strength, threshold = float(meta["base_strength"]), float(meta.get("threshold", 0.5))
        check(math.isfinite(strength) and math.isfinite(threshold), "base_strength and threshold must be finite")
        metrics = meta.get("metrics", {})
        check(isinstance(metrics, dict), "'metrics' must be an object")
        pooling = meta.get("pooling", "last")
        check(pooling in ("last", "mean", "max"), f"unknown pooling {pooling!r}")
        return cls(net=net.eval(), input_layers=inputs, steer_layers=steered, vector=vec, base_strength=strength,
                   pooling=pooling, threshold=threshold, model=str(meta.get("model", "")), metrics=metrics,
                   created=str(meta.get("created", "")))


def _target_batch(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str]) -> tuple[dict, torch.Tensor]:
    """Left-padded prompt+target ids and a mask of the target positions' predictions."""
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        t_ids = lm.encode(t, special=False)
        seqs.append(lm.encode_prompt(p) + t_ids)
        spans.append(len(t_ids))
    ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)
    width = ids.shape[1]
    pred = torch.zeros((len(seqs), width - 1), device=lm.device)
    for r, n in enumerate(spans):
        pred[r, width - 1 - n:] = 1
    return dict(input_ids=ids, attention_mask=mask, position_ids=pos), pred


def train_controller(lm: LoadedModel, vector: SteeringVector, harmful: Sequence[str], harmless: Sequence[str], *,
                     steer_layers: Sequence[int], input_layers: Sequence[int], base_strength: float,
                     refusals: Sequence[str] | None = None, epochs: int = 6, batch_size: int = 8, lr: float = 3e-3,
                     target_tokens: int = 12, gate_weight: float = 1.0, hidden: int = 64, seed: int = 0,
                     progress: bool = False, harmful_val: Sequence[str] | None = None,
                     harmless_val: Sequence[str] | None = None, max_negative_rate: float = 0.05,
                     weight_decay: float = 0.0, gate_epochs: int = 0, val_split: str = "val",
                     init: Controller | None = None, pooled: torch.Tensor | None = None) -> Controller:
    """Train a controller (see module docstring). The LM stays frozen; only the small net learns.

    ``gate_epochs`` more epochs train the gate alone (its loss only, on the cached pooled activations:
    cheap, no LM pass). With ``harmful_val``/``harmless_val`` the gate threshold is then calibrated on
    them (:meth:`Controller.calibrate`, recorded under the name ``val_split``); without, it stays 0.5.

    ``init``: start from this controller's network (same layers and width; its input statistics are
    kept). Its per-layer weights then anchor the gate-only epochs (squared error to them is added), so
    a warm-started controller keeps the LM-trained layer weighting while its gate learns new prompts.
    ``pooled``: the prompts' pooled activations at ``input_layers`` ([harmful + harmless, n_inputs, d]),
    when the caller already has them (they are collected otherwise)."""
    from .datasets import refusal_responses
    from .generate import generate

    check(len(harmful) > 0 and len(harmless) > 0, "the controller needs harmful and harmless prompts")
    check(base_strength > 0, "base_strength must be positive")
    vector.check_model(lm, steer_layers)
    for k in input_layers:
        check(0 <= k < lm.n_layers, f"input layer {k} out of range")
    torch.manual_seed(seed)
    refusals = list(refusals or refusal_responses())
    # targets: a refusal for harmful prompts, the model's own (unsteered) opening for harmless ones
    own = generate(lm, list(harmless), max_new_tokens=target_tokens) if epochs > 0 else [""] * len(harmless)
    prompts = list(harmful) + list(harmless)
    targets = [refusals[i % len(refusals)] for i in range(len(harmful))] + own
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(harmless))
    ctl = Controller(net=ControllerNet(len(input_layers), lm.d_model, len(steer_layers), hidden),
                     input_layers=list(input_layers), steer_layers=list(steer_layers), vector=vector,
                     base_strength=float(base_strength), model=lm.name)
    if pooled is None:
        pooled = ctl.pooled(lm, prompts)  # fixed: the controller reads the unsteered prompt
    check(tuple(pooled.shape) == (len(prompts), len(ctl.input_layers), lm.d_model),
          f"pooled activations of shape {tuple(pooled.shape)} do not match the prompts and input layers")
    anchor = None
    if init is not None:
        check(init.input_layers == ctl.input_layers and init.steer_layers == ctl.steer_layers
              and init.net.body[0].out_features == hidden and init.pooling == ctl.pooling,
              "init controller must have the same input/steer layers, pooling and hidden width")
        ctl.net.load_state_dict(init.net.state_dict())
        with torch.no_grad():
            anchor = init.net(pooled)[1]
        ctl.metrics["init"] = {"created": init.created}
    else:
        ctl.net.set_input_stats(pooled)
    opt = torch.optim.Adam(ctl.net.parameters(), lr=lr, weight_decay=weight_decay)
    flags = [p.requires_grad for p in lm.model.parameters()]
    try:
        for p in lm.model.parameters():  # the LM is frozen; restored below, the caller's model is not changed
            p.requires_grad_(False)
        history = _fit(lm, ctl, vector, steer_layers, prompts, targets, labels, pooled, opt, epochs, batch_size,
                       gate_weight, seed, progress)
    finally:
        for p, flag in zip(lm.model.parameters(), flags):
            p.requires_grad_(flag)
    history += _fit_gate(ctl, pooled, labels, opt, gate_epochs, batch_size, seed, progress, anchor)
    ctl.net.eval()
    ctl.metrics["train_loss"] = history
    ctl.metrics["train"] = {"split": "train", "n_harmful": len(harmful), "n_harmless": len(harmless),
                            "epochs": epochs, "gate_epochs": gate_epochs}
    if harmful_val is not None or harmless_val is not None:
        check(bool(harmful_val) and bool(harmless_val), "calibration needs harmful and harmless validation prompts")
        ctl.calibrate(lm, harmful_val, harmless_val, max_negative_rate=max_negative_rate, split=val_split)
    return ctl


def _fit_gate(ctl, pooled, labels, opt, epochs, batch_size, seed, progress, anchor=None) -> list[float]:
    """Gate-only epochs: binary cross-entropy of the scale on the cached pooled activations (plus the
    squared error of the per-layer weights to ``anchor`` when given)."""
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    ctl.net.train()
    for _ in tqdm(range(epochs), desc="controller gate", disable=not progress):
        order = torch.randperm(len(labels), generator=g).tolist()
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            scale, weights = ctl.net(pooled[idx])
            loss = torch.nn.functional.binary_cross_entropy(scale.clamp(1e-6, 1 - 1e-6), labels[idx])
            if anchor is not None:
                loss = loss + torch.nn.functional.mse_loss(weights, anchor[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(labels))
    return history


def _fit(lm, ctl, vector, steer_layers, prompts, targets, labels, pooled, opt, epochs, batch_size, gate_weight,
         seed, progress) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(epochs), desc="controller", disable=not progress):
        order = torch.randperm(len(prompts), generator=g).tolist()
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            inputs, pred = _target_batch(lm, [prompts[j] for j in idx], [targets[j] for j in idx])
            scale, weights = ctl.net(pooled[idx])
            strengths = (scale[:, None] * weights * ctl.base_strength).to(lm.device)
            items = [Steer(vector, strengths[:, j], layers=[k]) for j, k in enumerate(steer_layers)]
            with steer(lm, items, differentiable=True):
                logits = lm.model(**inputs, use_cache=False).logits[:, :-1].float()
            tgt = inputs["input_ids"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
            lm_loss = ((nll * pred).sum(1) / pred.sum(1).clamp_min(1)).mean()
            gate = torch.nn.functional.binary_cross_entropy(scale.clamp(1e-6, 1 - 1e-6), labels[idx])
            loss = lm_loss + gate_weight * gate
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(prompts))
    return history


# ---- conditional activation steering (CAST) -----------------------------------------------------

@dataclass
class Condition:
    """Apply steering when cos(pooled prompt activation at ``layer``, ``direction``) > ``threshold``."""

    layer: int
    direction: torch.Tensor
    threshold: float
    pooling: str = "last"
    f1: float = math.nan
    grid: list[dict] = field(default_factory=list)
    chat: bool = True
    model: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    created: str = field(default_factory=_now)

    def similarity(self, acts: torch.Tensor) -> torch.Tensor:
        d = self.direction.float()
        return torch.nn.functional.cosine_similarity(acts.float(), d[None, :].to(acts.device), dim=-1)

    def scores(self, lm: LoadedModel, prompts: Sequence[str], chat: bool | None = None) -> torch.Tensor:
        """Per prompt: the cosine similarity the threshold is compared with."""
        chat = self.chat if chat is None else chat
        return self.similarity(collect(lm, prompts, layers=[self.layer], position=self.pooling, chat=chat).acts[:, 0])

    def applies(self, lm: LoadedModel, prompts: Sequence[str], chat: bool = True) -> torch.Tensor:
        return self.scores(lm, prompts, chat) > self.threshold

    def measure(self, lm: LoadedModel, positive: Sequence[str], negative: Sequence[str]) -> dict[str, float]:
        """Applied rates (and the similarity's AUROC) on labelled prompts, at the current threshold."""
        sims = self.scores(lm, list(positive) + list(negative))
        return gate_rates(sims[:len(positive)], sims[len(positive):], self.threshold, strict=True)

    # ---- files -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"kind": "cast_condition", "model": self.model, "d_model": int(self.direction.numel()),
                "layer": self.layer, "pooling": self.pooling, "chat": self.chat, "threshold": self.threshold,
                "description": self.description, "metrics": self.metrics, "created": self.created}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` (tensor ``direction``) + ``PATH.json`` as one unit; returns ``PATH``."""
        base = base_path(path)
        check(base.name not in ("", ".", ".."), f"invalid condition path {str(path)!r}")
        return commit_pair(base, *encode_pair({"direction": self.direction}, self.metadata(), "steering_lab.condition"))

    @classmethod
    def load(cls, path: str | os.PathLike, lm: LoadedModel | None = None, *, label: str | None = None) -> Condition:
        base, raw, meta = read_pair(path, "condition", label=label)
        where = label or str(base.with_suffix(".json"))
        check(meta.get("kind") == "cast_condition", f"{where} is not a CAST condition")
        try:
            d, layer, threshold = raw["direction"], meta["layer"], float(meta["threshold"])
            check(d.ndim == 1 and d.numel() == meta["d_model"], "direction does not match 'd_model'")
            check(isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < 10_000,
                  "'layer' must be a layer index")
            check(math.isfinite(threshold) and bool(torch.isfinite(d).all()), "threshold and direction must be finite")
            check(meta.get("pooling", "last") in ("last", "mean", "max"), "unknown pooling")
            metrics = meta.get("metrics", {})
            check(isinstance(metrics, dict), "'metrics' must be an object")
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where} is not a valid condition: {type(exc).__name__}: {exc}") from None
        cond = cls(layer=layer, direction=d.float(), threshold=threshold, pooling=meta.get("pooling", "last"),
                   chat=bool(meta.get("chat", True)), model=str(meta.get("model", "")), metrics=metrics,
                   description=str(meta.get("description", "")), created=str(meta.get("created", "")))
        if lm is not None:
            check(cond.direction.numel() == lm.d_model and cond.layer < lm.n_layers,
                  f"{where} was made for another model (d_model {cond.direction.numel()}, layer {cond.layer}; "
                  f"{lm.name} has d_model {lm.d_model} and {lm.n_layers} blocks)")
        return cond


def f1_score(pred: torch.Tensor, label: torch.Tensor) -> float:
    """F1 of boolean predictions (``sklearn.metrics.f1_score``; 0 when nothing is predicted positive)."""
    from sklearn.metrics import f1_score as sk_f1

    return float(sk_f1(label.cpu().numpy(), pred.cpu().numpy(), zero_division=0.0))


def fit_condition(lm: LoadedModel, positive_train: Sequence[str], negative_train: Sequence[str],
                  positive_val: Sequence[str], negative_val: Sequence[str], *, layers: Sequence[int] | None = None,
                  n_thresholds: int = 41, pooling: str = "last", chat: bool = True, progress: bool = False,
                  max_negative_rate: float | None = 0.05, val_split: str = "val") -> Condition:
    """CAST: the condition direction at each layer is the mean difference of the pooled prompt
    activations (train). On the val prompts, per layer, the threshold comes from
    :func:`calibrate_threshold` (the highest rate on positives with at most ``max_negative_rate`` on
    negatives, ``sklearn.metrics.roc_curve``); the layer with the highest val positive rate wins, ties
    going to the higher val AUROC. ``max_negative_rate=None`` keeps the older rule instead: the best F1
    over the thresholds of ``sklearn.metrics.precision_recall_curve`` (``n_thresholds`` is no longer used).

    Pooling defaults to the last prompt token: with a chat template, the mean over the prompt is
    dominated by the shared system and template tokens. ``grid`` lists every layer's val numbers."""
    check(min(len(positive_train), len(negative_train), len(positive_val), len(negative_val)) > 0,
          "CAST needs positive and negative prompts for train and val")
    layers = sorted(set(range(lm.n_layers) if layers is None else layers))
    kw = dict(layers=layers, position=pooling, chat=chat, progress=progress)
    tp, tn = collect(lm, positive_train, **kw).acts, collect(lm, negative_train, **kw).acts
    vp, vn = collect(lm, positive_val, **kw).acts, collect(lm, negative_val, **kw).acts
    cond = fit_condition_acts(tp, tn, vp, vn, layers, max_negative_rate=max_negative_rate, val_split=val_split)
    cond.pooling, cond.chat, cond.model = pooling, chat, lm.name
    return cond


def fit_condition_acts(tp: torch.Tensor, tn: torch.Tensor, vp: torch.Tensor, vn: torch.Tensor, layers: Sequence[int],
                       *, max_negative_rate: float | None = 0.05, val_split: str = "val") -> Condition:
    """:func:`fit_condition` from pooled activations ``[n, len(layers), d]`` of the train and val prompts
    (positive/negative), ``layers`` naming their second axis."""
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    from .extract import mean_diff

    check(tp.shape[1] == len(layers) and tn.shape[1] == vp.shape[1] == vn.shape[1] == len(layers),
          "activations must hold one slice per layer")
    positive_train, negative_train, positive_val, negative_val = tp, tn, vp, vn  # for the counts below
    label = np.r_[np.ones(len(vp)), np.zeros(len(vn))]
    best: tuple | None = None
    grid = []
    for j, k in enumerate(layers):
        d = mean_diff(tp[:, j], tn[:, j])
        probe = Condition(layer=k, direction=d, threshold=0.0)
        sp, sn = probe.similarity(vp[:, j]), probe.similarity(vn[:, j])
        cal = calibrate_threshold(sp, sn, max_negative_rate=0.0 if max_negative_rate is None else max_negative_rate)
        pred = torch.cat([sp, sn]) > cal["threshold"]
        row = {"layer": k, "threshold": cal["threshold"], "val_applied_harmful": cal["positive_rate"],
               "val_applied_harmless": cal["negative_rate"], "val_auroc": cal["auroc"],
               "f1": f1_score(pred, torch.as_tensor(label, dtype=torch.bool))}
        if max_negative_rate is None:  # older rule: best F1 on the val set
            sims = torch.cat([sp, sn]).double().numpy()
            prec, rec, thr = precision_recall_curve(label, sims)
            f1s = 2 * prec[:-1] * rec[:-1] / np.clip(prec[:-1] + rec[:-1], 1e-12, None)
            i = int(np.argmax(f1s))
            lower = np.unique(sims)[np.unique(sims) < thr[i]]
            row["threshold"] = float((thr[i] + lower[-1]) / 2) if lower.size else float(thr[i]) - 1e-6
            row["f1"] = float(f1s[i])
            key = (row["f1"], row["val_auroc"])
        else:
            key = (row["val_applied_harmful"], row["val_auroc"])
        grid.append(row)
        if best is None or key > best[0]:
            best = (key, row, d)
    _, row, d = best
    selection = {"split": val_split, "selection_is_test": False, "layer": row["layer"],
                 "rule": ("best F1 on the validation split (sklearn.metrics.precision_recall_curve)"
                          if max_negative_rate is None else THRESHOLD_RULE.format(rate=max_negative_rate)
                          + "; layer: highest such rate, ties to the higher validation AUROC"),
                 "max_negative_rate": max_negative_rate, "n_harmful": len(positive_val),
                 "n_harmless": len(negative_val), **{k: v for k, v in row.items() if k != "layer"}}
    return Condition(layer=row["layer"], direction=d, threshold=row["threshold"], f1=row["f1"], grid=grid,
                     metrics={"threshold_selection": selection, "selection_is_test": False,
                              "train": {"split": "train", "n_harmful": len(positive_train),
                                        "n_harmless": len(negative_train)}})


def conditional_generate(lm: LoadedModel, prompts: Sequence[str], condition: Condition, vector: SteeringVector,
                         strength: float, *, layers: Sequence[int] | None = None, **kw) -> tuple[list[str], list[bool]]:
    """Generate all prompts in one batch; rows whose condition holds are steered, the others get 0."""
    from .generate import generate

    applies = condition.applies(lm, prompts).tolist()
    strengths = [strength if a else 0.0 for a in applies]
    return generate(lm, list(prompts), Steer(vector, strengths, layers=layers), **kw), applies


# ---- the bundled recipe: refusal controller and harmful-request condition ---------------------------

REFUSAL_SPLITS = {
    "train": "data/harmful.txt + harmless.txt lines 0-59 (train) and 105-end (varied styles)",
    "val": "data/harmful.txt + harmless.txt lines 60-79 (val) and data/heldout/*_style2.txt even lines (style-2 val)",
    "test_instyle": "data/harmful.txt + harmless.txt lines 80-104 (test; same style as training)",
    "test_style2": "data/heldout/*_style2.txt odd lines (style-2 test: chat/email/forum style, never trained on)",
}


def refusal_data(split: str) -> tuple[list[str], list[str]]:
    """``(harmful, harmless)`` prompts of one split of :data:`REFUSAL_SPLITS`."""
    from .datasets import instruction_split, style2_split

    check(split in REFUSAL_SPLITS, f"unknown split {split!r} (choose {', '.join(REFUSAL_SPLITS)})")
    if split == "train":
        parts = [instruction_split("train"), instruction_split("varied")]
    elif split == "val":
        parts = [instruction_split("val"), style2_split("val")]
    elif split == "test_instyle":
        parts = [instruction_split("test")]
    else:
        parts = [style2_split("test")]
    return [h for p in parts for h in p[0]], [x for p in parts for x in p[1]]


def _report(artifact: Controller | Condition, lm: LoadedModel) -> None:
    """Record the rates on the val and both test splits, each under its split's name."""
    artifact.metrics["splits"] = dict(REFUSAL_SPLITS)
    for split in ("val", "test_instyle", "test_style2"):
        artifact.metrics[split] = {"split": split, **artifact.measure(lm, *refusal_data(split))}
    artifact.metrics["selection_is_test"] = False


def train_refusal_controller(lm: LoadedModel, vector: SteeringVector, *, steer_layers: Sequence[int],
                             input_layers: Sequence[int], base_strength: float, max_negative_rate: float = 0.05,
                             **kw) -> Controller:
    """The shipped recipe: train on the train split of :data:`REFUSAL_SPLITS`, calibrate the gate on its
    val split, and record the applied rates on val and both test splits (tests are only reported)."""
    harmful, harmless = refusal_data("train")
    h_val, l_val = refusal_data("val")
    ctl = train_controller(lm, vector, harmful, harmless, steer_layers=steer_layers, input_layers=input_layers,
                           base_strength=base_strength, harmful_val=h_val, harmless_val=l_val,
                           max_negative_rate=max_negative_rate, **kw)
    _report(ctl, lm)
    return ctl


def fit_refusal_condition(lm: LoadedModel, *, max_negative_rate: float = 0.05, layers: Sequence[int] | None = None,
                          progress: bool = False) -> Condition:
    """The shipped CAST condition (harmful request?): direction from the train split of
    :data:`REFUSAL_SPLITS`, layer and threshold from its val split, rates recorded on val and both tests."""
    cond = fit_condition(lm, *refusal_data("train"), *refusal_data("val"), layers=layers,
                         max_negative_rate=max_negative_rate, progress=progress)
    cond.description = "harmful request (apply steering) vs harmless, cosine at the last prompt token"
    _report(cond, lm)
    return cond


def collect_refusal_acts(lm: LoadedModel, layers: Sequence[int], *, progress: bool = False
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Last-prompt-token activations at ``layers`` (sorted) of every split of :data:`REFUSAL_SPLITS`:
    ``{split: (harmful [n, len(layers), d], harmless [...])}``, one pass per prompt."""
    kw = dict(layers=sorted(set(layers)), position="last", batch_size=16, progress=progress)
    return {name: tuple(collect(lm, side, **kw).acts for side in refusal_data(name)) for name in REFUSAL_SPLITS}


def build_refusal_gates(lm: LoadedModel, vector: SteeringVector, *, steer_layers: Sequence[int],
                        input_layers: Sequence[int], base_strength: float, condition_layers: Sequence[int],
                        max_negative_rate: float = 0.05, acts: dict | None = None, progress: bool = False,
                        **train_kw) -> tuple[Controller, Condition, dict]:
    """The shipped refusal controller and CAST condition from one pass over every prompt (see
    :func:`train_refusal_controller` and :func:`fit_refusal_condition`, which this equals up to the
    shared activations). Returns ``(controller, condition, acts)``; ``acts`` as :func:`collect_refusal_acts`
    at ``sorted(set(input_layers) | set(condition_layers))``."""
    layers = sorted(set(input_layers) | set(condition_layers))
    acts = acts if acts is not None else collect_refusal_acts(lm, layers, progress=progress)
    ii = [layers.index(k) for k in input_layers]
    ic = [layers.index(k) for k in sorted(set(condition_layers))]
    tp, tn = acts["train"]
    ctl = train_controller(lm, vector, *refusal_data("train"), steer_layers=steer_layers, input_layers=input_layers,
                           base_strength=base_strength, pooled=torch.cat([tp, tn])[:, ii], **train_kw)
    with torch.no_grad():
        scales = {name: (ctl.net(h[:, ii])[0], ctl.net(x[:, ii])[0]) for name, (h, x) in acts.items()}
    ctl.calibrate_scores(*scales["val"], max_negative_rate=max_negative_rate, split="val")
    vp, vn = acts["val"]
    cond = fit_condition_acts(tp[:, ic], tn[:, ic], vp[:, ic], vn[:, ic], sorted(set(condition_layers)),
                              max_negative_rate=max_negative_rate, val_split="val")
    cond.model = lm.name
    cond.description = "harmful request (apply steering) vs harmless, cosine at the last prompt token"
    j = layers.index(cond.layer)
    sims = {name: (cond.similarity(h[:, j]), cond.similarity(x[:, j])) for name, (h, x) in acts.items()}
    for art, scores, strict in ((ctl, scales, False), (cond, sims, True)):
        art.metrics["splits"] = dict(REFUSAL_SPLITS)
        for name in ("val", "test_instyle", "test_style2"):
            art.metrics[name] = {"split": name, **gate_rates(*scores[name], art.threshold, strict=strict)}
        art.metrics["selection_is_test"] = False
    return ctl, cond, acts
