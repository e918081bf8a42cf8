"""CLI sub-commands ``probe train``, ``probe score`` and ``controller train``."""

from __future__ import annotations

import argparse
import json

from .cli import _load, command, contrast_args, contrast_from_args
from .errors import check


def add_parsers(sub: argparse._SubParsersAction, model_arg) -> None:
    probe = sub.add_parser("probe", help="train or apply a linear probe")
    psub = probe.add_subparsers(dest="probe_command", required=True, parser_class=type(probe))
    p = psub.add_parser("train", help="train a logistic-regression probe with a layer sweep")
    contrast_args(p)
    p.add_argument("--pooling", default="last", help="last (default), mean or max over the prompt tokens")
    p.add_argument("--layer", type=int, default=None, help="train at this layer only (default: sweep all)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength")
    model_arg(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p = psub.add_parser("score", help="score prompts with a probe")
    p.add_argument("--probe", required=True)
    p.add_argument("--prompts", required=True, help="one prompt per line, or jsonl with a 'prompt' field")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: {\"prompt\", \"score\"}")
    model_arg(p)

    ctl = sub.add_parser("controller", help="train a lightweight steering controller")
    csub = ctl.add_subparsers(dest="controller_command", required=True, parser_class=type(ctl))
    p = csub.add_parser("train", help="train on harmful vs harmless prompts to steer on the first only")
    p.add_argument("--vector", required=True, help="the behaviour vector to apply (e.g. refusal-style)")
    p.add_argument("--steer-layers", default=None, help="layers to steer, e.g. 10-14 (default: recommended ±2)")
    p.add_argument("--input-layers", default=None, help="layers the controller reads (default: 3 in 20-40%% of depth)")
    p.add_argument("--base-strength", type=float, default=None, help="default: the vector's recommended strength")
    p.add_argument("--epochs", type=int, default=5)
    model_arg(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")


@command("probe")
def _probe(args: argparse.Namespace) -> int:
    from .datasets import load_prompts
    from .probes import POOLINGS, Probe, instruction_splits, score_texts_with_probe, sweep_table, train_probe
    from .vector import base_path

    if args.probe_command == "train":
        check(args.pooling in POOLINGS, f"unknown pooling {args.pooling!r} (choose {', '.join(POOLINGS)})")
        out = base_path(args.out)
        check(out.name != "", "--out needs a file name")
        contrast = contrast_from_args(args)
        lm = _load(args)
        splits = instruction_splits() if args.preset == "harmful" else None
        probe, rows = train_probe(lm, contrast, pooling=args.pooling, layer=args.layer, splits=splits, C=args.C,
                                  progress=True)
        saved = probe.save(out)
        print(sweep_table(rows, probe.layer))
        m = probe.metrics
        where = "bundled test split" if splits else "held-out split (also used to pick the layer)"
        print(f"best layer: {probe.layer}; {where}: AUROC {m['test_auroc']:.3f}, accuracy {m['test_accuracy']:.3f}")
        print(f"saved {saved}.safetensors and {saved}.json")
        return 0
    probe = Probe.load(args.probe)
    prompts = load_prompts(None, args.prompts)
    lm = _load(args)
    scores = score_texts_with_probe(lm, probe, prompts, progress=False)
    for prompt, score in zip(prompts, scores):
        if args.json:
            print(json.dumps({"prompt": prompt, "score": score}, ensure_ascii=False))
        else:
            print(f"{score:.4f}\t{prompt}")
    return 0


@command("controller")
def _controller(args: argparse.Namespace) -> int:
    from .controller import train_controller
    from .datasets import instruction_split
    from .extract import parse_layers
    from .vector import SteeringVector, base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    check(args.epochs >= 1, "--epochs must be at least 1")
    vec = SteeringVector.load(args.vector)
    lm = _load(args)
    vec.check_model(lm)
    rec = vec.recommended_layer if vec.recommended_layer is not None else vec.layers[len(vec.layers) // 2]
    steer_layers = parse_layers(args.steer_layers, lm.n_layers) or [
        k for k in range(rec - 2, rec + 3) if k in vec.directions]
    lo, hi = int(0.2 * lm.n_layers), max(int(0.4 * lm.n_layers), int(0.2 * lm.n_layers) + 1)
    input_layers = parse_layers(args.input_layers, lm.n_layers) or sorted({lo, (lo + hi) // 2, hi})
    base = args.base_strength if args.base_strength is not None else vec.recommended_strength
    check(base is not None and base > 0, "give --base-strength (the vector has no recommended strength)")
    harmful, harmless = instruction_split("train")
    ctl = train_controller(lm, vec, harmful, harmless, steer_layers=steer_layers, input_layers=input_layers,
                           base_strength=float(base), epochs=args.epochs, progress=True)
    h_test, l_test = instruction_split("test")
    scale, _ = ctl.decide(lm, h_test + l_test)
    on_h = float((scale[: len(h_test)] >= ctl.threshold).float().mean())
    on_l = float((scale[len(h_test):] >= ctl.threshold).float().mean())
    ctl.metrics.update({"test_applied_harmful": on_h, "test_applied_harmless": on_l})
    saved = ctl.save(out)
    print(f"steer layers {steer_layers}, input layers {input_layers}, base strength {base}")
    print(f"held-out test split: steering applied on {on_h:.0%} of harmful and {on_l:.0%} of harmless prompts")
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0
