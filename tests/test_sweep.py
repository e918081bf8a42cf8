import json

import pytest
import torch

from steering_lab.cli import main
from steering_lab.errors import UserError
from steering_lab.generate import generate
from steering_lab.intervene import Steer
from steering_lab.sweep import RESULT_KEYS, random_like, rows_per_batch, run_sweep, write_report
from steering_lab.vector import SteeringVector

PROMPTS = ["How was your weekend?", "Describe a library.", "Write a short poem about autumn leaves."]


@pytest.fixture(scope="module")
def vec(tiny):
    g = torch.Generator().manual_seed(5)
    return SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                          model=tiny.name, recommended_layer=1, recommended_strength=2.0)


def test_sweep_report_matches_separate_generation(tiny, vec):
    strengths = [0.0, 1.5, -3.0]
    report = run_sweep(tiny, vec, strengths, PROMPTS, max_new_tokens=6, batch_rows=4, random_baseline=2)
    assert report["layers"] == [1] and report["strengths"] == strengths
    assert [r["strength"] for r in report["results"]] == strengths
    for r in report["results"]:
        assert set(RESULT_KEYS) <= set(r)
        assert len(r["samples"]) == len(PROMPTS)
        assert 0 <= r["refusal_rate"] <= 1 and r["compliance"] == pytest.approx(1 - r["refusal_rate"])
        # batched rows with per-row strengths == each prompt generated alone at that strength
        alone = [generate(tiny, [p], Steer(vec, r["strength"]), max_new_tokens=6)[0] for p in PROMPTS]
        assert r["samples"] == alone
    assert report["results"][0]["samples"] == generate(tiny, PROMPTS, max_new_tokens=6)  # strength 0 == off
    assert report["results"][0]["kl"] == 0.0 and report["results"][1]["kl"] > 0
    assert len(report["random_baseline"]) == 2
    assert [r["strength"] for r in report["random_baseline_mean"]] == strengths
    first, second = (run["results"][1]["samples"] for run in report["random_baseline"])
    assert first != second


def test_random_like_keeps_norms(vec):
    r = random_like(vec, [0, 2], seed=1)
    assert r.layers == [0, 2]
    for k in (0, 2):
        assert float(r[k].norm()) == pytest.approx(float(vec[k].norm()), rel=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(r[k], vec[k], dim=0))) < 0.9
    assert torch.equal(random_like(vec, [0], 1)[0], r[0])  # seeded


def test_write_report(tiny, vec, tmp_path):
    report = run_sweep(tiny, vec, [0.0, 2.0], PROMPTS[:2], max_new_tokens=4, random_baseline=1)
    path, html = write_report(report, tmp_path / "r")
    assert path.name == "r.json" and html.name == "r.html"
    assert json.loads(path.read_text())["results"][1]["strength"] == 2.0
    assert "plotly" in html.read_text()


def test_bad_sweeps(tiny, vec):
    with pytest.raises(UserError, match="repeat"):
        run_sweep(tiny, vec, [1.0, 1.0], PROMPTS)
    with pytest.raises(UserError, match="no prompts"):
        run_sweep(tiny, vec, [1.0], [])
    with pytest.raises(UserError, match="no direction for layer 7"):
        run_sweep(tiny, vec, [1.0], PROMPTS, layers=[7])
    assert rows_per_batch(tiny, 40, 40) > 1


def test_sweep_cli(tiny_dir, vec, tmp_path, capsys):
    vec.save(tmp_path / "v")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = main(["sweep", "--vector", str(tmp_path / "v"), "--strengths", "0,2", "--prompts", str(prompts),
                 "--model", str(tiny_dir), "--max-new-tokens", "4", "--out", str(tmp_path / "rep.json")])
    out = capsys.readouterr().out
    assert code == 0 and "wrote" in out
    report = json.loads((tmp_path / "rep.json").read_text())
    assert [r["strength"] for r in report["results"]] == [0.0, 2.0]
    assert [len(r["samples"]) for r in report["results"]] == [3, 3]
    assert (tmp_path / "rep.html").is_file()
    assert main(["sweep", "--vector", str(tmp_path / "v"), "--strengths", "1,1", "--preset", "neutral",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert main(["sweep", "--vector", str(tmp_path / "v"), "--strengths", "1", "--preset", "nope",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "argument --preset: invalid choice: 'nope'" in capsys.readouterr().err
