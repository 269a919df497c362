"""Greedy / top-k sampling from a trained model, at one fixed shape so graph mode compiles once."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn


def generate(model: nn.Cell, tokenizer, prompt: str, num_tokens: int, seq_len: int, top_k: int = 1,
             seed: int = 0, pad_id: int = 0) -> str:
    """Continue `prompt` by num_tokens tokens. top_k=1 is greedy. Causal attention makes right padding inert."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [pad_id]
    rng = np.random.default_rng(seed)
    for _ in range(num_tokens):
        window = ids[-seq_len:]
        tokens = np.full((1, seq_len), pad_id, np.int32)
        tokens[0, :len(window)] = window
        logits = model(Tensor(tokens)).asnumpy()[0, len(window) - 1].astype(np.float64)
        if top_k <= 1:
            ids.append(int(logits.argmax()))
            continue
        top = np.argpartition(-logits, top_k - 1)[:top_k]
        probs = np.exp(logits[top] - logits[top].max())
        ids.append(int(rng.choice(top, p=probs / probs.sum())))
    return tokenizer.decode(ids)
