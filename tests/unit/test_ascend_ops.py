"""The Ascend paged-KV-cache fast path (inference/ascend_ops.py) on CPU: argument construction against a float64
NumPy paged attention and cache write (the operators' documented semantics), MindSpore 2.10's own shape and type
inference of ReshapeAndCache / PagedAttention on the arguments built here, and the error off Ascend."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn
from mindspore import dtype as mstype

from ascend_llm.inference import ascend_ops
from ascend_llm.inference.ascend_ops import (
    AscendOpsUnavailable,
    from_kernel,
    kernel_query,
    kernel_slots,
    kernel_tokens,
    paged_attention_args,
    reshape_and_cache_args,
)

NB, BS, HKV, D = 12, 16, 2, 64


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kernel_semantics(q, key_cache, value_cache, tables, lens, scale, kv_heads):
    """PagedAttention as documented (ATB PagedAttentionOperation): q (T, N, D); token t attends to positions
    0 .. lens[t] - 1 read through block table row t; query head h reads KV head h // (N / kv_heads). float64."""
    tokens, heads, _ = q.shape
    out = np.zeros(q.shape)
    for t in range(tokens):
        pos = np.arange(lens[t])
        keys = key_cache[tables[t, pos // BS], pos % BS].astype(np.float64)
        values = value_cache[tables[t, pos // BS], pos % BS].astype(np.float64)
        for h in range(heads):
            kv = h // (heads // kv_heads)
            out[t, h] = softmax(scale * keys[:, kv] @ q[t, h]) @ values[:, kv]
    return out


def write_semantics(cache, rows, slots):
    """ReshapeAndCache as documented: rows (1, T, H_kv * D) stored at slots (T,) of cache (NB, BS, H_kv, D)."""
    out = cache.copy()
    for i, slot in enumerate(slots):
        out[slot // BS, slot % BS] = rows[0, i].reshape(HKV, D)
    return out


def paged_batch(rng, lengths, dtype=np.float16):
    """Random sequences of the given lengths stored in shuffled blocks (block 0 is the null block)."""
    key_cache = np.zeros((NB, BS, HKV, D), dtype)
    value_cache = np.zeros((NB, BS, HKV, D), dtype)
    free = list(rng.permutation(np.arange(1, NB)))
    width = max(-(-n // BS) for n in lengths)
    tables = np.zeros((len(lengths), width), np.int32)
    keys, values = [], []
    for row, n in enumerate(lengths):
        k = rng.normal(size=(n, HKV, D)).astype(dtype)
        v = rng.normal(size=(n, HKV, D)).astype(dtype)
        for b in range(-(-n // BS)):
            tables[row, b] = free.pop()
        pos = np.arange(n)
        key_cache[tables[row, pos // BS], pos % BS] = k
        value_cache[tables[row, pos // BS], pos % BS] = v
        keys.append(k.astype(np.float64))
        values.append(v.astype(np.float64))
    return key_cache, value_cache, tables, keys, values


@pytest.mark.parametrize("heads,cache_dtype", [(8, mstype.float16), (2, mstype.float16), (4, mstype.bfloat16)])
def test_paged_attention_arguments_match_attention(heads, cache_dtype):
    """BNSD decode query -> kernel query -> documented kernel semantics -> caller layout equals plain float64
    attention over each sequence's own keys (GQA, scale, context lengths, block tables)."""
    rng = np.random.default_rng(heads)
    lengths = [5, 33, 16, 1]
    key_cache, value_cache, tables, keys, values = paged_batch(rng, lengths)
    q = rng.normal(size=(len(lengths), heads, 1, D)).astype(np.float32)
    scale = 0.7 / np.sqrt(D)
    args = paged_attention_args(q.shape, key_cache.shape, cache_dtype, tables.shape, (len(lengths),), scale, HKV)
    assert (args.head_num, args.kv_head_num, args.layout) == (heads, HKV, "BNSD")
    assert args.kernel_dtype == cache_dtype and args.scale_value == pytest.approx(scale)
    query = kernel_query(Tensor(q), args.query_shape, args.kernel_dtype)
    assert query.shape == (len(lengths), heads, D) and query.dtype == cache_dtype
    kernel_out = kernel_semantics(query.astype(mstype.float32).asnumpy(), key_cache, value_cache, tables,
                                  np.array(lengths), args.scale_value, args.kv_head_num)
    out = from_kernel(Tensor(kernel_out.astype(np.float32)), q.shape, mstype.float32).asnumpy()
    assert out.shape == q.shape and out.dtype == np.float32
    group = heads // HKV
    for i, n in enumerate(lengths):
        for h in range(heads):
            ref = softmax(scale * keys[i][:, h // group] @ q[i, h, 0].astype(np.float64)) @ values[i][:, h // group]
            tol = 2e-3 if cache_dtype == mstype.float16 else 2e-2  # the query is rounded to the cache dtype
            np.testing.assert_allclose(out[i, h, 0], ref, rtol=tol, atol=tol)


def test_reshape_and_cache_arguments_write_the_right_slots():
    rng = np.random.default_rng(0)
    cache = np.zeros((NB, BS, HKV, D), np.float16)
    key = rng.normal(size=(5, HKV, D)).astype(np.float32)
    slots = np.array([3 * BS + 2, 7 * BS, -1, 7 * BS + 15, 1], np.int32)  # -1: a padding row
    args = reshape_and_cache_args(key.shape, key.shape, cache.shape, mstype.float16, slots.shape)
    rows = kernel_tokens(Tensor(key), args.token_shape, args.kernel_dtype)
    assert rows.shape == (1, 5, HKV * D) and rows.dtype == mstype.float16
    safe = kernel_slots(Tensor(slots)).asnumpy()
    np.testing.assert_array_equal(safe, [3 * BS + 2, 7 * BS, 0, 7 * BS + 15, 1])  # padding -> null block slot 0
    written = write_semantics(cache, rows.asnumpy(), safe)
    for i, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(written[slot // BS, slot % BS], key[i].astype(np.float16))
    untouched = np.ones((NB, BS), bool)
    untouched[[3, 7, 7, 0, 0], [2, 0, 15, 0, 1]] = False
    assert not written[untouched].any()


@pytest.mark.parametrize("change,match", [
    (dict(heads=7), "multiple of num_kv_heads"),
    (dict(cache_dtype=mstype.float32), "float16 or bfloat16"),
    (dict(block_size=8), "block_size=8"),
    (dict(head_dim=512), "head_dim=512"),
    (dict(block_size=512), "head_dim \\* block_size"),
    (dict(seq=4), "one query token per sequence"),
    (dict(table_rows=3), "block_tables shape"),
    (dict(kv_heads=1), "num_kv_heads=1"),
])
def test_paged_attention_refuses_what_the_kernel_rejects(change, match):
    p = dict(heads=8, kv_heads=HKV, cache_dtype=mstype.float16, block_size=BS, head_dim=D, seq=1, table_rows=4)
    p.update(change)
    q_shape = (4, p["heads"], p["seq"], p["head_dim"])
    cache_shape = (NB, p["block_size"], HKV, p["head_dim"])
    with pytest.raises(ValueError, match=match):
        paged_attention_args(q_shape, cache_shape, p["cache_dtype"], (p["table_rows"], 3), (4,), 0.1, p["kv_heads"])


def test_reshape_and_cache_refuses_mismatches():
    with pytest.raises(ValueError, match="slot_mapping shape"):
        reshape_and_cache_args((4, HKV, D), (4, HKV, D), (NB, BS, HKV, D), mstype.float16, (5,))
    with pytest.raises(ValueError, match="expected num_kv_heads=4"):
        reshape_and_cache_args((4, 4, D), (4, 4, D), (NB, BS, HKV, D), mstype.float16, (4,))
    with pytest.raises(ValueError, match="both must be"):
        reshape_and_cache_args((4, HKV, D), (4, HKV, 32), (NB, BS, HKV, D), mstype.float16, (4,))


class PagedStep(nn.Cell):
    """What the engine does on Ascend: write the new token's K/V, then attend (graph mode)."""

    def __init__(self, dtype):
        super().__init__()
        zeros = np.zeros((NB, BS, HKV, D), np.float32)
        self.key_cache = Parameter(Tensor(zeros, dtype), name="key_cache", requires_grad=False)
        self.value_cache = Parameter(Tensor(zeros, dtype), name="value_cache", requires_grad=False)

    def construct(self, q, k, v, slots, tables, lens):
        wrote = ascend_ops.reshape_and_cache(k, v, self.key_cache, self.value_cache, slots)
        q = ms.ops.depend(q, wrote)
        return ascend_ops.paged_attention(q, self.key_cache, self.value_cache, tables, lens, D ** -0.5, HKV)


def step_inputs(batch=3, heads=8):
    rng = np.random.default_rng(1)
    return (Tensor(rng.normal(size=(batch, heads, 1, D)).astype(np.float32)),
            Tensor(rng.normal(size=(batch, HKV, D)).astype(np.float32)),
            Tensor(rng.normal(size=(batch, HKV, D)).astype(np.float32)),
            Tensor(np.array([BS + 3, 2 * BS, -1], np.int32)),
            Tensor(np.array([[1, 0], [4, 2], [0, 0]], np.int32)), Tensor(np.array([4, 17, 1], np.int32)))


@pytest.fixture
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_off_ascend_a_clear_error(mode, request):
    if mode == "graph":
        request.getfixturevalue("graph_mode")
    assert not ascend_ops.available() and not ascend_ops.available("CPU") and ascend_ops.available("Ascend")
    with pytest.raises(AscendOpsUnavailable, match="device_target='CPU'.*portable paged attention"):
        PagedStep(mstype.float16)(*step_inputs())


@pytest.mark.parametrize("dtype", [mstype.float16, mstype.bfloat16])
def test_mindspore_inference_accepts_the_arguments(graph_mode, monkeypatch, dtype):
    """With the device guard lifted, graph compilation runs MindSpore 2.10's own shape/type inference of both ops on
    the arguments built here and stops only at kernel selection (no CPU kernel): the layout MindSpore expects."""
    monkeypatch.setattr(ascend_ops, "require_ascend", lambda: None)
    with pytest.raises(RuntimeError, match=r"Unsupported op \[(ReshapeAndCache|PagedAttention)\] on CPU"):
        PagedStep(dtype)(*step_inputs())


def test_mindspore_inference_rejects_the_documented_key_layout(graph_mode):
    """Control: the (num_tokens, num_kv_heads, head_dim) key of MindSpore's own docstring fails its inference, so
    the test above can fail."""
    from mindspore.ops.auto_generate import ReshapeAndCache

    class Raw(nn.Cell):
        def __init__(self):
            super().__init__()
            zeros = Tensor(np.zeros((NB, BS, HKV, D), np.float16))
            self.kc = Parameter(zeros, name="kc", requires_grad=False)
            self.vc = Parameter(zeros.copy(), name="vc", requires_grad=False)
            self.op = ReshapeAndCache()

        def construct(self, k, slots):
            return self.op(k, k, self.kc, self.vc, slots)

    with pytest.raises(RuntimeError, match="num_tokens of slot mapping and key must be the same"):
        Raw()(Tensor(np.zeros((3, HKV, D), np.float16)), Tensor(np.arange(3, dtype=np.int32)))
