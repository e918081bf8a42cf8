"""Batched, padding-aware collection of decoder-block outputs.

One forward pass per batch records every wanted layer (the pass stops after the last wanted
block). Sequences are left-padded with explicit position ids, so a padded row sees exactly the
positions it would see alone. Pooling happens inside the hook, so memory is ``N x layers x d``,
never ``N x T x layers x d``.

Positions:

* ``last``           the last prompt token (for a chat prompt: the start of the assistant turn)
* ``mean``           mean over prompt tokens, without the first one (the attention sink, whose
                     norm is often 100x the others and would swamp the mean)
* ``max``            element-wise max over the same tokens
* ``response_mean``  mean over response tokens (prompt + response pairs, as persona vectors do)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .constants import POSITIONS
from .errors import check
from .intervene import capture
from .model import LoadedModel


@dataclass
class Activations:
    """Pooled activations ``acts[i, j]`` of example ``i`` at layer ``layers[j]`` (float32, CPU),
    and ``token_norms[i, j]``: the mean L2 norm of the pooled tokens (a scale for strengths)."""

    acts: torch.Tensor
    token_norms: torch.Tensor
    layers: list[int]
    position: str

    def at(self, layer: int) -> torch.Tensor:
        return self.acts[:, self.layers.index(layer)]


def tokenize_example(lm: LoadedModel, prompt: str, response: str | None = None, *, chat: bool = True,
                     system: str | None = None) -> tuple[list[int], int]:
    """Token ids of prompt (+ response) and the number of prompt tokens.

    Prompt and response are tokenized separately and joined, so the response span is exact.
    """
    ids = lm.encode_prompt(prompt, system=system, chat=chat)
    n_prompt = len(ids)
    if response is not None:
        ids = ids + lm.encode(response, special=False)
    return ids, n_prompt


def encode_many(lm: LoadedModel, prompts: Sequence[str], *, chat: bool = True,
                system: str | None = None) -> list[list[int]]:
    """``[lm.encode_prompt(p, system, chat) for p in prompts]``, with the chat template rendered and the
    texts tokenized in one batched call each (hundreds of prompts in milliseconds, not seconds)."""
    prompts = list(prompts)
    if not (chat and lm.has_chat_template) or not prompts:
        return [lm.encode_prompt(p, system=system, chat=chat) for p in prompts]
    convs = [([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": p}]
             for p in prompts]
    try:
        texts = lm.tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template without a system role: the one-by-one path handles it
        return [lm.encode_prompt(p, system=system, chat=chat) for p in prompts]
    return [list(ids) for ids in lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad ``seqs`` -> ``(input_ids, attention_mask, position_ids)``."""
    check(len(seqs) > 0, "no sequences to pad")
    width = max(len(s) for s in seqs)
    check(width > 0, "cannot run an empty sequence")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), pos.to(device)


def pool_weights(lengths: Sequence[int], n_prompts: Sequence[int], width: int, position: str) -> torch.Tensor:
    """``[B, T]`` 0/1 weights of the tokens each row pools over (left-padded layout)."""
    w = torch.zeros((len(lengths), width))
    for i, (n, p) in enumerate(zip(lengths, n_prompts)):
        start = width - n  # first real token
        end_prompt = start + p
        if position == "last":
            w[i, end_prompt - 1] = 1
        elif position in ("mean", "max"):
            lo = start + 1 if p > 1 else start
            w[i, lo:end_prompt] = 1
        else:  # response_mean
            check(n > p, "position 'response_mean' needs a non-empty response for every example")
            w[i, end_prompt:width] = 1
    return w


def collect(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str] | None = None, *,
            layers: Sequence[int] | None = None, position: str = "last", chat: bool = True,
            system: str | None = None, batch_size: int = 8, progress: bool = False,
            desc: str = "activations") -> Activations:
    """Pooled block outputs for each example at each of ``layers`` (default: all)."""
    check(position in POSITIONS, f"unknown position {position!r} (choose {', '.join(POSITIONS)})")
    check(len(prompts) > 0, "no examples to collect activations from")
    check(batch_size >= 1, "batch_size must be at least 1")
    if responses is not None:
        check(len(responses) == len(prompts),
              f"{len(prompts)} prompts but {len(responses)} responses")
    check(position != "response_mean" or responses is not None,
          "position 'response_mean' needs responses")
    wanted = list(range(lm.n_layers)) if layers is None else sorted({int(k) for k in layers})
    if responses is None:
        encoded = [(ids, len(ids)) for ids in encode_many(lm, prompts, chat=chat, system=system)]
    else:
        encoded = [tokenize_example(lm, p, responses[i], chat=chat, system=system) for i, p in enumerate(prompts)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding per batch
    acts = torch.empty((len(encoded), len(wanted), lm.d_model), dtype=torch.float32)
    norms = torch.empty((len(encoded), len(wanted)), dtype=torch.float32)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        seqs = [encoded[i][0] for i in batch]
        ids, mask, pos = pad_left(seqs, lm.pad_id, lm.device)
        weights = pool_weights([len(s) for s in seqs], [encoded[i][1] for i in batch], ids.shape[1],
                               position).to(lm.device)  # once per batch, not once per layer
        rows = torch.as_tensor(batch)
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def pool(k: int, h: torch.Tensor, weights: torch.Tensor = weights, found: dict = found) -> torch.Tensor:
            w = weights.to(h.device)
            h32 = h.float()
            count = w.sum(1, keepdim=True)
            if position == "max":
                pooled = h32.masked_fill(w[..., None] == 0, float("-inf")).amax(1)
            else:
                pooled = (h32 * w[..., None]).sum(1) / count
            tok_norm = (h32.norm(dim=-1) * w).sum(1) / count[:, 0]
            found[k] = (pooled, tok_norm)  # kept on the device: one copy to the host per batch
            return h[:0]  # nothing else to keep

        with torch.inference_mode(), capture(lm, wanted, stop_early=True, fn=pool) as cap:
            cap.forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            dev = lm.device
            pooled = torch.stack([found[k][0].to(dev) for k in wanted], 1).cpu()  # [b, layers, d]
            tok = torch.stack([found[k][1].to(dev) for k in wanted], 1).cpu()
        acts[rows] = pooled
        norms[rows] = tok
    check(bool(torch.isfinite(acts).all()), "the model produced NaN/inf activations (check the model and dtype)")
    return Activations(acts=acts, token_norms=norms, layers=wanted, position=position)
