"""Personality and persona trait directions (Big Five or any custom trait).

For a trait, two system prompts ask the model to express the trait or its opposite; the model
answers a bundled set of neutral questions under each. Two directions come out:

* **response direction** (the main one, as persona vectors do): mean block output over the
  model's own *response* tokens, read without the system prompt, trait-high minus trait-low;
* **prompt direction**: last-token activations of the system-prompted prompts, high minus low.

The layer is chosen by the layer scan. The **trait score** of a text is its projection on the
response direction at that layer, calibrated on the contrast set: 0 = like the trait-low answers,
1 = like the trait-high answers (values outside [0, 1] are more extreme than either).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .activations import Activations, collect
from .datasets import ContrastSet, _data_text, _jsonl_rows, _lines
from .errors import check
from .extract import LayerScan, auroc, extract, get_method, scan
from .model import LoadedModel
from .vector import SteeringVector


@dataclass(frozen=True)
class Trait:
    name: str
    high: str  # description of the trait expressed
    low: str   # description of its opposite

    def system(self, pole: str) -> str:
        text = self.high if pole == "high" else self.low
        return (f"You are a person who is {text}. Stay in character and let it show clearly in everything you say, "
                "in the first person.")


BIG_FIVE = {
    "openness": Trait("openness",
                      "very open to experience: curious, imaginative, creative, eager for new ideas, art and "
                      "unusual experiences",
                      "very closed to experience: conventional, incurious, suspicious of new ideas, attached to "
                      "routine and the familiar"),
    "conscientiousness": Trait("conscientiousness",
                               "very conscientious: organised, careful, disciplined, always planning ahead and "
                               "paying attention to detail",
                               "very unconscientious: careless, disorganised, impulsive, always procrastinating and "
                               "ignoring details"),
    "extraversion": Trait("extraversion",
                          "very extraverted: outgoing, talkative, energetic, loving parties and being around people",
                          "very introverted: reserved, quiet, solitary, preferring to be alone and avoiding crowds"),
    "agreeableness": Trait("agreeableness",
                           "very agreeable: warm, kind, cooperative, trusting and considerate of others",
                           "very disagreeable: cold, rude, competitive, suspicious and dismissive of others"),
    "neuroticism": Trait("neuroticism",
                         "very neurotic: anxious, moody, easily stressed, constantly worried and insecure",
                         "very emotionally stable: calm, relaxed, secure, rarely worried or upset"),
}


def persona_questions() -> list[str]:
    return _lines(_data_text("persona_questions.txt"))


# Questions 0-29 build the contrast set; 30-39 are held out for evaluations.
TRAIN_QUESTIONS, TEST_QUESTIONS = slice(0, 30), slice(30, None)


def get_trait(name: str, description: str | None = None) -> Trait:
    """A Big Five trait by name, or a custom one from a name and a one-line description."""
    key = name.strip().lower()
    check(key != "", "a trait needs a name")
    if description is None:
        check(key in BIG_FIVE, f"unknown trait {name!r}: give --description for a custom trait "
                               f"(built in: {', '.join(BIG_FIVE)})")
        return BIG_FIVE[key]
    desc = description.strip().rstrip(".")
    check(desc != "", "the trait description is empty")
    return Trait(key, f"{key}: {desc}", f"the opposite of {key}: not at all {desc}")


def trait_openings(trait: Trait) -> dict[str, list[str]]:
    """Openings that start each answer in character (hand-written for the Big Five; built from
    the description for a custom trait). The model writes the rest of the answer itself."""
    import json

    rows = [json.loads(line) for line in _lines(_data_text("trait_openings.jsonl"))]
    found = {pole: [r["text"] for r in rows if r["trait"] == trait.name and r["pole"] == pole]
             for pole in ("high", "low")}
    if found["high"] and found["low"]:
        return found
    return {"high": [f"As someone who is {trait.high}, I'd say"], "low": [f"As someone who is {trait.low}, I'd say"]}


def trait_contrast(lm: LoadedModel, trait: Trait, questions: Sequence[str] | None = None, *,
                   max_new_tokens: int = 40, batch_size: int = 40, progress: bool = False) -> ContrastSet:
    """Answers to ``questions`` in character, trait-high vs trait-low: the trait's system prompt,
    an opening in character, then the model's own continuation (a 135M model follows a persona
    system prompt too weakly on its own for a clean contrast)."""
    from .generate import final, stream

    questions = list(persona_questions()[TRAIN_QUESTIONS] if questions is None else questions)
    check(len(questions) >= 4, "a trait needs at least 4 questions")
    openings = trait_openings(trait)
    answers: dict[str, list[str]] = {}
    used: dict[str, list[str]] = {}
    for pole in tqdm(("high", "low"), desc=f"{trait.name} answers", disable=not progress, leave=False):
        system = trait.system(pole)
        starts = used[pole] = [openings[pole][i % len(openings[pole])] for i in range(len(questions))]
        ids = [lm.encode_prompt(q, system=system) + lm.encode(o, special=False) for q, o in zip(questions, starts)]
        out: list[str] = []
        for i in range(0, len(questions), batch_size):
            last = final(stream(lm, questions[i:i + batch_size], max_new_tokens=max_new_tokens,
                                prompt_ids=ids[i:i + batch_size]))
            out += last.texts
        answers[pole] = [(o + c).strip() for o, c in zip(starts, out)]
    return ContrastSet(name=f"trait:{trait.name}", prompts=questions, positive=answers["high"],
                       negative=answers["low"],
                       description=f"{trait.name}: answers in character, high vs low (+ = {trait.name})",
                       labels=(f"high {trait.name}", f"low {trait.name}"), meta={"openings": used})


def continuations(contrast: ContrastSet) -> ContrastSet:
    """The same answers without their written openings: only what the model wrote itself (for
    probes that should read the model's text, not our openings)."""
    used = contrast.meta.get("openings")
    check(used is not None, "this contrast set has no recorded openings")

    def strip(texts: list[str], starts: list[str]) -> list[str]:
        return [t[len(o):].strip() if t.startswith(o) else t for t, o in zip(texts, starts)]

    pos, neg = strip(contrast.positive, used["high"]), strip(contrast.negative, used["low"])
    keep = [i for i in range(len(pos)) if pos[i] and neg[i]]
    return ContrastSet(name=contrast.name + " (continuations)", positive=[pos[i] for i in keep],
                       negative=[neg[i] for i in keep], labels=contrast.labels,
                       description=contrast.description + "; the model's own continuations only")


def trait_direction(lm: LoadedModel, trait: Trait, *, contrast: ContrastSet | None = None,
                    progress: bool = False) -> tuple[SteeringVector, SteeringVector]:
    """``(response_vector, prompt_vector)`` for ``trait``; both unit-norm at every layer with the
    layer scan, the response vector carrying the trait-score calibration."""
    contrast = contrast or trait_contrast(lm, trait, progress=progress)
    vec, scan = extract(lm, contrast, "mean_diff", position="response_mean", progress=progress,
                        description=f"{trait.name} (+) / its opposite (-): persona direction from the model's own "
                                    "answers in character (mean over response tokens)")
    vec.extra["trait"] = {"name": trait.name, "high": trait.high, "low": trait.low}
    layer = vec.recommended_layer
    calibrate_trait(lm, vec, contrast)
    unit = vec[layer]
    # the prompt direction: last token of the system-prompted prompts
    kw = dict(position="last", progress=progress)
    ph = collect(lm, contrast.prompts, system=trait.system("high"), **kw)
    pl = collect(lm, contrast.prompts, system=trait.system("low"), **kw)
    dirs = {}
    for j, k in enumerate(ph.layers):
        d = ph.acts[:, j].mean(0) - pl.acts[:, j].mean(0)
        dirs[k] = d / d.norm().clamp_min(1e-12)
    prompt_vec = SteeringVector(directions=dirs, model=lm.name, d_model=lm.d_model, n_layers=lm.n_layers,
                                method="mean_diff", dataset=contrast.name, recommended_layer=layer,
                                recommended_strength=vec.recommended_strength, normalized=True,
                                description=f"{trait.name}: prompt direction (last token of the system-prompted "
                                            "prompt, high minus low)",
                                extra={"trait": vec.extra["trait"], "position": "last (system-prompted)"})
    cos = float(torch.nn.functional.cosine_similarity(dirs[layer], unit, dim=0))
    vec.extra["cosine_with_prompt_direction"] = round(cos, 4)
    prompt_vec.extra["cosine_with_response_direction"] = round(cos, 4)
    return vec, prompt_vec


def calibrate_trait(lm: LoadedModel, vec: SteeringVector, contrast: ContrastSet) -> None:
    """Set ``vec.extra["trait_score"]``: mean projections of the high and low answers at the
    recommended layer (the 1 and the 0 of the trait score)."""
    layer = vec.recommended_layer
    pos = collect(lm, contrast.prompts, contrast.positive, layers=[layer], position="response_mean").acts[:, 0]
    neg = collect(lm, contrast.prompts, contrast.negative, layers=[layer], position="response_mean").acts[:, 0]
    unit = vec[layer].float()
    vec.extra["trait_score"] = {"layer": layer, "mu_high": float((pos @ unit).mean()),
                                "mu_low": float((neg @ unit).mean())}


def decorrelate(lm: LoadedModel, vectors: dict[str, SteeringVector],
                contrasts: dict[str, ContrastSet] | None = None,
                statement_cache: dict[str, dict[str, Activations]] | None = None) -> dict[str, SteeringVector]:
    """Symmetric (Löwdin) orthogonalisation of several trait directions, layer by layer.

    Trait directions of one model share components (here the Big Five share a "pleasant,
    engaged" axis: cosines 0.15-0.45), so steering one also moves the others. ``D (D D^T)^-1/2``
    gives the orthonormal set closest to the originals; each trait's score is recalibrated on its
    new direction (on ``contrasts`` when given, else on the bundled statements of each trait)."""
    names = list(vectors)
    check(len(names) >= 2, "decorrelation needs at least two vectors")
    layers = sorted(set.intersection(*(set(v.layers) for v in vectors.values())))
    new_dirs: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}
    for k in layers:
        d = torch.stack([vectors[n][k].double() / vectors[n][k].double().norm() for n in names])
        evals, evecs = torch.linalg.eigh(d @ d.T)
        check(bool((evals > 1e-8).all()), f"trait directions at layer {k} are linearly dependent")
        ortho = (evecs @ torch.diag(evals.rsqrt()) @ evecs.T) @ d
        for i, n in enumerate(names):
            new_dirs[n][k] = (ortho[i] / ortho[i].norm()).float()
    out = {}
    for n in names:
        old = vectors[n]
        vec = SteeringVector(directions=new_dirs[n], model=old.model, d_model=old.d_model, n_layers=old.n_layers,
                             method=old.method + " (decorrelated)", dataset=old.dataset,
                             recommended_layer=old.recommended_layer, recommended_strength=old.recommended_strength,
                             normalized=True, description=old.description + "; decorrelated from "
                             + ", ".join(m for m in names if m != n) + " (symmetric orthogonalisation)",
                             extra=dict(old.extra))
        k = old.recommended_layer
        vec.extra["cosine_with_raw_direction"] = round(float(vec[k] @ old[k].float()), 4)
        if contrasts is not None:
            calibrate_trait(lm, vec, contrasts[n])
        else:
            calibrate_on_statements(lm, vec, (statement_cache or {}).get(n))
        out[n] = vec
    return out



# ---- trait statements: first-person texts written for this project, not keyed on our openings ----

# Every statement is scored as the answer to this one prompt (trait score, statement directions).
STATEMENT_PROMPT = "Tell me something about yourself."
# Fractions of each pole's statements in train / val (selection) / test (report); the split of a
# statement depends only on its text (a hash), so it is deterministic and stable when texts are added.
STATEMENT_SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))


def _key(text: str) -> str:
    """Lower-cased, punctuation and extra spaces removed: near-duplicates share a key."""
    import re

    return re.sub(r"[^a-z0-9 ]", "", re.sub(r"\s+", " ", text.lower())).strip()


def trait_statements(name: str, *, heldout: bool = False) -> dict[str, list[str]]:
    """``{"high": [...], "low": [...]}``: the bundled statements of a Big Five trait
    (``data/traits/NAME.jsonl``: first-person, everyday topics), or with ``heldout`` the differently
    styled held-out set (``data/traits_heldout/NAME.jsonl``: third person, diary, interview answers),
    which nothing trains or selects on."""
    check(name in BIG_FIVE, f"no bundled statements for {name!r} (built in: {', '.join(BIG_FIVE)})")
    folder = "traits_heldout" if heldout else "traits"
    where = f"{folder}/{name}.jsonl"
    out: dict[str, list[str]] = {"high": [], "low": []}
    for n, row in enumerate(_jsonl_rows(_data_text(where), where), 1):
        pole, text = row.get("pole"), row.get("text")
        check(pole in out, f"{where} row {n}: 'pole' must be 'high' or 'low'")
        check(isinstance(text, str) and text.strip() != "", f"{where} row {n}: empty 'text'")
        out[pole].append(text.strip())
    return out


def statement_split_indices(texts: Sequence[str]) -> dict[str, list[int]]:
    """Indices of ``texts`` in each of train / val / test: sorted by a hash of the text, then cut."""
    import hashlib

    order = sorted(range(len(texts)), key=lambda i: hashlib.sha256(_key(texts[i]).encode()).hexdigest())
    out, start = {}, 0
    for j, (split, frac) in enumerate(STATEMENT_SPLITS):
        stop = len(order) if j == len(STATEMENT_SPLITS) - 1 else start + round(frac * len(order))
        out[split] = sorted(order[start:stop])
        start = stop
    return out


def trait_statement_set(name: str, split: str | None = None) -> ContrastSet:
    """The statements of ``name`` as a contrast set (+ = high), all of them or one split
    (``train``, ``val``, ``test``, or ``heldout_style`` for the differently styled held-out set)."""
    splits = [s for s, _ in STATEMENT_SPLITS]
    check(split is None or split in splits + ["heldout_style"],
          f"unknown split {split!r} (choose {', '.join(splits)} or heldout_style)")
    poles = trait_statements(name, heldout=split == "heldout_style")
    if split not in (None, "heldout_style"):
        poles = {p: [t[i] for i in statement_split_indices(t)[split]] for p, t in poles.items()}
    return ContrastSet(name=f"traits:{name}" + (f" ({split})" if split else ""), positive=poles["high"],
                       negative=poles["low"], labels=(f"high {name}", f"low {name}"),
                       description=f"{name}: statements, high (1) vs low (0)")


def statement_splits(name: str):
    """``(train, val, test)`` index pairs into :func:`trait_statement_set` ``(name)`` (all statements)."""
    poles = trait_statements(name)
    idx = {p: statement_split_indices(t) for p, t in poles.items()}
    return tuple((idx["high"][s], idx["low"][s]) for s, _ in STATEMENT_SPLITS)


def statement_acts(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int] | None = None, *,
                   batch_size: int = 16, progress: bool = False) -> Activations:
    """Mean block output over each statement's tokens, as the answer to :data:`STATEMENT_PROMPT`."""
    return collect(lm, [STATEMENT_PROMPT] * len(texts), list(texts), layers=layers, position="response_mean",
                   batch_size=batch_size, progress=progress, desc="statements")


def statement_activations(lm: LoadedModel, name: str, layers: Sequence[int] | None = None, *,
                          progress: bool = False) -> dict[str, Activations]:
    """:func:`statement_acts` of all statements of ``name`` (``high``, ``low``) and of its held-out style
    set (``heldout_high``, ``heldout_low``): one pass each, to share between fitting and calibration."""
    cs, held = trait_statement_set(name), trait_statement_set(name, "heldout_style")
    kw = dict(progress=progress)
    return {"high": statement_acts(lm, cs.positive, layers, **kw), "low": statement_acts(lm, cs.negative, layers, **kw),
            "heldout_high": statement_acts(lm, held.positive, layers, **kw),
            "heldout_low": statement_acts(lm, held.negative, layers, **kw)}


def statement_direction(lm: LoadedModel, trait: Trait, *, acts: dict[str, Activations] | None = None,
                        progress: bool = False) -> SteeringVector:
    """The response direction of ``trait`` from its bundled statements (mean difference, high minus
    low, of the statements' mean block output as answers to :data:`STATEMENT_PROMPT`), fitted on the
    train split; layer and strength chosen by the usual layer scan on the validation split
    (``extract.recommend_layer``, strength ``STRENGTH_FRACTION`` x token norm); the trait score
    calibrated on the train split; ``extra["metrics"]`` holds the score's AUROC on val, on test
    (chose nothing) and on the differently styled held-out set. ``acts``: from
    :func:`statement_activations` (all layers), computed here when not given."""
    cs = trait_statement_set(trait.name)
    train, val, _ = statement_splits(trait.name)
    acts = acts or statement_activations(lm, trait.name, progress=progress)
    pos, neg = acts["high"], acts["low"]
    table: LayerScan = scan(pos, neg, "mean_diff", cs, n_layers=lm.n_layers,
                            splits=(train[0], val[0], train[1], val[1]))
    fn = get_method("mean_diff")
    dirs, raw = {}, {}
    for j, k in enumerate(pos.layers):
        d = fn(pos.acts[train[0], j], neg.acts[train[1], j])
        dirs[k] = d / d.norm().clamp_min(1e-12)
        raw[str(k)] = round(float(d.norm()), 4)
    vec = SteeringVector(directions=dirs, model=lm.name, d_model=lm.d_model, n_layers=lm.n_layers,
                         method="mean_diff", dataset=cs.name, recommended_layer=table.recommended_layer,
                         recommended_strength=table.recommended_strength, normalized=True,
                         description=f"{trait.name} (+) / its opposite (-): mean difference of first-person "
                                     "statements (mean over their tokens, answering one fixed prompt)",
                         extra={"position": "response_mean", "chat": True, "labels": list(cs.labels),
                                "model_type": getattr(lm.model.config, "model_type", None),
                                "n_positive": len(train[0]), "n_negative": len(train[1]), "raw_norms": raw,
                                "layer_scan": dict(table.to_dict(), selected_on="val", fitted_on="train"),
                                "trait": {"name": trait.name, "high": trait.high, "low": trait.low}})
    calibrate_on_statements(lm, vec, acts)
    return vec


def calibrate_on_statements(lm: LoadedModel, vec: SteeringVector, acts: dict[str, Activations] | None = None) -> None:
    """Trait-score calibration of ``vec`` on the train statements of its trait (``mu_high``/``mu_low``
    = mean projections), and ``vec.extra["metrics"]``: the trait score's AUROC on val, test and the
    differently styled held-out set, each named by its split."""
    name = vec.extra["trait"]["name"]
    train, val, test = statement_splits(name)
    if acts is None:
        acts = statement_activations(lm, name, [vec.recommended_layer])
    # the score reads the layer where the projection separates the validation statements best (the
    # steering layer stays the layer scan's choice; near-ties go to the steering layer, then the shallower)
    layers = [k for k in acts["high"].layers if k in vec.directions]

    def val_auroc(k: int) -> float:
        u = vec[k].float()
        j = acts["high"].layers.index(k)
        return auroc(acts["high"].acts[val[0], j] @ u, acts["low"].acts[val[1], j] @ u)

    scores = {k: val_auroc(k) for k in layers}
    best = max(scores.values())
    near = [k for k in layers if scores[k] >= best - 0.005]
    layer = vec.recommended_layer if vec.recommended_layer in near else min(near)
    unit = vec[layer].float()
    proj = {k: a.acts[:, a.layers.index(layer)] @ unit for k, a in acts.items()}
    pp, pn, hp, hn = proj["high"], proj["low"], proj["heldout_high"], proj["heldout_low"]
    vec.extra["trait_score"] = {"layer": layer, "mu_high": float(pp[train[0]].mean()),
                                "mu_low": float(pn[train[1]].mean()), "calibrated_on": "train",
                                "prompt": STATEMENT_PROMPT, "layer_selected_on": "val",
                                "val_auroc_by_layer": {str(k): round(v, 4) for k, v in scores.items()}}
    vec.extra["metrics"] = {"val": {"auroc": auroc(pp[val[0]], pn[val[1]]), "n": len(val[0]) + len(val[1])},
                            "test": {"auroc": auroc(pp[test[0]], pn[test[1]]), "n": len(test[0]) + len(test[1])},
                            "heldout_style": {"auroc": auroc(hp, hn), "n": int(hp.numel() + hn.numel())},
                            "selected_on": "val", "selection_is_test": False,
                            "what": "AUROC of the trait score (projection at the recommended layer) on statements"}

def trait_scores(lm: LoadedModel, vec: SteeringVector, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Calibrated trait score of each (prompt, response): 0 ~ trait-low answers, 1 ~ trait-high answers."""
    cal = vec.extra.get("trait_score")
    check(cal is not None, "this vector has no trait-score calibration (make it with personas.trait_direction)")
    keep = [i for i, r in enumerate(responses) if r.strip()]
    out = [float("nan")] * len(responses)
    if not keep:
        return out
    acts = collect(lm, [prompts[i] for i in keep], [responses[i] for i in keep], layers=[cal["layer"]],
                   position="response_mean").acts[:, 0]
    proj = acts @ vec[cal["layer"]].float()
    span = cal["mu_high"] - cal["mu_low"]
    check(abs(span) > 0, "degenerate trait calibration")
    for i, v in zip(keep, ((proj - cal["mu_low"]) / span).tolist()):
        out[i] = v
    return out
