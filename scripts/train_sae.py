"""Train the shipped SAE for the embedded SmolLM2-135M with sae-lens' own trainer.

    python scripts/train_sae.py --device cuda          # rebuilds steering_lab/shipped/saes/smollm2-135m-l10

The shipped SAE was made this way on one H200 (5.5 min, most of it the model's own generations):
the text sources were collected on the dev machine (Python 3.11 docstrings, its Debian docs) with
``--docstrings 100000 --system-docs 4000`` and passed in with ``--texts``; everything else is the
defaults below. On CPU (2 cores) the same run takes hours: use e.g. ``--continuations 0
--generations 48 --docstrings 350 --system-docs 150 --epochs 6 --d-sae 2048`` for a quick one.

Text (all offline): the project's own data (steering_lab/data), docstrings of Python's standard
library, the licence texts Debian ships (/usr/share/common-licenses) and package READMEs under
/usr/share/doc, and the model's own chat answers to the project's prompts. Chunks are split into
train and held-out by a hash of their text (10% held out). Activations of the output of block
``--layer`` (token position 0, the attention sink, left out) are collected in batches with
``intervene.capture``, then a BatchTopK SAE (sae-lens ``BatchTopKTrainingSAE`` + ``SAETrainer``,
fed from memory) is trained; sae-lens saves it as a JumpReLU SAE (per-token threshold), which we
store in float16 with ``features.json`` (labels, top tokens, contexts) and ``train_report.json``.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import logging
import math
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_lab.activations import pad_left  # noqa: E402
from steering_lab.intervene import capture  # noqa: E402
from steering_lab.model import load_model  # noqa: E402
from steering_lab.sae import IndexBuilder, LoadedSAE, layer_to_hook, load_sae, save_sae  # noqa: E402
from steering_lab.vector import atomic_write_json  # noqa: E402

log = logging.getLogger("train_sae")
DATA = ROOT / "steering_lab" / "data"


# ---- text ----------------------------------------------------------------------------------

def _chunks(text: str, size: int = 600) -> list[str]:
    """Paragraph-aligned pieces of about ``size`` characters."""
    out, cur = [], ""
    for para in text.replace("\r", "").split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > 2 * size:
            out.append(cur[:size])
            cur = cur[size:]
    if len(cur) > 40:
        out.append(cur)
    return out


def project_texts() -> list[str]:
    texts = []
    for f in sorted(DATA.iterdir()):
        if f.suffix == ".txt":
            texts.extend(line.strip() for line in f.read_text().splitlines() if line.strip())
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                if line.strip():
                    texts.extend(v for v in json.loads(line).values() if isinstance(v, str) and len(v) > 20)
    return texts


def docstring_texts(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if any(p in f.parts for p in ("test", "tests", "idle_test", "site-packages")):
            continue
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.extend(_chunks(doc))
    random.Random(1).shuffle(out)
    return out[:limit]


def system_doc_texts(limit: int) -> list[str]:
    out = []
    lic = Path("/usr/share/common-licenses")
    files = sorted(p for p in lic.glob("*") if p.is_file()) if lic.is_dir() else []
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        files += sorted(doc.glob("*/README*")) + sorted(doc.glob("*/NEWS*"))
    for f in files:
        try:
            raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        out.extend(_chunks(text)[:20])
    random.Random(2).shuffle(out)
    return out[:limit]


def generated_texts(lm, n_prompts: int, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The model's own chat answers (prompt template + answer), greedy, in batches."""
    from steering_lab.generate import generate

    prompts = []
    for name in ("persona_questions.txt", "harmless.txt", "neutral.txt"):
        prompts += [p.strip() for p in (DATA / name).read_text().splitlines() if p.strip()]
    for line in (DATA / "sentiment.jsonl").read_text().splitlines():
        if line.strip():
            prompts.append(json.loads(line)["prompt"])
    random.Random(3).shuffle(prompts)
    prompts = prompts[:n_prompts]
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generations"):
        batch = prompts[i:i + batch_size]
        answers = generate(lm, batch, max_new_tokens=max_new_tokens)
        out += [lm.chat_prompt(p) + a for p, a in zip(batch, answers)]
    return out


def continuation_texts(lm, openings: list[str], n: int, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """The model's own free text: sampled continuations (temperature 0.8, seeded) of the first
    words of other texts."""
    from steering_lab.generate import generate

    starts = [" ".join(t.split()[:8]) for t in openings if len(t.split()) >= 8]
    random.Random(4).shuffle(starts)
    starts = (starts * (1 + n // max(1, len(starts))))[:n]
    out = []
    for i in tqdm(range(0, len(starts), batch_size), desc="continuations"):
        batch = starts[i:i + batch_size]
        texts = generate(lm, batch, max_new_tokens=max_new_tokens, temperature=0.8, seed=i, chat=False)
        out += [p + t for p, t in zip(batch, texts)]
    return out


def split(texts: list[str], held_out: float) -> tuple[list[str], list[str]]:
    train, test = [], []
    for t in dict.fromkeys(texts):  # drop duplicates, keep order
        h = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 16 ** 8
        (test if h < held_out else train).append(t)
    return train, test


# ---- activations ---------------------------------------------------------------------------

@torch.no_grad()
def collect(lm, layer: int, seqs: list[list[int]], batch_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-``layer`` outputs of every token but position 0: ``(acts [N, d], global token index [N])``."""
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    acts, where = [], []
    for j in tqdm(range(0, len(order), batch_size), desc=desc):
        rows = order[j:j + batch_size]
        ids, mask, pos = pad_left([seqs[r] for r in rows], lm.pad_id, lm.device)
        with torch.inference_mode(), capture(lm, [layer], stop_early=True) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            h = cap.last(layer).float().cpu()
        T = ids.shape[1]
        gidx = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(seqs[r])
            gidx[b, T - n:] = torch.arange(starts[r], starts[r] + n)
        keep = (mask.bool() & (pos > 0)).cpu()
        acts.append(h[keep])
        where.append(gidx[keep])
    return torch.cat(acts), torch.cat(where)


class MemoryBatches:
    """sae-lens DataProvider: shuffled batches of in-memory activations, epoch after epoch."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int) -> None:
        self.acts, self.batch_size = acts, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(acts), generator=self.gen).to(acts.device), 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.acts), generator=self.gen).to(self.acts.device), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.acts[idx]


def explained_variance(sae: LoadedSAE, acts: torch.Tensor) -> dict[str, float]:
    err, l0, fired = 0.0, 0.0, torch.zeros(sae.d_sae, dtype=torch.bool, device=acts.device)
    for i in range(0, len(acts), 4096):
        x = acts[i:i + 4096]
        f = sae.encode(x)
        err += float(((x - sae.decode(f)) ** 2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    var = float(((acts.double() - acts.double().mean(0)) ** 2).sum())
    return {"explained_variance": round(1 - err / var, 4), "l0": round(l0 / len(acts), 2),
            "dead_fraction": round(1 - float(fired.float().mean()), 4), "n_tokens": len(acts)}


# ---- main ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=float, default=32)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per text chunk")
    ap.add_argument("--docstrings", type=int, default=100000, help="stdlib docstring chunks")
    ap.add_argument("--system-docs", type=int, default=4000, help="licence / README chunks")
    ap.add_argument("--generations", type=int, default=400, help="prompts the model answers (0: none)")
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32 either way)")
    ap.add_argument("--continuations", type=int, default=1536, help="sampled continuations of the model's own")
    ap.add_argument("--collect-batch", type=int, default=64)
    ap.add_argument("--texts", help="read the text sources from this JSON ({source: [texts]}) instead")
    ap.add_argument("--save-texts", help="write the text sources (generations included) to this JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "steering_lab" / "shipped" / "saes" / "smollm2-135m-l10"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    t0 = time.time()
    lm = load_model(device=args.device, dtype="float32")
    if args.texts:
        sources = json.loads(Path(args.texts).read_text())
    else:
        sources = {"project data": project_texts(), "python stdlib docstrings": docstring_texts(args.docstrings),
                   "debian licences and READMEs": system_doc_texts(args.system_docs)}
    gen_batch = 64 if args.device != "cpu" else 16
    if args.generations:
        sources["model's own chat answers"] = generated_texts(lm, args.generations, args.gen_tokens, gen_batch)
    if args.continuations:
        openings = sources["python stdlib docstrings"] + sources["debian licences and READMEs"]
        sources["model's own continuations"] = continuation_texts(lm, openings, args.continuations, 96, gen_batch)
    if args.save_texts:
        atomic_write_json(Path(args.save_texts), sources)
    texts = [t for v in sources.values() for t in v]
    train, test = split(texts, args.held_out)
    log.info("texts: %s; %d train, %d held out", {k: len(v) for k, v in sources.items()}, len(train), len(test))
    enc = [lm.encode(t, special=True)[:args.max_tokens] for t in train]
    enc_test = [lm.encode(t, special=True)[:args.max_tokens] for t in test]
    acts, where = collect(lm, args.layer, enc, args.collect_batch, "train activations")
    acts_test, _ = collect(lm, args.layer, enc_test, args.collect_batch, "held-out activations")
    acts, acts_test = acts.to(args.device), acts_test.to(args.device)
    log.info("activations: %d train tokens, %d held out (%.0f s)", len(acts), len(acts_test), time.time() - t0)

    cfg = BatchTopKTrainingSAEConfig(
        d_in=lm.d_model, d_sae=args.d_sae, k=args.k, normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(model_name="HuggingFaceTB/SmolLM2-135M-Instruct", hook_name=layer_to_hook(args.layer),
                             context_size=args.max_tokens, prepend_bos=False,
                             dataset_path="offline: " + ", ".join(sources)))
    training = BatchTopKTrainingSAE(cfg)
    with torch.no_grad():  # start the decoder bias at the (scaled) mean, as sae-lens' runner does
        scale = math.sqrt(lm.d_model) / float(acts.norm(dim=-1).mean())
        training.b_dec.copy_(acts.mean(0) * scale)
    total = int(args.epochs * len(acts)) // args.batch * args.batch
    steps = total // args.batch
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr / 10,
        lr_scheduler_name="constant", lr_warm_up_steps=min(50, steps // 10), lr_decay_steps=steps // 3,
        device=args.device, dead_feature_window=max(50, steps // 8), feature_sampling_window=max(100, steps // 4),
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=50)
    trainer = SAETrainer(trainer_cfg, training, MemoryBatches(acts, args.batch, args.seed))
    trainer.fit()
    train_s = time.time() - t0

    with tempfile.TemporaryDirectory() as tmp:
        training.save_inference_model(tmp)
        sae = load_sae(tmp, lm, device=args.device)
    sae.name = Path(args.out).name
    builder = IndexBuilder(sae.d_sae, top_n=24)
    for i in range(0, len(acts), 4096):
        builder.add(sae.encode(acts[i:i + 4096]), where[i:i + 4096])
    sae.index = {"model": lm.name, "layer": sae.layer, "hook_name": sae.hook_name,
                 "corpus": {k: len(v) for k, v in sources.items()}, "n_texts": len(train)}
    sae.index.update(builder.finish(enc, lm.tokenizer.decode))
    out = save_sae(sae, args.out, dtype=torch.float16)
    shipped = load_sae(out, lm, device=args.device)  # what users get: the float16 file
    report = {"layer": args.layer, "hook_name": sae.hook_name, "d_sae": args.d_sae, "k": args.k,
              "architecture_trained": "batchtopk", "architecture_saved": shipped.sae.cfg.architecture(),
              "dtype": "float16", "train_tokens": len(acts), "held_out_tokens": len(acts_test),
              "epochs": args.epochs, "steps": steps, "lr": args.lr, "seconds": round(time.time() - t0),
              "train_seconds": round(train_s), "sources": {k: len(v) for k, v in sources.items()},
              "train": explained_variance(shipped, acts), "held_out": explained_variance(shipped, acts_test),
              "sae_lens": __import__("sae_lens").__version__, "torch": torch.__version__, "args": vars(args)}
    atomic_write_json(out / "train_report.json", report)
    log.info("saved %s: %s", out, json.dumps(report))


if __name__ == "__main__":
    main()
