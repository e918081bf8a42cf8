"""Steering a model split across GPUs gives the same results as on one GPU.

Builds a random-init model of a real large shape (default: Qwen2.5-14B's layout with the SmolLM2
tokenizer's vocabulary; weights do not change speed or the equalities tested), saves it, then loads
it twice through ``load_model``: once on one GPU, once with ``device_map="auto"`` and a
``max_memory`` cap that forces a split across two GPUs. On both it runs the same work and compares:

* steered greedy tokens (per-row strengths [0, +s, -s] in one batch; strength-0 rows == unsteered),
* extraction: the sentiment preset's mean_diff vector at every layer and the layer scan,
* pooled activations (what probes and controllers train on), gathered to the CPU,
* ablate / rotate logits, and hooks gone afterwards,
* throughput of steered and unsteered greedy decoding (batch 1 and 16).

Run on a machine with >= 2 GPUs:  python bench/multi_gpu.py --tokenizer DIR --out results.json
``--shape tiny`` runs the same code on the CPU in seconds (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steering_lab.activations import collect, pad_left  # noqa: E402
from steering_lab.datasets import load_preset, neutral_prompts  # noqa: E402
from steering_lab.extract import extract  # noqa: E402
from steering_lab.generate import generate_ids  # noqa: E402
from steering_lab.intervene import Steer, hook_count, steer  # noqa: E402
from steering_lab.model import load_model  # noqa: E402

SHAPES = {
    # Qwen2.5-14B: 48 blocks, d_model 5120, GQA 40/8 heads, SwiGLU 13824 (vocab from the tokenizer)
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(shape: str, tokenizer_dir: str, out_dir: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **SHAPES[shape])
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    n = sum(p.numel() for p in model.parameters())
    log(f"random init {n / 1e9:.2f} B params on {device} in {time.time() - t:.1f} s")
    t = time.time()
    model.save_pretrained(out_dir, max_shard_size="5GB")
    tok.save_pretrained(out_dir)
    log(f"saved to {out_dir} in {time.time() - t:.1f} s")
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def work(lm, prompts: list[str], new_tokens: int) -> dict:
    out: dict = {"hooks_before": hook_count(lm.model)}
    contrast = load_preset("sentiment")
    t = time.time()
    vec, scan = extract(lm, contrast, "mean_diff", batch_size=16)
    sync()
    out["extract_s"] = time.time() - t
    out["recommended_layer"], out["recommended_strength"] = scan.recommended_layer, scan.recommended_strength
    out["directions"] = torch.stack([vec[k] for k in vec.layers])
    out["aurocs"] = [r.auroc for r in scan.rows]
    s = float(vec.recommended_strength)
    rows = [p for p in prompts for _ in range(3)]
    strengths = [x for _ in prompts for x in (0.0, s, -s)]
    out["steered_tokens"] = generate_ids(lm, rows, Steer(vec, strengths), max_new_tokens=new_tokens)
    # the same batch without any hook: strength-0 rows must match it exactly (in bf16 a different
    # batch composition picks other GEMM kernels, so the comparison must use the same rows)
    out["plain_tokens"] = generate_ids(lm, rows, max_new_tokens=new_tokens)
    acts = collect(lm, prompts, layers=[0, lm.n_layers // 2, lm.n_layers - 1], position="last")
    out["acts"] = acts.acts
    out["acts_device"] = str(acts.acts.device)
    seqs = [lm.encode_prompt(p) for p in prompts]
    ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)
    layer = scan.recommended_layer
    logits = {}
    with torch.inference_mode():
        for op, val in (("ablate", 1.0), ("rotate", 15.0), ("clamp", 2.0)):
            with steer(lm, Steer(vec, val, layers=list(range(layer, lm.n_layers)), operator=op)):
                logits[op] = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float().cpu()
    out["op_logits"] = logits
    out["hooks_after"] = hook_count(lm.model)
    # throughput: greedy decoding, unsteered vs steered (add at the recommended layer)
    # (median of 3 interleaved runs, after a warm-up of each configuration)
    configs = {f"b{batch}_{label}": ((prompts * 16)[:batch], item)
               for batch in (1, 16) for label, item in (("unsteered", ()), ("steered", Steer(vec, -s)))}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for batch_prompts, item in configs.values():
        generate_ids(lm, batch_prompts, item, max_new_tokens=8)
    for _ in range(3):
        for key, (batch_prompts, item) in configs.items():
            sync()
            t = time.time()
            generate_ids(lm, batch_prompts, item, max_new_tokens=new_tokens)
            sync()
            times[key].append(time.time() - t)
    out["tokens_per_s"] = {k: round(len(configs[k][0]) * new_tokens / sorted(v)[1], 1) for k, v in times.items()}
    return out


def compare(a: dict, b: dict) -> dict:
    return {
        "steered_tokens_equal": a["steered_tokens"] == b["steered_tokens"],
        "strength0_rows_equal_unsteered": all(
            x["steered_tokens"][i] == x["plain_tokens"][i]
            for x in (a, b) for i in range(0, len(x["plain_tokens"]), 3)),
        "recommended_layer_equal": a["recommended_layer"] == b["recommended_layer"],
        "direction_max_abs_diff": float((a["directions"] - b["directions"]).abs().max()),
        "direction_min_cosine": float(torch.nn.functional.cosine_similarity(a["directions"], b["directions"]).min()),
        "auroc_max_abs_diff": max(abs(x - y) for x, y in zip(a["aurocs"], b["aurocs"])),
        "acts_max_abs_diff": float((a["acts"] - b["acts"]).abs().max()),
        "acts_gathered_to": b["acts_device"],
        "op_logits_max_abs_diff": {k: float((a["op_logits"][k] - b["op_logits"][k]).abs().max())
                                   for k in a["op_logits"]},
        "hooks_left_split": b["hooks_after"] - b["hooks_before"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-14b", choices=list(SHAPES))
    ap.add_argument("--tokenizer", required=True, help="directory of a tokenizer (SmolLM2's)")
    ap.add_argument("--workdir", default="/tmp/multi_gpu_model")
    ap.add_argument("--gpu0-cap", default="16GiB", help="max_memory on GPU 0, forces the split")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", default="multi_gpu.json")
    args = ap.parse_args()

    n_gpu = torch.cuda.device_count()
    cpu_only = args.shape == "tiny" and n_gpu < 2
    if not cpu_only and n_gpu < 2:
        sys.exit(f"needs 2 GPUs, found {n_gpu}")
    workdir = Path(args.workdir)
    build(args.shape, args.tokenizer, workdir, "cpu" if cpu_only else "cuda:0")
    prompts = neutral_prompts()[:4]
    report: dict = {"date": str(datetime.date.today()), "shape": args.shape, "gpus": n_gpu,
                    "gpu_name": torch.cuda.get_device_name(0) if n_gpu else "cpu",
                    "torch": torch.__version__, "python": platform.python_version()}
    import transformers

    report["transformers"] = transformers.__version__

    t = time.time()
    single = load_model(workdir, device="cpu" if cpu_only else "cuda:0", dtype=None if cpu_only else "bfloat16")
    report["load_single_s"] = round(time.time() - t, 1)
    report["single_devices"] = sorted({str(single.block_device(k)) for k in range(single.n_layers)})
    log(f"single: {report['single_devices']} in {report['load_single_s']} s")
    a = work(single, prompts, args.new_tokens)
    log(f"single done: {a['tokens_per_s']}")
    report["single"] = {k: a[k] for k in ("extract_s", "recommended_layer", "recommended_strength", "tokens_per_s")}
    Path(args.out).write_text(json.dumps(report, indent=2))  # partial, in case the split run dies
    del single
    gc.collect()
    torch.cuda.empty_cache() if n_gpu else None

    t = time.time()
    if cpu_only:
        split = load_model(workdir, device_map="auto", max_memory={"cpu": "8GiB"})
    else:
        split = load_model(workdir, device_map="auto", max_memory={0: args.gpu0_cap, 1: "120GiB"},
                           dtype="bfloat16")
    report["load_split_s"] = round(time.time() - t, 1)
    placement: dict[str, int] = {}
    for k in range(split.n_layers):
        d = str(split.block_device(k))
        placement[d] = placement.get(d, 0) + 1
    report["split_blocks_per_device"] = placement
    report["split_is_split"] = split.is_split
    log(f"split: {placement} in {report['load_split_s']} s")
    b = work(split, prompts, args.new_tokens)
    log(f"split done: {b['tokens_per_s']}")

    report["split"] = {k: b[k] for k in ("extract_s", "recommended_layer", "recommended_strength", "tokens_per_s")}
    report["compare"] = compare(a, b)
    report["pass"] = bool(report["compare"]["steered_tokens_equal"] and
                          report["compare"]["strength0_rows_equal_unsteered"] and
                          report["compare"]["hooks_left_split"] == 0 and (cpu_only or report["split_is_split"]))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
