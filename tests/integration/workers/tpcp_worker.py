"""msrun worker for test_tpcp_msrun: the debug-size model under one or more layouts, one forward + backward each.

`tpcp_worker.py OUT_DIR MODE[,MODE...]` runs the modes one after the other in the same job (one msrun start-up for
all of them). Layouts: "tp" (causal, and every target in one vocabulary shard), "cp" (causal, and packed-document
segment ids), "tp_sp" (TP with sequence parallel), on 2 ranks (the code takes any data-parallel degree: each
replica its rows of the batch; TP and CP composed with DP are checked through the trainer). More modes run
other workers' checks in the same job, on 2 ranks: "comm" (comm_worker.py: every collective), "kv1"
(tpz_worker.py: one replicated KV head under TP) and "zero" (zero_worker.py: ZeRO-1/2 against AdamW). A group
with the same name in two modes is created once and reused (`comm.new_group`: the same communicator).
Gradients are reduced by dp.build_grad_reducer over groups.dp_cp and all-gathered over TP. Rank 0 writes
<out>/<mode>.npz with the loss, the logits in global order, the full gradients under the unsharded parameter
names, and the layout-free state checks (gather of the shards vs the full init, shard of the full init vs the
shards)."""

from __future__ import annotations

import sys
import time

import numpy as np

BATCH, SEQ = 2, 16


def model_config():
    from ascend_llm.config.model import ModelConfig

    # the debug model with a vocabulary not divisible by 2 (exercises vocab padding)
    return ModelConfig(name="debug", vocab_size=511, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_dim=176, max_seq_len=64)


def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, labels (B, S) int32 and segment ids (B, S) int32 (3 packed documents per row), seeded."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 511, size=(BATCH, SEQ)).astype(np.int32)
    labels = rng.integers(0, 511, size=(BATCH, SEQ)).astype(np.int32)
    segments = np.stack([np.repeat([0, 1, 2], [5, 6, 5]), np.repeat([0, 1, 2], [2, 9, 5])]).astype(np.int32)
    return tokens, labels, segments


LAYOUTS = {"tp": dict(tensor_parallel_degree=2), "cp": dict(context_parallel_degree=2),
           "tp_sp": dict(tensor_parallel_degree=2, sequence_parallel=True)}
# "lowlabels": every target in rank 0's vocabulary shard [0, 256), so rank 1's shard holds none
VARIANTS = {"tp": ("causal", "lowlabels"), "cp": ("causal", "segments"), "tp_sp": ("segments",)}


def build(mode: str):
    """(parallel config, groups, sharded model, loss cell, gradient reducer, full init arrays, full shapes)."""
    from ascend_llm.config.parallel import ParallelConfig
    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel.cp import apply_context_parallel
    from ascend_llm.parallel.dims import build_groups
    from ascend_llm.parallel.dp import build_grad_reducer
    from ascend_llm.parallel.tp import VocabParallelCrossEntropy, apply_tensor_parallel

    cfg = model_config()
    parallel = ParallelConfig(**LAYOUTS[mode])
    groups = build_groups(parallel)
    model = build_model(cfg, seed=0)
    init = {p.name: p.asnumpy() for p in model.trainable_params()}
    apply_tensor_parallel(model, parallel, groups, seq_len=SEQ)
    apply_context_parallel(model, parallel, groups, SEQ)
    loss_fn = VocabParallelCrossEntropy(groups.tp, cfg.vocab_size, count_group=groups.cp)
    reduce = build_grad_reducer(None, parallel.world_size, group=groups.dp_cp,
                                scale=1.0 / parallel.data_parallel_degree)
    return parallel, groups, model, loss_fn, reduce, init


def local_batch(parallel, groups):
    """This rank's rows (its data-parallel replica's share) and zigzag sequence slice (its CP rank)."""
    from ascend_llm.parallel.cp import shard_sequence

    dp, cp = parallel.data_parallel_degree, parallel.context_parallel_degree
    per = BATCH // dp
    rows = slice(groups.dp_rank * per, (groups.dp_rank + 1) * per)
    return tuple(shard_sequence(a[rows], cp, groups.cp_rank) for a in batch())


def logits_gatherer(parallel, groups, vocab: int):
    """logits -> this layout's logits (B, S, V) in global order on every rank (gathered over tp, cp and dp)."""
    from mindspore import Tensor

    from ascend_llm.parallel import comm
    from ascend_llm.parallel.cp import zigzag_positions

    gather_tp, sum_dp_cp = comm.AllGather(groups.tp, 2), comm.AllReduce(groups.dp_cp, "sum")
    per = BATCH // parallel.data_parallel_degree
    rows = slice(groups.dp_rank * per, (groups.dp_rank + 1) * per)
    positions = zigzag_positions(SEQ, parallel.context_parallel_degree, groups.cp_rank)

    def full_logits(logits) -> np.ndarray:
        full = np.zeros((BATCH, SEQ, vocab), np.float32)
        full[rows][:, positions] = gather_tp(logits).asnumpy()[..., :vocab]
        return sum_dp_cp(Tensor(full)).asnumpy()

    return full_logits


def run(mode: str, out_dir: str) -> None:
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.parallel.tp import TPGradNorm, gather_full, shard_full, tp_shard_axes

    parallel, groups, model, loss_fn, reduce, init_full = build(mode)
    full_shapes = {name: value.shape for name, value in init_full.items()}
    tokens, labels, segments = local_batch(parallel, groups)
    params = model.trainable_params()
    axes = tp_shard_axes(model)
    results = {}
    # layout-free state: shards gathered back equal the full seeded init; the full init sharded equals them
    gathered = gather_full({p.name: p for p in params}, axes, groups.tp, full_shapes)
    mine = shard_full(init_full, axes, groups.tp_rank, groups.tp.size)
    results["state/gather_err"] = max(np.abs(gathered[n] - init_full[n]).max() for n in init_full)
    results["state/shard_err"] = max(np.abs(mine[p.name] - p.asnumpy()).max() for p in params)

    def forward(x, y):
        logits = model(x)
        return loss_fn(logits, y), logits

    def forward_segments(x, y, s):
        logits = model(x, s)
        return loss_fn(logits, y), logits

    # one compiled graph per signature and cell, reused by every variant: "causal" and "lowlabels" differ only in
    # the label values
    norm, gather = TPGradNorm(params, groups.tp), logits_gatherer(parallel, groups, model.cfg.vocab_size)
    steps = {name: ms.jit(ms.value_and_grad(fn, None, params, has_aux=True))
             for name, fn in (("plain", forward), ("segments", forward_segments))}
    for variant in VARIANTS[mode]:
        targets = labels % 255 if variant == "lowlabels" else labels
        if variant != "segments":
            (loss, logits), grads = steps["plain"](Tensor(tokens), Tensor(targets))
        else:
            (loss, logits), grads = steps["segments"](Tensor(tokens), Tensor(targets), Tensor(segments))
        loss = reduce((loss,))[0].asnumpy()
        grads = reduce(tuple(grads))
        results[f"{variant}/grad_norm"] = norm(grads).asnumpy()
        results[f"{variant}/loss"] = loss
        results[f"{variant}/logits"] = gather(logits)
        grads = gather_full({p.name: g for p, g in zip(params, grads)}, axes, groups.tp, full_shapes)
        results.update({f"{variant}/grad/{name}": value for name, value in grads.items()})
    if groups.rank == 0:
        np.savez(f"{out_dir}/{mode}.npz", **results)
    print(f"rank {groups.rank}: {mode} done", flush=True)


def main(out_dir: str, modes: str) -> None:
    from mindspore.communication import init

    from ascend_llm.config.runtime import RuntimeConfig
    from ascend_llm.train.runtime import setup_runtime

    setup_runtime(RuntimeConfig(device_target="cpu"))  # graph mode, $OMP_NUM_THREADS kernel threads (run_msrun)
    init()
    for mode in modes.split(","):
        start, cpu = time.monotonic(), time.process_time()
        run_mode(mode, out_dir)
        print(f"[tpcp_worker] {mode} done in {time.monotonic() - start:.1f} s ({time.process_time() - cpu:.1f} CPU-s)",
              flush=True)


def run_mode(mode: str, out_dir: str) -> None:
    """One mode of this job (module doc)."""
    if mode == "comm":  # every collective of comm.py (comm_worker.py)
        from comm_worker import run_all as run_comm

        run_comm(out_dir)
    elif mode == "kv1":  # one replicated KV head under TP (tpz_worker.py)
        from tpz_worker import run as run_kv1

        run_kv1(out_dir)
    elif mode == "zero":  # ZeRO-1/2 AdamW vs the unsharded AdamW (zero_worker.py)
        from zero_worker import run as run_zero

        run_zero(out_dir)
    else:
        run(mode, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
