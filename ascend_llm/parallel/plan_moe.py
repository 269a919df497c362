"""Planner terms of Mixture-of-Experts models (pure Python: no MindSpore import): expert parameters per device
under expert parallel, parameters active per token (the FLOPs' N), the all-to-all traffic of a step and the
router's activation memory. plan_memory.py's parameter sizes take the sparse layers from here.

Symbols: E experts, k top-k, I expert width, I_s shared-expert width, H model dim, L_s sparse layers, ep the
expert-parallel degree, n tokens per micro-batch on one rank, e bytes of the compute dtype.

- A sparse layer's feed-forward: router E*H, experts 3*E*I*H (E/ep of them on a device under EP), shared expert
  3*H*I_s + its gate H (models/moe.py; Qwen2-MoE / Qwen3-MoE).
- Active parameters per token: every non-expert parameter plus k of the E experts per sparse layer (the N of
  the 6N training FLOPs per token; Kaplan et al. 2020 sec. 2.1 applied to the parameters a token touches).
- All-to-all (parallel/ep.py): per sparse layer and micro-batch, the forward sends the dispatch buffer
  (ep chunks of n*k rows of H+1 values, static and dropless: sized for the worst case) and receives the outputs
  (ep chunks of n*k rows of H values); the backward does both again. (ep-1)/ep of each buffer leaves the device:
  bytes = 2 * L_s * (ep - 1) * n * k * (2H + 1) * e per micro-batch.
- Router memory kept for the backward, per sparse layer: logits and probabilities (n, E) float32, the top-k
  weights and indices (n, k), the one-hot rank computation (n*k, E) int32: (8E + 8k + 4kE) * n bytes.
- Expert buffers kept for the backward, per sparse layer: R rows of the grouped SwiGLU (its input H, the gate,
  up and activation 3I, the output H: (2H + 3I) * e per row) plus the tiles' gathered weights (3 I H e per
  tile); R = the tiled path's rows for P = n k pairs (models/moe.py: P plus E + 1 tiles, about P/2), or E n
  when running every expert is cheaper. Under EP the receiving rank's buffer has ep P rows (the worst case) and the
  dispatch adds its send, receive and return buffers, 3 ep P (H + 1) e. With full recompute one sparse layer's
  buffers are alive at a time. These come on top of the dense SwiGLU activation terms, which plan_activations.py
  counts for every layer at model.ffn_hidden_dim.
"""

from __future__ import annotations

import math
from typing import Any


def is_moe(model: Any) -> bool:
    """Whether the model config has experts (num_experts > 0)."""
    return int(getattr(model, "num_experts", 0) or 0) > 0


def sparse_layer_count(model: Any) -> int:
    """L_s: the layers `ModelConfig.is_sparse_layer` makes sparse (0 for a dense config)."""
    if not is_moe(model):
        return 0
    return sum(model.is_sparse_layer(i) for i in range(model.num_layers))


def sparse_ffn_sizes(model: Any, ep: int = 1) -> list[int]:
    """Element counts of one sparse layer's feed-forward tensors on one device, in the model's order: router,
    experts w1, w2, w3 (E/ep experts each), then the shared expert's w1, w2, w3 and gate when there is one."""
    h, experts = model.dim, model.num_experts // ep
    expert = experts * model.moe_ffn_hidden_dim * h
    sizes = [model.num_experts * h, expert, expert, expert]
    shared = model.shared_expert_ffn_hidden_dim
    if shared:
        sizes += [h * shared, shared * h, h * shared, h]
    return sizes


def expert_tensor_sizes(model: Any, ep: int = 1) -> list[int]:
    """Element counts of the expert tensors (w1, w2, w3 of E/ep experts) of every sparse layer on one device: the
    tensors ZeRO shards over the expert-data-parallel group (dp/ep ranks) under expert parallel (parallel/zero.py)."""
    return [n for _ in range(sparse_layer_count(model)) for n in sparse_ffn_sizes(model, ep)[1:4]]


def zero_sharded_elements(model: Any, sizes: list[int], dp: int, ep: int = 1) -> int:
    """Elements of a ZeRO-sharded per-parameter state (AdamW moments, gradient shards) one rank keeps, of the
    tensors `sizes` (plan_memory.parameter_sizes): ceil(n/dp) each, expert tensors ceil(n/(dp/ep)) under expert
    parallel (each padded to a multiple of its group's size, as parallel/zero.py does)."""
    total = sum(-(-n // dp) for n in sizes)
    if ep > 1 and is_moe(model):
        edp = max(dp // ep, 1)
        total += sum(-(-n // edp) - (-(-n // dp)) for n in expert_tensor_sizes(model, ep))
    return total


def expert_parameters_per_device(model: Any, ep: int = 1) -> int:
    """Expert weights one device holds: L_s * 3 * (E/ep) * I * H."""
    return sparse_layer_count(model) * 3 * (model.num_experts // ep) * model.moe_ffn_hidden_dim * model.dim


def inactive_parameters_per_token(model: Any) -> int:
    """Expert weights a token does not touch: L_s * 3 * (E - k) * I * H (0 for a dense config)."""
    if not is_moe(model):
        return 0
    return sparse_layer_count(model) * 3 * (model.num_experts - model.num_experts_per_tok) \
        * model.moe_ffn_hidden_dim * model.dim


def chunk_rows(pairs: int, ep: int, capacity_factor: float = 0.0) -> int:
    """Rows per destination chunk of the EP dispatch (parallel/ep.py capacity_rows): P dropless, else
    min(P, ceil(capacity_factor * P / ep))."""
    if capacity_factor <= 0:
        return pairs
    return min(pairs, int(math.ceil(capacity_factor * pairs / ep)))


def all_to_all_bytes(model: Any, tokens: int, ep: int, compute_bytes: int, capacity_factor: float = 0.0) -> float:
    """Bytes one device sends in the all-to-alls of one micro-batch of `tokens` tokens, forward and backward
    (module docstring; with a capacity factor the chunks hold chunk_rows instead of n k rows); 0 without EP."""
    if ep <= 1 or not is_moe(model):
        return 0.0
    rows = chunk_rows(tokens * model.num_experts_per_tok, ep, capacity_factor)
    return 2.0 * sparse_layer_count(model) * (ep - 1) * rows * (2 * model.dim + 1) * compute_bytes


def router_activation_bytes(model: Any, tokens: int) -> float:
    """Router tensors the backward keeps, over all sparse layers, for one micro-batch (module docstring)."""
    if not is_moe(model):
        return 0.0
    e, k = model.num_experts, model.num_experts_per_tok
    return float(sparse_layer_count(model) * (8 * e + 8 * k + 4 * k * e) * tokens)


def moe_summary(model: Any, total_parameters: int, tokens: int, ep: int, compute_bytes: int,
                capacity_factor: float = 0.0) -> dict:
    """The planner's MoE figures for `ascend-llm plan`: expert parameters per device, active parameters per
    token (of `total_parameters`, plan_memory.parameters_per_device(model)), all-to-all bytes per micro-batch
    and router bytes per micro-batch."""
    return {"expert_parallel_degree": ep, "sparse_layers": sparse_layer_count(model),
            "expert_parameters_per_device": expert_parameters_per_device(model, ep),
            "active_parameters_per_token": total_parameters - inactive_parameters_per_token(model),
            "all_to_all_bytes_per_micro_batch": all_to_all_bytes(model, tokens, ep, compute_bytes, capacity_factor),
            "router_bytes_per_micro_batch": router_activation_bytes(model, tokens)}


def tiled_rows(pairs: int, num_experts: int) -> tuple[int, int]:
    """(rows, tiles) of models/moe.py's grouped SwiGLU for `pairs` rows of one-expert-each work over
    num_experts experts (its choose_tile / use_tiled rule; pure Python here). tiles is 0 on the all-experts
    path, whose rows are num_experts * pairs / k: the caller passes pairs = tokens for that comparison."""
    target = max(pairs // (2 * num_experts), 1)
    tile = int(min(1024, max(8, 2 ** int(math.floor(math.log2(target))))))
    tiles = pairs // tile + 1 + num_experts
    return tiles * tile, tiles


def expert_buffer_bytes(model: Any, tokens: int, ep: int, compute_bytes: int, capacity_factor: float = 0.0) -> float:
    """One sparse layer's expert buffers for `tokens` tokens on one rank (module docstring)."""
    h, inner, k = model.dim, model.moe_ffn_hidden_dim, model.num_experts_per_tok
    pairs, experts = tokens * k, model.num_experts // ep
    if ep > 1:
        pairs = chunk_rows(pairs, ep, capacity_factor)  # rows per chunk: ep of them are received
    work = pairs * ep if ep > 1 else pairs
    rows, tiles = tiled_rows(work, experts)
    dense_rows = experts * (work if ep > 1 else tokens)
    if dense_rows <= rows:
        rows, tiles = dense_rows, 0
    dispatch = 3 * ep * pairs * (h + 1) if ep > 1 else 0
    return float((rows * (2 * h + 3 * inner) + tiles * 3 * inner * h + dispatch) * compute_bytes)


def moe_activation_terms(lay: Any) -> list[tuple[str, float, str, str, str]]:
    """(name, bytes, formula, source, phase) of a MoE model's router and expert buffers, for plan_memory's Terms
    ([] for a dense model); phase "backward start" like the other activations."""
    m = lay.model
    if not is_moe(m):
        return []
    ep = int(getattr(lay, "expert_parallel_degree", 1) or 1)
    capacity = float(getattr(lay, "expert_capacity_factor", 0.0) or 0.0)
    tokens = int(lay.micro_batch * lay.seq_len / lay.context_parallel_degree)
    layers = 1 if lay.recompute == "full" else sparse_layer_count(m)
    source = "parallel/plan_moe.py (models/moe.py, parallel/ep.py buffers)"
    return [("MoE router (logits, probabilities, top-k, one-hot ranks)",
             router_activation_bytes(m, tokens) / sparse_layer_count(m) * layers,
             f"{layers} sparse layer(s) * (8E + 8k + 4kE) * b*s", source, "backward start"),
            (f"MoE expert buffers (ep={ep})", layers * expert_buffer_bytes(m, tokens, ep, lay.compute_bytes, capacity),
             f"{layers} sparse layer(s) * (R (2H + 3I) + tiles 3IH" + (" + 3 ep n k (H + 1)" if ep > 1 else "")
             + ") * e", source, "backward start")]
