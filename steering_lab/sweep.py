"""Strength sweeps with a side-effect report.

All (strength, prompt) rows are generated as per-row-strength batches (one batch where memory
allows) and scored with one teacher-forced pass per batch: refusal and compliance rates, mean
``KL(steered || unsteered)`` along the text, perplexity under the unsteered model, distinct-2.
``random_baseline=K`` repeats the sweep with K random directions of the same norm at the same
layers and strengths: the control that says whether *any* push this hard changes behaviour or
breaks the model (the "Rogue Scalpel" finding), or whether this direction is special.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import check
from .generate import sweep_generate
from .intervene import OPERATORS, Steer
from .metrics import distinct_n, is_refusal, nanmean, score_prompted, score_texts
from .model import LoadedModel
from .vector import SteeringVector, as_directions, atomic_write_bytes, atomic_write_json

RESULT_KEYS = ("strength", "refusal_rate", "compliance", "kl", "perplexity", "distinct2", "samples")


def rows_per_batch(lm: LoadedModel, prompt_tokens: int, new_tokens: int, budget_bytes: int = 2 << 30) -> int:
    """How many rows fit a memory budget: KV cache + one layer's activations + last logits."""
    cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or lm.d_model // max(getattr(cfg, "num_attention_heads", 1), 1)
    width = getattr(cfg, "intermediate_size", 4 * lm.d_model) or 4 * lm.d_model
    elem = torch.finfo(lm.dtype).bits // 8
    seq = prompt_tokens + new_tokens
    kv = 2 * lm.n_layers * heads * head_dim * seq * elem
    act = prompt_tokens * (width + 4 * lm.d_model) * elem
    logits = 2 * getattr(cfg, "vocab_size", 50000) * 4
    return max(1, int(budget_bytes // (kv + act + logits)))


def random_like(vector: SteeringVector, layers: Sequence[int], seed: int) -> SteeringVector:
    """A random direction with the same norm as ``vector`` at each of ``layers``."""
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for k in layers:
        v = vector[k].float()
        r = torch.randn(v.shape[0], generator=g)
        dirs[k] = r / r.norm() * v.norm()
    return SteeringVector(directions=dirs, model=vector.model, d_model=vector.d_model, n_layers=vector.n_layers,
                          method="random", description=f"random direction (seed {seed}), same norm as the vector")


def _metrics(lm: LoadedModel, prompts: Sequence[str], vector: SteeringVector, layers: list[int], operator: str,
             strengths: Sequence[float], texts: dict[float, list[str]], batch_rows: int,
             behaviour: dict[str, Callable[[str], float]], effect: Callable | None = None,
             system: str | None = None) -> list[dict]:
    rows = [(s, i) for s in strengths for i in range(len(prompts))]
    flat_prompts = [prompts[i] for _, i in rows]
    flat_texts = [texts[float(s)][i] for s, i in rows]
    steering = Steer(vector, [s for s, _ in rows], layers=layers, operator=operator)
    if system is None:
        scores = score_texts(lm, flat_prompts, flat_texts, steering, batch_size=max(1, min(batch_rows, 32)))
    else:  # cost against the plain model without the system prompt (metrics.score_prompted)
        scores = score_prompted(lm, flat_prompts, flat_texts, system, steering, batch_size=max(1, min(batch_rows, 32)))
    effects = effect(flat_prompts, flat_texts) if effect is not None else None
    out = []
    n = len(prompts)
    for j, s in enumerate(strengths):
        samples = texts[float(s)]
        refusal = sum(is_refusal(t, opening=True) for t in samples) / n
        res = {"strength": float(s), "refusal_rate": refusal, "compliance": 1.0 - refusal,
               "kl": nanmean(scores.kl[j * n:(j + 1) * n]), "perplexity": nanmean(scores.perplexity[j * n:(j + 1) * n]),
               "distinct2": sum(distinct_n(t) for t in samples) / n}
        if effects is not None:
            res["effect"] = nanmean(effects[j * n:(j + 1) * n])
        for name, fn in behaviour.items():
            res[name] = sum(fn(t) for t in samples) / n
        res["samples"] = list(samples)
        out.append(res)
    return out


def run_sweep(lm: LoadedModel, vector: SteeringVector, strengths: Sequence[float], prompts: Sequence[str], *,
              layers: Sequence[int] | None = None, operator: str = "add", random_baseline: int = 0,
              max_new_tokens: int = 48, batch_rows: int | None = None, progress: bool = False,
              behaviour: dict[str, Callable[[str], float]] | None = None, seed: int = 0,
              source: dict | None = None, effect: Callable | None = None, effect_label: str = "",
              instruction: str | None = None) -> dict:
    """Sweep ``strengths`` over ``prompts``; returns the report (see module docstring).

    ``effect(prompts, texts) -> scores``: the vector's own effect measure (``measure.effect``),
    reported as ``effect`` per strength and used as the chart's behaviour axis. ``instruction``:
    also sweep with that system prompt (the prompting baseline: its strength-0 row is "prompted",
    the others "prompted + steered"), its KL taken against the plain unprompted model."""
    check(len(strengths) > 0, "no strengths to sweep")
    check(all(math.isfinite(s) for s in strengths), "strengths must be finite numbers")
    check(len(set(strengths)) == len(strengths), "strengths must not repeat")
    check(len(prompts) > 0, "no prompts to sweep over")
    check(operator in OPERATORS, f"unknown operator {operator!r}")
    check(random_baseline >= 0, "random_baseline must be >= 0")
    check(operator != "transport" or random_baseline == 0,
          "random-direction baselines are additive vectors; sweep the transport operator with random_baseline=0")
    vector.check_model(lm)
    used = list(as_directions(vector, layers))
    vector.check_model(lm, used)
    behaviour = behaviour or {}
    if batch_rows is None:
        longest = max(len(lm.encode_prompt(p)) for p in prompts)
        batch_rows = rows_per_batch(lm, longest, max_new_tokens)
    runs = [("vector", vector)] + [(f"random-{k}", random_like(vector, used, seed + k)) for k in range(random_baseline)]
    report: dict = {
        "model": lm.name, "vector": vector.description or vector.method, "vector_model": vector.model,
        "layers": used, "operator": operator, "strengths": [float(s) for s in strengths],
        "max_new_tokens": max_new_tokens, "n_prompts": len(prompts), "prompts": list(prompts),
        "rows_per_batch": batch_rows, "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "refusal_detection": "refusal phrase in the first 120 characters (metrics.is_refusal, opening=True)",
        "kl": "mean KL(steered || unsteered) over the generated tokens",
        "perplexity": "perplexity of the generated text under the unsteered model",
    }
    if effect is not None:
        report["behaviour_key"] = "effect"
        report["effect_measure"] = effect_label or "the vector's effect measure"
    if source:
        report.update(source)
    for name, vec in tqdm(runs, desc="sweep", disable=not progress or len(runs) == 1):
        texts = sweep_generate(lm, prompts, vec, strengths, layers=used, operator=operator, batch_rows=batch_rows,
                               max_new_tokens=max_new_tokens, progress=progress)
        results = _metrics(lm, prompts, vec, used, operator, strengths, texts, batch_rows, behaviour, effect)
        if name == "vector":
            report["results"] = results
        else:
            report.setdefault("random_baseline", []).append({"seed": seed + int(name.split("-")[1]),
                                                             "results": results})
    if instruction:
        check(instruction.strip() != "", "the prompting baseline's instruction is empty")
        texts = sweep_generate(lm, prompts, vector, strengths, layers=used, operator=operator, batch_rows=batch_rows,
                               max_new_tokens=max_new_tokens, progress=progress, system=instruction)
        report["prompted"] = {"instruction": instruction,
                              "results": _metrics(lm, prompts, vector, used, operator, strengths, texts, batch_rows,
                                                  behaviour, effect, system=instruction)}
    if random_baseline:
        report["random_baseline_mean"] = [
            {key: nanmean(run["results"][j][key] for run in report["random_baseline"])
             for key in (*RESULT_KEYS, *(("effect",) if effect is not None else ())) if key not in ("samples",)}
            for j in range(len(strengths))]
    return report


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and the plotly chart ``report.html`` beside it (atomically)."""
    from .ui.charts import sweep_figure

    path = Path(out).expanduser()
    if path.suffix != ".json":
        path = path.with_suffix(".json")
    atomic_write_json(path, report)
    html = path.with_suffix(".html")
    atomic_write_bytes(html, sweep_figure(report).to_html(include_plotlyjs="cdn", full_html=True).encode())
    return path, html
