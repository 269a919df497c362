"""Planner terms of the multimodal objectives (parallel/plan_vision.py): parameter counts equal the real cells'
parameters (CLIP- and SigLIP-style ViTs, text towers, dual encoders, the LLaVA projector); activations equal the
formula written here; `ascend-llm plan` prints a contrastive and a caption recipe's plan."""

from __future__ import annotations

import dataclasses

import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.config.multimodal import DualEncoderConfig, TextTowerConfig, VisionConfig
from ascend_llm.parallel.plan import plan_recipe
from ascend_llm.parallel.plan_vision import (
    dual_encoder_parts,
    projector_sizes,
    text_parameter_sizes,
    vision_activation_elements,
    vision_parameter_sizes,
)

CLIP_VISION = VisionConfig(image_size=32, patch_size=8, dim=48, num_layers=2, num_heads=4, ffn_hidden_dim=80)
SIGLIP_VISION = VisionConfig(image_size=24, patch_size=6, dim=40, num_layers=3, num_heads=5, ffn_hidden_dim=72,
                             activation="gelu_tanh", pooling="attention", patch_bias=True, pre_norm=False)


def cell_sizes(cell) -> list[int]:
    return sorted(int(p.size) for p in cell.get_parameters())


@pytest.mark.parametrize("vision", [CLIP_VISION, SIGLIP_VISION], ids=["clip", "siglip"])
def test_parameter_counts_equal_the_cells(vision):
    from ascend_llm.models.clip import DualEncoder, TextTower
    from ascend_llm.models.vision import VisionTower
    from ascend_llm.models.vlm import Projector

    assert sorted(vision_parameter_sizes(vision)) == cell_sizes(VisionTower(vision))
    text = TextTowerConfig(vocab_size=100, dim=32, num_layers=2, num_heads=4, ffn_hidden_dim=64, max_seq_len=12,
                           head_dim_out=24 if vision.pooling == "attention" else 0)
    assert sorted(text_parameter_sizes(text)) == cell_sizes(TextTower(text))
    for bias in (False, True):
        dual = DualEncoderConfig(vision=vision, text=text, projection_dim=16, projection_bias=bias)
        parts = dual_encoder_parts(dual)
        assert sorted(n for sizes in parts.values() for n in sizes) == cell_sizes(DualEncoder(dual))
    assert sorted(projector_sizes(vision.dim, 64, 96)) == cell_sizes(Projector(vision.dim, 64, 96))


def test_vision_activations_equal_the_formula():
    v = CLIP_VISION  # T = (32/8)^2 + 1 = 17 tokens with the class token, quick_gelu keeps 3TF per block
    t, h, a, f = 17, 48, 4, 80
    block = 10 * t * h + a * t * t + 3 * t * f
    assert vision_activation_elements(v) == 3 * 32 * 32 + 3 * t * h + 2 * block + 3 * h
    s = SIGLIP_VISION  # T = 16 patches, no input norm, gelu keeps 2TF, the probe: post_norm 3Th + k, v + softmax
    t, h, a, f = 16, 40, 5, 72
    assert vision_activation_elements(s) == 3 * 24 * 24 + 3 * (10 * t * h + a * t * t + 2 * t * f) + 5 * t * h + a * t


@pytest.fixture(scope="module")
def clip_plan():
    recipe = compose_recipe(["experiment=digits_clip", "train.global_batch_size=8"])
    return recipe, plan_recipe(recipe)


def test_contrastive_plan_terms(clip_plan):
    recipe, planned = clip_plan
    dual = recipe.objective.multimodal.dual_encoder
    total = sum(n for sizes in dual_encoder_parts(dual).values() for n in sizes)
    assert planned.multimodal["trained"] == total  # siglip: the scale and the bias train too
    mem = planned.memory
    assert mem.term("parameters (trained)").bytes == 4 * total
    assert mem.term("activations: vision tower (8 per rank)").bytes == 8 * 4 * vision_activation_elements(dual.vision)
    assert mem.term("contrastive batch (N=8): features, logits").bytes == 4 * (2 * 8 * 32 + 2 * 64)
    # frozen towers (the seed's aligner): parameters only, their output the only activation
    frozen = compose_recipe(["experiment=multimodal_aligner", "train.global_batch_size=8"])
    mem = plan_recipe(frozen).memory
    parts = dual_encoder_parts(frozen.objective.multimodal.dual_encoder)
    assert mem.term("parameters (trained)").bytes == 4 * sum(parts["projections"])
    assert mem.term("parameters (frozen towers)").bytes == 4 * (sum(parts["vision tower"]) +
                                                                sum(parts["text tower"]) + 2)
    assert mem.term("activations: vision tower, frozen (output only)").bytes == 8 * 512 * 4


def test_caption_plan_terms():
    recipe = compose_recipe(["experiment=digits_llava", "train.global_batch_size=4"])
    mem = plan_recipe(recipe).memory
    vision = recipe.objective.multimodal.dual_encoder.vision  # no vision_pretrained: the configured tower
    proj = projector_sizes(vision.dim, recipe.model.dim)
    assert mem.term("parameters (frozen vision tower)").bytes == 4 * sum(vision_parameter_sizes(vision))
    assert mem.term("activations: vision tower, frozen (none kept)").bytes == 0
    assert mem.term("projector: gradients").bytes == 4 * sum(proj)  # the only gradient of stage 1
    assert [t.name for t in mem.terms if t.phase == "backward end" and "activations" not in t.name] == [
        "projector: gradients"]
    tokens, h_v, hidden = vision.num_patches, vision.dim, recipe.model.dim
    assert mem.term(f"activations: projector (4 x {tokens} tokens)").bytes == 4 * tokens * (h_v + 2 * hidden) * 4


def test_plan_cli_prints_both_objectives(capsys):
    from ascend_llm.cli.plan import main

    for experiment, part in (("digits_clip", "text tower"), ("digits_llava", "projector")):
        assert main([f"experiment={experiment}"]) == 0
        out = capsys.readouterr().out
        assert "multimodal parameters:" in out and part in out and "plan_vision.py" in out


def test_lora_stage2_plans_adapters_and_projector():
    recipe = compose_recipe(["experiment=digits_llava", "lora.enabled=true"])
    names = [t.name for t in plan_recipe(recipe).memory.terms]
    assert "LoRA adapters" in names and "projector: gradients" in names and "parameters (frozen LLM)" not in names
    assert dataclasses.is_dataclass(recipe.objective.multimodal)
