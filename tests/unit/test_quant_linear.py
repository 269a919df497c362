"""QuantLinear (fused CPU kernel and the dequantize-with-ops path) and apply_quantization, against NumPy float64."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.quant import QuantConfig
from ascend_llm.models.llama import build_model
from ascend_llm.quant.apply import apply_quantization, quantized_layers, weight_bytes
from ascend_llm.quant.cpu_kernel import kernel_available
from ascend_llm.quant.linear import QuantLinear
from ascend_llm.quant.rtn import quantize_rtn

DEBUG = dict(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96, max_seq_len=32)


def numpy_dequant(qw):
    g = np.arange(qw.shape[1]) // (qw.shape[1] if qw.group_size == -1 else qw.group_size)
    if qw.g_idx is not None:
        g = qw.g_idx
    return qw.scales.astype(np.float64)[:, g] * (qw.codes.astype(np.float64) - qw.zeros.astype(np.float64)[:, g])


def reference(x, qw, bias=None):
    """float64 NumPy dequantize-then-matmul, and the float32 rounding bound sum |x| |w| of each output."""
    w = numpy_dequant(qw)
    x = np.asarray(x, np.float64)
    y = x @ w.T + (0.0 if bias is None else bias)
    return y, np.abs(x) @ np.abs(w).T + (0.0 if bias is None else np.abs(bias))


def check(y, ref, bound):
    """float32 accumulation of a length-`in` dot product: within 1e-5 of sum |x||w| (K * 2**-24 < 1e-5)."""
    assert y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= 1e-5 * bound + 1e-7).all(), float((err / (bound + 1e-30)).max())


@pytest.fixture
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


@pytest.fixture
def pynative_mode():
    """The numeric sweeps run eagerly (a graph compile per case was most of this file's time); the kernel in a
    compiled graph is test_cpu_kernel_in_graph_mode's."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


class Wrapper(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return self.cell(x) * 1.0


needs_kernel = pytest.mark.skipif(not kernel_available("CPU"), reason="no C++ compiler for the fused CPU kernel")

CASES = [  # bits, group_size, sym, (out, in); ragged: 100 = 40 + 40 + 20; odd int4 groups take the per-column path
    (8, -1, True, (37, 99)), (8, -1, False, (40, 96)), (8, 32, True, (33, 100)), (8, 40, False, (40, 100)),
    (4, -1, True, (40, 96)), (4, 32, True, (37, 96)), (4, 40, False, (36, 100)), (4, 16, False, (40, 96)),
    (4, 25, True, (9, 100)), (4, 128, False, (24, 512)),
]


@needs_kernel
@pytest.mark.parametrize("bits,group,sym,shape", CASES)
@pytest.mark.parametrize("lead", [(1,), (2, 4), (64,), (3,)])
def test_cpu_kernel_matches_float64(pynative_mode, bits, group, sym, shape, lead):
    rng = np.random.default_rng(bits * 1000 + group + 7 * len(lead))
    w = rng.normal(0, 0.1, size=shape).astype(np.float32)
    bias = rng.normal(size=shape[0]).astype(np.float32) if lead != (3,) else None
    qw = quantize_rtn(w, QuantConfig(bits=bits, group_size=group, sym=sym))
    cell = QuantLinear(qw, bias)
    assert cell.use_cpu_kernel and "fused CPU kernel" in repr(cell)
    x = rng.normal(size=lead + (shape[1],)).astype(np.float32)
    ref, bound = reference(x, qw, bias)
    check(cell(Tensor(x)).asnumpy(), ref, bound)
    ops_path = QuantLinear(qw, bias, kernel="ops")(Tensor(x)).asnumpy()
    check(ops_path, ref, bound)


@needs_kernel
@pytest.mark.parametrize("bits,sym", [(8, True), (4, False), (4, True)])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_cpu_kernel_in_graph_mode(graph_mode, bits, sym, rows):
    rng = np.random.default_rng(rows + bits)
    w = rng.normal(0, 0.1, size=(72, 128)).astype(np.float32)
    bias = rng.normal(size=72).astype(np.float32)
    qw = quantize_rtn(w, QuantConfig(bits=bits, group_size=32, sym=sym))
    x = rng.normal(size=(rows, 1, 128)).astype(np.float32)
    ref, bound = reference(x, qw, bias)
    check(Wrapper(QuantLinear(qw, bias))(Tensor(x)).asnumpy(), ref, bound)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_cpu_kernel_large_call_on_two_threads(bits):
    """64 x 512 x 1030 multiply-adds >= 2**25: the output rows are split over two threads (and 1030 % 8 != 0)."""
    rng = np.random.default_rng(bits)
    qw = quantize_rtn(rng.normal(0, 0.1, size=(1030, 512)), QuantConfig(bits=bits, group_size=128, sym=False))
    bias = rng.normal(size=1030).astype(np.float32)
    x = rng.normal(size=(64, 512)).astype(np.float32)
    ref, bound = reference(x, qw, bias)
    check(QuantLinear(qw, bias)(Tensor(x)).asnumpy(), ref, bound)


def act_order_weight(bits: int, sym: bool, seed: int):
    from ascend_llm.quant.gptq import gptq_quantize

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 40)) * np.linspace(0.1, 3, 40)
    w = rng.normal(size=(10, 40))
    qw = gptq_quantize(w, 2 / 200 * x.T @ x, QuantConfig(bits=bits, group_size=8, sym=sym, act_order=True))
    assert qw.g_idx is not None and sorted(np.bincount(qw.g_idx)) == [8] * 5
    assert (np.diff(qw.g_idx) < 0).any()  # really out of order
    return qw, x[:8]


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False)])
def test_act_order_g_idx(bits, sym):
    qw, x = act_order_weight(bits, sym, seed=bits + sym)
    ref, bound = reference(x, qw)
    for kernel in ("auto", "ops"):
        check(QuantLinear(qw, kernel=kernel)(Tensor(x.astype(np.float32))).asnumpy(), ref, bound)


@needs_kernel
def test_arbitrary_g_idx_and_float16_input():
    """Any g_idx (as a Hugging Face GPTQ checkpoint may carry), and float16 activations (float16 output)."""
    rng = np.random.default_rng(3)
    qw = quantize_rtn(rng.normal(size=(12, 64)), QuantConfig(bits=4, group_size=16, sym=False))
    qw.g_idx = rng.integers(0, 4, size=64).astype(np.int32)
    x = rng.normal(size=(5, 64)).astype(np.float16)
    ref, bound = reference(x, qw)
    y = QuantLinear(qw)(Tensor(x)).asnumpy()
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@needs_kernel
def test_cpu_kernel_reads_the_parameters():
    """The kernel reads the stored Parameters (as load_quantized sets them), not a copy made at construction."""
    rng = np.random.default_rng(4)
    qw = quantize_rtn(rng.normal(size=(16, 256)), QuantConfig(bits=4, group_size=128))
    other = quantize_rtn(rng.normal(size=(16, 256)), QuantConfig(bits=4, group_size=128))
    cell = QuantLinear(qw)
    cell.qweight.set_data(Tensor(other.packed_codes()))
    cell.scales.set_data(Tensor(other.scales.astype(np.float16)))
    x = rng.normal(size=(2, 256))
    ref, bound = reference(x, other)
    check(cell(Tensor(x.astype(np.float32))).asnumpy(), ref, bound)
    held = [p.asnumpy().nbytes for p in cell.get_parameters()]
    assert sum(held) == cell.weight_bytes() < 4 * 16 * 256 / 7.5  # no float32 copy held
    assert not any(p.requires_grad for p in cell.get_parameters())


def wqbmm_semantics(x, ops):
    """WeightQuantBatchMatmul as golden-stick's reference computes it: weight (in, out) signed (int4: two nibbles
    per byte along out, low first, sign-extended), w = (weight + offset[g]) * scale[g] for the input rows of group g
    (or per output channel), y = x @ w. float64."""
    weight = ops.weight.astype(np.int16)
    if weight.shape[1] * 2 == ops.scale.shape[-1]:
        nib = np.stack((weight & 0x0F, (weight >> 4) & 0x0F), -1).reshape(weight.shape[0], -1)
        weight = np.where(nib >= 8, nib - 16, nib)
    rows = np.arange(weight.shape[0]) // (ops.group_size or weight.shape[0])
    scale = np.atleast_2d(ops.scale.astype(np.float64))[rows]
    offset = np.atleast_2d(ops.offset.astype(np.float64))[rows]
    return np.asarray(x, np.float64) @ ((weight + offset) * scale)


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (8, 32, False), (4, 32, True), (4, -1, False)])
def test_ascend_operands_compute_the_dequantized_matmul(bits, group, sym):
    from ascend_llm.quant.linear import ascend_operands

    rng = np.random.default_rng(bits + group)
    qw = quantize_rtn(rng.normal(0, 0.1, size=(24, 64)), QuantConfig(bits=bits, group_size=group, sym=sym))
    ops = ascend_operands(qw)
    assert ops.weight.dtype == np.int8 and ops.weight.shape == ((64, 24) if bits == 8 else (64, 12))
    assert ops.scale.dtype == ops.offset.dtype == np.float16
    assert ops.group_size == (0 if group == -1 else group)
    x = rng.normal(size=(5, 64))
    ref, bound = reference(x, qw)
    np.testing.assert_allclose(wqbmm_semantics(x, ops), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits,group", [(8, -1), (8, 32), (4, 32), (4, -1)])
def test_ascend_kernel_operands_pass_mindspore_inference(graph_mode, bits, group):
    """Graph compilation on CPU runs MindSpore's own inference of WeightQuantBatchMatmul on the operands (it checks
    the weight shape against x and reads qint4x2 as two values per byte) and stops only at kernel selection."""
    rng = np.random.default_rng(0)
    qw = quantize_rtn(rng.normal(size=(64, 128)), QuantConfig(bits=bits, group_size=group, sym=False))
    cell = QuantLinear(qw, np.ones(64, np.float32), device="Ascend")
    assert cell.use_kernel and "WeightQuantBatchMatmul" in repr(cell)
    with pytest.raises(RuntimeError, match=r"Unsupported op \[WeightQuantBatchMatmul\] on CPU"):
        Wrapper(cell)(Tensor(rng.normal(size=(3, 128)).astype(np.float32)))


def test_ascend_kernel_inference_can_fail(graph_mode):
    """Control for the test above: int4 bytes laid out along the wrong axis fail MindSpore's inference."""
    qw = quantize_rtn(np.random.default_rng(1).normal(size=(64, 128)), QuantConfig(bits=4, group_size=32))
    cell = QuantLinear(qw, device="Ascend")
    cell.kernel_weight = Tensor(np.zeros((128, 64), np.int8), dtype=ms.qint4x2)
    with pytest.raises(ValueError, match="Reshape"):
        Wrapper(cell)(Tensor(np.zeros((3, 128), np.float32)))


def test_unknown_kernel_name():
    qw = quantize_rtn(np.ones((4, 8)), QuantConfig(bits=8, group_size=-1))
    with pytest.raises(ValueError, match="kernel='fast'"):
        QuantLinear(qw, kernel="fast")


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
