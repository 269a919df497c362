"""Per-device training memory of a recipe, term by term (pure Python: no MindSpore import).

Every term is a byte count for ONE device. Symbols: P = parameters held by the device (after tensor-parallel
splitting), d/t/c = data/tensor/context-parallel degrees, b = micro-batch rows per data-parallel rank,
s = sequence length, h = model dim, a = attention heads, h_kv = key/value width (num_kv_heads * head_dim),
F = SwiGLU hidden width, V = vocabulary, L = layers, e = bytes of the compute dtype; a sharded per-parameter
state keeps sum over parameter tensors of ceil(n/d) elements (each tensor padded to a multiple of d; under
context parallel a ZeRO stage shards over the d*c ranks holding identical parameters, so d reads d*c there).

Sources:
- Model states and sharding: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", section 3.1 (mixed-precision Adam holds 2P fp16 parameters + 2P gradients + 12P fp32
  master weights, momentum and variance = 16 bytes per parameter) and section 5 (stage 1 shards the 12P
  optimizer states over d ranks, stage 2 also the gradients).
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  section 4, redone for this toolkit's layer and dtype flow in plan_activations.py.
- Peak: the terms carry the phase of the step where they are alive (`PHASES`); the peak is the ALWAYS terms
  plus the largest phase, since the backward frees each layer's activations as it produces its gradients.
- Communication buffers: CANN HCCL_BUFFSIZE documentation: each communicator owns 2 * HCCL_BUFFSIZE MB
  (send and receive), outside MindSpore's pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ascend_llm.errors import ConfigError
from ascend_llm.parallel.plan_moe import is_moe, moe_activation_terms, sparse_ffn_sizes, zero_sharded_elements
from ascend_llm.parallel.plan_terms import (  # noqa: F401 (re-exported: plan.py, plan_time.py, tests)
    ALWAYS,
    GIB,
    MIB,
    OUTSIDE_POOL,
    PHASES,
    Term,
    kv_heads_per_device,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Stated fragmentation headroom: the caching pool cannot pack tensors perfectly; planned as this fraction of
# the pool's peak (the figure MindSpore/PyTorch practitioners allow; not measured here).
FRAGMENTATION_FRACTION = 0.10


@dataclass
class Layout:
    """The numbers the planner needs, read once from a RecipeConfig (see `layout_of`)."""

    model: Any
    seq_len: int
    micro_batch: int
    grad_accum_steps: int
    data_parallel_degree: int
    tensor_parallel_degree: int = 1
    context_parallel_degree: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    param_bytes: int = 4
    compute_bytes: int = 4
    recompute: str = "none"
    attention_backend: str = "naive"
    device: str = "cpu"
    hccl_buffsize_mb: int = 200
    world_size: int = 1
    num_nodes: int = 1
    lora_rank: int = 0  # > 0: LoRA (Hu et al. 2021): only the adapters train, the base is frozen
    lora_targets: tuple = ()
    expert_parallel_degree: int = 1  # MoE experts sharded over ep data-parallel ranks (parallel/ep.py)
    expert_capacity_factor: float = 0.0  # EP dispatch chunk size (0: dropless, worst-case chunks)
    sequences_per_row: int = 1  # preference pairs: 2 (chosen + rejected); micro_batch counts sequences
    reference_forward: bool = False  # DPO, reference=adapters_off: a second forward per step, nothing kept


@dataclass
class MemoryPlan:
    """Terms plus the budget. Budget = min(cluster.device_memory_gib, MindSpore pool cap) on Ascend; the
    HCCL buffers live outside the pool, so they are compared with the device memory."""

    terms: list[Term]
    device_bytes: Optional[float]
    pool_bytes: Optional[float]
    notes: list[str] = field(default_factory=list)

    def phase_bytes(self, phase: str) -> float:
        """Sum of the terms of one phase (ALWAYS, OUTSIDE_POOL or one of PHASES)."""
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def peak_phase(self) -> str:
        """The phase of PHASES whose terms are largest: where the step's peak is."""
        return max(PHASES, key=self.phase_bytes)

    @property
    def in_pool_bytes(self) -> float:
        """Peak bytes inside MindSpore's pool: the ALWAYS terms plus the largest phase (module doc)."""
        return self.phase_bytes(ALWAYS) + self.phase_bytes(self.peak_phase)

    @property
    def total_bytes(self) -> float:
        """Peak bytes per device: `in_pool_bytes` plus the HCCL buffers outside the pool."""
        return self.in_pool_bytes + self.phase_bytes(OUTSIDE_POOL)

    def term(self, name: str) -> Term:
        """The term called `name`; StopIteration when there is none."""
        return next(t for t in self.terms if t.name == name)

    @property
    def shortfall_bytes(self) -> Optional[float]:
        """Bytes by which the plan exceeds its budget (<= 0 fits); None when no budget is declared."""
        gaps = []
        if self.device_bytes is not None:
            gaps.append(self.total_bytes - self.device_bytes)
        if self.pool_bytes is not None:
            gaps.append(self.in_pool_bytes - self.pool_bytes)
        return max(gaps) if gaps else None

    @property
    def fits(self) -> Optional[bool]:
        """True/False against the declared budget (shortfall <= 0); None when no budget is declared."""
        gap = self.shortfall_bytes
        return None if gap is None else gap <= 0


def parse_memory_size(text: str, field_name: str = "runtime.max_device_memory") -> float:
    """MindSpore's memory-size string ("58GB", "512MB"; MindSpore's GB is 1024**3 bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|MB)\s*", str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(field_name, text, 'must be a size like "58GB" or "512MB"')
    return float(match.group(1)) * (GIB if match.group(2) == "GB" else MIB)


def parameter_sizes(model: Any, tp: int = 1, ep: int = 1) -> list[int]:
    """Element count of every parameter tensor one device holds, in the model's order. Column/row-parallel
    projections, the vocab-parallel embedding and output head are divided by tp; norm weights are replicated;
    wk/wv hold `kv_heads_per_device` heads (one replicated head when tp > num_kv_heads). A MoE model's sparse
    layers hold plan_moe.sparse_ffn_sizes (E/ep experts under expert parallel) instead of the dense SwiGLU."""
    hd, h = model.head_dim, model.dim
    q_out, kv_out, ffn = model.num_heads * hd // tp, kv_heads_per_device(model, tp) * hd, model.ffn_hidden_dim // tp
    vocab_part = model.vocab_size * h // tp
    layer = [h]  # attention_norm
    for out in (q_out, kv_out, kv_out):
        layer += [h * out] + ([out] if model.qkv_bias else [])
    layer += [q_out * h, h]  # wo, ffn_norm
    layers = [layer + [h * ffn, ffn * h, h * ffn] for _ in range(model.num_layers)]  # w1, w2, w3
    if is_moe(model):
        layers = [layer + sparse_ffn_sizes(model, ep) if model.is_sparse_layer(i) else sizes
                  for i, sizes in enumerate(layers)]
    return [vocab_part] + [n for sizes in layers for n in sizes] + [h] + ([] if model.tie_embeddings else [vocab_part])


def parameters_per_device(model: Any, tp: int = 1, ep: int = 1) -> int:
    """Parameters one device holds (sum of `parameter_sizes`); equals models.llama.count_params at tp=ep=1."""
    return sum(parameter_sizes(model, tp, ep))


def zero_degree(lay: Layout) -> int:
    """Ranks a ZeRO stage shards over: data x context parallel (the ranks holding one TP rank's identical
    parameters; Megatron's distributed optimizer, parallel/zero.py)."""
    return lay.data_parallel_degree * lay.context_parallel_degree


def sharded_elements(model: Any, tp: int, dp: int, active: bool, ep: int = 1) -> int:
    """Elements of a per-parameter state one rank keeps: sum of ceil(n/dp) over the parameter tensors when
    sharded (each tensor padded to a multiple of dp, as parallel/zero.py does; expert tensors over dp/ep ranks,
    plan_moe.zero_sharded_elements), else every element."""
    sizes = parameter_sizes(model, tp, ep)
    return zero_sharded_elements(model, sizes, dp, ep) if active else sum(sizes)


def lora_sizes(model: Any, rank: int, targets: tuple) -> list[int]:
    """Element counts of the LoRA adapters (A: r x in, B: out x r per adapted projection and layer)."""
    hd, h, ffn = model.head_dim, model.dim, model.ffn_hidden_dim
    q_out, kv_out = model.num_heads * hd, model.num_kv_heads * hd
    shapes = {"wq": (h, q_out), "wk": (h, kv_out), "wv": (h, kv_out), "wo": (q_out, h), "w1": (h, ffn),
              "w2": (ffn, h), "w3": (h, ffn)}
    per_layer = [n for target in targets for n in (rank * shapes[target][0], shapes[target][1] * rank)]
    return per_layer * model.num_layers


def lora_state_terms(lay: Layout) -> list[Term]:
    """LoRA: frozen base weights in the parameter dtype, plus fp32 adapters with their gradients and AdamW
    moments (Hu et al. 2021; the optimizer sees only the adapters)."""
    base = parameters_per_device(lay.model, lay.tensor_parallel_degree, lay.expert_parallel_degree)
    a = sum(lora_sizes(lay.model, lay.lora_rank, lay.lora_targets))
    pb = lay.param_bytes
    terms = [Term("parameters (frozen base)", base * pb, f"P * {pb} B", "ZeRO sec. 3.1"),
             Term("LoRA adapters", a * 4, "A * 4 B, A = sum r * (in + out) over adapted projections", "Hu et al. 2021"),
             Term("gradients", a * 4, "A * 4 B (adapters only)", "Hu et al. 2021", "backward end")]
    if lay.grad_accum_steps > 1:
        terms.append(Term("grad accumulation buffer", a * 4, "A * 4 B", "trainer: the running sum"))
    terms.append(Term("optimizer state (AdamW m, v)", a * 8 + 4, "A * 8 B + 4 B step", "ZeRO sec. 3.1"))
    return terms


def model_state_terms(lay: Layout) -> list[Term]:
    """Parameters, master weights, AdamW moments (ZeRO paper, sec. 3.1, 5), the accumulation buffer, and the
    gradients in the phases where they exist (`gradient_terms`); with LoRA, `lora_state_terms`."""
    if lay.lora_rank > 0:
        return lora_state_terms(lay)
    t, d, z = lay.tensor_parallel_degree, zero_degree(lay), lay.zero_stage
    p = parameters_per_device(lay.model, t, lay.expert_parallel_degree)
    pb = lay.param_bytes
    opt_n = sharded_elements(lay.model, t, d, z >= 1, lay.expert_parallel_degree)
    zero = "ZeRO (Rajbhandari et al. 2020) sec. 5"
    terms = [Term("parameters", p * pb, f"P * {pb} B ({'bf16' if pb == 2 else 'fp32'})", "ZeRO sec. 3.1")]
    if pb != 4:
        terms.append(Term("fp32 master weights", opt_n * 4, f"{'sum ceil(n/d)' if z else 'P'} * 4 B",
                          zero + " stage 1" if z else "ZeRO sec. 3.1 (mixed-precision Adam)"))
    terms.append(Term("optimizer state (AdamW m, v)", opt_n * 8 + 4,
                      f"{'sum ceil(n/d)' if z else 'P'} * 8 B + 4 B step",
                      zero + " stage 1" if z else "ZeRO sec. 3.1"))
    return terms + gradient_terms(lay)


def gradient_terms(lay: Layout) -> list[Term]:
    """Gradients by phase. The backward graph returns one micro-batch's full gradient (P * pb, at the end of the
    backward). ZeRO-2 reduce-scatters it inside that graph (train/step.py), so only float32 shards,
    S = 4 * sum ceil(n/d), leave it and accumulate (ZeRO sec. 5, P_os+g); stages 0/1 accumulate full gradients
    (the new sum is written beside the old one and the micro-batch's gradients). The reduce-scatters are chained
    in the backward's order (parallel/zero.py), so a scheduler may free each full gradient early; not counted
    (unmeasured): the whole gradient is planned at the end of the backward."""
    t, d, z = lay.tensor_parallel_degree, zero_degree(lay), lay.zero_stage
    p, pb = parameters_per_device(lay.model, t, lay.expert_parallel_degree), lay.param_bytes
    shards = 4 * sharded_elements(lay.model, t, d, True, lay.expert_parallel_degree)
    n_max = max(parameter_sizes(lay.model, t, lay.expert_parallel_degree))
    many = lay.grad_accum_steps > 1
    zero = "ZeRO (Rajbhandari et al. 2020) sec. 5 stage 2 (gradient partition)"
    terms = [Term("gradients", p * pb, f"P * {pb} B (one micro-batch, returned by the backward graph)",
                  "ZeRO sec. 3.1", "backward end")]
    if z >= 2:
        terms.append(Term("gradient shards of the micro-batch", shards + n_max * pb,
                          f"4 B * sum ceil(n/d) (reduce-scattered in the backward graph) + n_max * {pb} B padded",
                          zero + "; parallel/zero.py reduce_gradients", "backward end"))
        if many:
            terms.append(Term("grad accumulation buffer", shards, "4 B * sum ceil(n/d) (float32 shards)", zero))
            terms.append(Term("accumulation: new sum of shards", shards, "4 B * sum ceil(n/d)", zero, "accumulation"))
        return terms
    if many:
        terms.append(Term("grad accumulation buffer", p * pb, f"P * {pb} B (running sum)", "trainer.run_step"))
        terms.append(Term("accumulation: gradients and new sum", 2 * p * pb, f"2 * P * {pb} B",
                          "trainer.run_step (acc + grads -> new acc)", "accumulation"))
    return terms


def optimizer_transient_terms(lay: Layout) -> list[Term]:
    """The update phase (after the backward freed the activations): the gradients handed to it (a micro-batch's
    when there is no accumulation: the accumulation buffer is an ALWAYS term), their reduced/scaled copy, and
    the per-tensor optimizer temporaries bounded by the largest tensor (n_max elements): float32 m, v, update
    and new value (16 B per element, of its shard under ZeRO) plus under ZeRO the all-gathered parameter
    (parameter dtype on Ascend, float32 on CPU). optim/adamw.py, parallel/zero.py, train/step.py."""
    sizes = parameter_sizes(lay.model, lay.tensor_parallel_degree, lay.expert_parallel_degree)
    n_max, d, z = max(sizes), zero_degree(lay), lay.zero_stage
    if lay.lora_rank > 0:
        a = sum(lora_sizes(lay.model, lay.lora_rank, lay.lora_targets))
        return [Term("update: gradients and optimizer temporaries", 2 * a * 4 + 16 * a, "2 * A * 4 B + 16 B * A",
                     "optim/adamw.py (adapters only)", "update")]
    p, pb = parameters_per_device(lay.model, lay.tensor_parallel_degree, lay.expert_parallel_degree), lay.param_bytes
    if z >= 2:
        grads = 4 * sharded_elements(lay.model, lay.tensor_parallel_degree, d, True,
                                     lay.expert_parallel_degree)
        held = (1 if lay.grad_accum_steps > 1 else 2) * grads
        what = f"{held // grads} * 4 B * sum ceil(n/d) (shards, scaled copy)"
    else:
        held = (1 if lay.grad_accum_steps > 1 else 2) * p * pb
        what = f"{held // (p * pb)} * P * {pb} B (gradients, reduced copy)"
    gathered = lay.param_bytes if lay.device == "ascend" else 4
    temp = 16 * (-(-n_max // d) if z else n_max) + (n_max * gathered if z else 0)
    return [Term("update: gradients and optimizer temporaries", held + temp,
                 f"{what} + 16 B * {'ceil(n_max/d) + n_max gathered' if z else 'n_max'}",
                 "train/step.py apply; optim/adamw.py, parallel/zero.py (per-tensor update)", "update")]


def communicators(lay: Layout) -> int:
    """HCCL communicators a rank joins: the world group plus one per parallel axis smaller than the world."""
    if lay.world_size <= 1:
        return 0
    axes = (lay.data_parallel_degree, lay.tensor_parallel_degree, lay.context_parallel_degree)
    return 1 + sum(1 for degree in axes if 1 < degree < lay.world_size)


def overhead_terms(lay: Layout, subtotal: float) -> list[Term]:
    """HCCL buffers (Ascend only, outside the pool) and the stated fragmentation headroom on the pool's peak."""
    terms = []
    if lay.device == "ascend":
        count = communicators(lay)
        terms.append(Term("communication buffers", count * 2 * lay.hccl_buffsize_mb * MIB,
                          f"{count} communicators * 2 * HCCL_BUFFSIZE ({lay.hccl_buffsize_mb} MB)",
                          "CANN HCCL_BUFFSIZE docs: 2 * HCCL_BUFFSIZE per communicator, outside the pool",
                          OUTSIDE_POOL))
    terms.append(Term("fragmentation headroom", FRAGMENTATION_FRACTION * subtotal,
                      f"{FRAGMENTATION_FRACTION:.0%} of the pool's peak", "stated allowance (not measured)"))
    return terms


CPU_NOTE = ("runtime is not Ascend: this planner models Ascend (910B) device memory only, so it gives no verdict "
            "here. On CPU, graph mode keeps a buffer for every intermediate of a compiled graph (several times the "
            "activations above; recompute saves nothing) on top of ~0.6 GiB of framework baseline (peak RSS of "
            "the smallest run measured in the planner review of issue 23, table T3)")


def plan_memory(lay: Layout, device_memory_gib: Optional[float], pool_cap: Optional[str],
                terms: Optional[list[Term]] = None) -> MemoryPlan:
    """The per-device MemoryPlan. device_memory_gib: one device's memory (None: undeclared); pool_cap:
    MindSpore's max_device_memory string, applied on Ascend only; terms: the model's terms when they are not the
    LLM's (plan_vision.py). Off Ascend there is no budget (no verdict: the model is Ascend's) and a note says so.
    Raises ConfigError on a bad pool string."""
    from ascend_llm.parallel.plan_activations import activation_terms

    if terms is None:
        moe = [Term(*term) for term in moe_activation_terms(lay)]
        terms = model_state_terms(lay) + activation_terms(lay) + moe + optimizer_transient_terms(lay)
    draft = MemoryPlan(terms, None, None)
    terms += overhead_terms(lay, draft.in_pool_bytes)
    notes = []
    if lay.device != "ascend":
        notes.append(CPU_NOTE)
        return MemoryPlan(terms, None, None, notes)
    pool = parse_memory_size(pool_cap) if pool_cap is not None else None
    device = device_memory_gib * GIB if device_memory_gib is not None else None
    if pool is not None and device is not None and pool > device:
        notes.append(f"runtime.max_device_memory={pool_cap} exceeds cluster.device_memory_gib={device_memory_gib}")
    return MemoryPlan(terms, device, pool, notes)
