"""Baseline and steered answers streamed side by side, with live side-effect numbers.

One batch, one decode loop: row 0 is steered, row 1 is a *shadow* — the unsteered model fed the
steered row's tokens — and (optionally) row 2 is the unsteered baseline choosing its own tokens.
The shadow gives, at every step and at no extra pass, the unsteered model's next-token
distribution on the steered text: hence the mean ``KL(steered || unsteered)`` and the perplexity
of the steered text under the unsteered model, exactly as ``metrics.score_texts`` computes them
offline. Monitors (probe scores, projections) are read per token on the steered and baseline rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import check
from .generate import encode_prompts, stream
from .intervene import Steer
from .metrics import is_refusal
from .model import LoadedModel


@dataclass
class LiveStep:
    index: int
    steered: str
    baseline: str | None
    steered_tokens: list[str]            # the steered answer, token by token (decoded pieces)
    kl: list[float]                      # KL(steered || unsteered) of the distribution that chose each token
    unsteered_logprob: list[float]       # log p_unsteered(token | steered prefix) of each steered token
    monitors: dict[str, list[float]] = field(default_factory=dict)           # steered stream, per steered token
    shadow_monitors: dict[str, list[float]] = field(default_factory=dict)    # unsteered reading of the steered text
    baseline_monitors: dict[str, list[float]] = field(default_factory=dict)  # per baseline token
    done: bool = False

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else float("nan")

    @property
    def perplexity(self) -> float:
        lp = self.unsteered_logprob
        return math.exp(-sum(lp) / len(lp)) if lp else float("nan")

    @property
    def refusal(self) -> bool:
        return is_refusal(self.steered, opening=True)


def _rowed(items: Sequence[Steer], n_rows: int) -> list[Steer]:
    """The same interventions acting on row 0 only (exactly untouched elsewhere, any operator)."""
    mask = [True] + [False] * (n_rows - 1)
    return [Steer(s.vector, s.strength, layers=s.layers, operator=s.operator, scope=s.scope, rows=mask)
            for s in items]


def live_stream(lm: LoadedModel, prompt: str, steering: Sequence[Steer], *, with_baseline: bool = True,
                monitors: Sequence = (), max_new_tokens: int = 64, system: str | None = None,
                chat: bool = True, tag=None, temperature: float = 0.0, top_p: float = 1.0,
                seed: int | None = 0) -> Iterator[LiveStep]:
    """Stream the steered answer (and the baseline) for one prompt with live metrics: the one
    "baseline + steered + live metrics" function behind the Steer tab and ``steering-lab generate``
    (greedy by default; with a temperature the shadow row still reads exactly the steered tokens)."""
    check(prompt.strip() != "", "the prompt is empty")
    for s in steering:
        check(torch.as_tensor(s.strength).numel() == 1, "live_stream takes one strength per intervention")
    rows = 3 if with_baseline else 2
    ids = encode_prompts(lm, [prompt], chat=chat, system=system)[0]
    kl: list[float] = []
    lp: list[float] = []
    mons: dict[str, list[float]] = {m.name: [] for m in monitors}
    shadow: dict[str, list[float]] = {m.name: [] for m in monitors}
    base_mons: dict[str, list[float]] = {m.name: [] for m in monitors}
    done_steered = done_base = False
    pieces: list[str] = []
    for step in stream(lm, [prompt] * rows, _rowed(steering, rows), max_new_tokens=max_new_tokens,
                       prompt_ids=[ids] * rows, monitors=monitors, follow={1: 0}, want_logits=True, tag=tag,
                       temperature=temperature, top_p=top_p, seed=seed):
        logits = step.logits.float()
        if not done_steered:
            logp = torch.log_softmax(logits[0], -1)
            logq = torch.log_softmax(logits[1], -1)
            pair = torch.stack([(logp.exp() * (logp - logq)).sum(), logq[step.tokens[0]]]).tolist()  # one sync
            kl.append(pair[0])
            lp.append(pair[1])
            pieces.append(lm.tokenizer.decode([step.tokens[0]], skip_special_tokens=True))
            for m in monitors:
                mons[m.name].append(step.monitor[m.name][0])
                shadow[m.name].append(step.monitor[m.name][1])
        if with_baseline and not done_base:
            for m in monitors:
                base_mons[m.name].append(step.monitor[m.name][2])
        done_steered, done_base = step.done[0], (step.done[2] if with_baseline else True)
        yield LiveStep(index=step.index, steered=step.texts[0], baseline=step.texts[2] if with_baseline else None,
                       steered_tokens=list(pieces), kl=list(kl), unsteered_logprob=list(lp),
                       monitors={k: list(v) for k, v in mons.items()},
                       shadow_monitors={k: list(v) for k, v in shadow.items()},
                       baseline_monitors={k: list(v) for k, v in base_mons.items()},
                       done=bool(done_steered and done_base) or step.index == max_new_tokens - 1)
