"""For test_tpz_msrun, run as tpcp_worker.py's "kv1" mode: tensor parallel 2 with one KV head (replicated on
both TP ranks).

The debug-size model with num_kv_heads=1, Qwen3's per-head q/k norms (qk_norm) and a vocabulary of 511 (padded by
TP), one forward + backward under `tp` (tensor parallel 2) and `tp_sp` (with sequence parallel). Rank 0 writes
<out>/kv1.npz with, per variant: the loss, the logits (B, S, V) gathered over TP, the gradients under the unsharded
names and shapes (one replica of wk/wv), the global gradient norm (tp.TPGradNorm), and `replica_err`: the largest
difference between the two TP ranks' wk/wv gradients (the replicas must get the same summed gradient).
`state/*_err`: the layout-free state checks (gather of the shards vs the full seeded init; shard of the full init vs
the shards)."""

from __future__ import annotations

import numpy as np

BATCH, SEQ, VOCAB = 2, 16, 511
VARIANTS = {"tp": False, "tp_sp": True}  # variant: sequence_parallel


def model_config():
    from ascend_llm.config.model import ModelConfig

    return ModelConfig(name="debug", vocab_size=VOCAB, dim=64, num_layers=2, num_heads=4, num_kv_heads=1,
                       ffn_hidden_dim=176, max_seq_len=64, qk_norm=True)


def batch() -> tuple[np.ndarray, np.ndarray]:
    """tokens, labels (B, S) int32, seeded."""
    rng = np.random.default_rng(11)
    return (rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32),
            rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32))


def replica_err(params, grads, group) -> float:
    """Largest |difference| between the TP ranks' gradients of the replicated wk/wv shards."""
    from ascend_llm.parallel import comm

    worst = 0.0
    for p, g in zip(params, grads):
        if getattr(p, "tp_replicas", 1) > 1:
            both = comm.AllGather(group, 0)(g).asnumpy().reshape((group.size,) + tuple(g.shape))
            worst = max(worst, float(np.abs(both - both[0]).max()))
    return worst


def run_variant(variant: str, groups, results: dict) -> None:
    """One forward + backward of the TP model (groups: parallel.dims.ParallelGroups of tp=2); fills results."""
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.config.parallel import ParallelConfig
    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel import comm
    from ascend_llm.parallel.tp import (
        TPGradNorm,
        VocabParallelCrossEntropy,
        apply_tensor_parallel,
        gather_full,
        shard_full,
        tp_replicas,
        tp_shard_axes,
    )

    parallel = ParallelConfig(tensor_parallel_degree=2, sequence_parallel=VARIANTS[variant])
    model = build_model(model_config(), seed=0)
    init = {p.name: p.asnumpy() for p in model.trainable_params()}
    shapes = {name: value.shape for name, value in init.items()}
    apply_tensor_parallel(model, parallel, groups, seq_len=SEQ)
    params = model.trainable_params()
    axes, replicas = tp_shard_axes(model), tp_replicas(model)
    gathered = gather_full({p.name: p for p in params}, axes, groups.tp, shapes, replicas)
    mine = shard_full(init, axes, groups.tp_rank, groups.tp.size, replicas)
    results[f"{variant}/state/gather_err"] = max(np.abs(gathered[n] - init[n]).max() for n in init)
    results[f"{variant}/state/shard_err"] = max(np.abs(mine[p.name] - p.asnumpy()).max() for p in params)
    results[f"{variant}/replicated"] = np.array(sorted(replicas))
    loss_fn = VocabParallelCrossEntropy(groups.tp, VOCAB)

    def forward(x, y):
        logits = model(x)
        return loss_fn(logits, y), logits

    tokens, labels = batch()
    (loss, logits), grads = ms.jit(ms.value_and_grad(forward, None, params, has_aux=True))(Tensor(tokens),
                                                                                            Tensor(labels))
    results[f"{variant}/loss"] = loss.asnumpy()
    results[f"{variant}/logits"] = comm.AllGather(groups.tp, 2)(logits).asnumpy()[..., :VOCAB]
    results[f"{variant}/grad_norm"] = TPGradNorm(params, groups.tp)(tuple(grads)).asnumpy()
    results[f"{variant}/replica_err"] = np.float32(replica_err(params, grads, groups.tp))
    full = gather_full({p.name: g for p, g in zip(params, grads)}, axes, groups.tp, shapes, replicas)
    results.update({f"{variant}/grad/{name}": value for name, value in full.items()})


def run(out_dir: str) -> None:
    """Both variants on 2 ranks (communication already initialised: tpcp_worker.py runs this as its "kv1" mode)."""
    from ascend_llm.config.parallel import ParallelConfig
    from ascend_llm.parallel.dims import build_groups

    groups = build_groups(ParallelConfig(tensor_parallel_degree=2))
    results: dict = {}
    for variant in VARIANTS:
        run_variant(variant, groups, results)
    if groups.rank == 0:
        np.savez(f"{out_dir}/kv1.npz", **results)
    print(f"rank {groups.rank}: kv1 done", flush=True)

