"""``steering-lab transfer``: Command-V (Wang et al. 2025, arXiv:2506.19140) from the command line.

``transfer fit`` profiles a donor and a recipient model on the same prompts and saves one linear converter per
layer pair; ``transfer vector`` carries a donor steering vector through a converter into the recipient's residual
stream. ``--recipient rotated:SEED`` is the donor with its residual stream rotated by a random orthogonal matrix
(a recipient whose right answer is known: a check of the whole pipeline)."""

from __future__ import annotations

import argparse
import json

from ..constants import DTYPES
from ..errors import check
from . import common

ROTATED = "rotated:"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="Command-V: fit converters between two models, carry a vector across",
                       description="Command-V (Wang et al. 2025, arXiv:2506.19140): fit per-layer linear converters "
                                   "between a donor's and a recipient's residual streams from their activations on "
                                   "shared prompts, then carry a donor steering vector to the recipient.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = actions.add_parser("fit", help="profile both models and save the converters",
                             description="Profile both models on the same prompts (every word-boundary prefix of "
                                         "each text is one prompt) and save per-layer least-squares converters.")
    fit.add_argument("--donor", default=None, help="donor model: HF id, local directory or .gguf "
                                                   "(default: embedded SmolLM2-135M-Instruct)")
    fit.add_argument("--recipient", required=True,
                     help="recipient model: HF id, local directory, .gguf, or rotated:SEED (the donor with its "
                          "residual stream rotated by a random orthogonal matrix: a known answer)")
    fit.add_argument("--prompts", default="all",
                     help="profiling texts: a bundled set (all, neutral, harmless, harmful, persona, refusals) or a "
                          "file (one text per line, or .jsonl with 'prompt'); default all")
    fit.add_argument("--no-prefixes", action="store_true", help="use the texts as they are, not their prefixes")
    fit.add_argument("--max-prompts", type=common.positive_int, default=None,
                     help="use at most this many prompts (an evenly spaced subset)")
    fit.add_argument("--donor-layers", default=None, help="donor layers, e.g. 8,11,14 (default: all)")
    fit.add_argument("--recipient-layers", default=None,
                     help="recipient layers, one per donor layer (default: same relative depth)")
    fit.add_argument("--ridge", type=common.finite_float, default=0.0,
                     help="ridge strength relative to the mean activation energy (default 0: least squares, needs "
                          "more prompts than the donor's width)")
    fit.add_argument("--no-center", action="store_true", help="fit W = pinv(A_D) A_R without means (the paper's form)")
    fit.add_argument("--chat", action="store_true", help="wrap the prompts in the chat template")
    fit.add_argument("--batch-size", type=common.positive_int, default=16)
    fit.add_argument("--out", required=True, help="where to save the converter (PATH.safetensors + PATH.json)")
    fit.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    fit.add_argument("--dtype", default=None, choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    fit.add_argument("--json", action="store_true", help="print a JSON summary")
    fit.set_defaults(run=run_fit)

    vec = actions.add_parser("vector", help="carry a donor vector through a converter",
                             description="Map each direction v at donor layer k to v @ W_k at the matching "
                                         "recipient layer; the result is a vector for the recipient model.")
    vec.add_argument("--converter", required=True, help="converter path (from `transfer fit`)")
    vec.add_argument("--vector", required=True, help="donor vector: path or library name, or a .gguf control vector")
    vec.add_argument("--layers", default=None, help="donor layers to carry (default: all the vector has)")
    vec.add_argument("--any-model", action="store_true",
                     help="skip the check that the vector was made on the converter's donor (widths still checked)")
    vec.add_argument("--out", required=True, help="where to save the transferred vector")
    vec.add_argument("--json", action="store_true", help="print a JSON summary")
    vec.set_defaults(run=run_vector)


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        out = []
    check(bool(out) and all(k >= 0 for k in out), f"layers must be comma-separated whole numbers, got {text!r}")
    return out


def _load(spec: str | None, args: argparse.Namespace):
    from ..model import load_model

    return load_model(spec, device=args.device, dtype=args.dtype)


def run_fit(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..directions import transfer as tr

    texts = tr.load_profile_texts(args.prompts)
    prompts = tr.profile_prompts(texts, prefixes=not args.no_prefixes)
    if args.max_prompts is not None and len(prompts) > args.max_prompts:
        step = len(prompts) / args.max_prompts
        prompts = [prompts[int(i * step)] for i in range(args.max_prompts)]
    donor_layers, recipient_layers = _layers(args.donor_layers), _layers(args.recipient_layers)
    bar = tqdm(total=3, desc="transfer fit", unit="step")
    bar.set_postfix_str("loading models")
    donor = _load(args.donor, args)
    if args.recipient.startswith(ROTATED):
        seed = args.recipient[len(ROTATED):]
        check(seed.isdigit(), f"rotated:SEED needs a whole-number seed, got {seed!r}")
        recipient, _ = tr.rotated_copy(donor, int(seed))
    else:
        recipient = _load(args.recipient, args)

    def on_step(i: int, total: int, what: str) -> None:
        bar.n = i
        bar.set_postfix_str(what)
        bar.refresh()

    try:
        conv = tr.fit_converter(donor, recipient, prompts, donor_layers, recipient_layers, ridge=args.ridge,
                                center=not args.no_center, chat=args.chat, batch_size=args.batch_size, progress=True,
                                prompts_name=f"{args.prompts} ({len(texts)} texts, {len(prompts)} prompts)",
                                on_step=on_step)
    finally:
        bar.close()
    path = conv.save(args.out)
    errors = {k: v.get("holdout", v["train"]) for k, v in conv.fit_error.items()}
    worst = max(errors, key=errors.get)
    summary = {"converter": str(path), "donor": conv.donor, "recipient": conv.recipient, "layers": len(conv.layers),
               "n_prompts": conv.n_prompts, "worst_layer": worst, "worst_error": round(errors[worst], 6),
               "mean_error": round(sum(errors.values()) / len(errors), 6)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"saved {len(conv.layers)} converters {conv.donor} -> {conv.recipient} ({conv.n_prompts} prompts) at "
              f"{path}; relative fit error mean {summary['mean_error']:.4g}, worst {summary['worst_error']:.4g} "
              f"(layer {worst})")
    return 0


def run_vector(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..directions import transfer as tr

    conv = tr.Converter.load(args.converter)
    vec = common.load_vector(args.vector)
    out = tr.transfer_vector(vec, conv, layers=_layers(args.layers), check_model=not args.any_model,
                             converter_name=Path(args.converter).name)
    path = out.save(args.out)
    info = out.extra["transfer"]
    summary = {"vector": str(path), "model": out.model, "layers": out.layers, "recommended_layer":
               out.recommended_layer, "layer_map": info["layer_map"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"saved {out.model} vector at layers {out.layers} (recommended {out.recommended_layer}) -> {path}")
    return 0
