"""Direction extraction and the layer scan.

Every method has one signature, ``(pos [N, d], neg [M, d]) -> direction [d]``, with ``+`` pointing
to the positive class. Directions come back in activation units (scaled so that their length is
the mean separation of the two classes along them); ``extract`` then stores unit vectors, so a
strength is an L2 length added to the residual stream and compares across methods and layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .activations import Activations, collect
from .datasets import ContrastSet
from .errors import UserError, check
from .model import LoadedModel
from .vector import SteeringVector

log = logging.getLogger(__name__)

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Strength recommended at the chosen layer, as a fraction of that layer's typical token norm.
# Calibrated on the embedded SmolLM2 with the sentiment preset (bench/calibration.md): a clear
# change of tone while the text stays fluent; 0.25 and up starts runaway repetition.
STRENGTH_FRACTION = 0.15
# Window of depth the recommended layer is taken from. Steering from the first blocks breaks
# fluency; from past ~40% of depth it needs much larger pushes for the same effect (calibration.md).
LAYER_WINDOW = (0.2, 0.4)


def _check_pair(pos: torch.Tensor, neg: torch.Tensor) -> None:
    check(pos.dim() == 2 and neg.dim() == 2,
          f"expected [N, d] activations, got {tuple(pos.shape)} and {tuple(neg.shape)}")
    check(pos.shape[1] == neg.shape[1], f"width mismatch: {pos.shape[1]} vs {neg.shape[1]}")
    check(pos.shape[0] > 0 and neg.shape[0] > 0, "need at least one positive and one negative example")


def _scale_to_separation(unit: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    sep = float(pos.mean(0) @ unit - neg.mean(0) @ unit)
    if sep < 0:
        unit, sep = -unit, -sep
    return unit * sep


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Difference of class means (CAA / DiffMean)."""
    _check_pair(pos, neg)
    return pos.double().mean(0).sub(neg.double().mean(0)).float()


def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal direction of the paired differences ``pos[i] - neg[i]`` (uncentred, as
    RepE/repeng read them), sign-aligned so ``+`` means the positive class."""
    _check_pair(pos, neg)
    check(pos.shape[0] == neg.shape[0],
          f"pca needs paired examples, got {pos.shape[0]} positive and {neg.shape[0]} negative")
    diffs = (pos - neg).double()
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    unit = vh[0]
    return _scale_to_separation(unit, pos.double(), neg.double()).float()


def actadd(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Activation Addition: the difference of one prompt pair (the first one)."""
    _check_pair(pos, neg)
    return (pos[0].double() - neg[0].double()).float()


def probe_weight(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Normal of a logistic-regression boundary (scikit-learn), in activation units."""
    from sklearn.linear_model import LogisticRegression

    _check_pair(pos, neg)
    x = torch.cat([pos, neg]).double()
    y = [1] * pos.shape[0] + [0] * neg.shape[0]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=1.0, max_iter=2000)
    clf.fit(((x - mu) / sd).numpy(), y)
    w = torch.as_tensor(clf.coef_[0], dtype=torch.float64) / sd  # back to raw activation space
    unit = w / w.norm().clamp_min(1e-12)
    return _scale_to_separation(unit, pos.double(), neg.double()).float()


METHODS: dict[str, Method] = {"mean_diff": mean_diff, "pca": pca, "actadd": actadd, "probe_weight": probe_weight}


def get_method(name: str) -> Method:
    check(name in METHODS, f"unknown method {name!r} (choose {', '.join(METHODS)})")
    return METHODS[name]


# ---- layer scan ---------------------------------------------------------------------------------

def auroc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count half
    (``sklearn.metrics.roc_auc_score`` with the positives as class 1)."""
    from sklearn.metrics import roc_auc_score

    p = pos_scores.detach().double().reshape(-1).cpu()
    n = neg_scores.detach().double().reshape(-1).cpu()
    check(p.numel() > 0 and n.numel() > 0, "AUROC needs scores of both classes")
    return float(roc_auc_score([1] * p.numel() + [0] * n.numel(), torch.cat([p, n]).numpy()))


@dataclass
class LayerScore:
    layer: int
    auroc: float       # held-out AUROC of the projection on the direction
    accuracy: float    # held-out accuracy of thresholding at the train midpoint
    separation: float  # held-out (mean_pos - mean_neg) / pooled std of projections
    token_norm: float  # typical norm of the residual stream here (median over examples)
    direction_norm: float  # length of the raw direction (mean class separation)


@dataclass
class LayerScan:
    method: str
    rows: list[LayerScore]
    recommended_layer: int
    recommended_strength: float
    n_train: int
    n_test: int
    in_sample: bool  # True when the set was too small to hold examples out

    def row(self, layer: int) -> LayerScore:
        return next(r for r in self.rows if r.layer == layer)

    def table(self) -> str:
        head = f"{'layer':>5} {'auroc':>6} {'acc':>6} {'sep':>6} {'|h|':>8} {'|dir|':>7}"
        lines = [head]
        for r in self.rows:
            mark = "  <- recommended" if r.layer == self.recommended_layer else ""
            lines.append(f"{r.layer:>5} {r.auroc:>6.3f} {r.accuracy:>6.3f} {r.separation:>6.2f} "
                         f"{r.token_norm:>8.2f} {r.direction_norm:>7.2f}{mark}")
        note = " (in-sample: too few examples to hold out)" if self.in_sample else ""
        lines.append(f"method {self.method}; held-out n={self.n_test}{note}; recommended layer "
                     f"{self.recommended_layer}, strength {self.recommended_strength:.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"method": self.method, "recommended_layer": self.recommended_layer,
                "recommended_strength": self.recommended_strength, "n_train": self.n_train,
                "n_test": self.n_test, "in_sample": self.in_sample,
                "rows": [asdict(r) for r in self.rows]}


def recommend_layer(rows: Sequence[LayerScore], n_layers: int) -> int:
    """Best held-out separability among blocks in ``LAYER_WINDOW`` of depth; near-ties (AUROC
    within 0.01 of the best) go to the larger separation. Falls back to all scanned layers when
    none lies in the window."""
    lo, hi = int(LAYER_WINDOW[0] * n_layers), max(int(round(LAYER_WINDOW[1] * n_layers)), 1)
    pool = [r for r in rows if lo <= r.layer < hi] or list(rows)
    best = max(r.auroc for r in pool)
    near = [r for r in pool if r.auroc >= best - 0.01]
    return max(near, key=lambda r: (r.separation, -r.layer)).layer


def scan(pos: Activations, neg: Activations, method: str, contrast: ContrastSet, *, n_layers: int,
         holdout: float = 0.3, seed: int = 0,
         splits: tuple[list[int], list[int], list[int], list[int]] | None = None) -> LayerScan:
    """Fit ``method`` on a train split at every collected layer; score on the held-out split.

    ``splits`` = ``(pos_train, pos_select, neg_train, neg_select)`` indices (e.g. a validation split
    of a set that also has a test split); by default a seeded ``holdout`` split of ``contrast``."""
    fn = get_method(method)
    pt, ph, nt, nh = splits if splits is not None else contrast.split(holdout, seed)
    in_sample = not ph or not nh
    if in_sample:
        pt, ph, nt, nh = (list(range(len(contrast.positive))), list(range(len(contrast.positive))),
                          list(range(len(contrast.negative))), list(range(len(contrast.negative))))
    rows = []
    for j, k in enumerate(pos.layers):
        p, n = pos.acts[:, j], neg.acts[:, j]
        d = fn(p[pt], n[nt])
        unit = d / d.norm().clamp_min(1e-12)
        sp, sn = p[ph] @ unit, n[nh] @ unit
        mid = 0.5 * float((p[pt] @ unit).mean() + (n[nt] @ unit).mean())
        acc = float(torch.cat([(sp > mid).float(), (sn <= mid).float()]).mean())
        pooled = torch.cat([sp - sp.mean(), sn - sn.mean()]).std().clamp_min(1e-6)
        norms = torch.cat([pos.token_norms[:, j], neg.token_norms[:, j]])
        rows.append(LayerScore(layer=k, auroc=auroc(sp, sn), accuracy=acc,
                               separation=float((sp.mean() - sn.mean()) / pooled),
                               token_norm=float(norms.median()), direction_norm=float(d.norm())))
    layer = recommend_layer(rows, n_layers)
    strength = STRENGTH_FRACTION * next(r.token_norm for r in rows if r.layer == layer)
    return LayerScan(method=method, rows=rows, recommended_layer=layer,
                     recommended_strength=float(f"{strength:.4g}"), n_train=len(pt) + len(nt),
                     n_test=len(ph) + len(nh), in_sample=in_sample)


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int] | None:
    """``"A-B"``, ``"3,5,7"``, ``"all"`` or a list -> sorted layer list (checked against the model)."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            check(part != "", f"bad layer list {spec!r}")
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    a_i, b_i = int(a), int(b)
                    check(a_i <= b_i, f"bad layer range {part!r} (start after end)")
                    out.update(range(a_i, b_i + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise UserError(f"bad layer list {spec!r} (use e.g. 4-12 or 3,5,7)") from None
        layers = sorted(out)
    else:
        layers = sorted({int(k) for k in spec})
    bad = [k for k in layers if not 0 <= k < n_layers]
    check(not bad, f"layer(s) {bad} out of range: the model has {n_layers} blocks (0-{n_layers - 1})")
    return layers


def extract(lm: LoadedModel, contrast: ContrastSet, method: str = "mean_diff", *,
            layers: Sequence[int] | str | None = None, position: str | None = None, chat: bool = True,
            batch_size: int = 8, holdout: float = 0.3, seed: int = 0, progress: bool = False,
            description: str | None = None) -> tuple[SteeringVector, LayerScan]:
    """Extract a steering vector from ``contrast`` at every wanted layer, with the layer scan.

    The returned vector holds unit directions fitted on all examples; its metadata records the
    recommended layer and strength and the scan table.
    """
    get_method(method)
    wanted = parse_layers(layers, lm.n_layers)
    position = position or contrast.default_position
    check(method != "pca" or contrast.paired, "pca needs paired examples (as many positive as negative)")
    if method == "actadd" and len(contrast.positive) > 1:
        log.info("actadd uses only the first pair of the contrast set")
    kw = dict(layers=wanted, position=position, chat=chat, batch_size=batch_size, progress=progress)
    pos = collect(lm, contrast.prompts or contrast.positive,
                  contrast.positive if contrast.prompts else None, desc="positive", **kw)
    neg = collect(lm, contrast.prompts or contrast.negative,
                  contrast.negative if contrast.prompts else None, desc="negative", **kw)
    table = scan(pos, neg, method, contrast, n_layers=lm.n_layers, holdout=holdout, seed=seed)
    fn = get_method(method)
    directions, raw_norms = {}, {}
    for j, k in enumerate(pos.layers):
        d = fn(pos.acts[:, j], neg.acts[:, j])
        n = float(d.norm())
        check(n > 0, f"the {method} direction at layer {k} is zero (are the two classes identical?)")
        directions[k] = d / n
        raw_norms[str(k)] = round(n, 4)
    vec = SteeringVector(
        directions=directions, model=lm.name, d_model=lm.d_model, n_layers=lm.n_layers, method=method,
        dataset=contrast.name, recommended_layer=table.recommended_layer,
        recommended_strength=table.recommended_strength, normalized=True,
        description=description or contrast.description or f"{contrast.name} ({method})",
        extra={"position": position, "chat": chat, "labels": list(contrast.labels),
               "model_type": getattr(lm.model.config, "model_type", None),
               "n_positive": len(contrast.positive), "n_negative": len(contrast.negative),
               "raw_norms": raw_norms, "layer_scan": table.to_dict()},
    )
    return vec, table
