"""``steering-lab sae``: SAE features from the command line: the features most active on a text, a
search of the feature labels, which features a vector loads on, and a feature saved as a vector
(usable by ``generate``, ``sweep`` and ``export`` like any other)."""

from __future__ import annotations

import argparse
import json

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="SAE features: top features of a text, label search, a vector in features, "
                                   "a feature saved as a vector",
                       description="Work with a sparse autoencoder in sae-lens format (a shipped name such as "
                                   "smollm2-135m-l10, a local folder, or RELEASE:SAE_ID from the hub).")
    p.add_argument("action", choices=("features", "search", "of-vector", "vector"),
                   help="features: most active features on --text; search: features whose label contains "
                        "--query; of-vector: which features --vector loads on; vector: save --feature as a "
                        "steering vector at --out")
    p.add_argument("--sae", required=True, help="SAE name, folder or RELEASE:SAE_ID")
    p.add_argument("--text", help="text to read (features)")
    p.add_argument("--query", help="word to look for in the feature labels (search)")
    p.add_argument("--vector", help="vector path or name (of-vector)")
    p.add_argument("--feature", type=common.nonnegative_int, help="feature index (vector)")
    p.add_argument("--raw", action="store_true", help="vector: keep the decoder row's norm (default: unit norm)")
    p.add_argument("--out", help="where to save the feature vector (vector)")
    p.add_argument("-k", type=common.positive_int, default=10, help="how many features to show (default 10)")
    common.model_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=run)


def _show(rows: list[dict], as_json: bool) -> None:
    for r in rows:
        if as_json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print("  ".join(f"{k}={v}" for k, v in r.items()))


def run(args: argparse.Namespace) -> int:
    from .. import sae as saes

    if args.action == "search":
        check(bool(args.query), "search needs --query")
        index = saes.read_index(args.sae)
        features = index.get("features", {})
        items = features.items() if isinstance(features, dict) else enumerate(features)
        q = args.query.lower()
        rows = [{"feature": int(i), "label": f.get("label", "")} for i, f in items
                if isinstance(f, dict) and q in str(f.get("label", "")).lower()]
        _show(rows[: args.k], args.json)
        return 0
    if args.action == "features":
        check(bool(args.text and args.text.strip()), "features needs --text")
    if args.action == "of-vector":
        check(bool(args.vector), "of-vector needs --vector")
    if args.action == "vector":
        check(args.feature is not None and bool(args.out), "vector needs --feature and --out")
    lm = common.load_model_from_args(args)
    sae = saes.load_sae(args.sae, lm)
    if args.action == "features":
        _show(saes.top_features(lm, sae, args.text, k=args.k), args.json)
    elif args.action == "of-vector":
        vec = common.load_vector(common.artifact("vectors", args.vector))
        _show(saes.vector_features(sae, vec, k=args.k), args.json)
    else:
        vec = saes.feature_vector(sae, args.feature, normalize=not args.raw, lm=lm)
        path = vec.save(args.out)
        print(f"saved {vec.description} at layer {sae.layer} -> {path}")
    return 0
