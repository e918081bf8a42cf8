"""``steering-lab crosslingual``: does the English harmful/refusal direction and the English harmful
probe carry over to other languages (Wang et al. 2025, arXiv:2505.17306)? Per language: AUROC of the
direction and of the probe (harmful vs harmless prompts), cosine of the language's own direction with
the English one per layer, and (``--interventions``) refusal rates with the direction added on
harmless prompts and ablated on harmful ones."""

from __future__ import annotations

import argparse
import json

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crosslingual", help="cross-lingual refusal: the English direction and probe on other languages",
                       description="Separation (AUROC) of harmful vs harmless prompts in other languages by the "
                                   "English direction and probe, cosine of each language's own direction with the "
                                   "English one per layer, and optional add/ablate interventions.")
    p.add_argument("--languages", default=None,
                   help="comma-separated codes among fr,de,es,zh,ru (default: all); English is always the "
                        "reference row")
    p.add_argument("--vector", default="harmful", help="vector path or name (default: harmful)")
    p.add_argument("--probe", default="harmful", help="probe path or name, or 'none' (default: harmful)")
    p.add_argument("--layer", type=common.nonnegative_int, default=None,
                   help="layer of the direction (default: the vector's recommended layer)")
    p.add_argument("--strength", type=common.finite_float, default=None,
                   help="strength of the added direction (default: the vector's recommended strength)")
    p.add_argument("--interventions", action="store_true",
                   help="also generate: direction added on harmless prompts, ablated on harmful ones")
    p.add_argument("--limit", type=common.positive_int, default=None, help="at most this many prompts per side")
    p.add_argument("--reference-limit", type=common.positive_int, default=None,
                   help="at most this many English train+val prompts per side for the reference direction")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=24,
                   help="tokens per answer for the interventions (default 24)")
    p.add_argument("--data-dir", default=None,
                   help="folder with {lang}_harmful.txt / {lang}_harmless.txt (default: the bundled set)")
    common.model_args(p)
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..measure.crosslingual import crosslingual, parse_languages
    from ..probes import Probe

    languages = parse_languages(args.languages)  # bad codes fail before the model loads
    check(args.limit is None or args.limit >= 2, "--limit must be at least 2")
    vec = common.load_vector(args.vector)
    no_probe = args.probe is None or args.probe.strip().lower() in ("", "none")
    probe = None if no_probe else Probe.load(common.artifact("probes", args.probe))
    lm = common.load_model_from_args(args)
    report = crosslingual(lm, vec, probe, languages, interventions=args.interventions, layer=args.layer,
                          strength=args.strength, data_dir=args.data_dir, limit=args.limit,
                          reference_limit=args.reference_limit,
                          max_new_tokens=args.max_new_tokens, progress=True, vector_name=args.vector,
                          probe_name=None if no_probe else args.probe)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0
    print(f"vector {report.vector} at layer {report.layer}; probe {report.probe or '-'}"
          f"{'' if report.probe_layer is None else f' (layer {report.probe_layer})'}; model {report.model}")
    print(report.table())
    print("cosine of each language's own direction with the English reference, per layer:")
    print("layer " + " ".join(f"{k:>5}" for k in report.layers))
    for lang, curve in report.cosines.items():
        print(f"{lang:>5} " + " ".join(f"{c:>5.2f}" for c in curve))
    if report.interventions:
        iv = report.interventions
        print(f"interventions: add strength {iv['strength']} at layer {iv['layer']}, ablation at every block, "
              f"{iv['max_new_tokens']} new tokens; judge: {iv['judge']}")
    return 0
