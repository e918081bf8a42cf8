"""``steering-lab attribution``: which layers and attention heads carry a contrast, by attribution
patching (AtP / AtP*: one forward + backward per pair instead of one forward per node), optionally
checked against exact activation patching (``--validate``)."""

from __future__ import annotations

import argparse
import json

from . import common

METHODS = ("atp", "atp_qk", "atp_star")


def register(sub: argparse._SubParsersAction) -> None:
    from ..datasets import PRESETS  # plain Python, no torch

    p = sub.add_parser("attribution", help="attribution patching (AtP, AtP*): the layers and heads a contrast "
                                           "depends on; suggested layers for extraction",
                       description="Estimate, for every layer (residual stream at the last token) and attention "
                                   "head, the effect of patching it from a corrupt prompt into a clean one "
                                   "(Kramár et al. 2024, AtP*). Pairs come from a preset (the model is asked "
                                   "whether the text is positive or negative, etc.) or a jsonl file with "
                                   "clean, corrupt, answer and optional wrong fields.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="bundled contrast set")
    src.add_argument("--pairs", help="jsonl: one {clean, corrupt, answer[, wrong]} per line")
    p.add_argument("--chat", action="store_true", help="--pairs: wrap clean/corrupt texts as chat user turns")
    p.add_argument("-n", "--n-pairs", type=common.positive_int, default=8, help="pairs used from a preset (default 8)")
    p.add_argument("--metric", choices=("logit_diff", "logprob"), default=None,
                   help="default: logit_diff when every pair has a wrong answer, else logprob")
    p.add_argument("--method", choices=METHODS, default="atp_star",
                   help="what to rank by (default atp_star: QK fix + GradDrop, a magnitude)")
    p.add_argument("--heads", action="store_true", help="also list the top attention heads")
    p.add_argument("--no-graddrop", action="store_true", help="skip GradDrop (L fewer backward passes per pair)")
    p.add_argument("--validate", action="store_true",
                   help="also run exact activation patching (one forward row per node and pair) and report "
                        "Pearson/Spearman correlations")
    p.add_argument("-k", type=common.positive_int, default=5, help="how many layers/heads to show (default 5)")
    common.model_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..measure import attribution as atp

    lm = common.load_model_from_args(args)
    if args.preset:
        pairs = atp.preset_pairs(lm, args.preset, args.n_pairs)
    else:
        pairs = atp.load_pairs_file(lm, args.pairs, chat=args.chat)
    res = atp.attribute(lm, pairs, args.metric, graddrop=not args.no_graddrop, progress=not args.json)
    out = {"model": lm.name, "n_pairs": res.n_pairs, "metric": res.metric, "clean_metric": res.clean_metric,
           "corrupt_metric": res.corrupt_metric, "method": args.method, "seconds": round(res.seconds, 2),
           "suggested_layers": atp.suggest_layers(res, args.k, method=args.method),
           "top_layers": atp.top_nodes(res, "layers", args.k, args.method)}
    if args.heads:
        out["top_heads"] = atp.top_nodes(res, "heads", args.k, args.method)
    if args.validate:
        exact = atp.activation_patching(lm, pairs, args.metric, progress=not args.json)
        out["validation"] = {"seconds": round(exact["seconds"], 2), "forward_rows": exact["n_forward_rows"],
                             "correlations": atp.correlations(res, exact)}
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(f"{lm.name}: {res.n_pairs} pairs, metric {res.metric} (clean {res.clean_metric:+.3f}, corrupt "
          f"{res.corrupt_metric:+.3f}), ranked by {args.method}, {res.seconds:.1f} s")
    print("suggested layers: " + ", ".join(map(str, out["suggested_layers"])))
    print("top layers:")
    for r in out["top_layers"]:
        print(f"  layer {r['layer']:>3}  {r['effect']:+.4f}")
    if args.heads:
        print("top heads:")
        for r in out["top_heads"]:
            print(f"  layer {r['layer']:>3} head {r['head']:>2}  {r['effect']:+.4f}")
    if args.validate:
        v = out["validation"]
        print(f"validation: exact activation patching, {v['forward_rows']} forward rows, {v['seconds']:.1f} s")
        print("  node type  method    compare  n   pearson  spearman")
        for c in v["correlations"]:
            print(f"  {c['node_type']:<9}  {c['method']:<8}  {c['compare']:<7}  {c['n_nodes']:<3} "
                  f"{c['pearson']:+.3f}   {c['spearman']:+.3f}")
    return 0
