"""The trainer's closing sample: greedy / top-k continuation through the KV-cache engine (ascend_llm.inference)."""

from __future__ import annotations

from mindspore import nn

from ascend_llm.inference import Engine, SamplingParams


def generate(model: nn.Cell, tokenizer, prompt: str, num_tokens: int, seq_len: int, top_k: int = 1,
             seed: int = 0, pad_id: int = 0) -> str:
    """Continue `prompt` by num_tokens tokens and return prompt + continuation as text. top_k=1 is greedy,
    top_k > 1 samples from the k most likely tokens at temperature 1 (seeded).

    tokenizer: a HF `tokenizers.Tokenizer` (encode(...).ids) or an HFTokenizer (encode(...) -> ids). At most
    seq_len positions are used (the length the model was trained at): a longer prompt keeps its last tokens,
    and the continuation stops when the window is full. An empty prompt starts from pad_id.
    """
    encoded = tokenizer.encode(prompt, add_special_tokens=False)
    ids = list(getattr(encoded, "ids", encoded)) or [pad_id]
    window = min(seq_len, model.cfg.max_seq_len)
    if num_tokens < 1 or window < 2:
        return tokenizer.decode(ids)
    ids = ids[-max(1, window - num_tokens):]
    new_tokens = min(num_tokens, window - len(ids))
    engine = Engine(model, max_len=len(ids) + new_tokens, num_slots=1, prefill_bucket=len(ids))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if top_k <= 1 else 1.0,
                            top_k=0 if top_k <= 1 else top_k, seed=seed)
    result = engine.generate([ids], params)[0]
    return tokenizer.decode(ids + result.token_ids)
