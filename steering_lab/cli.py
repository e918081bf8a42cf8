"""Command line: ``python -m steering_lab <command> ...``.

Other tools script against these spellings; keep them stable. Bad input exits with code 2 and
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import UserError, check

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF id, local model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")


def contrast_args(p: argparse.ArgumentParser) -> None:
    """``(--preset NAME | --pos FILE [--neg FILE])``: where a contrast set comes from."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="bundled contrast set: sentiment, formality, harmful, ...")
    src.add_argument("--pos", help="positive examples: text file (one per line), or a .jsonl/.csv with both classes")
    p.add_argument("--neg", help="negative examples: text file (one per line)")


def contrast_from_args(args: argparse.Namespace):
    from .datasets import load_preset, load_user

    if args.preset:
        check(args.neg is None, "--neg goes with --pos, not with --preset")
        return load_preset(args.preset)
    return load_user(args.pos, args.neg)


def _load(args: argparse.Namespace):
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return register


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="steering_lab", description="Activation steering lab for causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("extract", help="extract a steering vector from a contrast set")
    contrast_args(p)
    p.add_argument("--method", default="mean_diff", help="mean_diff (default), pca, actadd, probe_weight")
    p.add_argument("--layers", default=None, help="layers to extract, e.g. 4-12 or 3,5,7 (default: all)")
    p.add_argument("--position", default=None,
                   help="last, mean, max or response_mean (default: response_mean for prompt+response sets, else last)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--description", default=None)
    _model_arg(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")

    p = sub.add_parser("generate", help="generate with and without steering, side by side")
    p.add_argument("--prompt", required=True)
    p.add_argument("--vector", action="append", default=[], help="vector path (repeat for several vectors)")
    p.add_argument("--strength", action="append", type=float, default=[],
                   help="strength for the matching --vector (default: its recommended strength)")
    p.add_argument("--layer", action="append", default=[],
                   help="layer(s) for the matching --vector, e.g. 9 or 8-10 (default: its recommended layer)")
    p.add_argument("--operator", default="add", help="add, ablate, clamp or rotate")
    p.add_argument("--compose", default="separate", choices=["separate", "sum"],
                   help="several vectors: each at its own layer (default) or summed at the first one's layer")
    p.add_argument("--dynamic", type=float, default=None, metavar="TAU",
                   help="per-step strengths by KL (Dynamic Activation Composition); TAU in nats, e.g. 0.5")
    p.add_argument("--controller", default=None,
                   help="a trained controller: it decides from the prompt how strongly to apply its vector")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt")
    _model_arg(p)
    p.add_argument("--json", action="store_true", help='print {"baseline": ..., "steered": ...}')

    from . import cli_persona, cli_probes, cli_refusal

    for module in (cli_refusal, cli_probes, cli_persona):  # feature modules add their own sub-commands
        module.add_parsers(sub, _model_arg)
    return parser


@command("extract")
def _extract(args: argparse.Namespace) -> int:
    from .extract import extract, get_method
    from .vector import base_path

    get_method(args.method)
    check(args.batch_size >= 1, "--batch-size must be at least 1")
    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    contrast = contrast_from_args(args)
    lm = _load(args)
    vec, scan = extract(lm, contrast, args.method, layers=args.layers, position=args.position,
                        batch_size=args.batch_size, progress=True, description=args.description)
    saved = vec.save(out)
    print(scan.table())
    print(f"recommended layer: {vec.recommended_layer}")
    print(f"recommended strength: {vec.recommended_strength}")
    print(f"saved {saved}.safetensors and {saved}.json")
    return 0


def check_steer_args(args: argparse.Namespace) -> list:
    """Validate repeated --vector/--strength/--layer before any model is loaded; returns the paths."""
    from .vector import SteeringVector

    vectors = args.vector
    check(not (args.strength or args.layer) or vectors, "--strength and --layer need a --vector")
    check(len(args.strength) <= len(vectors) or not vectors, "more --strength values than --vector paths")
    check(len(args.layer) <= len(vectors) or not vectors, "more --layer values than --vector paths")
    for path in vectors:  # fail on a bad file before spending seconds on the model
        SteeringVector.load(path)
    return vectors


def steers_from_args(args: argparse.Namespace, lm) -> list:
    """Turn repeated --vector/--strength/--layer into Steer objects (for generate and friends)."""
    from .extract import parse_layers
    from .intervene import Steer
    from .vector import SteeringVector

    vectors = check_steer_args(args)
    if not vectors:
        return []
    steers = []
    for i, path in enumerate(vectors):
        vec = SteeringVector.load(path)
        vec.check_model(lm)
        layers = parse_layers(args.layer[i], lm.n_layers) if i < len(args.layer) else None
        if i < len(args.strength):
            strength = args.strength[i]
        else:
            check(vec.recommended_strength is not None,
                  f"{path} has no recommended strength; pass --strength")
            strength = float(vec.recommended_strength)
        steers.append((vec, strength, layers))
    return [Steer(v, s, layers=k, operator=args.operator) for v, s, k in steers]


@command("generate")
def _generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .intervene import OPERATORS, Steer

    check(args.operator in OPERATORS, f"unknown operator {args.operator!r} (choose {', '.join(OPERATORS)})")
    check(args.prompt.strip() != "", "--prompt is empty")
    check(args.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    check_steer_args(args)
    controller = None
    if args.controller:
        from .controller import Controller

        check(not args.vector, "--controller brings its own vector; do not combine it with --vector")
        controller = Controller.load(args.controller)
    lm = _load(args)
    steers = steers_from_args(args, lm)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                system=args.system)
    if steers and (args.compose == "sum" or args.dynamic is not None):
        check(args.operator == "add", "--compose sum and --dynamic work with the add operator")
    if steers and args.compose == "sum":
        from .compose import compose

        first_layer = steers[0].layers[0] if steers[0].layers else None
        steers = compose([(s.vector, float(s.strength)) for s in steers], mode="sum", layer=first_layer)
    if steers and args.dynamic is not None:
        from .compose import dynamic_stream
        from .generate import final

        check(args.dynamic > 0, "--dynamic needs a positive TAU")
        check(args.temperature == 0, "--dynamic decodes greedily; drop --temperature")
        baseline = generate(lm, [args.prompt], **opts)[0]
        last = final(dynamic_stream(lm, args.prompt, [(s.vector, float(s.strength)) for s in steers],
                                    layers=[s.layers for s in steers], tau=args.dynamic,
                                    max_new_tokens=args.max_new_tokens, system=args.system))
        steered = last.text
    elif controller is not None:
        controller.check_model(lm)
        scale, weights = controller.decide(lm, [args.prompt])
        rows = controller.steering(torch.cat([torch.zeros_like(scale), scale]), torch.cat([weights, weights]))
        baseline, steered = generate(lm, [args.prompt, args.prompt], rows, **opts)
        print(f"controller scale {float(scale[0]):.3f} (applied: {float(scale[0]) >= controller.threshold})",
              file=sys.stderr)
    elif not steers:
        baseline, steered = generate(lm, [args.prompt], **opts)[0], None
    elif args.operator == "clamp":  # clamping to 0 is not the identity: run the baseline apart
        baseline = generate(lm, [args.prompt], **opts)[0]
        steered = generate(lm, [args.prompt], steers, **opts)[0]
    else:  # one batch: row 0 at strength 0 (identical to unsteered), row 1 steered
        rows = [Steer(s.vector, [0.0, float(s.strength)], layers=s.layers, operator=s.operator) for s in steers]
        baseline, steered = generate(lm, [args.prompt, args.prompt], rows, **opts)
    if args.json:
        print(json.dumps({"baseline": baseline, "steered": steered}, ensure_ascii=False))
    else:
        print("=== baseline ===")
        print(baseline)
        if steered is not None:
            print("=== steered ===")
            print(steered)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("steering_lab").setLevel(logging.INFO)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"steering_lab: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"steering_lab: error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"steering_lab: error: permission denied: {exc.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steering_lab: interrupted", file=sys.stderr)
        return 130
