"""MoE benchmark: forward+backward time of a Mixture-of-Experts model against the dense model with the same active
parameters per token, in one process and one sitting (CPU graph mode).

  ascend-llm bench moe [--dim 256 --layers 4 --experts 8 --top-k 2 --expert-dim 256 --batch 4 --seq 256]
                       [--repeats 5] [--out bench_results/moe.json]

The dense model's SwiGLU width is top_k * expert_dim (+ the shared expert's width when there is one), so both
do the same multiply-adds per token in their feed-forward; the MoE model adds the router, the dispatch (the tiled
grouped matmul of models/moe.py) and the load-balancing loss. Rows: the whole model (loss = cross-entropy, + aux
loss for MoE) and the feed-forward layer alone (sum of outputs). Each repeat times the MoE and the dense step
back to back; the ratio is the median of the per-repeat ratios (a shared machine slows both alike). The first
call of each (the compile) is reported apart.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ascend_llm.bench.report import print_table, write_json


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ascend-llm bench moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=256)
    p.add_argument("--shared-dim", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_results/moe.json")
    return p.parse_args(argv)


def configs(args: argparse.Namespace):
    """(MoE ModelConfig, dense ModelConfig with the same active feed-forward width)."""
    from ascend_llm.config.model import ModelConfig

    common = dict(name="bench", vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                  num_kv_heads=args.heads, max_seq_len=args.seq, qkv_bias=args.shared_dim > 0)
    active = args.top_k * args.expert_dim + args.shared_dim
    moe = ModelConfig(**common, ffn_hidden_dim=active, num_experts=args.experts, num_experts_per_tok=args.top_k,
                      moe_ffn_hidden_dim=args.expert_dim, shared_expert_ffn_hidden_dim=args.shared_dim,
                      router_aux_loss_coef=0.01)
    return moe, ModelConfig(**common, ffn_hidden_dim=active)


def step_functions(moe_cfg, dense_cfg, tokens, labels):
    """{row name: (moe fn, dense fn)}: compiled forward+backward steps returning the loss."""
    import mindspore as ms
    from mindspore import ops

    from ascend_llm.models.llama import FeedForward, build_model
    from ascend_llm.models.moe import MoEFeedForward
    from ascend_llm.train.loss import token_cross_entropy

    def model_step(cfg):
        model = build_model(cfg)
        params = model.trainable_params()

        def loss_fn(x, y):
            out = model(x)
            if isinstance(out, tuple):
                return token_cross_entropy(out[0], y) + out[1]
            return token_cross_entropy(out, y)

        grad = ms.jit(ms.value_and_grad(loss_fn, None, params))
        return lambda: grad(tokens, labels)[0]

    def layer_step(cell):
        rng = np.random.default_rng(0)
        for p in cell.get_parameters():
            p.set_data(ms.Tensor(rng.normal(0, 0.02, p.shape).astype(np.float32)))
        x = ms.Tensor(rng.normal(size=(tokens.shape[0], tokens.shape[1], moe_cfg.dim)).astype(np.float32))
        def total(h):
            return ops.sum(cell(h))

        grad = ms.jit(ms.value_and_grad(total, 0, cell.trainable_params()))
        return lambda: grad(x)[0]

    return {"model": (model_step(moe_cfg), model_step(dense_cfg)),
            "ffn layer": (layer_step(MoEFeedForward(moe_cfg, FeedForward)), layer_step(FeedForward(dense_cfg.dim,
                                                                                     dense_cfg.ffn_hidden_dim)))}


def timed(fn) -> float:
    start = time.perf_counter()
    value = fn()
    value.asnumpy()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import mindspore as ms

    from ascend_llm.models.llama import count_params
    from ascend_llm.models.moe import moe_param_count, use_tiled
    from ascend_llm.train.runtime import set_cpu_threads

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_cpu_threads(os.cpu_count() or 1)
    moe_cfg, dense_cfg = configs(args)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    tokens, labels = ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:])
    rows = []
    for name, (moe_fn, dense_fn) in step_functions(moe_cfg, dense_cfg, tokens, labels).items():
        first = (timed(moe_fn), timed(dense_fn))
        pairs = [(timed(moe_fn), timed(dense_fn)) for _ in range(args.repeats)]
        ratios = sorted(m / d for m, d in pairs)
        rows.append({"what": name, "moe_s": round(float(np.median([m for m, _ in pairs])), 4),
                     "dense_s": round(float(np.median([d for _, d in pairs])), 4),
                     "ratio": round(ratios[len(ratios) // 2], 3), "moe_first_s": round(first[0], 2),
                     "dense_first_s": round(first[1], 2)})
    total, active = moe_param_count(moe_cfg)
    facts = {"experts": args.experts, "top_k": args.top_k, "expert_dim": args.expert_dim,
             "shared_dim": args.shared_dim, "dense_ffn_dim": dense_cfg.ffn_hidden_dim, "tokens": args.batch * args.seq,
             "moe_params": count_params(moe_cfg), "dense_params": count_params(dense_cfg),
             "moe_ffn_params_per_layer": total, "moe_ffn_active_per_layer": active,
             "expert_path": "tiled" if use_tiled(args.batch * args.seq, args.top_k, args.experts) else "all experts"}
    print(" ".join(f"{k}={v}" for k, v in facts.items()))
    print_table(rows, ["what", "moe_s", "dense_s", "ratio", "moe_first_s", "dense_first_s"])
    print(f"wrote {write_json(args.out, 'moe', rows, **facts, target_ratio=1.5)}")
    return 0
