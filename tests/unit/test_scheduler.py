"""The Scheduler's contract (CONTRACTS.md section 3) on real models: transformers' greedy goldens, stop tokens and
stop strings (text cut before them, special tokens never in it), logprobs from the sampled logits, cancellation
freeing every block within one step, poisonous values refused at submit, and a request failing while sampling
ending alone while the requests beside it complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.inference import Engine, Request, RequestError, SamplingParams, Scheduler
from tests.conftest import open_fixture

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
_LOADED: dict = {}


def loaded(name: str):
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    if name not in _LOADED:
        _LOADED[name] = open_fixture(FIXTURES / name) + (json.loads((FIXTURES / f"{name}.golden.json").read_text()),)
    return _LOADED[name]


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_greedy_goldens_through_the_scheduler_in_a_ragged_batch(name):
    model, _, tokenizer, meta = loaded(name)
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]
    scheduler = Scheduler(Engine(model, max_len=64, num_slots=2, block_size=8, max_chunk=16), tokenizer)
    short = prompt[:7]
    long_request, short_request = scheduler.generate([prompt, short], SamplingParams(max_new_tokens=len(golden)))
    assert long_request.out == golden and long_request.finish_reason == "length"
    ids = list(short)  # the shorter prompt of the batch equals its own greedy run without a cache
    for _ in range(len(golden)):
        window = np.zeros((1, 32), np.int32)
        window[0, :len(ids)] = ids
        ids.append(int(model(Tensor(window)).asnumpy()[0, len(ids) - 1].argmax()))
    assert short_request.out == ids[len(short):]
    assert long_request.text == tokenizer.decode(golden, skip_special_tokens=True)
    assert scheduler.engine.tokens_per_second()["decode_tokens_per_s"] > 0


def test_stop_token_stop_string_and_logprobs():
    model, _, tokenizer, meta = loaded("llama_gqa")
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]  # 38 'G', 6 "'", 411 '萬', 13 '.'
    scheduler = Scheduler(Engine(model, max_len=64, num_slots=3, block_size=8), tokenizer)
    stop_text = tokenizer.decode([golden[2], golden[3]])  # spans two tokens
    by_token, by_string, with_logprobs = scheduler.generate([prompt] * 3, [
        SamplingParams(max_new_tokens=12, stop_token_ids=[golden[2]]),
        SamplingParams(max_new_tokens=12, stop_strings=["never", stop_text]),
        SamplingParams(max_new_tokens=4, logprobs=3)])
    assert by_token.out == golden[:3] and by_token.finish_reason == "stop" and by_token.stop_reason == golden[2]
    assert by_token.text == tokenizer.decode(golden[:2])  # the stop token's text is not part of the text
    assert by_string.out == golden[:4] and by_string.finish_reason == "stop" and by_string.stop_reason == stop_text
    assert by_string.text == tokenizer.decode(golden[:2])
    window = np.zeros((1, 32), np.int32)  # the shape of the greedy test's no-cache runs: its graph runs again
    tokens = prompt + golden[:4]
    assert len(tokens) <= 32
    window[0, :len(tokens)] = tokens
    full = model(Tensor(window)).asnumpy()[0].astype(np.float64)
    for step, entry in enumerate(with_logprobs.logprobs):
        row = full[len(prompt) - 1 + step]
        reference = row - row.max() - np.log(np.exp(row - row.max()).sum())  # log_softmax of the raw logits
        assert entry.token_id == golden[step] and entry.token == tokenizer.decode([golden[step]])
        assert entry.logprob == pytest.approx(reference[golden[step]], abs=1e-4)
        assert [t for t, _, _ in entry.top] == list(np.argsort(-reference, kind="stable")[:3])
        assert [lp for _, _, lp in entry.top] == pytest.approx(np.sort(reference)[::-1][:3], abs=1e-4)


def test_cancel_frees_every_block_within_one_step():
    model, _, tokenizer, meta = loaded("llama_gqa")
    scheduler = Scheduler(Engine(model, max_len=64, num_slots=2, block_size=4), tokenizer)
    running = scheduler.submit(Request(meta["text_input_ids"], SamplingParams(max_new_tokens=20)))
    waiting = [scheduler.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=20))) for _ in range(2)]
    for _ in range(3):
        scheduler.step()
    assert scheduler.stats()["kv_blocks_used"] >= -(-len(meta["text_input_ids"]) // 4)
    assert scheduler.stats()["running"] == 2 and scheduler.stats()["waiting"] == 1
    assert scheduler.cancel(waiting[1].request_id) and waiting[1].finish_reason == "cancelled"  # at once
    assert scheduler.cancel(running.request_id) and scheduler.cancel(waiting[0].request_id)
    scheduler.step()
    assert running.finish_reason == waiting[0].finish_reason == "cancelled" and running.done.is_set()
    stats = scheduler.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and not scheduler.cancel(running.request_id)


@pytest.mark.parametrize("field, value", [("seed", -1), ("seed", 2**63), ("temperature", 1e-310),
                                          ("temperature", float("nan")), ("temperature", 2.5),
                                          ("repetition_penalty", 1e-320), ("repetition_penalty", float("inf")),
                                          ("top_p", 0.0), ("top_k", -1), ("max_new_tokens", 0), ("logprobs", 21)])
def test_poisonous_values_are_refused_naming_the_field(field, value):
    with pytest.raises(RequestError, match=field) as caught:
        SamplingParams(**{field: value}).validate()
    assert "\n" not in caught.value.one_line()


def test_a_request_failing_while_sampling_ends_alone():
    model, _, tokenizer, meta = loaded("llama_gqa")
    prompt, golden = meta["text_input_ids"], meta["greedy_continuation_ids"]
    scheduler = Scheduler(Engine(model, max_len=64, num_slots=3, block_size=8), tokenizer)
    good = [scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=len(golden)))) for _ in range(2)]
    poisoned = scheduler.submit(Request(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1)))
    poisoned.params.temperature = float("nan")  # past validation, as a bug would let it: sampling now fails
    scheduler.run_until_idle()
    assert poisoned.finish_reason == "error" and isinstance(poisoned.error, FloatingPointError)
    assert [r.out for r in good] == [golden, golden] and all(r.finish_reason == "length" for r in good)
    assert scheduler.stats()["kv_blocks_used"] == 0


def test_impossible_requests_are_refused_at_submit():
    model, _, tokenizer, _ = loaded("llama_gqa")
    scheduler = Scheduler(Engine(model, max_len=32, num_slots=1, block_size=8), tokenizer)
    with pytest.raises(RequestError, match="prompt"):
        scheduler.submit(Request(list(range(32)), SamplingParams()))
    with pytest.raises(RequestError, match="max_new_tokens"):
        scheduler.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=30)))
    request = scheduler.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=None)))  # the rest of the context
    assert request.budget == 29
