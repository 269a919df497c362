"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`"stream": true` as server-sent events: `data: {chunk}` lines, then `data: [DONE]`). Request fields follow the
OpenAI API (model, prompt | messages, max_tokens, temperature, top_p, stop, stream, seed, n = 1) plus top_k and
repetition_penalty. Errors are JSON {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(param names the field), 503 when the waiting queue is full or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional, Union

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from ascend_llm.errors import UserInputError
from ascend_llm.inference.batching import ContinuousBatcher, QueueFull, Request
from ascend_llm.inference.sampling import SamplingParams


class _Common(BaseModel):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    seed: Optional[int] = None
    n: int = Field(default=1, ge=1, le=1)


class CompletionBody(_Common):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    role: str
    content: str


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


def error(status: int, message: str, kind: str, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


class TextCodec:
    """Text <-> ids for the server: a `tokenizers.Tokenizer` or an interop HFTokenizer; chat prompts through the
    model's chat template when it has one, else "role: content" lines followed by "assistant: "."""

    def __init__(self, tokenizer, stop_token_ids: list[int]):
        self.tokenizer, self.stop_token_ids = tokenizer, stop_token_ids

    def vocab_size(self) -> int:
        inner = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        return int(inner.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return list(ids.ids if hasattr(ids, "ids") else ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class _Stream:
    """Incremental text of a request: deltas that never split a UTF-8 character or reveal a stop string."""

    def __init__(self, codec: TextCodec, stops: list[str]):
        self.codec, self.stops, self.sent = codec, stops, 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def text(self, ids: list[int]) -> str:
        text = self.codec.decode(ids)
        cuts = [text.index(s) for s in self.stops if s in text]
        return text[:min(cuts)] if cuts else text

    def delta(self, ids: list[int], final: bool) -> str:
        text = self.text(ids)
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if not final and text[self.sent:end].endswith("\ufffd"):
            end = self.sent + len(text[self.sent:end].rstrip("\ufffd"))
        out, self.sent = text[self.sent:end], max(self.sent, end)
        return out


def _finish_name(reason: Optional[str]) -> str:
    return {"stop_token": "stop", "stop_string": "stop", "length": "length", "error": "error"}.get(reason or "",
                                                                                                  "cancelled")


def build_app(batcher: ContinuousBatcher, codec: TextCodec, model_name: str, grace_s: float = 30.0) -> FastAPI:
    """The FastAPI app; the batcher's thread starts with the app and stops (graceful, grace_s) on shutdown."""

    @asynccontextmanager
    async def lifespan(app):
        batcher.serve_forever()
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop, grace_s)

    app = FastAPI(title="ascend_llm", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", "invalid_request_error",
                     ".".join(loc) or None)

    @app.get("/health")
    async def health():
        return {"status": "ok" if batcher.accepting else "shutting_down", "waiting": len(batcher.waiting),
                "running": len(batcher.active), "num_slots": batcher.engine.num_slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "ascend_llm"}]}

    async def run(body: _Common, prompt: str, chat: bool, http: HttpRequest):
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                stop_token_ids=codec.stop_token_ids, stop_strings=stops,
                                seed=body.seed if body.seed is not None else uuid.uuid4().int % 2 ** 32)
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        ids = codec.encode(prompt)
        request = Request(ids, params, on_token=lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t))
        try:
            batcher.submit(request)
        except UserInputError as exc:
            return error(400, str(exc), "invalid_request_error", exc.field)
        except QueueFull as exc:
            return error(503, f"server overloaded: {exc}", "overloaded")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        stream = _Stream(codec, stops)
        if body.stream:
            return StreamingResponse(_sse(request, tokens, stream, meta, chat, http), media_type="text/event-stream")
        await loop.run_in_executor(None, request.done.wait)
        if request.finish_reason == "error":
            return error(500, f"generation failed: {request.error}", "server_error")
        text = stream.text(request.out)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(request.out),
                 "total_tokens": len(ids) + len(request.out)}
        finish = _finish_name(request.finish_reason)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return error(400, "prompt: one prompt per request", "invalid_request_error", "prompt")
        return await run(body, prompts[0], False, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest):
        prompt = codec.chat_prompt([m.model_dump() for m in body.messages])
        return await run(body, prompt, True, http)

    return app


async def _sse(request: Request, tokens: asyncio.Queue, stream: _Stream, meta: dict, chat: bool, http):
    """Server-sent events: one chunk per decoded text delta, a final chunk with finish_reason, then [DONE].
    A client that disconnects cancels its request."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     ({"content": text} if text else {}))
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]}, ensure_ascii=False)}\n\n"

    if chat:
        yield chunk("", None, first=True)
    received = 0
    while not request.done.is_set() or received < len(request.out):
        try:
            await asyncio.wait_for(tokens.get(), timeout=0.5)
            received += 1
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                request.cancelled = True
                return
            continue
        text = stream.delta(request.out[:received], final=False)
        if text:
            yield chunk(text, None)
    tail = stream.delta(request.out, final=True)
    yield chunk(tail or None, _finish_name(request.finish_reason))
    yield "data: [DONE]\n\n"
