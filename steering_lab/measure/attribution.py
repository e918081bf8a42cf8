"""Attribution patching (AtP, AtP*): which layers and attention heads carry a behaviour.

Activation patching measures the effect of a node ``n`` as ``c(n) = M(clean with n taken from the
corrupt run) - M(clean)`` for a metric ``M`` on the clean run's next-token logits: one forward pass
per node. Attribution patching (AtP; Nanda 2023) estimates it for every node at once from one clean
forward + backward pass and one corrupt forward pass::

    AtP(n) = (n_corrupt - n_clean) . dM/dn |clean

AtP* (Kramár, Lieberum, Shah, Nanda 2024, arXiv 2403.00745) adds two fixes, both here:

* **QK fix** (attention saturation): for a query or key node, the patched attention is recomputed
  exactly (the attention module of that block is run again alone with the patched query/key, all
  heads of a block in one batched call) and the linear approximation starts after the softmax:
  ``dM/dz . (z_patched - z_clean)`` at the head output ``z``. Since ``dM/dA[s] = dM/dz . v[s]``,
  this is the paper's ``sum_s (A_patched - A)[s] dM/dA[s]``.
* **GradDrop** (cancellation): for each block ``l`` the gradients are recomputed with the gradient
  through block ``l``'s residual contribution (its output minus its input) dropped, the forward pass
  unchanged, and combined as ``1/(L-1) sum_l |AtP_l(n)|`` (the paper's formula). This estimates
  ``|c(n)|``, a magnitude: GradDrop values are never negative. It costs ``L`` more backward passes.

Nodes (all at the last token position, where the metric is read; clean and corrupt prompts are
aligned at their last token, so they may differ in length):

* ``layers`` [L]: the residual stream after block k (``hidden_states[k+1]``). Patched at every
  position a block output would simply reproduce the corrupt run from block k on (every layer the
  same effect), so the layer-level node is the last position's residual.
* ``heads`` [L, H]: each attention head's output (the input of the output projection), via
  ``intervene.heads``. AtP* for a head output is the GradDrop of AtP (the QK fix does not apply to
  a head's own output: ``z_corrupt - z_clean`` is exact).
* ``queries`` [L, H] and ``keys`` [L, KV] (only models with separate ``q_proj``/``k_proj``): the query
  and key projection outputs (before rotary embeddings / q-k norms) of each head at the last position;
  with grouped-query attention a key node belongs to a key/value head and is shared by its query
  heads. Here the QK fix matters.

Methods in :class:`Attribution` (each a mean over pairs): ``atp`` (plain, signed), ``atp_qk`` (signed;
QK-fixed for queries/keys, equal to ``atp`` for layers/heads) and ``atp_star`` (GradDrop on ``atp_qk``,
a magnitude; ``|atp_qk|`` when GradDrop is off). :func:`activation_patching` is the exact reference,
:func:`correlations` compares the two, :func:`suggest_layers` picks layers for the Extract tab. Pairs
and metrics (``logit_diff``, ``logprob`` or any callable) live in ``attribution_pairs.py``.

Simplifications, honestly: nodes are at the last position only (no per-position sweep, no MLP
neurons, no value nodes); GradDrop drops one whole block's contribution (attention + MLP together)
and is combined with the pair average as ``|mean over pairs|`` per dropped block (the ``1/(L-1)``
normalisation is the paper's, written from our reading of it; for a head/query/key node the term of
its own block is 0, for a residual node none is, so residual GradDrop values are ``L/(L-1)`` larger in
scale, which changes no ranking); the metric is read at the last position only (a single next token).
The query/key node is the projection output before rotary embeddings and q/k norms (Qwen3, Gemma3),
so with q/k norms plain AtP is further from exact there and the QK fix matters more. Fused-QKV models
(GPT-2, GPT-NeoX, Phi-3) get layers and heads only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import check
from ..intervene import (
    Steer,
    attention_calls,
    drop_block_grad,
    has_qk_sites,
    head_shape,
    heads,
    kv_heads,
    projections,
    rerun_attention,
    steer,
)
from ..model import LoadedModel
from .attribution_pairs import (  # noqa: F401 - re-exported: the pairs and metrics are part of this API
    ANSWER_PREFIX,
    MAX_PAIRS,
    METRICS,
    QUESTION,
    SYSTEM,
    Metric,
    Pair,
    check_pairs,
    load_pairs_file,
    logit_diff,
    logprob,
    make_pairs,
    pairs_from_contrast,
    preset_pairs,
    resolve_metric,
)

log = logging.getLogger(__name__)

NODE_TYPES = ("layers", "heads", "queries", "keys")
METHODS = ("atp", "atp_qk", "atp_star")

# ---- results ---------------------------------------------------------------------------------

@dataclass
class Attribution:
    """Estimates per node type and method: ``estimates[method][node_type]`` (mean over pairs);
    ``layers`` [L], ``heads`` [L, H], ``queries`` [L, H], ``keys`` [L, KV] (the last two absent for
    fused-QKV models or when not asked for)."""

    estimates: dict[str, dict[str, torch.Tensor]]
    n_pairs: int
    metric: str
    clean_metric: float
    corrupt_metric: float
    seconds: float
    graddrop: bool = True
    meta: dict = field(default_factory=dict)

    def get(self, node_type: str = "layers", method: str = "atp_star") -> torch.Tensor:
        check(method in self.estimates, f"unknown method {method!r} (choose {', '.join(self.estimates)})")
        check(node_type in self.estimates[method],
              f"no {node_type!r} estimates (have {', '.join(self.estimates[method])})")
        return self.estimates[method][node_type]

    def to_dict(self) -> dict:
        return {"n_pairs": self.n_pairs, "metric": self.metric, "clean_metric": self.clean_metric,
                "corrupt_metric": self.corrupt_metric, "seconds": self.seconds, "graddrop": self.graddrop,
                "estimates": {m: {t: v.tolist() for t, v in d.items()} for m, d in self.estimates.items()},
                **self.meta}


def suggest_layers(result: Attribution | torch.Tensor, k: int = 3, *, method: str = "atp_star",
                   source: str = "layers", rule: str = "top", frac: float = 0.5) -> list[int]:
    """Layers by |effect|, from the per-layer estimates (``source="layers"``) or from the heads summed
    per layer (``source="heads"``, sum of |head effect|); a tensor [L] or [L, H] may be passed instead.

    ``rule="top"``: the ``k`` layers with the largest |effect|. The residual at the last token carries
    more of the contrast the later the layer, so these are usually the last layers; ``rule="onset"``:
    the first layer whose |effect| reaches ``frac`` of the largest (where the contrast arrives at the
    last token) and the ``k - 1`` layers after it."""
    check(int(k) >= 1, "k must be at least 1")
    check(rule in ("top", "onset"), f"unknown rule {rule!r} (choose top or onset)")
    check(0 < float(frac) <= 1, "frac must be in (0, 1]")
    if isinstance(result, Attribution):
        check(source in ("layers", "heads"), f"unknown source {source!r} (choose layers or heads)")
        scores = result.get(source, method)
    else:
        scores = torch.as_tensor(result)
    scores = scores.abs().float()
    if scores.dim() == 2:
        scores = scores.sum(-1)
    check(scores.dim() == 1 and scores.numel() > 0, "suggest_layers needs per-layer scores")
    if rule == "onset":
        first = int(torch.nonzero(scores >= float(frac) * scores.max())[0])
        return list(range(first, min(first + int(k), scores.numel())))
    order = torch.argsort(scores, descending=True, stable=True)
    return [int(i) for i in order[: int(k)]]


def top_nodes(result: Attribution, node_type: str = "heads", k: int = 10, method: str = "atp_star") -> list[dict]:
    """The ``k`` nodes with the largest |estimate|, as ``{"layer", "head"?, "effect"}`` rows."""
    t = result.get(node_type, method)
    flat = t.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True, stable=True)[: int(k)]
    rows = []
    for i in order.tolist():
        if t.dim() == 1:
            rows.append({"layer": i, "effect": float(flat[i])})
        else:
            rows.append({"layer": i // t.shape[1], "head": i % t.shape[1], "effect": float(flat[i])})
    return rows


# ---- one pair --------------------------------------------------------------------------------

def _ids(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(ids), dtype=torch.long, device=lm.device)[None]


def _forward_logits(lm: LoadedModel, ids: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
    if embeds is not None:
        out = lm.model(inputs_embeds=embeds, use_cache=False)
    else:
        out = lm.model(input_ids=ids, use_cache=False)
    return out.logits[:, -1]


class _Recorder:
    """Record block outputs through a ``steer`` transform (kept in the autograd graph)."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        self.h: dict[int, torch.Tensor] = {}
        self.steers = [Steer(torch.zeros(d_model), 1.0, layers=k, operator="transform", transform=self._fn(k))
                       for k in range(n_layers)]

    def _fn(self, k: int):
        def fn(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            self.h[k] = h
            return h
        return fn


@dataclass
class _Acts:
    """Last-position activations of one run: resid [L, d], z [L, H, hd], q [L, H, hd], k [L, KV, hd]."""

    metric: float
    resid: torch.Tensor
    z: torch.Tensor
    q: torch.Tensor | None
    k: torch.Tensor | None
    calls: object = None


def _run(lm: LoadedModel, ids: list[int], pair: Pair, metric: Metric, qk: bool, grad: bool,
         drop: int | None = None, want_calls: bool = False) -> tuple[_Acts, dict | None]:
    """One forward pass; with ``grad`` also the gradients of the metric at every node (last position)."""
    L = lm.n_layers
    n_heads, hd = head_shape(lm)
    x = _ids(lm, ids)
    rec = _Recorder(L, lm.d_model)
    from contextlib import ExitStack

    with ExitStack() as stack:
        if grad:
            stack.enter_context(torch.enable_grad())
        else:
            stack.enter_context(torch.no_grad())
        if drop is not None:  # first: the recorder below then sees (and differentiates) the dropped output
            stack.enter_context(drop_block_grad(lm, drop))
        stack.enter_context(steer(lm, rec.steers))
        hc = stack.enter_context(heads(lm, keep_grad=grad))
        qc = stack.enter_context(projections(lm, "q", keep_grad=grad)) if qk else None
        kc = stack.enter_context(projections(lm, "k", keep_grad=grad)) if qk else None
        calls = stack.enter_context(attention_calls(lm)) if want_calls else None
        embeds = None
        if grad:
            embeds = lm.model.get_input_embeddings()(x).detach().requires_grad_(True)
        logits = _forward_logits(lm, x, embeds)
        m = metric(logits, pair)
        check(m.shape == (1,), f"the metric must return one value per row, got shape {tuple(m.shape)}")
        resid = [rec.h[k] for k in range(L)]
        zs = [hc.last(k) for k in range(L)]
        qs = [qc.last(k) for k in range(L)] if qk else []
        ks = [kc.last(k) for k in range(L)] if qk else []
        grads = None
        if grad:
            g = torch.autograd.grad(m.sum(), resid + zs + qs + ks, allow_unused=True)
            g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, resid + zs + qs + ks)]
            last = [gi[0, -1].detach().float() for gi in g]
            grads = {"resid": torch.stack(last[:L]), "z": torch.stack(last[L:2 * L])}
            if qk:
                grads["q"] = torch.stack(last[2 * L:3 * L]).view(L, n_heads, hd)
                grads["k"] = torch.stack(last[3 * L:]).view(L, -1, hd)
        acts = _Acts(metric=float(m.detach()), resid=torch.stack([r[0, -1].detach().float() for r in resid]),
                     z=torch.stack([z[0, -1].detach().float() for z in zs]),
                     q=torch.stack([q[0, -1].detach().float() for q in qs]).view(L, n_heads, hd) if qk else None,
                     k=torch.stack([k[0, -1].detach().float() for k in ks]).view(L, -1, hd) if qk else None,
                     calls=calls)
    return acts, grads


def _qk_deltas(lm: LoadedModel, clean: _Acts, corrupt: _Acts) -> tuple[torch.Tensor, torch.Tensor]:
    """QK fix: the exact change of every head's output at the last position when one head's query
    (``dq`` [L, H(patched), H, hd]) or one key/value head's key (``dk`` [L, KV(patched), H, hd]) at the
    last position is taken from the corrupt run, by re-running each block's attention alone."""
    L = lm.n_layers
    n_heads, hd = head_shape(lm)
    n_kv = kv_heads(lm)
    dq = torch.zeros(L, n_heads, n_heads, hd)
    dk = torch.zeros(L, n_kv, n_heads, hd)
    with torch.no_grad():
        for layer in range(L):
            call = clean.calls.calls[layer][-1]
            for which, n, out in (("q", n_heads, dq), ("k", n_kv, dk)):
                src = (corrupt.q if which == "q" else corrupt.k)[layer]
                same = (src == (clean.q if which == "q" else clean.k)[layer]).all(-1)  # [n]: identity patches

                def edit(x, src=src, n=n):
                    x = x.clone()  # rows 0..n-1: one head patched each; row n: the unpatched reference
                    rows = torch.arange(n, device=x.device)
                    x[rows, -1, rows] = src.to(device=x.device, dtype=x.dtype)
                    return x

                with projections(lm, which, read=False, edit={layer: edit}), heads(lm, [layer]) as hc:
                    rerun_attention(lm, layer, call, repeat=n + 1)
                z = hc.last(layer)[:, -1].float().cpu()  # [n + 1, H, hd]
                delta = z[:n] - z[n:]
                delta[same] = 0.0  # patching in the clean value changes nothing, exactly
                out[layer] = delta
    return dq, dk


def _estimates(clean: _Acts, corrupt: _Acts, grads: dict, qk_d: tuple | None) -> tuple[dict, dict]:
    """Plain AtP and the QK-fixed AtP of one pair for every node type (signed)."""
    atp = {"layers": ((corrupt.resid - clean.resid) * grads["resid"]).sum(-1),
           "heads": ((corrupt.z - clean.z) * grads["z"]).sum(-1)}
    fixed = dict(atp)
    if clean.q is not None:
        atp["queries"] = ((corrupt.q - clean.q) * grads["q"]).sum(-1)
        atp["keys"] = ((corrupt.k - clean.k) * grads["k"]).sum(-1)
        dq, dk = qk_d
        gz = grads["z"]  # [L, H, hd]
        fixed["queries"] = (dq * gz[:, None]).sum((-1, -2))
        fixed["keys"] = (dk * gz[:, None]).sum((-1, -2))
    return atp, fixed


def attribute(lm: LoadedModel, pairs: Sequence[Pair], metric: str | Metric | None = None, *,
              graddrop: bool = True, qk: bool | None = None, progress: bool = False) -> Attribution:
    """AtP and AtP* estimates of every node (see the module docstring), averaged over ``pairs``.

    ``qk``: also query/key nodes with the QK fix (default: when the model has separate q/k
    projections). ``graddrop``: AtP* with GradDrop (``L`` extra backward passes per pair); without,
    ``atp_star`` is ``|atp_qk|``."""
    check_pairs(lm, pairs)
    name, fn = resolve_metric(metric, pairs)
    if qk is None:
        qk = has_qk_sites(lm)
    elif qk:
        check(has_qk_sites(lm), "query/key nodes need separate q_proj/k_proj (this model fuses them)")
    L = lm.n_layers
    t0 = time.perf_counter()
    sums: dict[str, dict[str, torch.Tensor]] = {"atp": {}, "atp_qk": {}}
    drop_sums: list[dict[str, torch.Tensor]] = [{} for _ in range(L)]
    clean_m = corrupt_m = 0.0

    def add(acc: dict, est: dict) -> None:
        for t, v in est.items():
            acc[t] = acc[t] + v if t in acc else v.clone()

    for pair in tqdm(pairs, desc="attribution patching", disable=not progress, leave=False):
        corrupt, _ = _run(lm, pair.corrupt, pair, fn, qk, grad=False)
        clean, grads = _run(lm, pair.clean, pair, fn, qk, grad=True, want_calls=qk)
        clean_m += clean.metric
        corrupt_m += corrupt.metric
        qk_d = _qk_deltas(lm, clean, corrupt) if qk else None
        atp, fixed = _estimates(clean, corrupt, grads, qk_d)
        add(sums["atp"], atp)
        add(sums["atp_qk"], fixed)
        if graddrop:
            for layer in range(L):
                _, g = _run(lm, pair.clean, pair, fn, qk, grad=True, drop=layer)
                add(drop_sums[layer], _estimates(clean, corrupt, g, qk_d)[1])
    n = len(pairs)
    est = {m: {t: v / n for t, v in d.items()} for m, d in sums.items()}
    if graddrop:
        star = {}
        for t in est["atp_qk"]:
            star[t] = sum((drop_sums[layer][t] / n).abs() for layer in range(L)) / max(L - 1, 1)
        est["atp_star"] = star
    else:
        est["atp_star"] = {t: v.abs() for t, v in est["atp_qk"].items()}
    seconds = time.perf_counter() - t0
    log.info("attribution patching: %d pairs, %.1f s", n, seconds)
    return Attribution(estimates=est, n_pairs=n, metric=name, clean_metric=clean_m / n, corrupt_metric=corrupt_m / n,
                       seconds=seconds, graddrop=graddrop)


# ---- exact activation patching ---------------------------------------------------------------

def _nodes(lm: LoadedModel, node_types: Sequence[str]) -> list[tuple[str, int, int]]:
    n_heads, _ = head_shape(lm)
    sizes = {"layers": 1, "heads": n_heads, "queries": n_heads, "keys": kv_heads(lm)}
    return [(t, layer, i) for t in node_types for layer in range(lm.n_layers) for i in range(sizes[t])]


def activation_patching(lm: LoadedModel, pairs: Sequence[Pair], metric: str | Metric | None = None, *,
                        node_types: Sequence[str] | None = None, batch_size: int = 16,
                        progress: bool = False) -> dict:
    """The exact effect of patching each node (last position) from the corrupt run into the clean run:
    ``M(patched) - M(clean)``, averaged over pairs; one forward row per node and pair (rows batched).
    Returns ``{"effects": {node_type: tensor}, "seconds", "n_pairs", "n_forward_rows"}``."""
    check_pairs(lm, pairs)
    _, fn = resolve_metric(metric, pairs)
    qk_ok = has_qk_sites(lm)
    if node_types is None:
        node_types = NODE_TYPES if qk_ok else ("layers", "heads")
    node_types = list(node_types)
    for t in node_types:
        check(t in NODE_TYPES, f"unknown node type {t!r} (choose {', '.join(NODE_TYPES)})")
        check(t not in ("queries", "keys") or qk_ok, f"{t} nodes need separate q_proj/k_proj")
    check(int(batch_size) >= 1, "batch_size must be at least 1")
    qk = any(t in ("queries", "keys") for t in node_types)
    n_heads, hd = head_shape(lm)
    shapes = {"layers": (lm.n_layers,), "heads": (lm.n_layers, n_heads), "queries": (lm.n_layers, n_heads),
              "keys": (lm.n_layers, kv_heads(lm))}
    effects = {t: torch.zeros(shapes[t]) for t in node_types}
    nodes = _nodes(lm, node_types)
    t0 = time.perf_counter()
    rows_run = 0
    bar = tqdm(total=len(pairs) * len(nodes), desc="activation patching", disable=not progress, leave=False)
    for pair in pairs:
        corrupt, _ = _run(lm, pair.corrupt, pair, fn, qk, grad=False)
        clean, _ = _run(lm, pair.clean, pair, fn, qk, grad=False)
        for start in range(0, len(nodes), int(batch_size)):
            chunk = nodes[start:start + int(batch_size)]
            vals = _patched_metrics(lm, pair, fn, chunk, corrupt)
            for (t, layer, i), v in zip(chunk, vals.tolist()):
                idx = (layer,) if t == "layers" else (layer, i)
                if not _same(t, layer, i, clean, corrupt):  # patching in the clean value is the identity
                    effects[t][idx] += v
            rows_run += len(chunk)
            bar.update(len(chunk))
    bar.close()
    n = len(pairs)
    return {"effects": {t: v / n for t, v in effects.items()}, "seconds": time.perf_counter() - t0, "n_pairs": n,
            "n_forward_rows": rows_run}


def _same(t: str, layer: int, i: int, clean: _Acts, corrupt: _Acts) -> bool:
    a, b = {"layers": (clean.resid, corrupt.resid), "heads": (clean.z, corrupt.z), "queries": (clean.q, corrupt.q),
            "keys": (clean.k, corrupt.k)}[t]
    return bool(torch.equal(a[layer], b[layer])) if t == "layers" else bool(torch.equal(a[layer, i], b[layer, i]))


def _patched_metrics(lm: LoadedModel, pair: Pair, fn: Metric, chunk: list[tuple[str, int, int]],
                     corrupt: _Acts) -> torch.Tensor:
    """One batched forward: row r has node ``chunk[r]`` patched at the last position; returns each
    row's metric minus that of an unpatched row of the same batch (the effect)."""
    from contextlib import ExitStack

    n = len(chunk)
    by: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for r, (t, layer, i) in enumerate(chunk):
        by.setdefault((t, layer), []).append((r, i))

    def rows_of(items):
        return [r for r, _ in items], [i for _, i in items]

    def resid_fn(items, layer):
        rows, _ = rows_of(items)

        def f(h, c):
            h = h.clone()
            h[rows, -1] = corrupt.resid[layer].to(device=h.device, dtype=h.dtype)
            return h
        return f

    def per_head_fn(items, src):
        rows, idx = rows_of(items)

        def f(x):
            x = x.clone()
            x[rows, -1, idx] = src[idx].to(device=x.device, dtype=x.dtype)
            return x
        return f

    steers, head_edits, q_edits, k_edits = [], {}, {}, {}
    for (t, layer), items in by.items():
        if t == "layers":
            steers.append(Steer(torch.zeros(lm.d_model), 1.0, layers=layer, operator="transform",
                                transform=resid_fn(items, layer)))
        elif t == "heads":
            head_edits[layer] = per_head_fn(items, corrupt.z[layer])
        elif t == "queries":
            q_edits[layer] = per_head_fn(items, corrupt.q[layer])
        else:
            k_edits[layer] = per_head_fn(items, corrupt.k[layer])
    x = _ids(lm, pair.clean).repeat(n + 1, 1)  # the last row is the unpatched reference
    with torch.no_grad(), ExitStack() as stack:
        if steers:
            stack.enter_context(steer(lm, steers))
        if head_edits:
            stack.enter_context(heads(lm, read=False, edit=head_edits))
        if q_edits:
            stack.enter_context(projections(lm, "q", read=False, edit=q_edits))
        if k_edits:
            stack.enter_context(projections(lm, "k", read=False, edit=k_edits))
        vals = fn(_forward_logits(lm, x), pair)
    check(vals.shape == (n + 1,), f"the metric must return one value per row, got shape {tuple(vals.shape)}")
    vals = vals.float().cpu()
    return vals[:n] - vals[n]


# ---- validation ------------------------------------------------------------------------------

def correlations(result: Attribution, exact: dict) -> list[dict]:
    """Pearson and Spearman correlation of each method's estimates with the exact patching effects, per
    node type. Signed methods are compared with the signed effects and (``abs``) by magnitude;
    ``atp_star`` with GradDrop is a magnitude, compared with |effect| only."""
    from scipy.stats import pearsonr, spearmanr

    rows = []
    for t, eff in exact["effects"].items():
        y = eff.reshape(-1).double().numpy()
        for m in METHODS:
            if t not in result.estimates.get(m, {}):
                continue
            x = result.estimates[m][t].reshape(-1).double().numpy()
            kinds = ["abs"] if (m == "atp_star") else ["signed", "abs"]
            for kind in kinds:
                xs, ys = (abs(x), abs(y)) if kind == "abs" else (x, y)
                ok = len(xs) > 2 and xs.std() > 0 and ys.std() > 0
                rows.append({"node_type": t, "method": m, "compare": kind, "n_nodes": int(len(xs)),
                             "n_pairs": result.n_pairs,
                             "pearson": float(pearsonr(xs, ys)[0]) if ok else float("nan"),
                             "spearman": float(spearmanr(xs, ys)[0]) if ok else float("nan")})
    return rows


def save_json(data: dict, path: str | os.PathLike) -> str:
    """Atomic write of a JSON report."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return str(p)


__all__ = ["Attribution", "Pair", "METRICS", "NODE_TYPES", "activation_patching", "attribute", "correlations",
           "load_pairs_file", "logit_diff", "logprob", "make_pairs", "pairs_from_contrast", "preset_pairs",
           "suggest_layers", "top_nodes"]
