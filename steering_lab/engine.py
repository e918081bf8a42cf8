"""THE decode loop: requests in, steps out, many requests in one running batch.

A :class:`Request` carries its prompt(s), its own steering (any number of ``Steer`` items, per-row
strengths allowed), sampling settings, monitors and special modes:

* ``follow={i: j}``: row ``i`` is fed the tokens row ``j`` chooses (a *shadow* row: the unsteered
  model reading the steered text, for live KL and perplexity);
* ``control``: a callback run after every forward pass, before tokens are chosen, that may change
  the request's strengths for the next step (dynamic composition) or rewind the last tokens and
  re-run them (steer-when-needed with backtracking; needs ``exclusive=True``);
* ``monitors``: functions of the residual stream read at every step (probe scores, projections).

:meth:`Engine.submit` returns a :class:`Handle`; iterating it yields one :class:`Step` per generated
token. The engine admits new requests at step boundaries into the running batch (their prompt is
prefilled on its own, then its KV cache is merged into the batch's, left-padded) and retires
finished or cancelled rows at the next step, so concurrent users share one forward pass per token
while each row keeps its own vectors, layers, operators and strengths (``intervene.BatchPlan``).

There is no background thread: whoever waits for a step drives the engine (one thread at a time
runs a step for every request; the others wait for it). Steering hooks are attached around each of
the engine's own forward passes and act only on the thread that runs them, so any other forward
pass (an extraction, a probe being trained) sees the unsteered model even while the engine runs,
and no hook is left on the model between steps.

A CUDA-graph fast path (``engine_fast.py``) takes over groups of rows on a single CUDA device; the
eager path here is the fallback with the same API (CPU, models split across GPUs, architectures
or operators the fast path cannot capture).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .activations import pad_left
from .errors import UserError, check
from .intervene import (
    NO_END,
    BatchPlan,
    RowOp,
    Steer,
    capture,
    check_transport_strength,
    steer_batch,
    strength_tensor,
    transport_maps,
)
from .model import LoadedModel
from .vector import as_directions

log = logging.getLogger(__name__)


# ---- requests and steps ------------------------------------------------------------------------

@dataclass
class Request:
    """One generation request: ``prompt_ids[i]`` is row ``i``'s prompt (token ids)."""

    prompt_ids: Sequence[Sequence[int]]
    steering: Sequence[Steer] = ()
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    monitors: Sequence = ()
    follow: dict[int, int] | None = None
    want_logits: bool = False
    prompt_len: int | None = None  # scope boundary (position id) for prompt/generated scopes; default per row
    control: Callable[[Control], None] | None = None
    exclusive: bool = False  # own KV cache, never merged (needed to rewind)
    stop_on_eos: bool = True
    tag: Any = None  # free for the caller (e.g. a session id)


class Step:
    """One decode step of a request: the new token of each row, and each row's text so far.

    ``monitor[name][row]`` is the value of each monitor on the residual stream at the position that
    chose this step's token (the last prompt token for step 0). Texts are decoded on first access.
    """

    __slots__ = ("index", "tokens", "done", "monitor", "logits", "extra", "_decode", "_texts", "_lens", "_rows",
                 "_ids")

    def __init__(self, index: int, tokens: list[int], done: list[bool], token_ids: list[int],
                 monitor: dict[str, list[float]], logits: torch.Tensor | None, extra: dict,
                 decode: Callable[[list[int]], str], rows: list[list[int]]) -> None:
        self.index, self.tokens, self.done = index, tokens, done
        self.monitor, self.logits, self.extra = monitor, logits, extra
        self._decode, self._texts = decode, None
        self._lens, self._rows, self._ids = token_ids, rows, None  # each row's length at this step

    @property
    def token_ids(self) -> list[list[int]]:
        """Each row's generated token ids up to this step (EOS included when reached)."""
        if self._ids is None:
            self._ids = [list(row[:n]) for row, n in zip(self._rows, self._lens)]
        return self._ids

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self._decode(row) for row in self.token_ids]
        return self._texts


class Control:
    """What a request's ``control`` callback sees and may change, once per step."""

    def __init__(self, engine: Engine, state: _RequestState, logits: torch.Tensor, monitor: dict[str, list[float]]):
        self._engine, self._state = engine, state
        self.logits = logits      # [rows, V] float32, the distributions this step's tokens are chosen from
        self.monitor = monitor    # name -> value per row
        self.extra: dict = {}     # copied into this step's Step.extra
        self.rewound: int | None = None

    @property
    def generated(self) -> list[list[int]]:
        return [list(r) for r in self._state.out]

    @property
    def step(self) -> int:
        return len(self._state.out[0])

    def strength(self, index: int) -> torch.Tensor:
        return self._state.strengths[index].clone()

    def set_strength(self, index: int, value: float | Sequence[float] | torch.Tensor) -> None:
        """Strengths of the request's ``index``-th Steer from the next forward pass on."""
        self._state.set_strength(index, value)

    def rewind(self, n: int) -> None:
        """Drop the last ``n`` generated tokens (text and KV cache) and re-run the position before
        them; no token is chosen this step. Needs an exclusive request."""
        check(self._state.request.exclusive and self._state.n == 1, "rewind needs a one-row Request(exclusive=True)")
        self.rewound = max(0, int(n))


class Cancelled(Exception):
    """Raised inside the engine for a request whose consumer went away (never reaches users)."""


# ---- request state -----------------------------------------------------------------------------

class _RequestState:
    def __init__(self, engine: Engine, request: Request) -> None:
        lm = engine.lm
        self.request = request
        self.n = len(request.prompt_ids)
        self.prompts = [list(p) for p in request.prompt_ids]
        self.out: list[list[int]] = [[] for _ in range(self.n)]
        self.done = [False] * self.n
        self.queue: deque[Step] = deque()
        self.finished = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.strengths = [strength_tensor(s.strength) for s in request.steering]
        for j, s in enumerate(self.strengths):
            check(s.numel() in (1, self.n), f"steering {j}: {s.numel()} strengths for {self.n} rows")
        self.generator = (torch.Generator().manual_seed(request.seed)
                          if request.temperature > 0 and request.seed is not None else None)
        self.processors = _warpers(request.temperature, request.top_p)
        self.eos = set(lm.eos_ids)
        self.eos0 = lm.eos_ids[0] if lm.eos_ids else -1
        self.plan_dirty = False
        self.rows_ops = [self._row_ops(i) for i in range(self.n)]
        self.decode = lambda row, lm=lm, eos=self.eos: lm.decode([t for t in row if t not in eos])
        self.simple = (request.temperature <= 0 and request.control is None and not request.monitors
                       and not request.want_logits and not request.follow)
        n_layers, width = lm.n_layers, lm.d_model
        for row in self.rows_ops:
            for _, k, op in row:
                check(0 <= k < n_layers, f"layer {k} is out of range: the model has {n_layers} blocks "
                                         f"(layers 0-{n_layers - 1})")
                if op.operator != "transform":
                    check(op.direction.shape[-1] == width, f"direction for layer {k} has width "
                                                           f"{op.direction.shape[-1]} but the model's is {width}")

    def _row_ops(self, i: int) -> list[tuple[int, int, RowOp]]:
        """``(steer index, layer, op)`` for row ``i``, in application order."""
        req = self.request
        out = []
        plen = req.prompt_len if req.prompt_len is not None else len(self.prompts[i])
        for j, item in enumerate(req.steering):
            if item.rows is not None and not bool(list(item.rows)[i]):
                continue
            s = self.strengths[j]
            value = float(s[i] if s.numel() > 1 else s[0])
            start, end = {"all": (0, NO_END), "prompt": (0, plen), "generated": (plen, NO_END)}[item.scope]
            if item.operator == "transform":
                for k in (item.layers if isinstance(item.layers, (list, tuple)) else [item.layers]):
                    out.append((j, int(k), RowOp(torch.zeros(0), value, "transform", start, end, item.transform)))
                continue
            maps = transport_maps(item) if item.operator == "transport" else {}
            for k, d in as_directions(item.vector, item.layers).items():
                out.append((j, int(k), RowOp(d, value, item.operator, start, end, maps=maps.get(k))))
        return out

    def set_strength(self, index: int, value) -> None:
        new = strength_tensor(value)
        check(new.numel() == self.strengths[index].numel(),
              f"steering {index} has {self.strengths[index].numel()} strength(s), got {new.numel()}")
        if self.request.steering[index].operator == "transport":
            check_transport_strength(new)
        self.strengths[index] = new
        for i in range(self.n):
            for j, _, op in self.rows_ops[i]:
                if j == index:
                    op.strength = float(new[i] if new.numel() > 1 else new[0])
        self.plan_dirty = True

    @property
    def all_done(self) -> bool:
        return all(self.done)


@lru_cache(maxsize=64)
def _warpers(temperature: float, top_p: float):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if temperature <= 0:
        return None
    procs = [TemperatureLogitsWarper(float(temperature))]
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    return LogitsProcessorList(procs)


def _choose(state: _RequestState, logits: torch.Tensor) -> list[int]:
    if state.processors is None:
        return logits.argmax(-1).tolist()
    scores = state.processors(None, logits.float())
    probs = torch.softmax(scores, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=state.generator).squeeze(-1).tolist()


# ---- rows and groups ----------------------------------------------------------------------------

class _Row:
    __slots__ = ("state", "i", "pos", "pending")

    def __init__(self, state: _RequestState, i: int, pos: int) -> None:
        self.state, self.i, self.pos, self.pending = state, i, pos, None


def _mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class _Group:
    """Rows sharing one KV cache (left-padded), decoded by one forward pass per step."""

    def __init__(self, engine: Engine, rows: list[_Row], cache, mask: torch.Tensor, exclusive: bool) -> None:
        self.engine = engine
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [R, T] 1 = real token in the cache
        self.exclusive = exclusive
        self.plan: BatchPlan | None = None
        self.plan_dirty = True

    @property
    def mergeable(self) -> bool:
        return not self.exclusive and _mergeable(self.cache)

    def select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache.batch_select_indices(idx)
            self.mask = self.mask.index_select(0, idx)
            self._trim()
        self.plan_dirty = True

    def _trim(self) -> None:
        """Drop left columns that are padding in every row."""
        if not _mergeable(self.cache):
            return
        real = self.mask.any(0)
        if not bool(real[0]):
            first = int(real.nonzero()[0]) if bool(real.any()) else self.mask.shape[1]
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]

    def merge(self, other: _Group) -> None:
        """Append ``other``'s rows (and cache) to this group, left-padding the shorter one."""
        t_self, t_other = self.mask.shape[1], other.mask.shape[1]
        width = max(t_self, t_other)

        def padded(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([padded(mine.keys, t_self, -2), padded(theirs.keys.to(mine.keys.device), t_other,
                                                                          -2)], 0)
            mine.values = torch.cat([padded(mine.values, t_self, -2),
                                     padded(theirs.values.to(mine.values.device), t_other, -2)], 0)
        self.mask = torch.cat([padded(self.mask, t_self, 1), padded(other.mask, t_other, 1)], 0)
        self.rows += other.rows
        self.plan_dirty = True

    def build_plan(self) -> BatchPlan | None:
        if self.plan_dirty or any(r.state.plan_dirty for r in self.rows):
            rows = [[(k, op) for _, k, op in r.state.rows_ops[r.i]] for r in self.rows]
            self.plan = BatchPlan.build(self.engine.lm, rows) if any(rows) else None
            self.plan_dirty = False
        return self.plan


# ---- the engine ---------------------------------------------------------------------------------

class Engine:
    """The one decode loop of a model (see the module docstring). Thread-safe."""

    def __init__(self, lm: LoadedModel, *, max_rows: int = 256, fast: str | bool | None = None,
                 min_capacity: int = 8, min_length: int = 64, compile: bool = False) -> None:
        """``fast``: ``None`` picks CUDA graphs on a single CUDA device for architectures that allow
        them, else eager; ``"graphs"``, ``"static"`` (static cache without capture: the same layout,
        for checking it on CPU) or ``"eager"``/``False``."""
        from .engine_fast import supports_static

        self.lm = lm
        self.max_rows = max_rows
        if fast is None:
            fast = "graphs" if (lm.device.type == "cuda" and not lm.is_split and supports_static(lm)) else "eager"
        elif fast is True:
            fast = "graphs"
        elif fast is False:
            fast = "eager"
        check(fast in ("graphs", "static", "eager"), f"unknown fast mode {fast!r}")
        if fast != "eager":
            check(supports_static(lm) and not lm.is_split, f"the fast path does not support {lm.name}")
        self.fast = fast
        self.min_capacity, self.min_length = min_capacity, min_length
        self.compile = compile
        self._compiled = None
        self._pool = None
        self._outbox: list = []
        self._idle_static: list = []  # emptied static groups keep their buffers and captured graphs
        self._cond = threading.Condition()
        self._pending: deque[_RequestState] = deque()
        self._groups: list[_Group] = []
        self._driving = False
        self._reap_due = False  # a request was cancelled: retire it even if no one drives (see _reap)
        self._step_lock = threading.Lock()
        self.steps_run = 0

    # -- public API --
    def submit(self, request: Request) -> Handle:
        """Queue ``request``; it joins the running batch at the next step boundary."""
        _validate(self.lm, request)
        state = _RequestState(self, request)
        with self._cond:
            self._pending.append(state)
            self._cond.notify_all()
        return Handle(self, state)

    def stream(self, request: Request) -> Iterator[Step]:
        """Submit ``request`` and yield its steps (closing the iterator cancels it)."""
        yield from self.submit(request)

    def cancel(self, tag) -> int:
        """Cancel every request submitted with ``tag`` (e.g. a browser session); returns how many.
        Their rows leave the batch at the next step."""
        n = 0
        with self._cond:
            states = list(self._pending) + [r.state for g in self._groups for r in g.rows]
            for state in {id(s): s for s in states}.values():
                if state.request.tag is not None and state.request.tag == tag and not state.cancelled:
                    state.cancelled = True
                    n += 1
            self._reap_due = self._reap_due or n > 0
            self._cond.notify_all()
        self._reap()
        return n

    @property
    def active_rows(self) -> int:
        with self._cond:
            return sum(len(g.rows) for g in self._groups)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._groups

    # -- driving --
    def _wait_or_drive(self, state: _RequestState) -> None:
        with self._cond:
            if state.queue or state.finished:
                return
            if self._driving:
                self._cond.wait(timeout=0.5)
                return
            self._driving = True
        try:
            self.step()
        finally:
            with self._cond:
                self._driving = False
                self._cond.notify_all()
            self._reap()

    def _reap(self) -> None:
        """Retire cancelled requests now unless a thread is driving (the driver retires them at its
        step boundary and calls this when it stops): a cancelled request whose consumer is gone (a
        closed tab, a cancelled job) leaves the batch and frees its KV cache even when no one else
        waits for a step."""
        with self._cond:
            if self._driving or not self._reap_due:
                return
            self._driving, self._reap_due = True, False
        try:
            with self._step_lock:
                self._retire()
        finally:
            with self._cond:
                self._driving = False
                self._cond.notify_all()

    def step(self) -> None:
        """Advance every request by one token (admitting pending ones, retiring finished ones)."""
        with self._step_lock:
            self._retire()
            for group in list(self._groups):
                try:
                    self._decode(group)
                except Exception as exc:  # noqa: BLE001 - delivered to the requests of this group
                    self._fail_group(group, exc)
            self._retire()
            self._admit()
            self.steps_run += 1

    def _fail_group(self, group: _Group, exc: BaseException) -> None:
        log.exception("decode step failed")
        for r in group.rows:
            self._finish(r.state, exc)
        with self._cond:
            if group in self._groups:
                self._groups.remove(group)

    def _finish(self, state: _RequestState, error: BaseException | None = None) -> None:
        with self._cond:
            if error is not None and state.error is None and not state.cancelled:
                state.error = error
            state.finished = True
            self._cond.notify_all()

    def _retire(self) -> None:
        with self._cond:
            for state in list(self._pending):
                if state.cancelled:
                    self._pending.remove(state)
                    state.finished = True
            groups = list(self._groups)
        for group in groups:
            keep = [i for i, r in enumerate(group.rows)
                    if not (r.state.cancelled or r.state.finished or r.state.done[r.i])]
            finished = {id(r.state): r.state for r in group.rows if r.state.cancelled or r.state.all_done}
            group.select(keep)
            for state in finished.values():
                self._finish(state)
            if not group.rows:
                with self._cond:
                    self._groups.remove(group)
                if getattr(group, "static", False):
                    self._idle_static = [group] + self._idle_static[:1]

    def _admit(self) -> None:
        while True:
            batch: list[_RequestState] = []
            with self._cond:
                room = self.max_rows - self.active_rows_unlocked()
                while self._pending:
                    state = self._pending[0]
                    if batch and (state.request.exclusive or batch[0].request.exclusive):
                        break  # an exclusive request is prefilled on its own
                    if state.n > room and (self._groups or batch):
                        break  # full: wait for rows to retire
                    batch.append(self._pending.popleft())
                    room -= state.n
            if not batch:
                return
            try:
                group = self._prefill(batch)
            except Exception as exc:  # noqa: BLE001 - these requests fail, the others go on
                if not isinstance(exc, UserError):
                    log.exception("prefill failed")
                for state in batch:
                    self._finish(state, exc)
                continue
            for state in batch:
                if state.all_done:
                    self._finish(state)
            if group is not None:
                self._place(group)

    def _place(self, group: _Group) -> None:
        """Put a prefilled group where it will decode: into a static group (fast path), merged into a
        running eager group, or as a group of its own."""
        from .engine_fast import StaticGroup

        if self.fast != "eager" and not group.exclusive and not any(
                op.operator == "transform" for r in group.rows for _, _, op in r.state.rows_ops[r.i]):
            target = next((g for g in self._groups if getattr(g, "static", False) and g.can_take(group)), None)
            if target is None:
                target = next((g for g in self._idle_static if g.can_take(group)), None)
                if target is not None:
                    self._idle_static.remove(target)
                else:
                    max_new = max(r.state.request.max_new_tokens for r in group.rows)
                    target = StaticGroup.for_rows(self, group, max_new, graphs=self.fast == "graphs")
                with self._cond:
                    self._groups.append(target)
            target.take(group)
            return
        target = None
        if group.mergeable:
            target = next((g for g in self._groups if not getattr(g, "static", False) and g.mergeable), None)
        with self._cond:
            if target is not None:
                target.merge(group)
            else:
                self._groups.append(group)

    def model_forward(self):
        """The model's forward for the fast path: ``torch.compile``d when asked (fused kernels, then
        captured in the CUDA graph), else the plain one."""
        if not self.compile:
            return self.lm.model
        if self._compiled is None:
            self._compiled = torch.compile(self.lm.model, dynamic=False)
        return self._compiled

    def graph_pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def active_rows_unlocked(self) -> int:
        return sum(len(g.rows) for g in self._groups)

    # -- forward passes --
    def _forward(self, group: _Group, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 watch: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        lm = self.lm
        kwargs = {lm.cache_kwarg: group.cache, "use_cache": True}
        if _forward_accepts(type(lm.model), "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        plan = group.build_plan()
        if plan is not None:
            plan.positions = pos
        with torch.inference_mode(), steer_batch(lm, plan), \
                capture(lm, watch, fn=lambda k, h: h[:, -1].float()) as cap:
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        if plan is not None:
            plan.positions = None
        reads = {k: cap.outputs[k][-1] for k in watch}
        # a model split across devices returns logits on its last device
        return out.logits[:, -1].float().to(lm.device), reads

    def _prefill(self, states: list[_RequestState]) -> _Group | None:
        lm = self.lm
        prompts = [p for state in states for p in state.prompts]
        ids, mask, pos = pad_left(prompts, lm.pad_id, lm.device)
        rows = [_Row(state, i, len(p)) for state in states for i, p in enumerate(state.prompts)]
        group = _Group(self, rows, _new_cache(lm), mask, any(s.request.exclusive for s in states))
        watch = sorted({m.layer for state in states for m in state.request.monitors})
        logits, reads = self._forward(group, ids, mask, pos, watch)
        self._emit(group, list(range(len(rows))), logits, reads)
        keep = [i for i, r in enumerate(rows) if not r.state.done[r.i] and not r.state.cancelled]
        if not keep:
            return None
        group.select(keep)
        return group

    def _decode(self, group: _Group) -> None:
        live = [i for i, r in enumerate(group.rows) if r.pending is not None]
        if not live:
            return
        check(len(live) == len(group.rows), "internal: a row without a pending token")
        lm = self.lm
        watch = sorted({m.layer for r in group.rows for m in r.state.request.monitors})
        if getattr(group, "static", False):
            logits, reads = group.forward_step([r.pending for r in group.rows], [r.pos for r in group.rows], watch)
            for r in group.rows:
                r.pos += 1
                r.pending = None
            self._emit(group, list(range(len(group.rows))), logits, reads)
            return
        ids = torch.tensor([[r.pending] for r in group.rows], dtype=torch.long, device=lm.device)
        pos = torch.tensor([[r.pos] for r in group.rows], dtype=torch.long, device=lm.device)
        group.mask = torch.cat([group.mask, torch.ones((len(group.rows), 1), dtype=group.mask.dtype,
                                                       device=group.mask.device)], dim=1)
        logits, reads = self._forward(group, ids, group.mask, pos, watch)
        for r in group.rows:
            r.pos += 1
            r.pending = None
        self._emit(group, list(range(len(group.rows))), logits, reads)

    def _emit(self, group: _Group, idx: list[int], logits: torch.Tensor, reads: dict[int, torch.Tensor]) -> None:
        """Choose tokens for the rows ``idx`` of ``group`` from ``logits``, request by request."""
        by_state: dict[int, list[int]] = {}
        for i in idx:
            by_state.setdefault(id(group.rows[i].state), []).append(i)
        greedy: list[int] | None = None
        try:
            self._emit_all(group, by_state, logits, reads, greedy)
        finally:
            self._flush()

    def _emit_all(self, group, by_state, logits, reads, greedy) -> None:
        for members in by_state.values():
            state = group.rows[members[0]].state
            if state.cancelled:
                continue
            try:
                if state.simple:
                    if greedy is None:  # one device-to-host copy for every plain greedy row of the batch
                        greedy = logits.argmax(-1).tolist()
                    self._emit_simple(group, state, members, greedy)
                    continue
                self._emit_request(group, state, members, logits, reads)
            except Exception as exc:  # noqa: BLE001 - a failing callback or monitor ends its own request
                if not isinstance(exc, UserError):
                    log.exception("request failed")
                self._finish(state, exc)
                state.cancelled = True

    def _emit_simple(self, group: _Group, state: _RequestState, members: list[int], greedy: list[int]) -> None:
        """A greedy request without monitors, callbacks or logits: no tensor work of its own."""
        req = state.request
        tokens = [state.eos0] * state.n
        for gi in members:
            row = group.rows[gi]
            i = row.i
            t = greedy[gi]
            tokens[i] = t
            out = state.out[i]
            out.append(t)
            if (req.stop_on_eos and t in state.eos) or len(out) >= req.max_new_tokens:
                state.done[i] = True
            else:
                row.pending = t
        self._push(state, tokens, {}, None, {})

    def _push(self, state: _RequestState, tokens: list[int], monitor: dict, logits, extra: dict) -> None:
        index = len(state.out[0]) - 1 if state.n == 1 else max(map(len, state.out)) - 1
        step = Step(index=index, tokens=tokens, done=list(state.done),
                    token_ids=[len(o) for o in state.out], monitor=monitor, logits=logits, extra=extra,
                    decode=state.decode, rows=state.out)
        self._outbox.append((state, step, all(state.done)))

    def _flush(self) -> None:
        """Hand this step's outputs to their consumers (one lock, one wake-up)."""
        if not self._outbox:
            return
        with self._cond:
            for state, step, finished in self._outbox:
                state.queue.append(step)
                if finished:
                    state.finished = True
            self._cond.notify_all()
        self._outbox.clear()

    def _emit_request(self, group: _Group, state: _RequestState, members: list[int], logits: torch.Tensor,
                      reads: dict[int, torch.Tensor]) -> None:
        req = state.request
        n = state.n
        row_of = {group.rows[i].i: i for i in members}  # request row -> group row
        sel = torch.as_tensor([row_of[i] for i in range(n) if i in row_of], dtype=torch.long, device=logits.device)
        present = [i for i in range(n) if i in row_of]
        full = torch.full((n, logits.shape[-1]), float("nan"), device=logits.device)
        full[present] = logits.index_select(0, sel)
        monitor: dict[str, list[float]] = {}
        for m in req.monitors:
            h = reads[m.layer]
            values = [float("nan")] * n
            vals = m.read(h.index_select(0, sel.to(h.device))).float().cpu().tolist()
            for i, v in zip(present, vals):
                values[i] = v
            monitor[m.name] = values
        extra: dict = {}
        if req.control is not None:
            ctl = Control(self, state, full, monitor)
            req.control(ctl)
            extra = ctl.extra
            if ctl.rewound is not None:
                self._rewind(group, state, ctl.rewound)
                return
        chosen = [0] * n
        picked = _choose(state, full[present]) if present else []
        for i, t in zip(present, picked):
            chosen[i] = t
        for i, j in (req.follow or {}).items():
            chosen[i] = chosen[j]
        tokens = []
        for i in range(n):
            if state.done[i]:
                tokens.append(state.eos0)
                continue
            t = chosen[i]
            tokens.append(t)
            state.out[i].append(t)
            if (req.stop_on_eos and t in state.eos) or len(state.out[i]) >= req.max_new_tokens:
                state.done[i] = True
        for i in present:
            r = group.rows[row_of[i]]
            if not state.done[i]:
                r.pending = tokens[i]
        if state.plan_dirty:
            group.plan_dirty = True
            state.plan_dirty = False
        self._push(state, tokens, monitor, full if req.want_logits else None, extra)

    def _rewind(self, group: _Group, state: _RequestState, n: int) -> None:
        """Drop the last ``n`` tokens of an exclusive (single-group) request and re-run the position
        before them with the current steering."""
        check(len(group.rows) == state.n, "internal: rewind on a shared group")
        if state.plan_dirty:
            group.plan_dirty = True
            state.plan_dirty = False
        for r in group.rows:
            out = state.out[r.i]
            keep = max(0, len(out) - n)
            del out[keep:]
            prompt = state.prompts[r.i]
            last = out[-1] if out else prompt[-1]
            # the cache holds prompt + out[:-1]; keep prompt + out[:keep-1], then feed `last` again
            real = len(prompt) + keep - 1
            r.pos = real
            r.pending = last
        remove = group.cache.get_seq_length() - (len(state.prompts[0]) + len(state.out[0]) - 1)
        if remove > 0:
            group.cache.crop(-remove)
            group.mask = group.mask[:, :-remove]


class Handle:
    """A submitted request: iterate it for its steps; ``cancel()`` retires its rows at the next step."""

    def __init__(self, engine: Engine, state: _RequestState) -> None:
        self.engine, self._state = engine, state

    def __iter__(self) -> Iterator[Step]:
        try:
            while True:
                step = self._next()
                if step is None:
                    return
                yield step
        finally:
            if not self._state.finished:
                self.cancel()

    def _next(self) -> Step | None:
        state = self._state
        while True:
            with self.engine._cond:
                if state.queue:
                    return state.queue.popleft()
                if state.finished:
                    if state.error is not None:
                        raise state.error
                    return None
            self.engine._wait_or_drive(state)

    def cancel(self) -> None:
        with self.engine._cond:
            self._state.cancelled = True
            self.engine._reap_due = True
            self.engine._cond.notify_all()
        self.engine._reap()

    @property
    def cancelled(self) -> bool:
        return self._state.cancelled

    @property
    def finished(self) -> bool:
        return self._state.finished

    def result(self) -> Step:
        """Run to the end and return the last step."""
        last = None
        for last in self:  # noqa: B007 - only the last step is wanted
            pass
        check(last is not None, "generation produced no step")
        return last


# ---- helpers -------------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _forward_accepts(cls: type, name: str) -> bool:
    import inspect

    return name in inspect.signature(cls.forward).parameters


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (e.g. ``logits_to_keep``)."""
    return _forward_accepts(type(model), name)


def _new_cache(lm: LoadedModel):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _validate(lm: LoadedModel, request: Request) -> None:
    check(len(request.prompt_ids) > 0, "no prompts given")
    for i, p in enumerate(request.prompt_ids):
        check(len(p) > 0, f"prompt {i + 1} is empty")
    check(request.max_new_tokens >= 1, "max_new_tokens must be at least 1")
    check(0 < request.top_p <= 1, "top_p must be in (0, 1]")
    check(request.temperature >= 0, "temperature must be >= 0")
    n = len(request.prompt_ids)
    for i, j in (request.follow or {}).items():
        check(0 <= i < n and 0 <= j < n and i != j, f"follow {i}->{j}: rows are 0..{n - 1}")
    for j, item in enumerate(request.steering):
        check(isinstance(item, Steer), f"expected Steer(...), got {type(item).__name__}")
        if item.rows is not None:
            check(len(list(item.rows)) == n, f"steering {j}: rows mask has {len(list(item.rows))} entries "
                                             f"for {n} rows")


def engine_for(lm: LoadedModel) -> Engine:
    """The engine of ``lm`` (one per loaded model, made on first use)."""
    eng = lm.__dict__.get("_engine")
    if eng is None:
        with _ENGINE_LOCK:
            eng = lm.__dict__.get("_engine")
            if eng is None:
                eng = lm.__dict__["_engine"] = Engine(lm)
    return eng


_ENGINE_LOCK = threading.Lock()
