import json
import subprocess
import sys

import pytest

from steering_lab.cli import main
from steering_lab.vector import SteeringVector


@pytest.fixture()
def texts(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love this, it is wonderful.\nWhat a great day!\nFantastic work!\nI am so happy.\n")
    neg.write_text("I hate this, it is awful.\nWhat a terrible day!\nDreadful work!\nI am so sad.\n")
    return pos, neg


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_then_generate(tiny_dir, texts, tmp_path, capsys):
    pos, neg = texts
    out = tmp_path / "vecs" / "happy"
    code, stdout, _ = run(capsys, "extract", "--pos", str(pos), "--neg", str(neg), "--layers", "1-2",
                          "--model", str(tiny_dir), "--out", str(out) + ".safetensors")
    assert code == 0
    assert "recommended layer:" in stdout and "recommended strength:" in stdout and "auroc" in stdout
    vec = SteeringVector.load(out)
    assert vec.layers == [1, 2] and vec.model == str(tiny_dir)

    args = ["generate", "--prompt", "How was your weekend?", "--vector", str(out), "--model", str(tiny_dir),
            "--max-new-tokens", "6", "--json"]
    code, stdout, _ = run(capsys, *args, "--strength", "0")
    result = json.loads(stdout)
    assert set(result) == {"baseline", "steered"} and result["baseline"] == result["steered"]
    code, stdout, _ = run(capsys, *args, "--strength", "50", "--layer", "1")
    result = json.loads(stdout)
    assert result["baseline"] != result["steered"]
    code, stdout, _ = run(capsys, "generate", "--prompt", "Hi", "--model", str(tiny_dir), "--max-new-tokens", "3")
    assert code == 0 and "=== baseline ===" in stdout and "steered" not in stdout


@pytest.mark.parametrize("argv, message", [
    (["extract", "--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
    (["extract", "--preset", "sentiment", "--neg", "n.txt", "--out", "x"], "--neg goes with --pos"),
    (["extract", "--preset", "sentiment", "--method", "svm", "--out", "x"], "unknown method"),
    (["generate", "--prompt", "hi", "--vector", "/no/such/vector"], "vector file not found"),
    (["generate", "--prompt", "hi", "--operator", "scale"], "unknown operator"),
    (["generate", "--prompt", "hi", "--strength", "3"], "need a --vector"),
    (["generate", "--prompt", "hi", "--model", "./no/such/model"], "model path not found"),
    (["generate", "--prompt", " "], "--prompt is empty"),
])
def test_bad_input_exits_2_with_one_line(capsys, monkeypatch, argv, message):
    import steering_lab.cli as cli

    if "--model" not in argv:  # input errors must be caught before seconds are spent loading a model
        monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("model loaded before input was checked"))
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_layer_out_of_range_for_the_model(tiny_dir, texts, tmp_path, capsys):
    pos, neg = texts
    code, _, err = run(capsys, "extract", "--pos", str(pos), "--neg", str(neg), "--layers", "2-9",
                       "--model", str(tiny_dir), "--out", str(tmp_path / "v"))
    assert code == 2 and "out of range" in err


def test_argparse_errors_are_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "steering_lab", "generate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--prompt" in proc.stderr
