"""Drift detection on real text with a tiny model: calibration over random same-corpus splits, Tang poems -> Song ci
detected by all three detectors, per-document features against a float64 NumPy forward of the same model, the
CLI's exit status and JSON, and bad input in one line."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ascend_llm.eval.drift import count_matrix, detect, document_features, sample_documents
from ascend_llm.train.loss import token_cross_entropy
from tests.conftest import CORPORA, ROOT

pytestmark = pytest.mark.xdist_group("drift_detect")  # one xdist worker: module fixtures build once

FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf" / "llama_gqa"  # 2 layers, hidden 64, vocab 640, EOS 636
NUM_SPLITS = 20


def _need(path):
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    return path


def _fine_tune(model, tokenizer, texts, eos, steps=40, seq=32, rows=16):
    """A few AdamW steps of next-token training on `texts` (so the model's loss knows Tang poems)."""
    ids = np.concatenate([np.concatenate([[eos], tokenizer.encode(t, add_special_tokens=False)]) for t in texts])
    starts = np.random.default_rng(0).integers(0, len(ids) - seq - 1, (steps, rows))
    optimizer = nn.AdamWeightDecay(model.trainable_params(), learning_rate=3e-3, weight_decay=0.0)

    def loss_fn(x, y):
        return token_cross_entropy(model(x), y)

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(x, y):
        loss, grads = grad_fn(x, y)
        optimizer(grads)
        return loss

    model.set_train(True)
    losses = [float(step(ms.Tensor(np.stack([ids[s:s + seq] for s in row]).astype(np.int32)),
                         ms.Tensor(np.stack([ids[s + 1:s + seq + 1] for s in row]).astype(np.int32))).asnumpy())
              for row in starts]
    model.set_train(False)
    return losses


@pytest.fixture(scope="module")
def features():
    """(Tang features (160 docs), Song ci features (80 docs), model, tokenizer) with a model fine-tuned on other
    Tang poems; computed once for the module."""
    from ascend_llm.interop.source import open_model

    tang_path, song_path = _need(CORPORA / "tang_poems.jsonl"), _need(CORPORA / "song_ci.jsonl")
    source = open_model(_need(FIXTURE))
    tang = sample_documents(str(tang_path), 160, 0, slice(0, 2000))
    song = sample_documents(str(song_path), 80, 1, slice(0, 2000))
    train_texts = sample_documents(str(tang_path), 300, 2, slice(2000, 4000)).texts
    losses = _fine_tune(source.model, source.tokenizer, train_texts, 636)
    assert losses[-1] < losses[0] - 0.5
    feats = [document_features(source.model, source.tokenizer, s.texts, 636, max_tokens=32, batch_size=16)
             for s in (tang, song)]
    return feats[0], feats[1], source


def test_calibrated_on_same_distribution_splits(features):
    """NUM_SPLITS random halves of one Tang sample: the false-positive rate of each detector and of the overall
    decision at alpha = 0.05 stays within [0, 0.15]."""
    tang = features[0]
    alarms = np.zeros(4)
    for i in range(NUM_SPLITS):
        perm = np.random.default_rng(100 + i).permutation(len(tang.nll_sum))
        report = detect(tang.take(perm[:80]), tang.take(perm[80:]), alpha=0.05, num_permutations=100, seed=i)
        alarms += [r["p_value"] < 0.05 for r in report["detectors"]] + [report["drift"]]
    assert np.all(alarms / NUM_SPLITS <= 0.15), alarms


def test_tang_to_song_ci_is_detected_by_all_three(features):
    tang, song, _ = features
    report = detect(tang.take(np.arange(80)), song, alpha=0.05, num_permutations=100, seed=0)
    rows = {r["detector"]: r for r in report["detectors"]}
    assert report["drift"]
    assert all(rows[name]["drift"] for name in ("loss", "tokens", "mmd")), rows
    assert abs(rows["loss"]["shift_nats_per_byte"]) > 0.05, rows["loss"]
    assert rows["tokens"]["psi"] > 0.0


def test_features_match_a_numpy_forward(features):
    """Per-document NLL and mean-pooled hidden states against the model's logits (float64 log-softmax on the
    host) and its final-norm hidden states, for one document run alone at its own length."""
    _, song, source = features
    model, tokenizer = source.model, source.tokenizer
    text = "导引\n气和玉烛，睿化著鸿明。"
    one = document_features(model, tokenizer, [text], 636, max_tokens=32, batch_size=16)  # the compiled shape
    ids = np.concatenate([[636], tokenizer.encode(text, add_special_tokens=False)])[:32].astype(np.int32)
    logits = model(ms.Tensor(ids[None])).asnumpy()[0].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = (logz[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).sum()
    assert one.nll_sum[0] == pytest.approx(nll, rel=1e-5)
    assert one.num_tokens[0] == len(ids) - 1
    assert one.num_bytes[0] == len(text.encode("utf-8"))  # the whole text fits in 32 tokens
    # the hidden states the logits come from: output(h) reproduces the logits, mean over positions 1.. is pooled
    weight = model.output.weight.asnumpy().astype(np.float64)
    assert one.embeddings.shape == (1, weight.shape[1])
    np.testing.assert_allclose(one.embeddings[0] @ weight.T, logits[1:].mean(0), rtol=1e-4, atol=1e-4)


def test_count_matrix():
    ref, new = count_matrix([np.array([5, 5, 9])], [np.array([9, 2])])
    np.testing.assert_array_equal(ref, [[0, 2, 1]])
    np.testing.assert_array_equal(new, [[1, 0, 1]])


def test_cli_exit_status_json_and_bad_input(tmp_path, capsys):
    from ascend_llm.cli.drift import EXIT_DRIFT, EXIT_NO_DRIFT
    from ascend_llm.cli.main import main

    tang, song = str(_need(CORPORA / "tang_poems.jsonl")), str(_need(CORPORA / "song_ci.jsonl"))
    common = [str(_need(FIXTURE)), "--samples", "24", "--batch-size", "24", "--max-tokens", "32",
              "--permutations", "50", "--pynative"]  # each corpus's 24 documents in one eager forward
    out = tmp_path / "report.json"
    try:
        status = main(["drift", *common, "--reference", tang, "--new", tang, "--ref-docs", "0:300",
                       "--new-docs", "300:600", "--json", str(out)])
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)  # the session's mode for the tests that follow
    report = json.loads(out.read_text())
    assert status == (EXIT_DRIFT if report["drift"] else EXIT_NO_DRIFT)
    assert report["samples"]["reference"]["sampled"] == 24 and report["samples"]["new"]["eligible"] == 300
    assert [r["detector"] for r in report["detectors"]] == ["loss", "tokens", "mmd"]
    assert "| detector |" in capsys.readouterr().out
    status = main(["drift", *common, "--reference", tang, "--new", song, "--alpha", "1.5"])
    assert status == 2
    assert capsys.readouterr().err.strip().startswith("config error: --alpha=1.5")
