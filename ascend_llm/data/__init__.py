"""Corpus reading, tokenizer training, token memmaps and packed datasets."""

from ascend_llm.data.dataset import PackedDataset, shard_rows
from ascend_llm.data.prepare import PreparedData, prepare

__all__ = ["PackedDataset", "PreparedData", "prepare", "shard_rows"]
