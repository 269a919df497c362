"""Incremental detokenization and stop strings, as vLLM v1's detokenizer does them.

`IncrementalDetokenizer.push(token_id)` decodes only the newest tokens: the text of ids[prefix_offset:] minus the
text of ids[prefix_offset:read_offset] (vLLM's `detokenize_incrementally`), so a multi-byte UTF-8 character split
over byte-fallback tokens is released only once complete (a decode ending in U+FFFD waits for more tokens).
Special tokens are skipped (never in the text, so a stop string can never match inside one). Stop strings are
searched only in the new text plus the len(stop)-1 characters before it; the text that could still be the start of
a stop string is held back, so released text is never retracted.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens decoded for context


class IncrementalDetokenizer:
    """Text of generated ids, one token at a time.

    tokenizer: anything with decode(ids, skip_special_tokens=...) (HFTokenizer or a `tokenizers.Tokenizer`);
    prompt: the prompt ids (its last few give leading spaces their context); stop_strings: the request's stops.
    Attributes: `text` (released text, never retracted), `stop` (the matched stop string or None).
    """

    def __init__(self, tokenizer, prompt: list[int], stop_strings: list[str] | tuple = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-PROMPT_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stops = [s for s in stop_strings if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.full = ""  # all decoded continuation text
        self.text = ""  # released part of `full`
        self.stop: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the newly released text ('' while held back). After a stop string
        matched (`self.stop` set) the text ends before it and further pushes release nothing."""
        if self.stop is not None:
            return ""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        current = self._decode(self.ids[self.prefix_offset:])
        if (current.endswith(REPLACEMENT) and not final) or len(current) <= len(prefix):
            return self._release(final)  # an incomplete UTF-8 sequence (or nothing new): wait
        new = current[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.full) - self.longest_stop + 1)
        self.full += new
        if self.stops:
            window = self.full[start:]
            hits = [(window.find(s), s) for s in self.stops]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, stop = min(hits)
                self.stop, self.full = stop, self.full[:start + at]
                return self._release(True)
        return self._release(final)

    def finish(self) -> str:
        """The generation ended (stop token or length): release everything held back, an incomplete UTF-8 tail
        as U+FFFD (what a full decode of the ids shows)."""
        return "" if self.stop is not None else self._advance(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.full) if final else len(self.full) - self._held()
        if end <= len(self.text):
            return ""
        new = self.full[len(self.text):end]
        self.text = self.full[:end]
        return new

    def _held(self) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.full)), best, -1):
                if self.full.endswith(stop[:size]):
                    best = size
                    break
        return best
