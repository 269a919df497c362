"""The one generation loop: a continuous-batching scheduler over the paged-KV-cache `Engine` (vLLM v1's seam).

`step()` = `schedule()` -> `SchedulerOutput` (which sequences decode one token, which prefill a chunk), the engine's
compiled step on each group, then `update_from_output(...)`: sample, detokenize incrementally, check stops.

Scheduling, every step:
  1. cancelled requests are finished and their KV blocks freed;
  2. each running sequence that decodes gets a slot for its next token; when no block is free the newest running
     request is preempted (its blocks freed, put back at the head of the queue, recomputed from prompt + output
     later, as vLLM v1 does) until the slot fits;
  3. waiting requests are admitted in arrival order (the head waits rather than being overtaken) while a sequence
     slot is free and the free blocks hold the request's tokens so far;
  4. prompts (and recomputed sequences) prefill in chunks of at most `engine.max_chunk` tokens, within
     `max_prefill_tokens` per step; with a flat engine (`engine.flat`: the fused CPU layer) the decode rows count
     in that budget (default `engine.max_step_tokens`) and decode tokens and the chunks of several prompts run as
     one engine call (vLLM's max_num_batched_tokens).
A failure while sampling or detokenizing one request finishes that request only (finish_reason "error", the
exception in `.error`); a failing engine step finishes the requests of that step. Used by `Engine.generate`,
`ascend-llm generate`, the trainer's closing sample, `bench generate` and `serve`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ascend_llm.inference.detokenize import IncrementalDetokenizer
from ascend_llm.inference.sampling import RequestError, SamplingParams, log_softmax, sample_next, top_logprobs

logger = logging.getLogger("ascend_llm.inference")

__all__ = ["QueueFull", "Request", "RequestError", "SamplingParams", "Scheduler", "SchedulerOutput", "TokenLogprob"]


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue, or the scheduler is shutting down (the server answers 503)."""


_ids = itertools.count()


@dataclass
class TokenLogprob:
    """token_id's log-probability under the raw model distribution, its text, and the top alternatives
    (token id, text, logprob), most likely first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """One generation request (see CONTRACTS.md section 3). `out` holds generated ids (stop token included);
    `text` the released text (special tokens skipped, cut before a stop string, never retracted); `on_event()` is
    called on the scheduler thread after every change of text/out/finish_reason."""

    prompt: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    on_event: Callable[[], None] | None = None
    out: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    finish_s: float | None = None
    num_computed: int = 0  # tokens of prompt + out whose K/V are in the cache
    budget: int = 0  # new tokens allowed (max_new_tokens within the context)
    cancelled: bool = False
    _rng: np.random.Generator | None = None
    _detok: IncrementalDetokenizer | None = None

    def tokens(self) -> list[int]:
        return self.prompt + self.out

    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.out)

    def token_slice(self, start: int, count: int) -> list[int]:
        """tokens()[start:start + count] without building the whole list (decode reads one token per step)."""
        cut = len(self.prompt)
        if start >= cut:
            return self.out[start - cut:start - cut + count]
        return self.prompt[start:start + count] + self.out[:max(0, start + count - cut)]


@dataclass
class SchedulerOutput:
    """One step's work: decode rows (one token each) and prefill rows (request, chunk length)."""

    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    """Continuous batching over `engine` (inference.Engine); tokenizer: for text, stop strings and logprob tokens;
    max_queue: requests accepted beyond the free slots (a request that a free slot takes at the next step is not
    counted, so max_num_seqs + max_queue clients are always served however their requests interleave with steps);
    max_prefill_tokens: prompt tokens per step (default engine.max_chunk)."""

    def __init__(self, engine, tokenizer=None, *, max_queue: int = 64, max_prefill_tokens: int | None = None):
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self.allocator = engine.allocator
        # flat engines (one call per step) count decode rows in the step's budget: max_step_tokens rows a step
        self.flat = bool(getattr(engine, "flat", False))
        self.max_prefill_tokens = max_prefill_tokens or (engine.max_step_tokens if self.flat else engine.max_chunk)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.lock = threading.Condition()
        self.accepting, self._stop = True, False
        self._thread: threading.Thread | None = None
        self.num_steps = self.num_preemptions = 0
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self._token_texts: dict[int, str] = {}

    # ---- requests in -----------------------------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        request.params.validate()
        prompt, engine = request.prompt, self.engine
        if not 1 <= len(prompt) < engine.max_len:
            raise RequestError("prompt", f"{len(prompt)} tokens", f"must be 1..{engine.max_len - 1} tokens "
                               f"(context {engine.max_len} positions, one kept for the first new token)")
        limit = getattr(engine, "num_input_ids", engine.cfg.vocab_size)  # + image placeholders (models/vlm.py)
        if any(not 0 <= t < limit for t in prompt):
            raise RequestError("prompt", "token id out of range", f"ids must be in [0, {limit})")
        room = min(engine.max_len, (engine.num_blocks - 1) * engine.block_size) - len(prompt)
        wanted = request.params.max_new_tokens
        if wanted is not None and wanted > room:
            raise RequestError("max_new_tokens", wanted, f"prompt ({len(prompt)} tokens) + max_new_tokens must fit "
                               f"the context: at most {room} new tokens")
        if room < 1:
            raise RequestError("prompt", f"{len(prompt)} tokens", "leaves no KV cache room for a new token")
        if request.params.stop_strings and self.tokenizer is None:
            raise RequestError("stop_strings", request.params.stop_strings, "need a model with a tokenizer")
        request.budget = room if wanted is None else wanted

    def submit(self, request: Request, *, _unbounded: bool = False) -> Request:
        """Queue a request; RequestError for an impossible one, QueueFull when the queue is full or shutting down."""
        request.prompt = [int(t) for t in request.prompt]
        self._check(request)
        request._rng = np.random.default_rng(request.params.seed)
        if self.tokenizer is not None:
            request._detok = IncrementalDetokenizer(self.tokenizer, request.prompt, request.params.stop_strings)
        with self.lock:
            if not self.accepting:
                raise QueueFull("the scheduler is shutting down")
            free = max(0, self.engine.num_slots - len(self.running))
            if not _unbounded and len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"queue full: {len(self.waiting)} waiting, the limit is max_queue={self.max_queue} "
                                f"+ {free} free of {self.engine.num_slots} slots")
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def cancel(self, request_id: str) -> bool:
        """Cancel a request (client gone): it is finished ("cancelled") and its blocks freed at the next step
        (at once when it is still waiting). Returns whether the request was known and unfinished."""
        with self.lock:
            for request in self.waiting:
                if request.request_id == request_id:
                    self.waiting.remove(request)
                    self._finish(request, "cancelled")
                    return True
            for request in self.running:
                if request.request_id == request_id:
                    request.cancelled = True
                    self.lock.notify_all()
                    return True
        return False

    # ---- schedule ----------------------------------------------------------------------------------------------
    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.release(request.request_id)
        request.num_computed = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        logger.debug("preempted %s (KV blocks exhausted); it will be recomputed", request.request_id)

    def schedule(self) -> SchedulerOutput:
        """Decide this step's work (see the module docstring); call with `self.lock` held or from the only thread."""
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "cancelled")
        batch = SchedulerOutput()
        for request in list(self.running):
            if request not in self.running or request.num_computed < request.num_tokens() - 1:
                continue  # preempted in this loop, or still prefilling
            while not self.allocator.ensure(request.request_id, request.num_computed + 1):
                self._preempt(self.running[-1])
                if request not in self.running:
                    break
            else:
                batch.decode.append(request)
        while self.waiting and len(self.running) < self.engine.num_slots:
            head = self.waiting[0]
            if not self.allocator.ensure(head.request_id, head.num_tokens()):
                break
            self.running.append(self.waiting.popleft())
        room = self.max_prefill_tokens - (len(batch.decode) if self.flat else 0)
        for request in self.running:
            pending = request.num_tokens() - request.num_computed
            if pending >= 1 and request not in batch.decode:
                chunk = min(pending, self.engine.max_chunk, room)
                if chunk < 1:
                    break
                batch.prefill.append((request, chunk))
                room -= chunk
        return batch

    # ---- run and update ---------------------------------------------------------------------------------------
    def step(self) -> None:
        """schedule, run the engine on the decode rows and on the prefill rows, update requests from the outputs."""
        with self.lock:
            batch = self.schedule()
        if not batch:
            return
        self.num_steps += 1
        groups = []
        if batch.decode:
            groups.append([(r, r.num_computed, 1) for r in batch.decode])
        if batch.prefill:
            groups.append([(r, r.num_computed, n) for r, n in batch.prefill])
        if self.flat and len(groups) == 2:  # one engine call: decode tokens and prompt chunks as flat rows
            groups = [groups[0] + groups[1]]
        for rows in groups:
            try:
                output = self.engine.run([r.request_id for r, _, _ in rows],
                                         [r.token_slice(s, n) for r, s, n in rows], [s for _, s, _ in rows])
            except Exception as exc:  # the engine step failed: its requests end, the others go on
                logger.exception("engine step failed")
                with self.lock:
                    for request, _, _ in rows:
                        request.error = exc
                        self._finish(request, "error")
                continue
            with self.lock:
                self.update_from_output(rows, output)

    def update_from_output(self, rows: list[tuple[Request, int, int]], output) -> None:
        """Advance each row's computed tokens; rows that reached the end of their tokens sample the next one."""
        for index, (request, start, count) in enumerate(rows):
            if request.finish_reason is not None:
                continue
            request.num_computed = start + count
            if not request.out:
                self.prompt_tokens_total += count
            if request.num_computed < request.num_tokens():
                continue  # more prompt chunks to go
            try:
                self._emit(request, index, output)
            except Exception as exc:  # this request alone fails
                logger.warning("request %s failed while sampling: %s", request.request_id, exc)
                request.error = exc
                self._finish(request, "error")

    def _emit(self, request: Request, row: int, output) -> None:
        params = request.params
        if params.needs_logits:
            logits = output.logits(row)
            seen = np.asarray(request.tokens()) if params.repetition_penalty != 1.0 else np.empty(0, np.int64)
            token = sample_next(logits, params, seen, request._rng)
            if params.logprobs is not None:
                request.logprobs.append(self._logprob(logits, token, params.logprobs))
        else:
            token = int(output.ids[row])
        request.out.append(token)
        self.generation_tokens_total += 1
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        reason, stop = None, None
        if token in params.stop_token_ids:
            reason, stop = "stop", token  # the stop token's text is never part of .text (vLLM v1)
        elif request._detok is not None:
            request._detok.push(token)
            if request._detok.stop is not None:
                reason, stop = "stop", request._detok.stop
        if reason is None and len(request.out) >= request.budget:
            reason = "length"
        if reason is not None:
            request.stop_reason = stop
            self._finish(request, reason)
            return
        self._sync_text(request)
        self._notify(request)

    def _logprob(self, logits: np.ndarray, token: int, k: int) -> TokenLogprob:
        row = log_softmax(logits)
        text = self._token_text
        return TokenLogprob(token, text(token), float(row[token]), [(i, text(i), lp) for i, lp in top_logprobs(row, k)])

    def _token_text(self, token: int) -> str:
        """One token's own text (logprob entries), decoded once per token id."""
        text = self._token_texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
            self._token_texts[token] = text
        return text

    def _sync_text(self, request: Request) -> None:
        if request._detok is not None:
            request.text = request._detok.text

    def _notify(self, request: Request) -> None:
        if request.on_event is not None:
            try:
                request.on_event()
            except Exception:  # a listener's failure must not stop the loop
                logger.exception("on_event of %s failed", request.request_id)

    def _finish(self, request: Request, reason: str) -> None:
        if request.finish_reason is not None:
            return
        if request._detok is not None and reason != "error":
            request._detok.finish()
        self._sync_text(request)
        request.finish_reason, request.finish_s = reason, time.perf_counter()
        if request in self.running:
            self.running.remove(request)
        self.allocator.release(request.request_id)
        request.done.set()
        self._notify(request)

    # ---- drivers ----------------------------------------------------------------------------------------------
    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running

    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Submit every prompt (params: one SamplingParams or one per prompt) and run until all finish."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.submit(Request(list(p), q), _unbounded=True) for p, q in zip(prompts, params)]
        self.run_until_idle()
        return requests

    def serve_forever(self) -> threading.Thread:
        """Run steps on a daemon thread until `stop()`; sleeps while there is nothing to do."""
        def loop():
            while True:
                with self.lock:
                    while not self._stop and not self.waiting and not self.running:
                        self.lock.wait(0.5)
                    if self._stop and not self.running and not self.waiting:
                        return
                try:
                    self.step()
                except Exception as exc:  # a bug in a step must not leave requests waiting forever
                    logger.exception("scheduler step failed")
                    with self.lock:
                        for request in list(self.running):
                            request.error = exc
                            self._finish(request, "error")

        self._thread = threading.Thread(target=loop, name="scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, cancel waiting ones, let running ones finish for up to grace_s, cancel the rest."""
        with self.lock:
            self.accepting = False
            while self.waiting:
                self._finish(self.waiting.popleft(), "cancelled")
            self._stop = True
            self.lock.notify_all()
        deadline = time.perf_counter() + grace_s
        while self._thread is not None and self._thread.is_alive() and time.perf_counter() < deadline:
            self._thread.join(0.05)
        with self.lock:
            for request in list(self.running):
                request.cancelled = True
            if self._thread is None or not self._thread.is_alive():
                for request in list(self.running):
                    self._finish(request, "cancelled")
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(5.0)

    def stats(self) -> dict:
        """Counters for /metrics: sequences running and waiting, KV blocks used/free/total, block size, prompt and
        generated tokens so far, preemptions, distinct step shapes run (graph compiles in graph mode)."""
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting),
                    "kv_blocks_used": self.allocator.num_used(), "kv_blocks_free": self.allocator.num_free(),
                    "kv_blocks_total": self.engine.num_blocks - 1, "block_size": self.engine.block_size,
                    "prompt_tokens_total": self.prompt_tokens_total,
                    "generation_tokens_total": self.generation_tokens_total, "num_preemptions": self.num_preemptions,
                    "graph_compiles": getattr(self.engine, "graph_compiles", 0)}
