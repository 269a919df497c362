"""CLIP and SigLIP import against the transformers goldens of ../shared/fixtures/hf/{clip,siglip}_tiny: Pillow
preprocessing of the PNGs, tokenization, both towers, embeddings, logits and the contrastive losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor, nn
from safetensors.numpy import load_file

from ascend_llm.data.images import read_image_records
from ascend_llm.errors import DataError, InteropError

pytestmark = pytest.mark.xdist_group("vision_import")  # one xdist worker: module fixtures build once

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
NAMES = ("clip_tiny", "siglip_tiny")


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    root = FIXTURES / request.param
    if not root.is_dir():
        pytest.skip(f"shared fixture absent: {root}")
    from ascend_llm.interop.source import open_model

    source = open_model(root, vision=True)
    golden = load_file(str(FIXTURES / f"{request.param}.golden.safetensors"))
    meta = json.loads((FIXTURES / f"{request.param}.golden.json").read_text())
    return request.param, source, golden, meta


def _batch(golden):
    return (Tensor(golden["pixel_values"]), Tensor(golden["input_ids"].astype(np.int32)),
            Tensor(golden["attention_mask"].astype(np.int32)))


def test_preprocessing_and_tokenization_equal_transformers(fixture):
    name, source, golden, meta = fixture
    assert source.kind == "vision" and source.family == name.split("_")[0]
    pixels = np.stack([source.preprocess.load(FIXTURES / image["file"]) for image in meta["images"]])
    np.testing.assert_allclose(pixels, golden["pixel_values"], atol=1e-4, rtol=0)
    ids, mask = source.tokenize(meta["captions"])
    np.testing.assert_array_equal(ids, golden["input_ids"])
    np.testing.assert_array_equal(mask, golden["attention_mask"])


class Everything(nn.Cell):
    """Both towers, the embeddings and the logits in one compiled graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, pixels, ids, mask):
        vision = self.model.vision(pixels)
        text = self.model.text(ids, mask)
        image_embeds, text_embeds = self.model(pixels, ids, mask)
        return vision + text + (image_embeds, text_embeds, self.model.logits(image_embeds, text_embeds))


def test_towers_embeddings_and_logits_equal_transformers(fixture):
    _, source, golden, _ = fixture
    out = Everything(source.model)(*_batch(golden))
    vision_hidden, vision_pooled, text_hidden, text_pooled, image_embeds, text_embeds = out[:6]
    logits = out[6].asnumpy()
    got = {"vision_last_hidden_state": vision_hidden, "vision_pooler_output": vision_pooled,
           "text_last_hidden_state": text_hidden, "text_pooler_output": text_pooled,
           "image_embeds": image_embeds, "text_embeds": text_embeds}
    for key, value in got.items():
        np.testing.assert_allclose(value.asnumpy(), golden[key], atol=1e-4, rtol=0, err_msg=key)
    np.testing.assert_allclose(logits, golden["logits_per_text"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits.T, golden["logits_per_image"], atol=1e-4, rtol=0)


def test_losses_equal_transformers_and_the_paper(fixture):
    from ascend_llm.train.contrastive import clip_loss, siglip_loss

    name, source, golden, meta = fixture
    logits = Tensor(golden["logits_per_text"])
    if name == "clip_tiny":
        assert abs(float(clip_loss(logits).asnumpy()) - meta["loss"]) < 1e-5
    else:
        value = float(siglip_loss(logits).asnumpy())
        assert abs(value - meta["loss"]) < 1e-5
        assert abs(value - meta["sigmoid_loss_paper_formula"]) < 1e-5


def test_text_verbs_refuse_a_dual_encoder_in_one_line():
    from ascend_llm.interop.source import open_model

    if not (FIXTURES / "siglip_tiny").is_dir():
        pytest.skip("shared fixtures absent")
    with pytest.raises(InteropError, match="image-text dual encoder"):
        open_model(FIXTURES / "siglip_tiny")


def test_unsupported_config_is_one_error_naming_the_key(tmp_path):
    from ascend_llm.interop.vision import dual_encoder_config

    raw = json.loads((FIXTURES / "clip_tiny" / "config.json").read_text()) if FIXTURES.is_dir() else None
    if raw is None:
        pytest.skip("shared fixtures absent")
    raw["vision_config"]["hidden_act"] = "swish"
    with pytest.raises(InteropError, match=r"vision_config.hidden_act"):
        dual_encoder_config(raw)


def test_bad_records_name_file_line_and_field_or_are_counted(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [{"image": "ok.png", "caption": "a square"}, {"image": "missing.png", "caption": "x"},
             {"image": "broken.png", "caption": "y"}, {"image": "ok.png"},
             {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>"},
                                                   {"from": "gpt", "value": "a square again"}]}]
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2:image.*missing.png"):
        read_image_records(file)
    records = read_image_records(file, on_bad_record="skip")
    assert records.captions == ["a square", "a square again"]
    assert dict(records.skipped) == {"image": 2, "caption": 1, "json": 1}


def test_older_preprocessor_configs_with_int_sizes(tmp_path):
    from ascend_llm.data.images import ImagePreprocessor

    if not (FIXTURES / "clip_tiny").is_dir():
        pytest.skip("shared fixtures absent")
    raw = json.loads((FIXTURES / "clip_tiny" / "preprocessor_config.json").read_text())
    raw.update(size=32, crop_size=32)  # openai/clip-vit-*: ints, read as shortest edge and a square crop
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    old = ImagePreprocessor.from_dir(tmp_path, 32).load(FIXTURES / "images" / "coffee.png")
    new = ImagePreprocessor.from_dir(FIXTURES / "clip_tiny", 32).load(FIXTURES / "images" / "coffee.png")
    np.testing.assert_array_equal(old, new)


def test_a_folder_of_images_with_caption_files(tmp_path):
    from PIL import Image

    for name, colour in (("b_red", (255, 0, 0)), ("a_blue", (0, 0, 255)), ("c_green", (0, 255, 0))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.png")
    (tmp_path / "a_blue.txt").write_text("a blue square\n")
    (tmp_path / "b_red.txt").write_text("a red square")
    with pytest.raises(DataError, match=r"c_green.png:c_green.txt"):
        read_image_records(tmp_path)
    records = read_image_records(tmp_path, on_bad_record="skip")
    assert [p.name for p in records.images] == ["a_blue.png", "b_red.png"]
    assert records.captions == ["a blue square", "a red square"] and dict(records.skipped) == {"caption": 1}
