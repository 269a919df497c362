"""Completions and chat completions over the scheduler, as the OpenAI API defines them (vLLM's serving_*.py split).

One HTTP request becomes one scheduler `Request` per choice (n, and for completions every prompt of a list). Work
off the event loop: JSON parsing and tokenization run on a thread pool sized for them (`tokenizer_workers`);
detokenization runs in the scheduler thread (`Request.text`). Handlers never block a thread while they wait:
the scheduler's `on_event` wakes them through `loop.call_soon_threadsafe`. A client that disconnects (streaming
or not) cancels its requests, which frees their KV blocks within one scheduler step.

Prompts: completions encode the text with the tokenizer's special tokens (BOS per tokenizer.json's
post-processor); chat renders the model's chat template and encodes it without special tokens (the template
writes BOS itself). Stop token ids are the model directory's EOS list (generation_config.json). Absent sampling
fields take generation_config.json's values (temperature, top_p, top_k, repetition_penalty), as vLLM does, else
OpenAI's defaults; absent max_tokens is the rest of the context.

Shutdown (`begin_shutdown(grace_s)`): new requests get 503; running ones may finish for grace_s; then every
stream gets a final chunk carrying an error and `data: [DONE]`, and every waiting non-streaming client a 503.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Union

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ascend_llm.errors import UserInputError
from ascend_llm.inference.metrics import ServerMetrics
from ascend_llm.inference.protocol import (
    MAX_SEED,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    Limits,
    chat_messages,
    check_logprobs,
    check_sampling,
    check_stop,
    parse_body,
    prompt_list,
)
from ascend_llm.inference.scheduler import QueueFull, Request, SamplingParams

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM reports it as -9999.0


@dataclass
class ModelInfo:
    """What the server knows of the model: name reported by /v1/models, tokenizer (HFTokenizer), EOS ids,
    context length (prompt + generated tokens), generation_config.json sampling defaults."""

    name: str
    tokenizer: object
    eos_token_ids: list[int]
    context_len: int
    vocab_size: int
    defaults: dict = field(default_factory=dict)


class _Watch:
    """Wakes one handler whenever the scheduler touches one of its requests (or the server aborts them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.event = loop, asyncio.Event()

    def notify(self) -> None:  # called on the scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()


@dataclass(eq=False)
class _Job:
    """The scheduler requests of one HTTP request and what the response needs to know about them."""

    kind: str  # "chat" or "completion"
    id: str
    requests: list
    prompt_tokens: int
    logprobs: Optional[int]
    watch: _Watch
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client goes away (the body has been read, so the next ASGI message is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    """The completion and chat logic behind the routes; `scheduler` follows inference/scheduler.py's contract."""

    def __init__(self, scheduler, model: ModelInfo, limits: Limits, *, tokenizer_workers: int = 4):
        self.scheduler, self.model, self.limits = scheduler, model, limits
        self.max_prompt_tokens = min(limits.max_prompt_tokens or model.context_len - 1, model.context_len - 1)
        self.pool = ThreadPoolExecutor(tokenizer_workers, thread_name_prefix="tokenize")
        self.metrics = ServerMetrics(scheduler.stats)
        self.jobs: set[_Job] = set()
        self.accepting, self.aborted = True, False

    # ---- request bodies ------------------------------------------------------------------------------------
    async def read_body(self, http: HttpRequest, kind: type) -> Union[CompletionRequest, ChatCompletionRequest]:
        """Read (at most max_body_bytes), decode and validate the JSON body off the event loop."""
        limit = self.limits.max_body_bytes
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise InvalidRequest("body", f"{declared} bytes", f"at most {limit} bytes (--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise InvalidRequest("body", f"more than {limit} bytes", f"at most {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
        return await self._off_loop(_decode_body, b"".join(chunks), kind)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model.name:
            raise ApiError(404, f"The model `{name}` does not exist.", "model", "invalid_request_error",
                           "model_not_found")

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", None, "server_error", "shutting_down")

    # ---- prompts -------------------------------------------------------------------------------------------
    def _encode_completion(self, prompts: list) -> list[list[int]]:
        tokenizer, out = self.model.tokenizer, []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise InvalidRequest(where, "text", "this model has no tokenizer.json: send token ids")
                ids = tokenizer.encode(prompt)
            else:
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
                if bad:
                    raise InvalidRequest(where, bad[0], f"token ids must be in [0, {self.model.vocab_size})")
            out.append(self._check_length(ids, where))
        return out

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.model.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("messages", "chat", "this model has no chat template (chat_template.jinja or "
                                                     "tokenizer_config.json:chat_template); use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # the template's raise_exception (e.g. roles out of order) or a jinja error
            raise InvalidRequest("messages", "chat template", f"the model's chat template refused them: {exc}") \
                from None
        return self._check_length(ids, "messages")

    def _check_length(self, ids: list[int], where: str) -> list[int]:
        if not ids:
            raise InvalidRequest(where, "0 tokens", "must not be empty")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(where, f"{len(ids)} tokens", f"at most {self.max_prompt_tokens} tokens (context "
                                 f"length {self.model.context_len}, --max-prompt-tokens)")
        return ids

    # ---- sampling ------------------------------------------------------------------------------------------
    def _max_tokens(self, body, prompt: list[int]) -> int:
        field_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        asked = getattr(body, field_name)
        room = self.model.context_len - len(prompt)
        if asked is None:
            return room
        if asked > room:
            raise InvalidRequest(field_name, asked, f"this model's maximum context length is "
                                 f"{self.model.context_len} tokens and the prompt has {len(prompt)}, so at most "
                                 f"{room}")
        return asked

    def _params(self, body, prompt: list[int], stops: list[str], logprobs: Optional[int], choice: int):
        d = self.model.defaults

        def pick(name, fallback):
            value = getattr(body, name)
            return d.get(name, fallback) if value is None else value

        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return SamplingParams(max_new_tokens=self._max_tokens(body, prompt), temperature=pick("temperature", 1.0),
                              top_k=max(int(pick("top_k", 0)), 0), top_p=pick("top_p", 1.0),
                              repetition_penalty=pick("repetition_penalty", 1.0),
                              stop_token_ids=[] if body.ignore_eos else list(self.model.eos_token_ids),
                              stop_strings=stops,
                              seed=(seed + choice) % (MAX_SEED + 1), logprobs=logprobs)

    # ---- endpoints -----------------------------------------------------------------------------------------
    async def completion(self, http: HttpRequest):
        body = await self.read_body(http, CompletionRequest)
        self.check_model(body.model)
        prompts = prompt_list(body.prompt)
        check_sampling(body, self.limits, len(prompts))
        logprobs, stops = check_logprobs(body), check_stop(body.stop, self.limits)
        encoded = await self._off_loop(self._encode_completion, prompts)
        return await self._run("completion", body, encoded, stops, logprobs, http)

    async def chat(self, http: HttpRequest):
        body = await self.read_body(http, ChatCompletionRequest)
        self.check_model(body.model)
        check_sampling(body, self.limits)
        logprobs, stops = check_logprobs(body), check_stop(body.stop, self.limits)
        messages = chat_messages(body.messages)
        encoded = await self._off_loop(self._encode_chat, messages)
        return await self._run("chat", body, [encoded], stops, logprobs, http)

    async def _run(self, kind: str, body, prompts: list[list[int]], stops, logprobs, http: HttpRequest):
        self.check_accepting()
        params = [self._params(body, p, stops, logprobs, i) for p in prompts for i in range(body.n)]
        watch = _Watch(asyncio.get_running_loop())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job = _Job(kind, f"{prefix}-{secrets.token_hex(12)}", [], sum(len(p) for p in prompts), logprobs, watch,
                   bool(body.stream), bool(body.stream and body.stream_options and body.stream_options.include_usage))
        for k, sp in enumerate(params):
            request = Request(prompts[k // body.n], sp, request_id=f"{job.id}-{k}", on_event=watch.notify)
            try:
                self.scheduler.submit(request)
            except (UserInputError, QueueFull) as exc:
                self._cancel(job)
                if isinstance(exc, QueueFull):
                    raise ApiError(503, f"server overloaded: {exc}", None, "server_error", "overloaded") from None
                raise
            job.requests.append(request)
        self.jobs.add(job)
        if job.stream:
            return StreamingResponse(self._stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._wait(job, http)

    def _cancel(self, job: _Job) -> None:
        for request in job.requests:
            if request.finish_reason is None:
                self.scheduler.cancel(request.request_id)

    def _close(self, job: _Job) -> None:
        """The job's last act: cancel what still runs, count what finished."""
        self._cancel(job)
        if job in self.jobs:
            self.jobs.discard(job)
            for request in job.requests:
                self.metrics.observe(request)

    async def _wait(self, job: _Job, http: HttpRequest):
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while not self.aborted and any(r.finish_reason is None for r in job.requests):
                woke = asyncio.ensure_future(job.watch.wait())
                await asyncio.wait({woke, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    woke.cancel()
                    return None  # the client left: nobody to answer; _close cancels the requests
            failure = _failure(job, self.aborted)
            if failure is not None:
                return JSONResponse(failure.body(), status_code=failure.status)
            return JSONResponse(_full_response(job, self.model.name))
        finally:
            gone.cancel()
            self._close(job)

    async def _stream(self, job: _Job):
        """Server-sent events: a chunk per choice whenever it has new tokens (its text delta may be empty while
        held back), a final chunk per choice with finish_reason, the usage chunk
        (stream_options.include_usage), then `data: [DONE]`. An abort or a failed request ends the stream with an
        error chunk and [DONE]."""
        sent_text = [0] * len(job.requests)
        sent_lp = [0] * len(job.requests)
        sent_tokens = [0] * len(job.requests)
        done = [False] * len(job.requests)
        try:
            if job.kind == "chat":
                for i in range(len(job.requests)):
                    yield _sse(_chunk(job, self.model.name, i, {"role": "assistant", "content": ""}, None, None))
            while True:
                failure = _failure(job, self.aborted)
                if failure is not None:
                    yield _sse(failure.body())
                    break
                for i, request in enumerate(job.requests):
                    if done[i]:
                        continue
                    reason = request.finish_reason  # read before the text: once set, the text is final
                    text, tokens = request.text, len(request.out)
                    entries = _logprob_entries(request) if job.logprobs is not None else []
                    delta, new, grew = text[sent_text[i]:], entries[sent_lp[i]:], tokens > sent_tokens[i]
                    sent_text[i], sent_lp[i], sent_tokens[i] = len(text), len(entries), tokens
                    done[i] = reason is not None
                    if delta or new or reason or grew:  # a chunk per new token, as vLLM (text may be held back)
                        content = {"content": delta} if job.kind == "chat" else delta
                        if job.kind == "chat" and not delta and reason:
                            content = {}
                        yield _sse(_chunk(job, self.model.name, i, content, _finish(reason) if reason else None,
                                          _logprobs_json(job, new) if job.logprobs is not None else None))
                if all(done):
                    if job.include_usage:
                        yield _sse({**_head(job, self.model.name), "choices": [], "usage": _usage(job)})
                    break
                await job.watch.wait()
            yield "data: [DONE]\n\n"
        finally:
            self._close(job)

    # ---- operations ----------------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Compile every step shape of the engine (Engine.warm_up) so no request waits for a graph compile;
        prints how many and how long. Returns the seconds taken (0 for an engine without warm_up)."""
        engine = self.scheduler.engine
        if not hasattr(engine, "warm_up"):
            return 0.0
        seconds = engine.warm_up()
        print(f"compiled {engine.graph_compiles} step shapes in {seconds:.1f} s", flush=True)
        return seconds

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; after grace_s abort the running ones (streams: error chunk + [DONE]; others: 503).
        Call on the event loop."""
        if not self.accepting:
            return
        self.accepting = False
        asyncio.get_running_loop().call_later(max(grace_s, 0.0), self.abort_all)

    def abort_all(self) -> None:
        self.aborted = True
        for job in list(self.jobs):
            self._cancel(job)
            job.watch.event.set()

    def health(self) -> dict:
        stats = self.scheduler.stats()
        return {"status": "ok" if self.accepting else "shutting_down", "model": self.model.name,
                **{k: stats.get(k) for k in ("running", "waiting", "kv_blocks_used", "kv_blocks_free",
                                             "kv_blocks_total")}}

    def model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": 0, "owned_by": "ascend_llm",
                "max_model_len": self.model.context_len}


def _decode_body(raw: bytes, kind: type):
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest("body", "not JSON", f"must be a JSON object ({exc})") from None
    return parse_body(kind, data)


def _failure(job: _Job, aborted: bool) -> Optional[ApiError]:
    """The error that ends the job, if any: server shutdown past --grace (503) or a failed request (500)."""
    if aborted and any(r.finish_reason in (None, "cancelled") for r in job.requests):
        return ApiError(503, "the server shut down before the request finished (--grace passed)", None,
                        "server_error", "shutting_down")
    for request in job.requests:
        if request.finish_reason == "error":
            lines = [line for line in str(request.error).splitlines() if line.strip() and "----" not in line]
            summary = lines[0][:200] if lines else ""
            return ApiError(500, f"generation failed: {type(request.error).__name__}: {summary}", None,
                            "server_error", "generation_failed")
        if request.finish_reason == "cancelled":
            return ApiError(503, "the request was cancelled", None, "server_error", "cancelled")
    return None


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"stop": "stop", "length": "length"}.get(reason or "", reason)


def _head(job: _Job, model: str) -> dict:
    obj = "chat.completion.chunk" if job.kind == "chat" and job.stream else (
        "chat.completion" if job.kind == "chat" else "text_completion")
    return {"id": job.id, "object": obj, "created": job.created, "model": model, "system_fingerprint": None}


def _usage(job: _Job) -> dict:
    generated = sum(len(r.out) for r in job.requests)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": generated,
            "total_tokens": job.prompt_tokens + generated}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk(job: _Job, model: str, index: int, delta, finish: Optional[str], logprobs) -> dict:
    if job.kind == "chat":
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
    head = {**_head(job, model), "choices": [choice]}
    return {**head, "usage": None} if job.include_usage else head


def _logprob_entries(request) -> list:
    """The request's TokenLogprob entries of generated tokens, less a stop token's (its text is not part of the
    output; a stop token is always the last token, so what was sent is never retracted)."""
    stops = set(request.params.stop_token_ids)
    return [e for e in list(request.logprobs or [])[:len(request.out)] if e.token_id not in stops]


def _lp(value: float) -> float:
    return value if value == value and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def _logprobs_json(job: _Job, entries: list, offset: int = 0) -> dict:
    """Chat: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}; completions:
    {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}, as OpenAI returns them."""
    if job.kind == "chat":
        def one(token: str, lp: float) -> dict:
            return {"token": token, "logprob": _lp(lp), "bytes": list(token.encode("utf-8", "replace"))}
        content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for _, t, lp in e.top[:job.logprobs]]}
                   for e in entries]
        return {"content": content, "refusal": None}
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    tops = []
    for e in entries:  # token -> logprob; two ids with the same text keep the first (the chosen, then the likelier)
        top: dict[str, float] = {}
        for _, token, lp in [(e.token_id, e.token, e.logprob), *e.top[:job.logprobs]]:
            top.setdefault(token, _lp(lp))
        tops.append(top)
    return {"tokens": [e.token for e in entries], "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _full_response(job: _Job, model: str) -> dict:
    choices = []
    for i, request in enumerate(job.requests):
        logprobs = _logprobs_json(job, _logprob_entries(request)) if job.logprobs is not None else None
        choice = {"index": i, "logprobs": logprobs, "finish_reason": _finish(request.finish_reason),
                  "stop_reason": request.stop_reason}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": request.text, "refusal": None}
        else:
            choice["text"] = request.text
        choices.append(choice)
    return {**_head(job, model), "choices": choices, "usage": _usage(job)}
