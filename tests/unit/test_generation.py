"""KV-cache generation: greedy continuations equal transformers' token for token, logits with the cache equal
logits without it, batches and stop conditions behave, sampling filters follow their definitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor, mutable

from ascend_llm.errors import ConfigError
from ascend_llm.inference import Engine, SamplingParams
from ascend_llm.inference.kv_cache import CachedForward, empty_cache
from ascend_llm.inference.sampling import apply_repetition_penalty, filter_top_k_top_p, sample_next
from ascend_llm.interop import hf
from ascend_llm.interop.safetensors_io import read_tensors

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
        _LOADED[name] = hf.load(fixture(name)) + (json.loads(fixture(f"{name}.golden.json").read_text()),)
    return _LOADED[name]


def test_batch_greedy_matches_transformers_and_stops():
    model, _, tokenizer, meta = loaded("llama_gqa")
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]  # 38 'G', 6 "'", 411 '萬', 13 '.'
    engine = Engine(model, max_len=64, num_slots=2, prefill_bucket=32)
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
    assert by_token.token_ids == golden[:3] and by_token.finish_reason == "stop_token"
    assert by_string.token_ids == golden[:4] and by_string.finish_reason == "stop_string"
    assert by_string.text == tokenizer.decode(golden[:3])
    with pytest.raises(ConfigError, match="prompt length"):
        engine.prefill([0], [list(range(64))])


def test_logits_with_cache_equal_logits_without():
    name = "qwen3_qknorm"  # q/k norm, head_dim != dim/heads, GQA: the most to get wrong
    model, cfg, _, _ = loaded(name)
    ids = read_tensors(fixture(f"{name}.golden.safetensors"))["batch_input_ids"].astype(np.int32)
    batch, length = ids.shape
    forward = CachedForward(model, 32)
    keys, values = empty_cache(cfg, batch + 1, 32)
    rows = Tensor(np.array([2, 0], np.int32))  # slots in any order; slot 1 stays untouched
    prefill = 9
    logits, keys, values = forward(Tensor(ids[:, :prefill]), rows, Tensor(np.zeros(batch, np.int32)),
                                   Tensor(np.tile(np.arange(prefill, dtype=np.int32), (batch, 1))),
                                   mutable(keys), mutable(values))
    steps = [logits.asnumpy()]
    for pos in range(prefill, length):
        logits, keys, values = forward(Tensor(ids[:, pos:pos + 1]), rows, Tensor(np.full(batch, pos, np.int32)),
                                       Tensor(np.zeros((batch, 1), np.int32)), mutable(keys), mutable(values))
        steps.append(logits.asnumpy())
    np.testing.assert_allclose(np.concatenate(steps, 1), model(Tensor(ids)).asnumpy(), rtol=0, atol=CACHE_TOL)
    assert not keys[0].asnumpy()[1].any() and keys[0].asnumpy()[0, :, :length].any()


def test_prefill_by_decode_matches_transformers_with_one_graph():
    """Prompts of different lengths fed through the decode graph (no prefill graph): each row's first logits equal
    the no-cache forward at its last prompt position, and the greedy continuation is transformers' golden one."""
    model, _, tokenizer, meta = loaded("llama_gqa")
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]
    engine = Engine(model, max_len=64, num_slots=2, prefill_by_decode=True)
    short = prompt[:5]
    logits = engine.prefill([1, 0], [short, prompt])
    window = np.zeros((2, len(prompt)), np.int32)
    window[0, :len(short)], window[1] = short, prompt
    full = model(Tensor(window)).asnumpy()
    np.testing.assert_allclose(logits, full[[0, 1], [len(short) - 1, len(prompt) - 1]], rtol=0, atol=CACHE_TOL)
    result = engine.generate([prompt], SamplingParams(max_new_tokens=len(golden)), tokenizer)[0]
    assert result.token_ids == golden


def test_closing_sample_says_when_the_window_cuts_the_prompt(caplog):
    from ascend_llm.train.sample import generate

    model, _, tokenizer, meta = loaded("llama_gqa")
    text = tokenizer.decode(meta["text_input_ids"])
    with caplog.at_level("INFO", logger="ascend_llm.train"):
        out = generate(model, tokenizer, text, num_tokens=4, seq_len=10)
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
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0).validate()
