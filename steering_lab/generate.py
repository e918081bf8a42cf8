"""Steered generation: batched, streamed, greedy by default — thin uses of the decode engine.

Every path decodes through ``engine.Engine`` (one loop for the whole package): it streams token by
token, retires a request when its consumer goes away (closing the iterator cancels it), accepts
per-row strengths so a whole strength sweep - or baseline and steered side by side - is one batch,
and shares its running batch with every other request on the same model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .engine import Request, Step, engine_for, forward_accepts
from .errors import check
from .intervene import Steer
from .model import LoadedModel

__all__ = ["Step", "encode_prompts", "stream", "final", "generate", "generate_ids", "sweep_generate",
           "forward_accepts"]


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
           want_logits: bool = False, tag=None) -> Iterator[Step]:
    """Yield one :class:`Step` per generated token for a batch of prompts (one engine request).

    ``steering`` strengths may be per row (one per prompt). ``monitors`` (see ``monitor.py``) are
    read on the steered residual stream at every step. ``prompt_len`` moves the boundary (a position
    id) that the ``prompt``/``generated`` scopes use (default: each row's prompt length).
    ``follow={i: j}`` feeds row ``i`` the tokens that row ``j`` chooses (a "shadow" row: e.g. the
    unsteered model reading the steered text, for live KL and perplexity). Closing the generator
    early cancels the request (its rows leave the batch at the next step; no hook stays behind), and
    so does ``engine_for(lm).cancel(tag)`` for every request made with ``tag``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    check(max_new_tokens >= 1, "max_new_tokens must be at least 1")
    check(0 < top_p <= 1, "top_p must be in (0, 1]")
    seqs = [list(s) for s in prompt_ids] if prompt_ids is not None else encode_prompts(
        lm, prompts, chat=chat, system=system)
    items = [steering] if isinstance(steering, Steer) else list(steering)
    request = Request(prompt_ids=seqs, steering=items, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, monitors=list(monitors), follow=follow, want_logits=want_logits,
                      prompt_len=prompt_len, tag=tag)
    yield from engine_for(lm).submit(request)


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
