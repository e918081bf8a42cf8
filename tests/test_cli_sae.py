"""``steering-lab sae``: label search without a model; a feature saved as a vector that reads back as
that feature (the decoder row, unit norm), found again by ``of-vector``."""

from __future__ import annotations

import json

import pytest

from steering_lab.cli import main
from steering_lab.sae import read_index

SAE = "smollm2-135m-l10"


def test_sae_search_needs_no_model(capsys):
    index = read_index(SAE)
    label = next(f["label"] for f in index["features"].values() if f.get("label"))
    word = label.split(" / ")[0]
    assert main(["sae", "search", "--sae", SAE, "--query", word, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(word.lower() in r["label"].lower() for r in rows)
    assert main(["sae", "search", "--sae", SAE]) == 2  # --query missing: one-line error, exit 2


@pytest.mark.real
def test_sae_feature_vector_round_trip(tmp_path, capsys):
    import torch

    from steering_lab.vector import SteeringVector

    out = tmp_path / "feat"
    assert main(["sae", "vector", "--sae", SAE, "--feature", "7", "--out", str(out)]) == 0
    vec = SteeringVector.load(out)
    assert vec.layers == [10] and vec.method == "sae_feature"
    assert torch.isclose(vec[10].norm(), torch.tensor(1.0), atol=1e-5)
    capsys.readouterr()
    assert main(["sae", "of-vector", "--sae", SAE, "--vector", str(out), "-k", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out.splitlines()[0])
    assert top["feature"] == 7 and top["cosine"] > 0.999
