"""`ascend-llm quantize MODEL --out DIR`: weight-only post-training quantization (RTN or GPTQ) of a run,
checkpoint, quantized or Hugging Face model; writes our quantized layout and optionally the HF GPTQ layout."""

from __future__ import annotations

import argparse

from ascend_llm.config.quant import QuantConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm quantize", description=__doc__)
    p.add_argument("model", help="run dir, checkpoint step dir or Hugging Face dir")
    p.add_argument("--out", required=True, help="output directory (our layout: safetensors + config.json)")
    p.add_argument("--method", default="rtn", help="rtn or gptq (default rtn)")
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="default 128 for int4, -1 (per channel) for int8")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by descending Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block width")
    p.add_argument("--include-output", action="store_true", help="also quantize the output head")
    p.add_argument("--calib-corpus", help="GPTQ calibration corpus (.jsonl/.txt file or folder)")
    p.add_argument("--calib-docs", default="0:2000", help="document slice START:END of the corpus")
    p.add_argument("--num-calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--tokenizer", help="tokenizer.json when none sits beside the model")
    p.add_argument("--hf-gptq", help="also export the Hugging Face GPTQ layout to this directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out/--hf-gptq that ascend_llm wrote (never other files, the working "
                        "directory, the source model or a training run)")
    return p


def build_config(args) -> QuantConfig:
    group = args.group_size if args.group_size is not None else (128 if args.bits == 4 else -1)
    cfg = QuantConfig(bits=args.bits, group_size=group, sym=not args.asym, method=args.method,
                      include_output=args.include_output, damp_percent=args.damp, block_size=args.block_size,
                      act_order=args.act_order, num_calib_samples=args.num_calib_samples,
                      calib_seq_len=args.calib_seq_len)
    cfg.validate()
    return cfg


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    cfg = build_config(args)
    from pathlib import Path

    from ascend_llm.cli.process import start_mindspore
    from ascend_llm.errors import ConfigError
    from ascend_llm.eval.text import calibration_windows, parse_slice, token_stream
    from ascend_llm.interop.quantized import hf_gptq_layout, save_quantized, write_hf_gptq
    from ascend_llm.interop.source import apply_tokenizer_override, open_model
    from ascend_llm.quant.apply import apply_quantization, weight_bytes
    from ascend_llm.store.files import OutputError, check_output_dir

    start_mindspore(graph=True)
    source = open_model(args.model)
    if source.kind == "quantized":
        raise ConfigError("model", args.model, "is already quantized: quantize the original model")
    if args.hf_gptq and Path(args.hf_gptq).absolute() == Path(args.out).absolute():
        raise OutputError("--hf-gptq", args.hf_gptq, "must differ from --out")
    for path, field in ((args.out, "--out"), (args.hf_gptq, "--hf-gptq")):  # refused before any work
        if path:
            check_output_dir(path, field=field, overwrite=args.overwrite, protect=[source.path])
    if args.tokenizer or cfg.method == "gptq":
        apply_tokenizer_override(source, args.tokenizer)
    calibration = None
    if cfg.method == "gptq":
        if not args.calib_corpus:
            raise ConfigError("--calib-corpus", None, "GPTQ needs a calibration corpus")
        eos = source.eos_token_ids[0] if source.eos_token_ids else None
        ids, _ = token_stream(args.calib_corpus, source.tokenizer, eos, parse_slice(args.calib_docs, "--calib-docs"))
        calibration = calibration_windows(ids, cfg.num_calib_samples, cfg.calib_seq_len, cfg.calib_seed)
    done = apply_quantization(source.model, cfg, calibration)
    layout = None  # the HF GPTQ layout is built (and refused) before anything is written
    if args.hf_gptq:
        layout = hf_gptq_layout(source.model, source.config, cfg, done, source.text_files,
                                eos_token_ids=source.eos_token_ids)
    out = save_quantized(source.model, source.config, cfg, list(done), Path(args.out), source.text_files,
                         eos_token_ids=source.eos_token_ids, overwrite=args.overwrite, protect=[source.path])
    sizes = weight_bytes(source.model)
    print(f"quantized {len(done)} layers ({cfg.method}, int{cfg.bits}, "
          f"{'per-channel' if cfg.group_size == -1 else f'group {cfg.group_size}'}, "
          f"{'sym' if cfg.sym else 'asym'}): {sizes['quantized_fp32']:,} fp32 bytes -> {sizes['quantized']:,} "
          f"bytes ({sizes['quantized_fp32'] / max(sizes['quantized'], 1):.2f}x); wrote {out}")
    if layout is not None:
        hf_out = write_hf_gptq(layout, Path(args.hf_gptq), overwrite=args.overwrite, protect=[source.path])
        print(f"wrote Hugging Face GPTQ layout to {hf_out}")
    return 0
