"""The run's LLM as the contrastive text tower (dual_encoder.text_tower=llm)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"


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
