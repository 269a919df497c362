"""Incremental detokenization equals a full decode of the ids (multi-byte Chinese over byte-fallback tokens, never a
split character), special tokens never reach the text, stop strings spanning tokens cut the text before them, and
released text is never retracted."""

from __future__ import annotations

from pathlib import Path

import pytest

from ascend_llm.inference.detokenize import IncrementalDetokenizer
from ascend_llm.tokenizer.hf import HFTokenizer

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
TEXT = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。 Spring sleep, unaware of dawn."


@pytest.fixture(scope="module", params=["llama_gqa", "qwen2_tied"])
def tokenizer(request):
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return HFTokenizer(FIXTURES / request.param)


def stream(tokenizer, prompt, ids, stops=()):
    detok = IncrementalDetokenizer(tokenizer, prompt, stops)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finish())
    return detok, deltas


def test_deltas_join_to_the_full_decode_and_never_split_a_character(tokenizer):
    prompt = tokenizer.encode("古诗：", add_special_tokens=False)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT) // 2  # byte-fallback pieces: characters span several tokens
    detok, deltas = stream(tokenizer, prompt, ids)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    split = [i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i])]
    assert split  # some prefixes end inside a character: those were held back


def test_special_tokens_never_in_text_and_never_match_a_stop(tokenizer):
    special = tokenizer.eos_token_id
    assert special is not None
    ids = tokenizer.encode("花落知多少", add_special_tokens=False)
    mixed = ids[:2] + [special] + ids[2:]
    detok, deltas = stream(tokenizer, [], mixed, stops=[tokenizer.eos_token, tokenizer.eos_token[1:4]])
    assert detok.text == "花落知多少" and detok.stop is None


def test_stop_string_spanning_tokens_cuts_before_it_and_never_retracts(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    full = tokenizer.decode(ids)
    for stop in ("闻啼鸟", "。夜", "unaware", "dawn."):
        detok = IncrementalDetokenizer(tokenizer, [], ["never there", stop])
        released = ""
        for token in ids:
            released += detok.push(token)
            assert detok.text == released and full.startswith(released)  # only ever grows, a prefix of the text
            if detok.stop is not None:
                break
        released += detok.finish()
        assert detok.stop == stop and released == full[:full.index(stop)]
        assert stop not in released


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer):
    ids = tokenizer.encode("处处闻啼", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], ["闻啼X"])
    for token in ids:
        detok.push(token)
        assert not detok.text.endswith("闻") and not detok.text.endswith("闻啼")
    assert detok.text == "处处" and detok.finish() == "闻啼" and detok.text == "处处闻啼" and detok.stop is None
