"""``steering-lab calibrate``: choose a vector's layer and strength by measured effect against
measured cost (KL, perplexity, distinct-2) on validation prompts, report it on test prompts, and
compare with asking for the behaviour in a system prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    from ..datasets import PROMPT_SETS  # plain Python, no torch

    p = sub.add_parser("calibrate", help="choose layer and strength by effect vs cost; compare with prompting",
                       description="Search layers x strengths on a validation half of the prompts for the largest "
                                   "effect that stays fluent (the vector's own effect measure: a probe, the refusal "
                                   "judge or a registered scorer), report it and the vector's constant rule on the "
                                   "test half, and the prompting baseline (the behaviour asked for in a system "
                                   "prompt) on the same scale.")
    p.add_argument("--vector", required=True, help="a path, or the name of a shipped or saved vector")
    p.add_argument("--direction", type=int, choices=(1, -1), default=1,
                   help="1: toward the vector's positive pole; -1: toward its negative pole")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompts file: one per line, or jsonl with a 'prompt' field")
    src.add_argument("--preset", choices=list(PROMPT_SETS), default="neutral",
                     help="bundled prompt set (default neutral)")
    p.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--layers", default=None, help="candidate layers, e.g. 4-20 or 6,9,12 (default: 10-70%% depth)")
    p.add_argument("--strengths", type=common.float_list, default=None,
                   help="candidate magnitudes, e.g. 5,10,20 (default: 0.25x-2x the recommended strength)")
    p.add_argument("--kl-budget", default=None,
                   help="largest mean KL allowed: a number, or 'constant' for what the vector's constant rule costs")
    p.add_argument("--instruction", default=None,
                   help="system prompt of the prompting baseline (default: from the vector's labels/description)")
    p.add_argument("--no-prompting", action="store_true", help="skip the prompting baseline")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the validation/test split of the prompts")
    common.model_args(p)
    p.add_argument("--out", required=True, help="report path (report.json; the Pareto chart goes to report.html)")
    p.add_argument("--save-vector", default=None,
                   help="save a copy of the vector with the calibration recorded and recommended")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import load_prompts
    from ..extract import parse_layers
    from ..measure.calibrate import calibrate, default_instruction, directed, prompting_rows, record, split_prompts
    from ..measure.effect import measure_of, scorer_for
    from ..ui.charts import pareto_figure
    from ..vector import atomic_write_bytes, atomic_write_json

    out = Path(args.out)
    check(out.name not in ("", ".json"), "--out needs a file name")
    vec = common.load_vector(args.vector)
    measure = measure_of(vec)
    check(measure is not None, "the vector has no effect measure (effect_measure in its json): extract it again "
                               "here, or add one (see steering_lab.measure.effect)")
    prompts = load_prompts(args.preset, None) if args.prompts is None else load_prompts(None, args.prompts)
    prompts = prompts[: args.limit] if args.limit else prompts
    check(len(prompts) >= 4, "calibration needs at least 4 prompts (half validation, half test)")
    val, test = split_prompts(prompts, args.seed)
    lm = common.load_model_from_args(args)
    vec.check_model(lm)
    scorer = scorer_for(lm, measure, common.ProbeLookup())
    layers = parse_layers(args.layers, lm.n_layers) if args.layers else None
    budget = args.kl_budget
    if budget is not None and budget != "constant":
        try:
            budget = common.finite_float(budget)
        except argparse.ArgumentTypeError:
            check(False, f"--kl-budget must be a number or 'constant', got {args.kl_budget!r}")
    cal = calibrate(lm, vec, val, scorer, layers=layers, strengths=args.strengths, direction=args.direction,
                    test_prompts=test, max_new_tokens=args.max_new_tokens, kl_budget=budget, progress=True)
    report = {"vector": args.vector, "model": lm.name, "effect_measure": measure.to_dict(),
              "prompt_source": f"preset:{args.preset}" if args.prompts is None else str(args.prompts),
              "split": {"seed": args.seed, "val": val, "test": test}, **cal.to_dict()}
    if not args.no_prompting:
        instruction = args.instruction or default_instruction(vec, args.direction)
        k = cal.chosen.layer if cal.chosen.layer is not None else vec.recommended_layer
        report["prompting"] = {"instruction": instruction, "on": "test", "rows": prompting_rows(
            lm, vec, test, directed(scorer, args.direction), instruction, layer=k, strength=cal.chosen.strength,
            max_new_tokens=args.max_new_tokens)}
    path = out if out.suffix == ".json" else out.with_suffix(".json")
    atomic_write_json(path, report)
    html = path.with_suffix(".html")
    atomic_write_bytes(html, pareto_figure(report).to_html(include_plotlyjs="cdn", full_html=True).encode())
    print(f"effect measure: {measure.label}; {len(val)} validation / {len(test)} test prompts")
    print(f"{'':>14} {'layer':>5} {'strength':>9} {'effect':>8} {'kl':>7} {'ppl':>7} {'distinct2':>9}")
    for name, p in (("calibrated", cal.chosen), ("constant rule", cal.constant), ("unsteered", cal.baseline)):
        print(f"{name:>14} {str(p.layer):>5} {p.strength:>9.2f} {p.effect:>8.3f} {p.kl:>7.3f} {p.perplexity:>7.2f} "
              f"{p.distinct2:>9.2f}   (validation)")
    for name in ("calibrated", "constant_rule", "unsteered"):
        p = cal.test.get(name, {})
        print(f"{name:>14} {str(p.get('layer')):>5} {p.get('strength', 0):>9.2f} {p.get('effect', 0):>8.3f} "
              f"{p.get('kl', 0):>7.3f} {p.get('perplexity', 0):>7.2f} {p.get('distinct2', 0):>9.2f}   (test)")
    for name, r in report.get("prompting", {}).get("rows", {}).items():
        print(f"{name:>20} effect {r['effect']:.3f}  kl {r['kl']:.3f}  ppl {r['perplexity']:.2f}  "
              f"distinct2 {r['distinct2']:.2f}   (test)")
    print(f"fluent strengths at layer {cal.chosen.layer}: {cal.fluent_range[0]:g} .. {cal.fluent_range[1]:g}")
    if args.save_vector:
        record(vec, cal)
        print(f"saved {vec.save(args.save_vector)}")
    print(f"wrote {path} and {html}")
    return 0
