"""Context parallel: the sequence split over the CP group in zigzag order, keys/values all-gathered, partial
attentions merged exactly by their log-sum-exp.

Layout. The global sequence (length S) is cut into 2*C chunks of L = S / (2C) tokens; CP rank r holds chunks
r and 2C-1-r (in that order), so every rank does the same amount of causal work (the zigzag/"load balanced"
layout of Megatron-LM's context parallel and of Brandon et al., Striped/Zigzag ring attention).
`zigzag_positions(S, C, r)` gives those global positions; `shard_sequence(x, C, r)` takes them from a
(batch, S, ...) array: the data loader applies it to tokens, targets and segment ids (every CP rank of one
data-parallel replica reads the same rows).

Attention (`ContextParallelAttention`, installed by `apply_context_parallel` in place of each
`attention.core_attention`): K, V (and segment ids) of the local 2L tokens are all-gathered over the CP group
(comm.AllGather; its backward is a reduce-scatter, so each rank receives the sum of every rank's dK/dV for its
own tokens) and put back in global order. For local chunk c: the diagonal block (q_c against its own keys,
causal) and the prefix (q_c against global positions [0, cL), no mask) are computed by `attention(...,
return_lse=True)` and merged with `merge_attention` (exact). An Ascend ring (send/recv overlapping compute)
would produce the same partials and merge them the same way; it is not implemented (MCCL has no Send/Recv).

RoPE. The model slices its rotary tables by local length; `apply_context_parallel` replaces
`model.rope_cos/rope_sin` with the rows of this rank's global positions, so positions are global. The
sequence length is therefore fixed at conversion (`seq_len`, the training length).

Loss. Each CP rank computes the loss of its own tokens divided by the token count of the whole global batch
(`tp.VocabParallelCrossEntropy(..., count_group=groups.dp_cp, count_scale=dp)`, train/layout.py), so the
ranks' losses add up to the global token mean; gradients are then summed over CP (and averaged over DP):
reduce over `groups.dp_cp`, scale 1/dp.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.attention import attention
from ascend_llm.attention.core import CoreAttention
from ascend_llm.attention.merge import merge_attention
from ascend_llm.config.parallel import check_parallel_model
from ascend_llm.parallel.comm import AllGather, Group


def zigzag_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two global chunk indices held by `cp_rank`: (r, 2*cp - 1 - r)."""
    return cp_rank, 2 * cp - 1 - cp_rank


def zigzag_positions(seq_len: int, cp: int, cp_rank: int) -> np.ndarray:
    """Global positions (seq_len / cp,) int64 held by `cp_rank`, in local order."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2*cp={2 * cp}")
    size = seq_len // (2 * cp)
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in zigzag_chunks(cp, cp_rank)])


def shard_sequence(array: np.ndarray, cp: int, cp_rank: int, axis: int = 1) -> np.ndarray:
    """This CP rank's zigzag slice of `array` along `axis` (the sequence axis)."""
    return np.take(array, zigzag_positions(array.shape[axis], cp, cp_rank), axis=axis)


def gathered_order(seq_len: int, cp: int) -> np.ndarray:
    """Index into the all-gathered local sequences (rank 0's 2L tokens, then rank 1's, ...) that yields the
    global order: gathered[:, order] == global sequence. (seq_len,) int32."""
    gathered = np.concatenate([zigzag_positions(seq_len, cp, r) for r in range(cp)])
    return np.argsort(gathered).astype(np.int32)


class ContextParallelAttention(nn.Cell):
    """Causal attention of this rank's zigzag chunks against the whole sequence; see the module doc.

    construct(q, k, v, segment_ids=None): q (B, H, 2L, D), k/v (B, H_kv, 2L, D) for this rank's two chunks in
    local order; segment_ids (B, 2L) int32 (this rank's slice) or None. Returns (B, H, 2L, D) in q's dtype.
    """

    def __init__(self, core: CoreAttention, group: Group, seq_len: int):
        super().__init__()
        cp = group.size
        self.backend, self.block_q, self.block_k = core.backend, core.block_q, core.block_k
        self.chunk = seq_len // (2 * cp)
        self.chunks = zigzag_chunks(cp, group.rank)
        self.order = Tensor(gathered_order(seq_len, cp))
        self.gather_seq = AllGather(group, 2)
        self.gather_ids = AllGather(group, 1)

    def _part(self, q, k, v, causal, q_ids, kv_ids):
        if q_ids is None:
            return attention(q, k, v, causal=causal, backend=self.backend, return_lse=True,
                             block_q=self.block_q, block_k=self.block_k)
        return attention(q, k, v, causal=causal, backend=self.backend, return_lse=True, block_q=self.block_q,
                         block_k=self.block_k, segment_ids=q_ids, kv_segment_ids=kv_ids)

    def construct(self, q, k, v, segment_ids=None):
        """q (B, H, 2L, D), k/v (B, H_kv, 2L, D) of this rank's two zigzag chunks, segment_ids (B, 2L) int32 or None
        -> (B, H, 2L, D) in q's dtype. Collective: all-gathers K and V (and the segment ids) over the CP group."""
        size = self.chunk
        k_all = ops.gather(self.gather_seq(k), self.order, 2)
        v_all = ops.gather(self.gather_seq(v), self.order, 2)
        ids_all = None
        if segment_ids is not None:
            ids_all = ops.gather(self.gather_ids(segment_ids.astype(mstype.float32)), self.order, 1)
            ids_all = ids_all.astype(segment_ids.dtype)
        outs = ()
        for j in range(2):
            c = self.chunks[j]
            lo, hi = j * size, (j + 1) * size
            q_ids = None if segment_ids is None else segment_ids[:, lo:hi]
            q_c = q[:, :, lo:hi]
            out, lse = self._part(q_c, k[:, :, lo:hi], v[:, :, lo:hi], True, q_ids, q_ids)
            if c > 0:
                kv_ids = None if ids_all is None else ids_all[:, :c * size]
                out_p, lse_p = self._part(q_c, k_all[:, :, :c * size], v_all[:, :, :c * size], False, q_ids, kv_ids)
                out, lse = merge_attention(out, lse, out_p, lse_p)
            outs = outs + (out,)
        return ops.concat(outs, 2)


def apply_context_parallel(model: nn.Cell, parallel_cfg, groups, seq_len: int) -> nn.Cell:
    """Install `ContextParallelAttention` in place of every `core_attention` (keeping its backend and block
    sizes) and the rotary tables of this rank's global positions. Identity when the CP group has size 1.
    ConfigError when seq_len is not divisible by 2*cp. Returns the model (mutated in place)."""
    group = groups.cp
    if group.size == 1:
        return model
    check_parallel_model(parallel_cfg, model.cfg, seq_len)
    for _, cell in list(model.cells_and_names()):
        core = getattr(cell, "core_attention", None)
        if isinstance(core, CoreAttention):
            cell.core_attention = ContextParallelAttention(core, group, seq_len)
    positions = zigzag_positions(seq_len, group.size, group.rank)
    model.rope_cos = Tensor(model.rope_cos.asnumpy()[positions])
    model.rope_sin = Tensor(model.rope_sin.asnumpy()[positions])
    return model
