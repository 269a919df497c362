"""`ascend-llm serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the paged-KV scheduler, for a
Hugging Face, quantized, checkpoint or run directory (read by interop.source.open_model: EOS ids, chat template and
sampling defaults come from the directory).

Binds 127.0.0.1 unless --host says otherwise; with --api-key (or $ASCEND_LLM_API_KEY) every /v1/* request needs
`Authorization: Bearer <key>`. Prompts and outputs are never logged. Limits (refused with a 400 naming the field):
--max-body-bytes, --max-prompt-tokens, --max-stop, --max-stop-chars, --max-n; past --max-queue requests waiting
beyond the free slots, 503. SIGTERM/SIGINT: stop accepting (503), let running requests finish for --grace seconds,
then end every open stream with an error chunk and `data: [DONE]` and answer waiting clients 503; exit 0.
"""

from __future__ import annotations

import argparse
import os

from ascend_llm.inference.protocol import Limits

DEFAULTS = Limits()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default %(default)s)"
    p.add_argument("model", help="Hugging Face, quantized, checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; give an --api-key beyond localhost" + d)
    p.add_argument("--port", type=int, default=8000, help="port" + d)
    p.add_argument("--api-key", default=os.environ.get("ASCEND_LLM_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' on /v1/* (default: $ASCEND_LLM_API_KEY)")
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: directory name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory) when none sits beside")
    p.add_argument("--max-model-len", "--max-len", type=int, default=None, dest="max_model_len",
                   help="context length: prompt + generated tokens (default: the model's max_seq_len)")
    p.add_argument("--max-num-seqs", "--num-slots", type=int, default=8, dest="max_num_seqs",
                   help="sequences decoded together" + d)
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks incl. the null block (default: --max-num-seqs full contexts, at most "
                        "65,536 positions)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block, a power of two" + d)
    p.add_argument("--max-prefill-chunk", type=int, default=256, help="prompt tokens per sequence per step" + d)
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the free slots before 503 (0: none waits for a busy slot)" + d)
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get on shutdown" + d)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes, help="request body bytes" + d)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="tokens of one prompt (default and upper bound: context length - 1)")
    p.add_argument("--max-stop", type=int, default=DEFAULTS.max_stop, help="strings in `stop`" + d)
    p.add_argument("--max-stop-chars", type=int, default=DEFAULTS.max_stop_chars,
                   help="characters of one stop string" + d)
    p.add_argument("--max-n", type=int, default=DEFAULTS.max_n, help="choices per request: n x prompts" + d)
    p.add_argument("--tokenizer-workers", type=int, default=4, help="threads that parse and tokenize requests" + d)
    p.add_argument("--pynative", action="store_true", help="PyNative instead of graph mode")
    for legacy in ("--prefill-bucket", "--token-budget"):  # the slot cache's knobs: the paged cache has none
        p.add_argument(legacy, type=int, default=None, help=argparse.SUPPRESS)
    return p


def _check(args) -> None:
    from ascend_llm.errors import ConfigError

    if args.max_queue < 0:
        raise ConfigError("--max-queue", args.max_queue, "must be >= 0")
    for name in ("max_num_seqs", "max_body_bytes", "max_stop", "max_stop_chars", "max_n",
                 "tokenizer_workers", "block_size", "max_prefill_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "must be >= 1")
    for name in ("max_model_len", "max_prompt_tokens", "num_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "must be >= 1")
    if args.grace < 0:
        raise ConfigError("--grace", args.grace, "must be >= 0 seconds")


def build_serving(args):
    """Open the model, build the engine and scheduler: an OpenAIServing ready for build_app."""

    from ascend_llm.cli.process import start_mindspore
    from ascend_llm.errors import ConfigError
    from ascend_llm.inference.scheduler import Scheduler
    from ascend_llm.inference.serving import ModelInfo, OpenAIServing
    from ascend_llm.interop.source import apply_tokenizer_override, open_model

    start_mindspore(graph=not args.pynative)
    source = apply_tokenizer_override(open_model(args.model), args.tokenizer)
    context = args.max_model_len or source.config.max_seq_len
    if context > source.config.max_seq_len or context < 2:
        raise ConfigError("--max-model-len", context, f"must be in [2, {source.config.max_seq_len}] (the model's "
                                                      "max_seq_len)")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens >= context:
        raise ConfigError("--max-prompt-tokens", args.max_prompt_tokens, f"must be < the context length {context}")
    if source.tokenizer is not None and source.tokenizer.vocab_size > source.config.vocab_size:
        raise ConfigError("--tokenizer", f"{source.tokenizer.vocab_size} ids",
                          f"must not exceed the model's vocab_size={source.config.vocab_size}")
    engine = _engine(source, args, context)
    scheduler = Scheduler(engine, source.tokenizer, max_queue=args.max_queue)
    defaults = {k: source.generation[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if isinstance(source.generation.get(k), (int, float))}
    info = ModelInfo(args.model_name or source.name, source.tokenizer, list(source.eos_token_ids), context,
                     source.config.vocab_size, defaults)
    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_stop, args.max_stop_chars, args.max_n)
    return OpenAIServing(scheduler, info, limits, tokenizer_workers=args.tokenizer_workers), source


def _engine(source, args, context: int):
    from ascend_llm.inference.engine import Engine

    return Engine(source.model, context, args.max_num_seqs, block_size=args.block_size, num_blocks=args.num_blocks,
                  max_chunk=args.max_prefill_chunk)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    _check(args)
    for name in ("prefill_bucket", "token_budget"):
        if getattr(args, name) is not None:
            print(f"--{name.replace('_', '-')} no longer applies (paged KV cache: blocks are allocated as tokens "
                  "arrive; see --num-blocks, --max-prefill-chunk); ignored", flush=True)
    import uvicorn

    from ascend_llm.inference.server import build_app

    serving, source = build_serving(args)
    app = build_app(serving, api_key=args.api_key)
    print(f"serving {args.model} ({source.kind}) as {serving.model.name!r} on http://{args.host}:{args.port}: "
          f"context {serving.model.context_len} tokens, {args.max_num_seqs} sequences at a time"
          + (", API key required" if args.api_key else ""), flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=args.grace + 3.0)
    server = _graceful_server_class()(config)
    server.on_exit_signal = lambda: serving.begin_shutdown(args.grace)
    server.run()
    _exit_now()
    return 0


def _exit_now() -> None:
    """Exit 0 at once: every request is answered and the scheduler stopped; MindSpore's own teardown at interpreter
    exit takes seconds (measured 3.7 s) and holds nothing worth keeping."""
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _graceful_server_class():
    import contextlib
    import signal
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's Server, except that (1) the first SIGTERM/SIGINT also starts the app's own shutdown (503 for
        new requests, --grace for running ones, then error chunks and [DONE]) and (2) the process exits 0 after
        it (uvicorn re-raises the captured signal after shutting down, so the process would die of it)."""

        on_exit_signal = None

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit and self.on_exit_signal is not None:
                self.on_exit_signal()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer
