"""Console plumbing for the CLI: the one logging configuration, and output that survives a closed pipe.

`ascend-llm ... | head` closes the pipe early; writing then raises BrokenPipeError (and Python prints a
traceback at exit). `PipeSafeStream` drops output after the reader is gone, so a command finishes its work
(`launch` keeps draining its job's output and waits for it) and exits without a traceback.
"""

from __future__ import annotations

import io
import logging
import os
import sys

LOG_LEVEL_ENV = "ASCEND_LLM_LOG_LEVEL"


class PipeSafeStream(io.TextIOBase):
    """Wraps a text stream; after the first BrokenPipeError every write is discarded."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def _broke(self) -> None:
        self.broken = True
        try:  # point the descriptor at /dev/null so the interpreter's own flush at exit stays quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._broke()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._broke()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def protect_std_streams() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, PipeSafeStream):
            setattr(sys, name, PipeSafeStream(stream))


def configure_logging() -> int:
    """The package's one log handler: `[ascend_llm] message` on stderr at $ASCEND_LLM_LOG_LEVEL (default
    INFO). Returns the level."""
    level = getattr(logging, os.environ.get(LOG_LEVEL_ENV, "INFO").upper(), logging.INFO)
    root = logging.getLogger("ascend_llm")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()  # resolves sys.stderr at emit time (the pipe-safe wrapper)
    handler.setFormatter(logging.Formatter("[ascend_llm] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return level
