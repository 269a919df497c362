"""Masks shared by the attention backends, as segment codes: query i may see key j only when their codes match.

Padding and packed documents reduce to one rule. Segment ids (documents) are the codes; a padded query gets
QUERY_PAD and a padded key KEY_PAD, which match nothing. Causal masking is positional and applied on top
(bottom-right aligned: query i sees key j when j <= i + seq_k - seq_q). These functions run inside graph-mode
traces: no imports inside them, tensors or None only.
"""

from __future__ import annotations

from mindspore import Tensor, ops
from mindspore import dtype as mstype

QUERY_PAD = -(2**31)
KEY_PAD = -(2**31) + 1


def segment_codes(batch: int, seq_q: int, seq_k: int, segment_ids: Tensor = None, kv_segment_ids: Tensor = None,
                  query_mask: Tensor = None, key_mask: Tensor = None):
    """int32 codes (batch, seq_q) and (batch, seq_k), or None when no mask is given.

    segment_ids: (batch, seq_q) document ids of the queries (non-negative ints); kv_segment_ids:
    (batch, seq_k) document ids of the keys, defaults to segment_ids when seq_q == seq_k.
    query_mask / key_mask: (batch, seq) bool or 0/1, True = real token, False = padding (a padded query sees
    nothing: its output is 0; a padded key is seen by nobody).
    """
    if segment_ids is None and kv_segment_ids is None and query_mask is None and key_mask is None:
        return None
    if segment_ids is None and kv_segment_ids is not None:
        raise ValueError("attention: kv_segment_ids needs segment_ids (the queries' document ids) too")
    if segment_ids is None:
        q_codes = ops.zeros((batch, seq_q), mstype.int32)
        k_codes = ops.zeros((batch, seq_k), mstype.int32)
    else:
        q_codes = segment_ids.astype(mstype.int32)
        if kv_segment_ids is None:
            if seq_q != seq_k:
                raise ValueError(f"attention: seq_q={seq_q} != seq_k={seq_k}: pass kv_segment_ids "
                                 "(batch, seq_k) along with segment_ids")
            k_codes = q_codes
        else:
            k_codes = kv_segment_ids.astype(mstype.int32)
    if query_mask is not None:
        q_codes = ops.where(query_mask.astype(mstype.bool_), q_codes, QUERY_PAD)
    if key_mask is not None:
        k_codes = ops.where(key_mask.astype(mstype.bool_), k_codes, KEY_PAD)
    return q_codes, k_codes


def causal_keep_mask(seq_q: int, seq_k: int) -> Tensor:
    """Bool (seq_q, seq_k): True where query i may see key j, bottom-right aligned (j <= i + seq_k - seq_q)."""
    rows = ops.arange(seq_q).reshape(seq_q, 1)
    cols = ops.arange(seq_k).reshape(1, seq_k)
    return cols <= rows + (seq_k - seq_q)


def keep_mask(seq_q: int, seq_k: int, causal: bool, codes):
    """Bool keep mask broadcastable to (batch, heads, seq_q, seq_k), or None when everything is visible."""
    keep = causal_keep_mask(seq_q, seq_k) if causal else None
    if codes is not None:
        same = codes[0].reshape(codes[0].shape[0], 1, seq_q, 1) == codes[1].reshape(codes[1].shape[0], 1, 1, seq_k)
        keep = same if keep is None else same & keep
    return keep
