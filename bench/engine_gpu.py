"""The decode engine on one GPU: fast path (static cache + CUDA graphs) against our eager path,
plain transformers ``generate`` with a forward hook, and the ``steering-vectors`` and ``repeng``
packages, on random-init models of real shapes (weights do not change speed), against the floor
from a measured device copy bandwidth.

    python3 bench/engine_gpu.py --out engine_gpu.json [--shapes smollm2-135m,llama-3.2-1b,qwen2.5-7b]

Per shape (bf16): batch-1 steered and unsteered tok/s of each path, fast == eager tokens; on the 1B
shape: 8 strengths in one batch against one generation, 64 and 256 concurrent requests each with
its own vector and strength (128 new tokens), extraction of 512 prompts x all layers; on the
SmolLM2 shape: slider release -> first steered token and a 64-token steered answer with its shadow
row (``live_stream``), and fast == eager in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from steering_lab.engine import Engine, Request  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.model import LoadedModel  # noqa: E402

SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         max_position_embeddings=8192, tie_word_embeddings=True,
                                         rope_theta=100000.0)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         vocab_size=128256, max_position_embeddings=8192,
                                         tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       max_position_embeddings=8192, tie_word_embeddings=False)),
}
PROMPT_LEN = 24
DEV = "cuda"
FAST = "graphs"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), median of 10."""
    if DEV != "cuda":
        return 1e10
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y.copy_(x)
        e.record()
        sync()
        times.append(s.elapsed_time(e) / 1e3)
    del x, y
    return 2 * (2 << 30) / statistics.median(times)


def build(shape: str, dtype: torch.dtype, tokenizer) -> LoadedModel:
    import transformers

    cls, kw = SHAPES[shape]
    if DEV != "cuda":  # dry run on CPU: the same code on a small model
        kw = dict(kw, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
        kw.pop("head_dim", None)
    cfg = getattr(transformers, cls)(**kw, bos_token_id=1, eos_token_id=4)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return LoadedModel.wrap(model, tokenizer, name=shape)


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(10, min(vocab, 30000), (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(n)]


def vector(lm: LoadedModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(lm.d_model, generator=g)
    return v / v.norm()


def decode_rate(eng: Engine, req: Request) -> tuple[float, float, list[list[int]]]:
    """(tok/s per row over the decode steps, seconds to the first token, token ids)."""
    sync()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for step in eng.submit(req):
        now = time.perf_counter()
        if first is None:
            first = now
        last, n = now, n + 1
        ids = step
    return (n - 1) / (last - first), first - t0, ids.token_ids


def engine_runs(lm: LoadedModel, mode: str, steer: bool, tokens: int, reps: int = 3, compile: bool = False) -> dict:
    eng = Engine(lm, fast=mode, compile=compile)
    k = lm.n_layers // 2
    steering = [Steer(vector(lm) * 4.0, 1.0, layers=[k])] if steer else []
    ids = prompts(1, lm.model.config.vocab_size)
    req = Request(prompt_ids=ids, steering=steering, max_new_tokens=tokens, stop_on_eos=False)
    decode_rate(eng, req)  # warm-up (captures the graph)
    rates, firsts = [], []
    for _ in range(reps):
        r, f, out = decode_rate(eng, req)
        rates.append(r)
        firsts.append(f)
    return {"tok_s": round(statistics.median(rates), 1), "first_token_ms": round(1e3 * statistics.median(firsts), 2),
            "tokens": out}


def hf_generate(lm: LoadedModel, tokens: int, kind: str) -> float:
    """Plain transformers generate, steered by a forward hook / steering-vectors / repeng."""
    model = lm.model
    k = lm.n_layers // 2
    v = (vector(lm) * 4.0).to(DEV, lm.dtype)
    ids = torch.tensor(prompts(1, model.config.vocab_size), device=DEV)
    ctx = contextlib.nullcontext()
    gen = model
    handle = None
    if kind == "hook":
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + v, *output[1:])
            return output + v
        handle = lm.layers[k].register_forward_hook(hook)
    elif kind == "steering-vectors":
        from steering_vectors import SteeringVector

        sv = SteeringVector(layer_activations={k: v}, layer_type="decoder_block")
        ctx = sv.apply(model, multiplier=1.0)
    elif kind == "repeng":
        import numpy as np

        for name, alias in (("float_", np.float64), ("complex_", np.complex128)):
            if not hasattr(np, name):
                setattr(np, name, alias)
        from repeng import ControlModel, ControlVector

        gen = ControlModel(model, [k])
        gen.set_control(ControlVector(model.config.model_type, {k: v.float().cpu().numpy()}), 1.0)
    try:
        def run():
            with ctx if kind != "steering-vectors" else sv.apply(model, multiplier=1.0):
                sync()
                t = time.perf_counter()
                gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
                sync()
                return time.perf_counter() - t
        run()
        return round(tokens / statistics.median([run() for _ in range(2)]), 1)
    finally:
        if handle is not None:
            handle.remove()
        if kind == "repeng":
            gen.unwrap()


def concurrent(lm: LoadedModel, n: int, tokens: int, compile: bool = False, profile: str | None = None) -> dict:
    eng = Engine(lm, fast=FAST, max_rows=max(256, n), compile=compile)
    k = lm.n_layers // 2
    ids = prompts(n, lm.model.config.vocab_size, seed=1)

    def run() -> float:
        hs = [eng.submit(Request(prompt_ids=[ids[i]], steering=[Steer(vector(lm, i) * 4.0, 0.5 + (i % 7), layers=[k])],
                                 max_new_tokens=tokens, stop_on_eos=False)) for i in range(n)]
        sync()
        t = time.perf_counter()
        outs = [h.result() for h in hs]
        sync()
        dt = time.perf_counter() - t
        assert all(len(o.token_ids[0]) == tokens for o in outs)
        return dt
    run()
    dt = statistics.median([run() for _ in range(2)])
    if profile:
        import cProfile
        import pstats

        cProfile.runctx("run()", globals(), locals(), profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    return {"requests": n, "new_tokens": tokens, "seconds": round(dt, 3), "tok_s": round(n * tokens / dt, 1)}


def strengths_batch(lm: LoadedModel, tokens: int) -> dict:
    eng = Engine(lm, fast=FAST)
    k = lm.n_layers // 2
    ids = prompts(1, lm.model.config.vocab_size)
    one = Request(prompt_ids=ids, steering=[Steer(vector(lm) * 4.0, 2.0, layers=[k])], max_new_tokens=tokens,
                  stop_on_eos=False)
    eight = Request(prompt_ids=ids * 8, steering=[Steer(vector(lm) * 4.0, [-8, -4, -2, -1, 1, 2, 4, 8], layers=[k])],
                    max_new_tokens=tokens, stop_on_eos=False)

    def timed(req):
        sync()
        t = time.perf_counter()
        eng.submit(req).result()
        sync()
        return time.perf_counter() - t
    timed(one)
    timed(eight)
    t1 = statistics.median([timed(one) for _ in range(3)])
    t8 = statistics.median([timed(eight) for _ in range(3)])
    return {"one_s": round(t1, 4), "eight_s": round(t8, 4), "ratio": round(t8 / t1, 3)}


def extraction(lm: LoadedModel) -> dict:
    from steering_lab.activations import collect

    texts = [f"Tell me something about topic number {i} and why it matters to people." for i in range(512)]
    collect(lm, texts[:64], batch_size=512)
    sync()
    t = time.perf_counter()
    acts = collect(lm, texts, batch_size=512)
    sync()
    return {"prompts": 512, "layers": lm.n_layers, "seconds": round(time.perf_counter() - t, 4),
            "shape": list(acts.acts.shape)}


def live(lm: LoadedModel) -> dict:
    from steering_lab.live import live_stream

    k = lm.n_layers // 3
    eng_steer = [Steer(vector(lm) * 4.0, 1.0, layers=[k])]
    prompt = "Tell me about your weekend."

    def run():
        sync()
        t = time.perf_counter()
        first = None
        n = 0
        for step in live_stream(lm, prompt, eng_steer, with_baseline=False, max_new_tokens=64):
            n += 1
            if first is None:
                first = time.perf_counter() - t
            _ = step.mean_kl
        sync()
        return first, time.perf_counter() - t, n
    run()
    runs = [run() for _ in range(5)]
    return {"first_token_ms": round(1e3 * statistics.median(r[0] for r in runs), 2),
            "answer_s": round(statistics.median(r[1] for r in runs), 4), "tokens": runs[0][2]}


def main() -> None:
    from conftest import build_tiny_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine_gpu.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip", default="")
    ap.add_argument("--dry", action="store_true", help="run the same code on CPU on tiny models (a check)")
    args = ap.parse_args()
    global DEV, FAST
    if args.dry:
        DEV, FAST = "cpu", "static"
    skip = set(args.skip.split(","))
    tok = build_tiny_tokenizer()
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    res = {"date": datetime.date.today().isoformat(), "device": device,
           "torch": torch.__version__, "command": " ".join(sys.argv)}
    import transformers

    res["transformers"] = transformers.__version__
    bw = bandwidth()
    res["copy_bandwidth_GB_s"] = round(bw / 1e9, 1)
    for shape in args.shapes.split(","):
        out: dict = {}
        res[shape] = out
        lm = None
        try:
            if shape == "smollm2-135m" and "fp32" not in skip:
                lm32 = build(shape, torch.float32, tok)
                a = engine_runs(lm32, FAST, True, 64, reps=1)
                b = engine_runs(lm32, "eager", True, 64, reps=1)
                out["fp32_fast_equals_eager"] = a["tokens"] == b["tokens"]
                del lm32, a, b
                gc.collect()
            lm = build(shape, torch.bfloat16, tok)
            params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
            out["param_bytes"] = params
            out["floor_tok_s"] = round(bw / params, 1)
            for name, mode, st, comp in (("fast_steered", FAST, True, False), ("fast_unsteered", FAST, False, False),
                                         ("eager_steered", "eager", True, False),
                                         ("compiled_steered", FAST, True, True),
                                         ("compiled_unsteered", FAST, False, True)):
                if comp and "compile" in skip:
                    continue
                try:
                    r = engine_runs(lm, mode, st, args.tokens, compile=comp)
                except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
                    out[name + "_error"] = f"{type(exc).__name__}: {exc}"[:400]
                    continue
                out[name] = {k: v for k, v in r.items() if k != "tokens"}
                out[name + "_tokens"] = r["tokens"]
                print(shape, name, out[name], flush=True)
            out["bf16_fast_equals_eager_tokens"] = sum(
                a == b for a, b in zip(out["fast_steered_tokens"][0], out["eager_steered_tokens"][0]))
            if "compiled_steered_tokens" in out:
                out["bf16_compiled_equals_eager_tokens"] = sum(
                    a == b for a, b in zip(out["compiled_steered_tokens"][0], out["eager_steered_tokens"][0]))
                out["compiled_over_unsteered"] = round(
                    out["compiled_steered"]["tok_s"] / out["compiled_unsteered"]["tok_s"], 3)
                out["compiled_pct_of_floor"] = round(100 * out["compiled_steered"]["tok_s"] / out["floor_tok_s"], 1)
            out["steered_over_unsteered"] = round(out["fast_steered"]["tok_s"] / out["fast_unsteered"]["tok_s"], 3)
            out["fast_pct_of_floor"] = round(100 * out["fast_steered"]["tok_s"] / out["floor_tok_s"], 1)
            for k in [k for k in out if k.endswith("_tokens") and isinstance(out[k], list)]:
                out.pop(k)
            for kind in ("hook", "steering-vectors", "repeng"):
                if kind in skip:
                    continue
                try:
                    out[f"hf_generate_{kind}_tok_s"] = hf_generate(lm, args.tokens, kind)
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                    out[f"hf_generate_{kind}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                print(shape, kind, out.get(f"hf_generate_{kind}_tok_s"), flush=True)
            if shape == "llama-3.2-1b":
                out["eight_strengths"] = strengths_batch(lm, args.tokens)
                for n in (64, 256):
                    out[f"concurrent_{n}"] = concurrent(lm, n, 128, profile="/tmp/prof" if n == 256 else None)
                    print(shape, n, out[f"concurrent_{n}"], flush=True)
                    if "compile" not in skip:
                        try:
                            out[f"concurrent_{n}_compiled"] = concurrent(lm, n, 128, compile=True)
                        except Exception as exc:  # noqa: BLE001
                            out[f"concurrent_{n}_compiled_error"] = f"{type(exc).__name__}: {exc}"[:400]
                        print(shape, n, out.get(f"concurrent_{n}_compiled"), flush=True)
                out["extraction"] = extraction(lm)
            if shape == "smollm2-135m":
                out["live"] = live(lm)
        except Exception:  # noqa: BLE001 - record and go on to the next shape
            import traceback

            out["error"] = traceback.format_exc()[-2000:]
        print(shape, json.dumps(out), flush=True)
        del lm
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
