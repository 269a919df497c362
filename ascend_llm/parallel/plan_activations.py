"""Activation bytes of a training step, per tensor the toolkit's Llama layer keeps for its backward (pure Python).

Method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4 (every
tensor kept for the backward, per layer), redone for this toolkit's layer and dtype flow on Ascend (issue 23):
- a `PrecisionDense` hands its GEMM's output onward in the compute dtype (e bytes; precision/policy.py), so the
  next GEMM input, q/k/v and SwiGLU's intermediates are kept once in e bytes;
- the residual stream stays float32: RMSNorm's backward keeps its float32 input (4h per norm), and the GEMMs keep
  one e-byte cast of each norm output (graph CSE shares it between wq/wk/wv and between w1/w3);
- RoPE's backward keeps only cos/sin (models/llama.py RopeKernel); SwiGLU keeps w1's output (SiLU's backward
  needs its input), the SiLU output, w3's output and the product (4eF);
- fused: FlashAttentionScore keeps q, k, v (GQA: not repeated), its output and softmax_max/softmax_sum, float32
  (B, N, S, 8) each: 64 bytes per head per query token (MindSpore `ops.flash_attention_score` /
  `ring_attention_update` docs); float32 inputs run in bf16 (attention/fused.py);
- segmented: q, k, v, its output and the float32 log-sum-exp (4 bytes per head per query; attention/segmented.py);
- naive: `NaiveAttentionKernel` keeps q, k, v and the keep mask only and recomputes the (B, H, Sq, Sk) float32
  probabilities in its backward (attention/naive.py); one layer's s x s working set exists at a time;
- the attention output goes through Transpose (a copy in graph mode) to wo, which keeps that copy (eh);
- `param_dtype=float32` with e < 4: each MatMul keeps the e-byte cast of its weight (per kept layer, plus the
  output head), none when the parameters are already in the compute dtype.
Checked against a per-op ledger of saved tensors (tests/unit/test_plan_activations.py) for 48 configurations
(s 1024/4096, b 1/2, fp32/bf16, naive/fused, recompute none/selective/full): equal in all.
"""

from __future__ import annotations

from typing import Any

from ascend_llm.parallel.plan_terms import Term, kv_heads_per_device

KOR = "Korthikanti et al. 2022"
FA_STATS_BYTES_PER_HEAD = 64  # softmax_max + softmax_sum: 2 x float32 x 8 per head and query token
NAIVE_WORKING_FP32 = 4  # float32 (B, H, Sq, Sk) tensors live at once in NaiveAttentionKernel's backward (estimate)


def activation_bytes(lay: Any) -> int:
    """Bytes of one kept activation element: the compute dtype on Ascend; float32 elsewhere (the emulated bf16
    GEMM returns float32)."""
    return lay.compute_bytes if lay.device == "ascend" else 4


def kernel_bytes(lay: Any) -> int:
    """Bytes per element of FlashAttentionScore's operands: fp16/bf16; float32 inputs run in bf16."""
    return min(activation_bytes(lay), 2)


def layer_linear_elements(model: Any, tp: int) -> int:
    """Weight elements of one layer's seven projections on one tensor-parallel rank."""
    hd, h = model.head_dim, model.dim
    q_out, kv_out, ffn = model.num_heads * hd // tp, kv_heads_per_device(model, tp) * hd, model.ffn_hidden_dim // tp
    return h * (q_out + 2 * kv_out) + q_out * h + 3 * h * ffn


def weight_copy_bytes(lay: Any) -> int:
    """e bytes per weight element when float32 parameters feed bf16/fp16 GEMMs on Ascend, else 0."""
    e = activation_bytes(lay)
    return e if (lay.device == "ascend" and lay.param_bytes == 4 and e < 4) else 0


def layer_activation_terms(lay: Any) -> dict[str, float]:
    """Bytes one decoder layer keeps for its backward at one micro-batch, by tensor (module doc). Tokens per
    device n = b*s/c; e = `activation_bytes`; sequence parallel divides the norm inputs by t (the GEMMs keep the
    all-gathered norm outputs).

    - norm inputs (float32 residual): 2 * 4h * n;  norm outputs (GEMM inputs): 2 * e*h * n
    - q, k, v: e*(h/t + 2*h_kv_dev) * n (fused with e = 4: in the kernel's bf16)
    - attention output (kernel): fused/segmented keep their output, e*h/t * n (bf16 for fused); fused takes
      and returns (B, S, N, D), so wo keeps that same tensor
    - attention output (wo input): e*h/t * n, the transposed copy wo keeps (naive/segmented), or the float32
      cast of the fused output when e = 4
    - softmax statistics: fused 64 * a/t * n, segmented 4 * a/t * n; naive keeps none
    - swiglu: 4 * e*F/t * n;  gathered k, v (context parallel): 2 * e*h_kv_dev * b*s
    - weight copies (float32 parameters, e < 4): e * one layer's projection weights
    """
    m, t, c = lay.model, lay.tensor_parallel_degree, lay.context_parallel_degree
    n = lay.micro_batch * lay.seq_len / c
    e, h = activation_bytes(lay), m.dim
    kv = kv_heads_per_device(m, t) * m.head_dim
    sp = t if lay.sequence_parallel else 1
    heads = m.num_heads / t
    qkv_bytes = kernel_bytes(lay) if lay.attention_backend == "fused" else e
    out = {
        "norm inputs (float32 residual)": 2 * 4 * h * n / sp,
        "norm outputs (GEMM inputs)": 2 * e * h * n,  # with SP: the all-gathered sequence (parallel/tp.py TPNorm)
        "q, k, v": qkv_bytes * (h / t + 2 * kv) * n,
    }
    if lay.attention_backend == "fused":  # (B, S, N, D) in and out: wo keeps the kernel's output itself
        out["attention output (kernel)"] = kernel_bytes(lay) * h / t * n
        out["softmax statistics"] = FA_STATS_BYTES_PER_HEAD * heads * n
        if kernel_bytes(lay) != e:  # float32 compute: the output cast back to float32 is wo's input
            out["attention output (wo input)"] = e * h / t * n
    else:  # BNSD: wo keeps the transposed copy of the output
        if lay.attention_backend != "naive":
            out["attention output (kernel)"] = e * h / t * n
            out["softmax statistics"] = 4 * heads * n
        out["attention output (wo input)"] = e * h / t * n
    out["swiglu"] = 4 * e * m.ffn_hidden_dim / t * n
    if c > 1:
        out["gathered k, v"] = 2 * e * kv * lay.micro_batch * lay.seq_len
    copies = weight_copy_bytes(lay)
    if copies:
        out["weight copies"] = copies * layer_linear_elements(m, t)
    return out


def selective_dropped(lay: Any, per_layer: dict[str, float]) -> float:
    """Bytes selective recompute (the `core_attention` cell recomputed: its inputs and output are kept, what
    it keeps inside is rebuilt) removes from one layer: the statistics; the segmented kernel's own output; for
    fused with e = 4 the bf16 casts of q, k, v and the bf16 output, while the float32 q, k, v stay."""
    dropped = per_layer.get("softmax statistics", 0.0)
    if lay.attention_backend == "segmented":
        dropped += per_layer["attention output (kernel)"]
    e, kb = activation_bytes(lay), kernel_bytes(lay)
    if lay.attention_backend == "fused" and e != kb:
        dropped += per_layer["attention output (kernel)"] + per_layer["q, k, v"] * (1 - e / kb)
    return dropped


def naive_terms(lay: Any) -> tuple[float, float]:
    """(keep mask bytes, one layer's s x s working set bytes) of naive attention: the bool (Sq, Sk) mask per
    micro-batch row (shared by the layers), and NAIVE_WORKING_FP32 float32 plus one e-byte (B, H/t, Sq, Sk)."""
    m, t, c = lay.model, lay.tensor_parallel_degree, lay.context_parallel_degree
    n = lay.micro_batch * lay.seq_len / c
    scores = m.num_heads / t * lay.seq_len * n
    return n * lay.seq_len, (4 * NAIVE_WORKING_FP32 + activation_bytes(lay)) * scores


def activation_terms(lay: Any) -> list[Term]:
    """Activation terms by recompute mode, with the phase of the step where each is alive at its largest:
    "backward start" (everything the forward kept, the logits and their gradient) and "backward end" (the one
    layer still to run its backward beside the whole gradient)."""
    m, t, c = lay.model, lay.tensor_parallel_degree, lay.context_parallel_degree
    n = lay.micro_batch * lay.seq_len / c
    per_layer = layer_activation_terms(lay)
    layer_bytes = sum(per_layer.values())
    start, end = "backward start", "backward end"
    terms = []
    if lay.recompute == "full":
        kept = 4 * m.dim * n / (t if lay.sequence_parallel else 1)
        terms.append(Term("activations: layer inputs (full recompute)", m.num_layers * kept,
                          "L * 4h * b*s/c (float32 residual" + (", / t with SP)" if lay.sequence_parallel else ")"),
                          KOR + " sec. 4.1 (full checkpointing keeps each layer's input)", start))
        terms.append(Term("activations: one layer recomputed", layer_bytes,
                          "one layer's working set, rebuilt during its backward: " + ", ".join(per_layer),
                          KOR + " sec. 4.1", start))
    else:
        dropped = selective_dropped(lay, per_layer) if lay.recompute == "selective" else 0.0
        terms.append(Term(f"activations: {m.num_layers} layers ({lay.attention_backend} attention)",
                          m.num_layers * (layer_bytes - dropped), f"L * ({', '.join(per_layer)})"
                          + (" - attention core (selective)" if dropped else ""),
                          KOR + (" sec. 5 (selective: attention core recomputed)" if lay.recompute == "selective"
                                 else " sec. 4"), start))
    if lay.attention_backend == "naive":
        mask, working = naive_terms(lay)
        terms.append(Term("naive attention: keep mask", mask, "1 B * b*s/c * s (bool, shared by the layers)",
                          "attention/masks.py keep_mask", start))
        terms.append(Term("naive attention: one layer's s x s working set", working,
                          f"({4 * NAIVE_WORKING_FP32} + e) * a/t * s * b*s/c (recomputed probabilities, dP, dS)",
                          "attention/naive.py NaiveAttentionKernel.bprop (estimate)", start))
    terms.append(Term("logits and their gradient (fp32)", 2 * 4 * m.vocab_size / t * n, "2 * 4 * V/t * b*s/c",
                      KOR + " sec. 4.3 (4sbV/t fp32 logits, kept by the fused cross-entropy) + its gradient",
                      start))
    if lay.reference_forward:  # after the policy's forward, before its backward; freed before the backward
        terms.append(Term("reference forward (adapters off, nothing kept)", layer_bytes + 2 * 4 * m.vocab_size / t * n,
                          "one layer's tensors (its working set, freed layer by layer) + 2 * 4 * V/t * b*s/c "
                          "(float32 logits and log-softmax)", "train/preference.py (stop_gradient forward; "
                          "counted at the backward's start: an upper bound)", start))
    if weight_copy_bytes(lay) and not m.tie_embeddings:
        terms.append(Term("output-head weight copy", weight_copy_bytes(lay) * m.vocab_size * m.dim / t,
                          "e * V/t * h (float32 head weight cast for the bf16 GEMM)", "precision/policy.py", start))
    last = layer_bytes + (naive_terms(lay)[1] if lay.attention_backend == "naive" else 0.0)
    terms.append(Term("activations: the last layer in its backward", last,
                      "one layer's kept tensors (and naive's s x s working set) beside the finished gradients",
                      KOR + " sec. 4", end))
    return terms
