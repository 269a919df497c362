"""Corpus reading, tokenizer training, token memmaps, packed and blended datasets."""

from ascend_llm.data.blend import BlendedDataset, build_dataset
from ascend_llm.data.dataset import IGNORE_INDEX, PackedDataset, shard_rows
from ascend_llm.data.prepare import PreparedData, prepare, prepare_sources

__all__ = ["IGNORE_INDEX", "BlendedDataset", "PackedDataset", "PreparedData", "build_dataset", "prepare",
           "prepare_sources", "shard_rows"]
