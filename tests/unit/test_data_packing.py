"""Packing by documents: validation split, segment ids and boundary-masked labels, blending and resume.
References are plain Python loops over the document layout written in the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ascend_llm.config.data import DataConfig, parse_sources
from ascend_llm.data import IGNORE_INDEX, BlendedDataset, PackedDataset, build_dataset, prepare_sources
from ascend_llm.data.dataset import segment_positions
from ascend_llm.errors import ConfigError


def layout(lengths: list[int], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens = 0, 1, 2, ... (so a token's value is its position); doc_ends = last position of each doc."""
    ends = np.cumsum(lengths) - 1
    return np.arange(start, start + int(np.sum(lengths)), dtype=np.uint32), ends


def reference_doc_of(lengths: list[int]) -> list[int]:
    out = []
    for doc, n in enumerate(lengths):
        out += [doc] * n
    return out


def test_segments_and_masked_labels_match_a_reference():
    lengths = [5, 17, 3, 40, 9, 26]
    tokens, ends = layout(lengths)
    seq = 8
    ds = PackedDataset(tokens, seq, val_fraction=0.0, seed=0, doc_ends=ends, unit_windows=100)
    doc_of = reference_doc_of(lengths)
    assert ds.num_train == (len(tokens) - 1) // seq
    x, y, seg = ds.batch(np.arange(ds.num_train), with_segments=True)
    assert x.dtype == y.dtype == seg.dtype == np.int32 and seg.shape == x.shape == (ds.num_train, seq)
    for row in range(ds.num_train):
        pos = list(range(row * seq, row * seq + seq + 1))
        docs = [doc_of[p] for p in pos]
        expect_seg = [len(set(docs[:t + 1])) - 1 for t in range(seq)]  # docs ascend along the window
        expect_y = [pos[t + 1] if docs[t + 1] == docs[t] else IGNORE_INDEX for t in range(seq)]
        assert x[row].tolist() == pos[:-1] and y[row].tolist() == expect_y and seg[row].tolist() == expect_seg
    plain_x, plain_y = ds.batch(np.arange(ds.num_train))
    np.testing.assert_array_equal(plain_x, x)
    np.testing.assert_array_equal(plain_y[y != IGNORE_INDEX], y[y != IGNORE_INDEX])
    # the label of a document's last text token is its EOS (same segment), the EOS's label is ignored
    eos_positions = set(ends.tolist())
    assert all((y.reshape(-1)[x.reshape(-1) == e] == IGNORE_INDEX).all() for e in eos_positions)


def test_validation_holds_out_whole_documents_spread_over_the_corpus():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 60, size=1000).tolist()
    tokens, ends = layout(lengths)
    ds = PackedDataset(tokens, 16, val_fraction=0.1, seed=3, doc_ends=ends)
    doc_of = np.asarray(reference_doc_of(lengths))
    train_tokens = set(ds.batch(np.arange(ds.num_train))[0].reshape(-1).tolist())
    val_x = ds.batch(ds.num_train + np.arange(ds.num_val))[0].reshape(-1)
    val_docs = sorted(set(doc_of[val_x].tolist()))
    assert not train_tokens & set(val_x.tolist())  # disjoint
    for d in val_docs[:-1]:  # whole documents (the last window may stop inside the last held-out one)
        start = int(np.sum(lengths[:d]))
        assert set(range(start, start + lengths[d])) <= set(val_x.tolist()) | {start + lengths[d] - 1}
    share = ds.describe_split()["val_tokens"] / len(tokens)
    assert 0.1 <= share < 0.1 + 60 / len(tokens) + 1e-9
    assert val_docs[0] < 100 and val_docs[-1] > 900 and len(val_docs) > 50  # spread, not the tail
    sample = ds.val_indices(20)
    np.testing.assert_array_equal(sample, PackedDataset(tokens, 16, 0.1, 3, ends).val_indices(20))
    assert len(set(sample.tolist())) == 20 and sample.min() >= ds.num_train


def test_one_long_document_is_held_out_in_pieces():
    tokens, ends = layout([5000])
    ds = PackedDataset(tokens, 10, val_fraction=0.05, seed=1, doc_ends=ends, unit_windows=4)
    info = ds.describe_split()
    assert info["val_units"] >= 6 and info["val_tokens"] >= 250 and ds.num_val > 0
    _, y, seg = ds.batch(ds.num_train + np.arange(ds.num_val), with_segments=True)
    pieces_jump = (np.diff(ds.batch(ds.num_train + np.arange(ds.num_val))[0], axis=1) != 1)
    assert (y[:, :-1][pieces_jump] == IGNORE_INDEX).all()  # no target across two non-adjacent pieces


def test_sampler_is_a_pure_function_of_seed_and_position():
    tokens, ends = layout([100] * 10 + [1])
    ds = PackedDataset(tokens, 10, val_fraction=0.1, seed=5, doc_ends=ends)
    n = ds.num_train
    epoch0 = ds.train_indices(0, n)
    assert sorted(epoch0.tolist()) == list(range(n))
    epoch1 = ds.train_indices(n, n)
    assert sorted(epoch1.tolist()) == list(range(n)) and not np.array_equal(epoch0, epoch1)
    resumed = PackedDataset(tokens, 10, 0.1, 5, ends).train_indices(n - 5, 10)
    np.testing.assert_array_equal(resumed, np.concatenate([epoch0[n - 5:], epoch1[:5]]))
    assert not np.array_equal(epoch0, PackedDataset(tokens, 10, 0.1, 6, ends).train_indices(0, n))


def source_of(index: np.ndarray, blend: BlendedDataset) -> np.ndarray:
    sizes = [d.num_train + d.num_val for d in blend.datasets]
    bounds = np.cumsum(sizes)
    return np.array([int(np.argmax(i < bounds)) for i in index])


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.05, 0.95)])
def test_blend_realised_mix_within_2_points_and_resume_exact(weights):
    layouts = [layout([50] * (20 + 30 * k), start=100_000 * k) for k in range(len(weights))]
    datasets = [PackedDataset(tokens, 8, 0.05, 11 + k, ends) for k, (tokens, ends) in enumerate(layouts)]
    blend = BlendedDataset(datasets, weights, seed=9)
    drawn = blend.train_indices(0, 10_000)
    share = np.bincount(source_of(drawn, blend), minlength=len(weights)) / 10_000
    assert np.abs(share - np.asarray(weights)).max() <= 0.02
    mix = blend.describe_mix(10_000)
    assert [m["share"] for m in mix.values()] == pytest.approx(share.tolist(), abs=1e-4)
    np.testing.assert_array_equal(BlendedDataset(datasets, weights, seed=9).train_indices(4321, 777),
                                  drawn[4321:4321 + 777])
    assert not np.array_equal(BlendedDataset(datasets, weights, seed=10).train_indices(0, 500), drawn[:500])
    x, y, seg = blend.batch(drawn[:6], with_segments=True)
    for row, index in enumerate(drawn[:6]):
        k = int(source_of(np.array([index]), blend)[0])
        local = int(index - sum(d.num_train + d.num_val for d in datasets[:k]))
        assert local < datasets[k].num_train  # train windows only
        np.testing.assert_array_equal(x[row], datasets[k].window(local)[:-1])
        assert x[row].min() >= 100_000 * k and x[row].max() < 100_000 * (k + 1)


def test_blend_sources_prepared_with_one_tokenizer(tmp_path):
    for name, char in (("a.jsonl", "春"), ("b.jsonl", "hello ")):
        (tmp_path / name).write_text("".join(json.dumps({"text": char * (i % 7 + 3) + str(i)}) + "\n"
                                             for i in range(300)))
    cfg = DataConfig(sources=["0.7", str(tmp_path / "a.jsonl"), "0.3", str(tmp_path / "b.jsonl")], vocab_size=300,
                     seq_len=8, cache_dir=str(tmp_path / "cache"))
    cfg.validate()
    prepared = prepare_sources(cfg)
    assert len(prepared) == 2 and prepared[0].tokenizer().to_str() == prepared[1].tokenizer().to_str()
    blend = build_dataset(cfg, prepared)
    assert isinstance(blend, BlendedDataset) and set(blend.describe_mix(0)) == {str(tmp_path / "a.jsonl"),
                                                                                str(tmp_path / "b.jsonl")}
    assert prepare_sources(cfg)[1].path == prepared[1].path  # cached
    split = blend.describe_split()
    assert split["val_tokens"] == sum(v["val_tokens"] for v in split["sources"].values()) > 0


@pytest.mark.parametrize("items, field", [(["0.7", "a", "0.3"], "data.sources"), (["x", "a", "1", "b"],
                                                                                   "data.sources[0]"),
                                          (["-1", "a", "1", "b"], "data.sources[0]"),
                                          (["0", "a", "0", "b"], "data.sources")])  # weight 0: validation only
def test_bad_sources_name_the_entry(items, field):
    with pytest.raises(ConfigError) as info:
        parse_sources(items)
    assert info.value.field == field
    assert parse_sources(["3", "a", "1", "b"]) == [(0.75, "a"), (0.25, "b")]


def test_sources_compose_from_the_command_line_convention():
    from ascend_llm.compose import compose_recipe

    recipe = compose_recipe(["data.sources=[0.7,a.jsonl,0.3,b_folder]", "data.on_bad_record=skip"])
    assert parse_sources(recipe.data.sources) == [(0.7, "a.jsonl"), (pytest.approx(0.3), "b_folder")]
    with pytest.raises(ConfigError, match="data.on_bad_record='warn': allowed: error, skip"):
        compose_recipe(["data.on_bad_record=warn"])


def test_segment_positions_restart_at_each_document():
    seg = np.array([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    rng = np.random.default_rng(2)
    seg = np.cumsum(rng.random((4, 50)) < 0.1, axis=1)
    expect = [[t - min(u for u in range(t + 1) if row[u] == row[t]) for t in range(50)] for row in seg.tolist()]
    assert segment_positions(seg).tolist() == expect
