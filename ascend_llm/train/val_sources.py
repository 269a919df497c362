"""Validation per source of a blend: forgetting and new-domain gain side by side during a run.

With `data.sources` (Megatron's [weight, path, ...]) the trainer's validation loss mixes the sources by weight. For
incremental training with replay the question is per source: has the loss on held-out *old* data risen
(forgetting) while the loss on held-out *new* data fell? `source_val_losses` evaluates every source's own fixed
validation windows (the same ones at every validation) and the trainer logs them as `val_loss/<source name>`. A
source of weight 0 is never trained on and is validated only (0% replay that still measures forgetting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def source_key(name: str) -> str:
    """The metrics key of a source: val_loss/<file or folder name without suffixes>, e.g. val_loss/song_ci."""
    return "val_loss/" + Path(name).name.split(".")[0]


def source_val_losses(session, read_batch: Callable, rows: int, num_batches: int) -> dict[str, float]:
    """{val_loss/<source>: mean loss over up to num_batches global micro-batches of `rows` windows of that source's
    validation split} for a BlendedDataset (every rank evaluates its data-parallel share of each batch, as the
    trainer's validation does); {} for a single corpus. read_batch(session, local_rows) -> Tensors of one batch."""
    dataset = session.dataset
    if not hasattr(dataset, "datasets"):
        return {}
    out = {}
    for base, source, name in zip(dataset.bases, dataset.datasets, dataset.names):
        indices = base + source.val_indices(rows * num_batches)
        losses = []
        for start in range(0, len(indices) - rows + 1, rows):
            batch = read_batch(session, session.layout.local_rows(indices[start:start + rows]))
            losses.append(float(session.steps.eval_loss(*batch)[0].asnumpy()))
        if losses:
            out[source_key(name)] = float(np.mean(losses))
    return out
