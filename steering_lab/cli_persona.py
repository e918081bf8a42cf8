"""CLI sub-command ``persona``."""

from __future__ import annotations

import argparse

from .cli import _load, command
from .errors import check


def add_parsers(sub: argparse._SubParsersAction, model_arg) -> None:
    p = sub.add_parser("persona", help="extract a personality / persona trait direction")
    p.add_argument("--trait", required=True, help="openness, conscientiousness, extraversion, agreeableness, "
                                                  "neuroticism, or any name with --description")
    p.add_argument("--description", default=None, help="one line describing the trait (for a custom trait)")
    model_arg(p)
    p.add_argument("--out", required=True,
                   help="output path: PATH.* is the response direction, PATH_prompt.* the prompt direction")


@command("persona")
def _persona(args: argparse.Namespace) -> int:
    from .extract import LayerScan, LayerScore
    from .personas import get_trait, trait_direction
    from .vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    trait = get_trait(args.trait, args.description)
    lm = _load(args)
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
