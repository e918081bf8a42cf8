"""The engine's fast path: a static KV cache and decode steps captured as CUDA graphs.

A :class:`StaticGroup` holds up to ``capacity`` rows (a power of two) in fixed buffers: token ids,
position ids, an additive attention mask ``[capacity, 1, 1, length]``, the KV cache of every layer
``[capacity, heads, length, head_dim]`` and the per-row steering of ``intervene.BatchPlan`` (one
direction, strength, operator and position range per row, layer and slot). Every row writes its
next key/value at the same slot ``c`` each step (rows are right-aligned: a row's tokens end at
``c``; what lies left of its prompt is masked), so one captured graph serves any mix of rows. A
new request is prefilled eagerly and its KV copied into free rows; a slider move or a new request
only writes buffers, and never re-captures unless the steering needs a layer, slot or operator the
captured graph does not have. Per step: one host-to-device copy (ids and positions), one graph
replay, one device-to-host copy (the chosen tokens, done by the engine).

On CPU the same group runs without capture (``Engine(lm, fast="static")``), which is how the tests
check that the static layout gives the same tokens as the eager engine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .intervene import BatchPlan, RowOp, Slot, capture, steer_batch

log = logging.getLogger(__name__)

LENGTH_STEP = 64
DECODE_ATTENTION = "steering_lab_decode"


def _decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for one new token per row over the static cache: grouped-query heads read each key
    and value once (no ``repeat_kv`` copy of the whole cache per step); anything else goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    hkv = key.shape[1]
    if q != 1 or h % hkv or kwargs.get("softcap") is not None or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else d ** -0.5
    grouped = query.reshape(b, hkv, h // hkv, d)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [b, hkv, rep, L]
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, -1:, : key.shape[-2]].float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, hkv, rep, d]
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
        return True
    except Exception:  # noqa: BLE001 - older transformers: plain sdpa then
        log.info("could not register the decode attention; the fast path uses the model's own")
        return False


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def supports_static(lm) -> bool:
    """Architectures whose every layer is plain causal attention with a KV cache we can hold."""
    cfg = lm.model.config
    types = getattr(cfg, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    if getattr(cfg, "model_type", "") in ("gpt2", "gpt_neox", "gemma2", "gemma3_text", "gemma3"):
        return False  # no sliding windows, soft-capping or non-standard caches in the fast path
    return True


def _cache_class():
    from transformers.cache_utils import Cache, CacheLayerMixin

    class SlotLayer(CacheLayerMixin):
        """A KV layer whose ``update`` writes at the group's shared slot ``write`` (a device tensor)."""

        is_compileable = True
        is_sliding = False
        is_croppable = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, write: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values, self.write = keys, values, write
            self.is_initialized = True
            self.device = keys.device

        def lazy_initialization(self, *args, **kwargs) -> None:  # buffers exist from the start
            return None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            t = key_states.shape[-2]
            idx = self.write if t == 1 else self.write + torch.arange(t, device=self.write.device)
            self.keys.index_copy_(2, idx, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, idx, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.keys.shape[-2]

        def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
            return self.keys.shape[-2], 0

        def get_max_length(self) -> int:
            return self.keys.shape[-2]

    def make(layers: list) -> Any:
        try:
            return Cache(layers=layers)
        except TypeError:  # pragma: no cover - other transformers versions
            cache = Cache()
            cache.layers = layers
            return cache

    return SlotLayer, make


class StaticGroup:
    """Rows decoded through fixed buffers (see the module docstring)."""

    static = True

    def __init__(self, engine, capacity: int, length: int, kv_shapes: list[tuple[tuple, torch.dtype, torch.device]],
                 graphs: bool) -> None:
        self.engine = engine
        lm = engine.lm
        self.capacity, self.length = capacity, length
        dev = lm.device
        self.device = dev
        self.dtype = lm.dtype
        self.graphs = graphs and dev.type == "cuda"
        self.rows: list = []
        self.slot_of: dict[int, int] = {}  # id(row) -> slot
        self.free = list(range(capacity))
        self.c = 0
        self.write = torch.zeros(1, dtype=torch.long, device=dev)
        self.ids = torch.zeros((capacity, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((capacity, 1), dtype=torch.long, device=dev)
        self.neg = torch.finfo(self.dtype).min
        self.mask = torch.full((capacity, 1, 1, length), self.neg, dtype=self.dtype, device=dev)
        self.mask[:, 0, 0, 0] = 0  # free rows attend to one slot (no NaN rows)
        SlotLayer, make = _cache_class()
        self.kv = []
        for (heads, head_dim), kdtype, kdev in kv_shapes:
            k = torch.zeros((capacity, heads, length, head_dim), dtype=kdtype, device=kdev)
            v = torch.zeros_like(k)
            self.kv.append((k, v))
        self.cache = make([SlotLayer(k, v, self.write) for k, v in self.kv])
        self.plan: BatchPlan | None = None
        self.structure: tuple = ()
        self.mon_layers: tuple[int, ...] = ()
        self.mon_bufs: dict[int, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = {}
        self.plan_dirty = False
        self._slots: torch.Tensor | None = None
        self.exclusive = False
        self.mergeable = False

    # ---- building ----------------------------------------------------------------------------
    @classmethod
    def for_rows(cls, engine, prefill_group, max_new: int, graphs: bool) -> StaticGroup:
        rows = len(prefill_group.rows)
        t_pad = prefill_group.mask.shape[1]
        capacity = max(_next_pow2(rows), engine.min_capacity)
        length = ((t_pad + max_new + LENGTH_STEP) // LENGTH_STEP) * LENGTH_STEP
        length = max(length, engine.min_length)
        shapes = [((layer.keys.shape[1], layer.keys.shape[-1]), layer.keys.dtype, layer.keys.device)
                  for layer in prefill_group.cache.layers]
        return cls(engine, capacity, length, shapes, graphs)

    def remaining(self, row) -> int:
        state = row.state
        return state.request.max_new_tokens - len(state.out[row.i])

    def can_take(self, prefill_group) -> bool:
        n = len(prefill_group.rows)
        if n > len(self.free):
            return False
        if len(prefill_group.cache.layers) != len(self.kv):
            return False
        t_pad = prefill_group.mask.shape[1]
        c = self.c if self.rows else 0
        shift = max(0, t_pad - c)
        need_new = max(self.remaining(r) for r in prefill_group.rows) + 1
        need_old = max((self.remaining(r) for r in self.rows), default=0) + 1
        return c + shift + max(need_new, need_old) <= self.length

    def take(self, prefill_group) -> None:
        """Copy a prefilled group's rows (KV cache, mask) into free rows."""
        t_pad = prefill_group.mask.shape[1]
        if not self.rows:
            self.c = t_pad
            self.mask.fill_(self.neg)
            self.mask[:, 0, 0, 0] = 0
        elif t_pad > self.c:
            self._shift(t_pad - self.c)
        c = self.c
        slots = [self.free.pop(0) for _ in prefill_group.rows]
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        for (k, v), layer in zip(self.kv, prefill_group.cache.layers):
            ki = idx.to(k.device)
            k[ki, :, c - t_pad:c] = layer.keys.to(k.device, k.dtype)
            v[ki, :, c - t_pad:c] = layer.values.to(v.device, v.dtype)
        m = prefill_group.mask.to(self.device)
        rowmask = torch.full((len(slots), self.length), self.neg, dtype=self.dtype, device=self.device)
        rowmask[:, c - t_pad:c] = torch.where(m.bool(), 0.0, self.neg).to(self.dtype)
        self.mask[idx, 0, 0] = rowmask
        for row, s in zip(prefill_group.rows, slots):
            self.slot_of[id(row)] = s
        self.rows += prefill_group.rows
        self.plan_dirty = True
        self._slots = None

    def _shift(self, s: int) -> None:
        """Move every row's cached tokens ``s`` slots to the right (room for a longer prompt)."""
        for k, v in self.kv:
            k[:, :, s:] = k[:, :, :-s].clone()
            v[:, :, s:] = v[:, :, :-s].clone()
        self.mask[..., s:] = self.mask[..., :-s].clone()
        self.mask[..., :s] = self.neg
        self.mask[:, 0, 0, 0] = 0 if not self.rows else self.mask[:, 0, 0, 0]
        self.c += s

    def select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        kept = [self.rows[i] for i in keep]
        gone = [r for r in self.rows if id(r) not in {id(x) for x in kept}]
        for r in gone:
            s = self.slot_of.pop(id(r))
            self.free.append(s)
            self.mask[s] = self.neg
            self.mask[s, 0, 0, 0] = 0
        self.free.sort()
        self.rows = kept
        self.plan_dirty = True
        self._slots = None

    # ---- steering buffers ---------------------------------------------------------------------
    def _row_ops(self) -> dict[int, list[tuple[int, RowOp]]]:
        out: dict[int, list[tuple[int, RowOp]]] = {}
        for r in self.rows:
            out[self.slot_of[id(r)]] = [(k, op) for _, k, op in r.state.rows_ops[r.i]]
        return out

    def _sync_plan(self) -> None:
        """Write every row's steering into the plan buffers; a new structure means a new plan."""
        per_slot = self._row_ops()
        needed: dict[tuple[int, int], set[str]] = {}
        for ops in per_slot.values():
            seen: dict[int, int] = {}
            for k, op in ops:
                j = seen.get(k, 0)
                seen[k] = j + 1
                needed.setdefault((k, j), set()).add(op.operator)
        have = {(k, j): slot.present for k, slots in (self.plan.slots.items() if self.plan else [])
                for j, slot in enumerate(slots)}
        fits = self.plan is not None and all(key in have and ops <= have[key] for key, ops in needed.items())
        rows = [per_slot.get(s, []) for s in range(self.capacity)]
        if not fits:
            merged = {key: set(ops) | set(have.get(key, ())) for key, ops in needed.items()}
            self.plan = BatchPlan.build(self.engine.lm, rows)
            for k, slots in self.plan.slots.items():
                for j, slot in enumerate(slots):
                    slot.present = set(merged.get((k, j), slot.present))
                    slot.scoped = True
            self.structure = tuple(sorted((k, j, tuple(sorted(s.present)))
                                          for k, slots in self.plan.slots.items() for j, s in enumerate(slots)))
            self._graphs.clear()  # captured graphs read the old plan's buffers
            return
        # same structure: write the rows in place (the captured graph reads these buffers)
        fresh = BatchPlan.build(self.engine.lm, rows)
        for k, slots in self.plan.slots.items():
            for j, slot in enumerate(slots):
                new = fresh.slots.get(k, [])
                src: Slot | None = new[j] if j < len(new) else None
                if src is None:
                    slot.opcode.zero_()
                    slot.strength.zero_()
                    continue
                slot.load_(src)

    # ---- one step --------------------------------------------------------------------------------
    def forward_step(self, ids: list[int], pos: list[int], watch: list[int]) -> tuple[torch.Tensor, dict]:
        if self.plan_dirty:
            self._sync_plan()
            self.plan_dirty = False
            self._slots = None
        if self._slots is None:
            self._slots = torch.as_tensor([self.slot_of[id(r)] for r in self.rows], dtype=torch.long,
                                          device=self.device)
        sl_dev = self._slots
        dev = torch.tensor([ids, pos], dtype=torch.long).to(self.device)  # the step's one host-to-device copy
        self.ids.index_copy_(0, sl_dev, dev[0][:, None])
        self.pos.index_copy_(0, sl_dev, dev[1][:, None])
        self.write.fill_(self.c)
        self.mask[sl_dev, 0, 0, self.c] = 0
        key = (self.structure, tuple(watch))
        if self.graphs:
            logits, bufs = self._replay(key, watch)
        else:
            logits, bufs = self._run(watch)
        self.c += 1
        reads = {k: bufs[k].index_select(0, sl_dev) for k in watch}
        return logits.index_select(0, sl_dev), reads

    def _run(self, watch: list[int]) -> tuple[torch.Tensor, dict]:
        lm = self.engine.lm
        if self.plan is not None:
            self.plan.positions = self.pos
        bufs: dict[int, torch.Tensor] = {}

        def keep(k, h):
            bufs[k] = h[:, -1].float()
            return bufs[k]

        kwargs = {lm.cache_kwarg: self.cache, "use_cache": True}
        from .engine import forward_accepts

        if forward_accepts(lm.model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        forward = self.engine.model_forward()
        config = lm.model.config
        old = getattr(config, "_attn_implementation", None)
        swap = old in ("sdpa", "eager") and _ATTENTION_OK
        try:
            if swap:  # for the static step only (a prompt, q_len > 1, would fall back to sdpa anyway)
                config._attn_implementation = DECODE_ATTENTION
            with torch.inference_mode(), steer_batch(lm, self.plan), capture(lm, watch, fn=keep):
                out = forward(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, **kwargs)
        finally:
            if swap:
                config._attn_implementation = old
        return out.logits[:, -1].float(), bufs

    def _replay(self, key: tuple, watch: list[int]) -> tuple[torch.Tensor, dict]:
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(watch)
            self._graphs[key] = entry
            return entry[1], entry[2]  # the warm-up run already computed this step
        graph, logits, bufs = entry
        graph.replay()
        return logits, bufs

    def _capture(self, watch: list[int]):
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # warm-up: computes this very step (its KV write is the one the step makes)
            logits, bufs = self._run(watch)
            result = (logits.clone(), {k: v.clone() for k, v in bufs.items()})
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.engine.graph_pool()):
            g_logits, g_bufs = self._run(watch)
        # capturing does not run the kernels: this step's result is the warm-up's
        with torch.inference_mode():
            g_logits.copy_(result[0])
            for k, v in result[1].items():
                g_bufs[k].copy_(v)
        log.info("captured a decode step: %d rows x %d slots, steering %s, monitors %s", self.capacity, self.length,
                 self.structure, watch)
        return graph, g_logits, g_bufs


_ATTENTION_OK = _register_attention()
