"""Step time and tokens/s per device from FLOPs, a declared peak and declared link bandwidths (pure Python).

An estimate, not a measurement. The step time is a lower bound, so tokens/s is an upper bound: compute at the
declared peak (100% MFU) and communication (ring collectives at the declared per-device bus bandwidth) fully
overlapped with it, step >= max(compute, communication), as the stacks behind the published 910B figures
overlap gradient collectives with the backward. The serial figure compute + communication (no overlap) is
given beside it. The 910B cluster recipes declare 130 GB/s inside a node: the bus bandwidth of the 8-NPU
all_gather measured at 149 GB/s algorithm bandwidth (x 7/8; its all_reduce, 72 GB/s x 2 * 7/8 = 126) by
gameofdimension/limulidae (README, torch_npu + HCCL, CANN 8.0.0.beta1).

Formulas:
- Training FLOPs per token 6N + 12*L*h*s (PaLM, Chowdhery et al. 2022, appendix B; N counts the matmul
  weights: no input-embedding lookup, output head included). Recompute adds forward work (Korthikanti et al.
  2022 sec. 6, "hardware FLOPs"): full adds 2N + 4*L*h*s (one more forward), selective adds the attention
  core's forward 4*L*h*s. Preference tuning (config/preference.py step_work): a pair is two sequences (tokens
  count both), and DPO with the adapters-off reference adds its forward, 2N + 4*L*h*s per token (part of the
  model FLOPs: the algorithm needs it), with its tensor-parallel all-reduces (2 per layer) and CP all-gathers.
- Ring all-reduce moves 2(k-1)/k of the buffer per rank; reduce-scatter and all-gather (k-1)/k each
  (Patarasuk & Yuan 2009; the figures NCCL/HCCL bandwidth tests report as "bus bandwidth").
- Data parallel: gradients all-reduced once per step; ZeRO-1 as implemented here adds the all-gather of the
  updated parameters (3 passes); ZeRO-2 reduce-scatters every micro-batch's gradients into the shard and then
  all-gathers the parameters (micro-batches + 1 passes; ZeRO paper sec. 7 counts 2 for one micro-batch).
  Tensor parallel: 2 all-reduces of b*s*h activations per
  layer forward and 2 backward (Megatron-LM, Shoeybi et al. 2019, fig. 4). Context parallel: K and V
  all-gathered per layer forward, their gradients reduce-scattered backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ascend_llm.parallel.plan_memory import Layout, kv_heads_per_device, parameters_per_device
from ascend_llm.parallel.plan_moe import all_to_all_bytes, inactive_parameters_per_token

# Published 910B throughput, bf16 (../shared/ascend-reference.md): model name -> (setup, seq_len, tokens/s/device).
PUBLISHED_910B = {
    "llama2_7b": [("MindFormers, DP8, FA, jit O1", 4096, 4160), ("MindSpeed-LLM, TP1 PP2 SP", 4096, 4672)],
    "llama3_8b": [("MindFormers, DP8, full recompute, FA", 8192, 2581)],
}


def matmul_parameters(model: Any) -> int:
    """N of the 6N term: every weight except the input-embedding table (output head counted, also tied); of a
    MoE model's experts only the k a token is routed to (plan_moe.inactive_parameters_per_token)."""
    total = parameters_per_device(model, 1) - inactive_parameters_per_token(model)
    embedding = model.vocab_size * model.dim
    return total - (0 if model.tie_embeddings else embedding)


def flops_per_token(model: Any, seq_len: int, recompute: str = "none", reference_forward: bool = False) -> float:
    """Training FLOPs per token (6N + 12*L*h*s, plus the recomputed forward work); see the module doc.
    reference_forward (DPO with the adapters-off reference): one more forward, 2N + 4*L*h*s."""
    n = matmul_parameters(model)
    attention = 12.0 * model.num_layers * model.dim * seq_len
    extra = {"none": 0.0, "selective": attention / 3,
             "full": 2.0 * n + attention / 3}[recompute]
    return 6.0 * n + attention + extra + (2.0 * n + attention / 3 if reference_forward else 0.0)


@dataclass
class TimePlan:
    """Seconds per optimizer step and tokens/s per device (all ranks of a step work in parallel)."""

    compute_s: float
    comm_s: dict[str, float]
    tokens_per_step: int
    world_size: int
    model_flops_per_token: float
    peak_tflops: float
    published: list[tuple[str, int, int]]

    @property
    def step_s(self) -> float:
        """Lower bound on the seconds per optimizer step: max(compute, communication) (overlapped)."""
        return max(self.compute_s, sum(self.comm_s.values()))

    @property
    def serial_step_s(self) -> float:
        """Seconds per step with no overlap: compute plus every communication term."""
        return self.compute_s + sum(self.comm_s.values())

    @property
    def tokens_per_s_per_device(self) -> float:
        """tokens_per_step / step_s / world_size: an upper bound (100% MFU, communication overlapped)."""
        return self.tokens_per_step / self.step_s / self.world_size

    @property
    def serial_tokens_per_s_per_device(self) -> float:
        """tokens/s per device at `serial_step_s` (100% MFU, no overlap)."""
        return self.tokens_per_step / self.serial_step_s / self.world_size

    def published_mfu(self, model: Any, seq_len: int, tokens_per_s: float) -> float:
        """MFU a published tokens/s per device implies at the declared peak (6N + 12Lhs FLOPs/token at the
        published sequence length)."""
        return tokens_per_s * flops_per_token(model, seq_len) / (self.peak_tflops * 1e12)


def ring_seconds(num_bytes: float, ranks: int, gb_per_s: Optional[float], factor: float) -> float:
    """Ring collective time: factor * (k-1)/k * bytes / bandwidth (factor 2 all-reduce, 1 RS or AG)."""
    if ranks <= 1 or not gb_per_s:
        return 0.0
    return factor * (ranks - 1) / ranks * num_bytes / (gb_per_s * 1e9)


def plan_time(lay: Layout, peak_tflops: float, intra_gb_s: Optional[float], inter_gb_s: Optional[float],
              global_batch_size: int) -> TimePlan:
    """Estimate one optimizer step. peak_tflops per device; bandwidths per device in GB/s (None: that
    communication is not estimated). The data-parallel group crosses nodes when there is more than one."""
    m = lay.model
    t, c, d = lay.tensor_parallel_degree, lay.context_parallel_degree, lay.data_parallel_degree
    tokens = global_batch_size * lay.seq_len * lay.sequences_per_row  # a preference pair: both sequences
    device_flops = tokens / d * flops_per_token(m, lay.seq_len, lay.recompute, lay.reference_forward) / (t * c)
    compute_s = device_flops / (peak_tflops * 1e12)
    p_bytes = parameters_per_device(m, t, lay.expert_parallel_degree) * lay.param_bytes
    dp_bw = inter_gb_s if lay.num_nodes > 1 else intra_gb_s
    micro_steps = lay.grad_accum_steps
    # ZeRO 0: one all-reduce (2 passes); 1: all-reduce + parameter all-gather (3); 2: a reduce-scatter per
    # micro-batch (the shard accumulates) + the parameter all-gather (micro_steps + 1).
    passes = {0: 2.0, 1: 3.0, 2: micro_steps + 1.0}[lay.zero_stage]
    # the gradient (and ZeRO's shard) collectives run over data x context parallel: CP ranks hold the same
    # parameters and sum their sequence shares' gradients (train/layout.py, parallel/zero.py)
    comm = {"data parallel (gradients" + (", parameters)" if lay.zero_stage else ")"):
            ring_seconds(p_bytes, d * c, dp_bw, passes)}
    if t > 1:
        act = lay.micro_batch * lay.seq_len / c * m.dim * lay.compute_bytes
        per_layer = 4 + (2 if lay.recompute == "full" else 0) + (2 if lay.reference_forward else 0)
        comm["tensor parallel (activations)"] = micro_steps * m.num_layers * per_layer * ring_seconds(
            act, t, intra_gb_s, 2.0)
    if c > 1:
        kv = 2 * kv_heads_per_device(m, t) * m.head_dim * lay.micro_batch * lay.seq_len * lay.compute_bytes
        passes = 2 + (1 if lay.reference_forward else 0)  # forward all-gather, backward reduce-scatter (+ reference)
        comm["context parallel (k, v)"] = micro_steps * m.num_layers * passes * ring_seconds(kv, c, intra_gb_s, 1.0)
    ep = lay.expert_parallel_degree
    if ep > 1:  # dispatch + combine, forward and backward (plan_moe.all_to_all_bytes); EP groups are consecutive ranks
        bw = intra_gb_s if ep <= lay.world_size // max(lay.num_nodes, 1) else inter_gb_s
        sent = all_to_all_bytes(m, lay.micro_batch * lay.seq_len, ep, lay.compute_bytes, lay.expert_capacity_factor)
        comm["expert parallel (all-to-all)"] = micro_steps * sent / (bw * 1e9) if bw else 0.0
    published = PUBLISHED_910B.get(m.name, []) if lay.device == "ascend" else []  # 910B figures vs a 910B peak
    model_flops = flops_per_token(m, lay.seq_len, reference_forward=lay.reference_forward)
    return TimePlan(compute_s, comm, tokens, lay.world_size, model_flops, peak_tflops, published)
