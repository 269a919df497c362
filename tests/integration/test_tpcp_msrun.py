"""Tensor parallel and context parallel under real msrun on CPU (2 workers, debug-size model, vocabulary 511
so TP pads it): the loss, the logits (in global order) and the gradients of every parameter after one
forward/backward equal a single-process run of the same seeded model (which test_model_reference checks
against float64 NumPy). TP gradients are all-gathered to the unsharded names and shapes; CP gradients are
summed over the CP ranks (what the data-parallel reduce over groups.dp_cp does). CP runs causal and with
packed-document segment ids."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration
WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from msrun_util import run_msrun  # noqa: E402
from tpcp_worker import batch, model_config  # noqa: E402


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
    for variant, seg in (("causal", None), ("segments", Tensor(segments))):
        args = (Tensor(tokens), Tensor(labels)) + (() if seg is None else (seg,))
        (loss, logits), grads = ms.value_and_grad(forward, None, params, has_aux=True)(*args)
        out[variant] = (loss.asnumpy(), logits.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, grads)})
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpcp")
    results = {}
    for mode in ("tp", "cp"):
        run_msrun(WORKERS / "tpcp_worker.py", out, mode)
        results[mode] = dict(np.load(out / f"{mode}.npz"))
    return results


@pytest.mark.parametrize("mode,variant", [("tp", "causal"), ("cp", "causal"), ("cp", "segments")])
def test_layout_matches_single_process(layouts, reference, mode, variant):
    got = layouts[mode]
    loss, logits, grads = reference[variant]
    np.testing.assert_allclose(got[f"{variant}/loss"], loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[f"{variant}/logits"], logits, rtol=0, atol=1e-5)
    names = sorted(k.split("/grad/")[1] for k in got if k.startswith(f"{variant}/grad/"))
    assert names == sorted(grads)
    for name in names:
        np.testing.assert_allclose(got[f"{variant}/grad/{name}"], grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=f"{mode} {variant} gradient of {name}")
