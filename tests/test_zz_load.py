"""Load (issue 12; named to run last: its 8 gradio_client sessions can outlive the test by a moment and
were seen reaching a later module's server on a reused loopback port).
the app launched on the real embedded model, 8 concurrent gradio_client sessions
with 25 requests each - the named ``/generate`` endpoint and the streaming ``/openai_chat`` event,
different vectors, layers, operators and strengths - and seeded random cancellations of streams in
flight. Every completed output equals the same request run alone in-process (greedy, token for
token: the engine's batched rows are left-padded and masked, see tests/test_engine.py), no request
fails, the engine ends empty with no hook, and the server's resident memory after the run is within
10% of what it was after warm-up.

Memory: the server runs in this process; its resident set is read from /proc/self/status after
``gc.collect()`` and glibc's ``malloc_trim(0)`` at both points. The trim hands back heap pages that
are free but cached by the allocator (glibc keeps one arena per thread that ever ran a forward pass,
and gradio's worker threads take turns driving the engine): without it the number measures the
allocator's high-water mark, not what is alive. A leak (a KV cache, a row, a request kept) is live
memory and is not trimmed. The warm-up is a run of the same size: the first such run still grows the
process by 9-12% (allocator arenas and native caches filling, measured: +4% with MALLOC_ARENA_MAX=1;
Python objects grow by ~9,000 small dicts/lists, gradio's bounded per-event records), later ones by
+1.8% and +0.4% (raw resident set: +4%, +0.7%).
"""

from __future__ import annotations

import ctypes
import gc
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from steering_lab.engine import engine_for
from steering_lab.intervene import hook_count
from steering_lab.ui.context import make_context

pytestmark = pytest.mark.real

SESSIONS, PER_SESSION, TOKENS = 8, 25, 8
SYSTEM = "Be brief."  # a short system prompt instead of the model's default one: prefill dominates on CPU

# (prompt, vector, strength, layer, operator) for /generate; chat bodies below. Different vectors,
# layers, operators and strengths, and prompts of different lengths (rows are left-padded in a batch).
GENERATE = [
    ("Tell me about your weekend.", "sentiment", 20.0, None, "add"),
    ("What should I cook tonight?", "formality", -15.0, None, "add"),
    ("Describe a rainy afternoon in the city.", "harmful", 1.0, 9, "ablate"),
    ("Can you help me plan a trip?", "refusal_style", 30.0, 12, "add"),
]
CHAT = [
    ("How do you feel about Mondays?", [{"vector": "sentiment", "strength": -20.0}]),
    ("Write one line about the sea.", [{"vector": "openness", "strength": 15.0, "layer": 8}]),
    ("Give me a tip for an exam.", [{"vector": "conscientiousness", "strength": 20.0},
                                    {"vector": "extraversion", "strength": -10.0}]),
    ("What is your favourite colour?", []),
    ("Why do dogs bark at night?", [{"vector": "agreeableness", "strength": 25.0}]),
    ("Say something about tomorrow.", [{"vector": "neuroticism", "strength": 20.0, "operator": "add"}]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    """This process's resident memory (the server runs in it) after a collection and glibc's
    ``malloc_trim`` (see the module docstring), from /proc/self/status."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the raw resident set
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def chat_body(i: int) -> dict:
    prompt, steering = CHAT[i]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return {"model": "smollm2", "messages": messages, "max_tokens": TOKENS, "temperature": 0, "steering": steering}


def generate_args(i: int) -> tuple:
    prompt, vector, strength, layer, operator = GENERATE[i]
    return prompt, vector, strength, TOKENS, layer, operator, SYSTEM


def expected_outputs(ctx) -> dict:
    """Each request run alone, in-process, through the same functions the endpoints call."""
    from steering_lab.serve.mcp import tools
    from steering_lab.serve.openai import chat_states, parse_request

    gen = tools(ctx)["generate"][0]
    want = {}
    for i in range(len(GENERATE)):
        want[("generate", i)] = gen(*generate_args(i))
        assert engine_for(ctx.lm).idle
    for i in range(len(CHAT)):
        *_, last = chat_states(ctx, parse_request(ctx, chat_body(i)))
        want[("chat", i)] = last
        assert engine_for(ctx.lm).idle
    return want


def run_session(url: str, seed: int, n: int, results: list, cancel_p: float) -> None:
    """One visitor: ``n`` requests in a row; a chat stream is cancelled (prob. ``cancel_p``) after its
    first 1-3 tokens arrived. Appends (kind, index, cancelled, output or exception) to ``results``."""
    from gradio_client import Client

    rng = random.Random(seed)
    client = Client(url, verbose=False)
    try:
        for _ in range(n):
            kind = "chat" if rng.random() < 0.6 else "generate"
            i = rng.randrange(len(CHAT) if kind == "chat" else len(GENERATE))
            cancel_after = rng.randint(1, 3) if kind == "chat" and rng.random() < cancel_p else 0
            try:
                if kind == "generate":
                    results.append((kind, i, False, client.predict(*generate_args(i), api_name="/generate")))
                    continue
                job = client.submit(chat_body(i), api_name="/openai_chat")
                if cancel_after:
                    t0 = time.perf_counter()
                    while len(job.outputs()) < cancel_after and not job.done():
                        assert time.perf_counter() - t0 < 120, "no streamed tokens"
                        time.sleep(0.005)
                    job.cancel()
                    t0 = time.perf_counter()
                    while not job.done():
                        assert time.perf_counter() - t0 < 60, "a cancelled job did not end"
                        time.sleep(0.005)
                    results.append((kind, i, True, None))
                    continue
                results.append((kind, i, False, job.result(timeout=300)))
            except Exception as exc:  # noqa: BLE001 - reported by the test
                results.append((kind, i, False, exc))
    finally:
        client.close()


def run_load(url: str, n: int, base_seed: int, cancel_p: float) -> list:
    results: list = []
    threads = [threading.Thread(target=run_session, args=(url, base_seed + s, n, results, cancel_p))
               for s in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a session hung"
    return results


@pytest.fixture(scope="module")
def own_lm():
    """The embedded model loaded once more (from its cache, ~1 s): this test's server, its engine and any
    worker thread still finishing a cancelled non-streaming call stay apart from the rest of the suite."""
    from steering_lab.model import load_model

    return load_model()


def test_eight_sessions_of_25_requests_with_cancellations(own_lm, tmp_path):
    smol = own_lm
    from steering_lab.ui.app import build_demo

    ctx = make_context(smol, user_dir=tmp_path)
    eng = engine_for(smol)
    want = expected_outputs(ctx)
    assert len({str(v) for v in want.values()}) == len(want)  # the requests really differ
    demo = build_demo(ctx)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        # warm-up: the same load (one-time costs: connections, shapes, native caches, allocator arenas)
        warm = run_load(url, PER_SESSION, 1000, 0.25)
        assert not [r for r in warm if isinstance(r[3], Exception)]
        before = rss_mb()
        t0 = time.perf_counter()
        results = run_load(url, PER_SESSION, 0, 0.25)
        took = time.perf_counter() - t0
        assert len(results) == SESSIONS * PER_SESSION
        errors = [r for r in results if isinstance(r[3], Exception)]
        assert not errors, errors[:3]
        done = [r for r in results if not r[2]]
        cancelled = len(results) - len(done)
        assert cancelled >= 10 and len(done) >= 100  # seeded: both kinds are really there
        wrong = [(k, i, out, want[(k, i)]) for k, i, _, out in done if out != want[(k, i)]]
        assert not wrong, f"{len(wrong)} of {len(done)} outputs differ from the request run alone: {wrong[:2]}"
        assert {k for k, *_ in done} == {"chat", "generate"}
        t_idle = time.perf_counter()
        while not eng.idle:
            assert time.perf_counter() - t_idle < 10, "the engine did not empty after the load"
            time.sleep(0.01)
        assert eng.active_rows == 0 and hook_count(smol.model) == 0
        after = rss_mb()
        assert after <= 1.10 * before, f"resident memory grew from {before:.0f} MB to {after:.0f} MB"
        print(f"load: {len(results)} requests ({cancelled} cancelled) in {took:.1f} s; "
              f"RSS {before:.0f} -> {after:.0f} MB; {eng.steps_run} engine steps")
    finally:
        demo.close()
    assert hook_count(smol.model) == 0
