"""Continuous batching through the one Scheduler gives, per request, exactly the tokens of generating that request
alone (greedy, repetition penalty and seeded sampling) while requests join and leave the batch at every step;
admission by sequence slots and free KV blocks; preemption when blocks run out recomputes and yields the same tokens;
stop tokens; a full queue; the background thread and stop()."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.inference import Engine, QueueFull, Request, SamplingParams, Scheduler
from ascend_llm.models.llama import build_model

pytestmark = pytest.mark.xdist_group("batching")  # one xdist worker: module fixtures build once

CFG = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64, max_seq_len=64)
MAX_LEN = 48


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(**CFG), seed=1)


@pytest.fixture(scope="module")
def alone(model):
    engine = Engine(model, MAX_LEN, num_slots=1, block_size=8)
    return lambda prompt, params: engine.generate([prompt], params)[0].token_ids


def workload():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 96, size=n)) for n in (3, 17, 8, 30, 5, 12, 9)]
    lengths = [6, 3, 10, 4, 12, 2, 7]
    params = [SamplingParams(max_new_tokens=m) for m in lengths]
    params[4] = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    params[2] = SamplingParams(max_new_tokens=10, repetition_penalty=1.3)
    return prompts, params


class Watched(Scheduler):
    """Records, after every step, the running count, blocks in use and whether a request joined a running batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace = []

    def step(self):
        before = {r.request_id for r in self.running}
        super().step()
        after = {r.request_id for r in self.running}
        self.trace.append((len(self.running), self.allocator.num_used(), bool(before and after - before)))


def test_same_tokens_as_alone_with_joins_and_leaves(model, alone):
    prompts, params = workload()
    scheduler = Watched(Engine(model, MAX_LEN, num_slots=3, block_size=8))
    requests = scheduler.generate(prompts, params)
    for request, prompt, p in zip(requests, prompts, params):
        assert request.out == alone(prompt, p), request.request_id
        assert request.finish_reason == "length" and len(request.out) == p.max_new_tokens
    assert any(joined for _, _, joined in scheduler.trace)  # requests joined a running batch
    assert max(running for running, _, _ in scheduler.trace) == 3  # never more than the sequence slots
    assert scheduler.num_steps < sum(p.max_new_tokens for p in params)  # decoded concurrently
    assert scheduler.allocator.num_used() == 0 and scheduler.stats()["kv_blocks_used"] == 0


def test_blocks_run_out_preempt_the_newest_and_recompute_the_same_tokens(model, alone):
    """A pool of 9 usable blocks of 4 positions for 3 sequences that each grow to 5 blocks: admission waits for
    free blocks, running sequences preempt the newest when their next token needs a block, and every request still
    gets exactly its tokens alone (greedy and seeded sampling); every block comes back."""
    prompts, params = workload()
    prompts, params = [prompts[0], prompts[2], prompts[4], prompts[6]], [params[0], params[2], params[4], params[6]]
    params = [SamplingParams(**{**vars(q), "max_new_tokens": 20 - len(p)}) for p, q in zip(prompts, params)]
    engine = Engine(model, MAX_LEN, num_slots=3, block_size=4, num_blocks=10)
    scheduler = Watched(engine)
    requests = scheduler.generate(prompts, params)
    assert [r.out for r in requests] == [alone(p, q) for p, q in zip(prompts, params)]
    assert scheduler.num_preemptions > 0 and scheduler.stats()["num_preemptions"] == scheduler.num_preemptions
    assert max(used for _, used, _ in scheduler.trace) <= 9
    assert engine.allocator.num_used() == 0 and engine.allocator.num_free() == 9


def test_stop_token_and_queue_full(model, alone):
    prompt = [5, 9, 13, 2]
    greedy = alone(prompt, SamplingParams(max_new_tokens=8))
    scheduler = Scheduler(Engine(model, MAX_LEN, num_slots=2, block_size=8), max_queue=1)
    request = scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=[greedy[2]])))
    seen = []
    other = Request(prompt, SamplingParams(max_new_tokens=4))
    other.on_event = lambda: seen.append((len(other.out), other.finish_reason))
    scheduler.submit(other)
    queued = scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=4)))  # 2 free slots + max_queue 1
    with pytest.raises(QueueFull):
        scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=4)))
    scheduler.step()  # two requests take the slots: the queue holds one, and max_queue is 1
    with pytest.raises(QueueFull):
        scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=4)))
    scheduler.run_until_idle()
    assert queued.out == greedy[:4]
    stop_at = greedy.index(greedy[2]) + 1
    assert request.out == greedy[:stop_at] and request.finish_reason == "stop"
    assert request.stop_reason == greedy[2]
    assert other.out == greedy[:4] and other.done.is_set()
    assert seen == [(1, None), (2, None), (3, None), (4, "length")]  # one event per change, the last one finishes


def test_max_queue_zero_admits_what_the_free_slots_take(model):
    scheduler = Scheduler(Engine(model, MAX_LEN, num_slots=2, block_size=8), max_queue=0)
    first, second = (scheduler.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=3))) for _ in range(2))
    with pytest.raises(QueueFull, match=r"queue full: 2 waiting, the limit is max_queue=0 \+ 2 free of 2 slots"):
        scheduler.submit(Request([1, 2], SamplingParams(max_new_tokens=2)))
    scheduler.run_until_idle()
    assert len(first.out) == len(second.out) == 3
    assert len(scheduler.submit(Request([1, 2], SamplingParams(max_new_tokens=2))).prompt) == 2  # slots free again


def test_background_thread_and_stop(model):
    scheduler = Scheduler(Engine(model, MAX_LEN, num_slots=2, block_size=8))
    scheduler.serve_forever()
    first = scheduler.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=5)))
    assert first.done.wait(120) and len(first.out) == 5
    assert first.arrival_s <= first.first_token_s <= first.finish_s
    scheduler.stop(grace_s=10)
    with pytest.raises(QueueFull):
        scheduler.submit(Request([1, 2], SamplingParams(max_new_tokens=2)))
