"""For test_comm_msrun, run as tpcp_worker.py's "comm" mode: every comm.py op, forward and backward, over the
world group and over a sub-group made by create_group (the CPU emulation path), in graph mode (forward and
backward, one graph per case) and alone in PyNative mode (the forward). Writes
<out>/comm_rank<r>.npz."""

from __future__ import annotations

import numpy as np


def inputs(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """x (4, 6) and the loss weight w (shape of the op's output is chosen by the caller) from a seeded rng."""
    rng = np.random.default_rng(100 + rank)
    return rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((8, 12)).astype(np.float32)


def run_all(out_dir: str) -> None:
    """Every case over both groups (communication already initialised: tpcp_worker.py runs this as its "comm"
    mode)."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from ascend_llm.parallel import comm

    world = comm.world_group()
    sub = comm.Group("test_sub", world.ranks, world.rank)  # same ranks, not the world group: the CPU sub-group path
    from mindspore.communication import create_group

    create_group("test_sub", list(world.ranks))
    x_np, w_np = inputs(world.rank)
    x = Tensor(x_np)
    results = {}
    cases = {
        "sum": lambda g: comm.AllReduce(g, "sum"), "max": lambda g: comm.AllReduce(g, "max"),
        "gather0": lambda g: comm.AllGather(g, 0), "gather1": lambda g: comm.AllGather(g, 1),
        "scatter0": lambda g: comm.ReduceScatter(g, 0), "scatter1": lambda g: comm.ReduceScatter(g, 1),
        "bcast1": lambda g: comm.Broadcast(g, 1),
    }

    class Loss(nn.Cell):
        def __init__(self, op):
            super().__init__()
            self.op = op

        def construct(self, x, w):
            out = self.op(x)
            return (out * out * w).sum(), out  # dL/dout = 2*out*w: the backward collective follows the forward

    for gname, group in (("world", world), ("sub", sub)):
        for cname, make in cases.items():
            net = Loss(make(group))
            ms.set_context(mode=ms.PYNATIVE_MODE)  # the op alone, eagerly (no graph to compile)
            probe = net.op(x).asnumpy()  # sync: two graphs' collectives must never be in flight at once
            ms.set_context(mode=ms.GRAPH_MODE)
            w = Tensor(w_np[:probe.shape[0], :probe.shape[1]])
            grad_fn = ms.jit(ms.value_and_grad(net, 0, None, has_aux=True))
            (_, out), dx = grad_fn(x, w)
            results[f"{gname}_{cname}_out"] = out.asnumpy()
            results[f"{gname}_{cname}_dx"] = dx.asnumpy()
            results[f"{gname}_{cname}_probe"] = probe
    np.savez(f"{out_dir}/comm_rank{world.rank}.npz", **results)
    print(f"rank {world.rank}: comm done", flush=True)

