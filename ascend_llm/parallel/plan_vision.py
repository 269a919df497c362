"""Planner terms of the multimodal objectives (issue 24): the dual encoder of objective=contrastive and the
LLaVA-style vision-language model of objective=caption (pure arithmetic over the configs; a pretrained tower's
config is read from its directory or run).

Symbols per sample: T tokens of a tower (ViT: patches + the class token under CLIP pooling; text tower: its
max_seq_len, captions are padded to it), h its width, a its heads, F its MLP width, L its layers, C S^2 the pixels
of an image; b images (and captions) per data-parallel rank and micro-batch, N = b * dp the contrastive batch when
objective.multimodal.gather_features (else b), D the shared space. The towers, projections and the projector
compute and keep float32 (models/vision.py, models/clip.py, models/vlm.py): 4 bytes per element.

Activations one encoder block keeps for its backward (models/vision.py EncoderBlock, the Korthikanti et al. 2022
sec. 4 method of listing each tensor the backward reads, redone for these cells; not checked against a per-op
ledger): each of the two composed LayerNorms keeps its centred input, the normalised value (for its weight's
gradient) and its output (the next GEMM's input), 3Th each; q, k, v 3Th; the softmax output aT^2; the attention
output wo reads Th; the MLP keeps w1's output and the activation's output, 2TF, plus sigmoid(1.702x) for
quick_gelu, 3TF. One block: 10Th + aT^2 + kTF (k = 3 quick_gelu, else 2). A frozen tower (caption stage 1; the
aligner's train_towers=false) keeps nothing: no parameter or input of it needs a gradient, so only its output,
the next trained cell's input, is kept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ascend_llm.parallel.plan_terms import ALWAYS, Term

F32 = 4
KOR = "Korthikanti et al. 2022 sec. 4 (method), plan_vision.py module doc"


def encoder_block_sizes(h: int, ffn: int) -> list[int]:
    """Parameter element counts of one EncoderBlock: two LayerNorms, four biased h x h projections, the MLP."""
    return [h, h] + [h * h, h] * 4 + [h, h] + [h * ffn, ffn, ffn * h, h]


def vision_parameter_sizes(v: Any) -> list[int]:
    """Element counts of a VisionTower's parameters (models/vision.py): patch embedding (a Dense over C p^2, with
    SigLIP's bias), CLIP's class embedding, positions, the input LayerNorm (pre_norm), the blocks, post_norm and
    SigLIP's attention-pooling head (probe, attention, LayerNorm, MLP)."""
    h = v.dim
    sizes = [v.num_channels * v.patch_size**2 * h] + ([h] if v.patch_bias else [])
    sizes += ([h] if v.pooling == "cls" else []) + [v.num_positions * h] + ([h, h] if v.pre_norm else [])
    sizes += encoder_block_sizes(h, v.ffn_hidden_dim) * v.num_layers + [h, h]
    if v.pooling == "attention":
        sizes += [h] + [h * h, h] * 4 + [h, h] + [h * v.ffn_hidden_dim, v.ffn_hidden_dim, v.ffn_hidden_dim * h, h]
    return sizes


def text_parameter_sizes(t: Any) -> list[int]:
    """Element counts of a CLIP/SigLIP TextTower's parameters (models/clip.py): token and position embeddings,
    the blocks, the final LayerNorm and SigLIP's head (head_dim_out > 0)."""
    h = t.dim
    sizes = [t.vocab_size * h, t.max_seq_len * h] + encoder_block_sizes(h, t.ffn_hidden_dim) * t.num_layers
    return sizes + [h, h] + ([h * t.head_dim_out, t.head_dim_out] if t.head_dim_out else [])


def dual_encoder_parts(cfg: Any, llm_sizes: list[int] | None = None, llm_dim: int = 0) -> dict[str, list[int]]:
    """{part: element counts} of a DualEncoder: "vision tower", "text tower" (llm_sizes for text_tower=llm),
    "projections" (image h_v x D and text x D, with biases when projection_bias) and "logit scale and bias"."""
    text = llm_sizes if llm_sizes is not None else text_parameter_sizes(cfg.text)
    text_out = llm_dim or cfg.text.head_dim_out or cfg.text.dim
    d = cfg.projection_dim
    projections = [cfg.vision.dim * d, text_out * d] + ([d, d] if cfg.projection_bias else []) if d else []
    return {"vision tower": vision_parameter_sizes(cfg.vision), "text tower": text,
            "projections": projections, "logit scale and bias": [1, 1]}


def projector_sizes(vision_dim: int, llm_dim: int, hidden_dim: int = 0) -> list[int]:
    """Element counts of the LLaVA projector w2(gelu(w1 x)) (models/vlm.py Projector; hidden 0 = llm_dim)."""
    hidden = hidden_dim or llm_dim
    return [vision_dim * hidden, hidden, hidden * llm_dim, llm_dim]


def encoder_block_elements(tokens: int, h: int, heads: int, ffn: int, act: str) -> int:
    """Elements one encoder block keeps per sample for its backward: 10Th + aT^2 + kTF (module doc)."""
    return 10 * tokens * h + heads * tokens * tokens + (3 if act == "quick_gelu" else 2) * tokens * ffn


def vision_activation_elements(v: Any) -> int:
    """Elements a trained ViT keeps per image: the patchified pixels (the patch GEMM's input, C S^2), the input
    LayerNorm's 3Th (pre_norm), L blocks, and the pooling: CLIP's post_norm of the class token 3h; SigLIP's
    post_norm 3Th, the probe's k, v 2Th and its softmax aT (the probe's one-token MLP is not counted)."""
    t, h = v.num_positions, v.dim
    out = v.num_channels * v.image_size**2 + (3 * t * h if v.pre_norm else 0)
    out += v.num_layers * encoder_block_elements(t, h, v.num_heads, v.ffn_hidden_dim, v.activation)
    return out + (3 * h if v.pooling == "cls" else 5 * t * h + v.num_heads * t)


def text_activation_elements(t: Any) -> int:
    """Elements a trained CLIP/SigLIP text tower keeps per caption: L blocks at T = max_seq_len and the final
    LayerNorm's 3Th (the embedding gather keeps only the ids)."""
    return t.num_layers * encoder_block_elements(t.max_seq_len, t.dim, t.num_heads, t.ffn_hidden_dim,
                                                 t.activation) + 3 * t.max_seq_len * t.dim


def trained_state_terms(lay: Any, trained: list[int], what: str) -> list[Term]:
    """float32 trained parameters (counted by the caller), their gradient (end of the backward), accumulation
    buffer, AdamW moments and the update's temporaries (2 A 4 B + 16 B n_max, as plan_memory.py) for `trained`."""
    a = sum(trained)
    n_max = max(trained, default=0)
    terms = [Term(f"{what}: AdamW m, v", a * 8 + 4, "A * 8 B + 4 B step", "ZeRO sec. 3.1"),
             Term(f"{what}: gradients", a * F32, "A * 4 B", "ZeRO sec. 3.1", "backward end")]
    if lay.grad_accum_steps > 1:
        terms.append(Term(f"{what}: grad accumulation buffer", a * F32, "A * 4 B", "trainer.run_step"))
    terms.append(Term(f"{what}: update (gradients, temporaries)", 2 * a * F32 + 16 * n_max,
                      "2 * A * 4 B + 16 B * n_max", "train/step.py apply; optim/adamw.py", "update"))
    return terms


def _tower_terms(name: str, b: int, kept: int, out_dim: int, trained: bool, formula: str) -> Term:
    if trained:
        return Term(f"activations: {name} ({b} per rank)", b * kept * F32, f"b * ({formula}) * 4 B", KOR,
                    "backward start")
    return Term(f"activations: {name}, frozen (output only)", b * out_dim * F32, "b * h * 4 B (no gradient "
                "flows into a frozen tower: it keeps nothing)", "plan_vision.py module doc", "backward start")


def contrastive_terms(lay: Any, mm: Any, llm_terms) -> tuple[list[Term], dict[str, int]]:
    """Memory terms of objective=contrastive (before the overhead terms) and {part: parameters}. `llm_terms`:
    (parameter sizes, activation terms of one caption batch at the text tower's width) of the run's LLM, used
    when dual_encoder.text_tower=llm."""
    cfg, b = mm.dual_encoder, lay.micro_batch
    llm = cfg.text_tower == "llm"
    llm_sizes, llm_acts = llm_terms() if llm else (None, [])
    parts = dual_encoder_parts(cfg, llm_sizes, lay.model.dim if llm else 0)
    towers = mm.train_towers
    trained = parts["projections"] + (parts["vision tower"] + parts["text tower"] if towers else [])
    trained += [1] if cfg.loss != "cosine" else []
    trained += [1] if cfg.loss == "siglip" else []
    frozen = sum(n for sizes in parts.values() for n in sizes) - sum(trained)
    terms = [Term("parameters (trained)", sum(trained) * F32, "A * 4 B (float32)", "ZeRO sec. 3.1")]
    if frozen:
        terms.append(Term("parameters (frozen towers)", frozen * F32, "P_frozen * 4 B", "train_towers=false"))
    terms += trained_state_terms(lay, trained, "trained")
    v = cfg.vision
    terms.append(_tower_terms("vision tower", b, vision_activation_elements(v), v.dim, towers,
                              "C S^2 + 3Th + L (10Th + aT^2 + kTF) + pooling"))
    if llm and towers:
        terms += [dataclasses.replace(t, name=t.name.replace("activations:", "text tower (LLM):")) for t in llm_acts]
    else:
        width = lay.model.dim if llm else (cfg.text.head_dim_out or cfg.text.dim)
        terms.append(_tower_terms("text tower", b, text_activation_elements(cfg.text), width, towers,
                                  "L (10Th + aT^2 + kTF) + 3Th"))
    n = b * lay.data_parallel_degree if mm.gather_features else b
    d = cfg.projection_dim or v.dim
    terms.append(Term(f"contrastive batch (N={n}): features, logits", (2 * n * d + 2 * n * n) * F32,
                      "(2 N D + 2 N^2) * 4 B (normalised image and text features; logits and their gradient)",
                      "train/contrastive.py", "backward start"))
    if towers:
        last = max(encoder_block_elements(v.num_positions, v.dim, v.num_heads, v.ffn_hidden_dim, v.activation),
                   0 if llm else encoder_block_elements(cfg.text.max_seq_len, cfg.text.dim, cfg.text.num_heads,
                                                        cfg.text.ffn_hidden_dim, cfg.text.activation))
        terms.append(Term("activations: the last block in its backward", b * last * F32,
                          "b * one block's kept tensors beside the finished gradients", KOR, "backward end"))
    return terms, {name: sum(sizes) for name, sizes in parts.items()} | {"trained": sum(trained)}


def caption_sequence_len(mm: Any, num_image_tokens: int) -> int:
    """Tokens of one caption-objective row (train/caption.py): the prompt with its image placeholders, then
    max_caption_tokens (inputs drop the last of prompt + captions + EOS). The prompt's text is planned at one token
    per UTF-8 byte plus a BOS, an upper bound for a byte-level BPE."""
    text = mm.prompt.replace("<image>", "")
    return len(text.encode()) + 1 + num_image_tokens + mm.max_caption_tokens


def caption_terms(lay: Any, mm: Any, vision: Any, llm_state, llm_acts) -> tuple[list[Term], dict[str, int]]:
    """Memory terms of objective=caption (stage 1; stage 2 with LoRA) and {part: parameters}. vision: the frozen
    tower's VisionConfig; llm_state(lay): the LLM's model-state terms (frozen parameters, or LoRA's);
    llm_acts(lay): its activation terms at the caption sequence length (lay.seq_len set by the caller)."""
    b, tokens = lay.micro_batch, vision.num_patches
    proj = projector_sizes(vision.dim, lay.model.dim, mm.projector_hidden_dim)
    hidden = mm.projector_hidden_dim or lay.model.dim
    tower = sum(vision_parameter_sizes(vision))
    terms = [t for t in llm_state(lay) if lay.lora_rank or t.phase == ALWAYS and t.name == "parameters"]
    if not lay.lora_rank:
        terms = [dataclasses.replace(terms[0], name="parameters (frozen LLM)", formula=terms[0].formula + ", frozen: "
                                     "no gradient, no optimizer state")]
    terms += [Term("parameters (frozen vision tower)", tower * F32, "P_vision * 4 B", "models/vlm.py (frozen)"),
              Term("parameters (projector)", sum(proj) * F32, "P_proj * 4 B", "models/vlm.py Projector")]
    terms += trained_state_terms(lay, proj, "projector")  # with LoRA, beside the adapters' terms (llm_state)
    terms.append(Term("activations: vision tower, frozen (none kept)", 0.0, "stop_gradient: the forward runs "
                      "block by block and frees each (its transient is below the backward's peak)", "models/vlm.py",
                      "backward start"))
    terms.append(Term(f"activations: projector ({b} x {tokens} tokens)",
                      b * tokens * (vision.dim + 2 * hidden) * F32, "b * T' * (h_v + 2 H) * 4 B (w1's input, GELU's "
                      "input and output)", KOR, "backward start"))
    terms += [dataclasses.replace(t, name=t.name.replace("activations:", "LLM activations:")) for t in llm_acts(lay)]
    parts = {"vision tower (frozen)": tower, "projector": sum(proj)}
    return terms, parts


def _opened_config(path: str):
    """The DualEncoderConfig of a CLIP/SigLIP directory or a contrastive run (config files only, no weights)."""
    from pathlib import Path

    from ascend_llm.interop.vision import load_vision_model

    return load_vision_model(Path(path), build=False, weights=False).config


def plan_multimodal(recipe: Any, lay: Any):
    """(MemoryPlan, {part: parameters}) of a recipe with objective.name contrastive or caption: the towers'
    configs from objective.multimodal (pretrained / vision_pretrained read from their directories or runs:
    CheckpointError / InteropError naming the file when unreadable), the run's LLM from `lay.model`."""
    from ascend_llm.parallel.plan_activations import activation_terms
    from ascend_llm.parallel.plan_memory import (
        model_state_terms,
        optimizer_transient_terms,
        parameter_sizes,
        plan_memory,
    )

    mm = dataclasses.replace(recipe.objective.multimodal)
    notes = [f"objective={recipe.objective.name}: the memory terms are the multimodal model's (parallel/"
             "plan_vision.py); ZeRO sharding and tensor parallelism of its states are not modelled (planned "
             "unsharded), and the step-time lines below are the LLM recipe's estimate, not this objective's"]
    if recipe.objective.name == "contrastive":
        if mm.pretrained:
            mm.dual_encoder = _opened_config(mm.pretrained)

        def llm_terms():
            text_lay = dataclasses.replace(lay, seq_len=mm.dual_encoder.text.max_seq_len)
            acts = [t for t in activation_terms(text_lay) if not t.name.startswith("logits")]  # no LM head here
            return parameter_sizes(lay.model), acts

        terms, parts = contrastive_terms(lay, mm, llm_terms)
    else:
        if mm.vision_pretrained:
            vision = _opened_config(mm.vision_pretrained).vision
        else:
            vision = mm.dual_encoder.vision
            notes.append("objective.multimodal.vision_pretrained is not set: the vision tower planned is "
                         "objective.multimodal.dual_encoder.vision")
        cap = dataclasses.replace(lay, seq_len=caption_sequence_len(mm, vision.num_patches))

        def llm_state(layout):
            return model_state_terms(layout) + (optimizer_transient_terms(layout) if layout.lora_rank else [])

        terms, parts = caption_terms(cap, mm, vision, llm_state, activation_terms)
        parts = {"LLM" + (" (LoRA adapters train)" if lay.lora_rank else " (frozen)"):
                 sum(parameter_sizes(lay.model))} | parts
        notes.append(f"caption rows: {cap.seq_len} tokens (prompt text at one token per byte + BOS, "
                     f"{vision.num_patches} image tokens, {mm.max_caption_tokens} caption tokens)")
    mem = plan_memory(lay, recipe.cluster.device_memory_gib, recipe.runtime.max_device_memory, terms)
    mem.notes[:0] = notes
    return mem, parts
