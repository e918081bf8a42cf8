"""PPLM: plug-and-play language models (Dathathri et al., ICLR 2020, arXiv 1912.02164).

At every generated token PPLM takes a few gradient steps on a perturbation of the model's *past*
(the cached keys and values, as in the paper and its reference code ``uber-research/PPLM``) so
that the next-token distribution moves toward an attribute, then decodes from a fusion of the
perturbed and the unperturbed distribution. Slow (several forward and backward passes per token)
but needs nothing but a differentiable attribute model.

Attribute models (losses are summed when several are given):

* :class:`BagOfWords` - ``-log(sum of the next-token probabilities of the list's tokens)``. Word
  lists live in ``steering_lab/data/pplm/NAME.txt`` (written for this project). As in the paper's
  code, each word is encoded with a leading space and **only words that are a single token** are
  used; the others are reported in ``BagOfWords.skipped``.
* :class:`ProbeAttribute` - one of our linear probes (``probes.Probe``) read at its layer: the loss
  is ``-log P(wanted class)`` of the probe on the hidden state pooled like the probe was trained
  (``mean``/``max``: over the generated tokens so far, unperturbed, plus the current position,
  perturbed, plus ``horizon_length`` look-ahead positions fed the expected embedding of the next
  token, as the paper's discriminator; ``last``: the last of those positions). The hidden state is
  read through ``intervene.steer`` with an identity ``transform`` (the one hook site), so
  gradients flow back to the perturbation.

Perturbation (the paper's variant): a delta on the cached keys and values of every layer at the
last ``window_length`` positions (0 = all), accumulated over ``iterations`` normalised gradient
steps ``delta -= stepsize * g / (|g| + 1e-15) ** gamma`` (one norm per layer, keys and values
together; for a bag-of-words-only loss the norm is the running maximum over the generation, as in
the reference code), with ``kl_scale * KL(perturbed || unperturbed)`` added to the loss. The
perturbed past is kept for later tokens (perturbations persist, as in the paper). Decoding uses the
post-norm fusion ``p ~ p_pert ** gm_scale * p_unpert ** (1 - gm_scale)``, then top-k and either
greedy (``temperature`` 0, the default) or seeded sampling: deterministic for a seed. The paper's
``decay`` option is not implemented.

Why this is its own loop and not the decode engine's: the engine runs every forward pass under
``torch.inference_mode`` (no autograd graph), one forward per row per step on a shared, merged KV
cache; its per-step ``control`` callback only sees the logits after that forward and may change
strengths or rewind, and a ``transform`` operator runs inside the same inference-mode forward. PPLM
needs several forward *and backward* passes per token on a private, perturbed copy of the request's
KV cache plus a second, unperturbed cache, which none of those hooks can provide. This module is
the one PPLM loop; with all step sizes 0 it produces the engine's greedy tokens (tested).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, check
from ..intervene import Steer, steer
from ..model import LoadedModel
from ..probes import Probe

log = logging.getLogger(__name__)

SMALL = 1e-15  # the reference code's SMALL_CONST
BOW_DIR = Path(__file__).resolve().parents[1] / "data" / "pplm"
_LIST_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ---- attribute models ---------------------------------------------------------------------------

def bow_lists() -> list[str]:
    """Names of the bundled word lists (``data/pplm/NAME.txt``)."""
    return sorted(p.stem for p in BOW_DIR.glob("*.txt"))


def parse_words(text: str) -> list[str]:
    """Words of a list file: one per line, ``#`` comments and blank lines skipped, duplicates dropped."""
    out: dict[str, None] = {}
    for line in text.splitlines():
        w = line.strip()
        if w and not w.startswith("#"):
            out[w] = None
    return list(out)


def read_words(name: str) -> list[str]:
    """The words of the bundled list ``name``."""
    names = bow_lists()
    check(isinstance(name, str) and bool(_LIST_NAME.match(name)) and name in names,
          f"unknown word list {str(name)[:64]!r} (choose {', '.join(names)})")
    return parse_words((BOW_DIR / f"{name}.txt").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class BagOfWords:
    """A bag-of-words attribute: the single-token words of a list, as token ids."""

    name: str
    token_ids: torch.Tensor  # [n] long
    words: tuple[str, ...]    # words used (one token each)
    skipped: tuple[str, ...]  # words that are several tokens (not used, as in the paper's code)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """``-log(sum_w p(w))`` for next-token logits ``[1, V]``."""
        probs = torch.softmax(logits.float(), -1)
        return -torch.log(probs[..., self.token_ids.to(probs.device)].sum(-1) + SMALL).mean()


def bag_of_words(lm: LoadedModel, name: str | None = None, words: Sequence[str] | None = None) -> BagOfWords:
    """A bag of words from a bundled list ``name`` or from ``words``; only single-token words are kept."""
    check((name is None) != (words is None), "give a word list name or words, not both")
    if words is None:
        words = read_words(name)
        label = name
    else:
        words = [str(w).strip() for w in words if str(w).strip()]
        label = "custom"
    check(len(words) > 0, f"word list {label!r} is empty")
    kept, ids, skipped = [], [], []
    for w in words:
        toks = lm.tokenizer.encode(" " + w, add_special_tokens=False)
        if len(toks) == 1:
            if toks[0] not in ids:
                kept.append(w)
                ids.append(int(toks[0]))
        else:
            skipped.append(w)
    check(len(ids) > 0, f"no word of list {label!r} is a single token for {lm.name}; PPLM's bag of words uses "
                        "single-token words only")
    if skipped:
        log.info("word list %s: %d multi-token words not used", label, len(skipped))
    return BagOfWords(name=label, token_ids=torch.tensor(ids, dtype=torch.long), words=tuple(kept),
                      skipped=tuple(skipped))


@dataclass(frozen=True)
class ProbeAttribute:
    """A linear probe as PPLM's attribute model; ``target`` 1 wants the probe's first label."""

    probe: Probe
    target: int = 1
    name: str = ""

    def loss(self, pooled: torch.Tensor) -> torch.Tensor:
        """``-log P(target class)`` for a pooled hidden state ``[d]``."""
        z = self.probe.logit(pooled).reshape(())
        return -torch.nn.functional.logsigmoid(z if self.target == 1 else -z)

    def pool(self, hist: list[torch.Tensor], now: torch.Tensor, ahead: list[torch.Tensor]) -> torch.Tensor:
        seq = [*hist, now, *ahead]
        if self.probe.pooling == "last":
            return seq[-1]
        stacked = torch.stack([h.float() for h in seq])
        return stacked.mean(0) if self.probe.pooling == "mean" else stacked.amax(0)


def probe_attribute(lm: LoadedModel, probe: Probe | str, target: str | int = 1) -> ProbeAttribute:
    """``probe`` (a Probe, or a probe name/path) as an attribute model for ``lm``. ``target``: 1 / 0,
    or one of the probe's labels (the first label is class 1)."""
    from ..resources import resolve

    name = ""
    if not isinstance(probe, Probe):
        name = str(probe)
        check(name.strip() != "", "probe name is empty")
        probe = Probe.load(resolve("probes", name), label=name)
    probe.check_model(lm)
    if isinstance(target, str) and not target.isdigit():
        labels = [str(x).lower() for x in probe.labels]
        check(target.lower() in labels, f"target {target!r} is not a label of the probe ({', '.join(probe.labels)})")
        target = 1 if labels.index(target.lower()) == 0 else 0
    check(int(target) in (0, 1), f"target must be 1 (the probe's first label) or 0, got {target!r}")
    return ProbeAttribute(probe=probe, target=int(target), name=name or probe.description or "probe")


Attribute = BagOfWords | ProbeAttribute


# ---- settings and results -----------------------------------------------------------------------

@dataclass(frozen=True)
class PPLMConfig:
    """PPLM's knobs (defaults: the reference code's command-line defaults, greedy decoding)."""

    stepsize: float = 0.02
    iterations: int = 3
    kl_scale: float = 0.01
    gm_scale: float = 0.9
    window_length: int = 0  # 0 = perturb every past position
    gamma: float = 1.5
    horizon_length: int = 1  # look-ahead positions for probe attributes
    grad_length: int = 10000  # perturb only the first grad_length tokens
    top_k: int = 10  # 0 = no top-k filter
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    max_new_tokens: int = 30

    def validate(self) -> None:
        for key in ("stepsize", "kl_scale", "gm_scale", "gamma", "temperature"):
            v = getattr(self, key)
            check(isinstance(v, (int, float)) and math.isfinite(v), f"{key} must be a finite number, got {v!r}")
        check(self.stepsize >= 0, f"stepsize must be 0 or more, got {self.stepsize}")
        check(self.kl_scale >= 0, f"kl_scale must be 0 or more, got {self.kl_scale}")
        check(0 <= self.gm_scale <= 1, f"gm_scale must be in [0, 1], got {self.gm_scale}")
        check(self.gamma >= 0, f"gamma must be 0 or more, got {self.gamma}")
        check(self.temperature >= 0, f"temperature must be 0 or more, got {self.temperature}")
        for key in ("iterations", "window_length", "horizon_length", "grad_length", "top_k"):
            v = getattr(self, key)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{key} must be a whole number >= 0, "
                                                                             f"got {v!r}")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be at least 1")


@dataclass
class PPLMResult:
    """What :func:`generate` returns."""

    token_ids: list[int]
    text: str
    losses: list[list[float]] = field(default_factory=list)  # per token: attribute loss at each iteration, then
    #                                                           after the last update (empty when not perturbed)
    seconds: float = 0.0
    cancelled: bool = False
    dists: list[torch.Tensor] | None = None  # per token, the fused log-distribution decoded from (keep_dists)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


class _Recorder:
    """Identity transforms at the probe layers that keep the last position's block output (with grad)."""

    def __init__(self) -> None:
        self.last: dict[int, torch.Tensor] = {}

    def at(self, k: int):
        def transform(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            self.last[k] = h[0, -1]
            return h
        return transform


# ---- the loop -----------------------------------------------------------------------------------

Past = list[tuple[torch.Tensor, torch.Tensor]]


def _cache(lm: LoadedModel, past: Past):
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=past or None, config=lm.model.config)
    except TypeError:  # older transformers
        return DynamicCache(past or None)


def _past_len(past: Past) -> int:
    return int(past[0][0].shape[-2]) if past else 0


def _forward(lm: LoadedModel, past: Past, ids: list[int] | None = None,
             embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, Past]:
    """Feed ``ids`` (or ``embeds`` [1, n, d]) after ``past``: last-position logits [1, V] and the new past."""
    from ..engine import forward_accepts

    n_past = _past_len(past)
    n = len(ids) if ids is not None else embeds.shape[1]
    cache = _cache(lm, past)
    kwargs = {lm.cache_kwarg: cache, "use_cache": True,
              "attention_mask": torch.ones((1, n_past + n), dtype=torch.long, device=lm.device),
              "position_ids": torch.arange(n_past, n_past + n, device=lm.device)[None]}
    if forward_accepts(lm.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if ids is not None:
        out = lm.model(input_ids=torch.tensor([ids], dtype=torch.long, device=lm.device), **kwargs)
    else:
        out = lm.model(inputs_embeds=embeds, **kwargs)
    new = [(layer.keys, layer.values) for layer in cache.layers]
    return out.logits[:, -1].float().to(lm.device), new


def _expected_embedding(lm: LoadedModel, probs: torch.Tensor) -> torch.Tensor:
    emb = lm.model.get_input_embeddings()
    w = emb.weight
    e = probs.to(w.dtype) @ w[: probs.shape[-1]]
    scale = getattr(emb, "embed_scale", None)  # Gemma scales its embeddings inside the module
    if scale is not None:
        e = e * torch.as_tensor(scale, dtype=e.dtype, device=e.device)
    return e[:, None, :]


def _attribute_loss(lm: LoadedModel, attrs: Sequence[Attribute], logits: torch.Tensor, rec: _Recorder,
                    hist: dict[int, list[torch.Tensor]], clean_next: Past, horizon: int) -> torch.Tensor:
    """Summed attribute loss of the distribution ``logits`` (the hidden states of the forward that made
    them are in ``rec``); probe attributes look ``horizon`` positions ahead through ``clean_next``."""
    total = logits.new_zeros(())
    probes = [a for a in attrs if isinstance(a, ProbeAttribute)]
    for a in attrs:
        if isinstance(a, BagOfWords):
            total = total + a.loss(logits)
    if not probes:
        return total
    now = dict(rec.last)
    ahead: dict[int, list[torch.Tensor]] = {k: [] for k in now}
    if horizon > 0:
        e = _expected_embedding(lm, torch.softmax(logits, -1))
        past = clean_next
        for _ in range(horizon):  # the reference code feeds the same expected embedding each step
            _, past = _forward(lm, past, embeds=e)
            for k in ahead:
                ahead[k].append(rec.last[k])
    for a in probes:
        k = a.probe.layer
        total = total + a.loss(a.pool(hist[k], now[k], ahead[k]))
    return total


def _kl(logits: torch.Tensor, unpert_logits: torch.Tensor) -> torch.Tensor:
    """The reference code's ``KL(p_pert || p_unpert)`` with tiny probabilities lifted to 1e-15."""
    p = torch.softmax(logits, -1)
    q = torch.softmax(unpert_logits, -1)
    q = q + SMALL * (q <= SMALL).float()
    p = p + (SMALL * (p <= SMALL).float()).detach()
    return (p * (p / q).log()).sum()


def _window(length: int, window: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(length, device=device)
    if 0 < window < length:
        mask[: length - window] = 0
    return mask.view(1, 1, length, 1)


def fuse(pert_logits: torch.Tensor, unpert_logits: torch.Tensor, gm_scale: float) -> torch.Tensor:
    """Log of the post-norm fusion ``p_pert ** gm * p_unpert ** (1 - gm)``, renormalised."""
    lp = torch.log_softmax(pert_logits.float(), -1)
    if gm_scale >= 1 or torch.equal(pert_logits, unpert_logits):
        return lp
    lq = torch.log_softmax(unpert_logits.float(), -1)
    if gm_scale <= 0:
        return lq
    return torch.log_softmax(gm_scale * lp + (1 - gm_scale) * lq, -1)


def _choose(logp: torch.Tensor, cfg: PPLMConfig, generator: torch.Generator | None) -> int:
    if cfg.temperature <= 0:
        return int(logp.argmax(-1))
    scores = logp / cfg.temperature
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1).cpu()
    return int(torch.multinomial(probs.reshape(-1), 1, generator=generator))


def generate(lm: LoadedModel, prompt: str | None = None, attributes: Attribute | Sequence[Attribute] = (),
             config: PPLMConfig | None = None, *, prompt_ids: Sequence[int] | None = None, chat: bool = True,
             system: str | None = None, progress: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None, keep_dists: bool = False) -> PPLMResult:
    """Generate with PPLM (see the module docstring). ``progress(done, total)`` is called after each
    token; ``cancel()`` is checked before each forward pass and ends the loop (the result so far is
    returned with ``cancelled=True``). Model parameters are never changed and get no ``.grad``."""
    cfg = config or PPLMConfig()
    cfg.validate()
    attrs = [attributes] if isinstance(attributes, (BagOfWords, ProbeAttribute)) else list(attributes)
    for a in attrs:
        check(isinstance(a, (BagOfWords, ProbeAttribute)), f"not a PPLM attribute: {type(a).__name__}")
        if isinstance(a, ProbeAttribute):
            a.probe.check_model(lm)
    if prompt_ids is None:
        check(isinstance(prompt, str) and prompt.strip() != "", "prompt is empty")
        prompt_ids = lm.encode_prompt(prompt, system=system, chat=chat)
    ids = [int(t) for t in prompt_ids]
    check(len(ids) > 0, "prompt is empty")
    ids, _ = lm.fit_prompt(ids, cfg.max_new_tokens)
    perturbing = cfg.stepsize > 0 and cfg.iterations > 0 and bool(attrs)
    bow_only = all(isinstance(a, BagOfWords) for a in attrs)
    eos = set(lm.eos_ids)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
    rec = _Recorder()
    layers = sorted({a.probe.layer for a in attrs if isinstance(a, ProbeAttribute)})
    taps = [Steer(torch.zeros(lm.d_model), layers=[k], operator="transform", transform=rec.at(k)) for k in layers]
    hist: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    result = PPLMResult(token_ids=[], text="", dists=[] if keep_dists else None)
    stopped = cancel or (lambda: False)
    start = time.perf_counter()
    grad_norms: list[torch.Tensor] | None = None
    try:
        with steer(lm, taps) if taps else nullcontext():
            with torch.no_grad():
                clean = _forward(lm, [], ids[:-1])[1] if len(ids) > 1 else []
            pert, pert_is_clean = clean, True
            last = ids[-1]
            for t in range(cfg.max_new_tokens):
                if stopped():
                    result.cancelled = True
                    break
                with torch.no_grad():
                    unpert_logits, clean_next = _forward(lm, clean, [last])
                clean_now = {k: rec.last[k].detach() for k in layers}
                step_losses: list[float] = []
                delta = None
                if perturbing and t < cfg.grad_length and _past_len(pert) > 0:
                    delta, step_losses, grad_norms = _perturb(lm, attrs, cfg, pert, last, unpert_logits, rec, hist,
                                                              clean_next, grad_norms if bow_only else None, stopped)
                    if delta is None:
                        result.cancelled = True
                        break
                if delta is None and pert_is_clean:
                    pert_logits, pert_next = unpert_logits, clean_next  # the same forward pass: exact
                else:
                    with torch.no_grad():
                        past = pert if delta is None else [(k + dk, v + dv) for (k, v), (dk, dv) in zip(pert, delta)]
                        pert_logits, pert_next = _forward(lm, past, [last])
                        if delta is not None:
                            step_losses.append(float(_attribute_loss(lm, attrs, pert_logits, rec, hist, clean_next,
                                                                     cfg.horizon_length)))
                    pert_is_clean = False
                logp = fuse(pert_logits, unpert_logits, cfg.gm_scale)
                token = _choose(logp, cfg, generator)
                if keep_dists:
                    result.dists.append(logp[0].detach().cpu())
                result.losses.append(step_losses)
                result.token_ids.append(token)
                if t > 0:  # `last` was a generated token: its (unperturbed) hidden joins the pooled history
                    for k in layers:
                        hist[k].append(clean_now[k])
                clean, pert, last = clean_next, pert_next, token
                if progress is not None:
                    progress(t + 1, cfg.max_new_tokens)
                if token in eos:
                    break
    finally:
        result.seconds = time.perf_counter() - start
    result.text = lm.decode([t for t in result.token_ids if t not in eos])
    return result


def _perturb(lm: LoadedModel, attrs: Sequence[Attribute], cfg: PPLMConfig, pert: Past, last: int,
             unpert_logits: torch.Tensor, rec: _Recorder, hist: dict[int, list[torch.Tensor]], clean_next: Past,
             grad_norms: list[torch.Tensor] | None, stopped: Callable[[], bool]):
    """The gradient iterations of one token: ``(delta, losses, grad_norms)``; ``delta`` None if cancelled."""
    mask = _window(_past_len(pert), cfg.window_length, pert[0][0].device)
    acc = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in pert]
    losses: list[float] = []
    for _ in range(cfg.iterations):
        if stopped():
            return None, losses, grad_norms
        leaves = [(dk.detach().requires_grad_(True), dv.detach().requires_grad_(True)) for dk, dv in acc]
        with torch.enable_grad():
            logits, _ = _forward(lm, [(k + dk, v + dv) for (k, v), (dk, dv) in zip(pert, leaves)], [last])
            loss = _attribute_loss(lm, attrs, logits, rec, hist, clean_next, cfg.horizon_length)
            losses.append(float(loss.detach()))
            total = loss + cfg.kl_scale * _kl(logits, unpert_logits) if cfg.kl_scale > 0 else loss
            flat = [t for pair in leaves for t in pair]
            grads = torch.autograd.grad(total, flat, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g * mask.to(g.device, g.dtype) for x, g in zip(flat, grads)]
        pairs = [(grads[2 * i], grads[2 * i + 1]) for i in range(len(leaves))]
        norms = [torch.sqrt(gk.pow(2).sum() + gv.pow(2).sum()) + SMALL for gk, gv in pairs]
        if grad_norms is not None:
            norms = [torch.maximum(a, b) for a, b in zip(grad_norms, norms)]
        grad_norms = norms
        acc = [(dk.detach() - cfg.stepsize * gk / n ** cfg.gamma, dv.detach() - cfg.stepsize * gv / n ** cfg.gamma)
               for (dk, dv), (gk, gv), n in zip(leaves, pairs, norms)]
    return acc, losses, grad_norms


# ---- unperturbed and PPLM side by side ----------------------------------------------------------

@dataclass
class Comparison:
    prompt: str
    unsteered: str
    steered: PPLMResult
    perplexity: tuple[float, float]  # unsteered, PPLM (under the unsteered model)
    distinct2: tuple[float, float]


def compare(lm: LoadedModel, prompt: str, attributes: Attribute | Sequence[Attribute], config: PPLMConfig | None = None,
            *, chat: bool = True, system: str | None = None, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Comparison:
    """The engine's unsteered answer and the PPLM answer to ``prompt``, with perplexity (under the
    unsteered model) and distinct-2 of each."""
    from ..generate import generate as engine_generate
    from ..metrics import distinct_n, score_texts

    cfg = config or PPLMConfig()
    cfg.validate()
    check(isinstance(prompt, str) and prompt.strip() != "", "prompt is empty")
    attrs = [attributes] if isinstance(attributes, (BagOfWords, ProbeAttribute)) else list(attributes)
    check(len(attrs) > 0, "choose an attribute (a word list or a probe)")
    base = engine_generate(lm, prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                           chat=chat, system=system)[0]
    res = generate(lm, prompt, attrs, cfg, chat=chat, system=system, progress=progress, cancel=cancel)
    texts = [base, res.text]
    if res.text.strip():
        ppl = tuple(score_texts(lm, [prompt, prompt], texts, chat=chat, system=system).perplexity)
    else:
        ppl = (score_texts(lm, [prompt], [base], chat=chat, system=system).perplexity[0], float("nan"))
    return Comparison(prompt=prompt, unsteered=base, steered=res, perplexity=ppl,
                      distinct2=(distinct_n(base, 2), distinct_n(res.text, 2)))


__all__ = ["BagOfWords", "ProbeAttribute", "PPLMConfig", "PPLMResult", "Comparison", "bow_lists", "read_words",
           "parse_words", "bag_of_words", "probe_attribute", "generate", "compare", "fuse", "UserError"]
