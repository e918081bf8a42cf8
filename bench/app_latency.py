"""Slider release -> first streamed steered token, and streaming speed, in the real app in a real
browser, on the embedded model, with in-process baselines measured in the same run.

    python bench/app_latency.py            # writes bench/app_latency.json and docs/screenshot.png

In-process baselines (no app, no browser): time to the first token and tokens/s of plain greedy
generation (1 row), and of the stream a slider release runs (steered row + unsteered shadow row).
In the browser: drag the first strength slider (real mouse down/move/up), time from mouse up until
the steered box shows the new stream's first token; then tokens/s as the app reports it. Also a
release *during* a stream (the stream in flight must give way).
"""

from __future__ import annotations

import datetime
import json
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser import browser_page, current_run, drag_slider, generate, wait_done, wait_first_new_token  # noqa: E402
from steering_lab.generate import stream  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.live import live_stream  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.ui.app import CSS, build_demo  # noqa: E402
from steering_lab.ui.context import make_context  # noqa: E402

PROMPT = "Tell me about your weekend."
TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_stream(steps) -> tuple[float, float]:
    """(seconds to the first step, tokens/s over the rest)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in steps:
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first) if n > 1 else float("nan")


def main() -> None:
    lm = load_model()
    ctx = make_context(lm, user_dir=tempfile.mkdtemp())
    vec = ctx.vectors.get("sentiment")
    s = -vec.recommended_strength
    report: dict = {"date": str(datetime.date.today()), "machine": f"{platform.machine()}, {platform.system()}, "
                    f"{__import__('os').cpu_count()} CPU cores, no GPU", "model": lm.name, "prompt": PROMPT,
                    "max_new_tokens": TOKENS}
    # ---- in-process baselines -------------------------------------------------------------
    plain, live = [], []
    for _ in range(5):
        plain.append(time_stream(stream(lm, [PROMPT], (), max_new_tokens=TOKENS)))
        live.append(time_stream(live_stream(lm, PROMPT, [Steer(vec, s)], with_baseline=False, max_new_tokens=TOKENS)))
    report["inprocess_plain_ttft_s"] = statistics.median(x[0] for x in plain)
    report["inprocess_plain_tok_per_s"] = statistics.median(x[1] for x in plain)
    report["inprocess_release_stream_ttft_s"] = statistics.median(x[0] for x in live)
    report["inprocess_release_stream_tok_per_s"] = statistics.median(x[1] for x in live)
    print(json.dumps(report, indent=2), flush=True)
    # ---- the app in a browser ---------------------------------------------------------------
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, css=CSS)
    latencies, speeds = [], []
    try:
        with browser_page(url) as page:
            generate(page, PROMPT)
            for i in range(8):
                run = current_run(page)
                t_up = drag_slider(page, "strength-0", 0.1 if i % 2 == 0 else 0.9)
                latencies.append(wait_first_new_token(page, run) - t_up)
                wait_done(page)
                text = page.inner_text("#metrics")
                speeds.append(float(text.split("tok/s")[0].split("·")[-1].strip()))
            # a release while a stream is in flight: it must cut in, not wait for the end
            drag_slider(page, "strength-0", 0.2)
            page.wait_for_function("() => document.querySelector('#metrics').innerText.includes('streaming')")
            time.sleep(0.3)
            run = current_run(page)
            t_up = drag_slider(page, "strength-0", 0.8)
            during = wait_first_new_token(page, run) - t_up
            wait_done(page)
            (ROOT / "docs").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "docs" / "screenshot.png"), full_page=True)
    finally:
        demo.close()
    report["browser_release_to_first_token_s"] = {"median": statistics.median(latencies), "max": max(latencies),
                                                  "all": [round(x, 3) for x in latencies]}
    report["browser_release_during_stream_to_first_token_s"] = round(during, 3)
    report["app_streaming_tok_per_s"] = {"median": statistics.median(speeds), "all": speeds}
    out = ROOT / "bench" / "app_latency.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
