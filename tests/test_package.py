"""The installable package: a wheel with the CLI, the dependencies and the shipped library, installed
into a fresh venv and run from outside the checkout; the light modules the CLI parses with; where
shipped artifacts are found."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from steering_lab import constants, resources

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "steering_lab"
LIGHT = {"constants", "errors", "resources"}  # what the CLI may import before a command runs


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


# ---------------------------------------------------------------- light modules and the CLI layout

def test_constants_agree_with_the_library():
    from steering_lab import activations, compose, extract, intervene, probes
    from steering_lab.model import pick_dtype

    assert intervene.OPERATORS == constants.OPERATORS and intervene.SCOPES == constants.SCOPES
    assert activations.POSITIONS == constants.POSITIONS and probes.POOLINGS == constants.POOLINGS
    assert tuple(extract.METHODS) == constants.METHODS
    assert tuple(compose.MODES) == constants.COMPOSE_MODES
    assert [pick_dtype(torch.device("cpu"), d) for d in constants.DTYPES] == [
        torch.float32, torch.float32, torch.bfloat16, torch.float16]


def test_cli_modules_import_nothing_heavy_at_module_level_and_form_no_cycle():
    for path in sorted((PKG / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: command bodies import what they need inside
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
                assert all(n in sys.stdlib_module_names for n in names), (path.name, names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in sys.stdlib_module_names, (path.name, node.module)
                elif node.level == 2:  # steering_lab.<module>
                    targets = [node.module] if node.module else [a.name for a in node.names]
                    assert set(targets) <= LIGHT, (path.name, targets)
                elif path.name not in ("main.py", "__init__.py"):  # groups import only cli.common
                    assert (node.module, [a.name for a in node.names]) in ((None, ["common"]),), path.name


def test_import_steering_lab_is_lazy():
    code = ("import sys, steering_lab\n"
            "assert 'torch' not in sys.modules\n"
            "from steering_lab import Steer, SteeringVector, __version__\n"
            "assert 'torch' in sys.modules and Steer.__module__ == 'steering_lab.intervene'\n"
            "assert 'load_model' in dir(steering_lab)\n"
            "try:\n"
            "    steering_lab.nope\n"
            "except AttributeError:\n"
            "    print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---------------------------------------------------------------- where shipped artifacts are found

def test_shipped_library_is_package_data():
    for kind in ("vectors", "probes", "controllers"):
        folder = resources.shipped_dir(kind)
        assert folder.is_dir() and folder.parent == PKG / "shipped"
        names = resources.names(kind, user=False)
        assert names and all((folder / f"{n}.json").is_file() for n in names)
    assert "sentiment" in resources.names("vectors", user=False)
    assert resources.names("saes", user=False) == [] or resources.shipped_dir("saes").is_dir()
    with pytest.raises(ValueError, match="unknown artifact kind"):
        resources.shipped_dir("models")
    from steering_lab.model import cache_root
    from steering_lab.ui.library import ROOT as UI_ROOT

    assert UI_ROOT == resources.shipped_root()
    assert cache_root() == resources.cache_root()


def test_find_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERING_LAB_LIBRARY", str(tmp_path / "lib"))
    shipped = resources.shipped_dir("vectors") / "sentiment"
    assert resources.find("vectors", "sentiment") == shipped
    assert resources.find("vectors", str(shipped) + ".safetensors") == shipped
    assert resources.find("vectors", str(shipped) + ".json") == shipped
    assert resources.find("probes", "harmful") == resources.shipped_dir("probes") / "harmful"
    assert resources.find("vectors", "no_such") is None and resources.resolve("vectors", "no_such") == "no_such"
    # a path is never looked up as a name, and a local file wins over a shipped name
    assert resources.find("vectors", "./sentiment") is None
    (tmp_path / "sentiment.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resources.find("vectors", "sentiment") == Path("sentiment")
    # the user's library (where the app saves) comes after the shipped one
    user = tmp_path / "lib" / "vectors"
    user.mkdir(parents=True)
    (user / "mine.safetensors").write_bytes(b"x")
    assert resources.find("vectors", "mine") == user / "mine" and "mine" in resources.names("vectors")
    sae = tmp_path / "lib" / "saes" / "my_sae"  # SAEs are folders (sae-lens format: cfg.json + weights)
    sae.mkdir(parents=True)
    assert resources.find("saes", "my_sae") is None
    (sae / "cfg.json").write_text('{"hook_name": "blocks.3.hook_resid_post", "d_sae": 64}')
    assert resources.find("saes", "my_sae") == sae and resources.find("saes", str(sae)) == sae
    assert "my_sae" in resources.names("saes")
    gguf = tmp_path / "v.gguf"
    assert resources.find("vectors", str(gguf)) is None
    gguf.write_bytes(b"x")
    assert resources.find("vectors", str(gguf)) == gguf


# ---------------------------------------------------------------- the wheel

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project (so no build/ or egg-info lands in the checkout)."""
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("cannot build a wheel here: setuptools or pip is missing")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PKG, src / "steering_lab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(work / "dist"), str(src)], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = (work / "dist").glob("steering_lab-*.whl")
    return found


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_wheel_declares_dependencies_entry_point_and_ships_the_library(wheel):
    from packaging.requirements import Requirement

    from steering_lab import __version__

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = f"steering_lab-{__version__}.dist-info"
        meta = z.read(f"{dist_info}/METADATA").decode()
        entry = z.read(f"{dist_info}/entry_points.txt").decode()
    declared = {str(Requirement(line.split(":", 1)[1].strip())) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")}
    assert declared == {str(Requirement(r)) for r in _requirements()}
    torch_req = next(Requirement(r) for r in _requirements() if Requirement(r).name == "torch")
    assert all(s.operator == ">=" for s in torch_req.specifier)  # a GPU Space keeps its own torch build
    assert f"Version: {__version__}" in meta
    assert "[console_scripts]" in entry and "steering-lab = steering_lab.cli:main" in entry
    for folder in ("shipped", "data"):
        on_disk = {p.relative_to(ROOT).as_posix() for p in (PKG / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        assert on_disk and on_disk <= names, sorted(on_disk - names)[:5]
    assert "steering_lab/cli/main.py" in names and "steering_lab/cli.py" not in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


@pytest.mark.real
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment (no download): its site-packages, after the venv's own
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_steering_lab_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cli = str(bindir / "steering-lab")

    def run(*argv, timeout=120):
        return subprocess.run([*argv], capture_output=True, text=True, cwd=outside, env=_env(), timeout=timeout)

    proc = run(str(python), "-c", "import steering_lab; print(steering_lab.__file__)")
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(venv), proc.stdout + proc.stderr
    proc = run(cli, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("steering-lab 0.1.0"), proc.stderr
    proc = run(cli, "list", "vectors")
    assert proc.returncode == 0 and "sentiment" in proc.stdout and "refusal_style" in proc.stdout
    proc = run(cli, "generate", "--vector", "sentiment", "--strength", "-20", "--prompt", "How was your day?",
               "--max-new-tokens", "8", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["baseline"] and out["steered"] and out["baseline"] != out["steered"]
