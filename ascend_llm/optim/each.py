"""Element-wise maps over tuples of tensors (gradients, parameters, optimizer moments) inside compiled graphs.

Why not a Python loop: in graph mode a loop that builds a tuple (`tuple(f(g) for g in grads)` or
`out = out + (x,)`) compiles in time that grows faster than linearly with the tuple's length. Measured on
MindSpore 2.10, CPU, one Mul per tensor: 10 tensors 0.35 s, 40 tensors 2.06 s for the loop; 40 tensors
0.10 s through `ops.HyperMap`, which builds one element graph and maps it. A 7B model has ~290 parameters,
so every per-parameter pass of the update (scaling, norms, the optimizer, the data-parallel all-reduce) goes
through these functions. Each works in pynative mode too (HyperMap then runs eagerly).
"""

from __future__ import annotations

from mindspore import dtype as mstype
from mindspore import ops

each = ops.HyperMap()  # each(fn, *tuples) -> tuple: fn applied to the i-th element of every tuple


def _scale(factor, t):
    return t * factor.astype(t.dtype)


def scale_each(tensors: tuple, factor) -> tuple:
    """(t * factor for t in tensors), factor a scalar Tensor cast to each tensor's dtype."""
    return each(ops.partial(_scale, factor), tensors)


def add_each(left: tuple, right: tuple) -> tuple:
    """(a + b for a, b in zip(left, right)): gradient accumulation."""
    return each(ops.add, left, right)


def _square_sum(weight, t):
    if weight == 0.0:
        return ops.zeros((), mstype.float32)
    t32 = t.astype(mstype.float32)
    total = (t32 * t32).sum()
    if weight == 1.0:
        return total
    return total * weight


def square_sum(tensors: tuple, weights: tuple | None = None):
    """sum_i w_i * |t_i|^2 in float32 (a scalar Tensor); weights are Python floats (default 1), a weight 0
    leaves its tensor out (no work, and an inf there cannot turn into 0 * inf = NaN)."""
    weights = (1.0,) * len(tensors) if weights is None else tuple(weights)
    return ops.addn(each(_square_sum, weights, tensors))
