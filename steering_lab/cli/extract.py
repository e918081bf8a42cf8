"""``steering-lab extract`` (a vector from a contrast set) and ``steering-lab persona`` (a trait direction)."""

from __future__ import annotations

import argparse

from ..constants import METHODS, POSITIONS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract a steering vector from a contrast set",
                       description="Extract a steering vector from a contrast set, with a layer scan.")
    common.contrast_args(p)
    p.add_argument("--method", default="mean_diff", choices=METHODS, help="default: mean_diff")
    p.add_argument("--layers", default=None, help="layers to extract, e.g. 4-12 or 3,5,7 (default: all)")
    p.add_argument("--position", default=None, choices=POSITIONS,
                   help="tokens read (default: response_mean for prompt+response sets, else last)")
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    p.add_argument("--description", default=None)
    p.add_argument("--no-effect-probe", action="store_true",
                   help="do not train the vector's effect probe (PATH-effect.*: its two poles as text, read on "
                        "generated text by sweeps and calibrate)")
    common.model_args(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    p.set_defaults(run=run_extract)

    p = sub.add_parser("persona", help="extract a personality / persona trait direction")
    p.add_argument("--trait", required=True, help="openness, conscientiousness, extraversion, agreeableness, "
                                                  "neuroticism, or any name with --description")
    p.add_argument("--description", default=None, help="one line describing the trait (for a custom trait)")
    common.model_args(p)
    p.add_argument("--out", required=True,
                   help="output path: PATH.* is the response direction, PATH_prompt.* the prompt direction")
    p.set_defaults(run=run_persona)


def run_extract(args: argparse.Namespace) -> int:
    from ..extract import extract
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    contrast = common.contrast_from_args(args)
    lm = common.load_model_from_args(args)
    vec, scan = extract(lm, contrast, args.method, layers=args.layers, position=args.position,
                        batch_size=args.batch_size, progress=True, description=args.description)
    effect_note = ""
    if not args.no_effect_probe and min(len(contrast.positive), len(contrast.negative)) >= 6:
        from ..measure.effect import EffectMeasure, set_measure, train_effect_probe

        probe, measure = train_effect_probe(lm, contrast, out.name + "-effect", progress=True)
        probe_path = probe.save(out.with_name(out.name + "-effect"))
        set_measure(vec, EffectMeasure(kind="probe", name=str(probe_path.resolve()), sign=1,
                                       description=measure.description))
        effect_note = (f"effect probe: {probe_path}.safetensors (layer {probe.layer}, test AUROC "
                       f"{probe.metrics.get('test_auroc', float('nan')):.3f}); sweeps and calibrate measure with it")
    saved = vec.save(out)
    print(scan.table())
    print(f"recommended layer: {vec.recommended_layer}")
    print(f"recommended strength: {vec.recommended_strength}")
    print(f"saved {saved}.safetensors and {saved}.json")
    if effect_note:
        print(effect_note)
    return 0


def run_persona(args: argparse.Namespace) -> int:
    from ..extract import LayerScan, LayerScore
    from ..personas import get_trait, trait_direction
    from ..vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    trait = get_trait(args.trait, args.description)
    lm = common.load_model_from_args(args)
    vec, prompt_vec = trait_direction(lm, trait, progress=True)
    saved = vec.save(out)
    prompt_saved = prompt_vec.save(out.with_name(out.name + "_prompt"))
    scan = vec.extra["layer_scan"]
    table = LayerScan(method=scan["method"], rows=[LayerScore(**r) for r in scan["rows"]],
                      recommended_layer=scan["recommended_layer"], recommended_strength=scan["recommended_strength"],
                      n_train=scan["n_train"], n_test=scan["n_test"], in_sample=scan["in_sample"])
    print(table.table())
    cal = vec.extra["trait_score"]
    print(f"trait score calibration at layer {cal['layer']}: low-pole answers {cal['mu_low']:.2f}, "
          f"high-pole answers {cal['mu_high']:.2f} (projection)")
    print(f"cosine(response direction, prompt direction) at that layer: {vec.extra['cosine_with_prompt_direction']}")
    print(f"recommended layer: {vec.recommended_layer}")
    print(f"recommended strength: {vec.recommended_strength}")
    print(f"saved {saved}.safetensors/.json and {prompt_saved}.safetensors/.json")
    return 0
