"""`HFTokenizer` under its former import path (`ascend_llm.interop.tokenizer`), for scripts written against it;
the tokenizer lives in `ascend_llm.tokenizer.hf`."""

from ascend_llm.tokenizer.hf import TEXT_FILES, HFTokenizer  # noqa: F401
