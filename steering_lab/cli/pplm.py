"""``steering-lab pplm``: plug-and-play language models (Dathathri et al. 2020): the unperturbed
answer and the PPLM answer toward a bag of words and/or a linear probe, with a tqdm progress bar."""

from __future__ import annotations

import argparse
import json

from ..errors import check
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pplm", help="PPLM (slow): gradient steps on the KV cache toward a word list or a probe",
                       description="Plug-and-play LM steering (Dathathri et al. 2020, arXiv 1912.02164): at every "
                                   "token, a few gradient steps on the cached keys/values toward an attribute, with "
                                   "a KL term to the unsteered distribution and a fusion of the two. Several forward "
                                   "and backward passes per token: much slower than vector steering.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--bow", action="append", default=[],
                   help="bundled word list (positive, negative, science, ...); repeatable")
    p.add_argument("--words", default=None, help="a text file of your own words, one per line (single-token words "
                                                 "are used)")
    p.add_argument("--probe", default=None, help="probe name or path (a linear probe as the attribute model)")
    p.add_argument("--target", default="1", help="probe class to move toward: 1 (its first label), 0, or a label "
                                                 "name (default 1)")
    p.add_argument("--stepsize", type=common.finite_float, default=0.03, help="gradient step size (default 0.03)")
    p.add_argument("--iterations", type=common.nonnegative_int, default=3, help="gradient steps per token (3)")
    p.add_argument("--kl-scale", type=common.finite_float, default=0.01, help="weight of the KL term (0.01)")
    p.add_argument("--gm-scale", type=common.finite_float, default=0.9,
                   help="fusion: p_pert^gm * p_unpert^(1-gm) (0.9)")
    p.add_argument("--gamma", type=common.finite_float, default=1.5, help="gradient-norm exponent (1.5)")
    p.add_argument("--window", type=common.nonnegative_int, default=0,
                   help="perturb only the last N past positions (0 = all)")
    p.add_argument("--horizon", type=common.nonnegative_int, default=1, help="look-ahead positions for a probe (1)")
    p.add_argument("--top-k", type=common.nonnegative_int, default=10, help="top-k when sampling (10; 0 = off)")
    p.add_argument("--temperature", type=common.finite_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=common.positive_int, default=30)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-chat", action="store_true", help="raw prompt, no chat template")
    common.model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..control import pplm

    check(bool(args.bow or args.words or args.probe), "choose an attribute: --bow NAME, --words FILE or --probe NAME")
    config = pplm.PPLMConfig(stepsize=args.stepsize, iterations=args.iterations, kl_scale=args.kl_scale,
                             gm_scale=args.gm_scale, gamma=args.gamma, window_length=args.window,
                             horizon_length=args.horizon, top_k=args.top_k, temperature=args.temperature,
                             seed=args.seed, max_new_tokens=args.max_new_tokens)
    config.validate()
    words = None
    if args.words:
        try:
            with open(args.words, encoding="utf-8") as f:
                words = pplm.parse_words(f.read())
        except OSError as exc:
            check(False, f"cannot read --words {args.words}: {exc.strerror or exc}")
    lm = common.load_model_from_args(args)
    attrs = [pplm.bag_of_words(lm, name) for name in args.bow]
    if words is not None:
        attrs.append(pplm.bag_of_words(lm, words=words))
    if args.probe:
        attrs.append(pplm.probe_attribute(lm, args.probe, args.target))
    bar = tqdm(total=config.max_new_tokens, desc="pplm", unit="tok")

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        cmp = pplm.compare(lm, args.prompt, attrs, config, chat=not args.no_chat, system=args.system,
                           progress=progress)
    finally:
        bar.close()
    res = cmp.steered
    if args.json:
        print(json.dumps({"unsteered": cmp.unsteered, "pplm": res.text, "perplexity": list(cmp.perplexity),
                          "distinct2": list(cmp.distinct2), "tokens_per_s": res.tokens_per_s,
                          "attributes": [a.name for a in attrs]}, ensure_ascii=False))
        return 0
    for a in attrs:
        if isinstance(a, pplm.BagOfWords) and a.skipped:
            print(f"# word list {a.name}: {len(a.words)} single-token words used, {len(a.skipped)} multi-token "
                  "words skipped")
    print(f"unsteered: {cmp.unsteered}")
    print(f"PPLM:      {res.text}")
    print(f"# perplexity {cmp.perplexity[0]:.2f} -> {cmp.perplexity[1]:.2f}, distinct-2 {cmp.distinct2[0]:.2f} -> "
          f"{cmp.distinct2[1]:.2f}, {res.tokens_per_s:.2f} tok/s")
    return 0
