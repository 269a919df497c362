"""The fused CPU decode layer on QuantLinear layers (inference/fused_quant.py): one kernel call equals the float64
NumPy decoder layer of test_fused_decode.py computed from weights dequantized here from the stored codes
(w = scale * (code - zero), int4 code 2j in the low nibble of byte j), for int8 / int4, per channel / group-wise,
symmetric / asymmetric, at odd widths (groups and rows that are not multiples of the 16-code vectors or the tiles),
batch 1 and padded batches of 15 and 50 (flat prompt rows), with 2 threads bit for bit equal to 1; the engine's
greedy tokens on a quantized HF fixture equal the MindSpore path's; act-order layers keep the MindSpore path."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.config.quant import QuantConfig
from ascend_llm.inference import SamplingParams, fused_decode
from ascend_llm.inference.engine import Engine
from ascend_llm.models import build_model
from ascend_llm.models.llama import rope_tables
from ascend_llm.quant.apply import apply_quantization
from tests.conftest import open_fixture
from tests.unit.test_fused_decode import BS, CFG, MB, NB, OneLayer, np_layer
from tests.unit.test_generation import fixture

pytestmark = [pytest.mark.skipif(fused_decode.library_path() is None, reason="no C++ compiler"),
              pytest.mark.xdist_group("fused_quant_decode")]  # one xdist worker: module fixtures build once

# (bits, group_size, sym): dim 36 / ffn 52 columns; int8 group 20 -> groups of 20 + 16 (and 20 + 20 + 12),
# int4 group 40 -> one partial group of 36 (20 bytes: one 16-byte vector + 4 one by one) or 40 + 12
VARIANTS = {"int8-channel-sym": (8, -1, True), "int8-g20-asym": (8, 20, False), "int4-g40-sym": (4, 40, True),
            "int4-g40-asym": (4, 40, False)}


def dequantize(cell) -> np.ndarray:
    """(out, in) float64 weight from a QuantLinear's stored Parameters: w = scale * (code - zero)."""
    packed = cell.qweight.asnumpy()
    if cell.bits == 4:
        codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.float64)
        codes[:, 0::2], codes[:, 1::2] = packed & 15, packed >> 4
    else:
        codes = packed.astype(np.float64)
    group = cell.in_channels if cell.group_size == -1 else cell.group_size
    col_group = np.arange(cell.in_channels) // group
    scales = cell.scales.asnumpy().astype(np.float64)[:, col_group]
    zeros = 2.0 ** (cell.bits - 1) if cell.zeros is None else cell.zeros.asnumpy().astype(np.float64)[:, col_group]
    return scales * (codes - zeros)


def reference_weights(layer) -> dict[str, np.ndarray]:
    """The float64 weights np_layer reads: norms and biases as held, the 7 matrices dequantized."""
    weights = {p.name.split("layers.0.", 1)[-1]: p.asnumpy().astype(np.float64) for p in layer.get_parameters()
               if "norm" in p.name or p.name.endswith(".bias")}
    for name in fused_decode.MATRICES:
        part, leaf = name.split(".")
        weights[f"{name}.weight"] = dequantize(getattr(getattr(layer, part), leaf))
    return weights


@pytest.fixture(scope="module", params=list(VARIANTS))
def quantized(request):
    bits, group, sym = VARIANTS[request.param]
    model = build_model(CFG, seed=7)
    model.set_train(False)
    apply_quantization(model, QuantConfig(method="rtn", bits=bits, group_size=group, sym=sym))
    assert fused_decode.layer_kind(model.layers[0], CFG) == "quant"
    return model


def rows(batch: int, rng):
    tables = np.stack([rng.permutation(np.arange(1, NB))[:MB] for _ in range(batch)]).astype(np.int32)
    positions = rng.integers(0, MB * BS, batch).astype(np.int32)
    slots = (tables[np.arange(batch), positions // BS] * BS + positions % BS).astype(np.int32)
    if batch > 1:
        slots[-1], positions[-1], tables[-1] = -1, 0, 0  # a padding row: its K/V go nowhere
    return positions, slots, tables


# 15 rows: every tile shape (4 x 6, 2 x 6, 1 x 12); 50: the dequantized-panel path of prompt chunks; last row padding
@pytest.mark.parametrize("batch", [1, 15, 50])
def test_quant_decode_layer_equals_float64_layer_of_dequantized_weights(quantized, batch):
    rng = np.random.default_rng(batch)
    shape = (NB, BS, CFG.num_kv_heads, CFG.head_dim)
    kc, vc = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    positions, slots, tables = rows(batch, rng)
    h = rng.standard_normal((batch, CFG.dim)).astype(np.float32)
    cell, single = OneLayer(quantized, kc, vc, threads=2), OneLayer(quantized, kc, vc, threads=1)
    assert len(cell.layer_op.packed) == 0  # no float copy of a quantized weight
    got = cell(Tensor(h), Tensor(positions), Tensor(slots), Tensor(tables)).asnumpy()
    # 15 and 50 rows: the products' columns and the attention rows split across 2 threads, the same bits as 1 thread
    np.testing.assert_array_equal(single(Tensor(h), Tensor(positions), Tensor(slots), Tensor(tables)).asnumpy(), got)
    np.testing.assert_array_equal(single.kc.asnumpy(), cell.kc.asnumpy())
    cos, sin = rope_tables(CFG.head_dim, CFG.max_seq_len, CFG.rope_theta)
    ref_k, ref_v = kc.astype(np.float64), vc.astype(np.float64)
    live = slots >= 0
    want = np_layer(reference_weights(quantized.layers[0]), CFG, h.astype(np.float64)[live], positions[live],
                    slots[live], tables[live], ref_k, ref_v, cos.astype(np.float64), sin.astype(np.float64))
    np.testing.assert_allclose(got[live], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cell.kc.asnumpy(), ref_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cell.vc.asnumpy(), ref_v, rtol=1e-5, atol=1e-5)


def test_a_step_of_padding_rows_only_returns_h(quantized):  # the engine's warm-up: no row has a slot
    rng = np.random.default_rng(0)
    shape = (NB, BS, CFG.num_kv_heads, CFG.head_dim)
    kc = rng.standard_normal(shape).astype(np.float32)
    h = rng.standard_normal((2, CFG.dim)).astype(np.float32)
    zeros = np.zeros(2, np.int32)
    got = OneLayer(quantized, kc, kc.copy())(Tensor(h), Tensor(zeros), Tensor(zeros - 1),
                                             Tensor(np.zeros((2, MB), np.int32))).asnumpy()
    np.testing.assert_array_equal(got, h)


def test_engine_tokens_equal_the_mindspore_path_on_a_quantized_fixture():
    model, _, _ = open_fixture(fixture("qwen2_tied"))
    model.set_train(False)
    apply_quantization(model, QuantConfig(method="rtn", bits=4, group_size=32, sym=False))
    prompts = [[3, 17, 5, 99], [7, 8, 9, 10]]  # one prompt shape: one prefill graph per engine
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    fused = Engine(model, max_len=32, num_slots=2)
    plain = Engine(model, max_len=32, num_slots=2, fused_decode=False)
    assert fused.forward.fused is not None and plain.forward.fused is None
    got = [r.token_ids for r in fused.generate(prompts, params)]
    assert got == [r.token_ids for r in plain.generate(prompts, params)]


def test_act_order_layers_keep_the_mindspore_path():
    model = build_model(CFG, seed=7)
    model.set_train(False)
    apply_quantization(model, QuantConfig(method="rtn", bits=8, group_size=12))
    assert fused_decode.supported(model)
    wv = model.layers[0].attention.wv
    wv.g_idx = wv.column_group  # an explicit g_idx (act-order layout): not read by the kernel
    assert fused_decode.layer_kind(model.layers[0], CFG) is None and not fused_decode.supported(model)
    assert Engine(model, max_len=16, num_slots=2).forward.fused is None
