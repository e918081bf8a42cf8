import pytest
import torch

from steering_lab.activations import Activations
from steering_lab.datasets import ContrastSet
from steering_lab.errors import UserError
from steering_lab.extract import (
    METHODS,
    LayerScore,
    actadd,
    auroc,
    extract,
    mean_diff,
    parse_layers,
    pca,
    probe_weight,
    recommend_layer,
    scan,
)


def planted(n=40, d=16, sep=3.0, seed=0):
    """Paired data whose classes differ along a known unit direction."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    base = torch.randn(n, d, generator=g)
    pos = base + sep * u + 0.3 * torch.randn(n, d, generator=g)
    neg = base - 0.3 * torch.randn(n, d, generator=g)
    return pos, neg, u


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_finds_the_planted_direction_with_the_right_sign(name):
    pos, neg, u = planted()
    d = METHODS[name](pos, neg)
    assert d.shape == (16,)
    cos = float(d @ u / d.norm())
    assert cos > {"actadd": 0.5, "probe_weight": 0.8}.get(name, 0.95), (name, cos)
    # swapping the classes flips the sign
    assert float(METHODS[name](neg, pos) @ u) < 0


def test_method_magnitudes_are_the_class_separation():
    pos, neg, u = planted(sep=5.0)
    md = mean_diff(pos, neg)
    for fn in (pca, probe_weight):
        d = fn(pos, neg)
        unit = d / d.norm()
        assert abs(float(d.norm()) - float((pos.mean(0) - neg.mean(0)) @ unit)) < 1e-4
    assert abs(float(md.norm()) - 5.0) < 0.6
    assert torch.equal(actadd(pos, neg), pos[0] - neg[0])


def test_pca_needs_pairs():
    with pytest.raises(UserError, match="paired"):
        pca(torch.randn(4, 3), torch.randn(5, 3))


def test_auroc_on_fixed_inputs():
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auroc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])) == 0.5


def test_parse_layers():
    assert parse_layers("2-4", 10) == [2, 3, 4]
    assert parse_layers("1,3,5-6", 10) == [1, 3, 5, 6]
    assert parse_layers(None, 10) is None and parse_layers("all", 10) is None
    for bad in ("3-1", "x", "1,,2", "12"):
        with pytest.raises(UserError):
            parse_layers(bad, 10)


def test_recommend_layer_prefers_window_and_separation():
    rows = [LayerScore(k, 1.0, 1.0, sep, 10.0 + k, 1.0)
            for k, sep in enumerate([9, 9, 2, 3, 4, 3, 2, 2, 9, 9])]
    assert recommend_layer(rows, 10) == 3  # window is 20%-40% of depth: layers 2-3
    rows[2] = LayerScore(2, 0.90, 0.9, 8.0, 12.0, 1.0)  # better separation but worse AUROC
    assert recommend_layer(rows, 10) == 3


def test_scan_on_synthetic_layers_finds_the_separable_one():
    n, d = 30, 8
    g = torch.Generator().manual_seed(1)
    u = torch.zeros(d)
    u[0] = 1
    strengths = [0.0, 0.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0, 9.0, 9.0]  # layer 3 separates, in the window
    pos = torch.stack([torch.randn(n, d, generator=g) + s * u for s in strengths], 1)
    neg = torch.stack([torch.randn(n, d, generator=g) for _ in strengths], 1)
    norms = torch.full((n, 10), 10.0)
    cs = ContrastSet("syn", [f"p{i}" for i in range(n)], [f"n{i}" for i in range(n)])
    table = scan(Activations(pos, norms, list(range(10)), "last"), Activations(neg, norms, list(range(10)), "last"),
                 "mean_diff", cs, n_layers=10)
    assert table.row(3).auroc > 0.95 and table.row(0).auroc < 0.85
    assert table.recommended_layer == 3  # window is layers 2-3; 8 and 9 separate more but are too deep
    assert table.recommended_strength == 1.5
    assert table.n_test == 18 and not table.in_sample
    assert "recommended layer 3" in table.table()


def test_extract_on_tiny_model(tiny):
    cs = ContrastSet("mini", positive=["I love this, it is wonderful.", "What a great day!", "Fantastic work!",
                                       "I am so happy."],
                     negative=["I hate this, it is awful.", "What a terrible day!", "Dreadful work!",
                               "I am so sad."])
    vec, table = extract(tiny, cs, "mean_diff", layers="1-3")
    assert vec.layers == [1, 2, 3]
    assert all(abs(n - 1) < 1e-5 for n in vec.norms().values())
    assert vec.normalized and vec.model == "tiny-llama" and vec.d_model == 32 and vec.n_layers == 4
    assert vec.recommended_layer in (1, 2, 3)
    expected = 0.15 * table.row(vec.recommended_layer).token_norm
    assert vec.recommended_strength == pytest.approx(expected, abs=0.01)
    assert vec.extra["layer_scan"]["rows"][0]["layer"] == 1
    vec2, _ = extract(tiny, cs, "pca", layers=[2])
    assert vec2.layers == [2]


def test_extract_rejects_unknown_method(tiny):
    cs = ContrastSet("mini", ["a b"], ["c d"])
    with pytest.raises(UserError, match="unknown method"):
        extract(tiny, cs, "svm")
