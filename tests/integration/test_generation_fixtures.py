"""Generation over every Hugging Face fixture (graph mode: two compiled graphs per model, slow on a shared CPU):
greedy continuations equal transformers' token for token; the CLI and the trainer's closing sample agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ascend_llm.cli.main import main as cli_main
from ascend_llm.inference import Engine, SamplingParams
from ascend_llm.train.sample import generate as closing_sample
from tests.conftest import open_fixture

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
NAMES = ["llama_gqa", "qwen2_tied", "qwen3_qknorm", "llama_bf16"]
pytestmark = pytest.mark.integration


def fixture(name: str) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return FIXTURES / name


def loaded(name: str):
    return open_fixture(fixture(name)) + (json.loads(fixture(f"{name}.golden.json").read_text()),)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_continuation_matches_transformers(name):
    model, _, tokenizer, meta = loaded(name)
    golden = meta["greedy_continuation_ids"]
    engine = Engine(model, max_len=64, num_slots=1, max_chunk=32)
    result = engine.generate([meta["text_input_ids"]], SamplingParams(max_new_tokens=len(golden)), tokenizer)[0]
    assert result.token_ids == golden and result.finish_reason == "length"


def test_generate_cli(capsys):
    _, _, _, meta = loaded("qwen2_tied")
    assert cli_main(["generate", str(fixture("qwen2_tied")), "--prompt", meta["text"], "--max-new-tokens", "12",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["token_ids"] == meta["greedy_continuation_ids"]
    assert out["decode_tokens_per_s"] > 0


def test_generate_cli_refuses_more_tokens_than_the_context(capsys):
    """A prompt plus --max-new-tokens beyond config.json's max_position_embeddings is one line naming the flag, exit
    2 (serve refuses the same request with a 400; 100,000 new tokens used to run for minutes)."""
    context = json.loads((fixture("qwen2_tied") / "config.json").read_text())["max_position_embeddings"]
    assert cli_main(["generate", str(fixture("qwen2_tied")), "--prompt", "hi", "--max-new-tokens", str(context)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--max-new-tokens" in lines[0] and f"context of {context} positions" in lines[0], lines


def test_closing_sample_uses_the_engine():
    model, _, tokenizer, meta = loaded("qwen2_tied")  # no BOS: the sample's encoding equals text_input_ids
    expected = tokenizer.decode(meta["text_input_ids"] + meta["greedy_continuation_ids"])
    assert closing_sample(model, tokenizer.tokenizer, meta["text"], 12, seq_len=256) == expected
