"""``steering-lab fv``: function vectors (Todd et al., ICLR 2024): the tasks, the attention heads that
carry a task (average indirect effect table), a function vector saved as a steering vector, and
first-token accuracy on held-out pairs (zero-shot, few-shot, or zero-shot with a vector)."""

from __future__ import annotations

import argparse
import json

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fv", help="function vectors: task heads (AIE), extract a vector, evaluate on held-out pairs",
                       description="Function vectors (Todd et al., arXiv 2310.15213). A task is a shipped name "
                                   "(see the 'tasks' action) or a .jsonl file of {\"input\", \"output\"} pairs.")
    p.add_argument("action", choices=("tasks", "heads", "extract", "eval"),
                   help="tasks: list the shipped tasks; heads: the heads of largest average indirect effect; "
                        "extract: save the function vector at --out; eval: first-token accuracy on held-out pairs")
    p.add_argument("--task", help="task name or .jsonl path")
    p.add_argument("--shots", type=common.nonnegative_int, default=None,
                   help="heads/extract: demonstrations per ICL prompt (default 10); eval: few-shot prompts "
                        "(default 0 = zero-shot)")
    p.add_argument("--n-heads", type=common.positive_int, default=None,
                   help="heads summed into the vector (default: 10 for 270 heads, growing as sqrt of the count)")
    p.add_argument("--n-clean", type=common.positive_int, default=32, help="clean prompts for mean head outputs")
    p.add_argument("--n-corrupt", type=common.positive_int, default=16, help="label-shuffled prompts for the AIE")
    p.add_argument("--seed", type=common.nonnegative_int, default=0, help="splits and prompts (default 0)")
    p.add_argument("--scope", choices=("last", "all"), default="last",
                   help="add the vector at the last token (the paper) or at every position")
    p.add_argument("--select-on", choices=("zero_shot", "shuffled"), default="zero_shot",
                   help="extract: choose layer and strength on zero-shot validation prompts (default) or on "
                        "--shots-shot prompts with shuffled labels (where a small model's vector shows its effect)")
    p.add_argument("--shuffled", action="store_true",
                   help="eval: --shots-shot prompts with their labels shuffled (the paper's corrupted prompts)")
    p.add_argument("--out", help="extract: where to save the vector")
    p.add_argument("--vector", help="eval: a vector path or name to add to zero-shot prompts")
    p.add_argument("--layer", type=common.nonnegative_int, default=None, help="eval: layer (default: recommended)")
    p.add_argument("--strength", type=common.finite_float, default=None, help="eval: strength (default: recommended)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="eval: which pairs")
    p.add_argument("-k", type=common.positive_int, default=15, help="heads: rows to show (default 15)")
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    common.model_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=run)


def _show(rows: list[dict], as_json: bool) -> None:
    for r in rows:
        print(json.dumps(r, ensure_ascii=False) if as_json else "  ".join(f"{k}={v}" for k, v in r.items()))


def run(args: argparse.Namespace) -> int:
    from ..directions import function_vectors as fv

    if args.action == "tasks":
        _show([{"task": name, "pairs": len(fv.load_task(name).pairs)} for name in fv.task_names()], args.json)
        return 0
    check(bool(args.task), f"{args.action} needs --task (one of {', '.join(fv.task_names())}, or a .jsonl path)")
    task = fv.load_task(args.task)
    if args.action == "extract":
        check(bool(args.out), "extract needs --out PATH")
    vector = common.load_vector(args.vector) if args.action == "eval" and args.vector else None
    lm = common.load_model_from_args(args)
    if vector is not None:
        vector.check_model(lm)
    if args.action == "eval":
        check(not args.shuffled or (args.shots or 0) >= 2, "--shuffled needs --shots 2 or more")
        res = fv.evaluate(lm, task, vector, shots=args.shots or 0, split=args.split, layer=args.layer,
                          strength=args.strength, scope=args.scope, seed=args.seed, shuffle_labels=args.shuffled)
        row = {"task": task.name, "split": args.split, "shots": args.shots or 0, "shuffled": args.shuffled,
               **res.to_dict()}
        if vector is not None:
            row.update(vector=args.vector, layer=args.layer if args.layer is not None else vector.recommended_layer,
                       strength=args.strength if args.strength is not None else vector.recommended_strength)
        _show([row], args.json)
        return 0
    shots = 10 if args.shots is None else args.shots
    stats = fv.head_stats(lm, task, shots=shots, n_clean=args.n_clean, n_corrupt=args.n_corrupt, seed=args.seed,
                          batch_size=args.batch_size, tqdm_bar=True)
    if args.action == "heads":
        rows = [{"layer": k, "head": h, "aie": round(float(stats.aie[k, h]), 5)}
                for k, h in fv.top_heads(stats.aie, min(args.k, stats.aie.numel()))]
        if not args.json:
            print(f"task {task.name}: {shots}-shot, P(answer) clean {stats.clean_prob:.3f}, "
                  f"label-shuffled {stats.corrupt_prob:.3f}")
        _show(rows, args.json)
        return 0
    vec = fv.function_vector(lm, task, n_heads=args.n_heads, seed=args.seed, scope=args.scope, stats=stats,
                             select_on=args.select_on, batch_size=args.batch_size)
    path = vec.save(args.out)
    print(f"saved the function vector of {task.name} (heads {vec.extra['heads']}) -> {path}; layer "
          f"{vec.recommended_layer}, strength {vec.recommended_strength:g}, validation accuracy "
          f"{vec.extra['valid_accuracy']:.2f}")
    return 0
