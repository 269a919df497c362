"""Document masking in training: a document alone gives the same logits, loss and gradients as the same
document packed beside another (segment ids from PackedDataset, labels across the boundary ignored), for the
naive and the segmented attention backends. The reference is the model run on each document by itself."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.attention.apply import apply_attention
from ascend_llm.config.attention import AttentionConfig
from ascend_llm.config.model import ModelConfig
from ascend_llm.data import IGNORE_INDEX, PackedDataset
from ascend_llm.models.llama import build_model
from ascend_llm.train.step import masked_cross_entropy_loss as cross_entropy_loss

LEN_A, LEN_B, SEQ = 13, 20, 32


def debug_model(backend: str):
    cfg = ModelConfig(name="debug", vocab_size=512, dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      ffn_hidden_dim=64, max_seq_len=64)
    model = build_model(cfg, seed=3)
    apply_attention(model, AttentionConfig(backend=backend, block_q=16, block_k=16))
    return model


def loss_and_grads(model, x, y, seg=None):
    params = model.trainable_params()

    def forward(x_, y_):
        logits = model(x_) if seg is None else model(x_, Tensor(seg))
        return cross_entropy_loss(logits, y_)

    loss, grads = ms.value_and_grad(forward, None, params)(Tensor(x), Tensor(y))
    return float(loss.asnumpy()), [g.asnumpy().astype(np.float64) for g in grads]


@pytest.mark.parametrize("backend", ["naive", "segmented"])
def test_packed_document_equals_document_alone(backend):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 512, LEN_A), rng.integers(1, 512, LEN_B)
    ds = PackedDataset(np.concatenate([a, b]).astype(np.uint16), SEQ, val_fraction=0.0, seed=0,
                       doc_ends=np.array([LEN_A - 1, LEN_A + LEN_B - 1]))
    x, y, seg = ds.batch(np.array([0]), with_segments=True)
    assert seg[0].tolist() == [0] * LEN_A + [1] * (SEQ - LEN_A) and y[0, LEN_A - 1] == IGNORE_INDEX
    model = debug_model(backend)

    packed = model(Tensor(x), Tensor(seg)).asnumpy()
    alone_a = model(Tensor(a[None].astype(np.int32))).asnumpy()
    alone_b = model(Tensor(b[None, :SEQ - LEN_A].astype(np.int32))).asnumpy()
    np.testing.assert_allclose(packed[0, :LEN_A], alone_a[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(packed[0, LEN_A:], alone_b[0], rtol=1e-4, atol=1e-5)
    unmasked = model(Tensor(x)).asnumpy()
    assert np.abs(unmasked[0, LEN_A:] - alone_b[0]).max() > 1e-3  # the control: without masking B sees A

    loss_p, grads_p = loss_and_grads(model, x, y, seg)
    xa, ya = a[None, :-1].astype(np.int32), a[None, 1:].astype(np.int32)
    xb, yb = b[None, :SEQ - LEN_A].astype(np.int32), b[None, 1:SEQ - LEN_A + 1].astype(np.int32)
    loss_a, grads_a = loss_and_grads(model, xa, ya)
    loss_b, grads_b = loss_and_grads(model, xb, yb)
    n_a, n_b = LEN_A - 1, SEQ - LEN_A  # targets inside A and inside B; the EOS -> b[0] target is ignored
    assert loss_p * (n_a + n_b) == pytest.approx(loss_a * n_a + loss_b * n_b, rel=1e-5)
    for gp, ga, gb in zip(grads_p, grads_a, grads_b):
        np.testing.assert_allclose(gp * (n_a + n_b), ga * n_a + gb * n_b, rtol=1e-3, atol=1e-6)
