"""Weight-only quantized linears on CPU: per-layer matmul time and whole-model decode tokens/s, fp32 vs int8 vs int4.

  ascend-llm bench quant [--model DIR] [--rows 1 8] [--batch 1 8] [--prompt-tokens 39] [--new-tokens 64]
                         [--rounds 5] [--layer-calls 100] [--out bench_results/quant.json]

The model is the ~24 M-parameter Qwen2 of ../shared/peers/hf_generate.py --make (hidden 512, 8 layers, 8/4 heads,
ffn 1408, q/k/v bias, tied embeddings, vocab 600), random init, or the model directory given with --model (any
directory `open_model` reads). Variants: fp32; int8 RTN per channel (symmetric); int4 RTN group 128 (symmetric):
the toolkit's `quantize` defaults; every q/k/v/o/gate/up/down projection quantized, embeddings and head fp32.

Layers: the model's projection shapes (out, in), 16 distinct layers of a shape chained in one graph (so the weights
come from memory, as in a model, and the graph call overhead is spread), x of `rows` rows; time per layer call.
Decode: the inference `Engine` (graph mode, greedy, `batch` sequences of random prompts), a warm-up generation of the
same lengths compiles every shape first; every `Engine.run` step is timed, decode tokens/s = tokens / seconds over
the steps whose rows all carry one token (the scheduler mixes prompt chunks into some steps: those are reported as
prefill_s), best generation of `rounds`, the variants interleaved round by round so they share the machine;
median_step_tok_s: the median over every decode step of all rounds of tokens / step seconds, best_step_vs_fp32: the
fastest decode step's rate against fp32's (both steadier than the best generation when other processes share the
cores).
Weight bytes: the quantized layers' bytes held (codes, scales, zeros, g_idx) against their float32 bytes
(linear_bytes, fp32_over_bytes); decode_path: "fused" when the engine's decode steps run one C++ kernel per layer
(inference/fused_decode.py: float32 layers and, through fused_quant.py, quantized ones), else "mindspore";
decode_bytes: linear_bytes plus any copy the decode path holds (the fused float32 path's packed panels; the
quantized path reads the stored codes and holds none).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ascend_llm.bench.report import print_table, write_json

VARIANTS = {"fp32": None, "int8": dict(bits=8, group_size=-1), "int4": dict(bits=4, group_size=128)}
QWEN2_24M = dict(name="qwen2-24m", vocab_size=600, dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
                 ffn_hidden_dim=1408, max_seq_len=4096, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                 tie_embeddings=True)
LAYERS_PER_GRAPH = 16


def _build(model_dir: str | None, variant: str):
    """A fresh model (fp32, or quantized in place by RTN) in inference mode."""
    from ascend_llm.config.model import ModelConfig
    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.models.llama import build_model
    from ascend_llm.quant.apply import apply_quantization

    if model_dir:
        from ascend_llm.interop.source import open_model

        model = open_model(model_dir).model
    else:
        model = build_model(ModelConfig(**QWEN2_24M), seed=0)
    model.set_train(False)
    if VARIANTS[variant] is not None:
        apply_quantization(model, QuantConfig(method="rtn", sym=True, **VARIANTS[variant]))
    return model


def _chain(layers):
    from mindspore import nn

    class Chain(nn.Cell):
        """Sum of the layers' outputs for one input: every layer reads its own weight once per call."""

        def __init__(self):
            super().__init__()
            self.layers = nn.CellList(layers)

        def construct(self, x):
            acc = self.layers[0](x)
            for i in range(1, len(self.layers)):
                acc = acc + self.layers[i](x)
            return acc

    return Chain()


def _layer(variant: str, out_f: int, in_f: int, rng):
    from mindspore import nn

    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.quant.linear import QuantLinear
    from ascend_llm.quant.rtn import quantize_rtn

    w = rng.normal(0, 0.02, size=(out_f, in_f)).astype(np.float32)
    if VARIANTS[variant] is None:
        from mindspore import Tensor

        dense = nn.Dense(in_f, out_f, has_bias=False)
        dense.weight.set_data(Tensor(w))
        return dense
    return QuantLinear(quantize_rtn(w, QuantConfig(**VARIANTS[variant])))


def layer_rows(shapes: list[tuple[int, int]], rows_list: list[int], calls: int, rounds: int) -> list[dict]:
    """Per-layer call time (us) of each variant at each (out, in) shape and row count."""
    from mindspore import Tensor

    out = []
    rng = np.random.default_rng(0)
    for out_f, in_f in shapes:
        chains = {v: _chain([_layer(v, out_f, in_f, rng) for _ in range(LAYERS_PER_GRAPH)]) for v in VARIANTS}
        for rows in rows_list:
            x = Tensor(rng.normal(size=(rows, in_f)).astype(np.float32))
            best = {v: float("inf") for v in VARIANTS}
            for chain in chains.values():
                chain(x).asnumpy()  # compile
            for _ in range(rounds):
                for v, chain in chains.items():
                    began = time.perf_counter()
                    for _ in range(calls):
                        chain(x).asnumpy()
                    best[v] = min(best[v], (time.perf_counter() - began) / calls / LAYERS_PER_GRAPH * 1e6)
            row = {"shape": f"{out_f}x{in_f}", "rows": rows, **{f"{v}_us": round(t, 1) for v, t in best.items()}}
            row.update({f"{v}_vs_fp32": round(best["fp32"] / best[v], 2) for v in VARIANTS if v != "fp32"})
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


class StepClock:
    """Times every `Engine.run` step (the engine's one compiled-step primitive, wrapped on the instance): steps whose
    rows all carry one token are decode steps; the others (prefill chunks, possibly with decodes mixed in) are
    counted apart, so the scheduler's interleaving does not blur the decode rate."""

    def __init__(self, engine):
        self.decode_s, self.decode_tokens, self.other_s = 0.0, 0, 0.0
        self.step_rates: list[float] = []  # tokens / s of every decode step since construction
        run = engine.run

        def timed(seq_ids, tokens, starts):
            began = time.perf_counter()
            out = run(seq_ids, tokens, starts)
            seconds = time.perf_counter() - began
            if max(len(t) for t in tokens) == 1:
                self.decode_s += seconds
                self.decode_tokens += len(tokens)
                self.step_rates.append(len(tokens) / max(seconds, 1e-9))
            else:
                self.other_s += seconds
            return out

        engine.run = timed

    def generate(self, engine, prompts: np.ndarray, new_tokens: int) -> tuple[float, float]:
        """(decode tokens/s, seconds of the other steps) of one greedy generation."""
        from ascend_llm.inference import SamplingParams

        self.decode_s, self.decode_tokens, self.other_s = 0.0, 0, 0.0
        engine.generate([list(p) for p in prompts], SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
        return self.decode_tokens / max(self.decode_s, 1e-9), self.other_s


def decode_rows(model_dir: str | None, batches: list[int], prompt_tokens: int, new_tokens: int,
                rounds: int) -> list[dict]:
    """Whole-model decode tokens/s (pure decode steps, best generation of `rounds`) and quantized-layer bytes per
    variant and batch; prefill_s: the generation's other steps (prompt chunks), best of rounds."""
    import mindspore as ms

    from ascend_llm.inference import Engine
    from ascend_llm.quant.apply import weight_bytes

    ms.set_context(mode=ms.GRAPH_MODE)
    models = {v: _build(model_dir, v) for v in VARIANTS}
    sizes = {v: weight_bytes(m) for v, m in models.items()}
    fp32_bytes = sizes["int8"]["quantized_fp32"]
    out = []
    for batch in batches:
        vocab = models["fp32"].cfg.vocab_size
        prompts = np.random.default_rng(batch).integers(0, vocab, size=(batch, prompt_tokens))
        engines = {v: Engine(m, max_len=prompt_tokens + new_tokens, num_slots=batch) for v, m in models.items()}
        clocks = {v: StepClock(engine) for v, engine in engines.items()}
        for v, engine in engines.items():  # compiles every shape of this run
            clocks[v].generate(engine, prompts, new_tokens)
        rate = {v: 0.0 for v in VARIANTS}
        other = {v: float("inf") for v in VARIANTS}
        for clock in clocks.values():
            clock.step_rates.clear()  # the warm-up generation's steps are not counted
        for _ in range(rounds):
            for v, engine in engines.items():
                tokens_per_s, other_s = clocks[v].generate(engine, prompts, new_tokens)
                rate[v], other[v] = max(rate[v], tokens_per_s), min(other[v], other_s)
        for v in VARIANTS:
            held = fp32_bytes if v == "fp32" else sizes[v]["quantized"]
            fused = engines[v].forward.fused
            copies = 0 if fused is None else sum(p.asnumpy().nbytes for p in fused.packed)
            median = float(np.median(clocks[v].step_rates))
            row = {"variant": v, "batch": batch, "decode_path": "mindspore" if fused is None else "fused",
                   "decode_tok_s": round(rate[v], 1), "vs_fp32": round(rate[v] / rate["fp32"], 2),
                   "median_step_tok_s": round(median, 1),
                   "median_vs_fp32": round(median / float(np.median(clocks["fp32"].step_rates)), 2),
                   "best_step_vs_fp32": round(max(clocks[v].step_rates) / max(clocks["fp32"].step_rates), 2),
                   "prefill_s": round(other[v], 3), "prefill_vs_fp32": round(other["fp32"] / other[v], 2),
                   "linear_bytes": held, "fp32_over_bytes": round(fp32_bytes / held, 2),
                   "decode_bytes": held + copies}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def model_shapes(model_dir: str | None) -> list[tuple[int, int]]:
    """(out, in) of the projections: q, k/v, o, gate/up, down (deduplicated)."""
    if model_dir:
        from ascend_llm.interop.source import open_model

        cfg = open_model(model_dir, build=False, weights=False).config
    else:
        from ascend_llm.config.model import ModelConfig

        cfg = ModelConfig(**QWEN2_24M)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(q, cfg.dim), (kv, cfg.dim), (cfg.dim, q), (cfg.ffn_hidden_dim, cfg.dim), (cfg.dim, cfg.ffn_hidden_dim)]
    return list(dict.fromkeys(shapes))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm bench quant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the random-init 24 M Qwen2)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="x rows of the per-layer timing")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="sequences decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=39)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layer-calls", type=int, default=100)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--out", default="bench_results/quant.json")
    args = parser.parse_args(argv)
    import mindspore as ms

    from ascend_llm.quant.cpu_kernel import kernel_available
    from ascend_llm.train.runtime import set_cpu_threads

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    set_cpu_threads(os.cpu_count() or 1)
    print(f"fused CPU kernel: {'yes' if kernel_available('CPU') else 'no (dequantize with ops)'}", flush=True)
    layers = [] if args.skip_layers else layer_rows(model_shapes(args.model), args.rows, args.layer_calls,
                                                    args.rounds)
    decode = [] if args.skip_decode else decode_rows(args.model, args.batch, args.prompt_tokens, args.new_tokens,
                                                     args.rounds)
    if layers:
        print_table(layers, list(layers[0]))
    if decode:
        print_table(decode, list(decode[0]))
    print(f"wrote {write_json(args.out, 'quant', layers + decode, mode='graph', kernel=kernel_available('CPU'))}")
    return 0
