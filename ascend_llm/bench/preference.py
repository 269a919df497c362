"""Preference tuning on real text: does DPO (and SimPO) teach a model to prefer a poem's real next line?

Steps (each through the real trainer, in this process):
1. SFT: a tiny Hugging Face fixture (default ../shared/fixtures/hf/qwen2_tied, random weights) is trained as a
   language model on the first --sft-bytes of the Complete Tang Poems (../shared/corpora/tang_poems.jsonl).
2. Pairs from poems *after* the SFT text (never seen in step 1), one pair per poem: prompt = title + first verse,
   chosen = the real second verse, rejected = that verse with its characters shuffled (corrupted) or a verse of
   another poem (foreign), alternately. A seeded quarter of the pairs is held out (data.val_fraction=0.25).
3. DPO (sigmoid, cached reference = the SFT model), DPO with an SFT term and SimPO from the SFT model on the
   training pairs; every --val-every steps the trainer logs held-out reward accuracy (share of held-out pairs
   whose chosen reward beats the rejected one), margin and the chosen answer's token NLL (held-out SFT loss).
Table, per model (the SFT model, then each method's last step), on the held-out pairs: pref_acc = share of
pairs whose chosen verse has the higher summed log-probability under the model (overall, shuffled, foreign),
chosen_nll = the chosen verse's mean token NLL, and the method's last reward accuracy and margin. Writes JSON
and a PNG of the curves (--out with .png).

  ascend-llm bench preference [--steps 150] [--out bench_results/preference.json] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ascend_llm.bench.report import print_table, write_json

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpora" / "tang_poems.jsonl"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf" / "qwen2_tied"


def poem_pairs(corpus: Path, skip_bytes: int, count: int, seed: int) -> list[dict]:
    """`count` pairs from poems starting after the first skip_bytes of the corpus (module doc, step 2)."""
    rng, poems, read = random.Random(seed), [], 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            read += len(line.encode("utf-8"))
            if read <= skip_bytes:
                continue
            lines = json.loads(line)["text"].split("\n")
            if len(lines) >= 3 and len(lines[2]) >= 5 and len(set(lines[2])) > 3:
                poems.append(lines)
            if len(poems) >= count:
                break
    pairs = []
    for k, lines in enumerate(poems):
        title, first, second = lines[0], lines[1], lines[2]
        if k % 2:
            rejected = "".join(rng.sample(second, len(second)))
            while rejected == second:
                rejected = "".join(rng.sample(second, len(second)))
        else:
            other = poems[(k + 1 + rng.randrange(len(poems) - 1)) % len(poems)]
            rejected = other[rng.randrange(1, len(other))]
        pairs.append({"prompt": f"{title}\n{first}\n", "chosen": second, "rejected": rejected,
                      "kind": "shuffled" if k % 2 else "foreign"})
    return pairs


def _train(overrides: list[str]) -> dict:
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    return train(compose_recipe(overrides))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def held_out_pairs(cache: Path):
    """The prepared pairs' PreferenceDataset (the trainer's split: data.val_fraction=0.25, data.seed 1234)."""
    from ascend_llm.data.preference import PreferenceDataset
    from ascend_llm.data.prepared import PreparedData

    prepared = next(PreparedData(d, json.loads((d / "meta.json").read_text())) for d in sorted(cache.iterdir())
                    if (d / "pairs.npz").is_file())
    return PreferenceDataset(prepared, 0.25, 1234)


def preference_of(model_dir: Path, dataset, kinds: list[str]) -> dict:
    """The model of `model_dir` on the held-out pairs: the share whose chosen verse has the higher summed
    log-probability (overall and per kind of rejected verse) and the chosen verse's mean token NLL."""
    import numpy as np

    from ascend_llm.interop.source import open_model
    from ascend_llm.train.preference import reference_logps

    values = reference_logps(open_model(model_dir).model, dataset, 16)
    held = dataset.pair_ids[dataset.num_train:]
    counts = dataset.flags[dataset.num_train:, :, 1:].sum(-1)
    wins = values[held, 0] > values[held, 1]
    kind = np.asarray([kinds[k] for k in held])
    return {"pref_acc": round(float(wins.mean()), 3),
            "pref_acc_shuffled": round(float(wins[kind == "shuffled"].mean()), 3),
            "pref_acc_foreign": round(float(wins[kind == "foreign"].mean()), 3),
            "chosen_nll": round(float(np.mean(-values[held, 0] / counts[:, 0])), 3)}


def _plot(curves: dict, before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["val_rewards/accuracies"] for r in rows], "o-", label=name)
        axes[1].plot(steps, [r["val_sft_loss"] for r in rows], "o-", label=name)
    axes[0].axhline(0.5, color="grey", linestyle=":", label="chance")
    axes[1].axhline(before["chosen_nll"], color="grey", linestyle="--", label="SFT model (step 0)")
    axes[0].set(xlabel="step", ylabel="held-out reward accuracy", ylim=(0, 1.02))
    axes[1].set(xlabel="step", ylabel="held-out chosen NLL (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Tang poems: real next verse vs shuffled/foreign verse (held-out pairs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm bench preference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-bytes", type=int, default=2_000_000)
    parser.add_argument("--steps", type=int, default=150, help="DPO / SimPO steps")
    parser.add_argument("--pairs", type=int, default=1280, help="pairs (a quarter held out: 320 = 20 batches)")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--work", default="bench_results/preference_work")
    parser.add_argument("--out", default="bench_results/preference.json")
    parser.add_argument("--reuse", action="store_true", help="keep runs of --work that finished (summary.json)")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = ["train.progress=false", "train.sample_tokens=0", f"data.cache_dir={work / 'cache'}",
              "train.overwrite=true"]
    sft_dir = work / "sft"
    if not (args.reuse and (sft_dir / "summary.json").is_file()):
        _train([f"model.pretrained={FIXTURE}", f"data.path={CORPUS}", f"data.max_bytes={args.sft_bytes}",
                "data.seq_len=96", "train.global_batch_size=16", f"train.num_steps={args.sft_steps}",
                f"train.val_every={args.sft_steps}", f"train.ckpt_every={args.sft_steps}", "optim.lr=3e-3",
                "optim.warmup_steps=20", f"train.output_dir={sft_dir}", *common])
    pairs = poem_pairs(CORPUS, args.sft_bytes, args.pairs, seed=0)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    num_val = round(0.25 * len(pairs))
    runs = {"DPO (sigmoid, beta 0.1)": ("dpo", ["objective=dpo", "objective.preference.beta=0.1"]),
            "DPO + SFT term (sft_weight 1)": ("dpo_sft", ["objective=dpo", "objective.preference.beta=0.1",
                                                          "objective.preference.sft_weight=1.0"]),
            "SimPO (beta 2, gamma 1)": ("simpo", ["objective=simpo"])}
    dataset, kinds = None, [p["kind"] for p in pairs]
    rows, curves = [], {}
    for name, (folder, extra) in runs.items():
        run_dir = work / folder
        if not (args.reuse and (run_dir / "summary.json").is_file()):
            _train([f"model.pretrained={sft_dir}", f"data.path={data}", "data.seq_len=96", "data.val_fraction=0.25",
                    "train.global_batch_size=16", f"train.num_steps={args.steps}",
                    f"train.val_every={args.val_every}", f"train.val_batches={-(-num_val // 16)}",
                    f"train.ckpt_every={args.steps}", "optim.lr=1e-3", "optim.warmup_steps=10",
                    f"train.output_dir={run_dir}", *common, *extra])
        if dataset is None:
            dataset = held_out_pairs(work / "cache")
            rows.append({"method": "SFT model (before)", "step": 0, **preference_of(sft_dir, dataset, kinds)})
        curves[name] = [r for r in _records(run_dir) if "val_rewards/accuracies" in r]
        last = curves[name][-1]
        rows.append({"method": name, "step": last["step"], **preference_of(run_dir, dataset, kinds),
                     "reward_acc": round(last["val_rewards/accuracies"], 3),
                     "reward_margin": round(last["val_rewards/margins"], 3)})
    print_table(rows, list(rows[-1]))
    plot = Path(args.out).with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(curves, rows[0], plot)
    write_json(args.out, "preference", rows, curves=curves, pairs=len(pairs), held_out=num_val,
               sft_steps=args.sft_steps, sft_bytes=args.sft_bytes, fixture=str(FIXTURE), plot=str(plot))
    print(f"curves: {plot}")
    return 0
