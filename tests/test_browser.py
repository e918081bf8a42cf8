"""The real app in a real browser (Debian's Chromium driven by Playwright): type a prompt,
generate, drag a strength slider, and see the steered answer change. Saves a screenshot."""

import shutil
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.real
SHOTS = Path(__file__).resolve().parents[1] / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (see .ci/run)")
def test_slider_drag_changes_the_steered_answer(smol, tmp_path):
    from bench.browser import (
        browser_page,
        current_run,
        drag_slider,
        generate,
        steered_text,
        wait_done,
        wait_first_new_token,
    )
    from steering_lab.intervene import hook_count
    from steering_lab.ui.app import CSS, build_demo
    from steering_lab.ui.context import make_context

    demo = build_demo(make_context(smol, user_dir=tmp_path))
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, css=CSS)
    try:
        with browser_page(url) as page:
            generate(page, "Tell me about your weekend.")
            baseline = page.input_value("#baseline textarea")
            first = steered_text(page)
            assert baseline and first
            run = current_run(page)
            drag_slider(page, "strength-0", 0.0)  # all the way to the negative end
            wait_first_new_token(page, run)
            wait_done(page)
            second = steered_text(page)
            assert second != first
            assert page.input_value("#baseline textarea") == baseline  # only the steered side regenerated
            assert "mean KL to unsteered" in page.inner_text("#metrics")
            SHOTS.mkdir(exist_ok=True)
            page.screenshot(path=str(SHOTS / "app_browser_test.png"), full_page=True)
    finally:
        demo.close()
    assert hook_count(smol.model) == 0
