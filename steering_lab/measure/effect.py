"""Each vector's own effect measure: how its behaviour is scored on generated text.

A sentiment vector is measured by how positive the text reads, a formality vector by how formal,
a refusal vector by whether the answer refuses: "effect" means the vector's concept, and refusal is
one metric among the cost metrics for everything else. A vector names its measure in its json
(``effect_measure``):

* ``{"kind": "probe", "probe": NAME, "sign": 1}`` — a linear probe trained on the held-out part of
  the vector's own contrast set (:func:`train_effect_probe`), reading the generated text;
* ``{"kind": "refusal", "sign": 1}`` — the refusal judge (``metrics.is_refusal`` on the opening);
* ``{"kind": "scorer", "name": NAME, "sign": 1}`` — a scorer registered in Python with
  :func:`register_scorer` (``fn(prompts, texts) -> scores``).

``sign`` says which way positive strengths push: scores are reported so that higher = more of what
the vector's positive direction means. A scorer returns one number per text, higher = more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError, check

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
KINDS = ("probe", "refusal", "scorer")
_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, fn: Scorer) -> None:
    """Make ``fn(prompts, texts) -> [score, ...]`` available as ``{"kind": "scorer", "name": name}``."""
    check(isinstance(name, str) and name.strip() != "", "a scorer needs a name")
    check(callable(fn), "a scorer must be callable as fn(prompts, texts)")
    _SCORERS[name] = fn


def _refusal_scores(prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
    from ..metrics import is_refusal

    return [float(is_refusal(t, opening=True)) for t in texts]


def _informality_scores(prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
    from ..metrics import informality

    return [float(informality(t)) for t in texts]


register_scorer("informality", _informality_scores)


@dataclass(frozen=True)
class EffectMeasure:
    kind: str
    name: str = ""   # probe name (kind "probe") or scorer name (kind "scorer")
    sign: int = 1    # +1: positive strengths raise the score; -1: they lower it
    description: str = ""

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"unknown effect measure kind {self.kind!r} (choose {', '.join(KINDS)})")
        check(self.sign in (1, -1), "an effect measure's sign must be 1 or -1")
        if self.kind in ("probe", "scorer"):
            check(isinstance(self.name, str) and self.name.strip() != "",
                  f"an effect measure of kind {self.kind!r} needs a name")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "sign": self.sign}
        if self.name:
            out["name" if self.kind == "scorer" else "probe"] = self.name
        if self.description:
            out["description"] = self.description
        return out

    @classmethod
    def from_dict(cls, d: Any) -> EffectMeasure:
        check(isinstance(d, dict), "effect_measure must be a JSON object")
        kind = d.get("kind")
        name = d.get("probe") if kind == "probe" else d.get("name", "")
        sign = d.get("sign", 1)
        check(isinstance(sign, int) and not isinstance(sign, bool), "effect_measure 'sign' must be 1 or -1")
        return cls(kind=kind, name=name or "", sign=sign, description=str(d.get("description", "")))

    @property
    def label(self) -> str:
        if self.kind == "refusal":
            return "refusal (opening)"
        return f"{self.kind} {self.name}" + (" (reversed)" if self.sign < 0 else "")


def measure_of(vector: Any) -> EffectMeasure | None:
    """The vector's own effect measure from its metadata, or None when it has none."""
    raw = getattr(vector, "extra", {}).get("effect_measure")
    if raw is None:
        return None
    try:
        return EffectMeasure.from_dict(raw)
    except UserError as exc:
        raise UserError(f"the vector's effect_measure is not valid: {exc}") from None


def set_measure(vector: Any, measure: EffectMeasure) -> None:
    """Record ``measure`` in the vector's metadata (saved with it)."""
    vector.extra["effect_measure"] = measure.to_dict()


def scorer_for(lm: Any, measure: EffectMeasure, probes: Any = None) -> Scorer:
    """A batched ``scorer(prompts, texts) -> scores`` (higher = more of the vector's positive
    direction). ``probes``: a library with ``.get(name)`` or a ``{name: Probe}`` dict, for probe
    measures."""
    if measure.kind == "refusal":
        base: Scorer = _refusal_scores
    elif measure.kind == "scorer":
        check(measure.name in _SCORERS, f"no scorer called {measure.name!r} is registered "
                                        f"(known: {', '.join(sorted(_SCORERS)) or 'none'})")
        base = _SCORERS[measure.name]
    else:
        from ..probes import Probe, score_texts_with_probe

        check(probes is not None, f"the effect measure reads probe {measure.name!r}: pass the probe library")
        probe = probes.get(measure.name) if not isinstance(probes, dict) else probes.get(measure.name)
        check(isinstance(probe, Probe), f"no probe called {measure.name!r} for this effect measure")
        probe.check_model(lm)

        def base(prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
            keep = [i for i, t in enumerate(texts) if t.strip()]
            out = [float("nan")] * len(texts)
            if keep:
                for i, s in zip(keep, score_texts_with_probe(lm, probe, [texts[i] for i in keep])):
                    out[i] = float(s)
            return out

    if measure.sign > 0:
        return base

    def flipped(prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
        return [1.0 - s if measure.kind != "scorer" else -s for s in base(prompts, texts)]

    return flipped


def effect_for(lm: Any, vector: Any, probes: Any = None) -> tuple[Scorer | None, str]:
    """``(scorer, label)`` of the vector's own effect measure, or ``(None, "")`` when it has none."""
    measure = measure_of(vector)
    if measure is None:
        return None, ""
    return scorer_for(lm, measure, probes), measure.label


def train_effect_probe(lm: Any, contrast: Any, name: str, *, seed: int = 0, layers: Sequence[int] | None = None,
                       progress: bool = False):
    """A probe that reads the vector's concept in text: trained on the contrast set's two poles as
    plain text (the answers, without their prompts: generated text is scored alone), the layer chosen
    on a validation split, reported on a test split that chose nothing. Returns ``(probe, measure)``;
    save the probe as ``name`` in the probe library and record the measure with :func:`set_measure`."""
    from ..datasets import ContrastSet
    from ..probes import train_probe

    check(isinstance(contrast, ContrastSet), "train_effect_probe needs a ContrastSet")
    n_pos, n_neg = len(contrast.positive), len(contrast.negative)
    check(min(n_pos, n_neg) >= 6, f"an effect probe needs at least 6 examples per side "
                                  f"({contrast.name!r} has {n_pos} and {n_neg})")
    texts = ContrastSet(name=contrast.name, positive=list(contrast.positive), negative=list(contrast.negative),
                        description=contrast.description, labels=contrast.labels)
    splits = three_way_split(n_pos, n_neg, seed)
    if layers is None:  # the middle half: early blocks read words (a lexical probe), not the concept
        layers = list(range(lm.n_layers // 4, max(lm.n_layers // 4 + 1, (3 * lm.n_layers) // 4)))
    probe, _ = train_probe(lm, texts, pooling="mean", splits=splits, chat=False, layers=layers,
                           progress=progress)
    probe.metrics["selected_on"] = "val"
    probe.metrics["reported_on"] = "test"
    probe.description = f"effect probe: {contrast.labels[0]} (1) vs {contrast.labels[1]} (0) in generated text"
    measure = EffectMeasure(kind="probe", name=name, sign=1,
                            description=f"probe {name}: {contrast.labels[0]} vs {contrast.labels[1]} in the text")
    return probe, measure


def three_way_split(n_pos: int, n_neg: int, seed: int = 0, val: float = 0.2, test: float = 0.2):
    """Seeded disjoint train / val / test index pairs (paired sets keep pairs together)."""
    import random

    def cut(n: int, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
        idx = list(range(n))
        rng.shuffle(idx)
        k_test, k_val = max(1, round(n * test)), max(1, round(n * val))
        return sorted(idx[k_test + k_val:]), sorted(idx[k_test:k_test + k_val]), sorted(idx[:k_test])

    if n_pos == n_neg:
        tr, va, te = cut(n_pos, random.Random(seed))
        return (tr, list(tr)), (va, list(va)), (te, list(te))
    ptr, pva, pte = cut(n_pos, random.Random(seed))
    ntr, nva, nte = cut(n_neg, random.Random(seed + 1))
    return (ptr, ntr), (pva, nva), (pte, nte)
