"""Delayed and current scaling against TransformerEngine's published formulas, written out in NumPy here.

Reference (transformer_engine/pytorch/fp8.py): the cast records the step's amax in amax_history[0]; then
    amax = max(amax_history) ("max") or amax_history[0] ("most_recent")
    sf = (fp8_max / amax) / 2**margin; sf = where(amax > 0, sf, scale); sf = where(isfinite(amax), sf, scale)
    sf = where(isinf(sf), float32 max, sf)
    amax_history = roll(amax_history, -1) (if length > 1); amax_history[0] = 0
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from ascend_llm.precision.cpu_kernel import DelayedScalingUpdate, fused_available
from ascend_llm.precision.scaling import current_scale, delayed_scaling_update

F32_MAX = np.finfo(np.float32).max


def te_step(history: np.ndarray, scale: np.float32, amax: np.float32, fp8_max: float, margin: int, algo: str):
    history = history.copy()
    history[0] = np.maximum(history[0], amax)  # torch.maximum: NaN propagates
    if algo == "max":
        used = np.max(history)  # np.max, like torch.max, propagates NaN
    else:
        used = history[0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        sf = (np.float32(fp8_max) / used) / np.float32(2.0 ** margin)
    sf = np.where(used > 0.0, sf, scale)
    sf = np.where(np.isfinite(used), sf, scale)
    sf = np.where(np.isinf(sf), F32_MAX, sf).astype(np.float32)
    if history.shape[0] > 1:
        history = np.roll(history, -1, 0)
    history[0] = 0.0
    return history, np.float32(sf)


def amax_sequence(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    seq = np.exp2(rng.uniform(-8, 8, n)).astype(np.float32)
    # tiny amaxes are normal float32s: a subnormal one compares as 0 once MindSpore's CPU threads run with
    # denormals-are-zero (earlier tests in a session can cause that)
    specials = {3: 0.0, 5: np.inf, 8: np.nan, 11: 1.5e-38, 12: 3e-37, 14: 0.0, 20: 1e30}
    for i, v in specials.items():
        if i < n:
            seq[i] = v
    return seq


def run_both(length: int, margin: int, algo: str, fp8_max: float, steps: int, fused: bool = False):
    """(ours, reference) per step; ours is the MindSpore-ops update, or with `fused` the C++ CPU kernel."""
    seq = amax_sequence(steps)
    kernel = DelayedScalingUpdate(fp8_max, margin, algo) if fused else None

    @ms.jit
    def update(history, scale, amax):
        if kernel is not None:  # the kernel reads this step's amax from stats[0]
            return kernel(history, scale, ops.concat((amax.reshape(1), ops.zeros(2, ms.float32))))
        return delayed_scaling_update(history, scale, amax, fp8_max, margin, algo)

    ours_h, ours_s = Tensor(np.zeros(length, np.float32)), Tensor(np.float32(1.0))
    ref_h, ref_s = np.zeros(length, np.float32), np.float32(1.0)
    rows = []
    for amax in seq:
        ours_h, ours_s = update(ours_h, ours_s, Tensor(np.float32(amax)))
        ref_h, ref_s = te_step(ref_h, ref_s, np.float32(amax), fp8_max, margin, algo)
        rows.append((ours_h.asnumpy(), float(ours_s.asnumpy()), ref_h, float(ref_s)))
    return rows


def same(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("length, margin, algo", [
    (1, 0, "max"), (31, 0, "max"), (31, 2, "max"), (1024, 0, "max"), (1024, 2, "max"), (31, 2, "most_recent"),
])
def test_delayed_scaling_matches_te_formula_exactly(length, margin, algo):
    for step, (h, s, ref_h, ref_s) in enumerate(run_both(length, margin, algo, 448.0, steps=40)):
        assert same(h, ref_h), f"history differs at step {step}"
        assert same(s, ref_s), f"scale differs at step {step}: {s} vs {ref_s}"
        assert np.isfinite(s) and s > 0


@pytest.mark.parametrize("length, margin, algo", [
    (1, 0, "max"), (2, 0, "max"), (31, 2, "max"), (1024, 0, "max"), (31, 2, "most_recent"),
])
def test_fused_cpu_delayed_scaling_matches_te_formula_exactly(length, margin, algo):
    if not fused_available("CPU"):
        pytest.skip("no C++ compiler: the fused CPU kernels are not built")
    for step, (h, s, ref_h, ref_s) in enumerate(run_both(length, margin, algo, 57344.0, steps=40, fused=True)):
        assert same(h, ref_h), f"history differs at step {step}"
        assert same(s, ref_s), f"scale differs at step {step}: {s} vs {ref_s}"


def test_delayed_scaling_special_amax_values():
    rows = run_both(1, 0, "max", 57344.0, steps=13)
    scales = [s for _, s, _, _ in rows]
    assert scales[3] == scales[2]  # amax 0 keeps the old scale
    assert scales[5] == scales[4]  # inf keeps it
    assert scales[8] == scales[7]  # NaN keeps it
    assert scales[11] == F32_MAX  # tiny amax: the division overflows -> float32 max, never inf
    assert scales[0] == np.float32(57344.0) / amax_sequence(1)[0]


def test_max_algorithm_remembers_a_spike_for_history_length_steps():
    length = 4
    seq = [1.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0]

    @ms.jit
    def update(history, scale, amax):
        return delayed_scaling_update(history, scale, amax, 448.0, 0, "max")

    h, s = Tensor(np.zeros(length, np.float32)), Tensor(np.float32(1.0))
    scales = []
    for amax in seq:
        h, s = update(h, s, Tensor(np.float32(amax)))
        scales.append(float(s.asnumpy()))
    assert scales == [448.0, 56.0, 56.0, 56.0, 56.0, 448.0, 448.0]  # spike held for 4 updates


def test_current_scaling():
    # The tiny amax is the smallest *normal* float32 region: a subnormal one (1e-40) compares as 0 once
    # MindSpore's CPU thread pool runs with denormals-are-zero, which earlier tests in a session can cause.
    amax = Tensor(np.float32([2.0, 0.0, np.inf, np.nan, 1.5e-38]))
    got = current_scale(amax, 448.0, 1).asnumpy()
    np.testing.assert_array_equal(got, np.float32([112.0, 1.0, 1.0, 1.0, F32_MAX]))
