"""Contrastive image-text alignment (objective.name=contrastive): CLIP's symmetric InfoNCE with a learnable
temperature, SigLIP's sigmoid loss with a learnable bias, features of every data-parallel rank in one contrastive
batch, and image<->text retrieval recall@k.

Losses (logits_per_text (N, N) = exp(logit_scale) * text @ image^T (+ logit_bias), row i = text i):
- CLIP (Radford et al. 2021; transformers CLIPModel): (CE(logits_per_text, arange N) + CE(logits_per_image,
  arange N)) / 2.
- SigLIP (Zhai et al. 2023, eq. 1): -(1/N) sum_i sum_j log sigmoid(z_ij * logits_per_text[i, j]), z_ij = 1 if i == j
  else -1.
- cosine (the seed's MultimodalAligner: two linear projections trained with a cosine objective; no temperature,
  c = text @ image^T of the L2-normalised embeddings): PyTorch's CosineEmbeddingLoss (reduction mean) applied to the
  matched in-batch pairs (text i, image j) with y = 1, loss 1 - c_ij, plus the same loss applied to the other pairs
  with y = -1, loss max(0, c_ij - margin), the two means summed:
  L = mean_{matched} (1 - c_ij) + mean_{others} max(0, c_ij - margin). Text i matches image j when it is that
  image's caption (the same token ids: the diagonal, and every other pair sharing that caption). With
  dual_encoder.cosine_negatives=false only the first mean (which a collapse of every embedding onto one direction
  minimises: the negatives keep captions apart). Why two means and matching by caption: one mean over all N^2
  pairs weighs the negatives (N - 1) : 1 against the positives, and the digits runs (10 captions, batch 64) sat at
  the point where every cosine is <= 0 (loss = the matched share, top-1 at chance); a diagonal-only y made each
  repeated caption a negative of itself, pushing c_jj down for every other image of that caption.

Data parallel: each rank embeds its share of the global batch, then `AllGather` (parallel/comm.py, backward =
reduce-scatter: OpenCLIP's gather_with_grad) concatenates every rank's features in rank order, so each rank computes
the loss of the whole global batch. The gradient a rank gets for its own features is the sum over ranks of the same
loss's gradient (R times dL/df); the trainer's data-parallel mean of parameter gradients then equals the gradient of
one process on the global batch, and so do the loss and the update.
"""

from __future__ import annotations

import sys
from math import comb
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.errors import ConfigError
from ascend_llm.train.objective import Objective


def clip_loss(logits_per_text):
    """Symmetric cross-entropy with the diagonal as targets: logits (N, N) float32 -> scalar float32."""
    eye = ops.eye(logits_per_text.shape[0], logits_per_text.shape[0], mstype.float32)
    rows = -(ops.log_softmax(logits_per_text, -1) * eye).sum(-1).mean()
    cols = -(ops.log_softmax(logits_per_text, 0) * eye).sum(0).mean()
    return (rows + cols) / 2


def log_sigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), finite for any float32 x."""
    return ops.minimum(x, 0.0) - ops.log1p(ops.exp(-ops.abs(x)))


def siglip_loss(logits_per_text):
    """Sigmoid loss of Zhai et al. 2023 (module docstring): logits (N, N) float32 -> scalar float32."""
    n = logits_per_text.shape[0]
    signs = 2.0 * ops.eye(n, n, mstype.float32) - 1.0
    return -log_sigmoid(signs * logits_per_text).sum() / n


def cosine_loss(cos, matched, negatives: bool = True, margin: float = 0.0):
    """The cosine aligner's loss (module docstring): cos (N, N) float32 cosine similarities, row i = text i; matched
    (N, N) float32, 1 for y = 1 (the diagonal at least) -> scalar float32: mean over matched pairs of 1 - cos, plus
    (negatives) the mean over the other pairs of max(0, cos - margin) (0 when every pair matches)."""
    loss = ((1.0 - cos) * matched).sum() / matched.sum()
    if not negatives:
        return loss
    others = 1.0 - matched
    return loss + (ops.relu(cos - margin) * others).sum() / ops.maximum(others.sum(), 1.0)


def same_caption(input_ids):
    """(N, N) float32: 1 where rows i and j of input_ids (N, T) int32 hold the same token ids."""
    equal = (input_ids.expand_dims(1) == input_ids.expand_dims(0)).astype(mstype.int32)
    return (equal.sum(-1) == input_ids.shape[1]).astype(mstype.float32)


def batch_accuracy(logits_per_text):
    """Share of texts whose highest-scoring image is their own (in-batch top-1), float32 scalar."""
    best = ops.argmax(logits_per_text, -1)
    target = ops.arange(logits_per_text.shape[0], dtype=best.dtype)
    return (best == target).astype(mstype.float32).mean()


class ContrastiveModel(nn.Cell):
    """The trained cell: a DualEncoder (`dual`) whose features are all-gathered over `group` when it has more than
    one rank. construct(pixels (b, C, S, S), input_ids (b, T), attention_mask (b, T)) -> (image_embeds,
    text_embeds) (R*b, D) L2-normalised, rank order."""

    def __init__(self, dual: nn.Cell, group=None):
        super().__init__()
        self.dual = dual
        self.gathered = group is not None and group.size > 1
        if self.gathered:
            from ascend_llm.parallel.comm import AllGather

            self.gather = AllGather(group)

    def construct(self, pixels, input_ids, attention_mask):
        image, text = self.dual(pixels, input_ids, attention_mask)
        if self.gathered:
            image, text = self.gather(image), self.gather(text)
        return image, text

    def gathered_ids(self, input_ids):
        """Every rank's input_ids (R*b, T) in rank order (no gradient): the captions of the contrastive batch."""
        return ops.stop_gradient(self.gather(input_ids)) if self.gathered else input_ids


class ContrastiveObjective(Objective):
    """objective.name=contrastive (module docstring). aux: logit_scale_exp (the inverse temperature) and the
    in-batch top-1 accuracy."""

    name = "contrastive"
    aux_names = ("logit_scale_exp", "batch_accuracy")
    splits_sequence = False
    samples_text = False  # the trainer's closing text sample does not apply

    def __init__(self, recipe):
        from ascend_llm.interop.vision import open_vision_text

        self.recipe, self.cfg = recipe, recipe.objective.multimodal
        self.text = open_vision_text(self.cfg, recipe.data)
        if self.cfg.dual_encoder.text_tower == "llm":
            check_llm_tower(self.cfg, self.text.tokenizer.vocab_size, recipe.model)
        self.loss_fn = loss_function(self.text.config)

    def build_data(self, recipe, main_rank: bool):
        """(prepared_all, ImageTextDataset): the records of objective.multimodal.images (and val_images)."""
        dataset = build_image_dataset(self.cfg, self.text, recipe.data.seed)
        return [self.text.corpus(recipe.data.cache_dir, int(dataset.attention_mask.sum()), self.cfg.images)], dataset

    def wrap_model(self, model: nn.Cell) -> nn.Cell:
        """A DualEncoder (pretrained weights when configured) wrapped for the gather. The LLM is its text tower with
        dual_encoder.text_tower=llm (after its converters: LoRA trains adapters only), else it is not trained."""
        from ascend_llm.parallel.comm import world_group

        llm = model if self.cfg.dual_encoder.text_tower == "llm" else None
        dual = self.text.build_model(llm)
        if not self.cfg.train_towers:  # the seed's MultimodalAligner: frozen feature extractors, projections train
            for param in list(dual.vision.get_parameters()) + list(dual.text.get_parameters()):
                param.requires_grad = False
        return ContrastiveModel(dual, world_group() if self.cfg.gather_features else None)

    def read(self, dataset, rows: np.ndarray, with_segments: bool) -> tuple[np.ndarray, ...]:
        return dataset.pixels[rows], dataset.input_ids[rows], dataset.attention_mask[rows]

    def loss(self, model: nn.Cell, *batch: Tensor):
        image, text = model(*batch)
        logits = model.dual.logits(image, text)
        if self.text.config.loss == "cosine":
            value = self.loss_fn(logits, same_caption(model.gathered_ids(batch[1])))
        else:
            value = self.loss_fn(logits)
        return value, (ops.exp(model.dual.logit_scale).reshape(()), batch_accuracy(logits))


def loss_function(cfg):
    """The loss of a DualEncoderConfig: logits_per_text (N, N) float32 (and for cosine the matched pairs, see
    `cosine_loss`) -> scalar (module docstring)."""
    if cfg.loss == "cosine":  # (cos, matched)
        return lambda cos, matched: cosine_loss(cos, matched, cfg.cosine_negatives, cfg.cosine_margin)
    return clip_loss if cfg.loss == "clip" else siglip_loss


def check_llm_tower(cfg, vocab: int, model) -> None:
    """ConfigError naming the field when the run's LLM cannot be the text tower: combined with a whole pretrained
    CLIP/SigLIP, a tokenizer larger than its vocabulary, captions longer than its positions."""
    if cfg.pretrained:
        raise ConfigError("objective.multimodal.dual_encoder.text_tower", "llm", "takes the run's LLM; "
                          "objective.multimodal.pretrained (a whole CLIP/SigLIP) cannot be combined with it")
    if vocab > model.vocab_size:
        raise ConfigError("model.vocab_size", model.vocab_size, f"must be >= the tokenizer's {vocab} ids")
    width = cfg.dual_encoder.text.max_seq_len
    if width > model.max_seq_len:
        raise ConfigError("objective.multimodal.dual_encoder.text.max_seq_len", width,
                          f"must fit the LLM's max_seq_len {model.max_seq_len}")


def build_image_dataset(cfg, text, seed: int):
    """ImageTextDataset of `cfg.images` (+ `cfg.val_images`, else the last val_fraction of the records)."""
    from ascend_llm.data.images import ImageTextDataset, read_image_split

    pixels, captions, num_train, records = read_image_split(cfg, text.preprocess)
    ids, mask = text.tokenize(captions, "objective.multimodal.images", text.config.text.max_seq_len)
    skipped = {str(r.path): dict(r.skipped) for r in records if r.skipped}
    return ImageTextDataset(pixels, ids, mask, captions, num_train, seed, skipped)


def build_objective(recipe, lm_loss) -> ContrastiveObjective:
    """The registered builder (config/objective.py OBJECTIVES): validates objective.multimodal and the layout
    (data parallel only)."""
    recipe.objective.multimodal.validate()
    par = recipe.parallel
    if par.tensor_parallel_degree != 1 or par.context_parallel_degree != 1:
        raise ConfigError("parallel.tensor_parallel_degree", par.tensor_parallel_degree,
                          "contrastive training runs data parallel only (tensor and context parallel degree 1)")
    return ContrastiveObjective(recipe)


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, captions: list[str],
                     ks=(1, 5, 10)) -> dict:
    """Image->text and text->image recall@k (%) with chance at each k, for N pairs (image i, captions[i]).

    Identical captions cannot be told apart, so image->text ranks the U distinct captions (one embedding each, the
    first pair's) and is correct when the image's own caption is among the top k (chance k / U); text->image ranks
    the N images for each pair's text and is correct when a top-k image carries the query's caption (chance for a
    caption shared by m images: 1 - C(N-m, k) / C(N, k), averaged over queries). With distinct captions these are
    the usual recall@k."""
    image = np.asarray(image_embeds, np.float64)
    text = np.asarray(text_embeds, np.float64)
    distinct, first, keys = np.unique(np.asarray(captions), return_index=True, return_inverse=True)
    n, u, out = len(captions), len(distinct), {}
    same = keys[:, None] == keys[None, :]
    by_image = np.argsort(-(image @ text[first].T), axis=1, kind="stable")  # (N, U) distinct captions per image
    by_text = np.argsort(-(text @ image.T), axis=1, kind="stable")  # (N, N) images per text
    matches = same.sum(1)
    for k in ks:
        out[f"i2t_recall@{k}"] = 100.0 * float(np.mean([keys[i] in by_image[i, :k] for i in range(n)]))
        out[f"t2i_recall@{k}"] = 100.0 * float(np.mean([same[j, by_text[j, :k]].any() for j in range(n)]))
        out[f"i2t_chance@{k}"] = 100.0 * min(k, u) / u
        out[f"t2i_chance@{k}"] = 100.0 * float(np.mean([1.0 - comb(n - m, k) / comb(n, k) for m in matches]))
    return out


def embed_pairs(model, pixels: np.ndarray, input_ids: np.ndarray, mask: np.ndarray, batch: int = 64):
    """(image_embeds, text_embeds) (N, D) float32 of a DualEncoder, `batch` rows per call."""
    images, texts = [], []
    for start in range(0, len(pixels), batch):
        stop = start + batch
        i, t = model(Tensor(pixels[start:stop]), Tensor(input_ids[start:stop]), Tensor(mask[start:stop]))
        images.append(i.asnumpy())
        texts.append(t.asnumpy())
    return np.concatenate(images), np.concatenate(texts)


def evaluate_retrieval(model_dir: str, images: str, ks=(1, 5, 10), on_bad_record: str = "error") -> dict:
    """Recall@k of a CLIP/SigLIP directory or a contrastive run/checkpoint on the pairs of `images` (JSON Lines)."""
    from ascend_llm.data.images import load_pairs, read_image_records
    from ascend_llm.interop.source import open_model

    source = open_model(model_dir, vision=True)
    records = read_image_records(images, on_bad_record)
    pixels = load_pairs(records, source.preprocess)
    ids, mask = source.tokenize(records.captions)
    image, text = embed_pairs(source.model, pixels, ids, mask)
    result = retrieval_recall(image, text, records.captions, ks)
    return {"model": str(model_dir), "images": str(images), "pairs": len(records.captions),
            "distinct_captions": len(set(records.captions)), **result}


def main(argv: list[str] | None = None) -> int:
    """`python -m ascend_llm.train.contrastive MODEL --images FILE [--json OUT]`: retrieval table (exit 2 on bad
    input)."""
    import argparse
    import json

    import mindspore as ms

    from ascend_llm.errors import UserInputError

    p = argparse.ArgumentParser(prog="python -m ascend_llm.train.contrastive", description=main.__doc__)
    p.add_argument("model", help="CLIP/SigLIP Hugging Face directory, or a contrastive run or checkpoint")
    p.add_argument("--images", required=True, help="JSON Lines of {image, caption}")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        result = evaluate_retrieval(args.model, args.images)
    except UserInputError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    print(f"{result['pairs']} pairs, {result['distinct_captions']} distinct captions")
    print("| k | image->text recall (chance) | text->image recall (chance) |\n|---:|---:|---:|")
    for k in (1, 5, 10):
        print(f"| {k} | {result[f'i2t_recall@{k}']:.1f}% ({result[f'i2t_chance@{k}']:.1f}%) | "
              f"{result[f't2i_recall@{k}']:.1f}% ({result[f't2i_chance@{k}']:.1f}%) |")
    if args.json:
        from ascend_llm.store.files import write_file_atomic

        write_file_atomic(Path(args.json), (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
