"""Linear probes: logistic regression (scikit-learn) on pooled block outputs, a layer (and pooling)
sweep and a decision threshold chosen on a validation split, AUROC/accuracy reported on a test split
that chose nothing (``sklearn.metrics.roc_auc_score``), and a torch-only scorer that is bit-identical before and after
save/load (safetensors + json, never pickle).

Score = sigmoid(w . (h - mean) / scale + b), in [0, 1], 1 = the positive class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .activations import POSITIONS, collect
from .constants import POOLINGS
from .datasets import ContrastSet
from .errors import UserError, check
from .extract import auroc
from .model import LoadedModel
from .vector import _now, base_path, check_finite, commit_pair, encode_pair, read_pair

_TENSORS = ("weight", "mean", "scale", "bias")


@dataclass
class Probe:
    layer: int
    pooling: str
    weight: torch.Tensor  # [d]
    mean: torch.Tensor    # [d]
    scale: torch.Tensor   # [d]
    bias: torch.Tensor    # [1]
    model: str = ""
    d_model: int | None = None
    labels: tuple[str, str] = ("positive", "negative")
    chat: bool = True
    dataset: str = ""
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        check(self.pooling in POOLINGS, f"unknown pooling {self.pooling!r} (choose {', '.join(POOLINGS)})")
        for name in _TENSORS:
            t = getattr(self, name)
            check(isinstance(t, torch.Tensor) and t.is_floating_point(), f"probe {name} must be a float tensor")
            check_finite(t, f"probe {name}")
        d = self.weight.shape[0]
        check(self.weight.dim() == 1 and self.mean.shape == (d,) and self.scale.shape == (d,),
              "probe weight, mean and scale must all have shape [d_model]")
        check(self.bias.numel() == 1, "probe bias must be a single number")
        check(bool((self.scale > 0).all()), "probe scale must be positive")
        if self.d_model is None:
            self.d_model = d
        check(self.d_model == d, f"metadata says d_model {self.d_model} but the weights have {d}")

    # ---- scoring -----------------------------------------------------------------------
    def logit(self, acts: torch.Tensor) -> torch.Tensor:
        """Decision values for activations ``[..., d]`` (any float dtype; computed in float32)."""
        a = acts.float()
        w, mu, sd = (t.to(a.device) for t in (self.weight, self.mean, self.scale))
        return ((a - mu) / sd) @ w + self.bias.to(a.device)

    def score(self, acts: torch.Tensor) -> torch.Tensor:
        """Probability of the positive class for activations ``[..., d]``."""
        return torch.sigmoid(self.logit(acts))

    def check_model(self, lm: LoadedModel) -> None:
        check(self.d_model == lm.d_model, f"probe was trained on d_model {self.d_model} ({self.model or 'unknown'}) "
                                          f"but {lm.name} has d_model {lm.d_model}")
        check(0 <= self.layer < lm.n_layers, f"probe reads layer {self.layer} but {lm.name} has {lm.n_layers} blocks")

    # ---- files -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"kind": "linear_probe", "layer": self.layer, "pooling": self.pooling, "model": self.model,
                "d_model": self.d_model, "labels": list(self.labels), "chat": self.chat, "dataset": self.dataset,
                "description": self.description, "metrics": self.metrics, "created": self.created}

    def encode(self) -> tuple[bytes, bytes]:
        """``(safetensors bytes, json bytes)``: what :meth:`save` writes (the library commits these)."""
        tensors = {name: getattr(self, name).reshape(-1) for name in _TENSORS}
        return encode_pair(tensors, self.metadata(), "steering_lab.probe")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` + ``PATH.json`` as one unit; returns ``PATH``."""
        base = base_path(path)
        check(base.name not in ("", ".", ".."), f"invalid probe path {str(path)!r}")
        return commit_pair(base, *self.encode())

    @classmethod
    def load(cls, path: str | os.PathLike, lm: LoadedModel | None = None, *, label: str | None = None) -> Probe:
        """Load ``PATH.safetensors`` + ``PATH.json``; ``label`` names it in messages instead of its path."""
        base, raw, meta = read_pair(path, "probe", label=label)
        where = label or str(base.with_suffix(".safetensors"))
        missing = [n for n in _TENSORS if n not in raw]
        check(not missing, f"{where} is not a probe: missing tensors {missing}")
        js = label or base.with_suffix(".json")
        check(meta.get("kind") == "linear_probe", f"{js} does not describe a linear probe")
        for key in ("layer", "pooling"):
            check(key in meta, f"{where}: the metadata has no {key!r}")
        try:
            check(isinstance(meta["layer"], int) and not isinstance(meta["layer"], bool),
                  f"{where}: 'layer' must be an integer")
            labels = meta.get("labels", ("positive", "negative"))
            check(isinstance(labels, (list, tuple)) and len(labels) == 2 and all(isinstance(x, str) for x in labels),
                  f"{where}: 'labels' must be two strings")
            d_model = meta.get("d_model")
            check(d_model is None or (isinstance(d_model, int) and not isinstance(d_model, bool)),
                  f"{where}: 'd_model' must be an integer")
            metrics = meta.get("metrics", {})
            check(isinstance(metrics, dict), f"{where}: 'metrics' must be an object")
            probe = cls(layer=meta["layer"], pooling=str(meta["pooling"]),
                        weight=raw["weight"], mean=raw["mean"], scale=raw["scale"], bias=raw["bias"],
                        model=str(meta.get("model", "")), d_model=d_model, labels=tuple(labels),
                        chat=bool(meta.get("chat", True)), dataset=str(meta.get("dataset", "")),
                        description=str(meta.get("description", "")), metrics=metrics,
                        created=str(meta.get("created", "")))
        except UserError as exc:
            raise UserError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise UserError(f"{where} is not a valid probe: {exc}") from None
        if lm is not None:
            probe.check_model(lm)
        return probe


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, C: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Logistic regression on standardised activations; returns (weight, mean, scale, bias)."""
    from sklearn.linear_model import LogisticRegression

    check(pos.shape[0] > 0 and neg.shape[0] > 0, "a probe needs examples of both classes")
    x = torch.cat([pos, neg]).double()
    y = [1] * pos.shape[0] + [0] * neg.shape[0]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=C, max_iter=5000)
    clf.fit(((x - mu) / sd).numpy(), y)
    return (torch.as_tensor(clf.coef_[0], dtype=torch.float32), mu.float(), sd.float(),
            torch.as_tensor(clf.intercept_, dtype=torch.float32).reshape(1))


@dataclass
class ProbeLayerScore:
    layer: int
    auroc: float      # on the selection (validation) split
    accuracy: float   # on the selection split, at the default threshold (score 0.5)
    pooling: str = ""
    C: float = 1.0


def _pooled(lm: LoadedModel, texts: Sequence[str], pooling: str, layers, chat: bool, batch_size: int,
            progress: bool, desc: str) -> torch.Tensor:
    check(pooling in POOLINGS and pooling in POSITIONS, f"unknown pooling {pooling!r} (choose {', '.join(POOLINGS)})")
    return collect(lm, texts, layers=layers, position=pooling, chat=chat, batch_size=batch_size,
                   progress=progress, desc=desc).acts


Split = tuple[list[int], list[int]]  # (positive indices, negative indices)


def instruction_splits() -> tuple[Split, Split, Split]:
    """The bundled harmful/harmless split (datasets.SPLITS) as index pairs: train, val, test."""
    from .datasets import SPLITS, harmful_instructions

    n = len(harmful_instructions())
    out = []
    for name in ("train", "val", "test"):
        lo, hi = SPLITS[name]
        idx = list(range(lo, n if hi is None else hi))
        out.append((idx, list(idx)))
    return out[0], out[1], out[2]


def three_way_splits(contrast: ContrastSet, val: float = 0.2, test: float = 0.2,
                     seed: int = 0) -> tuple[Split, Split, Split]:
    """Seeded disjoint train / val / test index pairs of ``contrast`` (pairs stay together when the
    set is paired); at least one example per class in val and test."""
    import random

    def cut(n: int, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
        check(n >= 3, f"contrast set {contrast.name!r}: a train/val/test split needs at least 3 examples per class")
        idx = list(range(n))
        rng.shuffle(idx)
        k_test, k_val = max(1, round(n * test)), max(1, round(n * val))
        check(n - k_test - k_val >= 1, f"contrast set {contrast.name!r} is too small for its val/test fractions")
        return sorted(idx[k_test + k_val:]), sorted(idx[k_test:k_test + k_val]), sorted(idx[:k_test])

    if contrast.paired:
        tr, va, te = cut(len(contrast.positive), random.Random(seed))
        return (tr, list(tr)), (va, list(va)), (te, list(te))
    ptr, pva, pte = cut(len(contrast.positive), random.Random(seed))
    ntr, nva, nte = cut(len(contrast.negative), random.Random(seed + 1))
    return (ptr, ntr), (pva, nva), (pte, nte)


def _threshold(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> float:
    """The logit threshold with the best balanced accuracy on the given (selection) scores;
    candidates are midpoints between neighbouring scores, ties go to the one nearest 0."""
    from sklearn.metrics import balanced_accuracy_score

    x = torch.cat([pos_logits, neg_logits]).double()
    y = [1] * pos_logits.numel() + [0] * neg_logits.numel()
    v = torch.unique(x)
    cands = torch.cat([v[:1] - 1, (v[1:] + v[:-1]) / 2, v[-1:] + 1]).tolist()
    best = max(cands, key=lambda t: (balanced_accuracy_score(y, (x > t).int().tolist()), -abs(t)))
    return float(best)


def train_probe(lm: LoadedModel, contrast: ContrastSet, *, pooling: str = "last",
                poolings: Sequence[str] | None = None, layer: int | None = None,
                layers: Sequence[int] | None = None, splits: tuple[Split, Split, Split] | None = None,
                val: float = 0.2, test: float = 0.2, seed: int = 0, C: float | Sequence[float] = 1.0, chat: bool = True,
                batch_size: int = 16, progress: bool = False, fit_threshold: bool = True,
                evaluate_on: dict[str, ContrastSet] | None = None) -> tuple[Probe, list[ProbeLayerScore]]:
    """Fit a probe at every (layer, pooling) on the train split, pick the one with the best AUROC
    on the validation split, set its decision threshold on the validation split too, and report
    AUROC/accuracy on the test split (which chose nothing) and on each set of ``evaluate_on``
    (e.g. ``{"heldout_style": ...}``: texts of another style, never used to fit or select).

    The texts of ``contrast`` are classified as prompts (chat-formatted when ``chat``).
    ``splits`` = (train, val, test) index pairs; by default a seeded split with fractions ``val``
    and ``test`` (:func:`three_way_splits`). ``poolings`` (default: just ``pooling``) are swept
    along with the layers, and so are the inverse regularisation strengths when ``C`` is a list.
    The threshold is folded into the bias: score > 0.5 is the decision.
    ``probe.metrics`` names the split of every number (``val``, ``test``, ``selected_on``).
    """
    check(contrast.prompts is None, "probes classify texts: give a contrast set without a 'prompt' field")
    if splits is None:
        splits = three_way_splits(contrast, val, test, seed)
    train, select, test_split = splits
    for name, part in (("train", train), ("validation", select), ("test", test_split)):
        check(bool(part[0]) and bool(part[1]), f"the {name} split needs examples of both classes")
    pools = list(dict.fromkeys(poolings)) if poolings else [pooling]
    cs = [float(C)] if isinstance(C, (int, float)) else sorted({float(c) for c in C})
    check(bool(cs) and all(c > 0 for c in cs), "C must be positive")
    wanted = [layer] if layer is not None else (list(layers) if layers is not None else list(range(lm.n_layers)))
    for k in wanted:
        check(0 <= k < lm.n_layers, f"layer {k} out of range: the model has {lm.n_layers} blocks")
    acts = {}
    for pool in pools:
        acts[pool] = (_pooled(lm, contrast.positive, pool, wanted, chat, batch_size, progress, f"positive ({pool})"),
                      _pooled(lm, contrast.negative, pool, wanted, chat, batch_size, progress, f"negative ({pool})"))

    def evaluate(probe: Probe, sp: torch.Tensor, sn: torch.Tensor) -> dict[str, Any]:
        lp, ln = probe.logit(sp), probe.logit(sn)
        acc = float(torch.cat([(lp > 0).float(), (ln <= 0).float()]).mean())
        return {"auroc": auroc(lp, ln), "accuracy": acc, "n": int(lp.numel() + ln.numel())}

    rows, fitted = [], {}
    for pool in pools:
        pos, neg = acts[pool]
        for j, k in enumerate(wanted):
            for c in cs:
                w, mu, sd, b = fit_probe(pos[train[0], j], neg[train[1], j], c)
                probe = Probe(layer=k, pooling=pool, weight=w, mean=mu, scale=sd, bias=b)
                m = evaluate(probe, pos[select[0], j], neg[select[1], j])
                rows.append(ProbeLayerScore(layer=k, auroc=m["auroc"], accuracy=m["accuracy"], pooling=pool, C=c))
                fitted[(pool, k, c)] = (probe, j)
    # ties: higher accuracy, shallower layer, earlier pooling, stronger regularisation
    best = max(rows, key=lambda r: (r.auroc, r.accuracy, -r.layer, -pools.index(r.pooling), -r.C))
    probe, j = fitted[(best.pooling, best.layer, best.C)]
    pos, neg = acts[best.pooling]
    threshold = 0.0
    if fit_threshold:
        threshold = _threshold(probe.logit(pos[select[0], j]), probe.logit(neg[select[1], j]))
        probe.bias = probe.bias - threshold
    val_m = evaluate(probe, pos[select[0], j], neg[select[1], j])
    test_m = evaluate(probe, pos[test_split[0], j], neg[test_split[1], j])
    probe.model, probe.d_model, probe.labels, probe.chat = lm.name, lm.d_model, tuple(contrast.labels), chat
    probe.dataset, probe.description = contrast.name, contrast.description or f"{contrast.name} probe"
    selection_is_test = select == test_split
    probe.metrics = {"val": val_m, "test": test_m, "selected_on": "val", "reported_on": "test",
                     "selection_is_test": selection_is_test,
                     "selected": {"layer": best.layer, "pooling": best.pooling, "C": best.C,
                                  "threshold_logit": threshold, "threshold_folded_into_bias": fit_threshold},
                     # flat keys kept for older readers; same numbers as val/test above
                     "test_auroc": test_m["auroc"], "test_accuracy": test_m["accuracy"],
                     "select_auroc": val_m["auroc"],
                     "n_train": len(train[0]) + len(train[1]), "n_val": val_m["n"], "n_test": test_m["n"],
                     "layer_sweep_split": "val", "layer_sweep": [asdict(r) for r in rows]}
    for name, extra in (evaluate_on or {}).items():
        check(name not in probe.metrics, f"evaluation set name {name!r} is taken")
        probe.metrics[name] = evaluate_texts(lm, probe, extra, batch_size=batch_size)
    return probe, rows


def evaluate_texts(lm: LoadedModel, probe: Probe, contrast: ContrastSet, *, batch_size: int = 16) -> dict[str, Any]:
    """AUROC and accuracy (score > 0.5) of ``probe`` on the two sides of ``contrast``, with its size."""
    sp = torch.tensor(score_texts_with_probe(lm, probe, contrast.positive, batch_size=batch_size))
    sn = torch.tensor(score_texts_with_probe(lm, probe, contrast.negative, batch_size=batch_size))
    acc = float(torch.cat([(sp > 0.5).float(), (sn <= 0.5).float()]).mean())
    return {"auroc": auroc(sp, sn), "accuracy": acc, "n": int(sp.numel() + sn.numel()),
            "dataset": contrast.name}


def score_texts_with_probe(lm: LoadedModel, probe: Probe, texts: Sequence[str], *, batch_size: int = 16,
                           progress: bool = False) -> list[float]:
    """Probe score of each text (as a prompt, pooled as the probe was trained)."""
    probe.check_model(lm)
    acts = _pooled(lm, texts, probe.pooling, [probe.layer], probe.chat, batch_size, progress, "probe")
    return probe.score(acts[:, 0]).tolist()


def sweep_table(rows: Sequence[ProbeLayerScore], best: int, pooling: str | None = None) -> str:
    """The validation sweep as text (AUROC and accuracy on the selection split)."""
    lines = [f"{'layer':>5} {'pool':>5} {'auroc':>7} {'acc':>7}   (validation split)"]
    for r in rows:
        mark = "  <- best" if r.layer == best and (pooling is None or r.pooling == pooling) else ""
        lines.append(f"{r.layer:>5} {r.pooling:>5} {r.auroc:>7.3f} {r.accuracy:>7.3f}{mark}")
    return "\n".join(lines)
