"""Corpus reading, tokenizer, token memmap and the packed dataset (split, shuffling, sharding, resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ascend_llm.config.data import DataConfig
from ascend_llm.data import PackedDataset, prepare, shard_rows
from ascend_llm.data.corpus import read_documents, stdlib_files
from ascend_llm.errors import DataError


def make_cfg(tmp_path, path, **kw) -> DataConfig:
    return DataConfig(path=str(path), vocab_size=300, cache_dir=str(tmp_path / "cache"), **kw)


def test_jsonl_txt_and_folder_are_read(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "春眠不覺曉"}\n\n{"text": "處處聞啼鳥", "x": 1}\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("hello world\n")
    assert read_documents(str(tmp_path / "a.jsonl")) == ["春眠不覺曉", "處處聞啼鳥"]
    assert read_documents(str(tmp_path / "b.txt")) == ["hello world\n"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("one")
    (folder / "y.txt").write_text("two")
    assert read_documents(str(folder)) == ["one", "two"]


def test_embedded_corpus_is_the_stdlib():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    docs = read_documents(None, max_bytes=50_000)
    assert docs and sum(len(d.encode()) for d in docs) >= 50_000


@pytest.mark.parametrize("content, field, rule", [
    (None, "data.path", "does not exist"),
    ("", "data.path", "no non-empty text"),
    ('{"body": "x"}\n', ".text", "'text' field"),
    ("{not json\n", "bad.jsonl:1", "not valid JSON"),
])
def test_bad_corpus_names_the_problem(tmp_path, content, field, rule):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        read_documents(str(path))
    assert field in str(info.value) and rule in str(info.value)


def test_prepare_writes_memmap_with_eos_between_documents(tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = [f"document number {i}: " + "床前明月光，疑是地上霜。" * (i + 1) for i in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    prepared = prepare(make_cfg(tmp_path, corpus))
    meta, tokens, tok = prepared.meta, prepared.tokens(), prepared.tokenizer()
    assert meta["num_docs"] == 20 and meta["num_tokens"] == len(tokens) and meta["vocab_size"] <= 300
    eos_positions = np.flatnonzero(np.asarray(tokens) == meta["eos_id"])
    assert len(eos_positions) == 20 and eos_positions[-1] == len(tokens) - 1
    pieces = np.split(np.asarray(tokens), eos_positions + 1)[:-1]
    assert [tok.decode([int(t) for t in piece[:-1]]) for piece in pieces] == docs  # lossless byte-level BPE
    again = prepare(make_cfg(tmp_path, corpus))
    assert again.path == prepared.path  # cached
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_given_tokenizer_is_used(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc abc abd " * 200)
    first = prepare(make_cfg(tmp_path, corpus))
    second = prepare(DataConfig(path=str(corpus), tokenizer=str(first.path / "tokenizer.json"),
                                cache_dir=str(tmp_path / "cache2")))
    np.testing.assert_array_equal(np.asarray(first.tokens()), np.asarray(second.tokens()))
    with pytest.raises(DataError, match="data.tokenizer"):
        prepare(DataConfig(path=str(corpus), tokenizer=str(corpus), cache_dir=str(tmp_path / "c3")))


def test_packed_windows_and_shards():
    tokens = np.arange(1001, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=10, val_fraction=0.0, seed=5)
    assert (ds.num_train, ds.num_val) == (100, 0)
    x, y = ds.batch(np.array([3]))
    np.testing.assert_array_equal(x[0], np.arange(30, 40))
    np.testing.assert_array_equal(y[0], np.arange(31, 41))
    held = PackedDataset(tokens, seq_len=10, val_fraction=0.1, seed=5)
    assert held.num_train + held.num_val <= 100 and held.describe_split()["val_tokens"] >= 100
    batch = ds.train_indices(0, 8)
    shards = [shard_rows(batch, r, 4) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate(shards), batch)


def test_corpus_too_small_for_one_window():
    with pytest.raises(DataError, match="data.seq_len=64"):
        PackedDataset(np.arange(30, dtype=np.uint16), seq_len=64, val_fraction=0.0, seed=0)
