"""Concurrent visitors on CPU (issue 11): the app launched in-process on the embedded model, 1 user vs
4 concurrent gradio_client sessions, with the engine batching them (generation events run concurrently,
``GENERATE_LIMIT``) and, as the same-run baseline, with ``GENERATE_LIMIT`` forced to 1 (the old
serialized behaviour: one generation event at a time).

    python bench/app_concurrency.py                 # writes bench/app_concurrency.json
    python bench/app_concurrency.py --rounds 2 --tokens 64 --out /tmp/x.json

Each user sends ``--rounds`` requests one after another to the streaming ``/openai_chat`` event (the
generation behind the OpenAI-compatible routes; greedy, 64 new tokens, each user its own vector and
strength). Per request: first-token latency = submit -> the first streamed state with a token, seen by
the client (polled every 5 ms); the answer's tokens. Aggregate tokens/s = all users' tokens / wall time
from the first submit to the last answer. Then the same with the non-streaming named ``/generate``
endpoint (baseline + steered, 2 x 64 tokens per request; time to the whole answer). In-process
references (no app): the engine streaming 1 request, and 4 requests at once. The machine's load
average is recorded before and after (other processes share the cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USERS = [  # (prompt, vector, strength): each user steers with its own vector
    ("Tell me a long story about a dragon who learns to bake bread.", "sentiment", 10.0),
    ("Describe, step by step, how to plan a week-long trip to Italy.", "formality", 10.0),
    ("Write a long letter to a friend about your new job and your colleagues.", "openness", 10.0),
    ("Explain in detail how a bicycle works, part by part.", "conscientiousness", 10.0),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_body(user: int, tokens: int) -> dict:
    prompt, vector, strength = USERS[user]
    return {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "steering": [{"vector": vector, "strength": strength}]}


def chat_user(url: str, user: int, rounds: int, tokens: int, out: list) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            job = client.submit(chat_body(user, tokens), api_name="/openai_chat")
            first = None
            while not job.done():
                if first is None:
                    outs = job.outputs()
                    if outs and outs[-1]["completion_tokens"][0] >= 1:
                        first = time.perf_counter()
                time.sleep(0.005)
            final = job.result()
            end = time.perf_counter()
            first = first if first is not None else end
            out.append({"user": user, "start": t0, "first": first - t0, "end": end,
                        "tokens": final["completion_tokens"][0]})
    finally:
        client.close()


def generate_user(url: str, user: int, rounds: int, tokens: int, out: list) -> None:
    from gradio_client import Client

    prompt, vector, strength = USERS[user]
    client = Client(url, verbose=False)
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            res = client.predict(prompt, vector, strength, tokens, api_name="/generate")
            end = time.perf_counter()
            out.append({"user": user, "start": t0, "end": end, "answer_s": end - t0, "texts": res})
    finally:
        client.close()


def run_users(fn, url: str, users: int, rounds: int, tokens: int) -> list[dict]:
    out: list[dict] = []
    threads = [threading.Thread(target=fn, args=(url, u, rounds, tokens, out)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == users * rounds, "a user failed (see the log)"
    return out


def summarize_chat(rows: list[dict]) -> dict:
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    toks = sum(r["tokens"] for r in rows)
    firsts = [r["first"] for r in rows]
    per_user = {}
    for r in rows:
        per_user.setdefault(r["user"], []).append(round(r["first"], 3))
    return {"requests": len(rows), "tokens": toks, "wall_s": round(wall, 2),
            "aggregate_tok_per_s": round(toks / wall, 2),
            "first_token_s": {"median": round(statistics.median(firsts), 3), "max": round(max(firsts), 3),
                              "per_user": per_user}}


def summarize_generate(rows: list[dict], lm) -> dict:
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    toks = sum(len(lm.tokenizer.encode(t, add_special_tokens=False)) for r in rows for t in r["texts"].values())
    answers = [r["answer_s"] for r in rows]
    return {"requests": len(rows), "tokens_approx": toks, "wall_s": round(wall, 2),
            "aggregate_tok_per_s_approx": round(toks / wall, 2),
            "answer_s": {"median": round(statistics.median(answers), 3), "max": round(max(answers), 3)}}


def inprocess(lm, ctx, users: int, tokens: int) -> dict:
    """The engine alone (no app): ``users`` streams at once, each in its own thread."""
    from steering_lab.generate import stream
    from steering_lab.serve.steering import resolve

    rows: list[dict] = []

    def one(u: int) -> None:
        prompt, vector, strength = USERS[u]
        steers, _ = resolve(ctx, [{"vector": vector, "strength": strength}])
        t0 = time.perf_counter()
        first, n = None, 0
        for step in stream(lm, [prompt], steers, max_new_tokens=tokens):
            n = len(step.token_ids[0])
            if first is None:
                first = time.perf_counter() - t0
        rows.append({"user": u, "start": t0, "first": first, "end": time.perf_counter(), "tokens": n})

    threads = [threading.Thread(target=one, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize_chat(rows)


def measure_app(lm, ctx, limit: int, rounds: int, tokens: int) -> dict:
    """Launch the app with ``GENERATE_LIMIT = limit`` and measure 1 and 4 users."""
    from steering_lab.ui import context, steer_tab
    from steering_lab.ui.app import build_demo

    saved = context.GENERATE_LIMIT, steer_tab.GENERATE_LIMIT
    context.GENERATE_LIMIT = steer_tab.GENERATE_LIMIT = limit  # read when the events are registered
    try:
        demo = build_demo(ctx)
    finally:
        context.GENERATE_LIMIT, steer_tab.GENERATE_LIMIT = saved
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    res: dict = {"generate_limit": limit}
    try:
        run_users(chat_user, url, 1, 1, 8)  # warm-up (connections, first forward passes)
        for users in (1, 4):
            res[f"chat_{users}_users"] = summarize_chat(run_users(chat_user, url, users, rounds, tokens))
            print(f"limit {limit}, chat, {users} users: {json.dumps(res[f'chat_{users}_users'])}", flush=True)
        for users in (1, 4):
            rows = run_users(generate_user, url, users, rounds, tokens)
            res[f"generate_{users}_users"] = summarize_generate(rows, lm)
            print(f"limit {limit}, /generate, {users} users: {json.dumps(res[f'generate_{users}_users'])}", flush=True)
    finally:
        demo.close()
    c1, c4 = res["chat_1_users"], res["chat_4_users"]
    res["chat_speedup_4_vs_1"] = round(c4["aggregate_tok_per_s"] / c1["aggregate_tok_per_s"], 2)
    g1, g4 = res["generate_1_users"], res["generate_4_users"]
    res["generate_speedup_4_vs_1"] = round(g4["aggregate_tok_per_s_approx"] / g1["aggregate_tok_per_s_approx"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="requests per user, one after another")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "app_concurrency.json"))
    args = ap.parse_args()

    import torch

    from steering_lab.model import load_model
    from steering_lab.ui.context import make_context

    load_before = os.getloadavg()
    lm = load_model()
    ctx = make_context(lm, user_dir=tempfile.mkdtemp())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report: dict = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, no GPU",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "model": lm.name, "dtype": str(lm.dtype), "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "STEERING_LAB_CONCURRENCY")},
        "tokens": args.tokens, "rounds_per_user": args.rounds, "users": [u[1:] for u in USERS],
        "load_average_before": [round(x, 2) for x in load_before],
    }
    inprocess(lm, ctx, 1, 8)  # warm-up
    report["inprocess_1"] = inprocess(lm, ctx, 1, args.tokens)
    report["inprocess_4"] = inprocess(lm, ctx, 4, args.tokens)
    print("in-process:", json.dumps(report["inprocess_1"]), json.dumps(report["inprocess_4"]), flush=True)
    report["batched"] = measure_app(lm, ctx, context_limit(), args.rounds, args.tokens)
    report["serialized_baseline"] = measure_app(lm, ctx, 1, args.rounds, args.tokens)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    b = report["batched"]
    report["targets"] = {
        "aggregate_4_vs_1_ge_2.5": b["chat_speedup_4_vs_1"] >= 2.5,
        "first_token_le_1s_each_user": b["chat_4_users"]["first_token_s"]["max"] <= 1.0,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def context_limit() -> int:
    from steering_lab.ui.context import GENERATE_LIMIT

    return GENERATE_LIMIT


if __name__ == "__main__":
    main()
