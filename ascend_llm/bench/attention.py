"""Attention benchmark: causal forward+backward time, GFLOP/s (FlashAttention's count), peak RSS and max error
vs a float64 reference, for naive and segmented attention over sequence lengths. Each configuration runs in a
fresh process so its peak RSS is its own.

  python scripts/bench_attention.py [--lengths 1024,2048,...] [--out bench_results/attention.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from ascend_llm.bench.report import print_table, write_json

BATCH, HEADS, HEAD_DIM = 1, 8, 64
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,40960"
NAIVE_MAX = 4096  # naive at 8192 needs > 24 GiB here (the N x N scores and their gradient in fp32)
REFERENCE_MAX = 4096


def inputs(seq: int):
    rng = np.random.default_rng(seq)
    q, k, v, d_out = (rng.standard_normal((BATCH, HEADS, seq, HEAD_DIM)).astype(np.float32) for _ in range(4))
    return q, k, v, d_out


def child(backend: str, seq: int, block: int, repeats: int, save: str) -> dict:
    """Runs in the fresh process: compile, time fwd+bwd, report ru_maxrss."""
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.attention import attention
    from ascend_llm.train.runtime import set_cpu_threads

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_cpu_threads(os.cpu_count() or 1)
    q, k, v, d_out = inputs(seq)
    weight = Tensor(d_out)

    def loss(q_, k_, v_):
        out = attention(q_, k_, v_, causal=True, backend=backend, block_q=block, block_k=block)
        return (out * weight).sum(), out

    step = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))
    args = (Tensor(q), Tensor(k), Tensor(v))
    start = time.perf_counter()
    (_, out), grads = step(*args)
    out.asnumpy()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        (_, out), grads = step(*args)
        grads[0].asnumpy()
        times.append(time.perf_counter() - start)
    if save:
        np.savez(save, out=out.asnumpy(), dq=grads[0].asnumpy(), dk=grads[1].asnumpy(), dv=grads[2].asnumpy())
    return {"time_s": min(times), "first_call_s": compile_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def reference_error(seq: int, saved: str) -> float:
    """Max abs error of output and gradients vs float64 NumPy (causal, same inputs)."""
    q, k, v, d_out = (x.astype(np.float64) for x in inputs(seq))
    got = np.load(saved)
    scale = HEAD_DIM ** -0.5
    s = q @ k.transpose(0, 1, 3, 2) * scale
    s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    del s
    out = p @ v
    dv = p.transpose(0, 1, 3, 2) @ d_out
    dp = d_out @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (d_out * out).sum(-1, keepdims=True))
    del p, dp
    dq, dk = ds @ k * scale, ds.transpose(0, 1, 3, 2) @ q * scale
    return float(max(np.abs(got[name] - ref).max() for name, ref in
                     (("out", out), ("dq", dq), ("dk", dk), ("dv", dv))))


def run_config(backend: str, seq: int, block: int, repeats: int, with_error: bool) -> dict:
    from ascend_llm.attention.blocks import attention_flops

    with tempfile.TemporaryDirectory() as tmp:
        save = os.path.join(tmp, "out.npz") if with_error else ""
        cmd = [sys.executable, "-m", "ascend_llm.bench.attention", "--child", backend, str(seq), str(block),
               str(repeats), save]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"backend": backend, "seq_len": seq, "block": block if backend == "segmented" else ""}
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.splitlines() if x.strip() and "[WARNING]" not in x]
            reason = "killed by the OS (out of memory)" if proc.returncode == -9 else (lines[-1][:120] if lines else "")
            return {**row, "status": f"failed (exit {proc.returncode}): {reason}"}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        flops = attention_flops(BATCH, HEADS, seq, seq, HEAD_DIM, causal=True)
        row.update(status="ok", time_s=round(result["time_s"], 3), first_call_s=round(result["first_call_s"], 2),
                   gflops=round(flops / result["time_s"] / 1e9, 1),
                   peak_rss_mib=round(result["peak_rss_mib"]))
        if with_error:
            row["max_err"] = f"{reference_error(seq, save):.1e}"
        return row


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        backend, seq, block, repeats, save = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5]
        print(json.dumps(child(backend, seq, block, repeats, save)))
        return 0
    parser = argparse.ArgumentParser(prog="bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS)
    parser.add_argument("--backends", default="naive,segmented")
    parser.add_argument("--block", type=int, default=512, help="segmented block size (block_q = block_k)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the compiling one (min is kept)")
    parser.add_argument("--out", default="bench_results/attention.json")
    args = parser.parse_args(argv)
    rows = []
    for seq in (int(x) for x in args.lengths.split(",")):
        for backend in args.backends.split(","):
            if backend == "naive" and seq > NAIVE_MAX:
                rows.append({"backend": backend, "seq_len": seq, "status": f"skipped: N x N scores do not fit "
                             f"(naive runs only to N={NAIVE_MAX} on 24 GiB)"})
            else:
                rows.append(run_config(backend, seq, args.block, args.repeats, seq <= REFERENCE_MAX))
            print(json.dumps(rows[-1]), flush=True)
    seg = {r["seq_len"]: r for r in rows if r["backend"] == "segmented" and r.get("status") == "ok"}
    lengths = sorted(seg)
    growth = {f"{a}->{b}": round(seg[b]["peak_rss_mib"] / seg[a]["peak_rss_mib"], 2)
              for a, b in zip(lengths, lengths[1:]) if b == 2 * a}
    print_table(rows, ["backend", "seq_len", "block", "status", "time_s", "first_call_s", "gflops",
                       "peak_rss_mib", "max_err"])
    print("segmented peak-RSS growth N -> 2N:", growth)
    path = write_json(args.out, "attention", rows, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, causal=True,
                      dtype="float32", memory_growth=growth)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
