"""The trainer's phases, each on its own: non-finite accounting and the divergence stop, the metrics record
and the progress bar, validation with no held-out windows. Plain objects stand in for the compiled parts."""

from __future__ import annotations

import types

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.compose import compose_recipe
from ascend_llm.config.parallel import ParallelConfig
from ascend_llm.data.dataset import PackedDataset
from ascend_llm.errors import TrainingDiverged
from ascend_llm.train.layout import TrainLayout
from ascend_llm.train.metrics import Throughput
from ascend_llm.train.objective import LanguageModeling
from ascend_llm.train.state import RunState
from ascend_llm.train.step import cross_entropy_loss
from ascend_llm.train.trainer import StepOutcome, check_finite, step_record, validate


class FakePrecision:
    def __init__(self, calibrating=False):
        self.calibrating = calibrating

    def overflow_is_calibration(self):
        return self.calibrating

    def metrics(self):
        return {}


class FakeBar:
    def __init__(self):
        self.postfix = None

    def set_postfix(self, postfix, refresh=False):
        self.postfix = dict(postfix)

    def update(self, n):
        pass


def layout(dp=1, dp_rank=0):
    return TrainLayout(ParallelConfig(data_parallel_degree=dp), types.SimpleNamespace(dp_rank=dp_rank, cp_rank=0,
                                                                                     tp_rank=0))


def session(*overrides, calibrating=False, dataset=None, dp=1, dp_rank=0, steps=None):
    recipe = compose_recipe(["model=debug", *overrides])
    return types.SimpleNamespace(recipe=recipe, run=RunState({}, seed=0), precision=FakePrecision(calibrating),
                                 converters=types.SimpleNamespace(metrics=dict), nonfinite_streak=0,
                                 throughput=Throughput(100, 1.0, 1.0), progress=FakeBar(), start_step=0,
                                 dataset=dataset, micro_rows=4 // dp, val_losses=[], steps=steps,
                                 objective=LanguageModeling(cross_entropy_loss),
                                 layout=layout(dp, dp_rank))


def outcome(step, finite, loss=float("nan")):
    return StepOutcome(step=step, loss=loss if not finite else 1.0, grad_norm=float("nan"), lr=1e-3, finite=finite)


def test_divergence_stops_after_max_nonfinite_steps_in_a_row_naming_the_likely_field():
    s = session("train.max_nonfinite_steps=3", "optim.lr=3000")
    check_finite(s, outcome(1, False))
    check_finite(s, outcome(2, False))
    check_finite(s, outcome(3, True))  # a finite step resets the streak
    check_finite(s, outcome(4, False))
    check_finite(s, outcome(5, False))
    with pytest.raises(TrainingDiverged) as info:
        check_finite(s, outcome(6, False))
    assert s.run.num_skipped_steps == 5
    line = info.value.one_line()
    assert line.startswith("error: training diverged at step 6: 3 non-finite steps in a row")
    assert "optim.lr=3000" in line


def test_fp16_overflows_while_the_loss_scale_shrinks_are_not_divergence():
    s = session("precision=fp16", "train.max_nonfinite_steps=2", calibrating=True)
    for step in range(1, 6):  # finite loss, overflowing gradients: the scaler calibrates
        check_finite(s, StepOutcome(step, 2.0, float("inf"), 1e-3, False))
    assert s.run.num_skipped_steps == 5 and s.nonfinite_streak == 0
    s.precision.calibrating = False  # scale at its floor: now it counts, and names the loss scale
    check_finite(s, StepOutcome(6, 2.0, float("inf"), 1e-3, False))
    with pytest.raises(TrainingDiverged, match="precision.loss_scale_value"):
        check_finite(s, StepOutcome(7, 2.0, float("inf"), 1e-3, False))


def test_progress_bar_keeps_the_last_measured_tokens_per_second_between_log_steps():
    s = session("train.log_every=5")
    s.throughput.last_tokens_per_s = 1234.0
    record = step_record(s, StepOutcome(3, 2.0, 0.5, 1e-3, True), [])
    assert record == {} and s.progress.postfix["tok_s"] == "1234"
    record = step_record(s, StepOutcome(4, 2.0, 0.5, 1e-3, True), [{"event": "x"}])
    assert record["precision_events"] == [{"event": "x"}] and record["step"] == 4


def test_no_validation_windows_means_no_validation_and_no_nan():
    dataset = PackedDataset(np.arange(2000) % 50, seq_len=16, val_fraction=0.0, seed=0)
    s = session(dataset=dataset)
    assert validate(s, StepOutcome(10, 2.0, 0.5, 1e-3, True), {}) == {}
    assert s.val_losses == []


def test_validation_under_data_parallel_reads_the_windows_of_one_process():
    """Each of 2 data-parallel ranks evaluates its half of every held-out batch one process evaluates (the
    compiled eval_loss then averages the two halves), so val_loss does not depend on the layout."""
    dataset = PackedDataset(np.arange(4000) % 97, seq_len=16, val_fraction=0.2, seed=0)
    seen = {}
    for dp, rank in ((1, 0), (2, 0), (2, 1)):
        batches = seen.setdefault((dp, rank), [])
        steps = types.SimpleNamespace(
            eval_loss=lambda x, y, b=batches: b.append(x.asnumpy()) or (Tensor(np.float32(0)),))
        validate(session("train.val_batches=3", dataset=dataset, dp=dp, dp_rank=rank, steps=steps),
                 StepOutcome(10, 2.0, 0.5, 1e-3, True), {})
    one = seen[(1, 0)]
    assert len(one) == 3 and all(b.shape == (4, 16) for b in one)
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([seen[(2, 0)][k], seen[(2, 1)][k]]), one[k])


def test_bf16_parameters_are_refused_where_they_cannot_run():
    from ascend_llm.errors import ConfigError
    from ascend_llm.train.session import check_param_dtype

    recipe = compose_recipe(["model=debug", "precision.param_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="Ascend only"):
        check_param_dtype(recipe, "CPU")
    with pytest.raises(ConfigError, match="zero_stage"):
        check_param_dtype(recipe, "Ascend")  # no ZeRO: no fp32 master weights
    check_param_dtype(compose_recipe(["experiment=llama3_8b_910b"]), "Ascend")  # dp8 ZeRO-2: fine


# ---- stopping on a signal (train/stop.py): real handlers, a real CheckpointManager -------------------------------

def test_the_first_signal_is_recorded_and_the_second_gets_the_default_action():
    import os
    import signal

    from ascend_llm.train.stop import StopSignals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the next line runs
        assert signals.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_one_process_agrees_with_itself():
    import signal

    from ascend_llm.train.stop import StopAgreement

    agreement = StopAgreement(world_size=1)
    assert agreement.agree(None) is None and agreement.agree(signal.SIGINT) == signal.SIGINT
    agreement.barrier()  # no collective in one process


def stop_session(run_dir):
    from ascend_llm.train.checkpoint import CheckpointManager
    from ascend_llm.train.state import DataState

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    part = types.SimpleNamespace(state_dict=lambda: dict(arrays), load_state_dict=arrays.update)
    run = RunState({"model": {"dim": 8}}, seed=0)
    manager = CheckpointManager(run_dir, {"model": part, "data": DataState({}), "run": run}, keep_last=3)
    saved = []
    save = manager.save
    manager.save = lambda step: saved.append(step) or save(step)  # records each write, then writes
    return types.SimpleNamespace(checkpoints=manager, run=run, throughput=Throughput(100, 1.0, 1.0), main_rank=True,
                                 rank=0, progress=None, run_dir=run_dir, checkpointed_step=None), saved


def test_a_signal_checkpoints_the_step_reached_once_and_names_it(tmp_path):
    import signal

    from ascend_llm.train.checkpoint import read_checkpoint
    from ascend_llm.train.stop import StopAgreement, TrainingStopped
    from ascend_llm.train.trainer import save_checkpoint, stop_after

    s, saved = stop_session(tmp_path / "run")
    with pytest.raises(TrainingStopped) as info:
        stop_after(s, StepOutcome(7, 2.5, 1.0, 1e-3, True), signal.SIGTERM, StopAgreement(1))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000007"
    assert str(info.value) == f"stopped by SIGTERM at step 7; checkpoint {checkpoint}; resume with train.resume=auto"
    assert info.value.exit_status == 143 and saved == [7]
    assert read_checkpoint(checkpoint)[0]["parts"]["run"]["step"] == 7
    save_checkpoint(s, StepOutcome(8, 2.4, 1.0, 1e-3, True))  # due by train.ckpt_every: not written twice
    with pytest.raises(TrainingStopped) as info:
        stop_after(s, StepOutcome(8, 2.4, 1.0, 1e-3, True), signal.SIGINT, StopAgreement(1))
    assert saved == [7, 8] and info.value.exit_status == 130 and info.value.checkpoint.name == "step_00000008"


def test_a_signal_after_a_non_finite_step_names_the_last_finite_checkpoint(tmp_path):
    import signal

    from ascend_llm.train.stop import StopAgreement, TrainingStopped
    from ascend_llm.train.trainer import save_checkpoint, stop_after

    s, saved = stop_session(tmp_path / "run")
    save_checkpoint(s, StepOutcome(5, 2.5, 1.0, 1e-3, True))
    with pytest.raises(TrainingStopped) as info:
        stop_after(s, StepOutcome(6, float("nan"), float("nan"), 1e-3, False), signal.SIGTERM, StopAgreement(1))
    assert saved == [5] and info.value.step == 6 and info.value.checkpoint.name == "step_00000005"
