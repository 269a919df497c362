"""The optimizer math and per-parameter graph helpers (AdamW, global norm and clipping, HyperMap passes): below
`parallel/` (ZeRO, TP, DP use them) and `train/` (the step)."""
