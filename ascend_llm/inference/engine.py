"""Generation with a KV cache: prefill the prompts, then one token per step, at static shapes.

`Engine` owns a `CachedForward` and a cache of `num_slots` slots of `max_len` positions. Its two primitives are
what a continuous-batching scheduler needs (issue 13): `prefill(slots, prompts)` writes whole prompts into the
given slots and returns each prompt's last-position logits; `decode(slots, tokens, positions)` appends one token
per slot and returns the next logits. `generate(prompts, params)` runs a batch of prompts to completion with
per-request sampling and stop conditions.

Prompts are written at positions 0..len-1 of their slot and padded on the right up to a bucket (a multiple of
`prefill_bucket`), so graph mode compiles one prefill graph per bucket and one decode graph; each row keeps its
own position counter, which is equivalent to transformers' left padding with position ids and needs no mask.
With `prefill_by_decode=True` prompts go through the decode graph one position per call instead: no prefill
graph to compile (about as long as the decode graph's), for prompts of a few tokens (the trainer's sample).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, mutable, nn

from ascend_llm.errors import ConfigError
from ascend_llm.inference.kv_cache import CachedForward, empty_cache
from ascend_llm.inference.sampling import SamplingParams, sample_next


@dataclass
class GenerationResult:
    """token_ids: generated ids (stop token included, stop string's tokens included); text: decoded continuation
    cut before a stop string (None without a tokenizer); finish_reason: "stop_token", "stop_string" or "length"."""

    token_ids: list[int]
    text: str | None
    finish_reason: str


class Engine:
    """KV-cache generation for a Llama-family `Transformer` (anything with `cfg`, `tok_embeddings`, `layers`,
    `project_logits`). max_len: cache positions per slot (prompt + new tokens), at most model.cfg.max_seq_len
    for models whose RoPE was trained that far; num_slots: concurrent sequences; prefill_bucket: prompt lengths
    are padded up to a multiple of it (one compiled prefill graph per bucket); prefill_by_decode: feed prompts
    through the decode graph instead (see the module doc)."""

    def __init__(self, model: nn.Cell, max_len: int, num_slots: int = 1, prefill_bucket: int = 64,
                 prefill_by_decode: bool = False):
        if max_len < 2:
            raise ConfigError("max_len", max_len, "must be >= 2 (prompt + at least one new token)")
        if num_slots < 1:
            raise ConfigError("num_slots", num_slots, "must be >= 1")
        self.model, self.max_len, self.num_slots = model, max_len, num_slots
        self.prefill_bucket = max(1, prefill_bucket)
        self.prefill_by_decode = prefill_by_decode
        self.forward = CachedForward(model, max_len)
        self.keys, self.values = empty_cache(model.cfg, num_slots, max_len)
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    def _run(self, tokens: np.ndarray, slots, start: np.ndarray, logit_index: np.ndarray) -> np.ndarray:
        logits, keys, values = self.forward(
            Tensor(tokens.astype(np.int32)), Tensor(np.asarray(slots, np.int32)), Tensor(start.astype(np.int32)),
            Tensor(logit_index.astype(np.int32)), mutable(self.keys), mutable(self.values))
        self.keys, self.values = tuple(keys), tuple(values)
        return logits.asnumpy()

    def _check_slots(self, slots) -> None:
        for slot in slots:
            if not 0 <= int(slot) < self.num_slots:
                raise ConfigError("slot", slot, f"must be in [0, {self.num_slots})")

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Write each prompt into its slot from position 0; returns last-position logits (len(slots), V) float32."""
        self._check_slots(slots)
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1 or lengths.max() >= self.max_len:
            raise ConfigError("prompt length", int(lengths.max() if lengths.min() else 0),
                              f"must be in [1, {self.max_len - 1}] (cache max_len={self.max_len})")
        bucket = min(-(-int(lengths.max()) // self.prefill_bucket) * self.prefill_bucket, self.max_len)
        tokens = np.zeros((len(prompts), bucket), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        began = time.perf_counter()
        if self.prefill_by_decode:
            logits = self._prefill_by_decode(tokens, slots, lengths)
        else:
            logits = self._run(tokens, slots, np.zeros(len(slots), np.int32), (lengths - 1)[:, None])[:, 0]
        self.stats["prefill_s"] += time.perf_counter() - began
        self.stats["prefill_tokens"] += int(lengths.sum())
        return logits

    def _prefill_by_decode(self, tokens: np.ndarray, slots, lengths: np.ndarray) -> np.ndarray:
        """Positions 0..max(lengths)-1 through the decode graph; each row's logits at its last prompt position.
        Rows past their prompt write padding, which the next decode step overwrites before any query sees it."""
        rows, out = np.arange(len(slots)), None
        for position in range(int(lengths.max())):
            step = self._decode_step(slots, tokens[:, position], np.full(len(slots), position, np.int32))
            out = np.empty_like(step) if out is None else out
            last = rows[lengths - 1 == position]
            out[last] = step[last]
        return out

    def _decode_step(self, slots, tokens, positions: np.ndarray) -> np.ndarray:
        """One token per slot at its position through the decode graph: next-token logits (len(slots), V)."""
        return self._run(np.asarray(tokens, np.int32)[:, None], slots, positions, np.zeros((len(slots), 1)))[:, 0]

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """Append tokens[i] at positions[i] of slots[i]; returns next-token logits (len(slots), V) float32.
        Keep len(slots) fixed (e.g. all slots, idle ones at position 0) so one graph serves every step."""
        self._check_slots(slots)
        positions = np.asarray(positions, np.int32)
        if positions.max() >= self.max_len:
            raise ConfigError("position", int(positions.max()), f"must be < cache max_len={self.max_len}")
        began = time.perf_counter()
        logits = self._decode_step(slots, tokens, positions)
        self.stats["decode_s"] += time.perf_counter() - began
        self.stats["decode_tokens"] += len(slots)
        return logits

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 tokenizer=None) -> list[GenerationResult]:
        """Run up to num_slots prompts to completion. params: one for all or one per prompt (seeded streams)."""
        if len(prompts) > self.num_slots:
            raise ConfigError("prompts", len(prompts), f"at most num_slots={self.num_slots} per call")
        params = params if isinstance(params, list) else [params] * len(prompts)
        for p in params:
            p.validate()
        batch = len(prompts)
        budget = [min(p.max_new_tokens, self.max_len - len(prompt)) for p, prompt in zip(params, prompts)]
        rngs = [np.random.default_rng(p.seed) for p in params]
        seen = [list(prompt) for prompt in prompts]
        out: list[list[int]] = [[] for _ in range(batch)]
        done: list[str | None] = [None] * batch
        logits = self.prefill(list(range(batch)), prompts)
        while True:
            for row in range(batch):
                if done[row] is None:
                    token = sample_next(logits[row], params[row], np.asarray(seen[row]), rngs[row])
                    out[row].append(token)
                    seen[row].append(token)
                    done[row] = _finished(out[row], params[row], budget[row], tokenizer)
            if all(reason is not None for reason in done):
                break
            positions = [len(s) - 1 for s in seen]
            logits = self.decode(list(range(batch)), [s[-1] for s in seen], positions)
        return [GenerationResult(ids, _text(ids, p, tokenizer), reason) for ids, p, reason in zip(out, params, done)]

    def tokens_per_second(self) -> dict[str, float]:
        """Throughput so far: prefill and decode tokens / s (decode counts one token per slot per step)."""
        s = self.stats
        return {"prefill_tokens_per_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
                "decode_tokens_per_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0}


def _finished(ids: list[int], params: SamplingParams, budget: int, tokenizer) -> str | None:
    if ids[-1] in params.stop_token_ids:
        return "stop_token"
    if params.stop_strings and tokenizer is not None:
        text = tokenizer.decode(ids)
        if any(stop in text for stop in params.stop_strings):
            return "stop_string"
    return "length" if len(ids) >= budget else None


def _text(ids: list[int], params: SamplingParams, tokenizer) -> str | None:
    if tokenizer is None:
        return None
    text = tokenizer.decode(ids)
    cuts = [text.index(stop) for stop in params.stop_strings if stop in text]
    return text[:min(cuts)] if cuts else text
