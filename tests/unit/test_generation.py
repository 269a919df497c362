"""KV-cache generation: greedy continuations equal transformers' token for token, logits with the cache equal
logits without it, batches and stop conditions behave, sampling filters follow their definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.inference import Engine, RequestError, SamplingParams
from ascend_llm.inference.sampling import apply_repetition_penalty, filter_top_k_top_p, sample_next
from ascend_llm.interop.safetensors_io import read_tensors
from tests.conftest import open_fixture

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
NAMES = ["llama_gqa", "qwen2_tied", "qwen3_qknorm", "llama_bf16"]
CACHE_TOL = 1e-5  # the bound; measured max |diff| ~2e-6


def fixture(name: str) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return FIXTURES / name


_LOADED: dict = {}


def loaded(name: str):
    if name not in _LOADED:
        _LOADED[name] = open_fixture(fixture(name)) + (json.loads(fixture(f"{name}.golden.json").read_text()),)
    return _LOADED[name]


def test_batch_greedy_matches_transformers_and_stops():
    model, _, tokenizer, meta = loaded("llama_gqa")
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]  # 38 'G', 6 "'", 411 '萬', 13 '.'
    engine = Engine(model, max_len=64, num_slots=2, block_size=16, max_chunk=32)
    short = prompt[:7]
    results = engine.generate([prompt, short], SamplingParams(max_new_tokens=len(golden)), tokenizer)
    assert results[0].token_ids == golden and results[0].finish_reason == "length"
    ids = list(short)  # the shorter prompt of the batch equals its own greedy run without a cache
    for _ in range(len(golden)):  # one shape (right padding is inert under causal attention): one graph
        window = np.zeros((1, 32), np.int32)
        window[0, :len(ids)] = ids
        ids.append(int(model(Tensor(window)).asnumpy()[0, len(ids) - 1].argmax()))
    assert results[1].token_ids == ids[len(short):]
    assert engine.tokens_per_second()["decode_tokens_per_s"] > 0
    by_token, by_string = engine.generate(  # same engine, same shapes: no new graph
        [prompt] * 2, [SamplingParams(max_new_tokens=12, stop_token_ids=[golden[2]]),
                       SamplingParams(max_new_tokens=12, stop_strings=[tokenizer.decode([golden[3]])])], tokenizer)
    assert by_token.token_ids == golden[:3] and by_token.finish_reason == "stop" and by_token.stop_reason == golden[2]
    assert by_string.token_ids == golden[:4] and by_string.finish_reason == "stop"
    assert by_string.text == tokenizer.decode(golden[:3])
    with pytest.raises(RequestError, match="prompt"):
        engine.generate([list(range(64))], SamplingParams())
    assert engine.allocator.num_used() == 0


def test_logits_with_cache_equal_logits_without():
    """Chunked prefill then one token per step through the paged cache, for a batch of two rows: every position's
    logits equal the no-cache forward's (q/k norm, head_dim != dim/heads, GQA: the most to get wrong)."""
    name = "qwen3_qknorm"
    model, cfg, _, _ = loaded(name)
    ids = read_tensors(fixture(f"{name}.golden.safetensors"))["batch_input_ids"].astype(np.int32)
    batch, length = ids.shape
    engine = Engine(model, max_len=32, num_slots=2, block_size=4, max_chunk=4)
    rows = ["a", "b"]
    steps = []
    for start in range(0, length):
        count = 4 if start < 8 and start % 4 == 0 else (0 if start < 8 else 1)  # two chunks of 4, then decode
        if count == 0:
            continue
        for row in rows:
            assert engine.allocator.ensure(row, start + count)
        out = engine.run(rows, [list(ids[b, start:start + count]) for b in range(batch)], [start] * batch)
        steps.append((start + count - 1, np.stack([out.logits(b) for b in range(batch)])))
    full = model(Tensor(ids)).asnumpy()
    for position, logits in steps:
        np.testing.assert_allclose(logits, full[:, position], rtol=0, atol=CACHE_TOL)
    assert len(steps) == 2 + length - 8


def test_closing_sample_says_when_the_window_cuts_the_prompt(caplog):
    import logging

    from ascend_llm.train.sample import generate

    model, _, tokenizer, meta = loaded("llama_gqa")
    text = tokenizer.decode(meta["text_input_ids"])
    # the handler on the logger itself: an in-process CLI run earlier in this worker may have stopped propagation
    logging.getLogger("ascend_llm.train").addHandler(caplog.handler)
    with caplog.at_level("INFO", logger="ascend_llm.train"):
        out = generate(model, tokenizer, text, num_tokens=4, seq_len=10)
    logging.getLogger("ascend_llm.train").removeHandler(caplog.handler)
    assert "keeps the prompt's last 6 of" in caplog.text and "generates 4 of train.sample_tokens=4" in caplog.text
    assert out.startswith(tokenizer.decode(meta["text_input_ids"][-6:]))
    caplog.clear()
    with caplog.at_level("INFO", logger="ascend_llm.train"):
        generate(model, tokenizer, text, num_tokens=4, seq_len=64)
    assert "closing sample" not in caplog.text


def test_sampling_filters_follow_their_definitions():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0, -2.0])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    kept = np.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [True, False, False, True, False, False]
    for top_p in (0.05, 0.5, 0.8, 0.95, 0.999):
        order = np.argsort(-probs)
        need = next(i for i in range(1, 7) if probs[order[:i]].sum() >= top_p)  # smallest set reaching top_p
        assert set(np.flatnonzero(np.isfinite(filter_top_k_top_p(logits, 0, top_p)))) == set(order[:need])
    penalised = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    assert penalised.tolist() == [1.0, -2.0, 0.5, 3.0, 0.0, -2.0]
    params = SamplingParams(temperature=0.5, top_k=3, seed=0)
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_next(logits, params, np.array([], int), rng) for _ in range(4000)], minlength=6)
    top = np.array([0, 2, 3])
    expected = np.exp(logits[top] / 0.5) / np.exp(logits[top] / 0.5).sum()
    assert draws[[1, 4, 5]].sum() == 0
    np.testing.assert_allclose(draws[top] / 4000, expected, atol=0.03)
    assert sample_next(logits, SamplingParams(), np.array([3]), rng) == 3
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0).validate()
