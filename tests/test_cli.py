import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steering_lab import constants
from steering_lab.cli import build_parser, main
from steering_lab.vector import SteeringVector

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def texts(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love this, it is wonderful.\nWhat a great day!\nFantastic work!\nI am so happy.\n")
    neg.write_text("I hate this, it is awful.\nWhat a terrible day!\nDreadful work!\nI am so sad.\n")
    return pos, neg


@pytest.fixture()
def no_model(monkeypatch):
    """Input errors must be caught before seconds are spent loading a model."""
    import steering_lab.cli.common as common

    monkeypatch.setattr(common, "load_model_from_args",
                        lambda args: pytest.fail("model loaded before input was checked"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv, cwd=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "steering_lab", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=timeout)


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
    assert {"baseline", "steered", "kl", "perplexity", "refusal"} <= set(result)
    assert result["baseline"] == result["steered"]  # strength 0: the steered row is the unsteered model
    assert abs(result["kl"]) < 1e-6  # the shadow row reads the same tokens with the same logits
    code, stdout, _ = run(capsys, *args, "--strength", "50", "--layer", "1")
    result = json.loads(stdout)
    assert result["baseline"] != result["steered"]
    code, stdout_neg, _ = run(capsys, *args, "--strength", "-50", "--layer", "1")  # a negative strength, unquoted
    assert code == 0 and json.loads(stdout_neg)["steered"] != result["steered"]
    code, stdout, _ = run(capsys, "generate", "--prompt", "Hi", "--model", str(tiny_dir), "--max-new-tokens", "3")
    assert code == 0 and "=== baseline ===" in stdout and "steered" not in stdout


@pytest.mark.parametrize("argv, message", [
    (["extract", "--preset", "sentiment", "--neg", "n.txt", "--out", "x"], "--neg goes with --pos"),
    (["generate", "--prompt", "hi", "--vector", "/no/such/vector"], "vector file not found"),
    (["generate", "--prompt", "hi", "--vector", "no_such_name"], "vector file not found"),
    (["generate", "--prompt", "hi", "--strength", "3"], "need a --vector"),
    (["generate", "--prompt", "hi", "--model", "./no/such/model"], "model path not found"),
    (["generate", "--prompt", " "], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--dynamic", "-0.5"], "--dynamic needs a positive TAU"),
    (["sweep", "--vector", "sentiment", "--strengths", "-4,4,-4", "--preset", "neutral", "--out", "r"],
     "--strengths must not repeat"),
])
def test_bad_input_exits_2_with_one_line(capsys, request, argv, message):
    if "--model" not in argv:
        request.getfixturevalue("no_model")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("steering-lab: error: ")


@pytest.mark.parametrize("argv, message", [
    (["extract", "--preset", "nope", "--out", "x"], "argument --preset: invalid choice: 'nope'"),
    (["extract", "--preset", "sentiment", "--method", "svm", "--out", "x"], "argument --method: invalid choice"),
    (["extract", "--preset", "sentiment", "--position", "first", "--out", "x"], "argument --position: invalid"),
    (["generate", "--prompt", "hi", "--operator", "scale"], "argument --operator: invalid choice: 'scale'"),
    (["generate", "--prompt", "hi", "--dtype", "float8"], "argument --dtype: invalid choice"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["generate", "--prompt", "hi", "--strength", "nan", "--vector", "v"], "expected a finite number"),
    (["probe", "train", "--preset", "harmful", "--pooling", "sum", "--out", "x"], "argument --pooling: invalid"),
    (["sweep", "--vector", "v", "--strengths", "-8,x", "--preset", "neutral", "--out", "r"],
     "expected comma-separated numbers"),
    (["sweep", "--vector", "v", "--strengths", "1", "--preset", "everything", "--out", "r"], "invalid choice"),
    (["export", "--vector", "v", "--format", "onnx", "--out", "x"], "argument --format: invalid choice"),
    (["generate", "--prompt", "hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate"], "the following arguments are required: --prompt"),
])
def test_flag_errors_keep_the_usage_line(capsys, no_model, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    command = " ".join(a for a in argv[:2] if not a.startswith("-") and a != "hi")
    assert lines[0].startswith(f"usage: steering-lab {argv[0]}") and "Traceback" not in err
    assert lines[-1].startswith(f"steering-lab {command}: error: ") and message in lines[-1]


def test_negative_numbers_and_lists_of_them_parse_everywhere():
    parser = build_parser()
    a = parser.parse_args(["sweep", "--vector", "v", "--strengths", "-8,-4,4,8", "--preset", "neutral", "--out", "r"])
    assert a.strengths == [-8.0, -4.0, 4.0, 8.0]
    a = parser.parse_args(["sweep", "--vector", "v", "--strengths", "-1e1,-.5, 0", "--preset", "neutral",
                           "--out", "r"])
    assert a.strengths == [-10.0, -0.5, 0.0]
    a = parser.parse_args(["generate", "--prompt", "-5 is a number", "--vector", "v", "--strength", "-20",
                           "--vector", "w", "--strength", "-1.5e1", "--layer", "-1", "--temperature", "0"])
    assert a.strength == [-20.0, -15.0] and a.layer == ["-1"] and a.prompt == "-5 is a number"
    a = parser.parse_args(["export", "--vector", "v", "--format", "gguf", "--scale", "-2.5", "--out", "x"])
    assert a.scale == -2.5
    a = parser.parse_args(["generate", "--prompt", "hi", "--dynamic", "-.5"])
    assert a.dynamic == -0.5
    a = parser.parse_args(["controller", "train", "--vector", "v", "--base-strength", "-3", "--out", "x"])
    assert a.base_strength == -3.0
    with pytest.raises(SystemExit):  # a real option after a flag that takes a value still reads as missing
        parser.parse_args(["generate", "--prompt", "--json"])


def test_choices_come_from_the_library_constants():
    parser = build_parser()
    sub = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    opts = {o.dest: o for o in sub["generate"]._actions}
    assert tuple(opts["operator"].choices) == constants.OPERATORS
    assert tuple(opts["dtype"].choices) == constants.DTYPES
    assert tuple(opts["compose"].choices) == constants.COMPOSE_MODES
    opts = {o.dest: o for o in sub["extract"]._actions}
    assert tuple(opts["method"].choices) == constants.METHODS
    assert tuple(opts["position"].choices) == constants.POSITIONS
    assert tuple({o.dest: o for o in sub["export"]._actions}["format"].choices) == constants.EXPORT_FORMATS


def test_help_and_parsing_do_not_import_torch():
    code = ("import sys\n"
            "from steering_lab.cli import build_parser, main\n"
            "p = build_parser()\n"
            "p.parse_args(['generate', '--prompt', 'hi', '--vector', 'sentiment', '--strength', '-20'])\n"
            "p.parse_args(['sweep', '--vector', 'v', '--strengths', '-8,-4,4,8', '--preset', 'neutral',\n"
            "              '--out', 'r'])\n"
            "for cmd in [[], ['generate'], ['sweep'], ['extract'], ['probe', 'train'], ['export'], ['import'],\n"
            "            ['app'], ['list']]:\n"
            "    assert main(cmd + ['--help']) == 0, cmd\n"
            "main(['list', 'vectors'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'gradio', 'numpy', 'safetensors') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    start = time.perf_counter()
    proc = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "usage: steering-lab" in proc.stdout and "generate" in proc.stdout
    assert elapsed < 5.0, f"--help took {elapsed:.2f} s"  # ~0.2 s measured; the bound only catches an import of torch


def test_version():
    from steering_lab import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"steering-lab {__version__} (python ")
    assert f"torch {torch.__version__}" in proc.stdout


def test_usage_errors_from_the_shell():
    proc = run_cli("sweep", "--vector", "sentiment", "--strengths", "-8,-4,4,8", "--preset", "nope", "--out", "r")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: steering-lab sweep") and "--strengths STRENGTHS" in proc.stderr
    assert lines[-1].startswith("steering-lab sweep: error: argument --preset: invalid choice: 'nope'")


def test_vectors_probes_and_controllers_by_name(tiny_dir, capsys, tmp_path, monkeypatch):
    # a name resolves to the shipped file; the tiny model is not the one it was made for
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--vector", "sentiment", "--model", str(tiny_dir),
                       "--max-new-tokens", "2")
    assert code == 2 and "SmolLM2-135M-Instruct" in err and "not found" not in err
    # a vector saved in the user's library (what the app writes) is found by name too
    monkeypatch.setenv("STEERING_LAB_LIBRARY", str(tmp_path / "lib"))
    vec = SteeringVector({1: torch.ones(32)}, model="tiny", d_model=32, n_layers=4, recommended_strength=3.0)
    vec.save(tmp_path / "lib" / "vectors" / "mine")
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--vector", "mine", "--vector", "sentiment"])
    from steering_lab.cli.generate import check_steer_args

    found = check_steer_args(args)
    assert found[0] == str(tmp_path / "lib" / "vectors" / "mine")
    assert Path(found[1]).parent.parts[-2:] == ("shipped", "vectors")
    code, out, _ = run(capsys, "list", "vectors", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert code == 0 and by_name["mine"]["source"] == "saved" and by_name["sentiment"]["source"] == "shipped"
    assert by_name["sentiment"]["layer"] == 11 and by_name["sentiment"]["strength"] > 0


def test_app_command_passes_flags_to_the_launcher(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("steering_lab.ui.app")
    fake.main = lambda argv=None: seen.append(argv)
    monkeypatch.setitem(sys.modules, "steering_lab.ui.app", fake)
    assert main(["app", "--port", "7999", "--model", "embedded", "--mcp"]) == 0
    assert seen == [["--model", "embedded", "--port", "7999", "--mcp"]]
    assert main(["app"]) == 0 and seen[-1] == []


def test_export_and_import(tmp_path, capsys, tiny_dir):
    pytest.importorskip("steering_lab.export")
    from steering_lab.export import load_gguf

    torch.manual_seed(0)
    vec = SteeringVector({k: torch.randn(32) for k in (1, 2)}, model="tiny", d_model=32, n_layers=4,
                         recommended_layer=1, recommended_strength=4.0)
    vec.save(tmp_path / "v")
    code, out, err = run(capsys, "export", "--vector", str(tmp_path / "v"), "--format", "gguf", "--scale", "-2",
                         "--out", str(tmp_path / "v_neg"))
    assert code == 0, err
    gguf = tmp_path / "v_neg.gguf"
    assert str(gguf) in out and gguf.is_file()
    back = load_gguf(gguf)
    for k in (1, 2):
        assert torch.equal(back[k], -2 * vec[k])
    code, out, err = run(capsys, "import", str(gguf), "--name", "negated", "--out", str(tmp_path / "imported"))
    assert code == 0, err
    imported = SteeringVector.load(tmp_path / "imported")
    assert imported.layers == [1, 2] and all(torch.equal(imported[k], -2 * vec[k]) for k in (1, 2))
    # --vector takes the .gguf itself too, and steers exactly as the imported pair does
    outs = []
    for spec in (str(gguf), str(tmp_path / "imported")):
        code, out, err = run(capsys, "generate", "--prompt", "Hello", "--vector", spec, "--strength", "8",
                             "--model", str(tiny_dir), "--max-new-tokens", "4", "--json")
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1] and outs[0]["baseline"] != outs[0]["steered"]
    code, out, err = run(capsys, "export", "--vector", str(tmp_path / "v.safetensors"), "--format", "safetensors",
                         "--scale", "0.5", "--out", str(tmp_path / "half"))
    assert code == 0, err
    half = SteeringVector.load(tmp_path / "half")
    assert all(torch.equal(half[k], 0.5 * vec[k]) for k in (1, 2))
    code, _, err = run(capsys, "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1


def test_layer_out_of_range_for_the_model(tiny_dir, texts, tmp_path, capsys):
    pos, neg = texts
    code, _, err = run(capsys, "extract", "--pos", str(pos), "--neg", str(neg), "--layers", "2-9",
                       "--model", str(tiny_dir), "--out", str(tmp_path / "v"))
    assert code == 2 and "out of range" in err
