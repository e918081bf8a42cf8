"""``steering-lab transport fit``: Linear-AcT transport maps from a contrast set, saved as a vector.

Steer with it through ``steering-lab generate --vector PATH --operator transport --strength 0.7``
(strength = lambda in [0, 1]: 0 unsteered, 1 full transport)."""

from __future__ import annotations

import argparse

from ..constants import POSITIONS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transport", help="Linear-AcT: fit per-unit transport maps from a contrast set",
                       description="Fit Linear-AcT transport maps (Rodriguez et al. 2024): per layer and unit, the "
                                   "affine map that sends the source class's activations onto the target class's "
                                   "(sorted samples, least squares). Steer with `generate --operator transport "
                                   "--strength LAMBDA` (LAMBDA in [0, 1]).")
    p.add_argument("action", choices=("fit",), help="fit: estimate the maps and save them at --out")
    common.contrast_args(p)
    p.add_argument("--layers", default=None, help="layers to transport, e.g. 4-12 or 3,5,7 (default: all)")
    p.add_argument("--toward", default="positive", choices=("positive", "negative"),
                   help="the class to transport to (default positive: the negative class is the source)")
    p.add_argument("--position", default=None, choices=POSITIONS,
                   help="tokens pooled per text (default: response_mean for prompt+response sets, else mean)")
    p.add_argument("--no-support", action="store_true",
                   help="transport every value (default: only values inside the source's [min, max] per unit)")
    p.add_argument("--no-causal", action="store_true",
                   help="fit every layer on unsteered activations (default: layer k is fitted with the maps of "
                        "the earlier layers applied)")
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    p.add_argument("--description", default=None)
    common.model_args(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..directions.transport import METHOD, fit_linear_act
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    contrast = common.contrast_from_args(args)
    lm = common.load_model_from_args(args)
    vec = fit_linear_act(lm, contrast, layers=args.layers, position=args.position, toward=args.toward,
                         causal=not args.no_causal, support=not args.no_support, batch_size=args.batch_size,
                         progress=True, description=args.description)
    saved = vec.save(out)
    info = vec.extra[METHOD]
    print(f"{'layer':>5} {'|shift|':>8} {'med a':>7} {'|h|':>8}")
    for k, row in info["layers"].items():
        print(f"{k:>5} {row['shift_norm']:>8.3f} {row['median_scale']:>7.3f} {row['token_norm']:>8.2f}")
    print(f"Linear-AcT {info['source']} -> {info['target']} at {len(vec.layers)} layer(s); pooling {info['pooling']}, "
          f"support {'on' if info['support'] else 'off'}, {'causal' if info['causal'] else 'simultaneous'} estimation")
    print(f"saved {saved}.safetensors and {saved}.json")
    print(f"steer: steering-lab generate --vector {saved} --operator transport --strength 1.0 --prompt ...")
    return 0
