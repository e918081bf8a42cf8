"""``steering-lab generate``: the same prompt with and without steering, side by side."""

from __future__ import annotations

import argparse
import json
import sys

from ..constants import COMPOSE_MODES, OPERATORS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with and without steering, side by side",
                       description="Generate the same prompt with and without steering and print both.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--vector", action="append", default=[],
                   help="vector: a path (.safetensors or a llama.cpp .gguf), or the name of a shipped or saved "
                        "vector (see `steering-lab list`); repeat for several vectors")
    p.add_argument("--strength", action="append", type=common.finite_float, default=[],
                   help="strength for the matching --vector, e.g. -20 (default: its recommended strength)")
    p.add_argument("--layer", action="append", default=[],
                   help="layer(s) for the matching --vector, e.g. 9 or 8-10 (default: its recommended layer)")
    p.add_argument("--operator", default="add", choices=OPERATORS,
                   help="how the vector acts (default: add; transport: a Linear-AcT vector, strength in [0, 1])")
    p.add_argument("--compose", default="separate", choices=COMPOSE_MODES,
                   help="several vectors: each at its own layer (default) or summed at the first one's layer")
    p.add_argument("--dynamic", type=common.finite_float, default=None, metavar="TAU",
                   help="per-step strengths by KL (Dynamic Activation Composition); TAU in nats, e.g. 0.5")
    p.add_argument("--controller", default=None,
                   help="a trained controller (path or name): it decides from the prompt how strongly to steer")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=64)
    p.add_argument("--temperature", type=common.finite_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt")
    common.model_args(p)
    p.add_argument("--json", action="store_true", help='print {"baseline": ..., "steered": ...}')
    p.set_defaults(run=run)


def check_steer_args(args: argparse.Namespace) -> list[str]:
    """Validate repeated --vector/--strength/--layer before any model is loaded; returns the paths."""
    vectors = [common.artifact("vectors", v) for v in args.vector]
    check(not (args.strength or args.layer) or vectors, "--strength and --layer need a --vector")
    check(len(args.strength) <= len(vectors) or not vectors, "more --strength values than --vector paths")
    check(len(args.layer) <= len(vectors) or not vectors, "more --layer values than --vector paths")
    for path in vectors:  # fail on a bad file before spending seconds on the model
        common.load_vector(path)
    return vectors


def steers_from_args(args: argparse.Namespace, lm) -> list:
    """Turn repeated --vector/--strength/--layer into Steer objects (for generate and friends)."""
    from ..extract import parse_layers
    from ..intervene import Steer

    steers = []
    for i, path in enumerate(check_steer_args(args)):
        vec = common.load_vector(path)
        vec.check_model(lm)
        layers = parse_layers(args.layer[i], lm.n_layers) if i < len(args.layer) else None
        if i < len(args.strength):
            strength = args.strength[i]
        else:
            check(vec.recommended_strength is not None, f"{path} has no recommended strength; pass --strength")
            strength = float(vec.recommended_strength)
        steers.append(Steer(vec, strength, layers=layers, operator=args.operator))
    return steers


def run(args: argparse.Namespace) -> int:
    from ..generate import generate

    check(args.prompt.strip() != "", "--prompt is empty")
    check_steer_args(args)
    controller = None
    if args.controller:
        from ..controller import Controller

        check(not args.vector, "--controller brings its own vector; do not combine it with --vector")
        controller = Controller.load(common.artifact("controllers", args.controller))
    if args.dynamic is not None:
        check(args.dynamic > 0, "--dynamic needs a positive TAU")
    lm = common.load_model_from_args(args)
    metrics: dict = {}
    steers = steers_from_args(args, lm)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                system=args.system)
    if steers and (args.compose == "sum" or args.dynamic is not None):
        check(args.operator == "add", "--compose sum and --dynamic work with the add operator")
    if steers and args.compose == "sum":
        from ..compose import compose

        first_layer = steers[0].layers[0] if steers[0].layers else None
        steers = compose([(s.vector, float(s.strength)) for s in steers], mode="sum", layer=first_layer)
    if steers and args.dynamic is not None:
        from ..compose import dynamic_stream
        from ..generate import final

        check(args.temperature == 0, "--dynamic decodes greedily; drop --temperature")
        baseline = generate(lm, [args.prompt], **opts)[0]
        last = final(dynamic_stream(lm, args.prompt, [(s.vector, float(s.strength)) for s in steers],
                                    layers=[s.layers for s in steers], tau=args.dynamic,
                                    max_new_tokens=args.max_new_tokens, system=args.system))
        steered = last.text
    elif not steers and controller is None:
        baseline, steered = generate(lm, [args.prompt], **opts)[0], None
    else:  # the same function as the app's Steer tab: baseline, steered and live metrics in one batch
        from ..generate import final
        from ..live import live_stream

        if controller is not None:
            controller.check_model(lm)
            scale, weights = controller.decide(lm, [args.prompt])
            steers = controller.steering(scale, weights)
            print(f"controller scale {float(scale[0]):.3f} (applied: {float(scale[0]) >= controller.threshold})",
                  file=sys.stderr)
        last = final(live_stream(lm, args.prompt, steers, max_new_tokens=args.max_new_tokens, system=args.system,
                                 temperature=args.temperature, seed=args.seed))
        baseline, steered = last.baseline, last.steered
        metrics = {"kl": round(last.mean_kl, 4), "perplexity": round(last.perplexity, 3), "refusal": last.refusal}
    if args.json:
        print(json.dumps({"baseline": baseline, "steered": steered, **metrics}, ensure_ascii=False))
    else:
        print("=== baseline ===")
        print(baseline)
        if steered is not None:
            print("=== steered ===")
            print(steered)
        if metrics:
            print("=== cost === mean KL(steered || unsteered) {kl} nats · perplexity under the unsteered model "
                  "{perplexity} · refusal opening: {refusal}".format(**metrics))
    return 0
