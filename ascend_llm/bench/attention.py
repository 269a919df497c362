"""Attention benchmark: causal forward+backward time, GFLOP/s (FlashAttention's count), the peak memory of each
configuration's own process and max error vs a float64 reference, for naive and segmented attention over
sequence lengths, beside the PyTorch peer (SDPA, its CPU flash kernel) run in its own process in the same
sitting when a Python with torch is available.

  python scripts/bench_attention.py [--lengths 1024,2048,...] [--block auto|N] [--batch 1 --heads 8 --head-dim 64]
                                    [--peer PATH --peer-python PYTHON] [--out bench_results/attention.json]

Times: mean over `--repeats` calls after a first (compiling / warm-up) call, for both toolkit and peer (the
peer script averages the same way); `min_s` is the fastest toolkit call. Memory: `peak_mib` is the process's
own peak RSS (VmHWM; not ru_maxrss, which Linux carries over from the parent), `growth_mib` the peak above the
RSS right after the imports (toolkit rows only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ascend_llm.bench.report import print_table, write_json

DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,40960"
NAIVE_MAX_SCORES = 8 * 4096 * 4096  # batch*heads*N*N above which naive's N x N scores do not fit in 24 GiB
REFERENCE_MAX_SCORES = 8 * 4096 * 4096
REPO = Path(__file__).resolve().parents[2]
DEFAULT_PEER = REPO.parent / "shared" / "peers" / "torch_attention.py"
DEFAULT_PEER_PYTHON = REPO.parent / "peer-venv" / "bin" / "python"
# Runs the peer script with its own argv, then prints the process's own peak RSS (VmHWM, KiB).
PEER_WRAPPER = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
                "print('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")


def inputs(shape: tuple[int, int, int, int]):
    """q, k, v, d_out: float32 (batch, heads, seq, head_dim), seeded by the shape."""
    rng = np.random.default_rng(list(shape))
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(4))


def child(backend: str, shape: tuple[int, int, int, int], block: str, repeats: int, save: str) -> dict:
    """Runs in the fresh process: compile, time fwd+bwd, report this process's own peak memory."""
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.attention import attention
    from ascend_llm.bench.peak_memory import PeakMemory
    from ascend_llm.train.runtime import set_cpu_threads

    meter = PeakMemory().start()
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_cpu_threads(os.cpu_count() or 1)
    q, k, v, d_out = inputs(shape)
    weight = Tensor(d_out)
    blocks = {} if block == "auto" else {"block_q": int(block), "block_k": int(block)}

    def loss(q_, k_, v_):
        out = attention(q_, k_, v_, causal=True, backend=backend, **blocks)
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
    report = meter.stop()
    if save:
        np.savez(save, out=out.asnumpy(), dq=grads[0].asnumpy(), dk=grads[1].asnumpy(), dv=grads[2].asnumpy())
    return {"time_s": float(np.mean(times)), "min_s": min(times), "first_call_s": compile_s,
            "peak_mib": report.peak_mib, "growth_mib": report.growth_mib, "memory_method": report.method}


def reference_error(shape: tuple[int, int, int, int], saved: str) -> float:
    """Max abs error of output and gradients vs float64 NumPy (causal, same inputs)."""
    q, k, v, d_out = (x.astype(np.float64) for x in inputs(shape))
    seq, head_dim = shape[2], shape[3]
    got = np.load(saved)
    scale = head_dim ** -0.5
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


def _failure(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "[WARNING]" not in x]
    reason = "killed by the OS (out of memory)" if proc.returncode == -9 else (lines[-1][:120] if lines else "")
    return f"failed (exit {proc.returncode}): {reason}"


def run_config(backend: str, shape: tuple[int, int, int, int], block: str, repeats: int, with_error: bool) -> dict:
    from ascend_llm.attention.blocks import attention_flops

    batch, heads, seq, head_dim = shape
    row = {"backend": backend, "seq_len": seq, "block": block if backend == "segmented" else ""}
    with tempfile.TemporaryDirectory() as tmp:
        save = os.path.join(tmp, "out.npz") if with_error else ""
        cmd = [sys.executable, "-m", "ascend_llm.bench.attention", "--child", backend, ",".join(map(str, shape)),
               block, str(repeats), save]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {**row, "status": _failure(proc)}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        flops = attention_flops(batch, heads, seq, seq, head_dim, causal=True)
        row.update(status="ok", time_s=round(result["time_s"], 3), min_s=round(result["min_s"], 3),
                   first_call_s=round(result["first_call_s"], 2), gflops=round(flops / result["time_s"] / 1e9, 1),
                   peak_mib=round(result["peak_mib"]), growth_mib=round(result["growth_mib"]))
        if with_error:
            row["max_err"] = f"{reference_error(shape, save):.1e}"
        return row


def peer_available(peer: str, peer_python: str) -> str:
    """'' when the peer can run, else the reason it cannot."""
    if not Path(peer).is_file():
        return f"peer script {peer} not found"
    if not Path(peer_python).is_file():
        return f"no Python with torch at {peer_python} (pass --peer-python)"
    return ""


def run_peer(peer: str, peer_python: str, shape: tuple[int, int, int, int], repeats: int) -> dict:
    """The PyTorch peer (SDPA) in its own process: its printed s/call and its own VmHWM."""
    batch, heads, seq, head_dim = shape
    row = {"backend": "torch_sdpa", "seq_len": seq, "block": ""}
    if batch != 1:
        return {**row, "status": f"skipped: the peer script runs batch 1 only (batch={batch})"}
    cmd = [peer_python, "-c", PEER_WRAPPER, peer, "--n", str(seq), "--heads", str(heads), "--dim", str(head_dim),
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**row, "status": _failure(proc)}
    lines = proc.stdout.strip().splitlines()
    seconds = float(next(x for x in lines if "s/call" in x).split(":")[1].split()[0])
    peak_kib = int(next(x for x in lines if x.startswith("VmHWM")).split()[1])
    from ascend_llm.attention.blocks import attention_flops

    flops = attention_flops(batch, heads, seq, seq, head_dim, causal=True)
    return {**row, "status": "ok", "time_s": round(seconds, 3), "gflops": round(flops / seconds / 1e9, 1),
            "peak_mib": round(peak_kib / 1024)}


def summary(rows: list[dict]) -> list[dict]:
    """One line per length: segmented vs SDPA time ratio, naive time, own-process peaks."""
    by = {(r["backend"], r["seq_len"]): r for r in rows if r.get("status") == "ok"}
    lines = []
    for seq in sorted({r["seq_len"] for r in rows}):
        seg, sdpa, naive = (by.get((b, seq), {}) for b in ("segmented", "torch_sdpa", "naive"))
        ratio = round(seg["time_s"] / sdpa["time_s"], 2) if seg and sdpa else ""
        lines.append({"seq_len": seq, "segmented_s": seg.get("time_s", ""), "sdpa_s": sdpa.get("time_s", ""),
                      "seg/sdpa": ratio, "naive_s": naive.get("time_s", ""), "seg_peak_mib": seg.get("peak_mib", ""),
                      "seg_growth_mib": seg.get("growth_mib", ""), "sdpa_peak_mib": sdpa.get("peak_mib", ""),
                      "naive_peak_mib": naive.get("peak_mib", "")})
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS)
    parser.add_argument("--backends", default="naive,segmented")
    parser.add_argument("--block", default="auto", help="segmented block size (block_q = block_k), or auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first one (mean is kept)")
    parser.add_argument("--peer", default=str(DEFAULT_PEER), help="PyTorch peer script; 'none' to skip")
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON), help="a Python that has torch")
    parser.add_argument("--out", default="bench_results/attention.json")
    args = parser.parse_args(argv)
    if args.block != "auto" and not (args.block.isdigit() and int(args.block) > 0):
        parser.error(f"--block={args.block!r}: allowed: auto or a positive integer")
    return args


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        shape = tuple(int(x) for x in argv[2].split(","))
        print(json.dumps(child(argv[1], shape, argv[3], int(argv[4]), argv[5])))
        return 0
    args = parse_args(argv)
    no_peer = "peer skipped (--peer none)" if args.peer == "none" else peer_available(args.peer, args.peer_python)
    if no_peer:
        print(f"PyTorch peer column skipped: {no_peer}")
    rows = []
    for seq in (int(x) for x in args.lengths.split(",")):
        shape = (args.batch, args.heads, seq, args.head_dim)
        scores = args.batch * args.heads * seq * seq
        for backend in args.backends.split(","):
            if backend == "naive" and scores > NAIVE_MAX_SCORES:
                rows.append({"backend": backend, "seq_len": seq, "status": "skipped: N x N scores do not fit in "
                             "24 GiB"})
            else:
                rows.append(run_config(backend, shape, args.block, args.repeats, scores <= REFERENCE_MAX_SCORES))
            print(json.dumps(rows[-1]), flush=True)
        if not no_peer:
            rows.append(run_peer(args.peer, args.peer_python, shape, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    seg = {r["seq_len"]: r for r in rows if r["backend"] == "segmented" and r.get("status") == "ok"}
    growth = {f"{a}->{b}": round(seg[b]["peak_mib"] / seg[a]["peak_mib"], 2)
              for a, b in zip(sorted(seg), sorted(seg)[1:]) if b == 2 * a}
    print_table(rows, ["backend", "seq_len", "block", "status", "time_s", "min_s", "first_call_s", "gflops",
                       "peak_mib", "growth_mib", "max_err"])
    table = summary(rows)
    print()
    print_table(table, list(table[0]) if table else [])
    print("segmented own-process peak growth N -> 2N:", growth)
    path = write_json(args.out, "attention", rows, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                      causal=True, dtype="float32", memory_growth=growth, summary=table,
                      peer=no_peer or f"{args.peer_python} {args.peer}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
