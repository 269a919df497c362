"""No graph compile under traffic: after `Engine.warm_up()` (what `serve` runs before /health answers), a mix of
prompt lengths (1 token to longer than a chunk), output lengths and arrivals through the scheduler runs only shapes
the warm-up compiled, on the fused flat-row path and on the MindSpore-ops path; the flat path's tokens equal those of
each request generated alone."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.inference import Engine, Request, SamplingParams, Scheduler
from ascend_llm.models.llama import build_model

CFG = dict(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(**CFG), seed=2)


def traffic(scheduler: Scheduler) -> list[Request]:
    """Prompts of 1..70 tokens (chunks of 32) with 1..9 new tokens, submitted a few at a time between steps."""
    rng = np.random.default_rng(0)
    lengths = [1, 70, 5, 33, 2, 17, 64, 9, 31, 3, 50, 12]
    requests = [Request([int(t) for t in rng.integers(0, 96, n)], SamplingParams(max_new_tokens=int(m)))
                for n, m in zip(lengths, rng.integers(1, 10, len(lengths)))]
    pending = list(requests)
    while pending or not scheduler.idle():
        for _ in range(int(rng.integers(0, 4))):
            if pending:
                scheduler.submit(pending.pop(0))
        scheduler.step()
    return requests


@pytest.mark.parametrize("fused", [True, False], ids=["flat-rows", "mindspore-ops"])
def test_traffic_after_warm_up_compiles_nothing(model, fused):
    engine = Engine(model, 80, num_slots=4, block_size=8, max_chunk=32, fused_decode=fused)
    assert engine.flat == fused
    shapes = engine.graph_shapes()
    engine.warm_up()
    assert engine.graph_compiles == len(shapes) == len(set(shapes))
    requests = traffic(Scheduler(engine))
    assert all(r.finish_reason == "length" and len(r.out) == r.params.max_new_tokens for r in requests)
    assert engine.graph_compiles == len(shapes)  # every step ran a warm-up shape
    assert Scheduler(engine).stats()["graph_compiles"] == len(shapes)
    if fused:  # a whole 70-token prompt in one Engine.run call runs in pieces of at most 32 rows, no new shape
        prompt = requests[1].prompt
        assert engine.allocator.ensure("whole", len(prompt)) and len(prompt) == 70
        assert engine.run(["whole"], [prompt], [0]).ids[0] == requests[1].out[0]
        engine.allocator.release("whole")
        assert engine.graph_compiles == len(shapes)
    if fused:  # several prompt chunks and decode tokens shared steps, and each request got its own tokens
        alone = Engine(model, 80, num_slots=1, block_size=8, max_chunk=32)
        for request in requests[:4]:  # 1 token, 70 (three chunks), 5, 33 (test_batching covers more)
            assert request.out == alone.generate([request.prompt], request.params)[0].token_ids
