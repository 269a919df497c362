"""`ascend-llm continual MODEL --reference OLD --new NEW --out DIR`: the continual-learning loop in one command.

1. drift: `ascend-llm drift`'s three detectors, MODEL on a sample of OLD against one of NEW;
2. if drifted (or --always): incremental training from MODEL on NEW with a --replay share of OLD
   (`--update-recipe`, default experiment=continual_song, + --update overrides) -> DIR/teacher;
3. distillation of that teacher into the student (`--student-recipe`, default experiment=distill_song, + --student
   overrides) -> DIR/student_kd, and the same student, data, steps and seed without KD (objective=lm)
   -> DIR/student_nokd;
4. the evaluation table: perplexity on the held-out documents of OLD and NEW (--heldout-docs, never trained on:
   refused when data.max_bytes reaches them) for MODEL, the teacher, both students and the quantized student, computed
   as `ascend-llm eval` computes it (same tokenizer, windows and stride);
5. the KD student quantized (--bits, RTN) -> DIR/student_int<bits> and exported -> DIR/student_hf.

DIR/report.json holds the drift report, every stage's directory and recipe overrides, and the table. Without drift
nothing is trained: the report says so. Exit status: 0 done (drift or not; the report's `drift` and `updated` say
which), 2 bad input (one line, before anything is written), 3 a training run diverged, 130/143 stopped by a signal,
1 a bug. On any failure DIR is removed (it must be absent or empty at the start), so it is whole or absent.
--pynative runs the drift check, the evaluation and the export without graph compilation (training follows the
recipes' runtime group, e.g. --update=runtime=pynative).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ascend_llm.cli import drift as drift_cli
from ascend_llm.cli.process import start_mindspore
from ascend_llm.errors import ConfigError

# Recipe keys the loop sets itself (an --update/--student override of one is refused: it would break the loop).
UPDATE_KEYS = ("model.pretrained", "data.sources", "data.path", "train.output_dir", "train.resume")
STUDENT_KEYS = UPDATE_KEYS + ("objective", "objective.distill.teacher", "data.tokenizer", "data.eos_token",
                              "model.vocab_size")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm continual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    drift_cli.add_arguments(p)
    p.add_argument("--out", required=True, help="directory for the loop's runs and report (absent or empty)")
    p.add_argument("--replay", type=float, default=0.25, help="share of OLD in the update's training mix, [0, 1)")
    p.add_argument("--always", action="store_true", help="update and distil even when no drift is flagged")
    p.add_argument("--update-recipe", default="experiment=continual_song", help="recipe of the incremental run")
    p.add_argument("--update", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--student-recipe", default="experiment=distill_song", help="recipe of the student runs")
    p.add_argument("--student", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--heldout-docs", default="-300:", help="document slice of OLD and NEW scored in the table")
    p.add_argument("--window", type=int, default=256, help="perplexity window (as ascend-llm eval)")
    p.add_argument("--stride", type=int, default=128, help="perplexity stride (as ascend-llm eval)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--bits", type=int, default=8, help="RTN bits of the quantized student: 4 or 8")
    return p


@dataclass
class LoopPlan:
    """The loop's composed recipes and output paths, checked before anything is written."""

    out: Path
    update: object  # RecipeConfig of the incremental run
    students: dict[str, object]  # "student_kd" / "student_nokd" -> RecipeConfig
    overrides: dict[str, list[str]] = field(default_factory=dict)


def _check_owned(overrides: list[str], owned: tuple[str, ...], flag: str) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in owned:
            raise ConfigError(flag, item, f"{key} is set by the loop; allowed: any other recipe key")


def trained_documents(corpus: str, max_bytes: int | None, text_field: str) -> int:
    """How many documents of `corpus` (from its start) training reads under data.max_bytes (a cut one counts)."""
    from ascend_llm.data.corpus import corpus_files, iter_documents

    count, starts = 0, True
    for _, ends in iter_documents(corpus_files(corpus, "auto"), "error", text_field, max_bytes):
        count += starts
        starts = ends
    return count


def check_heldout(corpus: str, docs: slice, max_bytes: int | None, text_field: str, field_name: str) -> None:
    """ConfigError when the held-out documents `docs` of `corpus` overlap what training reads (data.max_bytes)."""
    from ascend_llm.data.corpus import read_documents

    total = len(read_documents(corpus, "auto", text_field, max_bytes=1 << 62))
    start, stop, _ = docs.indices(total)
    if stop <= start:
        raise ConfigError("--heldout-docs", f"{docs.start}:{docs.stop}", f"selects no document of {corpus} "
                          f"({total} documents)")
    trained = trained_documents(corpus, max_bytes, text_field)
    if start < trained:
        raise ConfigError(field_name, max_bytes, f"training would read the first {trained} documents of {corpus}, "
                          f"and the held-out documents start at {start}: lower data.max_bytes or --heldout-docs")


def plan_loop(args: argparse.Namespace) -> LoopPlan:
    """Compose and check every recipe, the corpora, the held-out split and --out; raises a UserInputError."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.eval.text import parse_slice
    from ascend_llm.store.files import check_output_dir

    if not 0.0 <= args.replay < 1.0:
        raise ConfigError("--replay", args.replay, "must be in [0, 1): the share of the old corpus in the update")
    if args.bits not in (4, 8):
        raise ConfigError("--bits", args.bits, "allowed: 4 or 8")
    out = check_output_dir(args.out, field="--out", protect=[args.model], overwrite_flag=None)
    _check_owned(args.update, UPDATE_KEYS, "--update")
    _check_owned(args.student, STUDENT_KEYS, "--student")
    new, old = str(Path(args.new).absolute()), str(Path(args.reference).absolute())
    sources = f"data.sources=[{1.0 - args.replay},{new},{args.replay},{old}]"
    fixed = [sources, f"model.pretrained={Path(args.model).absolute()}", f"train.output_dir={out.absolute()}/teacher"]
    update_args = [args.update_recipe, *args.update, *fixed]
    update = compose_recipe(update_args)
    heldout = parse_slice(args.heldout_docs, "--heldout-docs")
    for corpus in (old, new):
        check_heldout(corpus, heldout, update.data.max_bytes, args.text_field, "--update data.max_bytes")
    common = [sources, f"data.tokenizer={update.data.tokenizer}", f"model.vocab_size={update.model.vocab_size}"]
    if update.data.eos_token:
        common.append(f"data.eos_token='{update.data.eos_token}'")  # quoted: special tokens hold | < >
    teacher = str(Path(args.model).absolute())  # stands in for DIR/teacher (not yet trained) while checking
    kd_args = [args.student_recipe, *args.student, *common, f"objective.distill.teacher={teacher}",
               f"train.output_dir={out.absolute()}/student_kd"]
    nokd_args = [args.student_recipe, *args.student, *common, "objective=lm",
                 f"train.output_dir={out.absolute()}/student_nokd"]
    students = {"student_kd": compose_recipe(kd_args), "student_nokd": compose_recipe(nokd_args)}
    if students["student_kd"].objective.name != "distill":
        raise ConfigError("--student-recipe", args.student_recipe, "must select objective=distill")
    for recipe in students.values():
        check_heldout(new, heldout, recipe.data.max_bytes, args.text_field, "--student data.max_bytes")
        check_heldout(old, heldout, recipe.data.max_bytes, args.text_field, "--student data.max_bytes")
    students["student_kd"].objective.distill.teacher = str(out.absolute() / "teacher")
    kd_args[-2] = f"objective.distill.teacher={out.absolute() / 'teacher'}"
    return LoopPlan(out, update, students, {"teacher": update_args, "student_kd": kd_args,
                                            "student_nokd": nokd_args})


def run_training(recipe) -> str:
    """Train one recipe in this process (trainer.train); returns its run directory."""
    from ascend_llm.train.trainer import train

    summary = train(recipe)
    return summary["run_dir"]


def export_student(student: str, out: Path, bits: int, pynative: bool = False) -> dict[str, str]:
    """RTN-quantize the student (symmetric, per channel for int8, groups of 128 for int4; as `ascend-llm quantize`)
    and export it as a Hugging Face directory (as `ascend-llm convert --to hf`, fp32). Returns the two paths."""

    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.interop.export import export_hf
    from ascend_llm.interop.quantized import save_quantized
    from ascend_llm.interop.source import open_model
    from ascend_llm.quant.apply import apply_quantization

    start_mindspore(graph=not pynative)
    cfg = QuantConfig(bits=bits, group_size=128 if bits == 4 else -1, sym=True, method="rtn")
    cfg.validate()
    source = open_model(student)
    done = apply_quantization(source.model, cfg, None)
    quantized = save_quantized(source.model, source.config, cfg, list(done), out / f"student_int{bits}",
                               source.text_files, eos_token_ids=source.eos_token_ids, protect=[source.path])
    plain = open_model(student, build=False)
    hf = export_hf(out / "student_hf", plain.config, plain.weights, dtype="fp32", text_files=plain.text_files,
                   eos_token_ids=plain.eos_token_ids, protect=[plain.path])
    return {"quantized": str(quantized), "hf": str(hf)}


def evaluate(models: dict[str, str], corpora: dict[str, str], docs: str, args: argparse.Namespace) -> list[dict]:
    """Perplexity of every model on the `docs` slice of every corpus, tokenized by the first model's tokenizer
    with its first EOS id, as `ascend-llm eval MODELS --corpus C --docs D` computes it. One row per model:
    {"role", "model", "params", "ppl": {corpus: perplexity}, "nll": {corpus: nats/token}, "tokens": {...}}."""

    from ascend_llm.eval.perplexity import perplexity
    from ascend_llm.eval.text import parse_slice, token_stream
    from ascend_llm.interop.source import open_model

    start_mindspore(graph=not args.pynative)
    streams, rows = {}, []
    for role, path in models.items():
        source = open_model(path)
        if not streams:
            eos = source.eos_token_ids[0] if source.eos_token_ids else None
            streams = {name: token_stream(corpus, source.tokenizer, eos, parse_slice(docs, "--heldout-docs"),
                                          args.text_field)[0] for name, corpus in corpora.items()}
        row = {"role": role, "model": path, "params": int(sum(p.size for p in source.model.get_parameters())),
               "ppl": {}, "nll": {}, "tokens": {}}
        for name, ids in streams.items():
            result = perplexity(source.model, ids, args.window, args.stride, source.config.max_seq_len,
                                args.eval_batch_size)
            row["ppl"][name], row["nll"][name], row["tokens"][name] = (result.perplexity, result.mean_nll,
                                                                       result.num_tokens)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: held-out perplexity on the old and new corpus; forgetting = rise of the old-domain
    log-perplexity (nats/token) over the first row (the model before the update), gain = fall of the new one."""
    base = rows[0]["nll"]
    lines = ["| model | role | params | old ppl | forgetting (nats/token) | new ppl | gain (nats/token) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        first = r is rows[0]
        forget = "-" if first else f"{r['nll']['old'] - base['old']:+.3f}"
        gain = "-" if first else f"{base['new'] - r['nll']['new']:+.3f}"
        lines.append(f"| {r['model']} | {r['role']} | {r['params']:,} | {r['ppl']['old']:.2f} | {forget} | "
                     f"{r['ppl']['new']:.2f} | {gain} |")
    return "\n".join(lines)


def _write_report(out: Path, report: dict) -> None:
    from ascend_llm.store.files import write_file_atomic

    write_file_atomic(out / "report.json", json.dumps(report, indent=2, default=str), field="--out")


def run_loop(args: argparse.Namespace, plan: LoopPlan) -> dict:
    """Stages 1-5 (module docstring) into plan.out; returns the report (also written to report.json)."""
    from ascend_llm.train.runtime import setup_runtime

    setup_runtime(plan.update.runtime)  # the device is set once per process, before the drift check's kernels
    drift = drift_cli.run(args)
    print(_drift_table(drift))
    report = {"drift": bool(drift["drift"]), "updated": False, "drift_report": drift, "overrides": plan.overrides}
    plan.out.mkdir(parents=True, exist_ok=True)
    if not (drift["drift"] or args.always):
        print("no drift: nothing trained")
        _write_report(plan.out, report)
        return report
    runs = {"teacher": run_training(plan.update)}
    for name, recipe in plan.students.items():
        runs[name] = run_training(recipe)
    report["exports"] = export_student(runs["student_kd"], plan.out, args.bits, args.pynative)
    models = {"old model": args.model, "updated (teacher)": runs["teacher"], "student + KD": runs["student_kd"],
              "student without KD": runs["student_nokd"],
              f"student + KD, int{args.bits}": report["exports"]["quantized"]}
    rows = evaluate(models, {"old": args.reference, "new": args.new}, args.heldout_docs, args)
    report.update(updated=True, runs=runs, table=rows, heldout_docs=args.heldout_docs)
    print(format_table(rows))
    _write_report(plan.out, report)
    return report


def _drift_table(report: dict) -> str:
    from ascend_llm.eval.drift import format_table as drift_table

    return drift_table(report)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from ascend_llm.train.stop import TrainingStopped

    plan = plan_loop(args)
    existed = plan.out.is_dir()
    try:
        report = run_loop(args, plan)
    except TrainingStopped as exc:
        _remove(plan.out, existed)
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_status
    except BaseException:
        _remove(plan.out, existed)
        raise
    print(f"{'drift' if report['drift'] else 'no drift'}; report: {plan.out / 'report.json'}")
    return 0


def _remove(out: Path, existed: bool) -> None:
    """Undo a failed loop: remove --out (or, when it existed empty, its contents)."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
