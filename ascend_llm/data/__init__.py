"""Corpus reading, tokenizer training, token memmaps, packed and blended datasets."""

from ascend_llm.data.dataset import PackedDataset, shard_rows
from ascend_llm.data.prepare import PreparedData, prepare, prepare_sources

__all__ = ["PackedDataset", "PreparedData", "prepare", "prepare_sources", "shard_rows"]
