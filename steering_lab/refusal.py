"""The refusal direction (Arditi et al. 2024), directional ablation, weight orthogonalisation, and
a refusal-*style* response direction for models that rarely refuse.

Refusal direction: candidates ``mean(harmful) - mean(harmless)`` at every layer and each of the
last few post-instruction token positions (train split). Each is scored on the val split:

* ``bypass``  refusal score on harmful prompts with the direction ablated everywhere (lower = better)
* ``induce``  refusal score on harmless prompts with the direction added at its layer (must be > 0)
* ``kl``      KL of harmless next-token distributions under ablation (must stay < ``kl_max``)

Layers in the last 20% are skipped. The refusal score is ``log p(refusal) - log(1 - p(refusal))``
for the first answer token, ``p(refusal)`` summed over the first tokens of refusal phrases.

Directional ablation removes the direction from every module that writes to the residual stream
(embeddings, attention and MLP output projections): that is exactly what orthogonalising those
weights does, so ``orthogonalize`` returns a model whose plain outputs match the hooked one.

Refusal-style direction: the contrast of the model's activations over refusing vs complying
*responses* (mean over response tokens), with refusals written for this project and the model's
own compliant answers. It is not the model's refusal mechanism; it is the direction of "writing a
refusal", and adding it makes the model open with refusal phrases.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import pad_left
from .datasets import ContrastSet, instruction_split, refusal_responses
from .engine import forward_accepts
from .errors import UserError, check
from .intervene import Steer, capture, project_out, steer
from .metrics import distinct_n, is_refusal
from .model import LoadedModel, _get_attr_path
from .vector import SteeringVector

log = logging.getLogger(__name__)

REFUSAL_OPENINGS = ("I", "I'm", "Sorry", "As", "Unfortunately", "My apologies", "I cannot", "I can't")
ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attention.dense", "attn.out_proj")
MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2")
SANDWICH_NORMS = ("post_feedforward_layernorm", "post_attention_norm", "post_mlp_layernorm")


# ---- where the residual stream is written -------------------------------------------------------

def _child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    for name in names:
        try:
            return _get_attr_path(module, name)
        except AttributeError:
            continue
    return None


def residual_writers(lm: LoadedModel) -> tuple[list[nn.Module], list[nn.Module]] | None:
    """``(embeddings, output projections)`` writing to the residual stream, or None when the
    architecture normalises sub-layer outputs before adding them (Gemma 2/3), where ablating the
    projections is not the same as ablating the stream."""
    embeds = [lm.model.get_input_embeddings()]
    wpe = _child(lm.model, ("transformer.wpe",))
    if wpe is not None:
        embeds.append(wpe)
    writers = []
    for block in lm.layers:
        if any(hasattr(block, n) for n in SANDWICH_NORMS):
            return None
        attn, mlp = _child(block, ATTN_OUT), _child(block, MLP_OUT)
        if attn is None or mlp is None:
            return None
        writers += [attn, mlp]
    return embeds, writers


@contextmanager
def ablated(lm: LoadedModel, direction: torch.Tensor) -> Iterator[None]:
    """Directional ablation everywhere in the residual stream, for the duration of the block.

    Exact (every writer) where the architecture allows; else at every block output and the
    embeddings, which is the same stream at block boundaries.
    """
    found = residual_writers(lm)
    if found is not None:
        modules = found[0] + found[1]
    else:
        modules = [lm.model.get_input_embeddings(), *lm.layers]
    with project_out(modules, direction):
        yield


def _orth_weight(module: nn.Module, unit: torch.Tensor) -> None:
    """Remove ``unit`` from everything ``module`` writes (weights and bias), in place."""
    w = module.weight
    u = unit.to(w.device, torch.float32)
    with torch.no_grad():
        w32 = w.float()
        if isinstance(module, nn.Embedding):  # [vocab, d]
            w32 -= (w32 @ u)[:, None] * u[None, :]
        elif type(module).__name__ == "Conv1D":  # GPT-2: y = x W + b, W [in, d]
            w32 -= (w32 @ u)[:, None] * u[None, :]
        else:  # nn.Linear: y = W x + b, W [d, in]
            w32 -= u[:, None] * (u @ w32)[None, :]
        w.copy_(w32.to(w.dtype))
        b = getattr(module, "bias", None)
        if b is not None:
            b32 = b.float()
            b.copy_((b32 - (b32 @ u) * u).to(b.dtype))


def orthogonalize(lm: LoadedModel, direction: torch.Tensor) -> LoadedModel:
    """A copy of the model whose weights cannot write ``direction`` into the residual stream.

    Tied input/output embeddings are untied first (the output head keeps the original weights).
    """
    found = residual_writers(lm)
    if found is None:
        raise UserError(f"weight orthogonalisation is not supported for {type(lm.model).__name__}: its "
                        "sub-layer outputs are normalised before they reach the residual stream")
    check(direction.shape == (lm.d_model,), f"direction must have shape [{lm.d_model}]")
    unit = direction.detach().float() / direction.detach().float().norm()
    model = copy.deepcopy(lm.model)
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        out_emb.weight = nn.Parameter(in_emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        if text is not None and text is not model.config:
            text.tie_word_embeddings = False
    copy_lm = LoadedModel.wrap(model, lm.tokenizer, name=f"{lm.name}-orthogonalized", layers_path=lm.layers_path)
    embeds, writers = residual_writers(copy_lm)
    for m in embeds + writers:
        _orth_weight(m, unit)
    return copy_lm


def save_orthogonalized(lm: LoadedModel, direction: torch.Tensor, out_dir: str | Path) -> Path:
    """Write the orthogonalised copy as a ``from_pretrained``-loadable directory (safetensors)."""
    out = Path(out_dir).expanduser()
    check(not out.exists() or (out.is_dir() and not any(out.iterdir())),
          f"{out} exists and is not empty; choose a new directory")
    ortho = orthogonalize(lm, direction)
    tmp = out.with_name(f".{out.name}.tmp")
    ortho.model.save_pretrained(tmp)
    ortho.tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


# ---- refusal score ------------------------------------------------------------------------------

def refusal_token_ids(lm: LoadedModel) -> list[int]:
    ids = set()
    for phrase in REFUSAL_OPENINGS:
        toks = lm.encode(phrase, special=False)
        if toks:
            ids.add(toks[0])
    return sorted(ids)


def _last_logits(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]],
                 batch_size: int = 48) -> torch.Tensor:
    """Next-token logits after each prompt (text, or already encoded ids), float32 on the CPU."""
    seqs_all = [lm.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
    kwargs = {"logits_to_keep": 1} if forward_accepts(lm.model, "logits_to_keep") else {}
    out = []
    for i in range(0, len(seqs_all), batch_size):
        ids, mask, pos = pad_left(seqs_all[i:i + batch_size], lm.pad_id, lm.device)
        with torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def refusal_score(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``log p - log(1 - p)`` with ``p`` the probability of starting a refusal, per row."""
    logp = torch.log_softmax(logits.float(), -1)
    lp = torch.logsumexp(logp[:, list(token_ids)], -1)
    return lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-7))


# ---- candidate directions -----------------------------------------------------------------------

def post_instruction_length(lm: LoadedModel, cap: int = 5) -> int:
    """How many template tokens follow the user's instruction (at most ``cap``, at least 1)."""
    marker = "Qz7 marker"
    text = lm.chat_prompt(marker)
    if marker not in text:
        return 1
    suffix = text[text.index(marker) + len(marker):]
    n = len(lm.encode(suffix, special=False)) if suffix else 0
    return max(1, min(cap, n))


def candidate_means(lm: LoadedModel, prompts: Sequence[str], n_pos: int, batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """Mean block output over ``prompts`` at the last ``n_pos`` positions: ``[n_pos, n_layers, d]``."""
    total = torch.zeros((n_pos, lm.n_layers, lm.d_model), dtype=torch.float64)
    seqs_all = [lm.encode_prompt(p) for p in prompts]
    for i in tqdm(range(0, len(seqs_all), batch_size), disable=not progress, desc="candidates", leave=False):
        seqs = seqs_all[i:i + batch_size]
        check(min(len(s) for s in seqs) >= n_pos, "prompts are shorter than the post-instruction window")
        ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)

        def keep(k: int, h: torch.Tensor) -> torch.Tensor:
            total[:, k] += h[:, -n_pos:].double().sum(0).cpu()
            return h[:0]

        with torch.inference_mode(), capture(lm, fn=keep) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return (total / len(prompts)).float()


@dataclass
class Candidate:
    position: int  # negative index from the end of the prompt (-1 = last template token)
    layer: int
    norm: float
    bypass: float = math.nan
    induce: float = math.nan
    kl: float = math.nan
    kept: bool = False
    reason: str = ""


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def select_refusal_direction(lm: LoadedModel, *, harmful_train: Sequence[str] | None = None,
                             harmless_train: Sequence[str] | None = None, harmful_val: Sequence[str] | None = None,
                             harmless_val: Sequence[str] | None = None, val_size: int = 16,
                             max_layer_frac: float = 0.8, kl_max: float = 0.1, n_positions: int | None = None,
                             batch_size: int = 16, progress: bool = False) -> tuple[SteeringVector, list[Candidate]]:
    """Arditi et al.'s selection over layers x post-instruction positions; returns the vector and
    the whole candidate table (best first). Defaults: the bundled train split for the candidates,
    ``val_size`` prompts of each val split for scoring (three forward passes per candidate)."""
    if harmful_train is None or harmless_train is None:
        harmful_train, harmless_train = instruction_split("train")
    if harmful_val is None or harmless_val is None:
        harmful_val, harmless_val = (s[:val_size] for s in instruction_split("val"))
    for name, s in (("harmful_train", harmful_train), ("harmless_train", harmless_train),
                    ("harmful_val", harmful_val), ("harmless_val", harmless_val)):
        check(len(s) > 0, f"{name} is empty")
    n_pos = n_positions or post_instruction_length(lm)
    mh = candidate_means(lm, harmful_train, n_pos, batch_size, progress)
    ml = candidate_means(lm, harmless_train, n_pos, batch_size, progress)
    diffs = mh - ml  # [n_pos, L, d]
    top = max(1, int(max_layer_frac * lm.n_layers))
    ref_ids = refusal_token_ids(lm)
    val_ids = [lm.encode_prompt(p) for p in list(harmful_val) + list(harmless_val)]
    n_h = len(harmful_val)
    base = _last_logits(lm, val_ids)
    base_harmful, base_harmless = base[:n_h], base[n_h:]
    base_score = float(refusal_score(base_harmless, ref_ids).mean())
    cands = []
    grid = [(p, k) for p in range(n_pos) for k in range(top)]
    for p, k in tqdm(grid, disable=not progress, desc="scoring candidates", leave=False):
        d = diffs[p, k]
        c = Candidate(position=p - n_pos, layer=k, norm=float(d.norm()))
        if c.norm == 0:
            c.reason = "zero direction"
            cands.append(c)
            continue
        with ablated(lm, d):
            abl = _last_logits(lm, val_ids)
        with steer(lm, Steer(d, 1.0, layers=[k])):
            add_harmless = _last_logits(lm, val_ids[n_h:])
        c.bypass = float(refusal_score(abl[:n_h], ref_ids).mean())
        c.induce = float(refusal_score(add_harmless, ref_ids).mean()) - base_score
        c.kl = _kl_rows(abl[n_h:], base_harmless)
        if c.kl >= kl_max:
            c.reason = f"kl {c.kl:.3f} >= {kl_max}"
        elif c.induce <= 0:
            c.reason = "adding it does not raise refusal"
        else:
            c.kept = True
        cands.append(c)
    best = choose_candidate(cands)
    r = diffs[best.position + n_pos, best.layer]
    unit = r / r.norm()
    vec = SteeringVector(
        directions={k: unit.clone() for k in range(lm.n_layers)}, model=lm.name, d_model=lm.d_model,
        n_layers=lm.n_layers, method="refusal_direction", dataset="harmful-vs-harmless instructions",
        recommended_layer=best.layer, recommended_strength=float(f"{best.norm:.4g}"), normalized=True,
        description=("refusal direction (Arditi et al.): ablate at all layers to bypass refusal, add at the "
                     "recommended layer to induce it; the same unit direction is stored at every layer"),
        extra={"position": best.position,
               "baseline_refusal_score_harmful": float(refusal_score(base_harmful, ref_ids).mean()),
               "baseline_refusal_score_harmless": base_score, "kl_max": kl_max, "max_layer_frac": max_layer_frac,
               "candidates": [asdict(c) for c in cands]},
    )
    return vec, cands


def choose_candidate(cands: list[Candidate]) -> Candidate:
    """The kept candidate with the lowest bypass score (falls back to all scored ones, with a
    warning, when none passed the filters). Sorts ``cands`` best first, in place."""
    kept = [c for c in cands if c.kept]
    if not kept:
        log.warning("no candidate passed the filters; taking the lowest bypass score among all")
        kept = [c for c in cands if not math.isnan(c.bypass)]
    check(bool(kept), "no usable candidate direction (are harmful and harmless prompts identical?)")
    best = min(kept, key=lambda c: c.bypass)
    cands.sort(key=lambda c: (not c.kept, c.bypass if not math.isnan(c.bypass) else math.inf))
    return best


def candidate_table(cands: Sequence[Candidate], limit: int = 15) -> str:
    lines = [f"{'pos':>4} {'layer':>5} {'bypass':>8} {'induce':>8} {'kl':>7} {'|r|':>7}  note"]
    for c in list(cands)[:limit]:
        lines.append(f"{c.position:>4} {c.layer:>5} {c.bypass:>8.3f} {c.induce:>8.3f} {c.kl:>7.4f} "
                     f"{c.norm:>7.2f}  {'kept' if c.kept else c.reason}")
    if len(cands) > limit:
        lines.append(f"... {len(cands) - limit} more candidates in the json")
    return "\n".join(lines)


# ---- refusal-style response direction ----------------------------------------------------------

def style_contrast(lm: LoadedModel, prompts: Sequence[str] | None = None, *, max_new_tokens: int = 48,
                   batch_size: int = 32, progress: bool = False) -> ContrastSet:
    """Refusing (written) vs complying (the model's own greedy answers) responses to the same prompts."""
    from .generate import generate

    if prompts is None:
        harmful, harmless = instruction_split("train")
        prompts = [p for pair in zip(harmful, harmless) for p in pair]
    refusals = refusal_responses()
    answers: list[str] = []
    chunks = range(0, len(prompts), batch_size)
    for i in tqdm(chunks, disable=not progress, desc="own answers", leave=False):
        answers += generate(lm, list(prompts[i:i + batch_size]), max_new_tokens=max_new_tokens)
    keep = [i for i, a in enumerate(answers) if a.strip() and not is_refusal(a)]
    check(len(keep) >= 2, f"only {len(keep)} of {len(answers)} answers comply (non-empty, no refusal phrase); "
                          "the style contrast needs complying answers")
    return ContrastSet(
        name="refusal-style", prompts=[prompts[i] for i in keep],
        positive=[refusals[j % len(refusals)] for j in range(len(keep))],
        negative=[answers[i] for i in keep],
        description="refusing vs complying responses (+ = refusal style)", labels=("refusal", "compliance"))


def calibrate(lm: LoadedModel, vec: SteeringVector, prompts: Sequence[str], layers: Sequence[int],
              fractions: Sequence[float], *, target: float = 0.9, min_distinct2: float = 0.5,
              max_new_tokens: int = 16, progress: bool = False) -> tuple[int, float, list[dict]]:
    """Pick (layer, strength) by behaviour: the smallest fraction of |h| at which some layer makes
    >= ``target`` of ``prompts`` open with a refusal phrase with mean distinct-2 >= ``min_distinct2``
    (ties: higher rate, then higher distinct-2). Returns (layer, strength, table)."""
    from .generate import sweep_generate

    norms = {r["layer"]: r["token_norm"] for r in vec.extra.get("layer_scan", {}).get("rows", [])}
    table = []
    for layer in tqdm(layers, disable=not progress, desc="calibrating", leave=False):
        check(layer in norms, f"no token norm for layer {layer} in the vector's layer scan")
        strengths = [float(f"{f * norms[layer]:.4g}") for f in fractions]
        texts = sweep_generate(lm, prompts, vec, strengths, layers=[layer], max_new_tokens=max_new_tokens)
        for f, s in zip(fractions, strengths):
            rate = sum(is_refusal(t, opening=True) for t in texts[s]) / len(prompts)
            d2 = sum(distinct_n(t) for t in texts[s]) / len(prompts)
            table.append({"layer": layer, "fraction": f, "strength": s, "refusal_rate": rate, "distinct2": d2})
    ok = [r for r in table if r["refusal_rate"] >= target and r["distinct2"] >= min_distinct2]
    if ok:
        best = min(ok, key=lambda r: (r["fraction"], -r["refusal_rate"], -r["distinct2"]))
    else:
        log.warning("no layer/strength reached a %.0f%% refusal rate; using the best one", 100 * target)
        best = max(table, key=lambda r: (r["refusal_rate"], r["distinct2"]))
    return best["layer"], best["strength"], table


def style_direction(lm: LoadedModel, *, progress: bool = False, calibrate_on: Sequence[str] | None = None,
                    fractions: Sequence[float] = (0.15, 0.2, 0.25, 0.3, 0.4),
                    layer_window: tuple[float, float] = (0.2, 0.6)) -> SteeringVector:
    """Extract the refusal-style direction (response mean) at every layer, then choose the layer
    and strength by behaviour on the harmless val split (or ``calibrate_on``; [] skips it)."""
    from .extract import extract

    contrast = style_contrast(lm, progress=progress)
    vec, _ = extract(lm, contrast, "mean_diff", position="response_mean", progress=progress,
                     description="refusal-style: refusing vs complying responses (mean over response tokens); "
                                 "adding it makes answers open with refusal phrases. It is not the model's own "
                                 "refusal mechanism (see the refusal direction for that).")
    vec.method = "mean_diff"
    vec.extra["kind"] = "refusal-style response direction"
    prompts = instruction_split("val")[1] if calibrate_on is None else list(calibrate_on)
    if prompts:
        lo, hi = int(layer_window[0] * lm.n_layers), int(layer_window[1] * lm.n_layers)
        layers = list(range(lo, max(hi, lo + 1), 2 if hi - lo > 6 else 1))
        layer, strength, table = calibrate(lm, vec, prompts, layers, fractions, progress=progress)
        vec.recommended_layer, vec.recommended_strength = layer, strength
        vec.extra["calibration"] = {"prompts": "harmless val split" if calibrate_on is None else "user prompts",
                                    "criterion": "smallest fraction of |h| with >= 90% refusal openings and "
                                                 "distinct-2 >= 0.5", "table": table}
    return vec
