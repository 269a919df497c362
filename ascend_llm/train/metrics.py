"""Per-step metrics (metrics.jsonl), model FLOPs and MFU, and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

from ascend_llm.config.model import ModelConfig
from ascend_llm.models.llama import count_params


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12*L*h*s (PaLM appendix B): N counts the matmul weights, input
    embedding lookups excluded, output head included (also when tied); the second term is attention."""
    num_matmul = count_params(cfg, include_embedding=False) + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)
    return 6.0 * num_matmul + 12.0 * cfg.num_layers * cfg.dim * seq_len


class MetricsLog:
    """Appends one JSON object per line. On resume, lines past the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        if resume_step == 0 or kept or self.path.is_file():
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], out: Path, title: str) -> Path:
    """Train loss per step and validation loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return Path(out)
