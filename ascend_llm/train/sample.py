"""The trainer's closing sample: greedy / top-k continuation through the one scheduler (ascend_llm.inference)."""

from __future__ import annotations

import logging

import numpy as np
from mindspore import Tensor, nn

from ascend_llm.inference import Engine, SamplingParams, Scheduler
from ascend_llm.inference.engine import bucket

logger = logging.getLogger("ascend_llm.train")


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
    if not hasattr(model, "cfg"):  # a full-logits forward over a tensor/context-parallel model (train/layout.py)
        return tokenizer.decode(_generate_full_windows(model, ids, num_tokens, seq_len, top_k, seed, pad_id))
    window = min(seq_len, model.cfg.max_seq_len)
    if num_tokens < 1 or window < 2:
        return tokenizer.decode(ids)
    kept = ids[-max(1, window - num_tokens):]
    new_tokens = min(num_tokens, window - len(kept))
    if len(kept) < len(ids) or new_tokens < num_tokens:
        logger.info("closing sample: the %d-position window (data.seq_len) keeps the prompt's last %d of %d tokens "
                    "and generates %d of train.sample_tokens=%d", window, len(kept), len(ids), new_tokens, num_tokens)
    ids = kept
    # prompts are a few tokens: with one block holding the whole window and one-token prefill chunks, the decode
    # graph alone serves prompt and continuation (one graph to compile, not one per prompt chunk / block count)
    max_len = len(ids) + new_tokens
    engine = Engine(model, max_len=max_len, num_slots=1, block_size=bucket(max_len), num_blocks=2, max_chunk=1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if top_k <= 1 else 1.0,
                            top_k=0 if top_k <= 1 else top_k, seed=seed)
    request = Scheduler(engine).generate([ids], params)[0]
    return tokenizer.decode(ids + request.out)


def _generate_full_windows(forward, ids: list, num_tokens: int, seq_len: int, top_k: int, seed: int,
                           pad_id: int) -> list:
    """Without a KV cache: every new token re-runs `forward` on one right-padded (1, seq_len) window (one
    compiled shape; causal attention makes the padding inert). For sharded models, whose forward holds
    collectives and must run on every rank with the same shapes."""
    rng = np.random.default_rng(seed)
    ids = list(ids)
    for _ in range(num_tokens):
        window = ids[-seq_len:]
        tokens = np.full((1, seq_len), pad_id, np.int32)
        tokens[0, :len(window)] = window
        logits = forward(Tensor(tokens)).asnumpy()[0, len(window) - 1].astype(np.float64)
        if top_k <= 1:
            ids.append(int(logits.argmax()))
            continue
        top = np.argpartition(-logits, top_k - 1)[:top_k]
        probs = np.exp(logits[top] - logits[top].max())
        ids.append(int(rng.choice(top, p=probs / probs.sum())))
    return ids
