"""Drive the real app in Debian's Chromium with Playwright (shared by the browser test and the
latency benchmark). A Gradio slider's ``release`` fires on a real drag: mouse down on the thumb,
move, mouse up over the range input; ``locator.fill()`` does not fire it."""

from __future__ import annotations

import time
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
        "--no-first-run", "--disable-component-update", "--disable-sync"]


@contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1100):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            yield page
        finally:
            browser.close()


def steered_text(page) -> str:
    return page.input_value("#steered textarea")


def wait_done(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_function("() => { const m = document.querySelector('#metrics');"
                           " return m && m.innerText.includes('done'); }", timeout=timeout_ms)


def generate(page, prompt: str) -> None:
    page.fill("#prompt textarea", prompt)
    page.click("#generate")
    page.wait_for_function("() => { const m = document.querySelector('#metrics');"
                           " return m && m.innerText.includes('streaming'); }", timeout=60_000)
    wait_done(page)


def drag_slider(page, elem_id: str, to_fraction: float) -> float:
    """Drag the slider's thumb to ``to_fraction`` of its track; returns the time of mouse up."""
    rng = page.locator(f"#{elem_id} input[type=range]")
    box = rng.bounding_box()
    lo, hi = float(rng.get_attribute("min")), float(rng.get_attribute("max"))
    value = float(rng.input_value())
    y = box["y"] + box["height"] / 2
    x0 = box["x"] + box["width"] * (value - lo) / (hi - lo)
    x1 = box["x"] + box["width"] * min(max(to_fraction, 0.0), 1.0)
    page.mouse.move(x0, y)
    page.mouse.down()
    for i in range(1, 6):
        page.mouse.move(x0 + (x1 - x0) * i / 5, y)
    page.mouse.up()
    return time.perf_counter()


def current_run(page) -> int:
    """The run number the metrics line shows (each Generate / slider release starts a new run)."""
    text = page.inner_text("#metrics")
    return int(text.split("run ")[1].split()[0]) if "run " in text else 0


def wait_first_new_token(page, after_run: int, timeout_ms: int = 60_000) -> float:
    """Block until the steered box shows the first token of a run newer than ``after_run``."""
    page.wait_for_function(
        "(after) => { const t = document.querySelector('#steered textarea');"
        " const m = document.querySelector('#metrics'); if (!t || !m || t.value.length === 0) return false;"
        " const hit = m.innerText.match(/run (\\d+)/); return hit && parseInt(hit[1]) > after; }",
        arg=after_run, timeout=timeout_ms, polling="raf")
    return time.perf_counter()
