"""``steering-lab probe train|score`` and ``steering-lab controller train``."""

from __future__ import annotations

import argparse
import json

from ..constants import POOLINGS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    probe = sub.add_parser("probe", help="train or apply a linear probe")
    psub = probe.add_subparsers(dest="probe_command", required=True, metavar="{train,score}",
                                parser_class=common.Parser)
    p = psub.add_parser("train", help="train a logistic-regression probe with a layer sweep")
    common.contrast_args(p)
    p.add_argument("--pooling", default="last", choices=POOLINGS, help="over the prompt tokens (default: last)")
    p.add_argument("--layer", type=int, default=None, help="train at this layer only (default: sweep all)")
    p.add_argument("--C", type=common.finite_float, default=1.0, help="inverse L2 regularisation strength")
    common.model_args(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run_probe_train)

    p = psub.add_parser("score", help="score prompts with a probe")
    p.add_argument("--probe", required=True, help="a path, or the name of a shipped or saved probe")
    p.add_argument("--prompts", required=True, help="one prompt per line, or jsonl with a 'prompt' field")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: {\"prompt\", \"score\"}")
    common.model_args(p)
    p.set_defaults(run=run_probe_score)

    ctl = sub.add_parser("controller", help="train a lightweight steering controller")
    csub = ctl.add_subparsers(dest="controller_command", required=True, metavar="{train}",
                              parser_class=common.Parser)
    p = csub.add_parser("train", help="train on harmful vs harmless prompts to steer on the first only")
    p.add_argument("--vector", required=True,
                   help="the behaviour vector to apply (a path or a name, e.g. refusal_style)")
    p.add_argument("--steer-layers", default=None, help="layers to steer, e.g. 10-14 (default: recommended ±2)")
    p.add_argument("--input-layers", default=None, help="layers the controller reads (default: 3 in 20-40%% of depth)")
    p.add_argument("--base-strength", type=common.finite_float, default=None,
                   help="default: the vector's recommended strength")
    p.add_argument("--epochs", type=common.positive_int, default=5)
    common.model_args(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run_controller_train)


def run_probe_train(args: argparse.Namespace) -> int:
    from ..probes import instruction_splits, sweep_table, train_probe
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    contrast = common.contrast_from_args(args)
    lm = common.load_model_from_args(args)
    splits = instruction_splits() if args.preset == "harmful" else None
    probe, rows = train_probe(lm, contrast, pooling=args.pooling, layer=args.layer, splits=splits, C=args.C,
                              progress=True)
    saved = probe.save(out)
    print(sweep_table(rows, probe.layer))
    m = probe.metrics
    where = "bundled test split" if splits else "test split (the layer and threshold were chosen on a validation split)"
    print(f"best layer: {probe.layer}; validation AUROC {m['val']['auroc']:.3f}; {where}: AUROC "
          f"{m['test_auroc']:.3f}, accuracy {m['test_accuracy']:.3f}")
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0


def run_probe_score(args: argparse.Namespace) -> int:
    from ..datasets import load_prompts
    from ..probes import Probe, score_texts_with_probe

    probe = Probe.load(common.artifact("probes", args.probe))
    prompts = load_prompts(None, args.prompts)
    lm = common.load_model_from_args(args)
    scores = score_texts_with_probe(lm, probe, prompts, progress=False)
    for prompt, score in zip(prompts, scores):
        if args.json:
            print(json.dumps({"prompt": prompt, "score": score}, ensure_ascii=False))
        else:
            print(f"{score:.4f}\t{prompt}")
    return 0


def run_controller_train(args: argparse.Namespace) -> int:
    from ..controller import train_refusal_controller
    from ..extract import parse_layers
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    vec = common.load_vector(args.vector)
    lm = common.load_model_from_args(args)
    vec.check_model(lm)
    rec = vec.recommended_layer if vec.recommended_layer is not None else vec.layers[len(vec.layers) // 2]
    steer_layers = parse_layers(args.steer_layers, lm.n_layers) or [
        k for k in range(rec - 2, rec + 3) if k in vec.directions]
    lo, hi = int(0.2 * lm.n_layers), max(int(0.4 * lm.n_layers), int(0.2 * lm.n_layers) + 1)
    input_layers = parse_layers(args.input_layers, lm.n_layers) or sorted({lo, (lo + hi) // 2, hi})
    base = args.base_strength if args.base_strength is not None else vec.recommended_strength
    check(base is not None and base > 0, "give --base-strength (the vector has no recommended strength)")
    # train on the in-style train + varied lines, gate threshold calibrated on val, rates per split recorded
    ctl = train_refusal_controller(lm, vec, steer_layers=steer_layers, input_layers=input_layers,
                                   base_strength=float(base), epochs=args.epochs, progress=True)
    saved = ctl.save(out)
    print(f"steer layers {steer_layers}, input layers {input_layers}, base strength {base}")
    print(f"gate threshold {ctl.threshold:.4f} (calibrated on the val split: harmless rate <= 5%)")
    for split in ("test_instyle", "test_style2"):
        m = ctl.metrics[split]
        print(f"{split} split: steering applied on {m['applied_harmful']:.0%} of harmful and "
              f"{m['applied_harmless']:.0%} of harmless prompts")
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0
