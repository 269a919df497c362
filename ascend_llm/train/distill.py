"""Knowledge distillation as a training objective (`objective.name=distill`, config in config/distill.py).

loss = (1 - kd_ratio) * CE(student, labels) + kd_ratio * tau^2 * KL(teacher_tau || student_tau), where
x_tau = softmax(logits / tau) over the vocabulary and the KL is averaged over the tokens the CE counts (labels
!= -100: every token in pretraining, the answer tokens in SFT). Forward KL at a temperature, scaled by tau^2 so
the gradient's size does not depend on tau (Hinton et al. 2015); the same loss as NeMo AutoModel's `KDLoss`
and torchtune's KD recipe.

The teacher (any directory `interop.source.open_model` reads: Hugging Face, run, checkpoint, quantized) is frozen
and runs **in the same compiled step** as the student, on the same micro-batch, rather than from cached top-k
logits. Why: the KL is then over the full vocabulary (a top-k cache truncates the teacher's distribution and
biases the KL and its gradient), nothing is stored per token of the corpus (a top-k cache costs tokens x k x 8
bytes, and is invalidated by any change of data order, replay share or sequence length), and under data parallel
each rank runs the teacher on its own rows with no extra collective. The cost is one teacher forward per
micro-batch (no backward); for a teacher far larger than the student a cache would be cheaper.

Memory: `ChunkedKL` is a cell with its own backward. Forward and backward walk the tokens in chunks of
`chunk_tokens` rows, forming the teacher's and the student's softmax of one chunk at a time; only the two logits
matrices (tokens x vocab, held once each: the model outputs) and the student gradient are ever whole. With
autodiff, graph mode on CPU would keep every chunk's probabilities alive until the backward (DESIGN.md).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from ascend_llm.errors import ConfigError
from ascend_llm.train.objective import Objective

_max_keep = ops.ReduceMax(keep_dims=True)
_sum_keep = ops.ReduceSum(keep_dims=True)


class ChunkedKL(nn.Cell):
    """sum_i w_i * KL(softmax(t_i / tau) || softmax(s_i / tau)) over token rows i, in chunks of `chunk` rows.

    construct(s (N, V) float32 student logits, t (N, V) float32 teacher logits, w (N,) float32 weights) -> scalar
    float32 (nats). Gradient (custom bprop, exact): d/ds_i = w_i (softmax(s_i / tau) - softmax(t_i / tau)) / tau;
    none flows to t or w (the teacher is frozen). compute_dtype: the softmaxes' dtype, one chunk at a time
    (None: float64 on CPU, float32 elsewhere). In float32 the log-sum-exp's rounding (~1e-7 of its value, ~4 for
    a 50-token vocabulary at tau 4) becomes a relative error of every probability, so the gradient
    q - p of nearby distributions is only good to ~1e-6 relative; float64 chunks make it ~1e-8 on CPU."""

    def __init__(self, temperature: float, chunk: int, compute_dtype=None):
        super().__init__()
        self.inv_tau = 1.0 / float(temperature)
        self.chunk = int(chunk)
        if compute_dtype is None:
            compute_dtype = ms.float64 if ms.get_context("device_target") == "CPU" else ms.float32
        self.dtype = compute_dtype

    def _log_probs(self, x, start):
        """log softmax(x / tau) of rows [start, start + chunk), written out (x - max - log sum exp): MindSpore's
        CPU LogSoftmax kernel is good to only ~3e-6 even in float64."""
        z = x[start:start + self.chunk].astype(self.dtype) * self.inv_tau
        z = z - _max_keep(z, -1)
        return z - ops.log(_sum_keep(ops.exp(z), -1))

    def construct(self, s, t, w):
        n = s.shape[0]
        total = ops.zeros((), self.dtype)
        for start in range(0, n, self.chunk):  # a slice past the end stops at n
            log_q, log_p = self._log_probs(s, start), self._log_probs(t, start)
            rows = ops.reduce_sum(ops.exp(log_p) * (log_p - log_q), -1)
            total = total + ops.reduce_sum(rows * w[start:start + self.chunk].astype(self.dtype))
        return total.astype(ms.float32)

    def bprop(self, s, t, w, out, dout):
        n = s.shape[0]
        parts = []
        for start in range(0, n, self.chunk):
            diff = ops.exp(self._log_probs(s, start)) - ops.exp(self._log_probs(t, start))
            scale = w[start:start + self.chunk].astype(self.dtype) * (dout.astype(self.dtype) * self.inv_tau)
            parts.append((diff * scale.reshape(-1, 1)).astype(ms.float32))
        ds = parts[0] if len(parts) == 1 else ops.concat(parts, 0)
        return ds, ops.zeros_like(t), ops.zeros_like(w)


class Distillation(Objective):
    """The distill objective: the student is the trained model (wrap_model returns it unchanged, so checkpoints
    hold the student only); the teacher is held here, frozen, outside the trained cell. aux_names: `ce` (the
    student's cross-entropy) and `kd` (tau^2 * mean KL), logged per step and as val_ce / val_kd. A
    Mixture-of-Experts student (with_aux_loss) adds its router loss to the loss (as LanguageModeling does)."""

    name = "distill"
    aux_names = ("ce", "kd")
    splits_sequence = False  # the teacher reads whole sequences: the trainer refuses context parallel

    def __init__(self, teacher: nn.Cell, lm_loss, kd_ratio: float, temperature: float, chunk_tokens: int,
                 with_aux_loss: bool = False):
        self.teacher, self.lm_loss, self.with_aux_loss = teacher, lm_loss, with_aux_loss
        self.kd_ratio, self.temperature = float(kd_ratio), float(temperature)
        self.kl = ChunkedKL(temperature, chunk_tokens)

    def loss(self, model: nn.Cell, *batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        tokens, labels = batch[0], batch[1]
        segment_ids = batch[2] if len(batch) > 2 else None
        teacher_logits = ops.stop_gradient(self.teacher(tokens, segment_ids))
        if self.with_aux_loss:  # a Mixture-of-Experts student: (logits, router loss already scaled)
            logits, aux_loss = model(tokens, segment_ids)
            loss, parts = self.combine(logits, teacher_logits, labels)
            return loss + aux_loss, parts
        return self.combine(model(tokens, segment_ids), teacher_logits, labels)

    def combine(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(loss, (ce, kd)) from student logits (B, S, V), teacher logits (B, S, V) and labels (B, S) int32
        (-100: not counted, when lm_loss is the masked cross-entropy)."""
        vocab = logits.shape[-1]
        weights = (labels.reshape(-1) != -100).astype(ms.float32)
        kl_sum = self.kl(logits.reshape(-1, vocab).astype(ms.float32),
                         teacher_logits.reshape(-1, vocab).astype(ms.float32), weights)
        kd = kl_sum / ops.maximum(ops.reduce_sum(weights), 1.0) * (self.temperature * self.temperature)
        ce = self.lm_loss(logits, labels)
        return (1.0 - self.kd_ratio) * ce + self.kd_ratio * kd, (ce, kd)


def open_teacher(path: str, vocab_size: int, field: str = "objective.distill.teacher") -> nn.Cell:
    """The teacher model of `path` (interop.source.open_model), in inference mode, its parameters frozen and renamed
    `teacher.*` (unique beside the student's in one graph). ConfigError when its vocabulary differs from the
    student's model.vocab_size (they must share the tokenizer)."""
    from ascend_llm.errors import UserInputError
    from ascend_llm.interop.source import open_model

    try:
        source = open_model(path)
    except UserInputError as exc:
        raise ConfigError(field, path, exc.one_line()) from None
    if source.config.vocab_size != vocab_size:
        raise ConfigError(field, path, f"has vocab_size={source.config.vocab_size}, the student model.vocab_size="
                          f"{vocab_size}: teacher and student must share the tokenizer")
    teacher = source.model
    teacher.set_train(False)
    for param in teacher.get_parameters():
        param.requires_grad = False
        param.name = "teacher." + param.name
    return teacher


def check_tokenizer(recipe, teacher_path: str) -> None:
    """ConfigError unless data.tokenizer is set and has the teacher's vocabulary (token -> id)."""
    from tokenizers import Tokenizer

    from ascend_llm.errors import UserInputError
    from ascend_llm.interop.source import open_model

    if not recipe.data.tokenizer:
        raise ConfigError("data.tokenizer", None, "distillation needs the teacher's tokenizer: set data.tokenizer="
                          f"{teacher_path}/tokenizer.json (or model.pretrained)")
    try:
        teacher = open_model(teacher_path, weights=False).tokenizer
    except UserInputError as exc:
        raise ConfigError("objective.distill.teacher", teacher_path, exc.one_line()) from None
    try:
        student = Tokenizer.from_file(str(recipe.data.tokenizer))
    except Exception as exc:  # tokenizers raises its own Exception type for unreadable files
        raise ConfigError("data.tokenizer", recipe.data.tokenizer, f"cannot be read: {exc}") from None
    if teacher is not None and teacher.tokenizer.get_vocab() != student.get_vocab():
        raise ConfigError("data.tokenizer", recipe.data.tokenizer, f"differs from the teacher's ({teacher_path}): "
                          "teacher and student must share the tokenizer")


def build_objective(recipe, lm_loss) -> Distillation:
    """The distill objective of recipe.objective.distill. ConfigError: no teacher, a teacher with another vocabulary
    or tokenizer, or tensor parallel (the KL needs whole-vocabulary logits on each rank). Context parallel is refused
    by the trainer (splits_sequence is False)."""
    cfg = recipe.objective.distill
    cfg.validate("objective.distill", required=True)
    if recipe.parallel.tensor_parallel_degree > 1:
        raise ConfigError("parallel.tensor_parallel_degree", recipe.parallel.tensor_parallel_degree,
                          "must be 1 with objective.name=distill (the KL needs whole-vocabulary logits)")
    check_tokenizer(recipe, cfg.teacher)
    teacher = open_teacher(cfg.teacher, recipe.model.vocab_size)
    return Distillation(teacher, lm_loss, cfg.kd_ratio, cfg.temperature, cfg.chunk_tokens,
                        with_aux_loss=getattr(recipe.model, "num_experts", 0) > 0)
