"""The public Hugging Face import API: `load(path) -> (model, model_config, tokenizer)` opens a Llama, Qwen2 or
Qwen3 directory through the one model opener (interop/source.py `open_model`, which also reads checkpoints, runs and
quantized directories); the reading pieces it is built from live in interop/hf_files.py and are re-exported here.

model: `ascend_llm.models.llama.Transformer` with float32 parameters in inference mode; model(int32 (B, T)) returns
float32 logits (B, T, vocab). tokenizer: `HFTokenizer`. Raises InteropError (one line naming the file and key).
"""

from __future__ import annotations

from pathlib import Path

from ascend_llm.interop.hf_files import (  # noqa: F401  (the public reading pieces)
    HF_FIELDS,
    assign_weights,
    check_config_fits,
    check_sizes,
    read_config,
    read_hf_weights,
    weight_files,
)


def load(path: str | Path):
    """(model, ModelConfig, HFTokenizer) of a model directory, through `open_model` (see the module docstring)."""
    from ascend_llm.interop.source import open_model

    opened = open_model(path)
    return opened.model, opened.config, opened.tokenizer
