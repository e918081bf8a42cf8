"""Function vectors (Todd et al., "Function Vectors in Large Language Models", ICLR 2024, arXiv 2310.15213).

A task is a list of ``(input, output)`` pairs ("hot" -> "cold"). An N-shot in-context prompt is
``"hot: cold\\nbig: small\\n...\\nfast:"`` and its answer is the first token of ``" slow"``.

1. Mean output of every attention head at the last token over clean ICL prompts (``mean_head_activations``).
2. Causal mediation (``indirect_effects``): on ICL prompts whose demonstration labels are shuffled,
   patch one head's mean output in at the last token and measure the rise in the probability of the
   correct answer token; averaged over prompts this is the head's average indirect effect (AIE).
3. The function vector is the SUM of the top heads' mean outputs mapped into the residual stream by
   their slice of ``W_O`` (``head_contributions``); it is added (operator ``add``) to the output of one
   block of zero-shot prompts (``"fast:"``), by default at the last token only, as in the paper.
   Layer and strength are chosen on a validation split (``sweep``); ``evaluate`` reads first-token
   accuracy on held-out pairs.

Splits (``split_task``, seeded): ``train`` pairs build every extraction prompt (demonstrations and
queries); ``valid`` pairs choose layer and strength; ``test`` pairs are for evaluation only. The three
never share an input. Few-shot baselines take their demonstrations from ``train``.

Speed: a patch at the last token changes nothing at earlier positions, so each prompt's prefix is run
once into a KV cache and every patched run re-runs only the last token, with one batch row per head
(row 0 of each group unpatched: the baseline of the same batch).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..activations import pad_left
from ..errors import check
from ..intervene import Steer, head_output_weight, head_shape, heads, steer
from ..model import LoadedModel
from ..vector import SteeringVector
from .fv_tasks import (  # noqa: F401 - the task API is part of this module's
    SPLITS,
    TASK_DIR,
    Pair,
    Prompt,
    Splits,
    Task,
    answer_token,
    build_prompts,
    icl_text,
    load_task,
    read_pairs,
    split_task,
    task_names,
    token_problems,
)

log = logging.getLogger(__name__)

SCOPES = ("last", "all")
SELECT_ON = ("zero_shot", "shuffled")  # validation prompts the layer and strength are chosen on
Progress = Callable[[float, str], None]


# ---- the last-token runner -------------------------------------------------------------
def _encode(lm: LoadedModel, prompts: Sequence[Prompt]) -> list[list[int]]:
    seqs = [lm.encode(p.text, special=True) for p in prompts]
    check(all(len(s) >= 2 for s in seqs), "every prompt needs at least two tokens")
    return seqs


class _LastToken:
    """A batch of prompts whose prefixes (all but the last token) sit in a KV cache; ``run`` re-runs the
    last token only, each prompt repeated ``repeat`` times in a row (rows ``i * repeat + g``)."""

    def __init__(self, lm: LoadedModel, seqs: list[list[int]]) -> None:
        from transformers import DynamicCache

        self.lm = lm
        ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)
        self.ids, self.mask, self.pos = ids, mask, pos
        try:
            cache = DynamicCache(config=lm.model.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        with torch.inference_mode():
            lm.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                     use_cache=True, **{lm.cache_kwarg: cache})
        self.cache = cache

    def run(self, repeat: int = 1, edit: dict[int, Callable] | None = None,
            read: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``(log-probs [B * repeat, vocab] at the last token, {layer: head outputs [B * repeat, H, D]})``."""
        cache = copy.deepcopy(self.cache)
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(repeat, 0) if repeat > 1 else t

        with torch.inference_mode(), heads(self.lm, list(read or []), read=bool(read), edit=edit) as cap:
            out = self.lm.model(input_ids=rep(self.ids[:, -1:]), attention_mask=rep(self.mask),
                                position_ids=rep(self.pos[:, -1:]), use_cache=True, **{self.lm.cache_kwarg: cache})
        logp = out.logits[:, -1].float().log_softmax(-1)
        got = {k: cap.last(k)[:, -1].float() for k in (read or [])}
        return logp, got


def _batches(n: int, size: int) -> list[range]:
    check(size >= 1, "batch_size must be at least 1")
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _tick(progress: Progress | None, bar: Any, frac: float, text: str) -> None:
    if bar is not None:
        bar.update(1)
    if progress is not None:
        progress(frac, text)


# ---- measurements --------------------------------------------------------------------------
def last_token_heads(lm: LoadedModel, prompts: Sequence[Prompt], *, batch_size: int = 8,
                     progress: Progress | None = None, tqdm_bar: bool = False) -> torch.Tensor:
    """Every head's output at the last token of each prompt: [N, n_layers, n_heads, head_dim] float32."""
    check(len(prompts) > 0, "no prompts")
    seqs = _encode(lm, prompts)
    layers = list(range(lm.n_layers))
    n_heads, head_dim = head_shape(lm)
    out = torch.empty((len(seqs), lm.n_layers, n_heads, head_dim))
    batches = _batches(len(seqs), batch_size)
    with tqdm(total=len(batches), desc="head activations", disable=not tqdm_bar, leave=False) as bar:
        for i, rows in enumerate(batches):
            _, got = _LastToken(lm, [seqs[r] for r in rows]).run(read=layers)
            out[rows.start:rows.stop] = torch.stack([got[k].cpu() for k in layers], 1)
            _tick(progress, bar, (i + 1) / len(batches), "head activations")
    return out


def mean_head_activations(lm: LoadedModel, prompts: Sequence[Prompt], **kwargs: Any) -> torch.Tensor:
    """Mean head outputs at the last token over ``prompts``: [n_layers, n_heads, head_dim]."""
    return last_token_heads(lm, prompts, **kwargs).mean(0)


def answer_probs(lm: LoadedModel, prompts: Sequence[Prompt], *, batch_size: int = 8) -> torch.Tensor:
    """Probability of each prompt's answer token at the last position (no intervention): [N]."""
    seqs = _encode(lm, prompts)
    targets = torch.tensor([answer_token(lm, p.answer) for p in prompts])
    out = torch.empty(len(seqs))
    for rows in _batches(len(seqs), batch_size):
        logp, _ = _LastToken(lm, [seqs[r] for r in rows]).run()
        tgt = targets[rows.start:rows.stop, None].to(logp.device)
        out[rows.start:rows.stop] = logp.gather(1, tgt)[:, 0].exp().cpu()
    return out


def indirect_effects(lm: LoadedModel, prompts: Sequence[Prompt], patch: torch.Tensor, *,
                     layers: Sequence[int] | None = None, batch_size: int = 8, progress: Progress | None = None,
                     tqdm_bar: bool = False) -> torch.Tensor:
    """Average indirect effect of every head: [n_layers, n_heads] (layers not measured stay 0).

    ``AIE[k, h]`` = mean over ``prompts`` of P(answer | head (k, h) at the last token set to ``patch``)
    minus P(answer | no patch), both from the same batch. ``patch`` is [n_layers, n_heads, head_dim]
    (one mean activation) or [N, n_layers, n_heads, head_dim] (one per prompt).
    """
    check(len(prompts) > 0, "no prompts to measure indirect effects on")
    n_heads, head_dim = head_shape(lm)
    per_prompt = patch.dim() == 4
    want = (len(prompts), lm.n_layers, n_heads, head_dim) if per_prompt else (lm.n_layers, n_heads, head_dim)
    check(tuple(patch.shape) == want, f"patch has shape {tuple(patch.shape)}, expected {want}")
    layers = list(range(lm.n_layers)) if layers is None else sorted({int(k) for k in layers})
    check(all(0 <= k < lm.n_layers for k in layers), f"layers must lie in 0-{lm.n_layers - 1}")
    seqs = _encode(lm, prompts)
    targets = torch.tensor([answer_token(lm, p.answer) for p in prompts])
    total = torch.zeros((lm.n_layers, n_heads), dtype=torch.float64)
    batches = _batches(len(seqs), batch_size)
    steps, done = len(batches) * len(layers), 0
    group = n_heads + 1
    with tqdm(total=steps, desc="indirect effects", disable=not tqdm_bar, leave=False) as bar:
        for rows in batches:
            runner = _LastToken(lm, [seqs[r] for r in rows])
            b = len(rows)
            tgt = targets[rows.start:rows.stop].repeat_interleave(group)
            for k in layers:
                value = patch[rows.start:rows.stop, k] if per_prompt else patch[k].expand(b, n_heads, head_dim)

                def edit(z: torch.Tensor, value: torch.Tensor = value, b: int = b) -> torch.Tensor:
                    z = z.clone()
                    zz = z.view(b, group, z.shape[1], n_heads, head_dim)
                    v = value.to(device=z.device, dtype=z.dtype)
                    for h in range(n_heads):
                        zz[:, h + 1, -1, h] = v[:, h]
                    return z

                logp, _ = runner.run(repeat=group, edit={k: edit})
                p = logp.gather(1, tgt[:, None].to(logp.device))[:, 0].exp().double().cpu().view(b, group)
                total[k] += (p[:, 1:] - p[:, :1]).sum(0)
                done += 1
                _tick(progress, bar, done / steps, f"indirect effects (layer {k})")
    return (total / len(prompts)).float()


def default_top_heads(lm: LoadedModel) -> int:
    """How many heads make the vector: 10 for a model of 270 heads (SmolLM2-135M), growing as the square
    root of the head count (13 for GPT-J's 448; the paper used 10 there)."""
    n_heads, _ = head_shape(lm)
    return max(1, round(10 * math.sqrt(lm.n_layers * n_heads / 270)))


def top_heads(aie: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The ``n`` heads of largest AIE as ``(layer, head)``, largest first."""
    check(1 <= n <= aie.numel(), f"top heads must be between 1 and {aie.numel()}, got {n}")
    idx = aie.flatten().topk(n).indices.tolist()
    return [(i // aie.shape[1], i % aie.shape[1]) for i in idx]


def head_contributions(lm: LoadedModel, means: torch.Tensor, chosen: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each chosen head's mean output in the residual stream, ``z_h @ W_O[:, h*hd:(h+1)*hd].T``: [n, d_model]."""
    n_heads, head_dim = head_shape(lm)
    check(len(chosen) > 0, "no heads chosen")
    rows = []
    for k, h in chosen:
        check(0 <= k < lm.n_layers and 0 <= h < n_heads, f"no head ({k}, {h}) in {lm.n_layers} x {n_heads}")
        w = head_output_weight(lm, k).detach().float().cpu()[:, h * head_dim:(h + 1) * head_dim]
        rows.append(means[k, h].float().cpu() @ w.T)
    return torch.stack(rows)


# ---- evaluation ------------------------------------------------------------------------------
@dataclass
class EvalResult:
    accuracy: float
    n: int
    mean_prob: float
    predictions: list[tuple[str, str, str]] = field(default_factory=list)  # (query, answer, predicted token)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "mean_prob": self.mean_prob}


def _steers(vector: SteeringVector | None, layer: int | None, strength: float | None,
            scope: str) -> tuple[list[Steer], int | None]:
    if vector is None:
        return [], None
    layer = vector.recommended_layer if layer is None else layer
    check(layer is not None, "say which layer to add the vector at (the vector recommends none)")
    strength = (vector.recommended_strength if vector.recommended_strength is not None else 1.0) \
        if strength is None else strength
    check(scope in SCOPES, f"unknown scope {scope!r} (choose {', '.join(SCOPES)})")
    # a function vector lives in the residual stream and may be added at any layer; others only where they have one
    fv = vector.method == "function_vector" and layer not in vector.directions
    direction = vector[vector.layers[0]] if fv else vector[layer]
    return [Steer({layer: direction}, strength, operator="add", scope="generated" if scope == "last" else "all")], layer


def first_token_logits(lm: LoadedModel, texts: Sequence[str], vector: SteeringVector | None = None, *,
                       layer: int | None = None, strength: float | None = None, scope: str = "last",
                       batch_size: int = 32) -> torch.Tensor:
    """Next-token log-probs after each text [N, vocab] (one batched forward, left padded), optionally
    with ``vector`` added at ``layer`` (default: its recommended layer; a single-layer function vector
    is added at whatever layer is asked) at the last token (``scope="last"``) or everywhere (``"all"``)."""
    check(len(texts) > 0, "no prompts")
    seqs = [lm.encode(t, special=True) for t in texts]
    check(all(seqs), "empty prompt")
    items, _ = _steers(vector, layer, strength, scope)
    out = []
    for rows in _batches(len(seqs), batch_size):
        ids, mask, pos = pad_left([seqs[r] for r in rows], lm.pad_id, lm.device)
        # with scope "last": positions >= T - 1 are "generated", i.e. the last column of the left-padded batch
        with torch.inference_mode(), steer(lm, items, prompt_len=ids.shape[1] - 1):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        out.append(logits[:, -1].float().log_softmax(-1).cpu())
    return torch.cat(out)


def _score(lm: LoadedModel, prompts: Sequence[Prompt], logp: torch.Tensor) -> EvalResult:
    targets = torch.tensor([answer_token(lm, p.answer) for p in prompts])
    pred = logp.argmax(-1)
    ok = pred == targets
    probs = logp.gather(1, targets[:, None])[:, 0].exp()
    rows = [(p.query, p.answer, lm.tokenizer.decode([int(t)])) for p, t in zip(prompts, pred)]
    return EvalResult(float(ok.float().mean()), len(prompts), float(probs.mean()), rows)


def evaluate(lm: LoadedModel, task: str | Path | Task | Sequence[Pair], vector: SteeringVector | None = None, *,
             shots: int = 0, split: str = "test", layer: int | None = None, strength: float | None = None,
             scope: str = "last", seed: int = 0, shuffle_labels: bool = False, batch_size: int = 32) -> EvalResult:
    """First-token accuracy on the ``split`` pairs (each query once): zero-shot ``"x:"`` prompts, or
    ``shots``-shot prompts with demonstrations from ``train`` (their labels shuffled among them with
    ``shuffle_labels``: the paper's corrupted prompts); optionally with a function vector."""
    t = load_task(task)
    splits = split_task(t, seed)
    pairs = splits.get(split)
    check(len(pairs) > 0, f"split {split!r} of task {t.name!r} is empty")
    prompts = build_prompts(splits.train, 0, shots, seed=seed + 1, queries=pairs, shuffle_labels=shuffle_labels)
    logp = first_token_logits(lm, [p.text for p in prompts], vector, layer=layer, strength=strength, scope=scope,
                              batch_size=batch_size)
    return _score(lm, prompts, logp)


# ---- the function vector ---------------------------------------------------------------------
@dataclass
class HeadStats:
    """What extraction measured: mean head outputs on clean prompts, AIE on corrupted ones."""

    task: str
    means: torch.Tensor  # [n_layers, n_heads, head_dim]
    aie: torch.Tensor  # [n_layers, n_heads]
    shots: int
    seed: int
    n_clean: int
    n_corrupt: int
    corrupt_prob: float  # mean P(answer) on the corrupted prompts without a patch
    clean_prob: float = float("nan")


def head_stats(lm: LoadedModel, task: str | Path | Task | Sequence[Pair], *, shots: int = 10, n_clean: int = 32,
               n_corrupt: int = 16, seed: int = 0, batch_size: int = 8, progress: Progress | None = None,
               tqdm_bar: bool = False) -> HeadStats:
    """Mean head activations over ``n_clean`` clean ``shots``-shot prompts and the AIE matrix over
    ``n_corrupt`` label-shuffled ones, all built from the ``train`` split."""
    t = load_task(task)
    check(shots >= 2, "function vectors need at least 2-shot prompts (labels are shuffled among demonstrations)")
    train = split_task(t, seed).train
    check(len(train) >= shots + 1, f"task {t.name!r} has {len(train)} training pairs: too few for {shots}-shot "
                                   f"prompts (need {shots + 1}); ask for fewer shots")
    clean = build_prompts(train, n_clean, shots, seed=seed + 11)
    corrupt = build_prompts(train, n_corrupt, shots, seed=seed + 23, shuffle_labels=True)

    def part(lo: float, hi: float) -> Progress | None:
        return None if progress is None else (lambda f, text: progress(lo + (hi - lo) * f, text))

    means = mean_head_activations(lm, clean, batch_size=batch_size, progress=part(0, 0.2), tqdm_bar=tqdm_bar)
    aie = indirect_effects(lm, corrupt, means, batch_size=batch_size, progress=part(0.2, 1.0), tqdm_bar=tqdm_bar)
    base = answer_probs(lm, corrupt, batch_size=batch_size)
    clean_p = answer_probs(lm, clean, batch_size=batch_size)
    return HeadStats(t.name, means, aie, shots, seed, n_clean, n_corrupt, float(base.mean()), float(clean_p.mean()))


@dataclass
class Sweep:
    layers: dict[int, float]  # valid accuracy per layer at strength 1
    strengths: dict[float, float]  # valid accuracy per strength at the best layer
    layer: int
    strength: float
    accuracy: float


def sweep(lm: LoadedModel, task: Task, fv: torch.Tensor, *, layers: Sequence[int] | None = None,
          strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0), scope: str = "last", seed: int = 0,
          split: str = "valid", select_on: str = "zero_shot", shots: int = 10) -> Sweep:
    """Choose the layer (at strength 1) and then the strength by accuracy on ``split`` (ties: higher mean
    probability of the answer, then the earlier layer / the strength nearest 1), on zero-shot prompts
    (``select_on="zero_shot"``) or on ``shots``-shot prompts with shuffled labels (``"shuffled"``).
    Default layers: every second one."""
    check(select_on in SELECT_ON, f"unknown select_on {select_on!r} (choose {', '.join(SELECT_ON)})")
    kw = dict(shots=shots, shuffle_labels=True) if select_on == "shuffled" else {}
    layers = list(range(0, lm.n_layers, 2)) if layers is None else [int(k) for k in layers]
    check(len(layers) > 0 and all(0 <= k < lm.n_layers for k in layers), f"layers must lie in 0-{lm.n_layers - 1}")
    check(len(strengths) > 0, "no strengths to try")
    vec = SteeringVector({k: fv for k in layers})
    by_layer: dict[int, EvalResult] = {}
    for k in layers:
        by_layer[k] = evaluate(lm, task, vec, split=split, layer=k, strength=1.0, scope=scope, seed=seed, **kw)
    best = max(layers, key=lambda k: (by_layer[k].accuracy, by_layer[k].mean_prob, -k))
    by_strength: dict[float, EvalResult] = {}
    for s in strengths:
        by_strength[float(s)] = evaluate(lm, task, vec, split=split, layer=best, strength=float(s), scope=scope,
                                         seed=seed, **kw)
    s_best = max(by_strength, key=lambda s: (by_strength[s].accuracy, by_strength[s].mean_prob, -abs(s - 1)))
    return Sweep({k: r.accuracy for k, r in by_layer.items()}, {s: r.accuracy for s, r in by_strength.items()},
                 best, s_best, by_strength[s_best].accuracy)


def function_vector(lm: LoadedModel, task: str | Path | Task | Sequence[Pair], *, shots: int = 10,
                    n_heads: int | None = None, n_clean: int = 32, n_corrupt: int = 16, seed: int = 0,
                    layers: Sequence[int] | None = None, strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
                    scope: str = "last", select_on: str = "zero_shot", stats: HeadStats | None = None,
                    batch_size: int = 8,
                    progress: Progress | None = None, tqdm_bar: bool = False) -> SteeringVector:
    """The function vector of ``task``: the sum of the top ``n_heads`` heads' (by AIE) mean outputs through
    ``W_O``, stored at every layer of the sweep (the same vector: it lives in the residual stream), with
    the layer and strength chosen on the validation split (zero-shot prompts, or with ``select_on="shuffled"``
    ``shots``-shot prompts with shuffled labels). Pass ``stats`` to reuse a measurement."""
    t = load_task(task)
    check(scope in SCOPES, f"unknown scope {scope!r} (choose {', '.join(SCOPES)})")
    check(select_on in SELECT_ON, f"unknown select_on {select_on!r} (choose {', '.join(SELECT_ON)})")
    n_heads = default_top_heads(lm) if n_heads is None else int(n_heads)
    if stats is None:
        def part(f: float, text: str) -> None:
            if progress is not None:
                progress(0.85 * f, text)
        stats = head_stats(lm, t, shots=shots, n_clean=n_clean, n_corrupt=n_corrupt, seed=seed,
                           batch_size=batch_size, progress=part, tqdm_bar=tqdm_bar)
    check(stats.means.shape[0] == lm.n_layers, "head statistics were measured on another model")
    chosen = top_heads(stats.aie, n_heads)
    fv = head_contributions(lm, stats.means, chosen).sum(0)
    if progress is not None:
        progress(0.9, "choosing layer and strength on the validation split")
    sw = sweep(lm, t, fv, layers=layers, strengths=strengths, scope=scope, seed=seed, select_on=select_on,
               shots=stats.shots)
    if progress is not None:
        progress(1.0, "done")
    return SteeringVector(
        {k: fv.clone() for k in sw.layers}, model=lm.name, n_layers=lm.n_layers, method="function_vector",
        dataset=t.name, recommended_layer=sw.layer, recommended_strength=sw.strength,
        description=f"function vector of task {t.name!r}: sum of the top {n_heads} heads by AIE "
                    f"({stats.shots}-shot, {stats.n_corrupt} corrupted prompts); layer {sw.layer} and strength "
                    f"{sw.strength:g} chosen on the validation split ({select_on.replace('_', '-')} prompts)",
        extra={"heads": [list(h) for h in chosen], "head_aie": [round(float(stats.aie[k, h]), 6) for k, h in chosen],
               "shots": stats.shots, "seed": seed, "n_clean": stats.n_clean, "n_corrupt": stats.n_corrupt,
               "scope": scope, "selection_split": "valid", "selection_prompts": select_on,
               "valid_accuracy": sw.accuracy,
               "valid_accuracy_by_layer": {str(k): v for k, v in sw.layers.items()},
               "valid_accuracy_by_strength": {str(s): v for s, v in sw.strengths.items()},
               "split_fractions": [0.4, 0.2, 0.4]})
