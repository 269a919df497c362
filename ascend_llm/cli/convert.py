"""`ascend-llm convert SRC --to hf --output DIR [--dtype bf16|fp16|fp32]`: write a Hugging Face directory.

SRC is a toolkit checkpoint (`runs/x/checkpoints/step_N`), a run directory (its newest checkpoint) or a Hugging
Face directory (re-export, e.g. to change dtype). The output has config.json, generation_config.json,
safetensors sharded by --max-shard-gb with model.safetensors.index.json, the tokenizer files and the chat
template (--chat-template FILE adds or replaces one); transformers' AutoModelForCausalLM loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ascend_llm.errors import InteropError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="toolkit checkpoint or run directory, or a Hugging Face directory")
    parser.add_argument("--to", required=True, choices=["hf"], help="output format")
    parser.add_argument("--output", required=True, help="directory to write (must be absent or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output that ascend_llm wrote (never other files, the working "
                             "directory, the source model or a training run)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="tensor dtype (bf16)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    parser.add_argument("--chat-template", help="a jinja2 chat template file to ship with the tokenizer")
    parser.add_argument("--expert-layout", default="per_expert", choices=["per_expert", "fused"],
                        help="MoE expert tensors: per_expert (Hub checkpoints) or fused (transformers 5 in memory)")
    args = parser.parse_args(argv)
    from ascend_llm.interop.export import export_hf
    from ascend_llm.interop.source import open_model
    from ascend_llm.store.files import check_output_dir

    if args.max_shard_gb <= 0:
        raise InteropError("--max-shard-gb", args.max_shard_gb, "must be > 0")
    template = None
    if args.chat_template:
        file = Path(args.chat_template)
        if not file.is_file():
            raise InteropError("--chat-template", str(file), "must be a readable jinja2 file")
        template = file.read_text(encoding="utf-8")
    check_output_dir(args.output, field="--output", overwrite=args.overwrite, protect=[args.source])  # before any work
    source = open_model(args.source, build=False)
    out = export_hf(args.output, source.config, source.weights, dtype=args.dtype, text_files=source.text_files,
                    eos_token_ids=source.eos_token_ids, chat_template=template,
                    max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite, protect=[source.path],
                    expert_layout=args.expert_layout)
    print(f"wrote {out} ({source.kind} {source.path} -> hf, {args.dtype})")
    return 0
