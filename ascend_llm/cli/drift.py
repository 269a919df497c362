"""`ascend-llm drift MODEL --reference CORPUS --new CORPUS`: is the new data different from what the model knows?

Three detectors (the model's per-document loss, the token distribution under its tokenizer, MMD^2 of its
mean-pooled hidden states), each with a permutation p-value, in one table and, with --json, one JSON file
(ascend_llm/eval/drift.py says how each is computed).

Exit status: 0 no drift; 4 drift (some detector's p-value < alpha / 3); 2 bad input (one line on stderr);
1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import json

EXIT_NO_DRIFT, EXIT_DRIFT = 0, 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--json", help="also write the report to this JSON file")
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, corpora, sampling and test options `run` reads (shared with `ascend-llm continual`)."""
    p.add_argument("model", help="run/checkpoint, quantized or Hugging Face directory")
    p.add_argument("--reference", required=True, help="corpus the model knows (.jsonl/.txt file or folder)")
    p.add_argument("--new", required=True, help="incoming corpus")
    p.add_argument("--ref-docs", default=":", help="document slice START:END of the reference (e.g. -2000:)")
    p.add_argument("--new-docs", default=":", help="document slice START:END of the new corpus")
    p.add_argument("--samples", type=int, default=200, help="documents sampled from each corpus")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per document read by the model")
    p.add_argument("--permutations", type=int, default=100, help="permutations per test")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of each detector")
    p.add_argument("--seed", type=int, default=0, help="sampling and permutation seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", help="tokenizer.json when none sits beside the model")
    p.add_argument("--pynative", action="store_true", help="PyNative instead of graph mode (no compile)")


def run(args: argparse.Namespace) -> dict:
    """Open the model, sample both corpora, compute features and the detectors; returns the report dict."""

    from ascend_llm.cli.process import start_mindspore
    from ascend_llm.errors import InteropError
    from ascend_llm.eval.drift import check_settings, detect, document_features, sample_documents
    from ascend_llm.eval.text import parse_slice
    from ascend_llm.interop.source import apply_tokenizer_override, open_model

    check_settings(args.alpha, args.permutations)
    slices = {"reference": parse_slice(args.ref_docs, "--ref-docs"), "new": parse_slice(args.new_docs, "--new-docs")}

    start_mindspore(graph=not args.pynative)
    source = apply_tokenizer_override(open_model(args.model), args.tokenizer)
    if source.tokenizer is None:
        raise InteropError("--tokenizer", None, f"{args.model} has no tokenizer.json: give --tokenizer")
    eos = source.eos_token_ids[0] if source.eos_token_ids else source.tokenizer.tokenizer.token_to_id("<|endoftext|>")
    if eos is None:
        raise InteropError(args.model, "no EOS id", "needs generation_config.json eos_token_id")
    samples, features = {}, {}
    for name, path, docs, offset in (("reference", args.reference, args.ref_docs, 0),
                                     ("new", args.new, args.new_docs, 1)):
        sample = sample_documents(path, args.samples, args.seed + offset, slices[name], args.text_field, f"--{name}")
        samples[name] = sample
        features[name] = document_features(source.model, source.tokenizer, sample.texts, eos, args.max_tokens,
                                           args.batch_size)
    report = detect(features["reference"], features["new"], args.alpha, args.permutations, args.seed)
    report["model"] = str(args.model)
    report["samples"] = {name: {"path": s.path, "docs": getattr(args, f"{name[:3]}_docs"), "sampled": len(s.texts),
                                "eligible": s.num_eligible, "tokens_read": int(features[name].num_tokens.sum())}
                         for name, s in samples.items()}
    report["max_tokens"], report["seed"] = args.max_tokens, args.seed
    return report


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from ascend_llm.eval.drift import format_table

    report = run(args)
    for name, s in report["samples"].items():
        print(f"{name}: {s['path']} [{s['docs']}]: {s['sampled']} of {s['eligible']} documents sampled, "
              f"{s['tokens_read']:,} tokens read")
    print(format_table(report))
    if args.json:
        from ascend_llm.store.files import write_file_atomic

        write_file_atomic(args.json, json.dumps(report, indent=2), field="--json")
    return EXIT_DRIFT if report["drift"] else EXIT_NO_DRIFT
