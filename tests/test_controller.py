import pytest
import torch

from steering_lab.controller import (
    Condition,
    Controller,
    ControllerNet,
    calibrate_threshold,
    conditional_generate,
    f1_score,
    fit_condition,
    train_controller,
)
from steering_lab.datasets import harmful_instructions, harmless_instructions
from steering_lab.errors import UserError
from steering_lab.generate import generate, stream
from steering_lab.intervene import Steer, hook_count
from steering_lab.monitor import direction_monitor, offline_values, probe_monitor, steer_when_needed
from steering_lab.probes import Probe
from steering_lab.vector import SteeringVector

HARMFUL, HARMLESS = harmful_instructions()[:6], harmless_instructions()[:6]


@pytest.fixture(scope="module")
def vec(tiny):
    g = torch.Generator().manual_seed(7)
    return SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                          model=tiny.name, recommended_layer=1, recommended_strength=3.0)


def test_controller_net_shapes_and_ranges():
    net = ControllerNet(n_inputs=2, d_model=8, n_steer=3, hidden=5)
    scale, weights = net(torch.randn(4, 2, 8))
    assert scale.shape == (4,) and weights.shape == (4, 3)
    assert bool(((scale >= 0) & (scale <= 1)).all()) and bool(((weights >= 0) & (weights <= 1)).all())


def test_controller_gating_follows_scale(tiny, vec):
    """Strength at layer l = scale x weight_l x base: a zero scale is exactly the unsteered model."""
    ctl = Controller(net=ControllerNet(1, tiny.d_model, 2), input_layers=[0], steer_layers=[1, 2], vector=vec,
                     base_strength=4.0)
    steers = ctl.steering(torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 1.0], [0.5, 1.0]]))
    assert [s.layers for s in steers] == [[1], [2]]
    assert torch.equal(torch.as_tensor(steers[0].strength), torch.tensor([0.0, 2.0]))
    prompts = [HARMLESS[0], HARMLESS[0]]
    texts = generate(tiny, prompts, steers, max_new_tokens=5)
    assert texts[0] == generate(tiny, prompts[:1], max_new_tokens=5)[0]


def test_train_controller_learns_the_gate_and_round_trips(tiny, vec, tmp_path):
    ctl = train_controller(tiny, vec, HARMFUL, HARMLESS, steer_layers=[1, 2], input_layers=[0, 1], base_strength=3.0,
                           epochs=25, batch_size=6, lr=1e-2, target_tokens=4, hidden=16)
    losses = ctl.metrics["train_loss"]
    assert losses[-1] < losses[0]
    scale, weights = ctl.decide(tiny, HARMFUL + HARMLESS)
    assert float(scale[:6].mean()) > float(scale[6:].mean()) + 0.3  # steers harmful, not harmless (train set)
    assert all(p.requires_grad for p in tiny.model.parameters())  # the caller's model is left as it was
    assert hook_count(tiny.model) == 0
    ctl.save(tmp_path / "c")
    back = Controller.load(tmp_path / "c", tiny)
    s2, w2 = back.decide(tiny, HARMFUL + HARMLESS)
    assert torch.equal(s2, scale) and torch.equal(w2, weights)
    assert back.steer_layers == [1, 2] and back.input_layers == [0, 1]
    texts, scales = back.generate(tiny, HARMFUL[:2], max_new_tokens=4)
    assert len(texts) == 2
    torch.testing.assert_close(scales, scale[:2], atol=1e-5, rtol=1e-5)  # a 2-prompt batch: same up to rounding


def test_controller_calibration_sets_the_gate_and_records_its_split(tiny, vec):
    ctl = Controller(net=ControllerNet(1, tiny.d_model, 2), input_layers=[1], steer_layers=[1, 2], vector=vec,
                     base_strength=4.0)
    rec = ctl.calibrate(tiny, HARMFUL, HARMLESS, max_negative_rate=0.0, split="val: test lines")
    assert ctl.threshold == rec["threshold"] and rec["split"] == "val: test lines"
    assert ctl.metrics["selection_is_test"] is False
    assert ctl.metrics["threshold_selection"]["selection_is_test"] is False
    measured = ctl.measure(tiny, HARMFUL, HARMLESS)
    assert measured["applied_harmless"] == 0.0 and measured["applied_harmful"] == pytest.approx(rec["positive_rate"])
    # below the gate threshold a row is exactly unsteered
    scale, weights = ctl.decide(tiny, HARMFUL[:2])
    low = torch.full_like(scale, ctl.threshold - 0.01)
    assert all(float(torch.as_tensor(s.strength).abs().max()) == 0 for s in ctl.steering(low, weights))


def test_f1():
    pred = torch.tensor([True, True, False, False])
    label = torch.tensor([True, False, True, False])
    assert f1_score(pred, label) == pytest.approx(0.5)
    assert f1_score(torch.tensor([False]), torch.tensor([True])) == 0.0


def test_calibrate_threshold_maximises_recall_under_the_negative_rate():
    pos = torch.tensor([0.9, 0.8, 0.7, 0.35, 0.2])
    neg = torch.tensor([0.75, 0.3, 0.1, 0.05, 0.0])
    cal = calibrate_threshold(pos, neg, max_negative_rate=0.0)  # no negative may pass: cut above 0.75
    assert 0.75 < cal["threshold"] < 0.8 and cal["positive_rate"] == pytest.approx(0.4) and cal["negative_rate"] == 0
    cal = calibrate_threshold(pos, neg, max_negative_rate=0.2)  # one negative may pass: cut between 0.3 and 0.35
    assert 0.3 < cal["threshold"] < 0.35 and cal["positive_rate"] == pytest.approx(0.8)
    assert cal["negative_rate"] == pytest.approx(0.2) and cal["auroc"] == pytest.approx(0.84)
    cal = calibrate_threshold(pos, neg, max_negative_rate=1.0)
    assert cal["positive_rate"] == 1.0  # everything may pass: all positives are in
    with pytest.raises(UserError):
        calibrate_threshold([], neg)


def test_cast_grid_search_and_gating(tiny, vec, tmp_path):
    cond = fit_condition(tiny, HARMFUL[:4], HARMLESS[:4], HARMFUL[4:], HARMLESS[4:], layers=[2, 1])
    assert cond.layer in (1, 2) and [r["layer"] for r in cond.grid] == [1, 2] and 0 <= cond.f1 <= 1
    sel = cond.metrics["threshold_selection"]
    assert sel["split"] == "val" and sel["selection_is_test"] is False and cond.metrics["selection_is_test"] is False
    best = max(cond.grid, key=lambda r: (r["val_applied_harmful"], r["val_auroc"]))
    assert best["layer"] == cond.layer and best["val_applied_harmless"] <= 0.05
    measured = cond.measure(tiny, HARMFUL[4:], HARMLESS[4:])  # the val numbers, re-measured
    assert measured["applied_harmful"] == pytest.approx(sel["val_applied_harmful"])
    assert measured["applied_harmless"] == pytest.approx(sel["val_applied_harmless"])
    old_rule = fit_condition(tiny, HARMFUL[:4], HARMLESS[:4], HARMFUL[4:], HARMLESS[4:], layers=[1, 2],
                             max_negative_rate=None)
    assert max(row["f1"] for row in old_rule.grid) == old_rule.f1
    cond.save(tmp_path / "cond")
    back = Condition.load(tmp_path / "cond", tiny)
    assert back.layer == cond.layer and back.threshold == cond.threshold and torch.equal(back.direction, cond.direction)
    assert torch.equal(back.applies(tiny, HARMFUL), cond.applies(tiny, HARMFUL))
    with pytest.raises(UserError, match="not a controller"):
        Controller.load(tmp_path / "cond")
    # gating: rows whose condition fails are exactly unsteered, the others are steered
    forced = Condition(layer=1, direction=cond.direction, threshold=-2.0)  # cos > -2 always holds
    never = Condition(layer=1, direction=cond.direction, threshold=2.0)
    prompts = HARMLESS[:2]
    plain = generate(tiny, prompts, max_new_tokens=5)
    texts, applied = conditional_generate(tiny, prompts, never, vec, 50.0, max_new_tokens=5)
    assert applied == [False, False] and texts == plain
    texts, applied = conditional_generate(tiny, prompts, forced, vec, 50.0, max_new_tokens=5)
    assert applied == [True, True]
    assert texts == generate(tiny, prompts, Steer(vec, 50.0), max_new_tokens=5)


def test_live_monitor_equals_offline_recomputation(tiny, vec):
    g = torch.Generator().manual_seed(3)
    probe = Probe(layer=2, pooling="last", weight=torch.randn(tiny.d_model, generator=g),
                  mean=torch.zeros(tiny.d_model), scale=torch.ones(tiny.d_model), bias=torch.tensor([0.1]))
    monitors = [probe_monitor(probe, "p"), direction_monitor(vec, layer=1, name="d")]
    item = Steer(vec, 2.0, layers=[1])
    steps = list(stream(tiny, [HARMLESS[0]], item, max_new_tokens=6, monitors=monitors))
    live = {name: [s.monitor[name][0] for s in steps] for name in ("p", "d")}
    prompt_ids = tiny.encode_prompt(HARMLESS[0])
    offline = offline_values(tiny, prompt_ids, steps[-1].token_ids[0], monitors, item)
    for name in ("p", "d"):
        assert len(live[name]) == len(steps[-1].token_ids[0])
        torch.testing.assert_close(torch.tensor(live[name]), torch.tensor(offline[name]), atol=1e-5, rtol=1e-4)
    assert hook_count(tiny.model) == 0


def _probe_on(direction, bias=0.0):
    d = direction.numel()
    return Probe(layer=1, pooling="last", weight=direction / direction.norm(), mean=torch.zeros(d),
                 scale=torch.ones(d), bias=torch.tensor([bias]))


def test_steer_when_needed_backtracks(tiny, vec):
    prompt = HARMLESS[0]
    p_len = len(tiny.encode_prompt(prompt))
    item = Steer(vec, 2.0, layers=[2])
    plain = list(stream(tiny, [prompt], (), max_new_tokens=8))[-1].token_ids[0]
    never = _probe_on(torch.ones(tiny.d_model), bias=-50.0)
    quiet = steer_when_needed(tiny, prompt, item, never, max_new_tokens=8)
    assert quiet.triggered_at is None and quiet.token_ids == plain

    # fires before the first token: positions from the last prompt token on are steered
    always = _probe_on(torch.ones(tiny.d_model), bias=50.0)
    loud = steer_when_needed(tiny, prompt, item, always, max_new_tokens=8)
    steered_from = Steer(vec, 2.0, layers=[2], scope="generated")
    expected = list(stream(tiny, [prompt], steered_from, max_new_tokens=8, prompt_len=p_len - 1))[-1].token_ids[0]
    assert loud.triggered_at == 0 and loud.token_ids == expected

    # fires at a later token: the text up to the backtrack point is the unsteered one
    for seed in range(100):  # a direction whose projection first peaks at step t >= 3
        u = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(seed))
        mon = direction_monitor(SteeringVector(directions={1: u}), layer=1, name="u")
        values = [s.monitor["u"][0] for s in stream(tiny, [prompt], (), max_new_tokens=8, monitors=[mon])]
        t = max(range(3, 8), key=lambda i: values[i] - max(values[:i]))
        if values[t] > max(values[:t]):
            break
    assert values[t] > max(values[:t])
    cut = (max(values[:t]) + values[t]) / 2
    fires_at_t = _probe_on(u, bias=0.0)
    late = steer_when_needed(tiny, prompt, item, fires_at_t, threshold=float(torch.sigmoid(torch.tensor(cut))),
                             backtrack=2, max_new_tokens=8)
    assert late.triggered_at == t
    assert late.token_ids[: t - 2] == plain[: t - 2]
    assert hook_count(tiny.model) == 0
    with pytest.raises(UserError):
        steer_when_needed(tiny, prompt, [], always)
