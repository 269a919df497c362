"""The LLaVA-style vision-language model: image rows spliced at the placeholder ids equal a float64 NumPy projector
of the tower's features, the paged KV-cache engine with the image as a prompt prefix generates what a full forward
of the VLM predicts (tied head: qwen2_tied, clip_tiny's tower), and caption sequences mask the prompt and image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.train.caption import IGNORE_INDEX, caption_sequences, prompt_ids

pytestmark = pytest.mark.xdist_group("vlm")  # one xdist worker: module fixtures build once

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"


@pytest.fixture(scope="module")
def vlm():
    if not (FIXTURES / "clip_tiny").is_dir():
        pytest.skip(f"shared fixtures absent: {FIXTURES}")
    from ascend_llm.interop.source import open_model
    from ascend_llm.models.vlm import VisionLanguageModel

    vision, llm = open_model(FIXTURES / "clip_tiny", vision=True), open_model(FIXTURES / "qwen2_tied")
    model = VisionLanguageModel(vision.model.vision, llm.model, select_layer=-2, seed=1)
    model.set_train(False)
    pixels = np.stack([vision.preprocess.load(FIXTURES / "images" / name) for name in ("chelsea.png", "rocket.png")])
    return model, llm, pixels


def gelu64(x):
    from math import erf, sqrt

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def test_image_rows_equal_a_float64_projector_of_the_tower_features(vlm):
    model, _, pixels = vlm
    rows = model.image_rows(Tensor(pixels)).asnumpy()
    assert rows.shape == (2, 16, 64)  # 16 patches (CLIP's class token dropped) in the LLM's 64-d space
    feats = model.vision.features(Tensor(pixels), -2).asnumpy()[:, 1:].astype(np.float64)
    p = {name.split("projector.")[-1]: param.asnumpy().astype(np.float64) for name, param in
         model.projector.parameters_and_names()}
    want = gelu64(feats @ p["w1.weight"].T + p["w1.bias"]) @ p["w2.weight"].T + p["w2.bias"]
    np.testing.assert_allclose(rows, want, atol=1e-5, rtol=0)
    assert not any(param.requires_grad for param in model.vision.get_parameters())
    assert sorted(param.name for param in model.trainable_params() if "projector" in param.name) == \
        ["projector.w1.bias", "projector.w1.weight", "projector.w2.bias", "projector.w2.weight"]


def test_kv_cache_engine_with_an_image_prefix_matches_the_full_forward(vlm):
    from ascend_llm.inference import Engine, SamplingParams
    from ascend_llm.models.vlm import SplicedEmbedding

    model, llm, pixels = vlm
    vocab = llm.config.vocab_size
    prompt = prompt_ids(llm.tokenizer, "Look: <image> it is", 16, vocab)
    assert prompt.count(vocab) == 1 and max(prompt) == vocab + 15
    base = llm.model.tok_embeddings
    llm.model.tok_embeddings = spliced = SplicedEmbedding(base, 16)
    outs = []
    try:  # one engine (compiled once), a new image before each request: the compiled step must see it
        engine = Engine(llm.model, max_len=len(prompt) + 8, num_slots=1)
        rows = model.image_rows(Tensor(pixels)).asnumpy()  # both images: the shape the first test compiled
        for index in range(2):
            spliced.set_image(rows[index])
            outs.append(engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0))[0].token_ids)
    finally:
        llm.model.tok_embeddings = base
    # teacher-forced full forward of the VLM (no cache) over prompt + generated: each generated token is its argmax
    tokens = np.asarray([prompt + out[:-1] for out in outs], np.int32)
    logits = model(Tensor(pixels), Tensor(tokens)).asnumpy()
    for index, out in enumerate(outs):
        assert len(out) == 4
        assert logits[index, len(prompt) - 1:].argmax(-1).tolist() == out


def test_caption_sequences_train_on_caption_and_eos_only():
    class Words:  # a tokenizer: one id per word
        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    prefix = prompt_ids(Words(), "<image> says", 3, 100)
    assert prefix == [100, 101, 102, 4]
    x, y = caption_sequences(Words(), ["a cat", "one small dog"], prefix, 99, 4, "captions")
    assert x.shape == y.shape == (2, 8)
    assert x[0].tolist() == [100, 101, 102, 4, 1, 3, 99, 99]
    assert y[0].tolist() == [IGNORE_INDEX] * 3 + [1, 3, 99] + [IGNORE_INDEX] * 2
    assert y[1].tolist() == [IGNORE_INDEX] * 3 + [3, 5, 3, 99, IGNORE_INDEX]
    from ascend_llm.errors import DataError

    with pytest.raises(DataError, match=r"captions\[0\]"):
        caption_sequences(Words(), ["a b c d e"], prefix, 99, 4, "captions")
