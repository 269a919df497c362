"""`ascend-llm` entry point: one sub-command per module, imported lazily so `--help` stays fast.

Every sub-command module exposes `main(argv: list[str]) -> int`. A UserInputError anywhere is printed as one
line on stderr with exit status 2; a diverged training run as one line with exit status 3; other exceptions
are bugs and keep their traceback. Logging goes through one `ascend_llm` logger configured here
($ASCEND_LLM_LOG_LEVEL), and output to a pipe that closes early is dropped without a traceback.
"""

from __future__ import annotations

import importlib
import sys

from ascend_llm.cli.process import own_process
from ascend_llm.cli.streams import configure_logging, protect_std_streams
from ascend_llm.config.threads import env_threads
from ascend_llm.errors import TrainingDiverged, UserInputError

COMMANDS = {
    "train": ("ascend_llm.cli.train", "train a model from a Hydra recipe (overrides as key=value)"),
    "prepare": ("ascend_llm.cli.prepare", "tokenize a corpus into a token memmap (+ tokenizer)"),
    "info": ("ascend_llm.cli.info", "parameter counts, FLOPs/token and memory of a recipe's model"),
    "plan": ("ascend_llm.cli.plan", "per-device memory and step-time plan of a recipe; what to change to fit"),
    "bench": ("ascend_llm.cli.bench", "benchmarks beside their peers (`ascend-llm bench --help` lists them)"),
    "rank-table": ("ascend_llm.cli.rank_table", "generate, validate, merge or show HCCL rank tables"),
    "launch": ("ascend_llm.cli.launch", "launch a distributed job with msrun from a recipe"),
    "convert": ("ascend_llm.cli.convert", "export a checkpoint as a Hugging Face model directory"),
    "generate": ("ascend_llm.cli.generate", "generate text with a KV cache from an HF directory or checkpoint"),
    "quantize": ("ascend_llm.cli.quantize", "weight-only int8/int4 quantization (RTN, GPTQ) of a model"),
    "eval": ("ascend_llm.cli.eval", "perplexity (strided sliding windows) and size table of models"),
    "serve": ("ascend_llm.cli.serve", "OpenAI-compatible HTTP server with continuous batching"),
    "drift": ("ascend_llm.cli.drift", "drift detection: model loss, token and embedding tests, new vs reference"),
    "continual": ("ascend_llm.cli.continual", "the loop: drift -> update with replay -> distil -> table -> export"),
}


def usage() -> str:
    lines = ["usage: ascend-llm <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `ascend-llm <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the program (console script, python -m, msrun's workers): the command owns it
        own_process()
    argv = sys.argv[1:] if argv is None else list(argv)
    protect_std_streams()
    configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ascend-llm: command={name!r}: allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        env_threads()  # before MindSpore loads (its OpenMP runtime prints its own complaint about a bad value)
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UserInputError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(exc.one_line(), file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
