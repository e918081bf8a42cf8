"""Strangers' inputs: the bad-input catalogue (README "Bad inputs"; one parametrized row each),
per-visitor libraries, names that try to escape, and saves that survive a killed writer.

Every row asserts a clear, typed answer (UserError in the API, gr.Error in the app, exit 2 and one
line in the CLI) and that nothing already stored was lost or changed."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steering_lab.errors import UserError
from steering_lab.probes import Probe
from steering_lab.ui.library import Limits, Visitors, make_libraries, validate_name, visiting
from steering_lab.vector import SteeringVector, check_strength

REPO = Path(__file__).resolve().parents[1]
OWNER = "0" * 32


def vec_for(d: int, layers=(1, 2), seed: int = 0, **meta) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(directions={k: torch.randn(d, generator=g) for k in layers}, **meta)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every stored file's bytes (what 'nothing lost' compares)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")} if folder.is_dir() else {}


class Lab:
    """A tiny model, a shipped folder with one vector and one probe, and a shared saved library."""

    def __init__(self, tiny, root: Path, mode: str = "shared", limits: Limits | None = None) -> None:
        self.lm, self.root = tiny, root
        shipped = root / "shipped"
        vec_for(tiny.d_model, recommended_layer=1, recommended_strength=4.0).save(shipped / "vectors" / "base")
        g = torch.Generator().manual_seed(1)
        Probe(layer=1, pooling="last", weight=torch.randn(tiny.d_model, generator=g), mean=torch.zeros(tiny.d_model),
              scale=torch.ones(tiny.d_model), bias=torch.zeros(1), model="tiny-llama").save(shipped / "probes" / "p")
        self.vectors, self.probes, self.controllers = make_libraries(
            shipped, root / "saved", mode, limits or Limits(max_items=4, max_bytes=64 * 1024, max_upload=32 * 1024))
        with visiting(OWNER if mode == "per-visitor" else None):
            self.vectors.save(vec_for(tiny.d_model, seed=2), "mine")
        self.before = snapshot(root)

    def unchanged(self) -> bool:
        return snapshot(self.root) == self.before


def cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the error lines on stderr (there must be no traceback; progress bars of model
    loading and argparse's usage block on flag errors are not error lines)."""
    from steering_lab.cli import main

    code = main(args)
    text = capsys.readouterr().err
    assert "Traceback" not in text
    err = [line for line in text.splitlines() if "error" in line.lower()]
    return code, err


# ---- the catalogue: (id, function(lab, tmp, capsys) -> None); README's table lists the same ids ---------------

def row_wrong_width(lab, tmp, capsys):
    vec_for(16).save(tmp / "narrow")
    with pytest.raises(UserError, match="d_model 16 .* d_model 32"):
        lab.vectors.import_files(tmp / "narrow.safetensors", None, "narrow", lab.lm)


def row_out_of_range_layer(lab, tmp, capsys):
    with pytest.raises(UserError, match=r"layer\(s\) \[9\] but tiny-llama has 4 blocks"):
        vec_for(lab.lm.d_model, layers=(9,)).check_model(lab.lm)


def row_nan_inf(lab, tmp, capsys):
    with pytest.raises(UserError, match="NaN or inf"):
        SteeringVector(directions={0: torch.tensor([1.0, float("nan")])})
    from safetensors.torch import save_file

    save_file({"direction.1": torch.full((lab.lm.d_model,), float("inf"))}, str(tmp / "inf.safetensors"))
    with pytest.raises(UserError, match="NaN or inf"):
        lab.vectors.import_files(tmp / "inf.safetensors", None, "inf", lab.lm)


def row_empty_safetensors(lab, tmp, capsys):
    (tmp / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        lab.vectors.import_files(tmp / "empty.safetensors", None, "empty", lab.lm)


def row_truncated_safetensors(lab, tmp, capsys):
    data = (lab.root / "saved" / "vectors" / "mine.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid safetensors file"):
        lab.vectors.import_files(tmp / "cut.safetensors", None, "cut", lab.lm)


def _pickle_bomb(tmp: Path, suffix: str) -> tuple[Path, Path]:
    marker = tmp / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp / f"evil{suffix}"
    path.write_bytes(pickle.dumps(Bomb()))
    return path, marker


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pkl"])
def test_pickles_are_refused_and_never_unpickled(tiny, tmp_path, suffix, capsys):
    lab = Lab(tiny, tmp_path / "lab")
    path, marker = _pickle_bomb(tmp_path, suffix)
    with pytest.raises(UserError, match="never loaded"):
        lab.vectors.import_files(path, None, "evil", tiny)
    renamed = tmp_path / "evil.safetensors"  # the same bytes under a safetensors name
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="not a valid safetensors file"):
        SteeringVector.load(renamed)
    code, err = cli(["generate", "--prompt", "hi", "--vector", str(path)], capsys)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert not marker.exists() and lab.unchanged()


def row_gguf_not_a_control_vector(lab, tmp, capsys):
    export = pytest.importorskip("steering_lab.export")
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp / "model.gguf"), "llama")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="control.?vector"):
        export.load_gguf(tmp / "model.gguf")


def row_non_utf8_contrast_set(lab, tmp, capsys):
    from steering_lab.datasets import load_user

    (tmp / "latin1.jsonl").write_bytes('{"positive": "caf\xe9", "negative": "no"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.jsonl is not UTF-8"):
        load_user(tmp / "latin1.jsonl")


def row_empty_contrast_set(lab, tmp, capsys):
    from steering_lab.datasets import load_user

    (tmp / "empty.csv").write_text("positive,negative\n")
    with pytest.raises(UserError, match="no examples"):
        load_user(tmp / "empty.csv")


def row_one_sided_contrast_set(lab, tmp, capsys):
    from steering_lab.datasets import load_user

    (tmp / "pos.txt").write_text("good\nfine\n")
    (tmp / "neg.txt").write_text("\n\n")
    with pytest.raises(UserError, match="negative side is empty"):
        load_user(tmp / "pos.txt", tmp / "neg.txt")
    (tmp / "half.jsonl").write_text('{"positive": "good"}\n')
    with pytest.raises(UserError, match="missing field 'negative'"):
        load_user(tmp / "half.jsonl")


def row_mismatched_pair_counts(lab, tmp, capsys):
    from steering_lab.datasets import ContrastSet
    from steering_lab.extract import extract

    with pytest.raises(UserError, match="equal lengths"):
        ContrastSet("x", ["a", "b"], ["c"], prompts=["p", "q"])
    with pytest.raises(UserError, match="pca needs paired examples"):
        extract(lab.lm, ContrastSet("x", ["a", "b", "c"], ["d", "e"]), "pca")


def row_unknown_preset(lab, tmp, capsys):
    code, err = cli(["extract", "--preset", "no-such-set", "--out", str(tmp / "v")], capsys)
    assert code == 2 and len(err) == 1 and "'no-such-set'" in err[0]
    assert not (tmp / "v.safetensors").exists()


def row_strength_beyond_bound(lab, tmp, capsys):
    from steering_lab.generate import generate
    from steering_lab.intervene import Steer, steer

    vec = lab.vectors.get("base")
    for bad in (float("nan"), float("inf"), 1e12):
        with pytest.raises(UserError, match="strength"):
            check_strength(bad, vec)
    big = 2e5 / max(vec.norms().values())  # allowed, but far past recommended 4.0
    assert "more than 10x the recommended" in check_strength(big, vec)
    assert check_strength(4.0, vec) is None
    ids = torch.tensor([lab.lm.encode_prompt("Hello there")])
    with steer(lab.lm, [Steer(vec, big)]), torch.no_grad():
        logits = lab.lm.model(input_ids=ids).logits
    assert torch.isfinite(logits).all()  # never NaN: text stays text
    text = generate(lab.lm, ["Hello there"], Steer(vec, big), max_new_tokens=4)[0]
    assert isinstance(text, str) and "nan" not in text.lower()


def row_prompt_longer_than_context(lab, tmp, capsys):
    ids = list(range(5, 305))  # tiny context is 256
    fitted, notice = lab.lm.fit_prompt(ids, 16)
    assert len(fitted) == 240 and fitted[0] == 5 and fitted[-1] == 304
    assert "300 tokens" in notice and "256" in notice
    assert lab.lm.fit_prompt(ids[:10], 16) == (ids[:10], None)
    with pytest.raises(UserError, match="does not fit"):
        lab.lm.fit_prompt(ids, 400)


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\x00b", "a" * 300, "..",
                                  "x.safetensors", "", "a\nb", "C:\\x", "~/x", " ", "-x", ".hidden"])
def test_bad_names_are_refused_everywhere(tiny, tmp_path, name):
    lab = Lab(tiny, tmp_path / "lab")
    vec = lab.vectors.get("mine")
    for call in (lambda: validate_name(name), lambda: lab.vectors.path(name), lambda: lab.vectors.get(name),
                 lambda: lab.vectors.save(vec, name), lambda: lab.vectors.delete(name),
                 lambda: lab.probes.get(name), lambda: lab.vectors.target(name)):
        with pytest.raises(UserError) as info:
            call()
        assert str(tmp_path) not in str(info.value)  # never a host path
    assert lab.unchanged()


def row_names_with_traversal(lab, tmp, capsys):
    (lab.root / "outside.safetensors").write_bytes((lab.root / "saved" / "vectors" / "mine.safetensors").read_bytes())
    for name in ("../../outside", "../outside"):
        with pytest.raises(UserError, match="invalid name"):
            lab.vectors.get(name)
    # a link planted inside the folder that points out of it is refused too
    (lab.root / "saved" / "vectors" / "link.safetensors").symlink_to(lab.root / "outside.safetensors")
    with pytest.raises(UserError, match="outside the library"):
        lab.vectors.get("link")
    (lab.root / "saved" / "vectors" / "link.safetensors").unlink()
    (lab.root / "outside.safetensors").unlink()


def row_existing_name(lab, tmp, capsys):
    with pytest.raises(UserError, match="exists; choose another name"):
        lab.vectors.save(vec_for(lab.lm.d_model, seed=7), "mine")
    with pytest.raises(UserError, match="name of a shipped vector"):
        lab.vectors.save(vec_for(lab.lm.d_model, seed=7), "base")


def _fail_writes(monkeypatch, err: int) -> None:
    import steering_lab.vector as vector

    if os.geteuid() != 0 and err == errno.EACCES:
        return  # a real read-only folder is set up by the caller
    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(vector.tempfile, "mkstemp", refuse)


def row_read_only_library(lab, tmp, capsys, monkeypatch=None):
    folder = lab.root / "saved" / "vectors"
    folder.chmod(0o500)
    try:
        _fail_writes(monkeypatch, errno.EACCES)
        with pytest.raises(UserError, match="read-only; nothing was changed"):
            lab.vectors.save(vec_for(lab.lm.d_model, seed=7), "new_one")
    finally:
        folder.chmod(0o700)


def row_full_disk(lab, tmp, capsys, monkeypatch=None):
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(UserError, match="full; nothing was changed"):
        lab.vectors.save(vec_for(lab.lm.d_model, seed=7), "new_one")


def row_quota_count(lab, tmp, capsys):
    for i in range(3):  # 'mine' + 3 = the limit of 4
        lab.vectors.save(vec_for(lab.lm.d_model, seed=10 + i), f"v{i}")
    lab.before = snapshot(lab.root)
    with pytest.raises(UserError, match="library is full: 4 of 4 .*STEERING_LAB_MAX_ITEMS"):
        lab.vectors.save(vec_for(lab.lm.d_model, seed=20), "one_more")


def row_quota_bytes(lab, tmp, capsys):
    fat = vec_for(lab.lm.d_model, layers=range(4), extra={"notes": "x" * 70_000})
    with pytest.raises(UserError, match="MiB of 0 MiB|STEERING_LAB_MAX_MB"):
        lab.vectors.save(fat, "fat")


def row_oversized_upload(lab, tmp, capsys):
    big = vec_for(lab.lm.d_model, extra={"notes": "x" * 40_000})
    big.save(tmp / "big")
    with pytest.raises(UserError, match="limit is 0 MiB|STEERING_LAB_MAX_UPLOAD_MB"):
        lab.vectors.import_files(tmp / "big.safetensors", tmp / "big.json", "big", lab.lm)


def row_unreachable_model_offline(lab, tmp, capsys):
    from steering_lab.model import load_model

    with pytest.raises(UserError, match="SmolLM2-135M-Instruct"):
        load_model("nobody-here/no-such-model-xyz")
    code, err = cli(["generate", "--prompt", "hi", "--model", "nobody-here/no-such-model-xyz"], capsys)
    assert code == 2 and len(err) == 1 and "SmolLM2-135M-Instruct" in err[0]


def row_probe_for_another_model(lab, tmp, capsys):
    Probe(layer=0, pooling="last", weight=torch.ones(16), mean=torch.zeros(16), scale=torch.ones(16),
          bias=torch.zeros(1), model="other").save(tmp / "p16")
    with pytest.raises(UserError, match="trained on d_model 16"):
        Probe.load(tmp / "p16", lab.lm)


def row_vector_for_another_model_via_cli(lab, tmp, capsys, tiny_dir=None):
    vec_for(16, model="other-model").save(tmp / "v16")
    code, err = cli(["generate", "--prompt", "hi", "--vector", str(tmp / "v16"), "--model", str(tiny_dir)], capsys)
    assert code == 2 and len(err) == 1 and "d_model 16 (other-model)" in err[0]


def row_bad_file_in_the_cli(lab, tmp, capsys):
    (tmp / "bad.safetensors").write_bytes(b"\x00" * 7)
    code, err = cli(["generate", "--prompt", "hi", "--vector", str(tmp / "bad.safetensors")], capsys)
    assert code == 2 and len(err) == 1 and "not a valid safetensors file" in err[0]


def row_errors_hide_host_paths(lab, tmp, capsys):
    folder = lab.root / "saved" / "vectors"
    (folder / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError) as info:
        lab.vectors.get("broken")
    assert "vector 'broken'" in str(info.value) and str(lab.root) not in str(info.value)
    with pytest.raises(UserError) as info:
        lab.vectors.get("nothing_here")
    assert str(lab.root) not in str(info.value)
    (folder / "broken.safetensors").unlink()


def row_gr_error_in_the_app(lab, tmp, capsys):
    import gradio as gr

    from steering_lab.ui.context import user_errors

    with pytest.raises(gr.Error, match="invalid name"):
        user_errors(lambda: lab.vectors.get("../secret"))()


def row_pair_from_an_interrupted_save(lab, tmp, capsys):
    base = lab.root / "saved" / "vectors" / "mine"
    old = SteeringVector.load(base)
    newer = vec_for(lab.lm.d_model, seed=99, description="newer")
    _, js = newer.encode()
    base.with_suffix(".json").write_bytes(js)  # the json of a save whose tensors never landed
    back = lab.vectors.get("mine")
    assert torch.equal(back[1], old[1]) and back.metadata() == old.metadata()
    lab.before = snapshot(lab.root)


def row_controller_for_another_model(lab, tmp, capsys):
    from steering_lab.controller import Controller, ControllerNet

    ctl = Controller(net=ControllerNet(1, 16, 1, 4), input_layers=[0], steer_layers=[1], vector=vec_for(16),
                     base_strength=2.0)
    ctl.save(tmp / "c16")
    with pytest.raises(UserError, match="d_model 16"):
        Controller.load(tmp / "c16", lab.lm)


CATALOGUE = {f.__name__[4:]: f for f in [
    row_wrong_width, row_out_of_range_layer, row_nan_inf, row_empty_safetensors, row_truncated_safetensors,
    row_gguf_not_a_control_vector, row_non_utf8_contrast_set, row_empty_contrast_set, row_one_sided_contrast_set,
    row_mismatched_pair_counts, row_unknown_preset, row_strength_beyond_bound, row_prompt_longer_than_context,
    row_names_with_traversal, row_existing_name, row_read_only_library, row_full_disk, row_quota_count,
    row_quota_bytes, row_oversized_upload, row_unreachable_model_offline, row_probe_for_another_model,
    row_vector_for_another_model_via_cli, row_bad_file_in_the_cli, row_errors_hide_host_paths,
    row_gr_error_in_the_app, row_pair_from_an_interrupted_save, row_controller_for_another_model]}
SMALL = {"quota_bytes": Limits(max_items=None, max_bytes=60_000, max_upload=32 * 1024),
         "oversized_upload": Limits(max_items=None, max_bytes=None, max_upload=20_000)}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(case, tiny, tiny_dir, tmp_path, capsys, monkeypatch):
    lab = Lab(tiny, tmp_path / "lab", limits=SMALL.get(case))
    tmp = tmp_path / "in"
    tmp.mkdir()
    fn = CATALOGUE[case]
    kwargs = {}
    if "monkeypatch" in fn.__code__.co_varnames:
        kwargs["monkeypatch"] = monkeypatch
    if "tiny_dir" in fn.__code__.co_varnames:
        kwargs["tiny_dir"] = tiny_dir
    fn(lab, tmp, capsys, **kwargs)
    assert lab.unchanged(), "a refused input changed or lost stored files"
    assert SteeringVector.load(lab.root / "saved" / "vectors" / "mine", tiny).layers == [1, 2]


def test_catalogue_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [case for case in CATALOGUE if f"`{case}`" not in readme]
    assert not missing, f"README's bad-input table lacks {missing}"


# ---- per-visitor libraries -----------------------------------------------------------------------

def test_visitors_see_only_their_own_and_shipped(tiny, tmp_path):
    lab = Lab(tiny, tmp_path / "lab", mode="per-visitor")  # 'mine' belongs to OWNER
    a, b = Visitors.new_id(), Visitors.new_id()
    vec = vec_for(tiny.d_model, seed=3)
    with visiting(a):
        assert lab.vectors.names() == ["base"]
        lab.vectors.save(vec, "secret_a")
        assert lab.vectors.names() == ["base", "secret_a"] and lab.vectors.is_user("secret_a")
    with visiting(b):
        assert lab.vectors.names() == ["base"]
        for call in (lambda: lab.vectors.get("secret_a"), lambda: lab.vectors.delete("secret_a")):
            with pytest.raises(UserError):
                call()
        lab.vectors.save(vec_for(tiny.d_model, seed=4), "secret_a")  # the same name is B's own
        with pytest.raises(UserError, match="cannot be deleted"):
            lab.vectors.delete("base")
    with visiting(a):
        assert torch.equal(lab.vectors.get("secret_a")[1], vec[1])
    # nobody (no browser id, no session): shipped only, read-only
    assert lab.vectors.names() == ["base"]
    with pytest.raises(UserError, match="needs a session"):
        lab.vectors.save(vec, "anon")


def test_quota_is_per_visitor(tiny, tmp_path):
    shipped = tmp_path / "shipped"
    vec_for(tiny.d_model).save(shipped / "vectors" / "base")
    vectors, probes, _ = make_libraries(shipped, tmp_path / "saved", "per-visitor",
                                        Limits(max_items=2, max_bytes=None, max_upload=2**20))
    a, b = Visitors.new_id(), Visitors.new_id()
    with visiting(a):
        vectors.save(vec_for(tiny.d_model, seed=1), "one")
        probes.save(Probe(layer=0, pooling="last", weight=torch.ones(tiny.d_model), mean=torch.zeros(tiny.d_model),
                          scale=torch.ones(tiny.d_model), bias=torch.zeros(1)), "p")  # all kinds count
        with pytest.raises(UserError, match="your library is full: 2 of 2"):
            vectors.save(vec_for(tiny.d_model, seed=2), "two")
        vectors.save(vec_for(tiny.d_model, seed=3), "one", overwrite=True)  # replacing needs no new room
    with visiting(b):
        vectors.save(vec_for(tiny.d_model, seed=2), "two")


def test_gradio_sessions_bind_to_browser_ids_and_api_clients_are_private(tiny, tmp_path):
    from gradio.context import LocalContext

    shipped = tmp_path / "shipped"
    vec_for(tiny.d_model).save(shipped / "vectors" / "base")
    vectors, _, _ = make_libraries(shipped, tmp_path / "saved", "per-visitor")
    visitors = vectors.visitors
    held = visitors.bind("tab-1", None)  # first visit: a fresh id for the browser to keep
    assert len(held) == 32 and visitors.bind("tab-2", held) == held  # a reload brings it back
    assert visitors.bind("tab-3", "../../not-an-id") != "../../not-an-id"
    token = LocalContext.request.set(SimpleNamespace(session_hash="tab-1"))
    try:
        vectors.save(vec_for(tiny.d_model, seed=5), "kept")
    finally:
        LocalContext.request.reset(token)
    for session, sees in (("tab-2", True), ("tab-3", False), ("api-client", False)):
        token = LocalContext.request.set(SimpleNamespace(session_hash=session))
        try:
            assert ("kept" in vectors.names()) == sees
        finally:
            LocalContext.request.reset(token)
    token = LocalContext.request.set(SimpleNamespace(session_hash="api-client"))  # no browser id: its own space
    try:
        vectors.save(vec_for(tiny.d_model, seed=6), "api_one")
        assert vectors.names() == ["api_one", "base"]
    finally:
        LocalContext.request.reset(token)
    with visiting(held):
        assert vectors.names() == ["base", "kept"]


def test_library_mode_from_environment(monkeypatch):
    from steering_lab.ui.library import library_mode

    monkeypatch.delenv("STEERING_LAB_LIBRARY_MODE", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert library_mode() == "shared"
    monkeypatch.setenv("SPACE_ID", "someone/steering-lab")
    assert library_mode() == "per-visitor"
    monkeypatch.setenv("STEERING_LAB_LIBRARY_MODE", "shared")
    assert library_mode() == "shared"
    monkeypatch.setenv("STEERING_LAB_LIBRARY_MODE", "everyone")
    with pytest.raises(UserError, match="unknown library mode"):
        library_mode()
    monkeypatch.setenv("STEERING_LAB_MAX_ITEMS", "7")
    monkeypatch.setenv("STEERING_LAB_MAX_MB", "0")
    limits = Limits.from_env("per-visitor")
    assert limits.max_items == 7 and limits.max_bytes is None and limits.max_upload == 16 * 2**20


def test_concurrent_saves_of_one_name_leave_exactly_one(tiny, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    lab = Lab(tiny, tmp_path / "lab")
    vecs = [vec_for(tiny.d_model, seed=30 + i, description=str(i)) for i in range(8)]

    def save(v):
        try:
            return lab.vectors.save(v, "race")
        except UserError:
            return None

    with ThreadPoolExecutor(8) as pool:
        won = [r for r in pool.map(save, vecs) if r]
    assert won == ["race"]
    back = lab.vectors.get("race")
    assert torch.equal(back[1], vecs[int(back.description)][1])


# ---- atomic saves ---------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from steering_lab.vector import SteeringVector
    base, d = sys.argv[1], 400_000
    print("ready", flush=True)
    i = 1
    while True:
        SteeringVector(directions={k: torch.full((d,), float(i)) for k in range(4)}, description=str(i)).save(base)
        i += 1
""")


def consistent(base: Path) -> int:
    """Load the pair; its tensors must be the version its metadata names. Returns the version."""
    vec = SteeringVector.load(base)
    version = int(vec.description)
    assert all(bool((t == version).all()) for t in vec.directions.values()), "tensors and metadata disagree"
    return version


def test_a_writer_killed_mid_save_leaves_a_whole_version(tmp_path):
    base = tmp_path / "v"
    SteeringVector(directions={k: torch.full((400_000,), 0.0) for k in range(4)}, description="0").save(base)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = set()
    for delay in (0.1, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(base)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(consistent(base))  # whichever version it is, it is whole
    for leftover in tmp_path.glob(".*.tmp"):  # a killed writer may leave its temp file, never a torn pair
        leftover.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.safetensors"]


def test_a_crash_between_the_two_writes_keeps_the_previous_version(tmp_path, monkeypatch):
    import steering_lab.vector as vector

    base = tmp_path / "v"
    old = vec_for(8, description="old")
    old.save(base)
    real, calls = vector.atomic_write_bytes, []

    def crash_on_second(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        real(path, data)

    monkeypatch.setattr(vector, "atomic_write_bytes", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        vec_for(8, seed=5, description="new").save(base)
    monkeypatch.setattr(vector, "atomic_write_bytes", real)
    back = SteeringVector.load(base)
    assert back.description == "old" and torch.equal(back[1], old[1])
    probe = Probe(layer=0, pooling="last", weight=torch.ones(8), mean=torch.zeros(8), scale=torch.ones(8),
                  bias=torch.zeros(1), description="old")
    probe.save(tmp_path / "p")  # probes need their json: the one of an unfinished save is not used
    calls.clear()
    monkeypatch.setattr(vector, "atomic_write_bytes", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        Probe(layer=1, pooling="mean", weight=torch.zeros(8), mean=torch.zeros(8), scale=torch.ones(8),
              bias=torch.zeros(1), description="new").save(tmp_path / "p")
    monkeypatch.setattr(vector, "atomic_write_bytes", real)
    back = Probe.load(tmp_path / "p")
    assert back.description == "old" and back.layer == 0 and torch.equal(back.weight, probe.weight)


def test_model_cache_is_published_whole(tmp_path):
    from steering_lab.model import save_cache_dir

    cached = tmp_path / "models" / "m"

    def half_then_crash(tmp):
        (tmp / "weights").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    assert save_cache_dir(cached, half_then_crash) is False
    assert not cached.exists() and not list(cached.parent.glob(".tmp-*"))

    def whole(tmp):
        (tmp / "weights").write_bytes(b"y" * 100)

    assert save_cache_dir(cached, whole) is True and (cached / "READY").is_file()
    assert save_cache_dir(cached, lambda tmp: (tmp / "weights").write_bytes(b"z")) is True  # first one wins
    assert (cached / "weights").read_bytes() == b"y" * 100
    with pytest.raises(KeyboardInterrupt):  # killed mid-write: the published copy is untouched
        save_cache_dir(cached, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert (cached / "weights").read_bytes() == b"y" * 100


def test_sweep_report_folders_are_bounded_and_removed(tmp_path):
    from steering_lab.ui.sweep_tab import ReportDirs

    reports = ReportDirs(keep=3)
    made = []
    for _ in range(6):
        made.append(reports.new())
        (made[-1] / "r.json").write_text("{}")
        time.sleep(0.01)
    assert sorted(reports.root.iterdir()) == sorted(made[-3:])
    root = reports.root
    reports.cleanup()
    assert not root.exists()


def test_upload_is_validated_in_place_and_stored_as_our_own_copy(tiny, tmp_path):
    lab = Lab(tiny, tmp_path / "lab")
    src = vec_for(tiny.d_model, seed=8, description="uploaded")
    src.save(tmp_path / "up")
    meta = json.loads((tmp_path / "up.json").read_text())
    meta["description"] = "edited by hand"
    (tmp_path / "up.json").write_text(json.dumps(meta))  # hand edits keep working (checksum still matches)
    assert lab.vectors.import_files(tmp_path / "up.safetensors", tmp_path / "up.json", "up", tiny) == "up"
    back = lab.vectors.get("up")
    assert back.description == "edited by hand" and torch.equal(back[1], src[1])
    assert not [p for p in (lab.root / "saved" / "vectors").iterdir() if "upload" in p.name]
