import json

import pytest
import torch

from steering_lab.activations import collect
from steering_lab.cli import main
from steering_lab.datasets import ContrastSet
from steering_lab.errors import UserError
from steering_lab.probes import Probe, fit_probe, score_texts_with_probe, train_probe

POS = ["I love this, it is wonderful.", "What a great day!", "Fantastic work!", "I am so happy.",
       "This is excellent news.", "Brilliant, thank you!", "A lovely surprise.", "Such a joy to see."]
NEG = ["I hate this, it is awful.", "What a terrible day!", "Dreadful work!", "I am so sad.",
       "This is awful news.", "Horrible, no thanks.", "A nasty surprise.", "Such a pain to see."]


@pytest.fixture(scope="module")
def trained(tiny):
    return train_probe(tiny, ContrastSet("mini", POS, NEG), poolings=["mean", "last"], val=0.25, test=0.25)


def test_layer_sweep_and_metadata(tiny, trained):
    probe, rows = trained
    assert [(r.pooling, r.layer) for r in rows] == [(p, k) for p in ("mean", "last") for k in range(tiny.n_layers)]
    best = max(rows, key=lambda r: (r.auroc, r.accuracy, -r.layer, r.pooling == "mean"))
    assert (probe.layer, probe.pooling) == (best.layer, best.pooling)
    m = probe.metrics
    # layer, pooling and threshold chosen on val; test reported, and it chose nothing
    assert m["selected_on"] == "val" and m["selection_is_test"] is False and m["layer_sweep_split"] == "val"
    assert m["select_auroc"] == m["val"]["auroc"] == best.auroc and m["test_auroc"] == m["test"]["auroc"]
    assert m["n_val"] == m["val"]["n"] == 4 and m["n_test"] == m["test"]["n"] == 4 and m["n_train"] == 8
    assert m["selected"]["threshold_folded_into_bias"]
    assert probe.d_model == tiny.d_model and probe.model == "tiny-llama"


def test_splits_are_disjoint_and_the_threshold_is_chosen_on_val():
    from steering_lab.probes import _threshold, three_way_splits

    cs = ContrastSet("mini", POS, NEG)
    train, val, test = three_way_splits(cs, 0.25, 0.25, seed=3)
    assert three_way_splits(cs, 0.25, 0.25, seed=3) == (train, val, test)
    for side in (0, 1):
        parts = [set(train[side]), set(val[side]), set(test[side])]
        assert sum(map(len, parts)) == len(POS) and set().union(*parts) == set(range(len(POS)))
    # the balanced-accuracy threshold separates what can be separated, halfway between the classes
    assert _threshold(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.5)
    with pytest.raises(UserError, match="at least 3"):
        three_way_splits(ContrastSet("x", ["a", "b"], ["c", "d"]))


def test_round_trip_is_bit_exact_and_scores_equal(tiny, trained, tmp_path):
    probe, _ = trained
    base = probe.save(tmp_path / "p.safetensors")
    back = Probe.load(base, tiny)
    for name in ("weight", "mean", "scale", "bias"):
        assert torch.equal(getattr(back, name), getattr(probe, name))
    assert back.metadata() == probe.metadata()
    texts = POS[:3] + NEG[:3]
    # Exact where it is exact: the same activations through the saved and the loaded probe.
    acts = collect(tiny, texts, layers=[probe.layer], position=probe.pooling).acts[:, 0]
    assert torch.equal(probe.score(acts), back.score(acts))
    # Two separate forward passes over the same texts may differ in the last float32 bits (the CPU
    # BLAS picks its reduction order by thread count and memory alignment; a fresh machine once saw
    # 0.22266565 vs 0.22266564). Scores lie in [0, 1]; 1e-6 is 100x that noise and far below any
    # real difference between two probes.
    before = score_texts_with_probe(tiny, probe, texts)
    after = score_texts_with_probe(tiny, back, texts)
    torch.testing.assert_close(torch.tensor(after), torch.tensor(before), atol=1e-6, rtol=0)
    assert all(0 <= s <= 1 for s in before)


def test_probe_matches_sklearn(tiny):
    from sklearn.linear_model import LogisticRegression

    acts = collect(tiny, POS + NEG, layers=[2], position="last").acts[:, 0]
    w, mu, sd, b = fit_probe(acts[:8], acts[8:])
    probe = Probe(layer=2, pooling="last", weight=w, mean=mu, scale=sd, bias=b)
    x = ((acts.double() - mu.double()) / sd.double()).numpy()
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x, [1] * 8 + [0] * 8)
    expected = torch.as_tensor(clf.predict_proba(x)[:, 1], dtype=torch.float32)
    torch.testing.assert_close(probe.score(acts), expected, atol=1e-4, rtol=0)


def test_learns_a_separable_signal():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(40, 16, generator=g) + 4.0 * torch.eye(16)[0]  # Bayes accuracy 0.98
    neg = torch.randn(40, 16, generator=g)
    w, mu, sd, b = fit_probe(pos[:30], neg[:30])
    probe = Probe(layer=0, pooling="last", weight=w, mean=mu, scale=sd, bias=b)
    hits = torch.cat([probe.score(pos[30:]) > 0.5, probe.score(neg[30:]) <= 0.5])
    assert float(hits.float().mean()) >= 0.85


def test_bad_probes(tmp_path, tiny, trained):
    probe, _ = trained
    with pytest.raises(UserError, match="pooling"):
        Probe(layer=0, pooling="median", weight=probe.weight, mean=probe.mean, scale=probe.scale, bias=probe.bias)
    with pytest.raises(UserError, match="NaN"):
        Probe(layer=0, pooling="last", weight=probe.weight * float("nan"), mean=probe.mean, scale=probe.scale,
              bias=probe.bias)
    probe.save(tmp_path / "p")
    (tmp_path / "p.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(UserError, match="not describe a linear probe"):
        Probe.load(tmp_path / "p")
    (tmp_path / "p.json").unlink()
    with pytest.raises(UserError, match="metadata not found"):
        Probe.load(tmp_path / "p")
    with pytest.raises(UserError, match="without a 'prompt'"):
        train_probe(tiny, ContrastSet("x", ["a"], ["b"], prompts=["q"]))


def test_probe_cli(tiny_dir, tmp_path, capsys):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POS) + "\n")
    neg.write_text("\n".join(NEG) + "\n")
    out = tmp_path / "probes" / "mood"
    assert main(["probe", "train", "--pos", str(pos), "--neg", str(neg), "--pooling", "max", "--layer", "2",
                 "--model", str(tiny_dir), "--out", str(out)]) == 0
    assert "best layer: 2" in capsys.readouterr().out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What a great day!\nWhat a terrible day!\n")
    assert main(["probe", "score", "--probe", str(out) + ".safetensors", "--prompts", str(prompts),
                 "--model", str(tiny_dir), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["prompt"] for row in lines] == ["What a great day!", "What a terrible day!"]
    assert all(0.0 <= row["score"] <= 1.0 for row in lines)
    assert main(["probe", "train", "--preset", "harmful", "--pooling", "median", "--out", str(out)]) == 2
