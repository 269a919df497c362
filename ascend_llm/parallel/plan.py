"""Memory and time planner for a training recipe: does it fit on each device, how fast, and what to change.

`plan_recipe(recipe) -> Plan` (memory terms in plan_memory.py, time in plan_time.py), `suggest(recipe)` (the
smallest sets of recipe overrides that fit, each re-planned), `check_fits(recipe)` (the preflight: one-line
ConfigError naming the shortfall and the first suggestion), `format_plan` / `plan_json` for `ascend-llm plan`.
Pure Python: no MindSpore import, instant for 7B/8B models.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

from ascend_llm.config.parallel import check_parallel_model
from ascend_llm.config.preference import step_work
from ascend_llm.config.runtime import ASCEND_910B_PEAK_TFLOPS
from ascend_llm.errors import ConfigError
from ascend_llm.parallel.plan_memory import (
    DTYPE_BYTES,
    GIB,
    Layout,
    MemoryPlan,
    parameters_per_device,
    plan_memory,
)
from ascend_llm.parallel.plan_moe import is_moe, moe_summary
from ascend_llm.parallel.plan_time import TimePlan, plan_time

MAX_CHANGES = 4
PUBLISHED_MFU_RANGE = (0.35, 0.61)  # ModelLink TP8 35.5% ... MindSpeed-LLM 60.8% at 354 TFLOP/s (planner review T4b)


@dataclass
class Plan:
    """One planned recipe: per-device memory terms and budget, the step-time estimate, the planner's inputs, and
    (when asked and it does not fit) the smallest override sets that fit, each as a list of `key=value`."""

    memory: MemoryPlan
    time: Optional[TimePlan]
    layout: Layout
    suggestions: list[list[str]] = field(default_factory=list)
    multimodal: dict[str, int] = field(default_factory=dict)  # {part: parameters} (plan_vision.py)


def _degree(parallel: Any, name: str) -> int:
    return int(getattr(parallel, name, 1) or 1)


def layout_of(recipe: Any) -> Layout:
    """Read the planner's inputs from a validated RecipeConfig."""
    par, tr = recipe.parallel, recipe.train
    dp = _degree(par, "data_parallel_degree")
    device = "ascend" if recipe.runtime.device_target == "ascend" else "cpu"
    rows, reference = step_work(recipe)  # preference tuning: 2 sequences a row, maybe a reference forward
    return Layout(
        model=recipe.model, seq_len=recipe.data.seq_len, sequences_per_row=rows, reference_forward=reference,
        micro_batch=tr.global_batch_size // tr.grad_accum_steps // dp * rows, grad_accum_steps=tr.grad_accum_steps,
        data_parallel_degree=dp, tensor_parallel_degree=_degree(par, "tensor_parallel_degree"),
        context_parallel_degree=_degree(par, "context_parallel_degree"),
        sequence_parallel=bool(getattr(par, "sequence_parallel", False)), zero_stage=int(par.zero_stage),
        param_bytes=DTYPE_BYTES[recipe.precision.param_dtype],
        compute_bytes=DTYPE_BYTES[recipe.precision.compute_dtype], recompute=tr.recompute,
        attention_backend=_backend(recipe.attention.backend, device), device=device,
        hccl_buffsize_mb=recipe.cluster.hccl.buffsize_mb, world_size=recipe.parallel.world_size,
        num_nodes=recipe.cluster.num_nodes, lora_rank=recipe.lora.rank if recipe.lora.enabled else 0,
        lora_targets=tuple(recipe.lora.targets) if recipe.lora.enabled else (),
        expert_parallel_degree=_degree(par, "expert_parallel_degree"),
        expert_capacity_factor=float(getattr(par, "expert_capacity_factor", 0.0) or 0.0))


def _backend(name: str, device: str) -> str:
    if name == "auto":
        return "fused" if device == "ascend" else "segmented"
    return name


def peak_of(recipe: Any, device: str) -> float:
    """Declared peak TFLOP/s per device: runtime.peak_tflops, else 354 on Ascend (910B bf16 dense, the figure verl
    and MindSpeed use), else runtime.cpu_peak_tflops."""
    if recipe.runtime.peak_tflops is not None:
        return float(recipe.runtime.peak_tflops)
    return ASCEND_910B_PEAK_TFLOPS if device == "ascend" else float(recipe.runtime.cpu_peak_tflops)


def plan_recipe(recipe: Any, with_suggestions: bool = False) -> Plan:
    """Plan a validated RecipeConfig. ConfigError if runtime.max_device_memory is malformed or the tensor/context
    parallel degrees do not divide the model (config.parallel.check_parallel_model)."""
    check_parallel_model(recipe.parallel, recipe.model, recipe.data.seq_len)
    lay = layout_of(recipe)
    parts = {}
    if recipe.objective.name in ("contrastive", "caption"):  # a dual encoder or a vision-language model
        from ascend_llm.parallel.plan_vision import plan_multimodal

        mem, parts = plan_multimodal(recipe, lay)
    else:
        mem = plan_memory(lay, recipe.cluster.device_memory_gib, recipe.runtime.max_device_memory)
    time = plan_time(lay, peak_of(recipe, lay.device), recipe.cluster.intra_node_gb_per_s,
                     recipe.cluster.inter_node_gb_per_s, recipe.train.global_batch_size)
    try:
        check_session_rules(recipe)
    except ConfigError as refused:
        mem.notes.append(f"the trainer refuses this recipe before it starts: {refused}")
    out = Plan(mem, time, lay, multimodal=parts)
    if with_suggestions and mem.fits is False:
        out.suggestions = suggest(recipe)
    return out


def _set(recipe: Any, dotted: str, value: Any) -> None:
    target = recipe
    *path, leaf = dotted.split(".")
    for part in path:
        target = getattr(target, part)
    setattr(target, leaf, value)


def _knobs(recipe: Any, lay: Layout) -> list[list[dict[str, Any]]]:
    """Candidate changes, one list per knob (a plan uses at most one value of each knob)."""
    knobs = []
    if recipe.precision.param_dtype == "float32":
        knobs.append([{"precision.param_dtype": "bfloat16"}])
    if lay.device == "ascend" and recipe.precision.compute_dtype == "float32":
        knobs.append([{"precision.compute_dtype": "bfloat16"}])
    if lay.data_parallel_degree > 1:
        knobs.append([{"parallel.zero_stage": z} for z in (1, 2) if z > lay.zero_stage])
    modes = ("selective", "full")
    knobs.append([{"train.recompute": r} for r in modes[modes.index(lay.recompute) + 1 if lay.recompute in modes
                                                         else 0:]])
    if lay.attention_backend == "naive":
        knobs.append([{"attention.backend": "fused" if lay.device == "ascend" else "segmented"}])
    accum, micro = recipe.train.grad_accum_steps, lay.micro_batch
    options = []
    while micro % 2 == 0:
        micro, accum = micro // 2, accum * 2
        options.append({"train.grad_accum_steps": accum})
    knobs.append(options)
    if lay.context_parallel_degree == 1:
        tp_options, tp, dp = [], lay.tensor_parallel_degree, lay.data_parallel_degree
        while dp % 2 == 0 and tp * 2 <= 8:
            tp, dp = tp * 2, dp // 2
            tp_options.append({"parallel.tensor_parallel_degree": tp, "parallel.data_parallel_degree": dp,
                               "parallel.sequence_parallel": True})
        knobs.append(tp_options)
    return [k for k in knobs if k]


def _try(recipe: Any, changes: dict[str, Any]) -> Optional[Plan]:
    trial = copy.deepcopy(recipe)
    for key, value in changes.items():
        _set(trial, key, value)
    par = trial.parallel
    if par.zero_stage and par.data_parallel_degree * par.context_parallel_degree < 2:  # ZeRO shards over dp x cp
        trial.parallel.zero_stage = 0
        changes["parallel.zero_stage"] = 0
    try:
        trial.validate()
        check_session_rules(trial)
        return plan_recipe(trial)
    except ConfigError:
        return None


def check_session_rules(recipe: Any) -> None:
    """The trainer's pre-start rules a valid recipe can still break, so that no suggestion is refused at launch:
    the same rule as train/session.py `check_param_dtype` (bf16 parameters need Ascend and ZeRO >= 1: the fp32
    master weights live in the ZeRO optimizer), kept here because that module imports MindSpore;
    tests/unit/test_plan_suggestions.py runs the session's own check on every suggestion. Raises ConfigError."""
    dtype, par = recipe.precision.param_dtype, recipe.parallel
    if dtype == "float32":
        return
    if recipe.runtime.device_target != "ascend":
        raise ConfigError("precision.param_dtype", dtype, "runs on Ascend only; use float32 on CPU")
    if par.zero_stage == 0:
        raise ConfigError("precision.param_dtype", dtype, "needs the fp32 master weights of parallel.zero_stage "
                          ">= 1; use float32 otherwise")


def suggest(recipe: Any, limit: int = 5) -> list[list[str]]:
    """Smallest sets of overrides (fewest knobs, then fastest estimated step) under which the recipe fits,
    each verified by re-planning the changed recipe. Empty when nothing within MAX_CHANGES knobs fits."""
    lay = layout_of(recipe)
    knobs = _knobs(recipe, lay)
    for size in range(1, MAX_CHANGES + 1):
        found = []
        for combo in itertools.combinations(knobs, size):
            for picks in itertools.product(*combo):
                changes = {k: v for pick in picks for k, v in pick.items()}
                planned = _try(recipe, changes)
                if planned is not None and planned.memory.fits:
                    found.append((planned.time.step_s, planned.memory.total_bytes, changes))
        if found:
            found.sort(key=lambda item: (item[0], item[1]))
            return [[f"{k}={v}" for k, v in changes.items()] for _, _, changes in found[:limit]]
    return []


def check_fits(recipe: Any) -> None:
    """Raise a one-line ConfigError when the recipe cannot fit on a device: the shortfall in GiB and the
    first suggestion. No-op when train.memory_check is false or no device memory is declared."""
    if not recipe.train.memory_check:
        return
    planned = plan_recipe(recipe, with_suggestions=True)
    if planned.memory.fits is not False:
        return
    mem = planned.memory
    fix = (" ".join(planned.suggestions[0]) if planned.suggestions
           else f"none within {MAX_CHANGES} changes: add devices or tensor/context parallelism, or shorten "
                "data.seq_len")
    raise ConfigError("memory per device", f"{mem.total_bytes / GIB:.3g} GiB",
                      f"exceeds {budget_text(mem)} by {mem.shortfall_bytes / GIB:.3g} GiB; smallest change that "
                      f"fits: {fix} (details: ascend-llm plan <overrides>; train.memory_check=false skips this)")


def budget_text(mem: MemoryPlan) -> str:
    """The declared budget in words (device memory and/or MindSpore pool, in GiB), for messages."""
    parts = []
    if mem.device_bytes is not None:
        parts.append(f"cluster.device_memory_gib={mem.device_bytes / GIB:g}")
    if mem.pool_bytes is not None:
        parts.append(f"the MindSpore pool {mem.pool_bytes / GIB:g} GiB (runtime.max_device_memory)")
    return " and ".join(parts) if parts else "no declared budget"


def plan_json(recipe: Any, planned: Plan) -> dict:
    """The plan as JSON-ready data (bytes and GiB per term, budget, fit, time, suggestions)."""
    mem, tp = planned.memory, planned.time
    return {
        "model": recipe.model.name, "parameters": parameters_per_device(recipe.model, 1),
        "parameters_per_device": parameters_per_device(recipe.model, planned.layout.tensor_parallel_degree,
                                                       planned.layout.expert_parallel_degree),
        "micro_batch": planned.layout.micro_batch, "seq_len": planned.layout.seq_len,
        **({"moe": moe_summary(recipe.model, parameters_per_device(recipe.model, 1),
                               planned.layout.micro_batch * planned.layout.seq_len,
                               planned.layout.expert_parallel_degree, planned.layout.compute_bytes,
                               planned.layout.expert_capacity_factor)}
           if is_moe(recipe.model) else {}),
        **({"multimodal": planned.multimodal} if planned.multimodal else {}),
        "terms": [{"name": t.name, "bytes": t.bytes, "gib": t.gib, "formula": t.formula, "source": t.source,
                   "phase": t.phase} for t in mem.terms],
        "peak_phase": mem.peak_phase,
        "total_gib": mem.total_bytes / GIB,
        "device_memory_gib": None if mem.device_bytes is None else mem.device_bytes / GIB,
        "pool_gib": None if mem.pool_bytes is None else mem.pool_bytes / GIB,
        "fits": mem.fits,
        "shortfall_gib": None if mem.shortfall_bytes is None else mem.shortfall_bytes / GIB,
        "notes": mem.notes,
        "time": {"compute_s": tp.compute_s, "comm_s": tp.comm_s, "step_s": tp.step_s,
                 "serial_step_s": tp.serial_step_s, "model_flops_per_token": tp.model_flops_per_token,
                 "tokens_per_s_per_device": tp.tokens_per_s_per_device,
                 "serial_tokens_per_s_per_device": tp.serial_tokens_per_s_per_device, "peak_tflops": tp.peak_tflops,
                 "published": [{"setup": name, "seq_len": seq, "tokens_per_s_per_device": value,
                                "implied_mfu": tp.published_mfu(recipe.model, seq, value)}
                               for name, seq, value in tp.published]},
        "suggestions": planned.suggestions,
    }


def format_plan(recipe: Any, planned: Plan) -> str:
    """The human-readable plan table."""
    data = plan_json(recipe, planned)
    lay = planned.layout
    lines = [f"{data['model']}: {data['parameters']:,} parameters ({data['parameters_per_device']:,} per device); "
             f"micro-batch {lay.micro_batch} x {lay.seq_len} tokens, grad accumulation {lay.grad_accum_steps}; "
             f"dp={lay.data_parallel_degree} tp={lay.tensor_parallel_degree} cp={lay.context_parallel_degree} "
             f"zero_stage={lay.zero_stage} recompute={lay.recompute} attention={lay.attention_backend} "
             f"param bytes={lay.param_bytes} compute bytes={lay.compute_bytes} device={lay.device}",
             "", f"{'per-device memory term':<48} {'GiB':>7}  {'phase':<16} formula  [source]"]
    if "moe" in data:  # Mixture-of-Experts: parallel/plan_moe.py
        lines[1:1] = ["MoE: " + ", ".join(f"{k}={v:,.0f}" for k, v in data["moe"].items())]
    if "multimodal" in data:  # parallel/plan_vision.py: the parameters of the model this objective trains
        lines[1:1] = ["multimodal parameters: " + ", ".join(f"{k} {v:,}" for k, v in data["multimodal"].items())]
    for t in planned.memory.terms:
        lines.append(f"{t.name:<48} {t.gib:>7.2f}  {t.phase:<16} {t.formula}  [{t.source}]")
    lines.append(f"{'total (peak: always + ' + data['peak_phase'] + ')':<48} {data['total_gib']:>7.2f}")
    fits = data["fits"]
    verdict = ("no verdict off Ascend (see the note)" if lay.device != "ascend" else
               "no budget declared (set cluster.device_memory_gib)" if fits is None else
               f"FITS with {-data['shortfall_gib']:.2f} GiB to spare" if fits else
               f"DOES NOT FIT: {data['shortfall_gib']:.2f} GiB over")
    lines.append(f"{'budget':<44} {budget_text(planned.memory)}: {verdict}")
    lines += [f"note: {n}" for n in data["notes"]]
    lines += _format_time(data["time"])
    if planned.suggestions:
        lines.append("smallest changes that fit (each re-planned):")
        lines += ["  " + " ".join(s) for s in planned.suggestions]
    elif fits is False:
        lines.append(f"no change of up to {MAX_CHANGES} knobs fits: add devices or tensor/context parallelism, "
                     "shorten data.seq_len, or use a smaller model")
    return "\n".join(lines)


def _format_time(time: dict) -> list[str]:
    comm = ", ".join(f"{k} {v:.3f} s" for k, v in time["comm_s"].items() if v) or "none estimated"
    lines = ["", f"step time lower bound: {time['step_s']:.3f} s = max(compute {time['compute_s']:.3f} s at "
             f"{time['peak_tflops']:g} TFLOP/s declared peak (100% MFU), communication: {comm}) (overlapped)",
             f"tokens/s per device upper bound: {time['tokens_per_s_per_device']:,.0f}; with no overlap "
             f"{time['serial_tokens_per_s_per_device']:,.0f} ({time['serial_step_s']:.3f} s)"]
    if time["published"]:  # the MFU range of the published 910B runs (ascend-reference.md, planner review T4b)
        at = [time["tokens_per_s_per_device"] * min(1.0, mfu * time["step_s"] / time["compute_s"])
              for mfu in PUBLISHED_MFU_RANGE]
        lines.append(f"at the 35-61% MFU published 910B runs reach: {at[0]:,.0f}-{at[1]:,.0f} tokens/s per device")
    for row in time["published"]:
        lines.append(f"published 910B: {row['setup']}, {row['seq_len']} tokens: {row['tokens_per_s_per_device']:,} "
                     f"tokens/s per device (= {row['implied_mfu']:.0%} MFU at the declared peak)")
    return lines
