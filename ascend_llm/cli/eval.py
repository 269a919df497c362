"""`ascend-llm eval MODEL [MODEL ...] --corpus FILE`: perplexity with strided sliding windows, and a table of
bytes on disk, weight bytes in memory, perplexity and its change against the first model (the baseline)."""

from __future__ import annotations

import argparse
import json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm eval", description=__doc__)
    p.add_argument("models", nargs="+", help="run/checkpoint, quantized or Hugging Face directories")
    p.add_argument("--corpus", required=True, help=".jsonl/.txt file or folder")
    p.add_argument("--docs", default="-300:", help="document slice START:END, e.g. --docs=-300: (the default)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--window", type=int, default=256, help="tokens per window (<= the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=128, help="tokens between window starts (capped at window-1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokenizer", help="tokenizer.json when none sits beside the first model")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--pynative", action="store_true", help="PyNative instead of graph mode (no compile)")
    return p


def _row(path, source, result, baseline) -> dict:
    from ascend_llm.quant.apply import weight_bytes

    sizes = weight_bytes(source.model)
    memory = sizes["quantized"] + sizes["other"]
    row = {"model": path, "kind": source.kind, "bytes_on_disk": source.bytes_on_disk(), "weight_bytes": memory,
           "linear_bytes": sizes["quantized"] or None, "linear_fp32_bytes": sizes["quantized_fp32"] or None,
           "perplexity": result.perplexity, "num_tokens": result.num_tokens, "window": result.window,
           "stride": result.stride, "quantization": source.quantization}
    row["ppl_change_pct"] = 100.0 * (result.perplexity / baseline - 1.0) if baseline else 0.0
    return row


def format_table(rows: list[dict]) -> str:
    head = "| model | kind | bytes on disk | weight bytes in memory | quantized linear bytes (fp32 / x) | " \
           "perplexity | change |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lin = (f"{r['linear_bytes']:,} ({r['linear_fp32_bytes']:,} / {r['linear_fp32_bytes'] / r['linear_bytes']:.2f}x)"
               if r["linear_bytes"] else "-")
        lines.append(f"| {r['model']} | {r['kind']} | {r['bytes_on_disk']:,} | {r['weight_bytes']:,} | {lin} | "
                     f"{r['perplexity']:.4f} | {r['ppl_change_pct']:+.3f}% |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)

    from ascend_llm.cli.process import start_mindspore
    from ascend_llm.eval.perplexity import perplexity
    from ascend_llm.eval.text import parse_slice, token_stream
    from ascend_llm.interop.source import apply_tokenizer_override, open_model

    start_mindspore(graph=not args.pynative)
    docs = parse_slice(args.docs, "--docs")
    rows, ids, baseline = [], None, None
    for path in args.models:
        source = open_model(path)
        if ids is None:
            apply_tokenizer_override(source, args.tokenizer)
            eos = source.eos_token_ids[0] if source.eos_token_ids else None
            ids, num_docs = token_stream(args.corpus, source.tokenizer, eos, docs, args.text_field)
            print(f"corpus {args.corpus}, documents [{args.docs}]: {num_docs} documents, {len(ids):,} tokens")
        result = perplexity(source.model, ids, args.window, args.stride, source.config.max_seq_len,
                            args.batch_size)
        baseline = baseline or result.perplexity
        rows.append(_row(path, source, result, baseline))
        print(f"{path}: perplexity {result.perplexity:.4f} over {result.num_tokens:,} tokens "
              f"({result.num_windows} windows, window {result.window}, stride {result.stride})")
    print(format_table(rows))
    if args.json:
        from ascend_llm.store.files import write_file_atomic

        write_file_atomic(args.json, json.dumps(rows, indent=2), field="--json")
    return 0
