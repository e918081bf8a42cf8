"""Cancellation (issue 12): Stop, a new slider release, a closed tab and a cancelled API job end a
generation at the next token and leave nothing behind - no row in the engine, no KV cache, no hook -
without relying on garbage collection (the cyclic collector is off in these tests and the cancelled
generators are still referenced when the engine is checked); after 50 cancellations an unsteered
generation equals the baseline token for token.

All on the real embedded SmolLM2 (greedy, float32 on CPU). Token equality between a request run alone
and the same request in a batch with others is exact here: the engine's batched rows are left-padded
and masked, and the real-model test in tests/test_engine.py asserts the same equality.
"""

from __future__ import annotations

import gc
import random
import shutil
import socket
import time
from contextlib import contextmanager

import pytest
import torch

from steering_lab.engine import Request, engine_for
from steering_lab.generate import generate_ids, stream
from steering_lab.intervene import Steer, hook_count
from steering_lab.ui.context import make_context

pytestmark = pytest.mark.real

PROMPT = "Tell me about your weekend."
OTHERS = ["Write a short poem about the sea.", "What is the capital of France?",
          "Give me three tips for learning to cook, please.", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def no_gc():
    """The cyclic garbage collector off: what is freed must be freed explicitly (or by refcount)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> float:
    """Poll ``cond`` every 10 ms; return the seconds it took (fail after ``timeout``)."""
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.perf_counter() - t0


def engine_empty(lm) -> bool:
    eng = engine_for(lm)
    return eng.idle and eng.active_rows == 0 and hook_count(lm.model) == 0


def rand_steer(lm, rng: random.Random) -> Steer:
    g = torch.Generator().manual_seed(rng.randrange(10 ** 6))
    d = torch.randn(lm.d_model, generator=g)
    return Steer(d / d.norm(), rng.choice([-12.0, -6.0, 6.0, 12.0]), layers=[rng.randrange(4, 20)])


# ---- the engine: a cancelled request leaves at once, even when no one else drives ---------------

def test_cancelled_request_leaves_the_engine_at_once_with_its_stream_still_referenced(smol):
    eng = engine_for(smol)
    assert engine_empty(smol)
    ids = smol.encode_prompt(PROMPT)
    with no_gc():
        # by tag (what Stop, a slider release and a closed tab do through AppContext)
        gen = stream(smol, [PROMPT], Steer(rand_steer(smol, random.Random(1)).vector, 8.0, layers=[10]),
                     max_new_tokens=40, tag="tab-1")
        next(gen)
        next(gen)
        assert eng.active_rows == 1
        assert eng.cancel("tab-1") == 1
        assert engine_empty(smol)  # retired now: no step of anyone else was needed, `gen` is still alive
        assert list(gen) == []  # the stream ends without another token
        # by the handle
        h = eng.submit(Request(prompt_ids=[ids, ids], max_new_tokens=40))
        it = iter(h)
        next(it)
        assert eng.active_rows == 2
        h.cancel()
        assert engine_empty(smol) and h.finished and list(it) == []
        # by closing the stream (what gradio does to a cancelled event's generator)
        gen = stream(smol, [PROMPT], max_new_tokens=40)
        next(gen)
        gen.close()
        assert engine_empty(smol)
        # a pending request (not admitted yet) is dropped as well
        h = eng.submit(Request(prompt_ids=[ids], max_new_tokens=40, tag="tab-2"))
        assert eng.cancel("tab-2") == 1 and engine_empty(smol) and h.finished and list(h) == []


# ---- 50 cancellations, then the baseline token for token ----------------------------------------

def test_fifty_cancellations_then_the_unsteered_answer_equals_the_baseline(smol, tmp_path):
    """50 cancellations of steered requests at random (seeded) steps, by every route: engine tag,
    handle, closed stream (44, on short raw prompts: prefill dominates the cost on CPU), and the Steer
    tab's stream superseded by ``new_run`` or ended by a closed tab's ``end_session`` (6). Each time an
    unsteered request shares the batch and its tokens - the last one chosen in the step right after
    the cancellation - equal the baseline's; the cancelled request leaves at once; afterwards a fresh
    unsteered generation equals the baseline generated before any of it, token for token."""
    from steering_lab.ui.steer_tab import run_stream

    eng = engine_for(smol)
    ctx = make_context(smol, user_dir=tmp_path)
    n_base = 12
    baseline = generate_ids(smol, [PROMPT], max_new_tokens=n_base, chat=False)[0]
    base_ids = smol.encode_prompt(PROMPT, chat=False)
    rng = random.Random(12)
    routes = ["tag", "handle", "close"] * 14 + ["new_run", "end_session"] * 3 + ["tag", "close"]
    rng.shuffle(routes)
    assert len(routes) == 50
    with no_gc():
        for i, route in enumerate(routes):
            session = f"s{i}"
            app_route = route in ("new_run", "end_session")
            cancel_at = rng.randrange(1 if app_route else 0, 3)  # tokens the victim gets before its cancellation
            n_plain = cancel_at + 1
            plain = iter(eng.submit(Request(prompt_ids=[base_ids], max_new_tokens=n_plain)))
            other = rng.choice(OTHERS)
            if app_route:  # the Steer tab's stream for a visitor (steered, shadow and baseline rows)
                run = ctx.new_run(session)
                strength = rng.choice([-20.0, 10.0, 20.0])
                victim = run_stream(ctx, session, run, other, "", ["sentiment"], [strength, 0, 0], "add",
                                    "recommended", "separate", 64, "none", [], None)
            else:  # EOS does not end these: every victim is still running when it is cancelled
                req = Request(prompt_ids=[smol.encode_prompt(other, chat=False)], steering=[rand_steer(smol, rng)],
                              max_new_tokens=64, tag=session, stop_on_eos=False)
                if route == "close":  # a stream whose consumer goes away (gradio closes a cancelled event's generator)
                    victim = eng.stream(req)
                else:
                    victim_h = eng.submit(req)
                    victim = iter(victim_h)
            got = [next(victim) for _ in range(cancel_at)]  # each next() drives the batch (both requests)
            assert len(got) == cancel_at
            rows_before = eng.active_rows
            if route == "tag":
                assert eng.cancel(session) == 1
            elif route == "handle":
                victim_h.cancel()
            elif route == "close":
                victim.close()
            elif route == "new_run":
                ctx.new_run(session)  # a newer slider value or Stop
            else:
                ctx.end_session(session)  # a closed tab
            if cancel_at:  # admitted: its rows left the batch at once; the plain row is still there
                assert eng.active_rows == rows_before - (3 if app_route else 1) >= 0, (i, route)
            assert hook_count(smol.model) == 0
            assert list(victim) == []  # no token after the cancellation
            assert list(plain)[-1].token_ids[0] == baseline[:n_plain], (i, route)
            assert engine_empty(smol), (i, route)
    assert ctx.sessions == 3  # the new_run sessions; end_session dropped its 3
    assert generate_ids(smol, [PROMPT], max_new_tokens=n_base, chat=False)[0] == baseline


# ---- the app: gradio_client job cancellation, and a real browser --------------------------------

@pytest.fixture(scope="module")
def app(smol, tmp_path_factory):
    from steering_lab.ui.app import CSS, build_demo

    ctx = make_context(smol, user_dir=tmp_path_factory.mktemp("lib"))
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, css=CSS)
    try:
        yield ctx, url
    finally:
        demo.close()
    assert engine_empty(smol)


def test_gradio_client_job_cancel_empties_the_engine(app):
    """``job.cancel()`` on the streaming ``/openai_chat`` event (the generation behind the OpenAI
    routes): the server closes the event's generator, whose request leaves the engine at once."""
    from gradio_client import Client

    ctx, url = app
    client = Client(url, verbose=False)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 200, "temperature": 0, "steering": [{"vector": "sentiment", "strength": 8.0}]}
    with no_gc():
        for _ in range(2):
            job = client.submit(body, api_name="/openai_chat")
            wait_for(lambda: len(job.outputs()) >= 2, what="the first streamed tokens")  # noqa: B023
            assert engine_for(ctx.lm).active_rows == 1
            assert job.cancel()
            wait_for(lambda: engine_empty(ctx.lm), timeout=10, what="the engine to empty after job.cancel()")
            time.sleep(0.5)  # outputs already sent may still arrive; then nothing more
            n = len(job.outputs())
            time.sleep(1.0)
            assert len(job.outputs()) == n and job.outputs()[-1]["completion_tokens"][0] < 200
            assert engine_empty(ctx.lm)
    client.close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (see .ci/run)")
def test_stop_slider_release_and_closed_page_in_a_real_browser(app):
    """Chromium: Stop pressed mid-stream ends it (the steered text stops growing, the engine empties);
    a slider released mid-stream replaces the stream in flight (its three rows leave the batch before
    the new stream's first token shows); closing the page mid-stream empties the engine too."""
    from bench.browser import browser_page, current_run, drag_slider

    ctx, url = app
    lm = ctx.lm
    eng = engine_for(lm)

    def start(page) -> None:
        after = current_run(page)
        page.click("#generate")
        page.wait_for_function(
            "(after) => { const m = document.querySelector('#metrics');"
            " const hit = m && m.innerText.match(/run (\\d+)/);"
            " return hit && parseInt(hit[1]) > after && m.innerText.includes('streaming')"
            " && document.querySelector('#steered textarea').value.length > 0; }", arg=after, timeout=60_000)

    with no_gc(), browser_page(url) as page:
        page.fill("#prompt textarea", "Tell me a long story about a dragon who learns to bake.")
        # 1. Stop mid-stream
        start(page)
        assert eng.active_rows == 3  # steered, shadow and baseline rows of this visitor
        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: engine_empty(lm), timeout=10, what="the engine to empty after Stop")
        time.sleep(0.3)  # let the last coalesced update (<= 0.1 s apart) reach the page
        text = page.input_value("#steered textarea")
        time.sleep(1.0)
        assert page.input_value("#steered textarea") == text  # stopped growing
        assert "done" not in page.inner_text("#metrics")  # it never finished
        # 2. a slider released mid-stream: the stream in flight gives way to the new one
        start(page)
        run = current_run(page)
        drag_slider(page, "strength-0", 0.0)
        page.wait_for_function(
            "(after) => { const m = document.querySelector('#metrics');"
            " const hit = m && m.innerText.match(/run (\\d+)/);"
            " return hit && parseInt(hit[1]) > after; }", arg=run, timeout=60_000)
        rows = eng.active_rows
        assert rows in (0, 3), rows  # only the new stream's rows (or none: it already finished); 6 = both
        page.get_by_role("button", name="Stop").click()
        wait_for(lambda: engine_empty(lm), timeout=10, what="the engine to empty after the second Stop")
        # 3. the page closed mid-stream (gradio's unload -> AppContext.end_session)
        sessions = ctx.sessions
        start(page)
        page.close()
        took = wait_for(lambda: engine_empty(lm), timeout=20, what="the engine to empty after the page closed")
        assert took < 20
    wait_for(lambda: ctx.sessions == sessions - 1, timeout=10, what="the closed tab's run id to go")
    assert hook_count(lm.model) == 0
