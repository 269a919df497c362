"""Paged KV cache: the block allocator's bookkeeping, and paged logits (in-place cache writes, attention over a
sequence's own blocks, chunked prefill, ragged rows, block boundaries) equal to an independent float64 NumPy forward
of the whole sequence (tests/unit/test_model_reference.py's `np_forward`)."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.config.model import ModelConfig
from ascend_llm.inference.engine import Engine, bucket
from ascend_llm.inference.kv_cache import NULL_BLOCK, BlockAllocator, CacheWriter
from ascend_llm.models import build_model
from tests.unit.test_model_reference import np_forward

pytestmark = pytest.mark.xdist_group("kv_paged")  # one xdist worker: module fixtures build once

CFG = ModelConfig(name="paged", vocab_size=97, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=48,
                  max_seq_len=64, rope_theta=500.0, init_std=0.2, tie_embeddings=True, qkv_bias=True)
TOL = 1e-4  # float32 engine vs float64 reference; measured max |diff| ~1e-6 at logit scale ~3


def test_allocator_hands_out_blocks_as_tokens_arrive_and_frees_them():
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    assert alloc.num_free() == 5 and alloc.num_used() == 0  # block 0 is the null block
    assert alloc.ensure("a", 1) and alloc.table("a") == [1]
    assert alloc.ensure("a", 4) and alloc.table("a") == [1]  # same block up to block_size tokens
    assert alloc.ensure("a", 5) and alloc.table("a") == [1, 2]
    assert alloc.ensure("b", 9) and len(alloc.table("b")) == 3 and alloc.num_free() == 0
    assert not alloc.ensure("c", 1) and alloc.table("c") == []  # nothing taken when short
    assert NULL_BLOCK not in alloc.table("a") + alloc.table("b")
    np.testing.assert_array_equal(alloc.slots("a", 3, 3), [1 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1])
    assert alloc.release("b") == 3 and alloc.num_free() == 3 and alloc.num_used() == 2
    assert alloc.release("a") == 2 and alloc.num_used() == 0 and alloc.release("a") == 0
    assert bucket(5) == 8 and bucket(1) == 1 and bucket(9, high=8) == 8


@pytest.mark.parametrize("in_place_kernel", [True, False])
def test_cache_writer_writes_slots_in_place_and_skips_padding(in_place_kernel):
    import mindspore as ms
    from mindspore import Parameter, nn, ops

    class Write(nn.Cell):
        def __init__(self):
            super().__init__()
            self.cache = Parameter(Tensor(np.zeros((3, 2, 1, 2), np.float32)), name="cache", requires_grad=False)
            self.writer = CacheWriter(in_place_kernel)

        def construct(self, new, slots):
            done = self.writer(self.cache, new, slots)
            return ops.depend(self.cache, done).sum()

    cell = Write()
    new = np.arange(6, dtype=np.float32).reshape(3, 1, 2) + 1
    total = cell(Tensor(new), Tensor(np.array([5, -1, 2], np.int32)))
    got = cell.cache.asnumpy().reshape(6, 2)
    assert ms.get_context("mode") == ms.GRAPH_MODE
    np.testing.assert_array_equal(got[5], new[0, 0]) and np.testing.assert_array_equal(got[2], new[2, 0])
    if in_place_kernel:  # the padding row went nowhere (the fallback puts it in the null block's slot 0)
        assert got[[1, 3, 4]].sum() == 0 and got[0].sum() == 0
    assert float(total.asnumpy()) == pytest.approx(got.sum())


@pytest.fixture(scope="module")
def model_and_weights():
    model = build_model(CFG, seed=3)
    model.set_train(False)
    weights = {p.name: p.asnumpy().astype(np.float64) for p in model.trainable_params()}
    return model, weights


def reference_last_logits(weights, tokens: list[int]) -> np.ndarray:
    return np_forward(weights, CFG, np.array([tokens]))[0, -1]


def test_paged_logits_equal_full_forward_ragged_chunked_across_blocks(model_and_weights):
    """Three ragged prompts prefilled in chunks of 4 over blocks of 4 (chunks and blocks end at different places),
    then decode steps with all rows: every row's logits equal the float64 forward of its whole sequence."""
    model, weights = model_and_weights
    engine = Engine(model, max_len=40, num_slots=4, block_size=4, max_chunk=4)
    rng = np.random.default_rng(0)
    seqs = {f"s{i}": list(rng.integers(0, CFG.vocab_size, size=n)) for i, n in enumerate((3, 9, 14))}
    done = dict.fromkeys(seqs, 0)
    while any(done[s] < len(t) for s, t in seqs.items()):  # chunked prefill, one chunk per row per step
        rows = [s for s in seqs if done[s] < len(seqs[s])]
        chunks = [seqs[s][done[s]:done[s] + 4] for s in rows]
        for s, chunk in zip(rows, chunks):
            assert engine.allocator.ensure(s, done[s] + len(chunk))
        out = engine.run(rows, chunks, [done[s] for s in rows])
        for i, (s, chunk) in enumerate(zip(rows, chunks)):
            done[s] += len(chunk)
            np.testing.assert_allclose(out.logits(i), reference_last_logits(weights, seqs[s][:done[s]]), atol=TOL)
    for _ in range(6):  # decode: each row appends its greedy token (rows cross block boundaries at different steps)
        rows = list(seqs)
        ids = [[int(np.argmax(reference_last_logits(weights, seqs[s])))] for s in rows]
        for s, new in zip(rows, ids):
            assert engine.allocator.ensure(s, len(seqs[s]) + 1)
        out = engine.run(rows, ids, [len(seqs[s]) for s in rows])
        for i, (s, new) in enumerate(zip(rows, ids)):
            seqs[s].append(new[0])
            reference = reference_last_logits(weights, seqs[s])
            np.testing.assert_allclose(out.logits(i), reference, atol=TOL)
            assert out.ids[i] == int(np.argmax(out.logits(i)))  # the device argmax is the logits' argmax
    held = {s: len(engine.allocator.table(s)) for s in seqs}
    assert held == {s: -(-len(t) // 4) for s, t in seqs.items()}  # blocks as tokens arrived, no more
    assert engine.cache_bytes() == sum(held.values()) * 2 * CFG.num_layers * 4 * CFG.num_kv_heads * CFG.head_dim * 4
