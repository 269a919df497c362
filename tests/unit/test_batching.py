"""Continuous batching gives, per request, exactly the tokens of generating that request alone (greedy and
seeded sampling), while requests join and leave the batch at every step; admission by slots and token budget;
stop conditions; a full queue."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.inference.batching import ContinuousBatcher, QueueFull, Request
from ascend_llm.inference.engine import Engine
from ascend_llm.inference.sampling import SamplingParams
from ascend_llm.models.llama import build_model

CFG = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64, max_seq_len=64)
MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(**CFG), seed=1)


@pytest.fixture(scope="module")
def alone(model):
    engine = Engine(model, MAX_LEN, num_slots=1, prefill_bucket=16)
    return lambda prompt, params: engine.generate([prompt], params)[0].token_ids


def workload():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 96, size=n)) for n in (3, 17, 8, 30, 5, 12, 9)]
    lengths = [6, 3, 10, 4, 12, 2, 7]
    params = [SamplingParams(max_new_tokens=m) for m in lengths]
    params[4] = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    params[2] = SamplingParams(max_new_tokens=10, repetition_penalty=1.3)
    return prompts, params


def test_same_tokens_as_alone_with_joins_and_leaves(model, alone):
    prompts, params = workload()
    batcher = ContinuousBatcher(Engine(model, MAX_LEN, num_slots=3, prefill_bucket=16))
    joined_while_running = []
    original_admit = batcher._admit

    def admit():
        running = len(batcher.active)
        got = original_admit()
        if got and running:
            joined_while_running.append(len(got))
        return got

    batcher._admit = admit
    requests = batcher.generate(prompts, params)
    for request, prompt, p in zip(requests, prompts, params):
        assert request.out == alone(prompt, p), request.request_id
        assert request.finish_reason == "length" and len(request.out) == p.max_new_tokens
    assert joined_while_running  # requests joined a running batch
    assert batcher.num_steps < sum(p.max_new_tokens for p in params) - len(params)  # decoded concurrently


def test_token_budget_limits_admission(model, alone):
    prompts, params = workload()
    budget = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params))
    batcher = ContinuousBatcher(Engine(model, MAX_LEN, num_slots=3, prefill_bucket=16), token_budget=budget)
    seen = []
    original_step = batcher.step

    def step():
        original_step()
        seen.append(sum(r.reserved_tokens() for r in batcher.active.values()))

    batcher.step = step
    requests = batcher.generate(prompts, params)
    assert max(seen) <= budget
    assert [r.out for r in requests] == [alone(p, q) for p, q in zip(prompts, params)]


def test_stop_token_and_queue_full(model, alone):
    prompt = [5, 9, 13, 2]
    greedy = alone(prompt, SamplingParams(max_new_tokens=8))
    batcher = ContinuousBatcher(Engine(model, MAX_LEN, num_slots=2, prefill_bucket=16), max_queue=2)
    request = batcher.submit(Request(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=[greedy[2]])))
    streamed = []
    other = batcher.submit(Request(prompt, SamplingParams(max_new_tokens=4), on_token=streamed.append))
    with pytest.raises(QueueFull):
        batcher.submit(Request(prompt, SamplingParams(max_new_tokens=4)))
    batcher.run_until_idle()
    stop_at = greedy.index(greedy[2]) + 1
    assert request.out == greedy[:stop_at] and request.finish_reason == "stop_token"
    assert other.out == streamed == greedy[:4] and other.done.is_set()


def test_background_thread_and_stop(model):
    batcher = ContinuousBatcher(Engine(model, MAX_LEN, num_slots=2, prefill_bucket=16))
    batcher.serve_forever()
    first = batcher.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=5)))
    assert first.done.wait(120) and len(first.out) == 5
    batcher.stop(grace_s=10)
    with pytest.raises(QueueFull):
        batcher.submit(Request([1, 2], SamplingParams(max_new_tokens=2)))
