"""LLaVA-style stage 1 (objective.name=caption): train the projector from a frozen vision tower into a frozen
pretrained LLM on image-caption pairs, with next-token cross-entropy on the caption tokens only; and `open_vlm`,
which rebuilds the vision-language model of such a run for `ascend-llm generate --image`.

Sequence of one pair: the prompt (objective.multimodal.prompt) with `<image>` replaced by the image's
num_patches placeholder ids (models/vlm.py), then the caption's tokens and the LLM's EOS; labels are -100 on the
prompt and the image (LLaVA's IGNORE_INDEX) and the caption + EOS otherwise; padded with EOS (label -100) to
prompt + max_caption_tokens + 1 tokens. With lora.enabled the LLM also trains through its adapters (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn

from ascend_llm.errors import ConfigError, DataError
from ascend_llm.train.objective import Objective

IGNORE_INDEX = -100


def prompt_ids(tokenizer, prompt: str, num_image_tokens: int, vocab_size: int) -> list[int]:
    """Token ids of `prompt` with `<image>` replaced by placeholders vocab_size + j, j < num_image_tokens; the text
    before it is encoded with the tokenizer's special tokens (a BOS where it adds one), the text after without."""
    before, _, after = prompt.partition("<image>")
    ids = list(tokenizer.encode(before)) if before else []
    ids += [vocab_size + j for j in range(num_image_tokens)]
    return ids + (list(tokenizer.encode(after, add_special_tokens=False)) if after else [])


def caption_sequences(tokenizer, captions: list[str], prefix: list[int], eos_id: int, max_caption_tokens: int,
                      where: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) (N, len(prefix) + max_caption_tokens) int32, shifted for next-token prediction (module
    docstring). DataError naming `where[i]` for a caption longer than max_caption_tokens tokens."""
    width = len(prefix) + max_caption_tokens + 1
    tokens = np.full((len(captions), width), eos_id, np.int32)
    labels = np.full((len(captions), width), IGNORE_INDEX, np.int32)
    for row, caption in enumerate(captions):
        ids = list(tokenizer.encode(caption, add_special_tokens=False)) + [eos_id]
        if len(ids) > max_caption_tokens + 1:
            raise DataError(f"{where}[{row}]", caption[:40], f"has {len(ids) - 1} tokens; objective.multimodal."
                                                             f"max_caption_tokens is {max_caption_tokens}")
        tokens[row, :len(prefix)] = prefix
        tokens[row, len(prefix):len(prefix) + len(ids)] = ids
        labels[row, len(prefix):len(prefix) + len(ids)] = ids
    return tokens[:, :-1], labels[:, 1:]


def _text(data):
    """(HFTokenizer, eos id) of data.tokenizer (model.pretrained points it at the LLM's)."""
    from ascend_llm.interop.source import toolkit_text_files
    from ascend_llm.tokenizer.bpe import EOS, load_tokenizer
    from ascend_llm.tokenizer.hf import HFTokenizer

    eos = data.eos_token or EOS
    eos_id = int(load_tokenizer(data.tokenizer, eos).token_to_id(eos))
    file = Path(data.tokenizer)
    return HFTokenizer.from_files(toolkit_text_files(file.read_bytes()), file.parent), eos_id


class CaptionObjective(Objective):
    """objective.name=caption (module docstring)."""

    name = "caption"
    splits_sequence = False
    samples_text = False

    def __init__(self, recipe):
        from ascend_llm.interop.source import open_model
        from ascend_llm.train.step import masked_cross_entropy_loss

        self.lm_loss = masked_cross_entropy_loss  # mean over labels != -100 (the caption tokens and EOS)
        self.recipe, self.cfg = recipe, recipe.objective.multimodal
        self.vision = open_model(self.cfg.vision_pretrained, vision=True)
        self.tokenizer, self.eos_id = _text(recipe.data)
        tower = self.vision.config.vision
        self.prefix = prompt_ids(self.tokenizer, self.cfg.prompt, tower.num_patches, recipe.model.vocab_size)
        needed = len(self.prefix) + self.cfg.max_caption_tokens
        if needed > recipe.model.max_seq_len:
            raise ConfigError("objective.multimodal.max_caption_tokens", self.cfg.max_caption_tokens,
                              f"prompt ({len(self.prefix)} tokens with the image) + captions must fit the LLM's "
                              f"max_seq_len {recipe.model.max_seq_len}")

    def build_data(self, recipe, main_rank: bool):
        from ascend_llm.data.images import (
            ImageCorpus,
            ImageTextDataset,
            read_image_split,
            tokenizer_digest,
        )

        cfg = self.cfg
        pixels, captions, num_train, _ = read_image_split(cfg, self.vision.preprocess)
        x, y = caption_sequences(self.tokenizer, captions, self.prefix, self.eos_id, cfg.max_caption_tokens,
                                 "objective.multimodal.images")
        dataset = ImageTextDataset(pixels, x, y, captions, num_train, recipe.data.seed)
        data = Path(recipe.data.tokenizer).read_bytes()
        folder = Path(recipe.data.tokenizer).parent
        meta = {"vocab_size": self.tokenizer.vocab_size, "num_tokens": int((y != IGNORE_INDEX).sum()),
                "eos_id": self.eos_id, "source": cfg.images, "tokenizer_digest": tokenizer_digest(data)}
        return [ImageCorpus(folder, meta)], dataset

    def wrap_model(self, model: nn.Cell) -> nn.Cell:
        """The VLM; the LLM frozen unless LoRA adapts it, the vision tower frozen, the projector trained."""
        from ascend_llm.models.vlm import VisionLanguageModel

        if not self.recipe.lora.enabled:
            for param in model.get_parameters():
                param.requires_grad = False
        vlm = VisionLanguageModel(self.vision.model.vision, model, self.cfg.select_layer,
                                  self.cfg.projector_hidden_dim, self.recipe.train.seed)
        if self.cfg.projector_from:  # stage 2: the projector stage 1 trained
            _, tensors = _caption_checkpoint(self.cfg.projector_from, "objective.multimodal.projector_from")
            _set_projector(vlm, tensors, self.cfg.projector_from)
        return vlm

    def read(self, dataset, rows: np.ndarray, with_segments: bool) -> tuple[np.ndarray, ...]:
        return dataset.pixels[rows], dataset.input_ids[rows], dataset.attention_mask[rows]

    def loss(self, model: nn.Cell, *batch: Tensor):
        pixels, tokens, labels = batch
        return self.lm_loss(model(pixels, tokens), labels), ()


def build_objective(recipe, lm_loss) -> CaptionObjective:
    """The registered builder: needs model.pretrained (the LLM) and objective.multimodal.vision_pretrained (a
    CLIP/SigLIP directory or a contrastive run); data parallel only; dense LLMs."""
    cfg = recipe.objective.multimodal
    cfg.validate()
    if not recipe.model.pretrained:
        raise ConfigError("model.pretrained", None, "captioning trains a projector into a pretrained LLM: name its "
                                                    "directory (Hugging Face, checkpoint or run)")
    if not cfg.vision_pretrained:
        raise ConfigError("objective.multimodal.vision_pretrained", None, "must name the frozen vision tower: a "
                                                                          "CLIP/SigLIP directory or a contrastive run")
    if getattr(recipe.model, "num_experts", 0):
        raise ConfigError("model.num_experts", recipe.model.num_experts, "captioning supports dense LLMs only")
    par = recipe.parallel
    if par.tensor_parallel_degree != 1 or par.context_parallel_degree != 1:
        raise ConfigError("parallel.tensor_parallel_degree", par.tensor_parallel_degree,
                          "captioning runs data parallel only (tensor and context parallel degree 1)")
    return CaptionObjective(recipe)


@dataclass
class VisionLanguageSource:
    """A caption run opened for generation: model (the LLM whose tok_embeddings is a SplicedEmbedding holding the
    image set by `set_image`), tokenizer, eos_token_ids, prompt (the run's template), vlm (VisionLanguageModel),
    preprocess."""

    model: object
    tokenizer: object
    eos_token_ids: list
    prompt: str
    vlm: object
    preprocess: object

    def set_image(self, path: str) -> None:
        """Project the image at `path` into the placeholders (DataError naming --image when unreadable)."""
        pixels = self.preprocess.load(path, "--image")[None]
        self.model.tok_embeddings.set_image(self.vlm.image_rows(Tensor(pixels)).asnumpy()[0])

    def encode(self, text: str) -> list[int]:
        """Prompt ids: `text` itself when it holds `<image>`, else the run's prompt followed by `text`."""
        template = text if "<image>" in text else self.prompt + text
        return prompt_ids(self.tokenizer, template, self.vlm.num_image_tokens, self.model.cfg.vocab_size)


def _caption_checkpoint(path: str, field: str) -> tuple[dict, dict]:
    """(recorded run config, model tensors) of a caption run's newest valid checkpoint or of a checkpoint;
    CheckpointError / ConfigError naming `field` otherwise."""
    from ascend_llm.errors import CheckpointError
    from ascend_llm.store.checkpoints import STATE_FILE, checkpoint_config, latest_valid_checkpoint, read_checkpoint

    root = Path(path).expanduser()
    found = (root, read_checkpoint(root)) if (root / STATE_FILE).is_file() else latest_valid_checkpoint(root)
    if found is None:
        raise CheckpointError(str(root), "no checkpoint", f"{field} needs a caption run or checkpoint")
    run = checkpoint_config(found[1][0])
    if run.get("objective", {}).get("name") != "caption":
        raise ConfigError(field, str(root), "needs a run of objective.name=caption (a vision-language model)")
    return run, found[1][1].get("model", {})


def _set_projector(vlm, tensors: dict, where: str) -> None:
    from ascend_llm.errors import CheckpointError

    for param in vlm.projector.get_parameters():
        if param.name not in tensors:
            raise CheckpointError(str(where), param.name, "missing from the checkpoint's model tensors")
        param.set_data(Tensor(np.asarray(tensors[param.name], np.float32)))


def open_vlm(path: str) -> VisionLanguageSource:
    """Rebuild a caption run's (or checkpoint's) VLM: its LLM (model.pretrained, with a stage-2 run's LoRA
    adapters merged: W + (alpha / r) B A), vision tower (objective.multimodal.vision_pretrained) and trained
    projector. CheckpointError / ConfigError name what is missing."""
    from ascend_llm.interop.hf_files import assign_weights
    from ascend_llm.interop.source import merge_lora_tensors, open_model
    from ascend_llm.interop.vision import recorded_multimodal
    from ascend_llm.models.vlm import SplicedEmbedding, VisionLanguageModel

    run, trained = _caption_checkpoint(path, "--image")
    cfg = recorded_multimodal(run)
    llm = open_model(run["model"]["pretrained"])
    adapters = {k[len("llm."):] if k.startswith("llm.") else k: v for k, v in trained.items()
                if not k.startswith("projector.")}
    if adapters:  # stage 2: LoRA adapters (or other trained LLM tensors) merged into the base weights
        assign_weights(llm.model, merge_lora_tensors(run, adapters), source=str(path))
    vision = open_model(cfg.vision_pretrained, vision=True)
    vlm = VisionLanguageModel(vision.model.vision, llm.model, cfg.select_layer, cfg.projector_hidden_dim)
    _set_projector(vlm, trained, path)
    vlm.set_train(False)
    llm.model.tok_embeddings = SplicedEmbedding(llm.model.tok_embeddings, vlm.num_image_tokens)
    return VisionLanguageSource(llm.model, llm.tokenizer, llm.eos_token_ids, cfg.prompt, vlm, vision.preprocess)


def evaluate_captions(run: str, images: str, max_new_tokens: int = 8, limit: int | None = None) -> dict:
    """Greedy captions of a caption run for the pairs of `images` (JSON Lines) through the paged KV-cache engine,
    one image at a time: exact-match rate, and how often the reference's last word (the varying word of a template
    such as "a handwritten seven") is in the generated caption, with the chance of that word (1 / distinct last
    words). Returns the rates (%) and up to 10 examples."""
    from ascend_llm.data.images import read_image_records
    from ascend_llm.inference import Engine, SamplingParams

    source = open_vlm(run)
    records = read_image_records(images)
    pairs = list(zip(records.images, records.captions))[:limit]
    prompt = source.encode(source.prompt)
    engine = Engine(source.model, max_len=len(prompt) + max_new_tokens + 1, num_slots=1)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=source.eos_token_ids)
    exact = word = 0
    examples = []
    for path, caption in pairs:
        source.set_image(str(path))
        text = (engine.generate([prompt], params, source.tokenizer)[0].text or "").strip()
        exact += text == caption.strip()
        word += caption.split()[-1] in text.split()
        if len(examples) < 10:
            examples.append({"image": str(path), "reference": caption, "generated": text})
    last_words = {c.split()[-1] for c in records.captions}
    return {"pairs": len(pairs), "exact_match": 100.0 * exact / len(pairs),
            "last_word_in_caption": 100.0 * word / len(pairs), "last_word_chance": 100.0 / len(last_words),
            "examples": examples}


def main(argv: list[str] | None = None) -> int:
    """`python -m ascend_llm.train.caption RUN --images FILE [--limit N] [--json OUT]`: greedy captions of held-out
    images and how often they name what the reference names (exit 2 on bad input)."""
    import argparse
    import json
    import sys

    import mindspore as ms

    from ascend_llm.errors import UserInputError

    p = argparse.ArgumentParser(prog="python -m ascend_llm.train.caption", description=main.__doc__)
    p.add_argument("run", help="a caption run or checkpoint")
    p.add_argument("--images", required=True, help="JSON Lines of {image, caption}")
    p.add_argument("--limit", type=int, help="only the first N pairs")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        result = evaluate_captions(args.run, args.images, limit=args.limit)
    except UserInputError as exc:
        print(exc.one_line(), file=sys.stderr)
        return 2
    for example in result["examples"][:5]:
        print(f"{Path(example['image']).name}: reference {example['reference']!r}, generated {example['generated']!r}")
    print(f"{result['pairs']} held-out images: exact caption {result['exact_match']:.1f}%, caption's last word "
          f"{result['last_word_in_caption']:.1f}% (chance {result['last_word_chance']:.1f}%)")
    if args.json:
        from ascend_llm.store.files import write_file_atomic

        write_file_atomic(Path(args.json), (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
