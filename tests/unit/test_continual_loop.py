"""`ascend-llm continual` end to end on tiny settings: drift -> update with replay -> distillation -> table -> int8
and HF exports; the table's perplexities equal `ascend-llm eval` on the directories it produced; bad input is one
line with exit 2 and leaves nothing behind; without drift nothing is trained."""

from __future__ import annotations

import json

import mindspore as ms
import pytest

from tests.conftest import CORPORA, ROOT

FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf" / "llama_gqa"  # 2 layers, hidden 64, vocab 640
NUM_DOCS, HELDOUT = 200, 8
EVAL_BATCH = 64  # every held-out window of a corpus (39 old, 62 new) in one forward per window length
TINY_RUN = ["runtime=pynative", "train.num_steps=1", "train.global_batch_size=2", "data.seq_len=32",
            "train.log_every=1", "train.ckpt_every=1", "train.val_batches=0",
            "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=1"]
STUDENT = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
           "model.ffn_hidden_dim=64", "model.max_seq_len=64"]


def _corpus(path, source, num):
    lines = (CORPORA / source).read_text(encoding="utf-8").splitlines()[:num]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    for name in ("tang_poems.jsonl", "song_ci.jsonl"):
        if not (CORPORA / name).is_file():
            pytest.skip(f"shared corpus absent: {CORPORA / name}")
    if not FIXTURE.is_dir():
        pytest.skip(f"shared fixture absent: {FIXTURE}")
    root = tmp_path_factory.mktemp("continual")
    old, new = _corpus(root / "old.jsonl", "tang_poems.jsonl", NUM_DOCS), _corpus(root / "new.jsonl", "song_ci.jsonl",
                                                                                NUM_DOCS)
    return root, old, new


def _args(root, old, new, out, *extra):
    cache = f"data.cache_dir={root / 'cache'}"
    data = [cache, "data.max_bytes=12000"]  # the first ~60-120 documents of each; the last 8 stay held out
    return ["continual", str(FIXTURE), "--reference", str(old), "--new", str(new), "--out", str(out),
            "--samples", "16", "--batch-size", "16", "--max-tokens", "32", "--permutations", "20", "--pynative",
            f"--heldout-docs=-{HELDOUT}:", "--window", "32", "--stride", "31", "--eval-batch-size", str(EVAL_BATCH),
            *[f"--update={a}" for a in TINY_RUN + data],
            *[f"--student={a}" for a in TINY_RUN + data + STUDENT], *extra]


@pytest.fixture(scope="module")
def loop(corpora):
    from ascend_llm.cli.main import main

    root, old, new = corpora
    out = root / "loop"
    try:
        status = main(_args(root, old, new, out, "--always"))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    return status, out, json.loads((out / "report.json").read_text())


def test_the_loop_runs_and_its_table_equals_ascend_llm_eval(loop, corpora, capsys):
    from ascend_llm.cli.main import main

    status, out, report = loop
    _, old, new = corpora
    assert status == 0 and report["updated"] and isinstance(report["drift"], bool)
    assert [r["role"] for r in report["table"]] == ["old model", "updated (teacher)", "student + KD",
                                                     "student without KD", "student + KD, int8"]
    for name in ("teacher", "student_kd", "student_nokd"):
        assert (out / name / "summary.json").is_file()
    assert (out / "student_hf" / "config.json").is_file() and (out / "student_int8" / "config.json").is_file()
    table = report["table"]
    # every row's old-domain column; the new-domain column of the teacher and the KD student (eval's first model
    # gives the tokenizer: the old model's, shared by the whole loop)
    for key, corpus, rows in (("old", old, table), ("new", new, [table[0], table[1], table[2]])):
        capsys.readouterr()
        eval_json = out.parent / f"eval_{key}.json"
        try:
            assert main(["eval", *[r["model"] for r in rows], "--corpus", str(corpus), f"--docs=-{HELDOUT}:",
                         "--window", "32", "--stride", "31", "--batch-size", str(EVAL_BATCH), "--pynative",
                         "--json", str(eval_json)]) == 0
        finally:
            ms.set_context(mode=ms.GRAPH_MODE)
        assert [r["perplexity"] for r in json.loads(eval_json.read_text())] == [r["ppl"][key] for r in rows]
    teacher = report["table"][1]
    assert teacher["params"] == report["table"][0]["params"] > report["table"][2]["params"]


def test_bad_input_is_one_line_and_writes_nothing(corpora, capsys):
    from ascend_llm.cli.main import main

    root, old, new = corpora
    out = root / "refused"
    cases = [(["--replay", "1.0"], "config error: --replay=1.0"),
             (["--student=train.output_dir=x"], "config error: --student='train.output_dir=x'"),
             (["--heldout-docs=-1000:"], "config error: --update data.max_bytes=12000")]
    for extra, message in cases:
        assert main(_args(root, old, new, out, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
        assert not out.exists()
    out.mkdir()  # a non-empty --out: continual has no --overwrite, so the line does not offer one
    (out / "notes.txt").write_text("keep")
    assert main(_args(root, old, new, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "not empty" in err and "--overwrite" not in err and "\n" not in err, err
    assert (out / "notes.txt").read_text() == "keep"


def test_without_drift_nothing_is_trained(corpora):
    from ascend_llm.cli.main import main

    root, old, _ = corpora
    out = root / "same"
    try:
        status = main(_args(root, old, old, out, "--ref-docs", "0:100", "--new-docs", "100:200"))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    report = json.loads((out / "report.json").read_text())
    assert status == 0 and not report["drift"] and not report["updated"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
