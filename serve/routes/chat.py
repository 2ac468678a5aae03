"""OpenAI-compatible chat: `POST /v1/chat/completions` (plain and SSE) and `GET /v1/models`.

Every completed answer is written to the bus as a `response` event, and recorded in the ledger
that feedback checks, before the client gets its last byte: an id a client can see is an id
it can rate. No answer goes out unrecorded: when the event spool (Kafka) is full, a request is
refused with 503 before anything is generated (and with 507 when the disk has less free than its
reserve, foundation.disk), and an answer whose event could not be written ends in a 503, or a
507 when the disk filled up meanwhile (streaming: an error chunk with the code), instead of its
last chunk. While the ledger
(Redis) is away, chat goes on: its entries wait in a backlog (serve.ledger_backlog) and
ratings of those answers get 503 until it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from foundation.models import context_length, render_prompt
from ingest.events import ChatMessage, ResponseEvent, SamplingParams, encode_event
from registry import RegistryError
from serve.annotation_queue import QueueItem
from serve.annotation_strategies import wants_overlap
from serve.deps import ChatCaller, Identified, ServeState, State
from serve.errors import AUTHENTICATED, ApiError, BadRequest, NotFound, responses, unavailable
from serve.generation import Delta, Failed, Finished, GenerationRequest, Output
from serve.schemas import ChatCompletionRequest

logger = logging.getLogger(__name__)
router = APIRouter(tags=["chat"], responses=responses(*AUTHENTICATED))

STREAMED = {
    "description": "The answer: JSON, or (`stream: true`) SSE chat.completion.chunk events, then `data: [DONE]`",
    # Before OpenAPI 3.2, an event stream's schema describes each event (its SSE fields).
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {
                        "type": "string",
                        "description": 'a chat.completion.chunk as JSON, an {"error": …} object, or [DONE]',
                    }
                },
            }
        }
    },
}


@router.get("/v1/models")
async def list_models(state: State, caller: Identified) -> dict:
    settings, canary, user = state.settings, state.hotswap.canary, caller.user
    # "serving": what this caller gets for the served name (a canary's candidate, maybe)
    entries: list[Mapping[str, object]] = [
        {
            "id": settings.served_model_name,
            "serving": state.hotswap.route(user) or settings.base_model_id,
            "active": state.hotswap.serving or settings.base_model_id,
            "canary": canary and canary.version,
        },
        {"id": settings.base_model_id},
        *({"id": v, "parent": settings.base_model_id} for v in sorted(state.engine.loaded_versions)),
    ]
    return {"object": "list", "data": [{"object": "model", "created": 0, "owned_by": "kto-loop", **e} for e in entries]}


@router.post("/v1/chat/completions", responses={200: STREAMED, **responses(404, 507)})
async def chat_completions(body: ChatCompletionRequest, state: State, caller: ChatCaller):
    user = caller.user  # never the body's `user`: a client may write anything there
    adapter = await resolve_model(state, body.model, user)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    prompt_ids = _prompt(state, messages)
    settings = state.settings
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise BadRequest(
            f"the prompt is {len(prompt_ids)} tokens; the limit is {settings.max_prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise BadRequest(f"max_tokens is {max_tokens}; the limit is {settings.max_tokens_limit}", param="max_tokens")
    context = context_length(state.loaded)
    if context is not None and len(prompt_ids) + max_tokens > context:
        raise BadRequest(
            f"the model's context is {context} tokens; the prompt is {len(prompt_ids)} and max_tokens {max_tokens}:"
            " shorten the messages or ask for fewer tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    state.disk.check()  # DiskFull: a 507 now, rather than generate an answer we could not record
    if state.spool is not None:
        state.spool.check_room()  # SpoolFull: a 503 now, rather than an answer we could not record
    request = GenerationRequest(prompt_ids, max_tokens, body.temperature, body.top_p, body.seed, body.stop, adapter)
    call = _Call(state, body, user, messages, request)
    if body.stream:
        return StreamingResponse(call.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await call.complete()


def _prompt(state: ServeState, messages: list[dict]) -> list[int]:
    """The prompt's token ids; a 400 naming the template's reason when the model's chat template
    refuses the messages (Gemma 2 takes no system message; Mistral wants user and assistant turns
    to alternate)."""
    from jinja2 import TemplateError

    try:
        return render_prompt(state.loaded.tokenizer, messages)
    except TemplateError as exc:
        raise BadRequest(
            f"the chat template of {state.settings.base_model_id} refuses these messages: {exc}",
            param="messages",
            code="chat_template_refused",
        ) from exc


async def resolve_model(state: ServeState, name: str | None, user: str | None = None) -> str | None:
    """The version a request is pinned to: the active one (or, for users in a canary's share, its
    candidate), the base (None), or a named version loaded here. A version whose files retention
    deleted is named as such (404 `version_pruned`)."""
    settings = state.settings
    if not name or name == settings.served_model_name:
        return state.hotswap.route(user)
    if name == settings.base_model_id:
        return None
    if name in state.engine.loaded_versions:
        return name
    pruned_at = await run_in_threadpool(_pruned_at, state, name)
    if pruned_at is not None:
        raise NotFound(
            f"adapter version {name!r} was pruned at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(pruned_at))}:"
            " retention deleted its files (an operator can pin versions to keep them)",
            param="model",
            code="version_pruned",
        )
    raise NotFound(
        f"model {name!r} is not served here; GET /v1/models lists what is", param="model", code="model_not_found"
    )


class _Call:
    """One chat completion: generation, the response event, the OpenAI-shaped answer."""

    def __init__(self, state: ServeState, body: ChatCompletionRequest, user: str | None, messages, request):
        self.state, self.body, self.user, self.messages, self.request = state, body, user, messages, request
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = request.adapter or state.settings.base_model_id
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    async def complete(self) -> dict:
        done = None
        async for out in self._generate():
            if isinstance(out, Failed):
                raise _GenerationFailed(out.error)
            if isinstance(out, Finished):
                done = out
        assert done is not None  # the engine's last output is a Finished or a Failed
        await self._record(done)
        self._observe(done, stream=False)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": done.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": self._usage(done),
        }

    async def sse(self) -> AsyncIterator[str]:
        yield self._chunk({"role": "assistant", "content": ""})
        async for out in self._generate():
            if isinstance(out, Delta):
                yield self._chunk({"content": out.text})
            elif isinstance(out, Failed):
                yield _sse({"error": {"message": out.error, "type": "internal_error"}})
                break
            else:
                try:
                    await self._record(out)
                except ApiError as exc:
                    yield _sse({"error": {"message": exc.message, "type": exc.type, "code": exc.code}})
                    break
                self._observe(out, stream=True)
                yield self._chunk({}, finish_reason=out.finish_reason)
                if self.body.stream_options and self.body.stream_options.include_usage:
                    yield _sse({**self._head(), "choices": [], "usage": self._usage(out)})
        yield "data: [DONE]\n\n"

    async def _generate(self) -> AsyncIterator[Output]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            handle = self.state.engine.submit(
                self.request, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
            )
        except KeyError:  # the pinned version was unloaded between resolving and submitting
            raise NotFound(f"model {self.model!r} is no longer loaded", param="model", code="model_not_found") from None
        self.state.metrics.prompt_tokens.inc(len(self.request.prompt_ids))
        finished = False
        try:
            while True:
                out = await queue.get()
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.state.metrics.ttft_seconds.observe(self.first_token_at - self.started)
                finished = not isinstance(out, Delta)
                yield out
                if finished:
                    return
        finally:
            if not finished:  # the client went away: free the batch slot
                handle.cancel()
                self.state.metrics.responses.labels(status="cancelled").inc()

    async def _record(self, done: Finished) -> None:
        """Write the response event, then the ledger entry, before answering."""
        event = ResponseEvent(
            response_id=self.id,
            user=self.user,
            base_model=self.state.settings.base_model_id,
            adapter_version=self.request.adapter,
            messages=[ChatMessage(**m) for m in self.messages],
            prompt_token_ids=self.request.prompt_ids,
            completion=done.text,
            completion_token_ids=done.token_ids,
            finish_reason=done.finish_reason,
            sampling=SamplingParams(
                max_tokens=self.request.max_tokens,
                temperature=self.request.temperature,
                top_p=self.request.top_p,
                stop=self.request.stop,
                seed=self.request.seed,
            ),
        )
        state = self.state
        try:
            await run_in_threadpool(state.bus.publish, state.topics.responses, self.id, encode_event(event))
            await run_in_threadpool(state.ledger.record_response, self.id, self.user, self.request.adapter)
            state.metrics.track_version(self.request.adapter)
        except Exception as exc:
            logger.error("could not record response %s: %s", self.id, exc)
            state.metrics.responses.labels(status="unrecorded").inc()
            raise unavailable(exc, "the answer could not be recorded; try again") from exc
        await offer(state, event)

    def _observe(self, done: Finished, *, stream: bool) -> None:
        metrics = self.state.metrics
        elapsed = time.perf_counter() - self.started
        metrics.request_seconds.labels(stream=str(stream).lower()).observe(elapsed)
        metrics.generation_tokens.inc(len(done.token_ids))
        metrics.responses.labels(status=done.finish_reason).inc()
        if len(done.token_ids) > 1 and self.first_token_at is not None:
            metrics.inter_token_seconds.observe((time.perf_counter() - self.first_token_at) / (len(done.token_ids) - 1))

    def _usage(self, done: Finished) -> dict:
        prompt, completion = len(self.request.prompt_ids), len(done.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return _sse(
            {
                **self._head(),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
        )


class _GenerationFailed(ApiError):
    status, type = 500, "internal_error"


QUEUE_PAUSE_S = 10.0
"""After the annotation queue failed, answers skip it this long (seconds)."""


async def offer(state: ServeState, event: ResponseEvent) -> None:
    """Queue a user's answer for annotators (a share of them: `KTO_ANNOTATION_SHARE`). Best effort:
    the answer is recorded already, and an answer missing from the queue costs nothing."""
    settings, queue = state.settings, state.annotations
    if queue is None or event.user is None or random.random() >= settings.annotation_share:
        return
    if time.monotonic() < state.queue_paused_until:  # it failed a moment ago: do not make chat wait on it
        return
    item = QueueItem(
        event.response_id,
        event.user,
        event.adapter_version,
        event.created_at,
        [m.model_dump() for m in event.messages],
        event.completion,
        event.prompt_token_ids,
        event.completion_token_ids,
        required=2 if wants_overlap(event.response_id, settings.annotation_overlap) else 1,
    )
    try:
        await run_in_threadpool(queue.add, item)
    except Exception as exc:
        state.queue_paused_until = time.monotonic() + QUEUE_PAUSE_S
        logger.warning("answers not offered to annotators for %.0f s: %s", QUEUE_PAUSE_S, exc)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _pruned_at(state: ServeState, name: str) -> float | None:
    try:
        return state.registry.get(name).pruned_at
    except RegistryError:  # not a version, or the registry is away: "not served here" says enough
        return None
