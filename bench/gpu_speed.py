"""On one GPU: the library picks CUDA + bf16 by itself, steering stays exact, and how fast the
app's streams run. Random-init models of real shapes (weights do not change speed), saved and
loaded through ``load_model`` exactly as a user's checkpoint would be.

    python3 bench/gpu_speed.py --tokenizer DIR --out gpu_speed.json

Per shape: time to first token and tokens/s of (a) plain greedy decoding (1 row, baseline),
(b) the stream a slider release runs (steered row + unsteered shadow row, live KL/perplexity),
(c) the Generate button's stream (steered + shadow + baseline); sentiment extraction time; a probe
on gathered activations; and strength 0 == no hooks, token for token.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steering_lab.datasets import load_preset  # noqa: E402
from steering_lab.extract import extract  # noqa: E402
from steering_lab.generate import generate_ids, stream  # noqa: E402
from steering_lab.intervene import Steer  # noqa: E402
from steering_lab.live import live_stream  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.probes import instruction_splits, train_probe  # noqa: E402

SHAPES = {
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         max_position_embeddings=4096, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
                                       tie_word_embeddings=False)),
}
PROMPT = "Tell me about your weekend."


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(steps) -> tuple[float, float]:
    sync()
    t0 = time.perf_counter()
    first, n = None, 0
    for _ in steps:
        n += 1
        if first is None:
            sync()
            first = time.perf_counter()
    sync()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first)


def build(shape: str, tok_dir: str, out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, kw = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def run(shape: str, tok_dir: str, tokens: int) -> dict:
    d = Path(f"/tmp/gpu_{shape}")
    build(shape, tok_dir, d)
    lm = load_model(d)  # no device/dtype given: must pick cuda + bf16
    res = {"device": str(lm.device), "dtype": str(lm.dtype), "n_layers": lm.n_layers, "d_model": lm.d_model}
    t = time.perf_counter()
    vec, scan = extract(lm, load_preset("sentiment"), "mean_diff", batch_size=32)
    sync()
    res["extract_sentiment_s"] = round(time.perf_counter() - t, 2)
    s = float(vec.recommended_strength)
    item = Steer(vec, s)
    # exactness: strength 0 in a batch == the same batch with no hooks
    rows = [PROMPT, "Describe a library.", "What is it like to ride a train?"]
    res["strength0_equals_unsteered"] = (generate_ids(lm, rows, Steer(vec, 0.0), max_new_tokens=24)
                                         == generate_ids(lm, rows, max_new_tokens=24))
    for label, make in (("plain_1row", lambda: stream(lm, [PROMPT], (), max_new_tokens=tokens)),
                        ("release_stream_2rows", lambda: live_stream(lm, PROMPT, [item], with_baseline=False,
                                                                     max_new_tokens=tokens)),
                        ("generate_stream_3rows", lambda: live_stream(lm, PROMPT, [item], with_baseline=True,
                                                                      max_new_tokens=tokens))):
        timed(make())  # warm-up
        runs = [timed(make()) for _ in range(3)]
        res[label] = {"ttft_s": round(statistics.median(r[0] for r in runs), 4),
                      "tok_per_s": round(statistics.median(r[1] for r in runs), 1)}
    t = time.perf_counter()
    probe, _ = train_probe(lm, load_preset("harmful"), splits=instruction_splits(), batch_size=32)
    res["probe_train_s"] = round(time.perf_counter() - t, 2)
    res["probe_test_auroc_random_weights"] = round(probe.metrics["test_auroc"], 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="gpu_speed.json")
    args = ap.parse_args()
    import transformers

    report = {"date": str(datetime.date.today()), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "new_tokens": args.tokens, "shapes": {}}
    for shape in SHAPES:
        report["shapes"][shape] = run(shape, args.tokenizer, args.tokens)
        gc.collect()
        torch.cuda.empty_cache()
        print(shape, json.dumps(report["shapes"][shape]), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
