"""The multimodal objectives through the trainer.

Contrastive training under real msrun (2 CPU workers: the SigLIP run and the seed's cosine aligner are runs of the
trainer's 2-worker msrun job, trainer_runs.py): every rank's features form one
contrastive batch (all-gather with a reduce-scatter backward), so dp2 with local batch B/2 trains exactly like one
process with global batch B: the same losses, validation loss and final parameters within 1e-5. The one-process
reference trains 2 steps, then resumes from its checkpoint to step 4 (a constant learning rate, so the schedule does
not depend on train.num_steps): resuming is part of what must match. Real images: scikit-learn's handwritten
digits (skipped without scikit-learn).

On the fixtures' four photos (one process): a CLIP checkpoint's first training loss is transformers' loss of the
goldens; a caption run (LLaVA stage 1) checkpoints the projector only, and its caption loss falls."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import add_runs

from tests.conftest import read_records

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
COMMON = ["model=debug", "train.global_batch_size=4", "train.log_every=1", "train.val_batches=1",
          "train.progress=false", "optim.warmup_steps=0", "optim.weight_decay=0"]

NUM_STEPS = 4
RECIPE = ["experiment=digits_clip", "train.global_batch_size=16",
          "train.log_every=1", f"train.val_every={NUM_STEPS}", "train.val_batches=1",
          "train.progress=false", "objective.multimodal.dual_encoder.vision.num_layers=1",
          "objective.multimodal.dual_encoder.text.num_layers=1", "optim.lr=3e-3", "optim.warmup_steps=0",
          "optim.min_lr_ratio=1.0", "train.ckpt_every=2"]
RUNS = {"siglip": ["objective.multimodal.dual_encoder.loss=siglip"],
        "aligner": ["objective.multimodal.dual_encoder.loss=cosine", "objective.multimodal.train_towers=false",
                    "objective.multimodal.dual_encoder.projection_bias=true"]}


def _digits(jobs) -> list[str]:
    """Overrides of the session's digits dataset (64 training images, 16 held out; written once)."""
    from ascend_llm.data.images import write_digits_dataset

    root = jobs.data_dir("digits")
    if not (root / "train.jsonl").is_file():
        write_digits_dataset(root, num_val=16, count=64)
    return [f"data.tokenizer={root / 'tokenizer.json'}", f"objective.multimodal.images={root / 'train.jsonl'}",
            f"objective.multimodal.val_images={root / 'val.jsonl'}", f"data.cache_dir={root / 'cache'}"]


if importlib.util.find_spec("sklearn") is not None:  # the runs join the trainer's 2-worker msrun job
    add_runs(2, tuple(f"{name}_dp2" for name in RUNS), lambda jobs: {
        f"{name}_dp2": [*RECIPE, *_digits(jobs), *extra, f"train.num_steps={NUM_STEPS}", "parallel=dp2"]
        for name, extra in RUNS.items()})


@pytest.mark.xdist_group("msrun_jobs")  # one pytest-xdist worker runs the shared msrun jobs (conftest.py)
@pytest.mark.parametrize("name", list(RUNS))
def test_dp2_global_contrastive_batch_equals_one_process(trainer_jobs, tmp_path, name):
    """siglip: the sigmoid loss over the gathered batch; aligner: the seed's MultimodalAligner (frozen towers,
    projections with bias, the cosine loss whose matched pairs come from the gathered caption ids); both resume
    in one process from a checkpoint holding the trained tensors only (the aligner's: its projections)."""
    from safetensors.numpy import load_file

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    pytest.importorskip("sklearn")
    overrides = [*RECIPE, *_digits(trainer_jobs), *RUNS[name]]
    one_dir, two_dir = tmp_path / "one", trainer_jobs.run_dir(f"{name}_dp2")
    train(compose_recipe([*overrides, "train.num_steps=2", f"train.output_dir={one_dir}"]))
    resumed = train(compose_recipe([*overrides, f"train.num_steps={NUM_STEPS}", "train.resume=auto",
                                    f"train.output_dir={one_dir}"]))
    assert resumed["start_step"] == 2

    one, two = read_records(one_dir), read_records(two_dir)
    assert [r["step"] for r in two] == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], atol=1e-5, rtol=0)
    np.testing.assert_allclose([r["logit_scale_exp"] for r in two], [r["logit_scale_exp"] for r in one], atol=1e-5)
    assert abs(two[-1]["val_loss"] - one[-1]["val_loss"]) < 1e-5
    assert one[-1]["loss"] < one[0]["loss"]  # it trains

    step = f"checkpoints/step_{NUM_STEPS:08d}/model.safetensors"
    ref, got = load_file(str(one_dir / step)), load_file(str(two_dir / step))
    if name == "aligner":  # only the two projections (weights and biases) train
        assert sorted(ref) == sorted(f"dual.{side}_projection.{w}" for side in ("text", "visual")
                                     for w in ("bias", "weight"))
    assert sorted(ref) == sorted(got) and (name == "aligner" or any(k.startswith("dual.vision.") for k in ref))
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=0, err_msg=name)


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


@pytest.fixture(scope="module")
def stage1(photos, tmp_path_factory) -> tuple[list[str], Path]:
    """(overrides, run dir) of a 4-step caption run (LLaVA stage 1) on the four photos, at a constant learning rate
    (the schedule does not depend on train.num_steps), checkpoints at steps 2 and 4."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    caption = [*COMMON, "objective=caption", f"model.pretrained={FIXTURES / 'qwen2_tied'}",
               f"objective.multimodal.vision_pretrained={FIXTURES / 'clip_tiny'}",
               f"objective.multimodal.images={photos}", f"objective.multimodal.val_images={photos}",
               "objective.multimodal.prompt='Photo: <image> Caption:'", "objective.multimodal.max_caption_tokens=16",
               "train.num_steps=4", "train.val_every=4", "train.ckpt_every=2", "optim.lr=1e-2",
               "optim.min_lr_ratio=1.0"]
    run = tmp_path_factory.mktemp("caption") / "stage1"
    train(compose_recipe([*caption, f"train.output_dir={run}"]))
    return caption, run


def test_caption_stage1_then_stage2_with_lora(stage1, tmp_path):
    from safetensors.numpy import load_file

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.caption import open_vlm
    from ascend_llm.train.trainer import train

    caption, one = stage1
    two = tmp_path / "stage2"
    records = read_records(one)
    assert records[-1]["loss"] < records[0]["loss"]
    saved = load_file(str(one / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert sorted(saved) == ["projector.w1.bias", "projector.w1.weight", "projector.w2.bias", "projector.w2.weight"]

    # stage 2 starts from stage 1's projector with LoRA adapters at zero: its first loss (before its update) is
    # stage 1's validation loss on the same four pairs after its last update
    train(compose_recipe([*caption, f"objective.multimodal.projector_from={one}", "lora.enabled=true",
                          "train.num_steps=2", "train.ckpt_every=2", f"train.output_dir={two}"]))
    assert abs(read_records(two)[0]["loss"] - records[-1]["val_loss"]) < 1e-5
    adapters = load_file(str(two / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert any(k.endswith("lora_a") for k in adapters) and "projector.w1.weight" in adapters
    opened = open_vlm(str(two))  # for generate --image: adapters merged into the base LLM
    assert opened.model.tok_embeddings.num_image_tokens == 16


def test_caption_resume_equals_the_uninterrupted_run(stage1, tmp_path):
    """Resumed from stage 1's step-2 checkpoint (the projector and its optimizer state; the frozen LLM and vision
    tower are re-read from their directories): steps 3-4 and the step-4 projector equal the uninterrupted run's."""
    from safetensors.numpy import load_file

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    caption, reference = stage1
    run = tmp_path / "resumed"
    summary = train(compose_recipe([*caption, f"train.resume={reference / 'checkpoints' / 'step_00000002'}",
                                    f"train.output_dir={run}"]))
    assert summary["start_step"] == 2
    ours, theirs = read_records(run), read_records(reference)[2:]
    assert [r["step"] for r in ours] == [3, 4]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], atol=1e-6, rtol=0)
    assert abs(ours[-1]["val_loss"] - theirs[-1]["val_loss"]) < 1e-6
    step = "checkpoints/step_00000004/model.safetensors"
    got, ref = load_file(str(run / step)), load_file(str(reference / step))
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6, rtol=0, err_msg=name)
