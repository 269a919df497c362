"""`ascend-llm serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching, for a
run/checkpoint, quantized or Hugging Face model directory. SIGTERM/SIGINT: stop accepting, finish running
requests (up to --grace seconds), cancel the rest, exit 0."""

from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm serve", description=__doc__)
    p.add_argument("model", help="run/checkpoint, quantized or Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-slots", type=int, default=8, help="KV-cache slots = requests decoded together")
    p.add_argument("--max-len", type=int, default=None, help="cache positions per slot (default: max_seq_len)")
    p.add_argument("--prefill-bucket", type=int, default=64, help="prompt lengths padded to a multiple of this")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--token-budget", type=int, default=None, help="cache positions running requests may reserve")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get on shutdown")
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: directory name)")
    p.add_argument("--tokenizer", help="tokenizer.json when none sits beside the model")
    p.add_argument("--pynative", action="store_true", help="PyNative instead of graph mode")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    import mindspore as ms
    import uvicorn

    from ascend_llm.data.tokenizer import EOS
    from ascend_llm.errors import ConfigError
    from ascend_llm.eval.source import load_source
    from ascend_llm.eval.text import load_any_tokenizer
    from ascend_llm.inference.batching import ContinuousBatcher
    from ascend_llm.inference.engine import Engine
    from ascend_llm.inference.server import TextCodec, build_app

    ms.set_context(mode=ms.PYNATIVE_MODE if args.pynative else ms.GRAPH_MODE)
    source = load_source(args.model)
    tokenizer = source.tokenizer or load_any_tokenizer(
        Path(args.tokenizer) if args.tokenizer else source.tokenizer_file, "--tokenizer")
    max_len = args.max_len or source.model_cfg.max_seq_len
    if max_len > source.model_cfg.max_seq_len:
        raise ConfigError("--max-len", max_len, f"must be <= the model's max_seq_len={source.model_cfg.max_seq_len}")
    engine = Engine(source.model, max_len, args.num_slots, args.prefill_bucket)
    eos = [getattr(tokenizer, "eos_token_id", None)]
    if hasattr(tokenizer, "token_to_id"):
        eos.append(tokenizer.token_to_id(EOS))
    codec = TextCodec(tokenizer, sorted({e for e in eos if e is not None}))
    if codec.vocab_size() > source.model_cfg.vocab_size:
        raise ConfigError("--tokenizer", f"{codec.vocab_size()} ids",
                          f"must not exceed the model's vocab_size={source.model_cfg.vocab_size}")
    batcher = ContinuousBatcher(engine, tokenizer, args.max_queue, args.token_budget)
    app = build_app(batcher, codec, args.model_name or Path(args.model).resolve().name, args.grace)
    print(f"serving {args.model} ({source.kind}) on http://{args.host}:{args.port} with {args.num_slots} slots "
          f"of {max_len} positions", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.grace)
    _graceful_server_class()(config).run()
    return 0


def _graceful_server_class():
    import contextlib
    import signal
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's Server, except that SIGTERM/SIGINT end in exit status 0 after the graceful shutdown
        (uvicorn re-raises the captured signal after shutting down, so the process would die of it)."""

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
