"""Behavioural calibration of a vector on a model: layer and strength chosen by measured effect
against measured cost, on validation prompts, reported on test prompts the choice never saw.

For every candidate layer, every candidate strength is generated in per-row-strength batches
(``generate.sweep_generate``) and scored: the vector's own effect (``measure.effect``), KL to the
unsteered model and perplexity under it (``metrics.score_texts``), distinct-2. The (effect, KL)
Pareto front is kept; the recommended point is the largest effect among *fluent* points (perplexity
at most ``max_ppl_ratio`` x unsteered, distinct-2 at least ``min_distinct_ratio`` x unsteered, KL
within ``kl_budget`` when given). The constant rule the vector came with (its ``recommended_layer``
and ``recommended_strength``) is the search's starting point and is always evaluated beside it.

A **prompting baseline** answers the same prompts with the behaviour asked for in a system prompt
(``instruction``), scored by the same effect and cost (``metrics.score_prompted``): rows "prompted",
"steered" and "prompted + steered" on one scale.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..errors import check
from ..generate import sweep_generate
from ..intervene import Steer
from ..metrics import distinct_n, nanmean, score_prompted, score_texts
from .effect import Scorer

STRENGTH_MULTIPLES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class Point:
    layer: int | None  # None: unsteered (strength 0)
    strength: float
    effect: float
    kl: float
    perplexity: float
    distinct2: float
    n: int
    fluent: bool = True


@dataclass
class Calibration:
    points: list[Point]
    front: list[Point]
    chosen: Point
    constant: Point
    baseline: Point
    fluent_range: tuple[float, float]
    test: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"chosen": asdict(self.chosen), "constant_rule": asdict(self.constant),
                "unsteered": asdict(self.baseline), "fluent_range": list(self.fluent_range),
                "front": [asdict(p) for p in self.front], "points": [asdict(p) for p in self.points],
                "test": self.test, "settings": self.settings}


def split_prompts(prompts: Sequence[str], seed: int = 0, n: int | None = None) -> tuple[list[str], list[str]]:
    """A seeded validation / test halving of (the first ``n`` after shuffling of) ``prompts``, each half
    in the original order."""
    import random

    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    order = order[: n or len(order)]
    half = len(order) // 2
    return [prompts[i] for i in sorted(order[:half])], [prompts[i] for i in sorted(order[half:])]


def directed(scorer: Scorer, direction: int) -> Scorer:
    """``scorer`` read toward ``direction``: itself for +1, negated for -1 (higher = more of the wanted pole)."""
    if direction > 0:
        return scorer
    return lambda prompts, texts: [-x for x in scorer(prompts, texts)]


def _score(lm, prompts: Sequence[str], texts: dict[float, list[str]], vector, layer: int, strengths: Sequence[float],
           scorer: Scorer, operator: str, batch_size: int) -> list[Point]:
    rows = [(s, i) for s in strengths for i in range(len(prompts))]
    flat_p = [prompts[i] for _, i in rows]
    flat_t = [texts[float(s)][i] for s, i in rows]
    sc = score_texts(lm, flat_p, flat_t, Steer(vector, [s for s, _ in rows], layers=[layer], operator=operator),
                     batch_size=batch_size)
    eff = scorer(flat_p, flat_t)
    check(len(eff) == len(flat_t), f"the effect scorer returned {len(eff)} scores for {len(flat_t)} texts")
    n = len(prompts)
    out = []
    for j, s in enumerate(strengths):
        part = slice(j * n, (j + 1) * n)
        out.append(Point(layer=layer if s != 0 else None, strength=float(s), effect=nanmean(eff[part]),
                         kl=nanmean(sc.kl[part]), perplexity=nanmean(sc.perplexity[part]),
                         distinct2=sum(distinct_n(t) for t in texts[float(s)]) / n, n=n))
    return out


def evaluate(lm, vector, prompts: Sequence[str], settings: Sequence[tuple[int, float]], scorer: Scorer, *,
             operator: str = "add", max_new_tokens: int = 32, batch_rows: int = 64, batch_size: int = 16,
             progress: bool = False) -> list[Point]:
    """Effect and cost of ``vector`` at each ``(layer, strength)`` on ``prompts`` (greedy)."""
    check(len(prompts) > 0, "no prompts to evaluate on")
    check(len(settings) > 0, "no settings to evaluate")
    by_layer: dict[int, list[float]] = {}
    for k, s in settings:
        check(math.isfinite(s), f"strength {s} is not a finite number")
        by_layer.setdefault(int(k), [])
        if float(s) not in by_layer[int(k)]:
            by_layer[int(k)].append(float(s))
    vector.check_model(lm, list(by_layer))
    points: dict[tuple[int | None, float], Point] = {}
    for k, strengths in tqdm(sorted(by_layer.items()), desc="layers", disable=not progress):
        texts = sweep_generate(lm, prompts, vector, strengths, layers=[k], operator=operator,
                               batch_rows=batch_rows, max_new_tokens=max_new_tokens)
        for p in _score(lm, prompts, texts, vector, k, strengths, scorer, operator, batch_size):
            points[(k, p.strength)] = p
    return [points[(int(k), float(s))] for k, s in settings]


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both effect (higher) and KL (lower), by increasing KL."""
    front = []
    for p in points:
        if any(math.isnan(v) for v in (p.effect, p.kl)):
            continue
        dominated = any(q is not p and q.effect >= p.effect and q.kl <= p.kl and (q.effect > p.effect or q.kl < p.kl)
                        for q in points if not any(math.isnan(v) for v in (q.effect, q.kl)))
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.kl, -p.effect))


def _mark_fluent(points: Sequence[Point], base: Point, max_ppl_ratio: float, min_distinct_ratio: float,
                 kl_budget: float | None) -> None:
    for p in points:
        ok = (p.perplexity <= max_ppl_ratio * base.perplexity and p.distinct2 >= min_distinct_ratio * base.distinct2)
        if kl_budget is not None:
            ok = ok and p.kl <= kl_budget
        p.fluent = bool(ok) or p.strength == 0


def calibrate(lm, vector, prompts: Sequence[str], scorer: Scorer, *, layers: Sequence[int] | None = None,
              strengths: Sequence[float] | None = None, direction: int = 1, operator: str = "add",
              test_prompts: Sequence[str] | None = None, max_new_tokens: int = 32, max_ppl_ratio: float = 2.0,
              min_distinct_ratio: float = 0.8, kl_budget: float | str | None = None, batch_rows: int = 64,
              progress: bool = False) -> Calibration:
    """Search layers x strengths on ``prompts`` (validation) for the largest fluent effect toward
    ``direction`` (+1: the vector's positive pole; -1: the negative one, strengths negated and the
    effect read reversed). Defaults: layers = every other block from 10% to 70% depth plus the
    vector's own layer; strengths = ``STRENGTH_MULTIPLES`` x its recommended strength.
    ``kl_budget="constant"`` caps KL at what the constant rule costs on the same prompts: the
    question "more effect for no more cost?"."""
    check(kl_budget is None or kl_budget == "constant" or (isinstance(kl_budget, (int, float)) and kl_budget >= 0),
          "kl_budget must be a non-negative number or 'constant'")
    check(direction in (1, -1), "direction must be 1 or -1")
    check(len(prompts) >= 2, "calibration needs at least 2 validation prompts")
    rec_layer, rec_strength = vector.recommended_layer, vector.recommended_strength
    check(rec_layer is not None and rec_strength is not None and rec_strength != 0,
          "the vector has no recommended layer/strength to start the search from")
    if layers is None:
        lo, hi = max(0, round(0.1 * lm.n_layers)), min(lm.n_layers - 1, round(0.7 * lm.n_layers))
        layers = sorted(({*range(lo, hi + 1, 2)} | {rec_layer}) & set(vector.layers))
    check(len(layers) > 0, "no candidate layers (the vector has directions at none of them)")
    magnitude = abs(rec_strength)
    if strengths is None:
        strengths = [m * magnitude for m in STRENGTH_MULTIPLES]
    check(all(s > 0 for s in strengths), "give strengths as positive magnitudes (direction sets the sign)")
    signed = [direction * float(s) for s in strengths]
    const_s = direction * magnitude

    sc = directed(scorer, direction)
    settings = [(int(k), s) for k in layers for s in signed]
    if (rec_layer, const_s) not in settings:
        settings.append((rec_layer, const_s))
    settings.append((rec_layer, 0.0))
    points = evaluate(lm, vector, prompts, settings, sc, operator=operator, max_new_tokens=max_new_tokens,
                      batch_rows=batch_rows, progress=progress)
    base = points[-1]
    points = points[:-1]
    constant = next(p for p in points if p.layer == rec_layer and p.strength == const_s)
    budget = constant.kl if kl_budget == "constant" else kl_budget
    _mark_fluent(points, base, max_ppl_ratio, min_distinct_ratio, budget)
    fluent = [p for p in points if p.fluent and not math.isnan(p.effect)]
    chosen = max(fluent, key=lambda p: (p.effect, -p.kl)) if fluent else base
    at_layer = sorted((p for p in points if p.layer == chosen.layer), key=lambda p: abs(p.strength))
    hi = 0.0
    for p in at_layer:  # the contiguous range of strengths from 0 that stay fluent at the chosen layer
        if not p.fluent:
            break
        hi = p.strength
    rng = (min(0.0, hi), max(0.0, hi))
    cal = Calibration(points=points, front=pareto_front(points), chosen=chosen, constant=constant, baseline=base,
                      fluent_range=rng,
                      settings={"direction": direction, "operator": operator, "layers": list(layers),
                                "strengths": signed, "max_new_tokens": max_new_tokens, "n_val": len(prompts),
                                "max_ppl_ratio": max_ppl_ratio, "min_distinct_ratio": min_distinct_ratio,
                                "kl_budget": kl_budget, "kl_budget_value": budget, "selected_on": "val"})
    if test_prompts:
        tests = [(chosen.layer if chosen.layer is not None else rec_layer, chosen.strength),
                 (rec_layer, const_s), (rec_layer, 0.0)]
        t = evaluate(lm, vector, test_prompts, tests, sc, operator=operator, max_new_tokens=max_new_tokens,
                     batch_rows=batch_rows)
        cal.test = {"calibrated": asdict(t[0]), "constant_rule": asdict(t[1]), "unsteered": asdict(t[2]),
                    "n_test": len(test_prompts), "reported_on": "test"}
    return cal


def record(vector, cal: Calibration, how: str = "grid search over layers x strengths, Pareto (effect, KL)") -> None:
    """Store the calibration in the vector's metadata and make its chosen point the recommendation
    (the constant rule stays recorded beside it)."""
    vector.extra["calibration"] = {"how": how, "created": _dt.datetime.now(_dt.timezone.utc)
                                   .replace(microsecond=0).isoformat(), **cal.to_dict()}
    if cal.chosen.layer is not None:
        vector.recommended_layer = cal.chosen.layer
        vector.recommended_strength = cal.chosen.strength


def prompting_rows(lm, vector, prompts: Sequence[str], scorer: Scorer, instruction: str, *, layer: int,
                   strength: float, operator: str = "add", max_new_tokens: int = 32) -> dict[str, dict]:
    """Rows "unsteered", "prompted", "steered", "prompted + steered" on the same prompts: effect,
    KL to the plain unsteered model, perplexity under it, distinct-2, and two sample answers each."""
    from ..generate import generate

    check(isinstance(instruction, str) and instruction.strip() != "", "the prompting baseline needs an instruction")
    check(len(prompts) > 0, "no prompts")
    vector.check_model(lm, [layer])
    item = Steer(vector, strength, layers=[layer], operator=operator)
    rows: dict[str, dict] = {}
    for name, system, steering in (("unsteered", None, ()), ("prompted", instruction, ()),
                                   ("steered", None, item), ("prompted + steered", instruction, item)):
        texts = generate(lm, list(prompts), steering, max_new_tokens=max_new_tokens, system=system)
        if system is None:
            costs = score_texts(lm, prompts, texts, steering)
        else:
            costs = score_prompted(lm, prompts, texts, system, steering)
        eff = scorer(list(prompts), texts)
        rows[name] = {"effect": nanmean(eff), "kl": nanmean(costs.kl), "perplexity": nanmean(costs.perplexity),
                      "distinct2": sum(distinct_n(t) for t in texts) / len(texts), "samples": texts[:2],
                      "system": system, "strength": strength if steering else 0.0}
    return rows


def default_instruction(vector, direction: int = 1) -> str:
    """The vector's behaviour asked for in words (editable): from its json ``instruction`` when it
    has one, else from its contrast labels / description."""
    own = vector.extra.get("instruction")
    if isinstance(own, dict):
        own = own.get("positive" if direction > 0 else "negative")
    if isinstance(own, str) and own.strip():
        return own
    labels = vector.extra.get("labels")
    if isinstance(labels, (list, tuple)) and len(labels) == 2:
        want = labels[0] if direction > 0 else labels[1]
        return f"Answer in a clearly {want} way."
    desc = (vector.description or vector.dataset or "the behaviour").strip().rstrip(".")
    return f"Answer so that your reply shows this: {desc}" + ("." if direction > 0 else " - the opposite of it.")
