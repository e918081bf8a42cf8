"""An OpenAI-compatible steered chat endpoint in the app's own process.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed as server-sent events, or
one JSON body). Steering comes per request, as an extra body field ``steering``: a list of
``{vector, strength, layer?, operator?}``, or, for clients that cannot send extra fields, in the
model name: ``smollm2+sentiment@-20`` (several: ``+a@1+b@-2``; ``:LAYER`` after a strength picks the
layer). Messages go through the tokenizer's chat template; ``temperature``, ``top_p``,
``max_tokens`` (or ``max_completion_tokens``), ``seed``, ``stop``, ``n`` and
``stream_options.include_usage`` are honoured. Bad requests get a 4xx JSON error in OpenAI's shape.

Generation runs as an event of the Gradio app (an undocumented ``/openai_chat`` endpoint under the
app's model queue and ``spaces.GPU``), reached over loopback with ``gradio_client``: a request from a
chat client and a click in the app share one queue, so they never overlap on the model, and on a
ZeroGPU Space the GPU is granted as for any other event. The event yields cumulative states; the
route turns them into OpenAI chunks. Decoding itself is :func:`steering_lab.generate.stream`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the routes' string annotations here

from ..errors import UserError, check
from .steering import ModelNotFound, SteerSpec, model_id, parse_model_name, resolve

log = logging.getLogger(__name__)

API_NAME = "openai_chat"
MAX_N = 8
MAX_STOP = 4
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CAP = 4096
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (OpenAI's shape)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A checked ``/v1/chat/completions`` body."""

    model: str
    prompt_ids: list[int]
    specs: list[SteerSpec]
    steers: list = field(default_factory=list)
    n: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# ---- request checking ---------------------------------------------------------------------------

def _message_text(msg: dict, i: int) -> str:
    content = msg.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               f"messages[{i}].content")
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def encode_messages(lm, messages: Any) -> list[int]:
    """Prompt token ids for a chat: the tokenizer's chat template (system + user + assistant turns),
    ready for the assistant's next turn; a trailing assistant message is continued, not closed."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must have a role in {', '.join(ROLES)} and a content",
                           f"messages[{i}].role")
        role = "system" if msg["role"] == "developer" else msg["role"]
        turns.append({"role": role, "content": _message_text(msg, i)})
    if not any(t["role"] == "user" for t in turns) and not any(t["content"].strip() for t in turns):
        raise ApiError(400, "the conversation is empty", "messages")
    continue_last = turns[-1]["role"] == "assistant"
    if lm.has_chat_template:
        kw = dict(tokenize=False, add_generation_prompt=not continue_last, continue_final_message=continue_last)
        try:
            text = lm.tokenizer.apply_chat_template(turns, **kw)
        except Exception:  # noqa: BLE001 - jinja raises TemplateError for roles a template refuses (Gemma: system)
            merged = _merge_system(turns)
            try:
                text = lm.tokenizer.apply_chat_template(merged, **kw)
            except Exception as exc:  # noqa: BLE001
                raise ApiError(400, f"the model's chat template rejects this conversation: {exc}",
                               "messages") from None
        return lm.encode(text, special=False)
    # a base model: plain text turns, the answer follows "Assistant:"
    lines = [t["content"] if t["role"] == "system" else f"{t['role'].capitalize()}: {t['content']}" for t in turns]
    text = "\n\n".join(lines) + ("" if continue_last else "\n\nAssistant:")
    return lm.encode(text, special=True)


def _merge_system(turns: list[dict]) -> list[dict]:
    system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
    rest = [dict(t) for t in turns if t["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def _int(body: dict, key: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be in {lo}..{hi}, got {value}", key)
    return value


def _float(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number", key)
    if not lo <= float(value) <= hi:
        raise ApiError(400, f"'{key}' must be in [{lo:g}, {hi:g}], got {value}", key)
    return float(value)


def parse_request(ctx, body: Any) -> ChatRequest:
    """Check a chat-completions body against the model and the library; raise :class:`ApiError`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    lm = ctx.lm
    model = body.get("model")
    try:
        _, from_name = parse_model_name(model if isinstance(model, str) else "", lm)
    except ModelNotFound as exc:
        raise ApiError(404, str(exc), "model", "model_not_found") from None
    except UserError as exc:
        raise ApiError(400, str(exc), "model") from None
    extra = body.get("steering")
    if extra is not None and not isinstance(extra, list):
        raise ApiError(400, "'steering' must be a list of {vector, strength, layer?, operator?}", "steering")
    try:
        steers, specs = resolve(ctx, from_name + list(extra or []))
    except UserError as exc:
        msg = str(exc)
        code = "vector_not_found" if msg.startswith("no vector called") else "invalid_steering"
        raise ApiError(400, msg, "steering" if extra else "model", code) from None
    max_ctx = int(getattr(lm.model.config, "max_position_embeddings", 0) or 0) or None
    prompt_ids = encode_messages(lm, body.get("messages"))
    if body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1, MAX_TOKENS_CAP, DEFAULT_MAX_TOKENS)
    else:
        max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_CAP, DEFAULT_MAX_TOKENS)
    if max_ctx is not None and len(prompt_ids) >= max_ctx:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is {max_ctx}", "messages",
                       "context_length_exceeded")
    if max_ctx is not None:
        max_tokens = min(max_tokens, max_ctx - len(prompt_ids))
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = list(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    stops = [s for s in stops if s]
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not supported by this server", "logprobs")
    if body.get("tools"):
        raise ApiError(400, "tool calling is not supported by this server", "tools")
    return ChatRequest(model=model, prompt_ids=prompt_ids, specs=specs, steers=steers,
                       n=_int(body, "n", 1, MAX_N, 1), max_tokens=max_tokens,
                       temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
                       top_p=_float(body, "top_p", 1e-6, 1.0, 1.0),
                       seed=None if seed is None else int(seed) % (2 ** 63), stop=stops, stream=stream,
                       include_usage=bool(opts.get("include_usage", False)))


# ---- generation ---------------------------------------------------------------------------------

def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """What can be shown while generating: not a possible start of a stop sequence, not a half
    decoded character."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    text = text[:keep]
    return text.rstrip("\ufffd")


def chat_states(ctx, req: ChatRequest) -> Iterator[dict]:
    """Run a checked request through :func:`steering_lab.generate.stream`; yield cumulative states
    ``{"texts", "finish", "completion_tokens", "prompt_tokens"}`` (one per generated token, the last
    one with every ``finish`` set to ``"stop"`` or ``"length"``)."""
    from ..generate import stream

    n = req.n
    eos = set(ctx.lm.eos_ids)
    texts, finish, counts = [""] * n, [None] * n, [0] * n
    steps = stream(ctx.lm, ["(chat)"] * n, req.steers, max_new_tokens=req.max_tokens,
                   temperature=req.temperature, top_p=req.top_p,
                   seed=req.seed if req.seed is not None else (time.time_ns() % (2 ** 31)),
                   prompt_ids=[req.prompt_ids] * n)
    try:
        for step in steps:
            for i in range(n):
                if finish[i] is not None:
                    continue
                text = step.texts[i]
                counts[i] = len(step.token_ids[i])
                ids = step.token_ids[i]
                cut = _stop_at(text, req.stop)
                if cut is not None:
                    text, finish[i] = text[:cut], "stop"
                elif ids and ids[-1] in eos:
                    finish[i] = "stop"
                elif step.done[i] or counts[i] >= req.max_tokens:
                    finish[i] = "length"
                texts[i] = text if finish[i] is not None else _safe_prefix(text, req.stop)
            if all(f is not None for f in finish):
                break
            yield {"texts": list(texts), "finish": list(finish), "completion_tokens": list(counts),
                   "prompt_tokens": len(req.prompt_ids)}
    finally:
        steps.close()  # cancels the request in the engine; no hook stays behind
    finish = [f or "length" for f in finish]
    yield {"texts": texts, "finish": finish, "completion_tokens": counts, "prompt_tokens": len(req.prompt_ids)}


# ---- OpenAI response shapes -----------------------------------------------------------------------

def _usage(state: dict) -> dict:
    done = sum(state["completion_tokens"])
    return {"prompt_tokens": state["prompt_tokens"], "completion_tokens": done,
            "total_tokens": state["prompt_tokens"] + done}


def completion_body(req: ChatRequest, state: dict, cid: str, created: int) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": state["finish"][i]} for i, text in enumerate(state["texts"])]
    return {"id": cid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
            "usage": _usage(state), "system_fingerprint": None,
            "steering": [s.to_dict() for s in req.specs]}


class Chunker:
    """OpenAI ``chat.completion.chunk`` objects from cumulative states: a role chunk per choice
    (:meth:`start`), content deltas and one finish chunk per choice (:meth:`feed`), then with
    ``include_usage`` a usage chunk (:meth:`end`)."""

    def __init__(self, req: ChatRequest, cid: str, created: int) -> None:
        self.req, self.cid, self.created = req, cid, created
        self.sent = [""] * req.n
        self.finished = [False] * req.n
        self.last: dict | None = None

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model,
               "system_fingerprint": None, "choices": choices}
        if self.req.include_usage:
            out["usage"] = usage
        return out

    def start(self) -> list[dict]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(self.req.n)])]

    def feed(self, state: dict) -> list[dict]:
        self.last = state
        out = []
        for i in range(self.req.n):
            if self.finished[i]:
                continue
            text = state["texts"][i]
            delta = text[len(self.sent[i]):] if text.startswith(self.sent[i]) else ""
            if delta:
                self.sent[i] = text
                out.append(self._chunk([{"index": i, "delta": {"content": delta}, "logprobs": None,
                                         "finish_reason": None}]))
            if state["finish"][i] is not None:
                self.finished[i] = True
                out.append(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": state["finish"][i]}]))
        return out

    def end(self) -> list[dict]:
        if self.last is not None and self.req.include_usage:
            return [self._chunk([], _usage(self.last))]
        return []


def chunk_events(req: ChatRequest, states: Iterator[dict], cid: str, created: int) -> Iterator[dict]:
    """All chunks of a streamed answer, from an iterator of cumulative states."""
    chunker = Chunker(req, cid, created)
    yield from chunker.start()
    for state in states:
        yield from chunker.feed(state)
    yield from chunker.end()


# ---- the Gradio event and the routes --------------------------------------------------------------

def register(ctx) -> None:
    """Add the undocumented ``/openai_chat`` event to the Blocks being built (call inside ``gr.Blocks``)."""
    import gradio as gr

    from ..ui.context import GENERATE_LIMIT, GENERATE_QUEUE, gpu

    @gpu
    def openai_chat(body: dict) -> Iterator[dict]:
        """Run one checked chat-completions body; yields cumulative states (used by /v1/chat/completions)."""
        try:
            req = parse_request(ctx, body)
        except ApiError as exc:
            raise gr.Error(exc.message) from None
        yield from chat_states(ctx, req)

    gr.api(openai_chat, api_name=API_NAME, api_visibility="undocumented", concurrency_id=GENERATE_QUEUE,
           concurrency_limit=GENERATE_LIMIT)


def models_body(ctx) -> dict:
    """``/v1/models``: the base model and, for pickers that list models, one steered id per library
    vector at its recommended strength."""
    base = model_id(ctx.lm)
    created = int(time.time())
    data = [{"id": base, "object": "model", "created": created, "owned_by": "steering-lab"}]
    for name in ctx.compatible_vectors():
        rec = ctx.vectors.get(name).recommended_strength
        if rec is not None:
            data.append({"id": f"{base}+{name}@{rec:g}", "object": "model", "created": created,
                         "owned_by": "steering-lab"})
    return {"object": "list", "data": data}


def mount(app, ctx, demo=None, api_key: str | None = None) -> None:
    """Add ``/v1/models`` and ``/v1/chat/completions`` to ``app`` (the FastAPI app Gradio launched).

    With ``demo`` (launched, with :func:`register` called while it was built), generation runs as
    its queued ``/openai_chat`` event over loopback; without, in the route's worker thread (for a
    bare FastAPI app with no Gradio queue). ``api_key`` makes the routes require
    ``Authorization: Bearer <api_key>``."""
    import anyio
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse, StreamingResponse

    router = APIRouter()
    client_box: list = []

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    def unauthorized() -> JSONResponse:
        return error(ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None,
                              "invalid_api_key", "authentication_error"))

    def client():
        if not client_box:
            from gradio_client import Client

            # generation can wait in the queue behind other visitors: no read timeout on our own loopback calls
            client_box.append(Client(demo.local_url, verbose=False, download_files=False, analytics_enabled=False,
                                     httpx_kwargs={"timeout": None}))
        return client_box[0]

    @router.get("/v1/models")
    async def list_models(request: Request):
        if not authorized(request):
            return unauthorized()
        return JSONResponse(models_body(ctx))

    @router.get("/v1/models/{model_name:path}")
    async def get_model(model_name: str, request: Request):
        if not authorized(request):
            return unauthorized()
        for item in models_body(ctx)["data"]:
            if item["id"] == model_name:
                return JSONResponse(item)
        return error(ApiError(404, f"model {model_name!r} is not listed here", "model", "model_not_found"))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not authorized(request):
            return unauthorized()
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(ApiError(400, "the request body is not valid JSON"))
        try:
            req = await anyio.to_thread.run_sync(parse_request, ctx, body)
        except ApiError as exc:
            return error(exc)
        except UserError as exc:
            return error(ApiError(400, str(exc)))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        if req.stream:
            async def sse():
                states = _states_async(body, req)
                async for event in _achunks(req, states, cid, created):
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        last = None
        try:
            async for state in _states_async(body, req):
                last = state
        except ApiError as exc:
            return error(exc)
        check(last is not None, "generation produced no state")
        return JSONResponse(completion_body(req, last, cid, created))

    async def _states_async(body: dict, req: ChatRequest):
        """Cumulative states, from the queued Gradio event (with ``demo``) or a worker thread."""
        if demo is None:
            it = chat_states(ctx, req)
            try:
                while True:
                    state = await anyio.to_thread.run_sync(next, it, None)
                    if state is None:
                        return
                    yield state
            finally:
                await anyio.to_thread.run_sync(it.close)
        job = await anyio.to_thread.run_sync(lambda: client().submit(body, api_name=f"/{API_NAME}"))
        ended = False
        try:
            async for update in job:
                if update.type != "output":
                    continue
                if not update.success:
                    out = update.outputs or {}
                    raise ApiError(500, str(out.get("error") or out.get("title") or "generation failed"), None,
                                   "server_error", "server_error")
                out = update.outputs
                if update.final:  # the final update wraps the last output as {"data": [state]}
                    ended = True
                    data = out.get("data") if isinstance(out, dict) else None
                    if data and isinstance(data[0], dict):
                        yield data[0]
                    return
                if isinstance(out, dict) and "texts" in out:  # intermediate updates carry the state itself
                    yield out
        finally:
            if not ended and not job.done():
                # Job.cancel() is a blocking POST to this same server: never on its event loop (that
                # deadlocks the whole app), and not awaited (a closed generator may not await)
                threading.Thread(target=job.cancel, name="openai-cancel", daemon=True).start()

    async def _achunks(req: ChatRequest, states, cid: str, created: int):
        """:class:`Chunker` over an async source of states; a failure mid-stream ends it with an error event."""
        chunker = Chunker(req, cid, created)
        for event in chunker.start():
            yield event
        try:
            async for state in states:
                for event in chunker.feed(state):
                    yield event
        except ApiError as exc:
            yield exc.body()
            return
        for event in chunker.end():
            yield event

    app.include_router(router)
    # Gradio's own routes were added first; put ours ahead so that no catch-all can shadow them
    ours = [r for r in app.router.routes if getattr(r, "path", "").startswith("/v1/")]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]

