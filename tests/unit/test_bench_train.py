"""`bench train --peer`: the peer gets the recipe's dims, its tokens/s is parsed, and ratios are ours/peer."""

from __future__ import annotations

import json
import sys

import yaml

from ascend_llm.bench.train import add_ratios, peer_dims, run_peer
from ascend_llm.compose import recipes_dir

FAKE_PEER = """import json, sys, time
time.sleep(0.3)
json.dump(sys.argv[1:], open(sys.argv[0] + ".args", "w"))
print("warming up")
print("torch eager: params 5.00M, step 400.0 ms, tokens/s 5120, loss 3.1")
"""


def test_peer_runs_on_the_recipe_dims_and_reports_ratios(tmp_path):
    tiny = yaml.safe_load((recipes_dir() / "model" / "tiny.yaml").read_text())
    dims = peer_dims("tiny", ["data.seq_len=128", "train.global_batch_size=4"])
    assert dims == {"dim": tiny["dim"], "layers": tiny["num_layers"], "heads": tiny["num_heads"],
                    "kv-heads": tiny["num_kv_heads"], "ffn": tiny["ffn_hidden_dim"], "vocab": tiny["vocab_size"],
                    "seq": 128, "batch": 4}
    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    row = run_peer(str(script), sys.executable, dims, steps=7, sdpa=True)
    args = json.loads((tmp_path / "peer.py.args").read_text())
    assert f"--dim={tiny['dim']}" in args and "--seq=128" in args and "--steps=7" in args and "--sdpa" in args
    assert row["mode"] == "peer-sdpa" and row["tokens_per_s"] == 5120.0 and row["tokens_per_step"] == 512
    assert row["step_ms"] == 100.0 and row["peak_rss_mib"] > 0
    rows = [{"mode": "graph", "tokens_per_s": 2560.0, "peak_rss_mib": 300},
            {"mode": "peer", "tokens_per_s": 5120.0, "peak_rss_mib": 100}]
    add_ratios(rows)
    assert rows[0]["vs_peer_tokens_per_s"] == 0.5 and rows[0]["vs_peer_peak_rss"] == 3.0
