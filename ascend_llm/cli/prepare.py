"""`ascend-llm prepare [--output DIR] [data overrides]`: corpus -> tokenizer -> token memmap.

Overrides use the recipe's data group, e.g.
  ascend-llm prepare data.path=../shared/corpora/tang_poems.jsonl data.vocab_size=8000 --output data/tang
  ascend-llm prepare 'data.sources=[0.7,corpus_a.jsonl,0.3,corpus_b]'
  ascend-llm prepare objective=dpo model.pretrained=DIR data.path=pairs.jsonl   (preference pairs)
Without --output the result goes to data.cache_dir, where `ascend-llm train` finds it again. Prints, per
source: files, documents, skipped records by reason, bytes, tokens, tokens per byte, time (JSON on stdout).
"""

from __future__ import annotations

import argparse
import json

from ascend_llm.compose import compose_recipe


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="directory to write (must be empty or absent); default: the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.path=corpus.jsonl")
    args = parser.parse_args(argv)
    from ascend_llm.config.preference import PREFERENCE_OBJECTIVES
    from ascend_llm.data import prepare_sources

    recipe = compose_recipe(args.overrides)
    if recipe.objective.name in PREFERENCE_OBJECTIVES:  # pairs (data/preference.py), tokenized with the model's
        from ascend_llm.data.preference import prepare_preference  # tokenizer and chat template

        if args.output:
            from ascend_llm.errors import ConfigError

            raise ConfigError("--output", args.output, f"objective={recipe.objective.name} pairs are prepared into "
                              "data.cache_dir, where `ascend-llm train` finds them: drop --output")
        prepared = [prepare_preference(recipe.data)]
    else:
        prepared = prepare_sources(recipe.data, args.output, progress=not args.no_progress)
    out = [{"path": str(p.path), **p.meta} for p in prepared]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
    return 0
