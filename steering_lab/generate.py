"""Steered generation: batched, streamed, greedy by default.

Our own decode loop (prefill + one token per step with a KV cache) rather than
``model.generate``: it streams token by token, stops cleanly when the consumer goes away
(the steering hooks are removed by the ``steer`` context on ``GeneratorExit``), and accepts
per-row strengths so a whole strength sweep - or baseline and steered side by side - is one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .activations import pad_left
from .errors import check
from .intervene import Steer, capture, steer
from .model import LoadedModel


@dataclass
class Step:
    """One decode step: the new token of each row, and each row's text so far.

    ``monitor[name][row]`` is the value of each monitor on the residual stream at the position
    that chose this step's token (the last prompt token for step 0).
    """

    index: int
    tokens: list[int]
    texts: list[str]
    done: list[bool]
    token_ids: list[list[int]]
    monitor: dict[str, list[float]] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [B, V] float32 that chose this step's tokens (want_logits=True)


@lru_cache(maxsize=32)
def _forward_accepts(cls: type, name: str) -> bool:
    import inspect

    return name in inspect.signature(cls.forward).parameters


def _new_cache(lm: LoadedModel):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _forward(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    kwargs = {lm.cache_kwarg: cache, "use_cache": True}
    if _forward_accepts(type(lm.model), "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    # inference mode per forward, not around a generator's yields: grad mode is thread-local and a
    # streaming consumer (Gradio) may resume the generator on another thread
    with torch.inference_mode():
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
    # a model split across devices returns logits on its last device
    return out.logits[:, -1].float().to(lm.device)


def _choose(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    pick = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1)
    return pick.to(logits.device)


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], *, chat: bool = True,
                   system: str | None = None) -> list[list[int]]:
    check(len(prompts) > 0, "no prompts given")
    for i, p in enumerate(prompts):
        check(isinstance(p, str) and p.strip() != "", f"prompt {i + 1} is empty")
    return [lm.encode_prompt(p, system=system, chat=chat) for p in prompts]


def stream(lm: LoadedModel, prompts: Sequence[str] | str, steering: Steer | Sequence[Steer] = (), *,
           max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
           chat: bool = True, system: str | None = None, prompt_ids: Sequence[Sequence[int]] | None = None,
           monitors: Sequence = (), prompt_len: int | None = None, follow: dict[int, int] | None = None,
           want_logits: bool = False) -> Iterator[Step]:
    """Yield one :class:`Step` per generated token for a batch of prompts.

    ``steering`` strengths may be per row (one per prompt). ``monitors`` (see ``monitor.py``) are
    read on the steered residual stream at every step. ``prompt_len`` moves the boundary that the
    ``prompt``/``generated`` scopes use (default: the padded prompt length). ``follow={i: j}`` feeds
    row ``i`` the tokens that row ``j`` chooses (a "shadow" row: e.g. the unsteered model reading the
    steered text, for live KL and perplexity). Closing the generator early removes every hook (it
    runs inside ``steer`` and ``capture``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    check(max_new_tokens >= 1, "max_new_tokens must be at least 1")
    check(0 < top_p <= 1, "top_p must be in (0, 1]")
    seqs = [list(s) for s in prompt_ids] if prompt_ids is not None else encode_prompts(
        lm, prompts, chat=chat, system=system)
    items = [steering] if isinstance(steering, Steer) else list(steering)
    ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)
    n = len(seqs)
    eos = torch.as_tensor(lm.eos_ids or (-1,), device=lm.device)
    gen = torch.Generator().manual_seed(seed) if (temperature > 0 and seed is not None) else None
    out_ids: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=lm.device)
    cache = _new_cache(lm)
    context = steer(lm, items, prompt_len=prompt_len) if items else nullcontext()
    watch = sorted({m.layer for m in monitors})
    # registered after the steering hooks, so monitors read the steered stream
    reading = capture(lm, watch, fn=lambda k, h: h[:, -1].float()) if watch else nullcontext()
    with context, reading as cap:
        logits = _forward(lm, ids, mask, pos, cache)
        for step in range(max_new_tokens):
            nxt = _choose(logits, temperature, top_p, gen)
            for i, j in (follow or {}).items():
                nxt[i] = nxt[j]
            nxt = torch.where(done, eos[0].expand_as(nxt), nxt)
            for i in range(n):
                if not bool(done[i]):
                    out_ids[i].append(int(nxt[i]))
            done = done | torch.isin(nxt, eos)
            texts = [lm.decode([t for t in row if t not in lm.eos_ids]) for row in out_ids]
            values = {}
            if watch:
                values = {m.name: m.read(cap.outputs[m.layer][-1]).cpu().tolist() for m in monitors}
                cap.clear()
            yield Step(index=step, tokens=nxt.tolist(), texts=texts, done=done.tolist(),
                       token_ids=[list(r) for r in out_ids], monitor=values,
                       logits=logits if want_logits else None)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
            pos = pos[:, -1:] + 1
            logits = _forward(lm, nxt[:, None], mask, pos, cache)


def final(steps: Iterator[Step]) -> Step:
    """Run a stream to its end and return the last step."""
    last = None
    for last in steps:  # noqa: B007 - only the last step is wanted
        pass
    check(last is not None, "generation produced no step")
    return last


def generate(lm: LoadedModel, prompts: Sequence[str] | str, steering: Steer | Sequence[Steer] = (), *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             chat: bool = True, system: str | None = None) -> list[str]:
    """Generate for a batch of prompts (greedy by default); returns one text per prompt."""
    return final(stream(lm, prompts, steering, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, chat=chat, system=system)).texts


def generate_ids(lm: LoadedModel, prompts: Sequence[str], steering: Steer | Sequence[Steer] = (),
                 **kw) -> list[list[int]]:
    """Like :func:`generate` but returns the generated token ids (EOS included when reached)."""
    return final(stream(lm, prompts, steering, **kw)).token_ids


def sweep_generate(lm: LoadedModel, prompts: Sequence[str], vector, strengths: Sequence[float], *,
                   layers=None, operator: str = "add", batch_rows: int = 64, max_new_tokens: int = 48,
                   progress: bool = False, chat: bool = True, system: str | None = None,
                   ) -> dict[float, list[str]]:
    """Generate every prompt at every strength, as few batches as memory allows.

    Rows are (strength, prompt) pairs; each batch carries per-row strengths, so a sweep of S
    strengths over P prompts is ceil(S*P / batch_rows) decode loops instead of S*P.
    """
    from tqdm.auto import tqdm

    check(len(strengths) > 0, "no strengths to sweep")
    rows = [(s, i) for s in strengths for i in range(len(prompts))]
    encoded = encode_prompts(lm, prompts, chat=chat, system=system)
    results: dict[float, list[str | None]] = {float(s): [None] * len(prompts) for s in strengths}
    chunks = [rows[i:i + batch_rows] for i in range(0, len(rows), batch_rows)]
    for chunk in tqdm(chunks, desc="sweep", disable=not progress, leave=False):
        item = Steer(vector, [s for s, _ in chunk], layers=layers, operator=operator)
        last = final(stream(lm, [prompts[i] for _, i in chunk], item, max_new_tokens=max_new_tokens,
                            prompt_ids=[encoded[i] for _, i in chunk]))
        for (s, i), text in zip(chunk, last.texts):
            results[float(s)][i] = text
    return results
