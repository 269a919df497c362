"""Contrastive training and LLaVA stage 1 through the trainer, on the fixtures' four photos: a CLIP/SigLIP
checkpoint's first training loss is transformers' loss of the goldens; the checkpoint of a caption run holds the
projector only, and its caption loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_records

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
COMMON = ["model=debug", "train.global_batch_size=4", "train.log_every=1", "train.val_batches=1",
          "train.progress=false", "optim.warmup_steps=0", "optim.weight_decay=0"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    if not (FIXTURES / "clip_tiny").is_dir():
        pytest.skip(f"shared fixtures absent: {FIXTURES}")
    meta = json.loads((FIXTURES / "clip_tiny.golden.json").read_text())
    file = tmp_path_factory.mktemp("photos") / "pairs.jsonl"
    file.write_text("".join(json.dumps({"image": str(FIXTURES / image["file"]), "caption": caption}) + "\n"
                            for image, caption in zip(meta["images"], meta["captions"])))
    return file


@pytest.mark.parametrize("name", ["clip_tiny"])  # siglip_tiny: test_vision_import checks its loss function
def test_first_training_loss_is_transformers_loss(photos, tmp_path, name):
    from safetensors.numpy import load_file

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    run = tmp_path / "run"
    train(compose_recipe([*COMMON, "objective=contrastive", f"objective.multimodal.pretrained={FIXTURES / name}",
                          f"objective.multimodal.images={photos}", f"objective.multimodal.val_images={photos}",
                          "train.num_steps=2", "train.val_every=1000", "train.ckpt_every=2", "optim.lr=1e-3",
                          f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run}"]))
    records = read_records(run)
    golden = json.loads((FIXTURES / f"{name}.golden.json").read_text())
    assert abs(records[0]["loss"] - golden["loss"]) < 1e-5  # step 1's loss is computed before its update
    assert abs(records[0]["logit_scale_exp"] - golden["logit_scale_exp"]) < 1e-4
    assert records[1]["loss"] < golden["loss"]  # one update on the same four pairs lowers their loss
    saved = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert "dual.vision.patch_embedding.weight" in saved and ("dual.logit_bias" in saved) == (name == "siglip_tiny")


def test_caption_stage1_trains_the_projector_only(photos, tmp_path):
    from safetensors.numpy import load_file

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    run = tmp_path / "run"
    train(compose_recipe([*COMMON, "objective=caption", f"model.pretrained={FIXTURES / 'qwen2_tied'}",
                          f"objective.multimodal.vision_pretrained={FIXTURES / 'clip_tiny'}",
                          f"objective.multimodal.images={photos}", f"objective.multimodal.val_images={photos}",
                          "objective.multimodal.prompt='Photo: <image> Caption:'",
                          "objective.multimodal.max_caption_tokens=16", "train.num_steps=4", "train.val_every=1000",
                          "train.ckpt_every=4", "optim.lr=1e-2", f"train.output_dir={run}"]))
    losses = [r["loss"] for r in read_records(run)]
    assert losses[-1] < losses[0]
    saved = load_file(str(run / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert sorted(saved) == ["projector.w1.bias", "projector.w1.weight", "projector.w2.bias", "projector.w2.weight"]


def test_llm_text_tower_pools_the_last_real_token():
    """dual_encoder.text_tower=llm: the pooled state is the final-norm state of each caption's last real token, so
    the LLM's output head on it gives the LLM's own logits there (right padding changes nothing before it)."""
    if not (FIXTURES / "qwen2_tied").is_dir():
        pytest.skip(f"shared fixtures absent: {FIXTURES}")
    import numpy as np
    from mindspore import Tensor

    from ascend_llm.interop.source import open_model
    from ascend_llm.models.clip import LLMTextTower

    llm = open_model(FIXTURES / "qwen2_tied")
    rows = [llm.tokenizer.encode("a cat on a mat"), llm.tokenizer.encode("rockets")]
    ids = np.zeros((2, 32), np.int32)
    mask = np.zeros((2, 32), np.int32)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    _, pooled = LLMTextTower(llm.model)(Tensor(ids), Tensor(mask))
    head = llm.model.tok_embeddings.weight.asnumpy()  # tied output head
    logits = llm.model(Tensor(ids)).asnumpy()
    for row, tokens in enumerate(rows):
        np.testing.assert_allclose(pooled.asnumpy()[row] @ head.T, logits[row, len(tokens) - 1], atol=1e-4, rtol=0)
