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
  section 4 (every tensor kept for the backward pass, per layer; sequence parallel divides the norm/residual
  terms by t; selective recompute drops the attention-core terms; full recompute keeps each layer's input
  plus one layer's working set; the output layer keeps fp32 logits, 4sbV/t). The per-tensor list is redone
  for this toolkit's Llama layer (RMSNorm, GQA, SwiGLU, float32 residual stream), see `layer_activation_terms`.
- Naive attention keeps the a*s*s softmax probabilities (float32 here: softmax stays float32); segmented
  and fused attention (FlashAttention, Dao 2022) keep the output and the log-sum-exp (4 bytes per head per
  query) instead.
- Communication buffers: CANN HCCL_BUFFSIZE documentation: each communicator owns 2 * HCCL_BUFFSIZE MB
  (send and receive), outside MindSpore's pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ascend_llm.errors import ConfigError

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Stated fragmentation headroom: the caching pool cannot pack tensors perfectly; planned as this fraction of
# the sum of every other term (the figure MindSpore/PyTorch practitioners allow; not measured here).
FRAGMENTATION_FRACTION = 0.10


@dataclass(frozen=True)
class Term:
    """One memory term: bytes per device, the formula that gave it, where the formula comes from."""

    name: str
    bytes: float
    formula: str
    source: str

    @property
    def gib(self) -> float:
        """The term in GiB (bytes / 2**30)."""
        return self.bytes / GIB


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


@dataclass
class MemoryPlan:
    """Terms plus the budget. Budget = min(cluster.device_memory_gib, MindSpore pool cap) on Ascend; the
    HCCL buffers live outside the pool, so they are compared with the device memory."""

    terms: list[Term]
    device_bytes: Optional[float]
    pool_bytes: Optional[float]
    notes: list[str] = field(default_factory=list)

    @property
    def in_pool_bytes(self) -> float:
        """Bytes inside MindSpore's pool: every term but the HCCL communication buffers."""
        return sum(t.bytes for t in self.terms if t.name != "communication buffers")

    @property
    def total_bytes(self) -> float:
        """Bytes of all terms per device, communication buffers included."""
        return sum(t.bytes for t in self.terms)

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


def kv_heads_per_device(model: Any, tp: int) -> int:
    """KV heads a tensor-parallel rank holds: split when tp divides them, else one (replicated) head."""
    return max(model.num_kv_heads // tp, 1)


def parameter_sizes(model: Any, tp: int = 1) -> list[int]:
    """Element count of every parameter tensor one device holds, in the model's order. Column/row-parallel
    projections, the vocab-parallel embedding and output head are divided by tp; norm weights are replicated;
    wk/wv hold `kv_heads_per_device` heads (one replicated head when tp > num_kv_heads)."""
    hd, h = model.head_dim, model.dim
    q_out, kv_out, ffn = model.num_heads * hd // tp, kv_heads_per_device(model, tp) * hd, model.ffn_hidden_dim // tp
    vocab_part = model.vocab_size * h // tp
    layer = [h]  # attention_norm
    for out in (q_out, kv_out, kv_out):
        layer += [h * out] + ([out] if model.qkv_bias else [])
    layer += [q_out * h, h, h * ffn, ffn * h, h * ffn]  # wo, ffn_norm, w1, w2, w3
    return [vocab_part] + layer * model.num_layers + [h] + ([] if model.tie_embeddings else [vocab_part])


def parameters_per_device(model: Any, tp: int = 1) -> int:
    """Parameters one device holds (sum of `parameter_sizes`); equals models.llama.count_params at tp=1."""
    return sum(parameter_sizes(model, tp))


def zero_degree(lay: Layout) -> int:
    """Ranks a ZeRO stage shards over: data x context parallel (the ranks holding one TP rank's identical
    parameters; Megatron's distributed optimizer, parallel/zero.py)."""
    return lay.data_parallel_degree * lay.context_parallel_degree


def sharded_elements(model: Any, tp: int, dp: int, active: bool) -> int:
    """Elements of a per-parameter state one rank keeps: sum of ceil(n/dp) over the parameter tensors when
    sharded (each tensor padded to a multiple of dp, as parallel/zero.py does), else every element."""
    sizes = parameter_sizes(model, tp)
    return sum(-(-n // dp) for n in sizes) if active else sum(sizes)


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
    base = parameters_per_device(lay.model, lay.tensor_parallel_degree)
    a = sum(lora_sizes(lay.model, lay.lora_rank, lay.lora_targets))
    pb = lay.param_bytes
    terms = [Term("parameters (frozen base)", base * pb, f"P * {pb} B", "ZeRO sec. 3.1"),
             Term("LoRA adapters", a * 4, "A * 4 B, A = sum r * (in + out) over adapted projections", "Hu et al. 2021"),
             Term("gradients", a * 4, "A * 4 B (adapters only)", "Hu et al. 2021")]
    if lay.grad_accum_steps > 1:
        terms.append(Term("grad accumulation buffer", a * 4, "A * 4 B", "trainer: acc + grads coexist"))
    terms.append(Term("optimizer state (AdamW m, v)", a * 8 + 4, "A * 8 B + 4 B step", "ZeRO sec. 3.1"))
    return terms


def model_state_terms(lay: Layout) -> list[Term]:
    """Parameters, gradients, accumulation buffer, master weights, AdamW moments (ZeRO paper, sec. 3.1, 5);
    with LoRA, `lora_state_terms`."""
    if lay.lora_rank > 0:
        return lora_state_terms(lay)
    t, d, z = lay.tensor_parallel_degree, zero_degree(lay), lay.zero_stage
    p = parameters_per_device(lay.model, t)
    pb = lay.param_bytes
    opt_n = sharded_elements(lay.model, t, d, z >= 1)
    zero = "ZeRO (Rajbhandari et al. 2020) sec. 5"
    terms = [
        Term("parameters", p * pb, f"P * {pb} B ({'bf16' if pb == 2 else 'fp32'})", "ZeRO sec. 3.1"),
        Term("gradients", p * pb, f"P * {pb} B (backward output, parameter dtype)",
             "ZeRO sec. 3.1; the compiled backward returns every gradient at once, so stage 2's 2P/d needs "
             "bucketed reduce-scatter inside the backward, which this step does not do"),
    ]
    if lay.grad_accum_steps > 1:
        acc_n = sharded_elements(lay.model, t, d, z >= 2)
        terms.append(Term("grad accumulation buffer", acc_n * pb,
                          f"{'sum ceil(n/d)' if z >= 2 else 'P'} * {pb} B (running sum beside the new gradients)",
                          zero + " stage 2 (gradient partition)" if z >= 2 else "trainer: acc + grads coexist"))
    if pb != 4:
        terms.append(Term("fp32 master weights", opt_n * 4, f"{'sum ceil(n/d)' if z else 'P'} * 4 B",
                          zero + " stage 1" if z else "ZeRO sec. 3.1 (mixed-precision Adam)"))
    terms.append(Term("optimizer state (AdamW m, v)", opt_n * 8 + 4,
                      f"{'sum ceil(n/d)' if z else 'P'} * 8 B + 4 B step",
                      zero + " stage 1" if z else "ZeRO sec. 3.1"))
    return terms


def optimizer_transient_term(lay: Layout, activation_bytes: float) -> Term:
    """Temporaries of the optimizer step, which works one parameter tensor at a time (optim/adamw.py,
    parallel/zero.py), so they are bounded by the largest tensor (n_max elements, usually the embedding):
    float32 m, v, update and new value of it (16 B per element, of its shard under ZeRO), plus under ZeRO the
    all-gathered parameter (parameter dtype on Ascend, float32 on CPU) and at stage 2 its padded gradient.
    The step runs after the backward has freed the activations, so only the part above them adds to the peak:
    max(0, T - activations)."""
    sizes = parameter_sizes(lay.model, lay.tensor_parallel_degree)
    n_max, d, z = max(sizes), zero_degree(lay), lay.zero_stage
    name = "optimizer step transients above activations"
    if not z:
        return Term(name, max(0.0, 16 * n_max - activation_bytes), "max(0, 16 B * n_max - activations)",
                    "train/optim.py (per-tensor update, after the backward)")
    gathered = lay.param_bytes if lay.device == "ascend" else 4
    extra = n_max * lay.param_bytes if z >= 2 else 0
    total = 16 * -(-n_max // d) + n_max * gathered + extra
    return Term(name, max(0.0, total - activation_bytes),
                f"max(0, 16 B * ceil(n_max/d) + n_max * {gathered} B gathered"
                + (f" + n_max * {lay.param_bytes} B padded gradient" if z >= 2 else "") + " - activations)",
                "parallel/zero.py (per-tensor reduce-scatter, update, all-gather, after the backward)")


def layer_activation_terms(lay: Layout) -> dict[str, float]:
    """Bytes one decoder layer keeps for its backward at one micro-batch, by tensor (Korthikanti et al.
    2022 sec. 4 method applied to this Llama layer). Tokens per device: n = b*s/c. r = 4 (float32 residual).

    - norm inputs (residual stream, float32): 2 * 4h * n, / t only with sequence parallel
    - norm outputs (GEMM inputs): 2 * e*h * n, / t only with sequence parallel
    - q, k, v after RoPE: e*(h/t + 2*h_kv_dev) * n
    - attention output (wo input): e*h/t * n
    - log-sum-exp (segmented/fused): 4 * a/t * n
    - softmax probabilities (naive): 4 * a/t * s * n (each local query against all s keys)
    - gathered K, V (context parallel): 2 * e*h_kv_dev * b*s
    - SwiGLU: w1 out, w3 out, silu out, product = 4 * e*F/t * n
    """
    m, t, c = lay.model, lay.tensor_parallel_degree, lay.context_parallel_degree
    n = lay.micro_batch * lay.seq_len / c
    e, h = lay.compute_bytes, m.dim
    kv = kv_heads_per_device(m, t) * m.head_dim
    sp = t if lay.sequence_parallel else 1
    heads = m.num_heads / t
    out = {
        "norm inputs": 2 * 4 * h * n / sp,
        "norm outputs": 2 * e * h * n / sp,
        "q, k, v": e * (h / t + 2 * kv) * n,
        "attention output": e * h / t * n,
        "swiglu": 4 * e * m.ffn_hidden_dim / t * n,
    }
    if lay.attention_backend == "naive":
        out["softmax probabilities"] = 4 * heads * lay.seq_len * n
    else:
        out["log-sum-exp"] = 4 * heads * n
    if c > 1:
        out["gathered k, v"] = 2 * e * kv * lay.micro_batch * lay.seq_len
    return out


def activation_terms(lay: Layout) -> list[Term]:
    """Activations of one micro-batch by recompute mode, plus the output layer's logits."""
    m, t, c = lay.model, lay.tensor_parallel_degree, lay.context_parallel_degree
    n = lay.micro_batch * lay.seq_len / c
    per_layer = layer_activation_terms(lay)
    layer_bytes = sum(per_layer.values())
    kor = "Korthikanti et al. 2022"
    if lay.recompute == "full":
        kept = 4 * m.dim * n / (t if lay.sequence_parallel else 1)
        terms = [Term("activations: layer inputs (full recompute)", m.num_layers * kept,
                      "L * 4h * b*s/c (float32 residual" + (", / t with SP)" if lay.sequence_parallel else ")"),
                      kor + " sec. 4.1 (full checkpointing keeps each layer's input)"),
                 Term("activations: one layer recomputed", layer_bytes,
                      "one layer's working set, rebuilt during its backward", kor + " sec. 4.1")]
    else:
        dropped = per_layer.get("softmax probabilities", 0.0) if lay.recompute == "selective" else 0.0
        what = ", ".join(k for k in per_layer if not (dropped and k == "softmax probabilities"))
        terms = [Term(f"activations: {m.num_layers} layers ({lay.attention_backend} attention)",
                      m.num_layers * (layer_bytes - dropped), f"L * ({what})",
                      kor + (" sec. 5 (selective: attention core recomputed)" if lay.recompute == "selective"
                             else " sec. 4"))]
    terms.append(Term("logits and their gradient (fp32)", 2 * 4 * m.vocab_size / t * n, "2 * 4 * V/t * b*s/c",
                      kor + " sec. 4.3 (4sbV/t fp32 logits) + the same again for the loss gradient"))
    return terms


def communicators(lay: Layout) -> int:
    """HCCL communicators a rank joins: the world group plus one per parallel axis smaller than the world."""
    if lay.world_size <= 1:
        return 0
    axes = (lay.data_parallel_degree, lay.tensor_parallel_degree, lay.context_parallel_degree)
    return 1 + sum(1 for degree in axes if 1 < degree < lay.world_size)


def overhead_terms(lay: Layout, subtotal: float) -> list[Term]:
    """HCCL buffers (Ascend only) and the stated fragmentation headroom."""
    terms = []
    if lay.device == "ascend":
        count = communicators(lay)
        terms.append(Term("communication buffers", count * 2 * lay.hccl_buffsize_mb * MIB,
                          f"{count} communicators * 2 * HCCL_BUFFSIZE ({lay.hccl_buffsize_mb} MB)",
                          "CANN HCCL_BUFFSIZE docs: 2 * HCCL_BUFFSIZE per communicator, outside the pool"))
    terms.append(Term("fragmentation headroom", FRAGMENTATION_FRACTION * subtotal,
                      f"{FRAGMENTATION_FRACTION:.0%} of model states + activations", "stated allowance (not measured)"))
    return terms


def plan_memory(lay: Layout, device_memory_gib: Optional[float], pool_cap: Optional[str]) -> MemoryPlan:
    """The per-device MemoryPlan. device_memory_gib: one device's memory (None: undeclared); pool_cap:
    MindSpore's max_device_memory string, applied on Ascend only. Raises ConfigError on a bad pool string."""
    activations = activation_terms(lay)
    terms = model_state_terms(lay) + activations
    terms.append(optimizer_transient_term(lay, sum(t.bytes for t in activations)))
    terms += overhead_terms(lay, sum(t.bytes for t in terms))
    pool = parse_memory_size(pool_cap) if (pool_cap is not None and lay.device == "ascend") else None
    device = device_memory_gib * GIB if device_memory_gib is not None else None
    notes = []
    if pool is not None and device is not None and pool > device:
        notes.append(f"runtime.max_device_memory={pool_cap} exceeds cluster.device_memory_gib={device_memory_gib}")
    if lay.device != "ascend":
        notes.append("not an Ascend recipe: the MindSpore pool cap and HCCL buffers do not apply; on CPU graph "
                     "mode keeps every intermediate and recompute saves nothing (probes README)")
    return MemoryPlan(terms, device, pool, notes)
