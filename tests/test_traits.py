"""Big Five trait data (steering_lab/data/traits/, traits_heldout/), their splits, and the shipped trait
probes and vectors: honest metadata, and AUROC re-measured on the differently styled held-out set."""

import json
import random
from pathlib import Path

import pytest
import torch

from steering_lab.extract import auroc
from steering_lab.personas import (
    BIG_FIVE,
    STATEMENT_PROMPT,
    _key,
    statement_acts,
    statement_split_indices,
    statement_splits,
    trait_statement_set,
    trait_statements,
)
from steering_lab.probes import Probe, score_texts_with_probe

SHIPPED = Path(__file__).resolve().parents[1] / "steering_lab" / "shipped"
DATA = Path(__file__).resolve().parents[1] / "steering_lab" / "data"
SPLITS = ("train", "val", "test")


def test_data_files_parse_with_enough_unique_statements():
    for name in BIG_FIVE:
        for folder in ("traits", "traits_heldout"):
            rows = [json.loads(line) for line in (DATA / folder / f"{name}.jsonl").read_text().splitlines()
                    if line.strip()]
            assert all(set(r) == {"pole", "text"} and r["pole"] in ("high", "low") for r in rows), (folder, name)
        for heldout, minimum in ((False, 150), (True, 40)):
            poles = trait_statements(name, heldout=heldout)
            for pole, texts in poles.items():
                assert len({_key(t) for t in texts}) == len(texts) >= minimum, (name, heldout, pole, len(texts))
            # no statement on both sides, nor a near-duplicate of one
            assert not {_key(t) for t in poles["high"]} & {_key(t) for t in poles["low"]}, name


def test_no_statement_shared_between_training_and_heldout_data():
    train = {name: {_key(t) for ts in trait_statements(name).values() for t in ts} for name in BIG_FIVE}
    held = {name: {_key(t) for ts in trait_statements(name, heldout=True).values() for t in ts} for name in BIG_FIVE}
    everything_trained = set().union(*train.values())
    for name in BIG_FIVE:
        assert not held[name] & everything_trained, name
    assert _key("I'm  FINE, thanks!") == _key("im fine thanks")


def test_splits_are_disjoint_complete_deterministic_and_order_free():
    for name in BIG_FIVE:
        for texts in trait_statements(name).values():
            idx = statement_split_indices(texts)
            parts = [set(idx[s]) for s in SPLITS]
            assert sum(map(len, parts)) == len(texts) and set().union(*parts) == set(range(len(texts)))
            assert len(idx["val"]) >= 30 and len(idx["test"]) >= 30 and len(idx["train"]) >= 90
            assert idx == statement_split_indices(list(texts))  # deterministic
            shuffled = list(texts)
            random.Random(1).shuffle(shuffled)
            again = statement_split_indices(shuffled)  # a text's split depends on the text, not its place
            for s in SPLITS:
                assert {texts[i] for i in idx[s]} == {shuffled[i] for i in again[s]}
        sets = {s: trait_statement_set(name, s) for s in SPLITS}
        for a in SPLITS:
            for b in SPLITS:
                if a < b:
                    assert not set(sets[a].positive + sets[a].negative) & set(sets[b].positive + sets[b].negative)
        train, val, test = statement_splits(name)
        full = trait_statement_set(name)
        assert [full.positive[i] for i in val[0]] == sets["val"].positive
        assert [full.negative[i] for i in test[1]] == sets["test"].negative


def _named_metrics(m: dict) -> None:
    assert m["selected_on"] == "val" and m["selection_is_test"] is False
    for split in ("val", "test", "heldout_style"):
        assert 0 <= m[split]["auroc"] <= 1 and m[split]["n"] > 0, split


def test_shipped_trait_artifacts_name_the_split_of_every_number():
    for name in BIG_FIVE:
        meta = json.loads((SHIPPED / "probes" / f"{name}.json").read_text())
        m = meta["metrics"]
        _named_metrics(m)
        assert m["layer_sweep_split"] == "val" and m["reported_on"] == "test"
        assert m["test_auroc"] == m["test"]["auroc"] and m["select_auroc"] == m["val"]["auroc"]
        assert m["n_test"] == m["test"]["n"] == len(statement_splits(name)[2][0]) + len(statement_splits(name)[2][1])
        assert meta["dataset"] == f"traits:{name}"
        vmeta = json.loads((SHIPPED / "vectors" / f"{name}.json").read_text())
        _named_metrics(vmeta["metrics"])
        assert vmeta["trait_score"]["calibrated_on"] == "train"
        assert vmeta["layer_scan"]["selected_on"] == "val"


HELD_SLICE = 18  # statements per pole per trait: 180 plain texts, a few seconds on 2 CPU cores
MARGIN_FLOOR = 0.85  # the target is 0.9; on 18 + 18 texts one AUROC has a sampling s.d. of about 0.04-0.05
# trait scores that miss the 0.9 target on the whole held-out style set (bench/traits.md says why): their floor
# here is the level they reach, so a regression still fails
SCORE_FLOOR = {"extraversion": 0.75, "agreeableness": 0.7}
SCORE_SLICE = 12


@pytest.mark.real
def test_shipped_trait_probes_separate_the_heldout_style(smol):
    """Re-measured here (never read back from the json): each shipped trait probe on a fixed slice of
    the differently styled held-out statements."""
    for name in BIG_FIVE:
        held = trait_statement_set(name, "heldout_style")
        pos, neg = held.positive[:HELD_SLICE], held.negative[:HELD_SLICE]
        probe = Probe.load(SHIPPED / "probes" / name, smol)
        scores = torch.tensor(score_texts_with_probe(smol, probe, pos + neg, batch_size=36))
        a = auroc(scores[:HELD_SLICE], scores[HELD_SLICE:])
        assert a >= MARGIN_FLOOR, (name, "probe", a)


@pytest.mark.real
def test_shipped_trait_scores_separate_the_heldout_style(smol):
    """Each trait vector's trait score (projection at its calibrated layer, statements read as answers
    to the statement prompt), re-measured on a smaller fixed slice of the held-out style set."""
    from steering_lab.vector import SteeringVector

    for name in BIG_FIVE:
        held = trait_statement_set(name, "heldout_style")
        pos, neg = held.positive[:SCORE_SLICE], held.negative[:SCORE_SLICE]
        vec = SteeringVector.load(SHIPPED / "vectors" / name, smol)
        cal = vec.extra["trait_score"]
        assert cal["prompt"] == STATEMENT_PROMPT
        proj = statement_acts(smol, pos + neg, [cal["layer"]], batch_size=24).acts[:, 0] @ vec[cal["layer"]].float()
        a = auroc(proj[:SCORE_SLICE], proj[SCORE_SLICE:])
        assert a >= SCORE_FLOOR.get(name, MARGIN_FLOOR), (name, "trait score", a)

def test_statement_pipeline_on_tiny(tiny):
    """The build path on a tiny random model: direction fitted on train, layers chosen on val, the
    score's numbers named by split; decorrelation recalibrates on the statements; probe selection on val."""
    from steering_lab.personas import decorrelate, statement_activations, statement_direction, trait_scores
    from steering_lab.probes import train_probe

    names = ["openness", "neuroticism"]
    cache = {n: statement_activations(tiny, n) for n in names}
    raw = {n: statement_direction(tiny, BIG_FIVE[n], acts=cache[n]) for n in names}
    for n, vec in raw.items():
        cal, m = vec.extra["trait_score"], vec.extra["metrics"]
        _named_metrics(m)
        assert cal["calibrated_on"] == "train" and str(cal["layer"]) in cal["val_auroc_by_layer"]
        assert vec.extra["layer_scan"]["selected_on"] == "val" and vec.extra["n_positive"] >= 90
        train = trait_statement_set(n, "train")
        s = trait_scores(tiny, vec, [STATEMENT_PROMPT] * len(train.positive), train.positive)
        assert sum(s) / len(s) == pytest.approx(1.0, abs=1e-3)  # calibrated: train high answers score 1 on average
    dec = decorrelate(tiny, raw, statement_cache=cache)
    k = dec["openness"].recommended_layer
    assert abs(float(dec["openness"][k] @ dec["neuroticism"][k])) < 1e-5
    _named_metrics(dec["neuroticism"].extra["metrics"])
    held = {"heldout_style": trait_statement_set("openness", "heldout_style")}
    probe, _ = train_probe(tiny, trait_statement_set("openness"), chat=False, splits=statement_splits("openness"),
                           layers=[1, 2], evaluate_on=held)
    _named_metrics(probe.metrics)
    assert probe.metrics["heldout_style"]["n"] == 88
