"""Where the time of extracting 512 prompts x all layers goes on a GPU (1B shape, random init).

    python3 bench/profile_extraction.py
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.engine_gpu import build  # noqa: E402
from steering_lab.activations import collect, encode_many  # noqa: E402


def main() -> None:
    from conftest import build_tiny_tokenizer

    lm = build("llama-3.2-1b", torch.bfloat16, build_tiny_tokenizer())
    texts = [f"Tell me something about topic number {i} and why it matters to people." for i in range(512)]
    collect(lm, texts[:64], batch_size=512)
    torch.cuda.synchronize()
    t = time.perf_counter()
    ids = encode_many(lm, texts)
    print("tokenize", round(time.perf_counter() - t, 4), "s; tokens per prompt", len(ids[0]))
    for bs in (512, 128, 64):
        torch.cuda.synchronize()
        t = time.perf_counter()
        collect(lm, texts, batch_size=bs)
        torch.cuda.synchronize()
        print("collect batch", bs, round(time.perf_counter() - t, 4), "s")
    cProfile.runctx("collect(lm, texts, batch_size=128); torch.cuda.synchronize()", globals(), locals(), "/tmp/p")
    pstats.Stats("/tmp/p").sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
