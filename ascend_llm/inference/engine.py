"""The paged-KV-cache model runner: one compiled step (embedding -> layers -> logits -> greedy argmax) over rows of
new tokens, reading and writing the block cache of `kv_cache.py`.

`PagedForward.construct(tokens (B, T), positions (B, T), slot_mapping (B*T,), block_tables (B, MB), logit_index
(B,))` writes each new token's K/V at its slot in place, attends each query to the positions <= its own of its
sequence's blocks only (gathered by block table: B * MB * block_size positions, never the whole cache), and
returns (argmax ids (B,) int32, logits (B, vocab) float32 at logit_index). Decode is T = 1; prefill chunks use
T = the chunk length. The host copies the (B,) ids every step and the logits only for rows that sample, penalise
or report logprobs.

Shapes: every step runs one of `Engine.graph_shapes()`, a fixed set that `Engine.warm_up()` compiles (serve does
it before /health answers), so no request waits for a graph compile. When the fused C++ layer applies (CPU,
inference/fused_decode.py), a step is one call over flat token rows: T = 1, B = N rows, one per new token (the
decode token of each running sequence and the prompt-chunk tokens of several waiting ones), each row with its own
position, slot and its sequence's block table; the layer writes every row's K/V before attending, so a chunk's
tokens see each other causally; logit_index (R,) then picks the last row of each sequence. N is padded to a step
size of `row_buckets`. Otherwise (MindSpore ops: Ascend, cells the fused layer does not cover) decode rows run as
(B, 1) with B a power of two and each prompt chunk alone as (1, T) with T a power of two from MIN_CHUNK; on CPU
decode attention is a C++ kernel (kv_cache.cpu_decode_attention) that reads positions 0..position of each row
through its block table, nothing else, and prefill chunks gather their blocks (table widths of `Engine.widths`)
and attend with MindSpore matmuls.

`Engine` owns the cache, the block allocator and the compiled step; `Engine.generate` runs prompts through the one
`Scheduler` (inference/scheduler.py). On Ascend the cache write and the attention go through MindSpore's fused
ReshapeAndCache / PagedAttention (inference/ascend_ops.py) with the same layout and arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import ParameterTuple, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.errors import ConfigError
from ascend_llm.inference import ascend_ops, fused_decode
from ascend_llm.inference.cpu_pool import kernel_threads
from ascend_llm.inference.kv_cache import (
    NULL_BLOCK,
    AscendCacheWrite,
    AscendDecodeAttention,
    BlockAllocator,
    CpuDecodeAttention,
    PortableCacheWrite,
    cpu_decode_attention,
    make_cache,
)
from ascend_llm.models.llama import rope_inv_freq, rope_tables

DEFAULT_CACHE_TOKENS = 1 << 16  # KV positions reserved when neither num_blocks nor a smaller need is given
MIN_ATTEND_POSITIONS = 1024  # narrowest block-table width of a prompt chunk, in positions (MindSpore-ops path)
MIN_CHUNK = 16  # smallest prompt-chunk bucket of the MindSpore-ops path (shorter chunks are padded to it)


def bucket(n: int, low: int = 1, high: int | None = None) -> int:
    """Smallest power of two >= max(n, low), capped at high (shape buckets for graph mode)."""
    size = low
    while size < n:
        size *= 2
    return size if high is None else min(size, high)


def _powers(low: int, high: int) -> list[int]:
    """Powers of two from bucket(low) up to high (high itself a power of two)."""
    out, n = [], bucket(low)
    while n <= high:
        out.append(n)
        n *= 2
    return out


class PagedForward(nn.Cell):
    """One model step over new tokens with the paged cache (see the module docstring for the arguments).

    Reuses the model's own sub-cells (attention_norm, project_qkv, wo, ffn_norm, feed_forward, project_logits), so
    converters that replace them (precision, FP8, LoRA, quantized linears) apply here too.
    """

    def __init__(self, model: nn.Cell, max_len: int, num_blocks: int, block_size: int, fused: bool = True,
                 threads: int | None = None):
        super().__init__()
        cfg = model.cfg
        self.model = model
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.block_size = block_size
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta, rope_inv_freq(cfg))
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)
        on_ascend = ascend_ops.available()  # fused ReshapeAndCache / PagedAttention on a float16 cache
        keys, values = make_cache(cfg, num_blocks, block_size, mstype.float16 if on_ascend else mstype.float32)
        self.key_cache, self.value_cache = ParameterTuple(keys), ParameterTuple(values)
        self.cache_write = AscendCacheWrite() if on_ascend else PortableCacheWrite()
        kernel = cpu_decode_attention() if ms.get_context("device_target") == "CPU" else None
        self.has_decode_kernel = on_ascend or kernel is not None  # else decode takes the gather path too
        if on_ascend:
            self.decode_attention = AscendDecodeAttention(self.scale, self.num_kv_heads)
        elif kernel is not None:
            self.decode_attention = CpuDecodeAttention(kernel)
        fused = fused and kernel is not None and not on_ascend and fused_decode.library_path() is not None
        # decode steps of plain fp32 layers: one C++ kernel per layer (inference/fused_decode.py)
        self.fused = fused_decode.DecodeLayer(model, threads) if fused and fused_decode.supported(model) else None
        self.tied_head = bool(getattr(model, "tie_embeddings", False)) and hasattr(model, "norm")
        self.matmul_nt = ops.MatMul(transpose_b=True)

    def _attend(self, q, key_cache, value_cache, block_tables, visible):
        """q (B, H, T, D); caches (NB, BS, H_kv, D); block_tables (B, MB); visible (B, 1, 1, T, L) -> (B, H, T, D)."""
        batch, _, seq, head_dim = q.shape
        length = block_tables.shape[1] * self.block_size
        keys = ops.gather(key_cache, block_tables, 0).reshape(batch, length, self.num_kv_heads, head_dim)
        values = ops.gather(value_cache, block_tables, 0).reshape(batch, length, self.num_kv_heads, head_dim)
        keys, values = keys.astype(mstype.float32), values.astype(mstype.float32)
        q = q.astype(mstype.float32).reshape(batch, self.num_kv_heads, self.group * seq, head_dim)
        scores = ops.matmul(q, keys.transpose(0, 2, 3, 1)) * self.scale  # (B, H_kv, G*T, L)
        scores = scores.reshape(batch, self.num_kv_heads, self.group, seq, length)
        probs = ops.softmax(ops.where(visible, scores, -1e30), -1)
        probs = probs.reshape(batch, self.num_kv_heads, self.group * seq, length)
        out = ops.matmul(probs, values.transpose(0, 2, 1, 3))  # (B, H_kv, G*T, D)
        return out.reshape(batch, self.num_heads, seq, head_dim)

    def _token_rows(self, x):
        """(B, H_kv, T, D) -> (B*T, H_kv, D), token-major like slot_mapping (a plain reshape when T == 1)."""
        batch, heads, seq, dim = x.shape
        if seq == 1:
            return x.reshape(batch, heads, dim)
        return x.transpose(0, 2, 1, 3).reshape(batch * seq, heads, dim)

    def _layers(self, h, positions, slot_mapping, block_tables):
        """h (B, T, dim) through every layer with MindSpore ops (prefill chunks; decode of converted layers)."""
        batch, seq = positions.shape
        length = block_tables.shape[1] * self.block_size
        cos = ops.gather(self.rope_cos, positions, 0).expand_dims(1)  # (B, 1, T, D)
        sin = ops.gather(self.rope_sin, positions, 0).expand_dims(1)
        key_positions = ops.arange(length, dtype=mstype.int32).reshape(1, 1, 1, 1, length)
        visible = ops.less_equal(key_positions, positions.reshape(batch, 1, 1, seq, 1))
        for i, layer in enumerate(self.model.layers):
            attn = layer.attention
            q, k, v = attn.project_qkv(layer.attention_norm(h), cos, sin)
            k, v = self._token_rows(k.astype(mstype.float32)), self._token_rows(v.astype(mstype.float32))
            wrote_k, wrote_v = self.cache_write(k, v, self.key_cache[i], self.value_cache[i], slot_mapping)
            key_cache = ops.depend(self.key_cache[i], wrote_k)
            value_cache = ops.depend(self.value_cache[i], wrote_v)
            if self.has_decode_kernel and seq == 1:  # decode over the held blocks only (C++ or Ascend kernel)
                out = self.decode_attention(q, key_cache, value_cache, block_tables, positions.reshape(batch))
                out = out.astype(h.dtype)
            else:
                out = self._attend(q, key_cache, value_cache, block_tables, visible).astype(h.dtype)
            merged = out.reshape(batch, 1, -1) if seq == 1 else out.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
            h = h + attn.wo(merged)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return h

    def construct(self, tokens, positions, slot_mapping, block_tables, logit_index):
        batch, seq = tokens.shape
        h = self.model.tok_embeddings(tokens)
        if self.fused is not None and seq == 1:  # one C++ kernel per layer (inference/fused_decode.py)
            h = h.astype(mstype.float32).reshape(batch, -1)
            rows = positions.reshape(batch)
            for i, layer in enumerate(self.model.layers):
                h = self.fused(h, i, layer, rows, slot_mapping, block_tables, self.key_cache[i], self.value_cache[i],
                               self.rope_cos, self.rope_sin)
            h = h.reshape(batch, 1, -1)
        else:
            h = self._layers(h, positions, slot_mapping, block_tables)
        if self.fused is not None and seq == 1:  # flat rows: logit_index (R,) picks rows of h (N, 1, dim)
            picked = ops.gather(h.reshape(batch, -1), logit_index, 0).expand_dims(1)
            batch = logit_index.shape[0]
        else:
            picked = ops.gather(h, logit_index.reshape(batch, 1), 1, batch_dims=1)
        if self.tied_head:  # h @ E^T as one 2-D MatMul(transpose_b): no per-step transpose of the embeddings
            normed = self.model.norm(picked).reshape(batch, -1)
            logits = self.matmul_nt(normed, self.model.tok_embeddings.weight.astype(normed.dtype))
            logits = logits.astype(mstype.float32)
        else:
            logits = self.model.project_logits(picked).reshape(batch, -1)
        return ops.argmax(logits, -1).astype(mstype.int32), logits


@dataclass
class GenerationResult:
    """token_ids: generated ids (stop token included); text: decoded continuation cut before a stop string, special
    tokens skipped (None without a tokenizer); finish_reason: "stop", "length", "cancelled" or "error";
    stop_reason: the stop token id or stop string matched."""

    token_ids: list[int]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None = None


class StepOutput:
    """Result of one `Engine.run`: ids (n,) int32 device argmax; logits(rows) copies (len(rows), V) on demand."""

    def __init__(self, ids: np.ndarray, logits: Tensor):
        self.ids, self._logits, self._host = ids, logits, None

    def logits(self, row: int) -> np.ndarray:
        if self._host is None:
            self._host = self._logits.asnumpy()
        return self._host[row]


class RowsOutput:
    """StepOutput of a step run as several calls: parts [(row indices, StepOutput)]; ids (n,) int32 and
    logits(row) in the caller's row order."""

    def __init__(self, parts: list[tuple[list[int], StepOutput]]):
        self.ids = np.zeros(sum(len(rows) for rows, _ in parts), np.int32)
        self._where: dict[int, tuple[StepOutput, int]] = {}
        for rows, part in parts:
            for j, row in enumerate(rows):
                self.ids[row] = part.ids[j]
                self._where[row] = (part, j)

    def logits(self, row: int) -> np.ndarray:
        part, j = self._where[row]
        return part.logits(j)


class Engine:
    """Paged-KV-cache generation for a Llama-family `Transformer` (anything with `cfg`, `tok_embeddings`, `layers`,
    `project_logits`).

    max_len: positions per sequence (prompt + new tokens; default model.cfg.max_seq_len); num_slots: sequences
    decoded together at most (vLLM's max_num_seqs); block_size: positions per KV block; num_blocks: blocks in the
    pool including the null block (default: enough for num_slots * max_len positions, at most 65,536 positions);
    max_chunk: prompt tokens per sequence per step (chunked prefill; rounded up to a power of two); fused_decode:
    decode steps of plain fp32 layers on CPU through one C++ kernel per layer (inference/fused_decode.py; False
    keeps MindSpore ops); threads: threads of that kernel (default $ASCEND_LLM_KERNEL_THREADS, else min(2, CPUs
    allowed); `fused_decode.kernel_threads`). ConfigError for impossible sizes.
    """

    def __init__(self, model: nn.Cell, max_len: int | None = None, num_slots: int = 8, *, block_size: int = 16,
                 num_blocks: int | None = None, max_chunk: int = 256, fused_decode: bool = True,
                 threads: int | None = None):
        max_len = int(max_len or model.cfg.max_seq_len)
        if max_len < 2:
            raise ConfigError("max_len", max_len, "must be >= 2 (prompt + at least one new token)")
        if num_slots < 1:
            raise ConfigError("num_slots", num_slots, "must be >= 1")
        if block_size < 1 or block_size & (block_size - 1):
            raise ConfigError("block_size", block_size, "must be a power of two")
        self.model, self.cfg, self.max_len, self.num_slots = model, model.cfg, max_len, num_slots
        self.block_size, self.max_chunk = block_size, bucket(max(1, max_chunk))
        tokens = min(num_slots * max_len, max(DEFAULT_CACHE_TOKENS, max_len))
        self.num_blocks = int(num_blocks or -(-tokens // block_size) + 1)
        self.max_blocks_per_seq = -(-max_len // block_size)
        if self.num_blocks < 2:
            raise ConfigError("num_blocks", self.num_blocks, "must be >= 2 (block 0 is the null block)")
        self.allocator = BlockAllocator(self.num_blocks, block_size)
        self.threads = kernel_threads(threads)  # (the argument fused_decode hides the module here)
        self.forward = PagedForward(model, max_len, self.num_blocks, block_size, fused=fused_decode,
                                    threads=self.threads)
        # prompt ids the embedding accepts: the vocabulary, plus image placeholders after it when tok_embeddings is a
        # models/vlm.py SplicedEmbedding (an image prefix of a vision-language model)
        self.num_input_ids = self.cfg.vocab_size + int(getattr(model.tok_embeddings, "num_image_tokens", 0))
        self._jit_step = None
        self._shapes_seen: set[tuple] = set()
        # fused CPU layer: every step is one call over flat token rows (decode and prompt chunks together)
        self.flat = self.forward.fused is not None
        self.logit_rows = bucket(num_slots)  # logits computed per flat step: one per sequence at most
        self.max_step_tokens = bucket(max(self.max_chunk, num_slots))
        # flat step sizes: powers of two up to bucket(num_slots) (decode steps), then multiples of an eighth of the
        # largest step (at least 32): a prompt of 137 tokens runs 160 rows, not 256 (padding rows cost as much as
        # real ones). 13 sizes for 16 slots and 256-token chunks.
        unit = min(max(32, self.max_step_tokens // 8), self.max_step_tokens)
        self.row_buckets = _powers(1, self.logit_rows)
        self.row_buckets += [n for n in range(unit, self.max_step_tokens + 1, unit) if n > self.logit_rows]
        self.stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0, "steps": 0}

    def run(self, seq_ids: list[str], tokens: list[list[int]], starts: list[int]) -> StepOutput:
        """One compiled step: row i appends tokens[i] at positions starts[i].. of sequence seq_ids[i] (its blocks
        must already hold them); returns the next-token argmax and logits after each row's last token.

        Only shapes of `graph_shapes()` are run (each row padded up to its bucket), so after `warm_up()` no step
        compiles a graph. With the fused CPU layer every step is one call over flat token rows: decode tokens and
        prompt-chunk tokens together, each token a row of its sequence (vLLM's flattened batch); otherwise decode
        rows run together and each prompt chunk runs alone, padded to its chunk bucket."""
        if self.flat:
            return self._run_flat(seq_ids, tokens, starts)
        decode = [i for i, t in enumerate(tokens) if len(t) == 1]
        chunks = [i for i, t in enumerate(tokens) if len(t) > 1]
        if len(chunks) + bool(decode) == 1:  # only decode rows, or one prompt chunk
            return self._run_rows(seq_ids, tokens, starts)
        parts = [(decode, self._run_rows([seq_ids[i] for i in decode], [tokens[i] for i in decode],
                                         [starts[i] for i in decode]))] if decode else []
        parts += [([i], self._run_rows([seq_ids[i]], [tokens[i]], [starts[i]])) for i in chunks]
        return RowsOutput(parts)  # decode rows together, prompt chunks one by one

    # ---- the shape set --------------------------------------------------------------------------------------
    def graph_shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (batch, tokens per row, table width, logit rows) the engine runs: the graphs `warm_up` compiles.

        Fused CPU layer: flat rows N (`row_buckets`), table width bucket(max blocks),
        logit rows min(N, bucket(num_slots)). Otherwise: decode (B, 1, W) for batch buckets B up to
        bucket(num_slots) and prompt chunks (1, T, W) for chunk buckets T (powers of two from MIN_CHUNK up to
        max_chunk); W = table widths (`widths()`)."""
        full = bucket(self.max_blocks_per_seq)
        if self.flat:
            return [(n, 1, full, min(n, self.logit_rows)) for n in self.row_buckets]
        shapes = [(b, 1, w, b) for b in _powers(1, bucket(self.num_slots)) for w in self.widths(1)]
        for seq in _powers(min(MIN_CHUNK, self.max_chunk), self.max_chunk):
            shapes += [(1, seq, w, 1) for w in self.widths(seq)]
        return shapes

    def widths(self, seq: int) -> list[int]:
        """Block-table widths used with `seq` new tokens per row. The full width (bucket of max blocks per
        sequence) for decode when its kernel reads only the held blocks; for prompt chunks, powers of four from
        MIN_ATTEND_POSITIONS / block_size (attention over that many positions costs less than a layer's matmuls
        for the 24 M Qwen2) up to the full width: one width for contexts up to 1,024 positions."""
        full = bucket(self.max_blocks_per_seq)
        if seq == 1 and self.forward.has_decode_kernel:
            return [full]
        least = max(-(-seq // self.block_size), MIN_ATTEND_POSITIONS // self.block_size, 1)
        out, w = [], 1
        while w < full:
            if w >= least:
                out.append(w)
            w *= 4
        return out + [full]

    def _width(self, seq: int, held: int) -> int:
        return next(w for w in self.widths(seq) if w >= held)

    def warm_up(self) -> float:
        """Compile every shape of `graph_shapes()` (padding rows only: nothing is written to the cache);
        returns the seconds taken."""
        began = time.perf_counter()
        for batch, seq, width, logit_rows in self.graph_shapes():
            shape = (batch * seq, 1) if self.flat else (batch, seq)
            self._call(Tensor(np.zeros(shape, np.int32)), Tensor(np.zeros(shape, np.int32)),
                       Tensor(np.full(batch * seq, -1, np.int32)),
                       Tensor(np.full((batch * seq if self.flat else batch, width), NULL_BLOCK, np.int32)),
                       Tensor(np.zeros(logit_rows, np.int32)))[0].asnumpy()
        return time.perf_counter() - began

    @property
    def graph_compiles(self) -> int:
        """Distinct input shapes the compiled step has run (each one graph compiled in graph mode)."""
        return len(self._shapes_seen)

    # ---- steps ----------------------------------------------------------------------------------------------
    def _run_flat(self, seq_ids: list[str], tokens: list[list[int]], starts: list[int]) -> StepOutput:
        """Flat rows: one row per new token, in one call of N = the next of `row_buckets` rows (split when beyond
        max_step_tokens or logit_rows sequences; a row longer than max_step_tokens runs in pieces, in order)."""
        step = self.max_step_tokens
        if len(tokens) == 1 and len(tokens[0]) > step:
            for cut in range(0, len(tokens[0]) - step, step):
                self._run_flat(seq_ids, [tokens[0][cut:cut + step]], [starts[0] + cut])
            cut = (len(tokens[0]) - 1) // step * step
            return self._run_flat(seq_ids, [tokens[0][cut:]], [starts[0] + cut])
        total = sum(len(t) for t in tokens)
        if total > self.max_step_tokens or len(tokens) > self.logit_rows:
            parts, rows, count = [], [], 0
            for i, new in enumerate(tokens):
                if rows and (count + len(new) > self.max_step_tokens or len(rows) == self.logit_rows):
                    parts.append(rows)
                    rows, count = [], 0
                rows.append(i)
                count += len(new)
            parts.append(rows)
            return RowsOutput([(rows, self._run_flat([seq_ids[i] for i in rows], [tokens[i] for i in rows],
                                                     [starts[i] for i in rows])) for rows in parts])
        n = next(b for b in self.row_buckets if b >= total)
        width = bucket(self.max_blocks_per_seq)
        ids, positions = np.zeros((n, 1), np.int32), np.zeros((n, 1), np.int32)
        slots, tables = np.full(n, -1, np.int32), np.full((n, width), NULL_BLOCK, np.int32)
        last = np.zeros(min(n, self.logit_rows), np.int32)
        row = 0
        for i, (seq_id, new, start) in enumerate(zip(seq_ids, tokens, starts)):
            k = len(new)
            ids[row:row + k, 0] = new
            positions[row:row + k, 0] = np.arange(start, start + k)
            slots[row:row + k] = self.allocator.slots(seq_id, start, k)
            table = self.allocator.table(seq_id)
            tables[row:row + k, :len(table)] = table
            last[i] = row + k - 1
            row += k
        return self._timed(tokens, ids, positions, slots, tables, last)

    def _run_rows(self, seq_ids: list[str], tokens: list[list[int]], starts: list[int]) -> StepOutput:
        """(B, T) rows of equal kind: decode rows (T = 1) or one prompt chunk (B = 1, T its chunk bucket)."""
        rows, longest = len(tokens), max(len(t) for t in tokens)
        seq = 1 if longest == 1 else bucket(longest, low=min(MIN_CHUNK, self.max_chunk))
        batch = bucket(rows) if seq == 1 else 1
        held = max(len(self.allocator.table(s)) for s in seq_ids)
        width = self._width(seq, max(held, -(-seq // self.block_size)))
        ids = np.zeros((batch, seq), np.int32)
        positions = np.zeros((batch, seq), np.int32)
        slots = np.full((batch, seq), -1, np.int32)
        tables = np.full((batch, width), NULL_BLOCK, np.int32)
        last = np.zeros(batch, np.int32)
        for row, (seq_id, new, start) in enumerate(zip(seq_ids, tokens, starts)):
            n = len(new)
            ids[row, :n] = new
            positions[row, :n] = np.arange(start, start + n)
            slots[row, :n] = self.allocator.slots(seq_id, start, n)
            table = self.allocator.table(seq_id)
            tables[row, :len(table)] = table
            last[row] = n - 1
        return self._timed(tokens, ids, positions, slots.reshape(-1), tables, last)

    def _timed(self, tokens, ids, positions, slots, tables, last) -> StepOutput:
        began = time.perf_counter()
        out_ids, logits = self._call(Tensor(ids), Tensor(positions), Tensor(slots), Tensor(tables), Tensor(last))
        host_ids = out_ids.asnumpy()[:len(tokens)]
        prefill = sum(len(t) for t in tokens if len(t) > 1)
        kind = "prefill" if prefill else "decode"
        self.stats[f"{kind}_s"] += time.perf_counter() - began
        self.stats["prefill_tokens"] += prefill
        self.stats["decode_tokens"] += sum(1 for t in tokens if len(t) == 1) if not prefill else 0
        self.stats["steps"] += 1
        return StepOutput(host_ids, logits)

    def _call(self, *args):
        """The compiled step. In graph mode through an `ms.jit` function that calls the cell: the generic
        `Cell.__call__` re-walks every sub-cell to set its compile phase on every call (~2-3 ms a step here, measured
        with cProfile); the jit function's call costs ~0.1 ms. In pynative mode the cell runs op by op."""
        self._shapes_seen.add(tuple(a.shape for a in args))
        if ms.get_context("mode") != ms.GRAPH_MODE:
            return self.forward(*args)
        if self._jit_step is None:
            forward = self.forward

            @ms.jit
            def step(tokens, positions, slot_mapping, block_tables, logit_index):
                return forward(tokens, positions, slot_mapping, block_tables, logit_index)

            self._jit_step = step
        return self._jit_step(*args)

    def generate(self, prompts: list[list[int]], params, tokenizer=None) -> list[GenerationResult]:
        """Run prompts to completion through the scheduler (params: one SamplingParams or one per prompt)."""
        from ascend_llm.inference.scheduler import Scheduler

        requests = Scheduler(self, tokenizer, max_queue=max(64, len(prompts))).generate(prompts, params)
        return [GenerationResult(list(r.out), r.text if tokenizer is not None else None, r.finish_reason,
                                 r.stop_reason) for r in requests]

    def tokens_per_second(self) -> dict[str, float]:
        """Throughput so far: prefill and decode tokens / s (decode counts one token per running sequence)."""
        s = self.stats
        return {"prefill_tokens_per_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
                "decode_tokens_per_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0}

    def cache_bytes(self, blocks: int | None = None) -> int:
        """Bytes of K and V over all layers held by `blocks` blocks (default: the blocks in use)."""
        blocks = self.allocator.num_used() if blocks is None else blocks
        per_block = 2 * self.cfg.num_layers * self.block_size * self.cfg.num_kv_heads * self.cfg.head_dim * 4
        return blocks * per_block
