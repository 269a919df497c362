"""`ascend-llm train model.pretrained=DIR data.format=sft`: a short full fine-tune of a tiny HF fixture on a
title -> poem instruction set from ../shared/corpora/tang_poems.jsonl lowers the assistant-token loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = next((p / "shared" for p in Path(__file__).resolve().parents
               if (p / "shared" / "fixtures" / "hf").is_dir()), None)


def test_cli_sft_finetune_lowers_assistant_loss(tmp_path):
    if SHARED is None or not (SHARED / "corpora" / "tang_poems.jsonl").is_file():
        pytest.skip("shared fixtures or corpora absent")
    records = []
    with open(SHARED / "corpora" / "tang_poems.jsonl", encoding="utf-8") as handle:
        for line in handle:
            title, _, body = json.loads(line)["text"].partition("\n")
            body = body.split("\n")[0]
            if 8 <= len(body) <= 24 and len(title) <= 8:
                records.append({"instruction": f"題：{title}", "output": body})
            if len(records) == 32:
                break
    data = tmp_path / "tang_sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    model = SHARED / "fixtures" / "hf" / "qwen2_tied"
    cmd = [sys.executable, "-m", "ascend_llm.cli.main", "train", f"model.pretrained={model}",
           "data.format=sft", f"data.path={data}", "data.document_mask=true", f"data.cache_dir={tmp_path / 'cache'}",
           "data.seq_len=128", "train.num_steps=12", "train.global_batch_size=4", "optim.lr=3e-3",
           "optim.warmup_steps=2", "train.log_every=1",
           "train.sample_tokens=0", "train.progress=false", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the logged loss is the mean over labelled (assistant) tokens only: data.format=sft labels nothing else
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
