"""Small HTML/Markdown renderings for the app (pure functions, tested)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence


def _colour(value: float, scale: float) -> str:
    """Diverging colour: blue for negative, red for positive, white at 0."""
    if scale <= 0 or math.isnan(value):
        return "rgba(255,255,255,0)"
    a = max(-1.0, min(1.0, value / scale))
    alpha = round(abs(a) * 0.75, 3)
    return f"rgba(214,39,40,{alpha})" if a > 0 else f"rgba(31,119,180,{alpha})"


def token_strip(tokens: Sequence[str], values: Sequence[float], label: str = "projection") -> str:
    """Each token on a background coloured by its value (hover shows the number)."""
    if not tokens:
        return "<div class='token-strip'><em>no tokens yet</em></div>"
    finite = [abs(v) for v in values if not math.isnan(v)]
    scale = max(finite) if finite else 0.0
    spans = []
    for tok, val in zip(tokens, values):
        text = html.escape(tok).replace("\n", "↵<br>")
        spans.append(f"<span title='{html.escape(label)}: {val:.3f}' style='background:{_colour(val, scale)};"
                     f"border-radius:3px;padding:1px 0'>{text}</span>")
    legend = (f"<div style='font-size:0.8em;opacity:0.7;margin-top:4px'>colour = {html.escape(label)} "
              f"(blue negative, red positive; full colour = ±{scale:.2f})</div>")
    return f"<div class='token-strip' style='line-height:1.9;font-family:monospace'>{''.join(spans)}</div>{legend}"


def metrics_markdown(*, kl: float, perplexity: float, refusal: bool, n_tokens: int, tok_per_s: float | None,
                     probes: dict[str, tuple[float | None, float | None]] | None = None, done: bool = False,
                     run: int | None = None) -> str:
    """The live numbers under the steered answer."""
    status = "done" if done else "streaming…"
    speed = f" · {tok_per_s:.1f} tok/s" if tok_per_s else ""
    tag = f" · run {run}" if run is not None else ""
    lines = [f"**{status}** {n_tokens} tokens{speed}{tag}",
             "",
             "| metric | steered | note |",
             "|---|---|---|",
             f"| mean KL to unsteered | {kl:.3f} | nats/token, on the steered text |",
             f"| perplexity (unsteered model) | {perplexity:.2f} | of the steered text |",
             f"| opens with a refusal | {'yes' if refusal else 'no'} | refusal phrase in the first 120 chars |"]
    for name, (steered, base) in (probes or {}).items():
        s = "–" if steered is None else f"{steered:.3f}"
        b = "–" if base is None else f"{base:.3f}"
        lines.append(f"| {html.escape(name)} | {s} | baseline {b} |")
    return "\n".join(lines)
