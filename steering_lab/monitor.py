"""Live monitors (probe scores and projections on directions, token by token) and "steer when
needed": watch a probe while generating and, when it crosses a threshold, turn steering on and
regenerate the last few tokens (backtracking, after FASB)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .engine import Control, Request, engine_for
from .errors import check
from .generate import encode_prompts
from .intervene import Steer, capture, steer
from .model import LoadedModel
from .probes import Probe


@dataclass
class Monitor:
    """A named function of the residual stream at one layer (``read``: ``[B, d]`` -> ``[B]``)."""

    name: str
    layer: int

    def read(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class ProbeMonitor(Monitor):
    probe: Probe = None

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return self.probe.score(h)


@dataclass
class ProbeLogitMonitor(Monitor):
    """A probe's logit per token: linear in the activations, so the mean of the per-token logits is
    the logit of the mean-pooled text (what a mean-pooling probe scores)."""

    probe: Probe = None

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return self.probe.logit(h)


@dataclass
class DirectionMonitor(Monitor):
    direction: torch.Tensor = None

    def __post_init__(self) -> None:
        d = self.direction.detach().float()
        check(float(d.norm()) > 0, f"monitor {self.name!r}: zero direction")
        self._unit = d / d.norm()

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return h.float() @ self._unit.to(h.device)


def probe_monitor(probe: Probe, name: str | None = None) -> ProbeMonitor:
    return ProbeMonitor(name=name or probe.description or "probe", layer=probe.layer, probe=probe)


def direction_monitor(vector, layer: int | None = None, name: str | None = None) -> DirectionMonitor:
    """Projection on a SteeringVector's (unit) direction at ``layer`` (default: its recommended one)."""
    layer = vector.recommended_layer if layer is None else layer
    check(layer is not None, "direction monitor needs a layer")
    return DirectionMonitor(name=name or vector.description or "direction", layer=layer, direction=vector[layer])


def offline_values(lm: LoadedModel, prompt_ids: Sequence[int], generated: Sequence[int], monitors: Sequence[Monitor],
                   steering: Steer | Sequence[Steer] = ()) -> dict[str, list[float]]:
    """The monitors recomputed by one teacher-forced pass (for checking the live values)."""
    seq = list(prompt_ids) + list(generated)
    ids = torch.tensor([seq], device=lm.device)
    layers = sorted({m.layer for m in monitors})
    items = [steering] if isinstance(steering, Steer) else list(steering)
    with torch.inference_mode(), steer(lm, items), capture(lm, layers) as cap:
        lm.model(input_ids=ids, use_cache=False)
    start = len(prompt_ids) - 1  # the position that chose generated[0]
    out = {}
    for m in monitors:
        h = cap.last(m.layer)[0, start:start + len(generated)]
        out[m.name] = m.read(h).cpu().tolist()
    return out


@dataclass
class NeededResult:
    text: str
    token_ids: list[int]
    triggered_at: int | None  # index of the generated token whose score crossed the threshold
    scores: list[float] = field(default_factory=list)


def steer_when_needed(lm: LoadedModel, prompt: str, steering: Steer | Sequence[Steer], probe: Probe, *,
                      threshold: float = 0.5, backtrack: int = 4, max_new_tokens: int = 64,
                      chat: bool = True, system: str | None = None) -> NeededResult:
    """Generate unsteered while a probe watches; when its score exceeds ``threshold``, switch the
    steering on (in place, no re-registration), drop the last ``backtrack`` tokens from the text
    and the KV cache, and continue from there with steering on. Greedy, one prompt."""
    check(backtrack >= 0, "backtrack must be >= 0")
    items = [steering] if isinstance(steering, Steer) else list(steering)
    check(bool(items), "steer_when_needed needs something to steer with")
    off = [Steer(s.vector, 0.0, layers=s.layers, operator=s.operator, scope=s.scope, transform=s.transform)
           for s in items]
    on_strengths = [s.strength for s in items]
    prompt_ids = encode_prompts(lm, [prompt], chat=chat, system=system)[0]
    watch = ProbeMonitor(name="__needed__", layer=probe.layer, probe=probe)
    scores: list[float] = []
    triggered: list[int] = []

    def control(ctl: Control) -> None:
        score = float(ctl.monitor[watch.name][0])
        if not triggered and score > threshold:
            # switch the steering on in place, drop the last tokens and re-run from there
            triggered.append(ctl.step)
            for i, s in enumerate(on_strengths):
                ctl.set_strength(i, s)
            keep = max(0, ctl.step - backtrack)
            del scores[keep:]
            ctl.rewind(ctl.step - keep)
            return
        scores.append(score)

    request = Request(prompt_ids=[prompt_ids], steering=off, max_new_tokens=max_new_tokens, monitors=[watch],
                      control=control, exclusive=True)
    last = engine_for(lm).submit(request).result()
    out = last.token_ids[0]
    eos = set(lm.eos_ids)
    text = lm.decode([t for t in out if t not in eos])
    return NeededResult(text=text, token_ids=out, triggered_at=triggered[0] if triggered else None,
                        scores=scores[:len(out)])
