"""CLI sub-commands ``refusal`` and ``sweep``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import _float_list, _load, command
from .errors import check


def add_parsers(sub: argparse._SubParsersAction, model_arg) -> None:
    p = sub.add_parser("refusal", help="extract the refusal direction (or the refusal-style direction) and save it")
    p.add_argument("--style", action="store_true",
                   help="refusal-style response direction (for models that rarely refuse, like the embedded one)")
    p.add_argument("--val-size", type=int, default=16, help="val prompts per class used to score candidates")
    p.add_argument("--kl-max", type=float, default=0.1, help="candidate filter: KL under ablation on harmless prompts")
    p.add_argument("--orthogonalize", default=None, metavar="DIR",
                   help="also save a copy of the model with the direction projected out of its weights")
    model_arg(p)
    p.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")

    p = sub.add_parser("sweep", help="generate at several strengths and report behaviour and side effects")
    p.add_argument("--vector", required=True)
    p.add_argument("--strengths", required=True, type=_float_list, help="comma-separated, e.g. 0,10,20,30")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file: one per line, or jsonl with a 'prompt' field")
    src.add_argument("--preset", help="bundled prompt set: harmful, harmless, neutral, harmful-test, harmless-test")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--layer", default=None, help="layer(s), e.g. 12 or 10-14 (default: the vector's recommended layer)")
    p.add_argument("--operator", default="add", help="add, ablate, clamp or rotate")
    p.add_argument("--random-baseline", type=int, default=0, metavar="K",
                   help="also sweep K random directions of the same norm (the control)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-rows", type=int, default=None, help="rows per batch (default: as many as ~2 GiB allows)")
    model_arg(p)
    p.add_argument("--out", required=True, help="report path (report.json; the chart goes to report.html)")


@command("refusal")
def _refusal(args: argparse.Namespace) -> int:
    from .refusal import candidate_table, save_orthogonalized, select_refusal_direction, style_direction
    from .vector import base_path

    out = base_path(args.out)
    check(out.name != "", "--out needs a file name")
    check(args.val_size >= 2, "--val-size must be at least 2")
    if args.orthogonalize:
        target = Path(args.orthogonalize).expanduser()
        check(not target.exists() or (target.is_dir() and not any(target.iterdir())),
              f"--orthogonalize: {target} exists and is not empty")
        check(not args.style, "--orthogonalize goes with the refusal direction, not --style")
    lm = _load(args)
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


@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    from .datasets import load_prompts
    from .extract import parse_layers
    from .intervene import OPERATORS
    from .sweep import run_sweep, write_report
    from .vector import SteeringVector

    check(args.operator in OPERATORS, f"unknown operator {args.operator!r} (choose {', '.join(OPERATORS)})")
    check(args.max_new_tokens >= 1, "--max-new-tokens must be at least 1")
    check(args.random_baseline >= 0, "--random-baseline must be >= 0")
    check(args.limit is None or args.limit >= 1, "--limit must be at least 1")
    check(args.batch_rows is None or args.batch_rows >= 1, "--batch-rows must be at least 1")
    check(len(set(args.strengths)) == len(args.strengths), "--strengths must not repeat")
    out = Path(args.out)
    check(out.name not in ("", ".json"), "--out needs a file name")
    vec = SteeringVector.load(args.vector)
    prompts = load_prompts(args.preset, None) if args.preset else load_prompts(None, args.prompts)
    prompts = prompts[: args.limit] if args.limit else prompts
    lm = _load(args)
    vec.check_model(lm)
    layers = parse_layers(args.layer, lm.n_layers) if args.layer else None
    source = {"prompt_source": f"preset:{args.preset}" if args.preset else str(args.prompts),
              "vector_path": str(args.vector)}
    report = run_sweep(lm, vec, args.strengths, prompts, layers=layers, operator=args.operator,
                       random_baseline=args.random_baseline, max_new_tokens=args.max_new_tokens,
                       batch_rows=args.batch_rows, progress=True, source=source)
    path, html = write_report(report, out)
    print(f"{'strength':>9} {'refusal':>8} {'compliance':>10} {'kl':>7} {'ppl':>7} {'distinct2':>9}")
    for r in report["results"]:
        print(f"{r['strength']:>9.2f} {r['refusal_rate']:>8.2f} {r['compliance']:>10.2f} {r['kl']:>7.3f} "
              f"{r['perplexity']:>7.2f} {r['distinct2']:>9.2f}")
    for r in report.get("random_baseline_mean", []):
        print(f"  random {r['strength']:>9.2f} {r['refusal_rate']:>8.2f} {r['compliance']:>10.2f} {r['kl']:>7.3f} "
              f"{r['perplexity']:>7.2f} {r['distinct2']:>9.2f}")
    print(f"wrote {path} and {html}")
    return 0
