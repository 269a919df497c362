"""`ascend-llm bench prepare`: streaming preparation speed (MB/s) and peak RSS, per phase.

Corpora: a generated JSONL of --size-mb (mixed Chinese and English, log-normal document lengths, seeded), the
shared Chinese corpora when present (../shared/corpora), and a 1 MB document without spaces (DNA letters).
Each phase runs in its own child process, which reports its own peak RSS (ru_maxrss): `tokenizer` trains on
the seeded sample (data.tokenizer_sample_bytes), `encode` streams the whole corpus through that tokenizer.
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from ascend_llm.bench.report import print_table, write_json
from ascend_llm.data.corpus import resolve_path
from ascend_llm.errors import DataError

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "model training data token corpus document window sequence attention layer gradient loss batch step "
         "memory stream file record reader encoder packed blend weight seed sample validation").split()

CHILD = r"""
import json, resource, sys, time
from ascend_llm.config.data import DataConfig
from ascend_llm.data.corpus import corpus_files
from ascend_llm.data.prepare import build_tokenizer, prepare
cfg = DataConfig(**json.loads(sys.argv[2]))
start = time.perf_counter()
if sys.argv[1] == "tokenizer":
    build_tokenizer(cfg, [corpus_files(cfg.path, cfg.format)]).save(sys.argv[3])
    out = {}
else:
    meta = prepare(cfg, sys.argv[3]).meta
    out = {"tokens": meta["num_tokens"], "documents": meta["num_docs"], "bytes": meta["report"]["bytes"]}
use = resource.getrusage(resource.RUSAGE_SELF)
out.update(seconds=time.perf_counter() - start, cpu_s=use.ru_utime + use.ru_stime, peak_rss_mb=use.ru_maxrss / 1024)
print(json.dumps(out))
"""


def synthetic_jsonl(path: Path, size_mb: float, seed: int = 0) -> Path:
    """Mixed Chinese/English JSONL of about size_mb MB; documents 40 B .. ~200 kB (log-normal), seeded."""
    rng = random.Random(seed)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("，。！？；：")
    zipf = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(han))))  # Zipf-like, as real text
    target, written = int(size_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            length = min(int(rng.lognormvariate(6.5, 1.2)) + 40, 200_000)
            if rng.random() < 0.5:
                text = "".join(rng.choices(han, cum_weights=zipf, k=length // 3))
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(length // 5)) + "."
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
    return path


def run_phase(phase: str, cfg: dict, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, phase, json.dumps(cfg), out], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench prepare: {phase} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_corpus(name: str, path: Path, work: Path, args) -> list[dict]:
    size_mb = path.stat().st_size / 1e6 if path.is_file() else sum(p.stat().st_size for p in path.rglob("*")) / 1e6
    cfg = {"path": str(path), "vocab_size": args.vocab_size, "tokenizer_sample_bytes": int(args.sample_mb * 1e6),
           "cache_dir": str(work / "cache")}
    tokenizer_file = str(work / f"{name}.tokenizer.json")
    train = run_phase("tokenizer", cfg, tokenizer_file)
    encode = run_phase("encode", {**cfg, "tokenizer": tokenizer_file}, str(work / f"{name}.out"))
    sample_mb = min(size_mb, args.sample_mb)
    return [{"corpus": name, "phase": "tokenizer", "input_mb": round(sample_mb, 2),
             "seconds": round(train["seconds"], 2), "mb_per_s": round(sample_mb / train["seconds"], 2),
             "cpu_s": round(train["cpu_s"], 2), "mb_per_cpu_s": round(sample_mb / train["cpu_s"], 2),
             "peak_rss_mb": round(train["peak_rss_mb"])},
            {"corpus": name, "phase": "encode", "input_mb": round(size_mb, 2),
             "seconds": round(encode["seconds"], 2),
             "mb_per_s": round(size_mb / encode["seconds"], 2), "cpu_s": round(encode["cpu_s"], 2),
             "mb_per_cpu_s": round(size_mb / encode["cpu_s"], 2), "peak_rss_mb": round(encode["peak_rss_mb"]),
             "tokens": encode["tokens"], "documents": encode["documents"]}]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm bench prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=1000.0, help="generated JSONL size (MB)")
    parser.add_argument("--sample-mb", type=float, default=16.0, help="data.tokenizer_sample_bytes in MB")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--skip-shared", action="store_true", help="do not bench ../shared/corpora")
    parser.add_argument("--json", default="bench_prepare.json")
    parser.add_argument("--workdir", help="where the generated corpus and outputs go (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare."))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    dna = work / "dna_1mb.txt"
    rng = random.Random(1)
    dna.write_text("".join(rng.choice("ACGT") for _ in range(1_000_000)))
    rows += bench_corpus("dna_1mb_no_spaces", dna, work, args)
    if not args.skip_shared:
        try:
            shared = sorted(resolve_path("../shared/corpora").glob("*.jsonl"))
        except DataError:
            shared = []
            print("bench prepare: ../shared/corpora not found beside the repository: skipped", file=sys.stderr)
        for file in shared:
            rows += bench_corpus(file.stem, file, work, args)
    if args.size_mb > 0:
        rows += bench_corpus(f"synthetic_{args.size_mb:g}mb", synthetic_jsonl(work / "synthetic.jsonl", args.size_mb),
                             work, args)
    print_table(rows, ["corpus", "phase", "input_mb", "seconds", "mb_per_s", "cpu_s", "mb_per_cpu_s", "peak_rss_mb",
                       "tokens", "documents"])
    print("json:", write_json(args.json, "prepare", rows, size_mb=args.size_mb, sample_mb=args.sample_mb,
                              vocab_size=args.vocab_size, workdir=str(work)))
    return 0
