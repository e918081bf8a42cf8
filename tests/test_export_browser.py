"""The Library tab in a real browser (Debian's Chromium via Playwright): a visitor uploads a llama.cpp
control-vector GGUF, it becomes their own saved vector (which lives outside every folder gradio serves),
and they download it back both as safetensors + json and as GGUF; the downloaded files are read back."""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

from steering_lab.export import export_gguf, load_gguf
from steering_lab.vector import SteeringVector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outside_served_folders() -> Path:
    """A library folder like a real user's (under the home cache), not in the working directory or the
    temp dir, which gradio would serve anyway and so would hide the bug this test is about."""
    root = Path.home() / ".cache" / "steering_lab-test" / uuid.uuid4().hex
    for served in (Path.cwd(), Path(tempfile.gettempdir())):
        if root.resolve().is_relative_to(served.resolve()):
            pytest.skip(f"the home cache {root} is inside {served}, which gradio serves")
    return root


def pick(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option, exact=True).click()


def download(page, filename: str, dest: Path) -> Path:
    link = page.locator(f'#library-download a[download="{filename}"]')
    link.wait_for(timeout=30_000)
    with page.expect_download(timeout=30_000) as info:
        link.click()
    info.value.save_as(dest / info.value.suggested_filename)
    return dest / info.value.suggested_filename


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (see .ci/run)")
def test_upload_gguf_then_download_own_vector_in_both_formats(tiny, tmp_path):
    from bench.browser import browser_page
    from steering_lab.ui.app import CSS, build_demo
    from steering_lab.ui.context import make_context

    g = torch.Generator().manual_seed(7)
    src = SteeringVector(directions={k: torch.randn(tiny.d_model, generator=g) for k in (1, 2, 3)},
                         model=tiny.name, n_layers=tiny.n_layers, method="mean_diff", recommended_layer=2,
                         recommended_strength=4.5, description="browser round trip")
    upload = export_gguf(src, tmp_path / "mine.gguf", model_hint="llama")
    library = outside_served_folders()
    got = tmp_path / "downloads"
    got.mkdir()
    ctx = make_context(tiny, user_dir=library, library_mode="per-visitor")
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, css=CSS)
    try:
        with browser_page(url) as page:
            page.get_by_role("tab", name="Library").click()
            page.locator("#library-upload").wait_for(state="visible", timeout=30_000)
            page.locator("#library-upload input[type=file]").set_input_files(str(upload))
            # uploaded (to gradio's upload folder) once the component links to the file on the server
            page.locator('#library-upload a[download="mine.gguf"][href*="gradio_api/file="]').wait_for(timeout=30_000)
            page.click("#library-upload-button")
            page.locator("#library-upload-message", has_text="saved mine").wait_for(timeout=30_000)

            # it is this visitor's own vector, stored under the (unserved) library folder
            saved = list(library.rglob("mine.safetensors"))
            assert len(saved) == 1 and "visitors" in saved[0].parts

            pick(page, "library-pick", "mine")
            st = download(page, "mine.safetensors", got)
            js = download(page, "mine.json", got)
            back = SteeringVector.load_files(st, js)
            assert back.layers == [1, 2, 3] and back.recommended_layer == 2
            assert back.recommended_strength == 4.5 and back.description == "browser round trip"
            assert all(torch.equal(back[k], src[k]) for k in src.layers)

            page.get_by_label("GGUF (llama.cpp, repeng)").check()
            one = load_gguf(download(page, "mine-L2.gguf", got))
            assert one.layers == [2] and torch.equal(one[2], src[2])
            page.get_by_label("all layers (except 0)").check()
            every = load_gguf(download(page, "mine.gguf", got))
            assert every.layers == [1, 2, 3] and all(torch.equal(every[k], src[k]) for k in src.layers)
            assert every.extra["model_type"] == "llama"
            page.get_by_label("recommended layer", exact=True).check()
            page.locator('#library-download a[download="mine-L2.gguf"]').wait_for(timeout=30_000)
            page.locator("#library-scale input").fill("-2")
            scaled = load_gguf(download(page, "mine-L2-x-2.gguf", got))
            assert torch.equal(scaled[2], src[2] * -2) and scaled.extra["gguf_scale"] == -2
    finally:
        demo.close()
        shutil.rmtree(library, ignore_errors=True)
        try:
            library.parent.rmdir()  # only when no other run's folder is left
        except OSError:
            pass
