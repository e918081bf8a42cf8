"""``steering-lab sweep``: generate at several strengths and report behaviour and side effects."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import OPERATORS
from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    from ..datasets import PROMPT_SETS  # plain Python, no torch

    p = sub.add_parser("sweep", help="generate at several strengths and report behaviour and side effects",
                       description="Generate at several strengths (negative ones included) and report refusal, "
                                   "compliance, KL, perplexity and distinct-2 per strength, with a chart.")
    p.add_argument("--vector", required=True, help="a path, or the name of a shipped or saved vector")
    p.add_argument("--strengths", required=True, type=common.float_list,
                   help="comma-separated, e.g. -8,-4,0,4,8 or 0,10,20,30")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file: one per line, or jsonl with a 'prompt' field")
    src.add_argument("--preset", choices=list(PROMPT_SETS), help="bundled prompt set")
    p.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--layer", default=None, help="layer(s), e.g. 12 or 10-14 (default: the vector's recommended layer)")
    p.add_argument("--operator", default="add", choices=OPERATORS, help="how the vector acts (default: add)")
    p.add_argument("--random-baseline", type=common.nonnegative_int, default=0, metavar="K",
                   help="also sweep K random directions of the same norm (the control)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=48)
    p.add_argument("--batch-rows", type=common.positive_int, default=None,
                   help="rows per batch (default: as many as ~2 GiB allows)")
    p.add_argument("--instruction", default=None,
                   help="also sweep with this system prompt: the prompting baseline (prompted, prompted + steered)")
    common.model_args(p)
    p.add_argument("--out", required=True, help="report path (report.json; the chart goes to report.html)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import load_prompts
    from ..extract import parse_layers
    from ..sweep import run_sweep, write_report

    check(len(set(args.strengths)) == len(args.strengths), "--strengths must not repeat")
    out = Path(args.out)
    check(out.name not in ("", ".json"), "--out needs a file name")
    vector = common.artifact("vectors", args.vector)
    vec = common.load_vector(vector)
    prompts = load_prompts(args.preset, None) if args.preset else load_prompts(None, args.prompts)
    prompts = prompts[: args.limit] if args.limit else prompts
    lm = common.load_model_from_args(args)
    vec.check_model(lm)
    layers = parse_layers(args.layer, lm.n_layers) if args.layer else None
    source = {"prompt_source": f"preset:{args.preset}" if args.preset else str(args.prompts),
              "vector_path": str(vector)}
    effect, label = common.effect_scorer(lm, vec)
    report = run_sweep(lm, vec, args.strengths, prompts, layers=layers, operator=args.operator,
                       random_baseline=args.random_baseline, max_new_tokens=args.max_new_tokens,
                       batch_rows=args.batch_rows, progress=True, source=source, effect=effect, effect_label=label,
                       instruction=args.instruction)
    path, html = write_report(report, out)
    if label:
        print(f"effect = {label} (the vector's own measure; higher = more of its + direction)")

    def line(prefix: str, r: dict) -> str:
        eff = f"{r['effect']:>8.3f}" if "effect" in r else f"{'-':>8}"
        return (f"{prefix}{r['strength']:>9.2f} {eff} {r['refusal_rate']:>8.2f} {r['compliance']:>10.2f} "
                f"{r['kl']:>7.3f} {r['perplexity']:>7.2f} {r['distinct2']:>9.2f}")

    print(f"{'':9}{'strength':>9} {'effect':>8} {'refusal':>8} {'compliance':>10} {'kl':>7} {'ppl':>7} "
          f"{'distinct2':>9}")
    for r in report["results"]:
        print(line(" " * 9, r))
    for r in report.get("prompted", {}).get("results", []):
        print(line("prompted ", r))
    for r in report.get("random_baseline_mean", []):
        print(line("  random ", r))
    print(f"wrote {path} and {html}")
    return 0
