"""`ascend-llm generate MODEL --prompt TEXT [--prompt TEXT ...] [--chat]`: continue prompts with a KV cache.

MODEL is a Hugging Face directory, a toolkit checkpoint or a run directory. Prompts run as one batch (each its
own sequence of the paged KV cache, through the one scheduler). --chat wraps each prompt as a user message (after
--system, if given) and applies the model's chat template. Generation stops at the EOS ids of
generation_config.json, at any --stop string, or after --max-new-tokens; tokens/s of prefill and decode are printed
at the end.
"""

from __future__ import annotations

import argparse
import json

from ascend_llm.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hugging Face directory, toolkit checkpoint or run directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--system", help="system message in --chat mode")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=0, help="KV cache positions (default: prompt + new tokens)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--image", help="an image for a vision-language model (a caption run): its tokens go where "
                                        "<image> is in --prompt, else before it (train/caption.py)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    from ascend_llm.cli.process import start_mindspore
    from ascend_llm.inference import Engine, SamplingParams, Scheduler
    from ascend_llm.interop.source import open_model

    start_mindspore(graph=args.mode == "graph")
    if args.image:  # a caption run: the image is projected into placeholder ids the engine embeds (models/vlm.py)
        from ascend_llm.train.caption import open_vlm

        source = open_vlm(args.model)
        source.set_image(args.image)
    else:
        source = open_model(args.model)
    tokenizer = source.tokenizer
    if tokenizer is None:
        raise ConfigError("model", str(args.model), "has no tokenizer (tokenizer.json) to encode --prompt")
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}]) for p in args.prompt]
    else:
        prompts = [source.encode(p) if args.image else tokenizer.encode(p) for p in args.prompt]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop_token_ids=source.eos_token_ids, stop_strings=args.stop, seed=args.seed)
    params.validate()
    longest = max(len(p) for p in prompts)
    max_len = args.max_len or longest + args.max_new_tokens
    if max_len <= longest:
        raise ConfigError("--max-len", max_len, f"must exceed the longest prompt ({longest} tokens)")
    context = source.model.cfg.max_seq_len  # the model's context length, as serve's --max-model-len default
    if max_len > context:
        field, value = ("--max-len", args.max_len) if args.max_len else ("--max-new-tokens", args.max_new_tokens)
        raise ConfigError(field, value, f"the prompt ({longest} tokens) and the new tokens must fit the model's "
                                        f"context of {context} positions")
    engine = Engine(source.model, max_len=max_len, num_slots=len(prompts))
    requests = Scheduler(engine, tokenizer).generate(
        prompts, [SamplingParams(**{**vars(params), "seed": args.seed + i}) for i in range(len(prompts))])
    speed = engine.tokens_per_second()
    results = [{"token_ids": r.out, "text": r.text, "finish_reason": r.finish_reason, "stop_reason": r.stop_reason}
               for r in requests]
    if args.json:
        print(json.dumps({"results": results, **speed}, ensure_ascii=False))
        return 0
    for prompt, result in zip(args.prompt, results):
        print(f"--- {prompt!r} ({len(result['token_ids'])} tokens, {result['finish_reason']})")
        print(result["text"])
    print(f"prefill {speed['prefill_tokens_per_s']:.1f} tokens/s, decode {speed['decode_tokens_per_s']:.1f} tokens/s"
          " (first calls include graph compilation)")
    return 0
