"""Tensor parallel and context parallel under real msrun on CPU (2 workers, debug-size model, vocabulary 511
so TP pads it): the loss, the logits (in global order) and the gradients of every parameter after one
forward/backward equal a single-process run of the same seeded model (which test_model_reference checks
against float64 NumPy). TP gradients are all-gathered to the unsharded names and shapes; CP gradients are
reduced by dp.build_grad_reducer over groups.dp_cp (sum over CP, mean over DP). One 2-worker msrun job runs all
the layouts (the `layout_jobs` fixture, tests/integration/conftest.py). TP and CP composed with DP (tp2_dp2,
cp2_dp2 on 4 workers) are checked through the trainer in test_tpcp_train_msrun: the loss and gradient norm of
each of 20 steps, and every parameter and AdamW moment (m and v, element by element: the gradients' history)
after them, against one process. TP also runs with every
target in rank 0's vocabulary shard (rank 1's holds none); CP runs causal and with packed-document segment
ids; tp_sp is TP with sequence parallel."""

from __future__ import annotations

import numpy as np
import pytest
from tpcp_worker import batch, model_config

# one pytest-xdist worker runs every test of the layout jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("layout_jobs")


@pytest.fixture(scope="module")
def reference():
    """{variant: (loss, logits, {name: grad})} of one process, fp32, same seed and batch."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from ascend_llm.models.llama import build_model

    cfg = model_config()
    model = build_model(cfg, seed=0)
    params = model.trainable_params()
    tokens, labels, segments = batch()

    def forward(x, y, s=None):
        logits = model(x, s)
        return ops.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)), logits

    out = {}
    for variant, targets, seg in (("causal", labels, None), ("segments", labels, Tensor(segments)),
                                  ("lowlabels", labels % 255, None)):
        args = (Tensor(tokens), Tensor(targets)) + (() if seg is None else (seg,))
        (loss, logits), grads = ms.value_and_grad(forward, None, params, has_aux=True)(*args)
        out[variant] = (loss.asnumpy(), logits.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, grads)})
    return out


@pytest.mark.parametrize("mode,variant", [("tp", "causal"), ("tp", "lowlabels"), ("cp", "causal"),
                                          ("cp", "segments"), ("tp_sp", "segments")])
def test_layout_matches_single_process(layout_jobs, reference, mode, variant):
    got = layout_jobs[mode]
    # checkpoints stay layout-free: gathered shards equal the full seeded init, and sharding it gives them
    assert got["state/gather_err"] == 0 and got["state/shard_err"] == 0
    loss, logits, grads = reference[variant]
    np.testing.assert_allclose(got[f"{variant}/loss"], loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[f"{variant}/logits"], logits, rtol=0, atol=1e-5)
    # the global gradient norm for clipping, from the shards (tp.TPGradNorm)
    want_norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    np.testing.assert_allclose(got[f"{variant}/grad_norm"], want_norm, rtol=1e-5)
    names = sorted(k.split("/grad/")[1] for k in got if k.startswith(f"{variant}/grad/"))
    assert names == sorted(grads)
    for name in names:
        np.testing.assert_allclose(got[f"{variant}/grad/{name}"], grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{mode} {variant} gradient of {name}")
