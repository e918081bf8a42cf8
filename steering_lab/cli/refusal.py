"""``steering-lab refusal``: the refusal direction (or the refusal-style direction)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refusal", help="extract the refusal direction (or the refusal-style direction) and save it")
    p.add_argument("--style", action="store_true",
                   help="refusal-style response direction (for models that rarely refuse, like the embedded one)")
    p.add_argument("--val-size", type=int, default=16, help="val prompts per class used to score candidates")
    p.add_argument("--kl-max", type=common.finite_float, default=0.1,
                   help="candidate filter: KL under ablation on harmless prompts")
    p.add_argument("--orthogonalize", default=None, metavar="DIR",
                   help="also save a copy of the model with the direction projected out of its weights")
    common.model_args(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..refusal import candidate_table, save_orthogonalized, select_refusal_direction, style_direction
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    check(args.val_size >= 2, "--val-size must be at least 2")
    if args.orthogonalize:
        target = Path(args.orthogonalize).expanduser()
        check(not target.exists() or (target.is_dir() and not any(target.iterdir())),
              f"--orthogonalize: {target} exists and is not empty")
        check(not args.style, "--orthogonalize goes with the refusal direction, not --style")
    lm = common.load_model_from_args(args)
    if args.style:
        vec = style_direction(lm, progress=True)
        print("layer/strength calibration on harmless val prompts (refusal openings, distinct-2):")
        for row in vec.extra["calibration"]["table"]:
            print(f"  layer {row['layer']:>3}  strength {row['strength']:>8.2f}  refusal {row['refusal_rate']:.2f}  "
                  f"distinct-2 {row['distinct2']:.2f}")
    else:
        vec, cands = select_refusal_direction(lm, val_size=args.val_size, kl_max=args.kl_max, progress=True)
        print(candidate_table(cands))
        print(f"selected: position {vec.extra['position']}, layer {vec.recommended_layer}")
    saved = vec.save(out)
    print(f"recommended layer: {vec.recommended_layer}")
    print(f"recommended strength: {vec.recommended_strength}")
    print(f"saved {saved}.safetensors and {saved}.json")
    if args.orthogonalize:
        path = save_orthogonalized(lm, vec[vec.recommended_layer], args.orthogonalize)
        print(f"saved orthogonalized model to {path}")
    return 0
