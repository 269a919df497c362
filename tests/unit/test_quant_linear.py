"""QuantLinear (dequantize on the fly) and apply_quantization on the debug model, against NumPy float64."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.quant import QuantConfig
from ascend_llm.models.llama import build_model
from ascend_llm.quant.apply import apply_quantization, quantized_layers, weight_bytes
from ascend_llm.quant.linear import QuantLinear
from ascend_llm.quant.rtn import quantize_rtn

DEBUG = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96, max_seq_len=32)


def numpy_dequant(qw):
    g = np.arange(qw.shape[1]) // (qw.shape[1] if qw.group_size == -1 else qw.group_size)
    if qw.g_idx is not None:
        g = qw.g_idx
    return qw.scales.astype(np.float64)[:, g] * (qw.codes.astype(np.float64) - qw.zeros.astype(np.float64)[:, g])


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 32, True), (4, 16, False), (4, 48, True)])
def test_quant_linear_matches_numpy(bits, group, sym):
    rng = np.random.default_rng(bits + group)
    w = rng.normal(0, 0.1, size=(40, 96)).astype(np.float32)
    bias = rng.normal(size=40).astype(np.float32)
    qw = quantize_rtn(w, QuantConfig(bits=bits, group_size=group, sym=sym))
    cell = QuantLinear(qw, bias)
    x = rng.normal(size=(2, 3, 96)).astype(np.float32)
    y = cell(Tensor(x)).asnumpy()
    ref = x.astype(np.float64) @ numpy_dequant(qw).T + bias
    assert y.shape == (2, 3, 40)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in cell.get_parameters())


def test_act_order_g_idx_dequant():
    from ascend_llm.quant.gptq import gptq_quantize

    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 32)) * np.linspace(0.1, 3, 32)
    w = rng.normal(size=(8, 32))
    qw = gptq_quantize(w, 2 / 200 * x.T @ x, QuantConfig(bits=4, group_size=8, act_order=True))
    assert qw.g_idx is not None and sorted(np.bincount(qw.g_idx)) == [8, 8, 8, 8]
    y = QuantLinear(qw)(Tensor(x[:4].astype(np.float32))).asnumpy()
    np.testing.assert_allclose(y, x[:4] @ numpy_dequant(qw).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_apply_quantization_debug_model(method):
    model = build_model(ModelConfig(**DEBUG), seed=0)
    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 16)).astype(np.int32)
    reference = model(Tensor(tokens)).asnumpy()
    weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    calib = np.random.default_rng(1).integers(0, 128, size=(4, 16))
    cfg = QuantConfig(bits=8, group_size=-1, method=method)
    done = apply_quantization(model, cfg, calibration=calib)
    assert sorted(done) == sorted(quantized_layers(model)) and len(done) == 14  # 7 per block, output kept
    names = {n for n, _ in model.parameters_and_names()}
    assert "layers.0.attention.wq.qweight" in names and "output.weight" in names
    assert "layers.0.attention.wq.weight" not in names
    out = model(Tensor(tokens)).asnumpy()
    assert np.abs(out - reference).max() < 0.02 * np.abs(reference).max()
    if method == "rtn":  # same codes as quantizing the original weight directly
        qw = done["layers.1.feed_forward.w2"]
        np.testing.assert_array_equal(qw.codes, quantize_rtn(weights["layers.1.feed_forward.w2.weight"], cfg).codes)
    sizes = weight_bytes(model)
    assert sizes["quantized_fp32"] == 4 * 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
    rows = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)
    assert sizes["quantized"] == sizes["quantized_fp32"] // 4 + 2 * rows  # int8 codes + one float16 scale per row


def test_gptq_without_calibration_is_a_config_error():
    from ascend_llm.errors import ConfigError

    model = build_model(ModelConfig(**DEBUG), seed=0)
    with pytest.raises(ConfigError, match="quant.method='gptq'"):
        apply_quantization(model, QuantConfig(method="gptq"))
