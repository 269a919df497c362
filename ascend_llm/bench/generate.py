"""Generation throughput: KV cache vs recomputing the full sequence, in graph mode, batch 1 and 8.

  ascend-llm bench generate [--model tiny] [--prompt-tokens 32] [--new-tokens 256] [--batch 1 8]
                            [--out bench_results/generate.json]

Both paths run at static shapes so each compiles once (compilation is excluded: one warm-up run each): the
cache path prefills the prompt then decodes one token per step; the recompute path runs the whole
(batch, prompt + new) window every step and reads the logits at the last real position (what the closing
sample did before the engine). Greedy decoding of a randomly initialised model; tokens/s = batch * new / s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ascend_llm.bench.report import print_table, write_json


def _recompute(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    from mindspore import Tensor

    batch, prompt_len = prompts.shape
    window = np.zeros((batch, prompt_len + new_tokens), np.int32)
    window[:, :prompt_len] = prompts
    for step in range(new_tokens):
        last = prompt_len + step - 1
        window[:, last + 1] = model(Tensor(window)).asnumpy()[:, last].argmax(-1)
    return window[:, prompt_len:]


def _cached(engine, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    from ascend_llm.inference import SamplingParams

    results = engine.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=new_tokens))
    return np.array([r.token_ids for r in results])


def _timed(fn) -> tuple[float, np.ndarray]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def run(model_name: str, prompt_tokens: int, new_tokens: int, batch: int) -> dict:
    import mindspore as ms

    from ascend_llm.compose import compose_recipe
    from ascend_llm.inference import Engine
    from ascend_llm.models.llama import build_model

    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = compose_recipe([f"model={model_name}"]).model
    model = build_model(cfg, seed=0)
    model.set_train(False)
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, size=(batch, prompt_tokens)).astype(np.int32)
    engine = Engine(model, max_len=prompt_tokens + new_tokens, num_slots=batch, prefill_bucket=prompt_tokens)
    _cached(engine, prompts, 2)  # compile prefill and decode graphs
    cache_s, cache_ids = _timed(lambda: _cached(engine, prompts, new_tokens))
    _recompute(model, prompts, 1)  # compile the full-window graph
    full_s, full_ids = _timed(lambda: _recompute(model, prompts, new_tokens))
    return {"model": model_name, "batch": batch, "prompt": prompt_tokens, "new_tokens": new_tokens,
            "kv_cache_tok_s": round(batch * new_tokens / cache_s, 1),
            "recompute_tok_s": round(batch * new_tokens / full_s, 1), "speedup": round(full_s / cache_s, 2),
            "same_tokens": bool((cache_ids == full_ids).all())}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm bench generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", default="bench_results/generate.json")
    args = parser.parse_args(argv)
    from ascend_llm.train.runtime import set_cpu_threads

    set_cpu_threads(os.cpu_count() or 1)
    rows = []
    for batch in args.batch:
        rows.append(run(args.model, args.prompt_tokens, args.new_tokens, batch))
        print(json.dumps(rows[-1]), flush=True)  # each row as soon as it is measured
    print_table(rows, list(rows[0]))
    print(f"wrote {write_json(args.out, 'generate', rows, mode='graph')}")
    return 0
