"""The whole model trains with the segmented backend exactly as with naive attention (fp32, 20 steps)."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.train.trainer import train


def test_segmented_training_matches_naive(tmp_path, data_cache):
    common = ["debug=smoke", "train.num_steps=20", "train.progress=false", "train.sample_tokens=0",
              "train.log_every=1", f"data.cache_dir={data_cache}", "attention.block_q=16", "attention.block_k=16",
              "train.val_batches=0"]
    naive = train(compose_recipe([*common, "attention=naive", f"train.output_dir={tmp_path / 'naive'}"]))
    segmented = train(compose_recipe([*common, "attention=segmented", f"train.output_dir={tmp_path / 'seg'}"]))
    assert len(naive["losses"]) == 20
    np.testing.assert_allclose(segmented["losses"], naive["losses"], rtol=0, atol=1e-4)
    assert naive["losses"][-1] < naive["losses"][0] - 0.2


def test_auto_resolves_to_segmented_on_cpu_and_fused_refuses_cpu():
    from ascend_llm.attention import resolve_backend
    from ascend_llm.attention.fused import FusedAttentionUnavailable, require_ascend

    assert resolve_backend("auto") == "segmented"
    with pytest.raises(FusedAttentionUnavailable, match="only on Ascend"):
        require_ascend()
