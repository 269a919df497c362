"""The fused CPU decode layer (inference/fused_decode.py): one kernel call equals an independent float64 NumPy
decoder layer (RMSNorm, q/k/v with bias, per-head qk-norm, rotate-half RoPE, paged attention over the row's
blocks, wo, SwiGLU) at odd widths (no multiple of the 16-float vectors or 8-row tiles) and batch 1, 3, 8, 37; its
cache writes land at the rows' slots only; 1, 2 and 3 threads give the same bits on both sides of PARALLEL_MIN_ROWS;
the thread count comes from the argument, $ASCEND_LLM_KERNEL_THREADS or the CPUs; the engine takes the path only for
plain fp32 layers."""

from __future__ import annotations

import ctypes
import dataclasses
import os

import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import ConfigError
from ascend_llm.inference import cpu_pool, fused_decode
from ascend_llm.inference.engine import Engine
from ascend_llm.models import build_model
from ascend_llm.models.llama import rope_tables

pytestmark = [pytest.mark.skipif(fused_decode.library_path() is None, reason="no C++ compiler"),
              pytest.mark.xdist_group("fused_decode")]  # one xdist worker: module fixtures build once

# dim 36 = 3 heads x 12, 1 KV head (GQA group 3), ffn 52: no width is a multiple of 16, no row count of 8
CFG = ModelConfig(name="fused", vocab_size=53, dim=36, num_layers=1, num_heads=3, num_kv_heads=1, ffn_hidden_dim=52,
                  max_seq_len=48, rope_theta=300.0, init_std=0.3, qkv_bias=True, qk_norm=True, norm_eps=1e-5)
CFG32 = dataclasses.replace(CFG, dim=96, ffn_hidden_dim=40)  # 3 heads x 32, 1 KV head
NB, BS, MB = 9, 4, 5  # cache blocks, positions per block, table width


def np_rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, cos, sin):  # x (heads, D); cos/sin (D,) of the row's position
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[:, half:], x[:, :half]], -1) * sin


def np_layer(w, cfg, h, positions, slots, tables, kc, vc, cos, sin):
    """float64 decode layer, row by row; writes K/V into kc/vc (copies) like the kernel."""
    nh, nkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
    out = h.copy()
    qs = []
    for b in range(h.shape[0]):
        x = np_rmsnorm(h[b], w["attention_norm.weight"], eps)
        q, k, v = ((x @ w[f"attention.{n}.weight"].T + w[f"attention.{n}.bias"]).reshape(heads, hd)
                   for n, heads in (("wq", nh), ("wk", nkv), ("wv", nkv)))
        q = np_rope(np_rmsnorm(q, w["attention.q_norm.weight"], eps), cos[positions[b]], sin[positions[b]])
        k = np_rope(np_rmsnorm(k, w["attention.k_norm.weight"], eps), cos[positions[b]], sin[positions[b]])
        kc.reshape(-1, nkv, hd)[slots[b]], vc.reshape(-1, nkv, hd)[slots[b]] = k, v
        qs.append(q)
    for b in range(h.shape[0]):
        seen = np.arange(positions[b] + 1)
        where = tables[b][seen // BS] * BS + seen % BS
        keys, values = kc.reshape(-1, nkv, hd)[where], vc.reshape(-1, nkv, hd)[where]
        att = np.empty((nh, hd))
        for head in range(nh):
            s = keys[:, head // (nh // nkv)] @ qs[b][head] / np.sqrt(hd)
            p = np.exp(s - s.max())
            att[head] = (p / p.sum()) @ values[:, head // (nh // nkv)]
        out[b] += att.reshape(-1) @ w["attention.wo.weight"].T
        x = np_rmsnorm(out[b], w["ffn_norm.weight"], eps)
        gate, up = x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T
        out[b] += (gate / (1 + np.exp(-gate)) * up) @ w["feed_forward.w2.weight"].T
    return out


class OneLayer(nn.Cell):
    def __init__(self, model, kc, vc, threads=None):
        super().__init__()
        self.model = model
        self.layer_op = fused_decode.DecodeLayer(model, threads)
        self.kc = Parameter(Tensor(kc), name="kc", requires_grad=False)
        self.vc = Parameter(Tensor(vc), name="vc", requires_grad=False)
        cos, sin = rope_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta)
        self.cos, self.sin = Tensor(cos), Tensor(sin)

    def construct(self, h, positions, slots, tables):
        return self.layer_op(h, 0, self.model.layers[0], positions, slots, tables, self.kc, self.vc, self.cos, self.sin)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=5)
    m.set_train(False)
    return m


@pytest.fixture(scope="module")
def model32():  # head_dim 32: the attention's register path (a pair of query heads per KV head, then one)
    m = build_model(CFG32, seed=6)
    m.set_train(False)
    return m


def layer_inputs(batch: int, cfg=CFG):
    """Random caches, rows (positions, slots, block tables; the last row of a batch is padding) and h (batch, dim)."""
    rng = np.random.default_rng(batch)
    shape = (NB, BS, cfg.num_kv_heads, cfg.head_dim)
    kc, vc = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    tables = np.stack([rng.permutation(np.arange(1, NB))[:MB] for _ in range(batch)]).astype(np.int32)
    positions = rng.integers(0, MB * BS, batch).astype(np.int32)
    slots = (tables[np.arange(batch), positions // BS] * BS + positions % BS).astype(np.int32)
    if batch > 1:
        slots[-1] = -1  # a padding row: its K/V go nowhere
        positions[-1], tables[-1] = 0, 0
    h = rng.standard_normal((batch, cfg.dim)).astype(np.float32)
    return kc, vc, positions, slots, tables, h


def run_layer(model, batch: int, threads: int):
    """(output (batch, dim), key cache, value cache) of one kernel call with `threads` threads."""
    kc, vc, positions, slots, tables, h = layer_inputs(batch, model.cfg)
    cell = OneLayer(model, kc, vc, threads)
    got = cell(Tensor(h), Tensor(positions), Tensor(slots), Tensor(tables)).asnumpy()
    return got, cell.kc.asnumpy(), cell.vc.asnumpy()


# 1 and 3 rows: below PARALLEL_MIN_ROWS (one thread whatever `threads`); 8 and 37: columns and rows split
@pytest.mark.parametrize("batch", [1, 3, 8, 37])
def test_decode_layer_equals_float64_layer(model, batch):
    assert fused_decode.PARALLEL_MIN_ROWS in range(4, 9)
    check_layer(model, batch)


def test_decode_layer_with_head_dim_32_equals_float64_layer(model32):
    check_layer(model32, 8)


def check_layer(model, batch: int):
    """2 threads against the float64 layer, and bit for bit against 1 thread."""
    cfg = model.cfg
    got, got_k, got_v = run_layer(model, batch, threads=2)
    kc, vc, positions, slots, tables, h = layer_inputs(batch, cfg)
    weights = {p.name.split("layers.0.", 1)[-1]: p.asnumpy().astype(np.float64)
               for p in model.layers[0].get_parameters()}
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    ref_k, ref_v = kc.astype(np.float64), vc.astype(np.float64)
    live = slots >= 0
    want = np_layer(weights, cfg, h.astype(np.float64)[live], positions[live], slots[live], tables[live], ref_k, ref_v,
                    cos.astype(np.float64), sin.astype(np.float64))
    np.testing.assert_allclose(got[live], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[~live], h[~live])  # the trailing padding row is not computed
    np.testing.assert_allclose(got_k, ref_k, rtol=1e-5, atol=1e-5)  # only the live rows' slots changed
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-5, atol=1e-5)
    one = run_layer(model, batch, threads=1)  # each output element is one thread's, computed the same way
    for a, b in zip(one, (got, got_k, got_v)):
        np.testing.assert_array_equal(a, b)


def test_three_threads_equal_one_bit_for_bit_and_start_workers(model):
    one, three = run_layer(model, 37, threads=1), run_layer(model, 37, threads=3)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)
    workers = ctypes.CDLL(fused_decode.library_path()).PoolWorkers
    assert workers() >= 2  # the persistent pool of this process has (at least) the 2 workers of a 3-thread call


def test_kernel_threads_from_argument_environment_or_cpus(monkeypatch):
    monkeypatch.delenv(cpu_pool.THREADS_ENV, raising=False)
    assert cpu_pool.kernel_threads() == min(2, len(os.sched_getaffinity(0)))
    assert cpu_pool.kernel_threads(3) == 3
    monkeypatch.setenv(cpu_pool.THREADS_ENV, "1")
    assert cpu_pool.kernel_threads() == 1 and cpu_pool.kernel_threads(2) == 2
    for bad in ("0", "two", "1.5", "65"):
        monkeypatch.setenv(cpu_pool.THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=cpu_pool.THREADS_ENV):
            Engine(build_model(CFG, seed=5), max_len=16, num_slots=2)
    monkeypatch.delenv(cpu_pool.THREADS_ENV)
    for bad in (0, 65, True, 2.0, "2"):  # the Python argument takes an int only (a string only from the env var)
        with pytest.raises(ConfigError, match="threads"):
            cpu_pool.kernel_threads(bad)


def test_engine_takes_the_fused_path_only_for_plain_layers(model):
    assert fused_decode.supported(model)
    assert Engine(model, max_len=16, num_slots=2).forward.fused is not None
    assert Engine(model, max_len=16, num_slots=2, fused_decode=False).forward.fused is None

    class LoraLike(nn.Dense):  # any replacement of a Dense (LoRA, quantized, FP8) keeps the MindSpore path
        pass

    other = build_model(CFG, seed=5)
    other.layers[0].attention.wv = LoraLike(CFG.dim, CFG.num_kv_heads * CFG.head_dim, has_bias=True)
    assert not fused_decode.supported(other)
    assert Engine(other, max_len=16, num_slots=2).forward.fused is None
