"""msrun worker for test_tpcp_msrun: the debug-size model under tensor parallel ("tp") or context parallel
("cp", causal and with packed-document segment ids) on 2 ranks; one forward + backward. Rank 0 writes
<out>/<mode>.npz with the loss, this layout's logits in global order and the full (unsharded, CP-summed)
gradients under the unsharded parameter names."""

from __future__ import annotations

import sys

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


def run(mode: str, out_dir: str) -> None:
    import mindspore as ms
    from mindspore import Tensor
    from mindspore.communication import init

    from ascend_llm.config.parallel import ParallelConfig
    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel import comm
    from ascend_llm.parallel.cp import apply_context_parallel, shard_sequence, zigzag_positions
    from ascend_llm.parallel.dims import build_groups
    from ascend_llm.parallel.tp import VocabParallelCrossEntropy, apply_tensor_parallel, gather_full, tp_shard_axes

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    cfg = model_config()
    parallel = ParallelConfig(tensor_parallel_degree=2) if mode == "tp" else ParallelConfig(context_parallel_degree=2)
    groups = build_groups(parallel)
    model = build_model(cfg, seed=0)
    full_shapes = {p.name: tuple(p.shape) for p in model.trainable_params()}
    tokens, labels, segments = batch()
    if mode == "tp":
        apply_tensor_parallel(model, parallel, groups, seq_len=SEQ)
        loss_fn = VocabParallelCrossEntropy(groups.tp, cfg.vocab_size)
        variants = {"causal": None}
    else:
        apply_context_parallel(model, parallel, groups, SEQ)
        loss_fn = VocabParallelCrossEntropy(groups.tp, cfg.vocab_size, count_group=groups.cp)
        tokens, labels, segments = (shard_sequence(a, 2, groups.cp_rank) for a in (tokens, labels, segments))
        variants = {"causal": None, "segments": segments}
    params = model.trainable_params()
    results = {}
    for variant, seg in variants.items():
        if seg is None:
            def forward(x, y):
                logits = model(x)
                return loss_fn(logits, y), logits
            args = (Tensor(tokens), Tensor(labels))
        else:
            def forward(x, y, s):
                logits = model(x, s)
                return loss_fn(logits, y), logits
            args = (Tensor(tokens), Tensor(labels), Tensor(seg))
        (loss, logits), grads = ms.jit(ms.value_and_grad(forward, None, params, has_aux=True))(*args)
        loss.asnumpy()
        if mode == "tp":
            logits = comm.AllGather(groups.tp, 2)(logits).asnumpy()[..., :cfg.vocab_size]
            grads = gather_full({p.name: g for p, g in zip(params, grads)}, tp_shard_axes(model), groups.tp,
                                full_shapes)
            loss = loss.asnumpy()
        else:
            full = np.zeros((BATCH, SEQ, cfg.vocab_size), np.float32)
            full[:, zigzag_positions(SEQ, 2, groups.cp_rank)] = logits.asnumpy()
            logits = comm.AllReduce(groups.cp, "sum")(Tensor(full)).asnumpy()
            loss = comm.AllReduce(groups.cp, "sum")(loss).asnumpy()
            grads = {p.name: comm.AllReduce(groups.cp, "sum")(g).asnumpy() for p, g in zip(params, grads)}
        results[f"{variant}/loss"] = loss
        results[f"{variant}/logits"] = logits
        results.update({f"{variant}/grad/{name}": value for name, value in grads.items()})
    if groups.rank == 0:
        np.savez(f"{out_dir}/{mode}.npz", **results)
    print(f"rank {groups.rank}: {mode} done", flush=True)


if __name__ == "__main__":
    run(sys.argv[2], sys.argv[1])
