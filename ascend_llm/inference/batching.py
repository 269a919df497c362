"""Continuous batching over the KV-cache `Engine`: requests join and leave the running batch at every decode step.

The engine's cache has `num_slots` fixed slots of `max_len` positions. Each `step()`:
  1. admits waiting requests in arrival order while a slot is free and the token budget allows (a request
     reserves len(prompt) + max_new_tokens cache positions; the head of the queue waits rather than being
     overtaken, so no request starves), prefilling each one alone into its slot (one compiled graph per
     prompt-length bucket) and sampling its first token;
  2. runs one decode over all slots (idle slots feed token 0 at position 0, so the decode shape never changes
     and graph mode compiles it once), samples each active request's next token with its own SamplingParams and
     random stream, and retires requests that hit a stop token, a stop string, their max_new_tokens or the
     cache end, freeing their slots for the next step.
`serve_forever` runs steps on a background thread; `submit` is thread-safe and raises QueueFull past
`max_queue` waiting requests. An exception inside a step finishes the requests it touched with finish_reason
"error" (the exception kept in `request.error`) and the loop goes on. Stopping cancels waiting requests and
lets running ones finish (or cancels them after `grace_s`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ascend_llm.errors import ConfigError
from ascend_llm.inference.sampling import SamplingParams, sample_next

logger = logging.getLogger("ascend_llm.inference")


class QueueFull(RuntimeError):
    """The waiting queue is at max_queue (the server answers 503)."""


_ids = itertools.count()


@dataclass
class Request:
    """One generation request. on_token(token_id) is called on the scheduler thread for every new token;
    `done` is set when finish_reason is known ("stop_token", "stop_string", "length" or "cancelled")."""

    prompt: list
    params: SamplingParams
    on_token: Optional[Callable[[int], None]] = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    out: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    slot: Optional[int] = None
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: Optional[float] = None
    finish_s: Optional[float] = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    error: Optional[BaseException] = None

    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens


def finish_reason(ids: list, params: SamplingParams, budget: int, tokenizer) -> Optional[str]:
    """Why generation of `ids` stops now, or None: stop token, stop string in the decoded text, or length."""
    if ids[-1] in params.stop_token_ids:
        return "stop_token"
    if params.stop_strings and tokenizer is not None and any(s in tokenizer.decode(ids) for s in params.stop_strings):
        return "stop_string"
    return "length" if len(ids) >= budget else None


class ContinuousBatcher:
    """Scheduler over `engine` (inference.Engine). token_budget: cache positions all running requests may reserve
    together (default num_slots * max_len, i.e. slots are the only limit); max_queue: waiting requests allowed."""

    def __init__(self, engine, tokenizer=None, max_queue: int = 64, token_budget: Optional[int] = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue = max_queue
        self.token_budget = token_budget or engine.num_slots * engine.max_len
        self.waiting: collections.deque = collections.deque()
        self.active: dict[int, Request] = {}
        self.rngs: dict[str, np.random.Generator] = {}
        self.lock = threading.Condition()
        self.accepting = True
        self.num_steps = 0
        self._thread: Optional[threading.Thread] = None
        self._stop = False

    def submit(self, request: Request) -> Request:
        """Queue a request; ConfigError for an impossible one (empty, too long, bad params), QueueFull when full."""
        request.params.validate()
        if not 1 <= len(request.prompt) < self.engine.max_len:
            raise ConfigError("prompt", f"{len(request.prompt)} tokens",
                              f"must be 1..{self.engine.max_len - 1} tokens (cache max_len={self.engine.max_len})")
        if request.reserved_tokens() > self.token_budget:
            raise ConfigError("max_tokens", request.params.max_new_tokens,
                              f"prompt + max_tokens must fit the token budget {self.token_budget}")
        with self.lock:
            if not self.accepting:
                raise QueueFull("server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.active

    def _free_slots(self) -> list[int]:
        return [s for s in range(self.engine.num_slots) if s not in self.active]

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason, request.finish_s = reason, time.perf_counter()
        if request.slot is not None:
            self.active.pop(request.slot, None)
        self.rngs.pop(request.request_id, None)
        request.done.set()

    def _emit(self, request: Request, logits: np.ndarray) -> None:
        seen = np.asarray(request.prompt + request.out)
        token = sample_next(logits, request.params, seen, self.rngs[request.request_id])
        request.out.append(token)
        if request.first_token_s is None:
            request.first_token_s = time.perf_counter()
        if request.on_token is not None:
            request.on_token(token)
        budget = min(request.params.max_new_tokens, self.engine.max_len - len(request.prompt))
        reason = finish_reason(request.out, request.params, budget, self.tokenizer)
        if reason is not None:
            self._finish(request, reason)

    def _admit(self) -> list[Request]:
        admitted = []
        with self.lock:
            reserved = sum(r.reserved_tokens() for r in self.active.values())
            for slot in self._free_slots():
                while self.waiting and self.waiting[0].cancelled:
                    self._finish(self.waiting.popleft(), "cancelled")
                if not self.waiting or reserved + self.waiting[0].reserved_tokens() > self.token_budget:
                    break
                request = self.waiting.popleft()
                request.slot = slot
                self.active[slot] = request
                reserved += request.reserved_tokens()
                admitted.append(request)
        return admitted

    def step(self) -> None:
        """Admit what fits, then one decode step over all slots (see the module docstring)."""
        for request in self._admit():
            self.rngs[request.request_id] = np.random.default_rng(request.params.seed)
            logits = self.engine.prefill([request.slot], [request.prompt])
            self._emit(request, logits[0])
        for request in [r for r in self.active.values() if r.cancelled]:
            self._finish(request, "cancelled")
        if not self.active:
            return
        slots = list(range(self.engine.num_slots))
        running = dict(self.active)
        tokens = [running[s].out[-1] if s in running else 0 for s in slots]
        positions = [len(running[s].prompt) + len(running[s].out) - 1 if s in running else 0 for s in slots]
        logits = self.engine.decode(slots, tokens, positions)
        self.num_steps += 1
        for slot, request in running.items():
            self._emit(request, logits[slot])

    def fail_running(self, exc: BaseException) -> None:
        """Finish every running request with finish_reason "error" and free its slot."""
        with self.lock:
            for request in list(self.active.values()):
                request.error = exc
                self._finish(request, "error")

    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()

    def generate(self, prompts: list, params) -> list[Request]:
        """Submit every prompt (params: one SamplingParams or one per prompt) and run until all finish."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.submit(Request(list(p), q)) for p, q in zip(prompts, params)]
        self.run_until_idle()
        return requests

    def serve_forever(self) -> threading.Thread:
        """Run steps on a daemon thread until `stop()`; sleeps while there is nothing to do."""
        def loop():
            while True:
                with self.lock:
                    while not self._stop and not self.waiting and not self.active:
                        self.lock.wait(0.5)
                    if self._stop and not self.active and not self.waiting:
                        return
                try:
                    self.step()
                except Exception as exc:  # a failing step must not leave its requests waiting forever
                    logger.exception("continuous batching step failed")
                    self.fail_running(exc)

        self._thread = threading.Thread(target=loop, name="continuous-batcher", daemon=True)
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
            for request in list(self.active.values()):
                request.cancelled = True
        if self._thread is not None:
            self._thread.join(5.0)
