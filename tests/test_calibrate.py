"""Effect measures, calibration search and the prompting baseline (issue "steering that holds up"),
on the tiny model: the bookkeeping is exact, the search finds what a constructed scorer rewards."""

import math

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.intervene import hook_count
from steering_lab.measure.calibrate import (
    Point,
    calibrate,
    default_instruction,
    evaluate,
    pareto_front,
    prompting_rows,
    record,
)
from steering_lab.measure.effect import EffectMeasure, measure_of, register_scorer, scorer_for, set_measure
from steering_lab.metrics import score_prompted, score_texts
from steering_lab.vector import SteeringVector

PROMPTS = ["How was your weekend?", "Describe a library.", "What is rain?"]


@pytest.fixture(scope="module")
def vec(tiny):
    g = torch.Generator().manual_seed(3)
    return SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                          model=tiny.name, recommended_layer=1, recommended_strength=2.0, description="random")


def length_scorer(prompts, texts):
    return [float(len(t)) for t in texts]


def test_effect_measure_round_trip_and_errors(tmp_path, vec):
    m = EffectMeasure(kind="probe", name="sentiment", sign=-1)
    assert EffectMeasure.from_dict(m.to_dict()) == m
    v = SteeringVector(directions=dict(vec.directions), model=vec.model)
    assert measure_of(v) is None
    set_measure(v, m)
    v.save(tmp_path / "v")
    assert measure_of(SteeringVector.load(tmp_path / "v")) == m
    for bad in ({"kind": "vibes"}, {"kind": "probe"}, {"kind": "refusal", "sign": 2}, "probe"):
        with pytest.raises(UserError):
            EffectMeasure.from_dict(bad)
    with pytest.raises(UserError, match="no scorer called"):
        scorer_for(None, EffectMeasure(kind="scorer", name="nope-not-registered"))
    register_scorer("test-length", length_scorer)
    fn = scorer_for(None, EffectMeasure(kind="scorer", name="test-length", sign=-1))
    assert fn(["a", "b"], ["xx", "xxxx"]) == [-2.0, -4.0]
    refusal = scorer_for(None, EffectMeasure(kind="refusal"))
    assert refusal(["a", "b"], ["I'm sorry, but I can't help with that.", "Sure! Here it is."]) == [1.0, 0.0]


def test_pareto_front_is_exactly_the_non_dominated_points():
    pts = [Point(1, s, e, k, 1.0, 1.0, 1) for s, e, k in [(1, 0.1, 0.1), (2, 0.5, 0.2), (3, 0.4, 0.3), (4, 0.9, 0.9),
                                                          (5, 0.9, 1.0), (6, float("nan"), 0.1)]]
    front = pareto_front(pts)
    assert [p.strength for p in front] == [1, 2, 4]


def test_evaluate_strength_zero_is_the_unsteered_model(tiny, vec):
    pts = evaluate(tiny, vec, PROMPTS, [(1, 0.0), (2, 0.0), (1, 3.0)], length_scorer, max_new_tokens=6)
    assert pts[0].kl == 0 and pts[1].kl == 0 and pts[0].effect == pts[1].effect
    assert pts[0].perplexity == pytest.approx(pts[1].perplexity, rel=1e-6)
    assert pts[2].kl > 0
    assert hook_count(tiny.model) == 0


def test_calibrate_picks_the_largest_fluent_effect_and_records_it(tiny, vec):
    v = SteeringVector(directions=dict(vec.directions), model=vec.model, recommended_layer=1, recommended_strength=2.0)
    cal = calibrate(tiny, v, PROMPTS, lambda p, t: [0.0] * len(t), layers=[0, 1, 2], strengths=[1.0, 4.0],
                    max_new_tokens=6, test_prompts=PROMPTS[:2], max_ppl_ratio=1e9, min_distinct_ratio=0.0)
    assert {(p.layer, p.strength) for p in cal.points} >= {(k, s) for k in (0, 1, 2) for s in (1.0, 4.0)}
    assert cal.constant.layer == 1 and cal.constant.strength == 2.0
    assert cal.baseline.strength == 0 and cal.baseline.kl == 0
    # every effect is 0: ties are broken by the lower KL, and every point is fluent
    assert cal.chosen.kl == min(p.kl for p in cal.points)
    assert set(cal.test) >= {"calibrated", "constant_rule", "unsteered"} and cal.test["reported_on"] == "test"
    assert cal.settings["selected_on"] == "val"
    record(v, cal)
    assert v.recommended_layer == cal.chosen.layer and v.recommended_strength == cal.chosen.strength
    assert v.extra["calibration"]["constant_rule"]["strength"] == 2.0
    # a negative direction flips the strengths' sign
    neg = calibrate(tiny, vec, PROMPTS, length_scorer, layers=[1], strengths=[1.0], direction=-1, max_new_tokens=4)
    assert all(p.strength <= 0 for p in neg.points)
    with pytest.raises(UserError, match="positive magnitudes"):
        calibrate(tiny, vec, PROMPTS, length_scorer, layers=[1], strengths=[-1.0])
    with pytest.raises(UserError, match="at least 2"):
        calibrate(tiny, vec, PROMPTS[:1], length_scorer)
    assert hook_count(tiny.model) == 0


def test_prompted_cost_is_zero_for_an_empty_difference_and_rows_line_up(tiny, vec):
    texts = ["It was fine.", "Books, quiet.", "Water falling."]
    plain = score_texts(tiny, PROMPTS, texts)
    # a system prompt changes the distribution (KL > 0); perplexity is always the plain model's
    prompted = score_prompted(tiny, PROMPTS, texts, "Be brief.")
    assert all(math.isfinite(k) and k >= 0 for k in prompted.kl) and any(k > 0 for k in prompted.kl)
    assert prompted.perplexity == pytest.approx(plain.perplexity, rel=1e-5)  # the plain model's perplexity
    rows = prompting_rows(tiny, vec, PROMPTS, length_scorer, "Be brief.", layer=1, strength=2.0, max_new_tokens=5)
    assert list(rows) == ["unsteered", "prompted", "steered", "prompted + steered"]
    assert rows["unsteered"]["kl"] == 0 and rows["steered"]["kl"] > 0 and rows["prompted"]["kl"] > 0
    assert default_instruction(vec).startswith("Answer")
    assert hook_count(tiny.model) == 0


def test_cli_calibrate_writes_report_chart_and_calibrated_vector(tiny, tiny_dir, tmp_path, capsys):
    import json

    from steering_lab.cli import main

    g = torch.Generator().manual_seed(5)
    v = SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                       model=str(tiny_dir), recommended_layer=1, recommended_strength=2.0)
    set_measure(v, EffectMeasure(kind="scorer", name="informality"))
    v.save(tmp_path / "v")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["How was your weekend?", "Describe a library.", "What is rain?", "Name a colour."]))
    out = tmp_path / "rep.json"
    args = ["calibrate", "--vector", str(tmp_path / "v"), "--prompts", str(prompts), "--model", str(tiny_dir),
            "--layers", "1,2", "--strengths", "1,3", "--max-new-tokens", "4", "--out", str(out),
            "--instruction", "Be casual.", "--save-vector", str(tmp_path / "v2")]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["selected_on"] == "val" and rep["test"]["reported_on"] == "test"
    assert set(rep["split"]["val"]).isdisjoint(rep["split"]["test"])
    assert list(rep["prompting"]["rows"]) == ["unsteered", "prompted", "steered", "prompted + steered"]
    assert out.with_suffix(".html").read_text().count("Pareto front") >= 1
    saved = SteeringVector.load(tmp_path / "v2")
    assert saved.extra["calibration"]["chosen"]["strength"] == saved.recommended_strength
    capsys.readouterr()
    assert main(args[:-2] + ["--kl-budget", "lots"]) == 2
    assert "--kl-budget must be a number" in capsys.readouterr().err
    plain = SteeringVector(directions=dict(v.directions), model=str(tiny_dir), recommended_layer=1,
                           recommended_strength=2.0)
    plain.save(tmp_path / "nomeasure")
    assert main(["calibrate", "--vector", str(tmp_path / "nomeasure"), "--prompts", str(prompts), "--model",
                 str(tiny_dir), "--out", str(out)]) == 2
    assert "no effect measure" in capsys.readouterr().err


def test_sweep_reports_the_vector_effect_and_the_prompted_series(tiny, vec):
    from steering_lab.generate import generate
    from steering_lab.sweep import run_sweep
    from steering_lab.ui.charts import sweep_figure

    rep = run_sweep(tiny, vec, [0.0, 3.0], PROMPTS, layers=[1], max_new_tokens=5, random_baseline=1,
                    effect=length_scorer, effect_label="length", instruction="Be brief.")
    assert rep["behaviour_key"] == "effect" and rep["effect_measure"] == "length"
    plain = generate(tiny, PROMPTS, max_new_tokens=5)
    assert rep["results"][0]["effect"] == pytest.approx(sum(len(t) for t in plain) / len(plain))
    assert rep["results"][0]["kl"] == 0
    prompted = rep["prompted"]["results"]
    assert [r["strength"] for r in prompted] == [0.0, 3.0] and prompted[0]["kl"] > 0  # the system prompt costs
    prompted_texts = generate(tiny, PROMPTS, max_new_tokens=5, system="Be brief.")
    assert prompted[0]["effect"] == pytest.approx(sum(len(t) for t in prompted_texts) / len(prompted_texts))
    assert "effect" in rep["random_baseline_mean"][1]
    names = {t.name for t in sweep_figure(rep).data}
    assert {"effect (prompted)", "prompted (+ steered)", "effect (random, mean)"} <= names
    assert hook_count(tiny.model) == 0


def test_sweep_tab_table_rows_and_vector_effect(tiny, vec, tmp_path):
    from steering_lab.sweep import run_sweep
    from steering_lab.ui.context import make_context
    from steering_lab.ui.sweep_tab import HEADERS, results_table, vector_effect

    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=tmp_path / "shipped")
    assert vector_effect(ctx, vec) == (None, "")
    v = SteeringVector(directions=dict(vec.directions), model=vec.model, recommended_layer=1, recommended_strength=2.0)
    set_measure(v, EffectMeasure(kind="scorer", name="informality"))
    scorer, label = vector_effect(ctx, v)
    assert label == "scorer informality" and len(scorer(PROMPTS[:2], ["hey!!", "Good day."])) == 2
    rep = run_sweep(tiny, v, [0.0, 2.0], PROMPTS[:2], layers=[1], max_new_tokens=3, effect=scorer,
                    instruction="Be brief.")
    rows = results_table(rep)
    assert [r[0] for r in rows] == ["vector", "vector", "prompted", "prompted + steered"]
    assert all(len(r) == len(HEADERS) for r in rows) and rows[0][2] is not None


def test_steer_tab_effect_monitor_slider_info_warning_and_prompting(tiny, vec, tmp_path):
    from steering_lab.datasets import ContrastSet
    from steering_lab.measure.effect import train_effect_probe
    from steering_lab.ui.context import make_context
    from steering_lab.ui.steer_tab import build_steering, degeneration_warning, run_stream, slider_info

    shipped = tmp_path / "shipped"
    contrast = ContrastSet(name="toy", positive=[f"good happy day number {i}" for i in range(8)],
                           negative=[f"bad sad night number {i}" for i in range(8)], labels=("happy", "sad"))
    probe, measure = train_effect_probe(tiny, contrast, "toy")
    probe.save(shipped / "probes" / "toy")
    v = SteeringVector(directions=dict(vec.directions), model=vec.model, recommended_layer=1, recommended_strength=2.0)
    set_measure(v, measure)
    assert "constant rule" in slider_info(v, "add") and slider_info(v, "ablate") == ""
    v.extra["calibration"] = {"chosen": {"layer": 1, "strength": 2.0}, "fluent_range": [0.0, 3.0]}
    assert "fluent between 0 and 3" in slider_info(v, "add")
    v.save(shipped / "vectors" / "toyvec")
    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=shipped)
    _, monitors = build_steering(ctx, ["toyvec"], [2.0], "add", "recommended", "separate")
    assert any(m.name == "effect:toyvec" for m in monitors)
    run = ctx.new_run("s")
    outs = list(run_stream(ctx, "s", run, "How was your weekend?", "", ["toyvec"], [2.0, 0, 0], "add",
                           "recommended", "separate", 5, "none", [], None, prompting="Answer happily."))
    table = outs[-1][2]
    assert "toyvec effect (its own measure)" in table and "prompting baseline" in table
    assert "Answer happily." in table and "KL to the plain model" in table
    assert degeneration_warning("the cat the cat the cat the cat the cat the cat the cat the cat", None, 20)
    assert degeneration_warning("a quick brown fox jumps over the lazy dog near the river bank today", None, 20) is None
    assert degeneration_warning("the cat the cat", None, 4) is None  # too short to judge
    assert hook_count(tiny.model) == 0


def test_extracted_vectors_carry_their_own_effect_probe(tiny, tiny_dir, tmp_path, capsys):
    from steering_lab.cli import main
    from steering_lab.datasets import ContrastSet
    from steering_lab.probes import Probe
    from steering_lab.ui.context import make_context
    from steering_lab.ui.extract_tab import attach_effect_probe

    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(f"I love this, it is wonderful, day {i}." for i in range(8)) + "\n")
    neg.write_text("\n".join(f"I hate this, it is awful, day {i}." for i in range(8)) + "\n")
    out = tmp_path / "happy"
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--layers", "1-2", "--model", str(tiny_dir),
                 "--out", str(out)]) == 0
    assert "effect probe:" in capsys.readouterr().out
    vec = SteeringVector.load(out)
    m = measure_of(vec)
    assert m.kind == "probe" and Probe.load(m.name).metrics["selection_is_test"] is False
    assert main(["extract", "--pos", str(pos), "--neg", str(neg), "--layers", "1", "--model", str(tiny_dir),
                 "--out", str(tmp_path / "plain"), "--no-effect-probe"]) == 0
    assert measure_of(SteeringVector.load(tmp_path / "plain")) is None
    # the app: saved as NAME-effect in the visitor's probe library; too few examples: none, said so
    ctx = make_context(tiny, user_dir=tmp_path / "user", shipped_root=tmp_path / "shipped")
    contrast = ContrastSet(name="c", positive=pos.read_text().split("\n")[:8], negative=neg.read_text().split("\n")[:8])
    v = SteeringVector(directions=dict(vec.directions), model=vec.model)
    note = attach_effect_probe(ctx, v, contrast, "mine")
    assert note.startswith("probe mine-effect") and measure_of(v).name == "mine-effect"
    assert ctx.probes.get("mine-effect").layer in (1, 2)
    small = ContrastSet(name="s", positive=["a b", "c d"], negative=["e f", "g h"])
    assert attach_effect_probe(ctx, SteeringVector(directions=dict(vec.directions)), small, "x").startswith("none")
