"""Several steering vectors at once.

* ``compose(..., mode="separate")``: each vector at its own (recommended) layer — what "Extending
  activation steering to broad skills and multiple behaviours" found to work where summing fails;
* ``compose(..., mode="sum")``: the weighted sum of the vectors' directions at one layer;
* ``dynamic_stream``: per-step strengths after Dynamic Activation Composition (Scalena et al.):
  at every step each property's strength is its maximum times ``min(1, KL_i / tau)``, where
  ``KL_i`` is the divergence between the next-token distributions with only that property
  steered at full strength and with no steering, on the text generated so far. Steering is strong
  where the property changes the next token and fades where it does not. The distributions come
  from extra rows of the same batch that are fed the same tokens (1 + n + 1 rows for n vectors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .engine import Control, Request, engine_for
from .errors import check
from .generate import encode_prompts
from .intervene import Steer
from .metrics import kl_from_logits
from .model import LoadedModel
from .vector import SteeringVector

MODES = ("separate", "sum")


def compose(items: Sequence[tuple[SteeringVector, float]], *, mode: str = "separate",
            layer: int | None = None, layers: Sequence[Sequence[int] | None] | None = None) -> list[Steer]:
    """Steering for several ``(vector, strength)`` pairs.

    ``separate``: vector i at ``layers[i]`` (default: its recommended layer). ``sum``: one
    direction ``sum_i strength_i * v_i[layer]`` at ``layer`` (default: the first vector's).
    """
    check(mode in MODES, f"unknown composition mode {mode!r} (choose {', '.join(MODES)})")
    check(len(items) > 0, "nothing to compose")
    if mode == "separate":
        per = list(layers) if layers is not None else [None] * len(items)
        check(len(per) == len(items), "one layer list per vector")
        return [Steer(v, s, layers=k) for (v, s), k in zip(items, per)]
    first = items[0][0]
    k = layer if layer is not None else (first.recommended_layer if first.recommended_layer is not None
                                         else first.layers[0])
    total = sum(float(s) * v[k].float() for v, s in items)
    return [Steer(total, 1.0, layers=[k])]


@dataclass
class DynamicStep:
    index: int
    text: str
    token_ids: list[int]
    strengths: list[float]  # the strength each vector had when this token was chosen
    kl: list[float]         # KL(full_i || unsteered) at this step
    done: bool = False
    extra: dict = field(default_factory=dict)


def dynamic_stream(lm: LoadedModel, prompt: str, items: Sequence[tuple[SteeringVector, float]], *,
                   layers: Sequence[Sequence[int] | None] | None = None, tau: float = 0.5,
                   max_new_tokens: int = 64, chat: bool = True, system: str | None = None,
                   tag=None) -> Iterator[DynamicStep]:
    """Greedy generation for one prompt with per-step strengths (see module docstring)."""
    check(tau > 0, "tau must be positive")
    check(len(items) > 0, "nothing to compose")
    n = len(items)
    per = list(layers) if layers is not None else [None] * n
    maxima = [float(s) for _, s in items]
    rows = n + 2  # 0: applied, 1..n: property i alone at full strength, n+1: unsteered

    def row_strengths(i: int, applied: float) -> list[float]:
        out = [0.0] * rows
        out[0], out[1 + i] = applied, maxima[i]
        return out

    steers = [Steer(v, row_strengths(i, maxima[i]), layers=per[i]) for i, (v, _) in enumerate(items)]
    ids0 = encode_prompts(lm, [prompt], chat=chat, system=system)[0]
    current = list(maxima)  # the first token is steered at full strength

    def control(ctl: Control) -> None:
        logits = ctl.logits
        kls = [float(kl_from_logits(logits[1 + i][None, None], logits[n + 1][None, None])[0]) for i in range(n)]
        ctl.extra.update(strengths=list(current), kl=kls)  # the strengths that chose this token
        current[:] = [m * min(1.0, k / tau) for m, k in zip(maxima, kls)]
        for i in range(n):
            ctl.set_strength(i, row_strengths(i, current[i]))

    request = Request(prompt_ids=[ids0] * rows, steering=steers, max_new_tokens=max_new_tokens,
                      follow={r: 0 for r in range(1, rows)}, control=control, tag=tag)
    for step in engine_for(lm).submit(request):
        done = step.done[0]
        yield DynamicStep(index=step.index, text=step.texts[0], token_ids=list(step.token_ids[0]),
                          strengths=step.extra["strengths"], kl=step.extra["kl"], done=done)
        if done:
            return
