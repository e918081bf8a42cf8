"""A model whose residual stream is rotated by a random orthogonal matrix: the same function, other coordinates.

``rotated_copy(lm, seed) -> (rotated, Q)`` gives a recipient whose right answer is known for cross-model methods
(Command-V transfer, ``directions/transfer.py``): its logits equal the original's and its block outputs are
``h @ Q``, so a converter fitted between the two must recover ``Q`` and a transferred vector must steer it exactly as
the original steers the donor. Llama-style models only (RMSNorm, pre-norm blocks, separate q/k/v/o and
gate/up/down projections).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import check
from ..model import LoadedModel

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")  # model_type values rotated_copy supports


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random ``d x d`` orthogonal matrix (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes Q Haar-distributed (a zero has probability 0)


def _rms_weight(norm: nn.Module, where: str) -> nn.Parameter:
    w = getattr(norm, "weight", None)
    check(isinstance(w, nn.Parameter) and w.dim() == 1, f"{where} has no RMSNorm gain to fold")
    check(getattr(norm, "bias", None) is None, f"{where} has a bias (a LayerNorm?): rotation needs RMSNorm")
    return w


def rotated_copy(lm: LoadedModel, seed: int = 0, *, name: str | None = None) -> tuple[LoadedModel, torch.Tensor]:
    """A copy of Llama-style ``lm`` whose residual stream is rotated by a random orthogonal ``Q``: same logits,
    block outputs ``h @ Q``. Returns ``(rotated, Q)`` with ``Q`` float32 ``[d, d]``; ``lm`` is not modified.

    Exact: the RMSNorm gains are folded into the weights that read them (q/k/v, gate/up, lm_head) and set to 1
    (an RMSNorm without gain commutes with Q); then the embeddings become ``E Q``, the residual writers
    ``W -> Q^T W`` (nn.Linear layout; o_proj, down_proj, and their biases ``b -> b Q``) and the readers
    ``W -> W Q``. Tied embeddings are untied first. Weights are transformed in float32 (float64 costs ~10x the
    time for no visible gain: the float32 forward pass rounds more), then cast back to the model's dtype.
    """
    model = lm.model
    kind = getattr(model.config, "model_type", "")
    check(kind in ROTATABLE, f"rotated_copy supports Llama-style models ({', '.join(ROTATABLE)}); "
                             f"{lm.name} is {kind or type(model).__name__!r}")
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    check(inner is not None and isinstance(head, nn.Linear) and hasattr(inner, "embed_tokens")
          and hasattr(inner, "norm"), f"{lm.name} does not have the Llama layout (model.embed_tokens, model.norm, "
                                      "lm_head)")
    check(not lm.is_split, "rotated_copy needs the model on one device")
    clone = copy.deepcopy(model)
    inner = clone.model
    dtype = clone.lm_head.weight.dtype
    d = lm.d_model
    q = random_orthogonal(d, seed).float().to(clone.lm_head.weight.device)
    touched: set[int] = set()

    def put(p: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            p.data = value.to(dtype).contiguous()
        touched.add(id(p))

    with torch.no_grad():
        emb = inner.embed_tokens.weight
        if clone.lm_head.weight is emb or clone.lm_head.weight.data_ptr() == emb.data_ptr():
            clone.lm_head.weight = nn.Parameter(emb.detach().clone())  # untie
        for cfg in {id(c): c for c in (clone.config, getattr(clone.config, "get_text_config", lambda: None)())
                    if c is not None}.values():
            cfg.tie_word_embeddings = False
        put(emb, emb.float() @ q)
        for i, block in enumerate(inner.layers):
            attn, mlp = block.self_attn, block.mlp
            for norm, readers in ((block.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                g = _rms_weight(norm, f"layer {i} norm").float()
                for lin in readers:
                    put(lin.weight, (lin.weight.float() * g[None, :]) @ q)
                    if lin.bias is not None:
                        touched.add(id(lin.bias))  # biases of readers live in head/hidden space: unchanged
                put(norm.weight, torch.ones_like(g))
            for writer in (attn.o_proj, mlp.down_proj):
                put(writer.weight, q.T @ writer.weight.float())
                if writer.bias is not None:
                    put(writer.bias, writer.bias.float() @ q)
        g = _rms_weight(inner.norm, "the final norm").float()
        put(clone.lm_head.weight, (clone.lm_head.weight.float() * g[None, :]) @ q)
        if clone.lm_head.bias is not None:
            touched.add(id(clone.lm_head.bias))
        put(inner.norm.weight, torch.ones_like(g))
    head_space = ("q_norm", "k_norm")  # qwen3: RMSNorm over head_dim after the projections, not the residual
    left = [n for n, p in clone.named_parameters() if id(p) not in touched and not any(h in n for h in head_space)]
    check(not left, f"rotated_copy does not know how to rotate {left[:4]} of {lm.name}")
    clone.eval()
    out = LoadedModel.wrap(clone, lm.tokenizer, name=name or f"{lm.name}-rotated-{seed}", layers_path=lm.layers_path,
                           source=lm.source)
    return out, q.cpu()
