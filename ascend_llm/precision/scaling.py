"""FP8 scaling recipes as graph-safe MindSpore functions, following TransformerEngine's published formulas.

Delayed scaling (TE `DelayedScaling`): each quantized tensor keeps an amax history of length L and a scale.
During step t the tensor is cast with the scale computed at the end of step t-1, and its amax is recorded
in history slot 0. Then (TE `_default_get_amax_and_update_history` and `_default_sf_compute`):

    amax  = max(history)              if amax_compute_algo == "max"   (NaN anywhere -> NaN)
          = history[0]                if amax_compute_algo == "most_recent"
    scale = (fp8_max / amax) / 2**margin
    scale = old scale                 if amax == 0, amax is inf or amax is NaN
    scale = float32 max               if the division overflowed (tiny amax)
    history = roll(history, -1); history[0] = 0     (no roll when L == 1)

Current scaling: the same formula on the tensor's own amax, just in time, with no history (old scale 1).
"""

from __future__ import annotations

from mindspore import Tensor, ops

from ascend_llm.precision.fp8 import FLOAT32_MAX


def compute_scale(amax: Tensor, scale: Tensor, fp8_max: float, margin: int) -> Tensor:
    """TE `_default_sf_compute`: (fp8_max / amax) / 2**margin, keeping `scale` for amax 0/inf/NaN."""
    # ops.div on a filled tensor: `python_float / tensor` is a reciprocal-multiply on CPU (off by an ulp).
    sf = ops.div(ops.full_like(amax, fp8_max), amax) / (2.0 ** margin)
    sf = ops.where(amax > 0.0, sf, scale)
    sf = ops.where(ops.isfinite(amax), sf, scale)
    return ops.where(ops.isinf(sf), FLOAT32_MAX, sf)


def current_scale(amax: Tensor, fp8_max: float, margin: int) -> Tensor:
    """Current (per-tensor, just-in-time) scaling: compute_scale with an old scale of 1."""
    return compute_scale(amax, ops.ones_like(amax), fp8_max, margin)


def record_amax(history: Tensor, amax: Tensor) -> Tensor:
    """history with slot 0 = max(slot 0, amax); a NaN amax is kept (like torch.maximum), not dropped."""
    head = history[:1]
    amax = amax.reshape(1)
    head = ops.where(head >= amax, head, amax)
    if history.shape[0] == 1:
        return head
    return ops.concat((head, history[1:]))


def history_amax(history: Tensor, algo: str) -> Tensor:
    """The amax used for the next scale from a (L,) float32 history: max over it ("max"; NaN when any slot is NaN)
    or slot 0 ("most_recent", or L == 1). TE `_default_get_amax_and_update_history`. Returns a () Tensor."""
    if algo == "most_recent" or history.shape[0] == 1:
        return history[0]
    return ops.where(ops.isnan(history).any(), history[0] * float("nan"), history.max())


def roll_history(history: Tensor) -> Tensor:
    """roll(history, -1) then slot 0 = 0, i.e. [0, h2, ..., h(L-1), h0]; [0] when L == 1."""
    length = history.shape[0]
    zero = ops.zeros_like(history[:1])
    if length == 1:
        return zero
    if length == 2:
        return ops.concat((zero, history[:1]))
    return ops.concat((zero, history[2:], history[:1]))


def delayed_scaling_update(history: Tensor, scale: Tensor, amax: Tensor, fp8_max: float, margin: int,
                           algo: str = "max") -> tuple[Tensor, Tensor]:
    """One step of delayed scaling: record this step's amax, compute the next scale, roll the history.

    Returns (new_history, new_scale); the caller assigns them to its state Parameters.
    """
    history = record_amax(history, amax)
    new_scale = compute_scale(history_amax(history, algo), scale, fp8_max, margin)
    return roll_history(history), new_scale
