"""Images for the multimodal objectives: preprocessing as a Hugging Face `preprocessor_config.json` says (with
Pillow), image-caption records from JSON Lines, and the padding of caption token ids.

Preprocessing follows transformers' PIL backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`, 5.25):
convert to RGB; resize with Pillow (`resample`, bicubic = 3) either so the shortest edge is `size.shortest_edge`
(the long edge int(short * long / short_in)) or to `size.height` x `size.width`; centre crop to `crop_size` (top =
(h - ch) // 2); rescale in float64 by `rescale_factor` then float32; normalise (x - mean) / std in float32;
channels first.

Records: a folder of images each with a same-stem .txt caption, or one JSON object per line,
`{"image": "path", "caption": "text"}` (paths relative to the JSON Lines file)
or `{"image": ..., "conversations": [{"from"|"role": ..., "value"|"content": ...}, ...]}` (LLaVA's layout: the
first assistant turn is the caption). A bad line (not JSON, a missing or non-string field, an image that is missing
or that Pillow cannot read) is a DataError naming `file:line` and the field, or, with on_bad_record=skip, dropped
and counted by reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ascend_llm.data.dataset import EpochOrder
from ascend_llm.errors import DataError, InteropError


@dataclass
class ImagePreprocessor:
    """The steps of a preprocessor_config.json; `__call__(image)` -> (3, H, W) float32."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3
    do_center_crop: bool = False
    crop_size: dict = field(default_factory=dict)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_dir(cls, root: Path, image_size: int) -> ImagePreprocessor:
        """From `root/preprocessor_config.json`; without the file, resize to image_size square, mean/std 0.5.
        InteropError names the file and key for an unreadable file or an unsupported size."""
        file = Path(root) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size={"height": image_size, "width": image_size})
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InteropError(str(file), "unreadable", f"must be a JSON object ({exc})") from None
        if not isinstance(raw, dict):
            raise InteropError(str(file), type(raw).__name__, "must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        out = cls(**{k: v for k, v in raw.items() if k in known})
        if isinstance(out.size, int):  # older configs: an int is the shortest edge (transformers' get_size_dict)
            out.size = {"shortest_edge": out.size}
        if isinstance(out.crop_size, int):
            out.crop_size = {"height": out.crop_size, "width": out.crop_size}
        size = out.size if isinstance(out.size, dict) else {}
        if not (isinstance(size.get("shortest_edge"), int) or
                (isinstance(size.get("height"), int) and isinstance(size.get("width"), int))):
            raise InteropError(f"{file}:size", out.size, "must be {shortest_edge: N} or {height: H, width: W}")
        return out

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if "shortest_edge" in self.size:
            target = int(self.size["shortest_edge"])
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            new_w, new_h = (target, new_long) if width <= height else (new_long, target)
        else:
            new_h, new_w = int(self.size["height"]), int(self.size["width"])
        return image.resize((new_w, new_h), resample=Image.Resampling(int(self.resample)))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A Pillow image -> pixel values (3, H, W) float32 (see the module docstring)."""
        if self.do_convert_rgb:
            image = image.convert("RGB")
        if self.do_resize:
            image = self._resize(image)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.do_center_crop and self.crop_size:
            ch, cw = int(self.crop_size["height"]), int(self.crop_size["width"])
            top, left = (pixels.shape[0] - ch) // 2, (pixels.shape[1] - cw) // 2
            if top < 0 or left < 0:
                raise DataError("crop_size", self.crop_size, f"must fit the resized image {pixels.shape[:2]}")
            pixels = pixels[top:top + ch, left:left + cw]
        out = pixels.astype(np.float64) * self.rescale_factor if self.do_rescale else pixels
        out = np.asarray(out, np.float32)
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1), np.float32)

    def load(self, path: str | Path, where: str = "image") -> np.ndarray:
        """Read an image file with Pillow and preprocess it. DataError naming `where` and the file when it is
        missing or not an image Pillow can read."""
        try:
            with Image.open(path) as image:
                image.load()
                return self(image)
        except FileNotFoundError:
            raise DataError(where, str(path), "image file not found") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(where, str(path), f"not an image Pillow can read ({type(exc).__name__})") from None


def pad_token_ids(ids: list[list[int]], pad_id: int, pad_to: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists: (input_ids, attention_mask) (N, T) int32, T = pad_to or the longest list.
    Longer lists are truncated to max_len keeping their last token (the EOS a text tower pools at)."""
    ids = [list(x) if len(x) <= max_len else list(x[:max_len - 1]) + [x[-1]] for x in ids]
    width = pad_to or max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = x
        mask[row, :len(x)] = 1
    return input_ids, mask


@dataclass
class ImageRecords:
    """Image-caption pairs read from JSON Lines: images (absolute paths), captions, and skipped counts by reason."""

    path: Path
    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def _caption_of(record: dict) -> tuple[str | None, str]:
    """(caption or None, the field it should be in)."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            return None, "conversations"
        for turn in turns:
            role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
            if role in ("gpt", "assistant"):
                value = turn.get("value", turn.get("content"))
                return (value if isinstance(value, str) and value.strip() else None), "conversations[].value"
        return None, "conversations"
    caption = record.get("caption")
    return (caption if isinstance(caption, str) and caption.strip() else None), "caption"


def read_image_records(path: str | Path, on_bad_record: str = "error", check_images: bool = True) -> ImageRecords:
    """Read JSON Lines image-caption records (module docstring). check_images opens every image with Pillow
    (header only). DataError `file:line` naming the field, or counted skips with on_bad_record=skip; DataError
    when the file is missing or no record is left."""
    path = Path(path)
    if path.is_dir():
        return _read_image_folder(path, on_bad_record, check_images)
    if not path.is_file():
        raise DataError("objective.multimodal.images", str(path), "must be a JSON Lines file of "
                                                                   '{"image": path, "caption": text} or a folder')
    out = ImageRecords(path)
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        reason, value = _check_record(path, line, check_images)
        if reason is None:
            out.images.append(value[0])
            out.captions.append(value[1])
        elif on_bad_record == "skip":
            out.skipped[reason[0]] += 1
        else:
            raise DataError(f"{path}:{number}:{reason[0]}", reason[1], reason[2] + " (or set "
                            "objective.multimodal.on_bad_record=skip to skip such records)")
    if not out.images:
        raise DataError(str(path), "no records", "needs at least one readable image-caption record")
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _read_image_folder(folder: Path, on_bad_record: str, check_images: bool) -> ImageRecords:
    """A folder of images, each captioned by the UTF-8 text file beside it with the same stem (`cat.png` +
    `cat.txt`), in name order; errors and skips as for JSON Lines, named by the image file."""
    out = ImageRecords(folder)
    for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
        text_file = file.with_suffix(".txt")
        caption = text_file.read_text(encoding="utf-8", errors="replace").strip() if text_file.is_file() else ""
        line = json.dumps({"image": file.name, "caption": caption})
        reason, value = _check_record(folder / "records", line, check_images)
        if reason is None:
            out.images.append(value[0])
            out.captions.append(value[1])
        elif on_bad_record == "skip":
            out.skipped[reason[0]] += 1
        else:
            field = f"{text_file.name}" if reason[0] == "caption" else reason[0]
            raise DataError(f"{file}:{field}", reason[1], reason[2] + " (or set objective.multimodal."
                                                                      "on_bad_record=skip to skip such images)")
    if not out.images:
        raise DataError(str(folder), "no images", "needs at least one image (" + " ".join(IMAGE_SUFFIXES) +
                        ") with a caption file beside it")
    return out


def _check_record(path: Path, line: str, check_images: bool):
    """(None, (image path, caption)) or ((field, value, what is allowed), None)."""
    try:
        record = json.loads(line)
    except ValueError:
        return ("json", line[:40], "must be one JSON object per line"), None
    if not isinstance(record, dict):
        return ("json", type(record).__name__, "must be a JSON object"), None
    image = record.get("image")
    if not isinstance(image, str) or not image:
        return ("image", image, "must be a path to an image file"), None
    caption, where = _caption_of(record)
    if caption is None:
        return (where, record.get(where.split("[")[0]), "must be a non-empty string"), None
    file = (path.parent / image).resolve()
    if not file.is_file():
        return ("image", image, "image file not found"), None
    if check_images:
        try:
            with Image.open(file) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            return ("image", image, f"not an image Pillow can read ({type(exc).__name__})"), None
    return None, (file, caption)


class ImageTextDataset:
    """Preprocessed image-caption pairs in memory for the multimodal objectives, with PackedDataset's interface
    (train_indices, val_indices, num_train, describe_split, describe_mix).

    pixels (N, C, S, S) float32, input_ids/attention_mask (N, T) int32, captions: N strings; rows [0, num_train)
    train, [num_train, N) are held out. The training order is a seeded permutation per epoch (a pure function of
    (seed, position), like PackedDataset's)."""

    def __init__(self, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, captions: list[str],
                 num_train: int, seed: int, skipped: dict | None = None):
        self.pixels, self.input_ids, self.attention_mask = pixels, input_ids, attention_mask
        self.captions, self.num_train, self.seed = list(captions), int(num_train), seed
        self.num_val = len(captions) - self.num_train
        self.skipped = dict(skipped or {})
        self._order = EpochOrder(seed, self.num_train)

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Row ids (count,) int64 of the pairs at global positions [position, position + count) (crosses epochs)."""
        return self._order.indices(position, count)

    def val_indices(self, count: int) -> np.ndarray:
        """The first `count` held-out rows (the same at every validation)."""
        return self.num_train + np.arange(min(count, self.num_val), dtype=np.int64)

    def describe_split(self) -> dict:
        """Pair counts of the split and the records skipped by reason."""
        return {"train_pairs": self.num_train, "val_pairs": self.num_val, "skipped": self.skipped}

    def describe_mix(self, position: int) -> dict:
        """One source (the BlendedDataset interface)."""
        return {"images": {"weight": 1.0, "sequences": int(position), "share": 1.0}}


def load_pairs(records: ImageRecords, preprocess: ImagePreprocessor) -> np.ndarray:
    """Every record's image preprocessed: (N, C, S, S) float32. DataError naming the file and field if an image
    stops being readable between the check and the load."""
    return np.stack([preprocess.load(path, f"{records.path}:image") for path in records.images])


def tokenize_captions(tokenizer, captions: list[str], eos_id: int | None, pad_id: int, width: int, max_len: int,
                      where: str = "captions") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) (N, T) int32: each caption's ids (the tokenizer's own special tokens, plus
    `eos_id` when it did not end with it: the token a CLIP text tower pools at), right-padded with `pad_id` to
    `width` (0: the longest). DataError naming `where[i]` when a caption has more than max_len (or width) tokens."""
    limit = min(width, max_len) if width else max_len
    ids = []
    for number, caption in enumerate(captions):
        row = list(tokenizer.encode(caption))
        if eos_id is not None and (not row or row[-1] != eos_id):
            row.append(eos_id)
        if len(row) > limit:
            raise DataError(f"{where}[{number}]", caption[:40], f"has {len(row)} tokens; the text tower takes "
                                                                f"{limit}")
        ids.append(row)
    return pad_token_ids(ids, pad_id, width, max_len)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_dataset(out_dir: str | Path, num_val: int = 297, tokenizer_vocab: int = 300,
                         count: int | None = None) -> dict:
    """Real images that ship inside scikit-learn (`load_digits`: 1,797 8x8 handwritten digits, 16 grey levels) as
    an image-caption set, no download: out_dir/images/NNNN.png (8-bit greyscale, levels * 255 / 16),
    train.jsonl and val.jsonl ({"image", "caption": "a handwritten seven"}; the last `num_val` images are held out),
    captions.jsonl ({"text": caption} of the training pairs, for pretraining a language model on the captions) and
    tokenizer.json (byte-level BPE trained on the captions, end-of-text `<|endoftext|>`). Returns the counts.
    count: only the first `count` images (tests). Every file is written atomically; DataError if scikit-learn is
    not installed."""
    from ascend_llm.store.files import write_file_atomic
    from ascend_llm.tokenizer.bpe import train_tokenizer

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("scikit-learn", "missing", "pip install scikit-learn (its digits ship inside the wheel)") \
            from None
    import io

    out = Path(out_dir)
    digits = load_digits()
    images, targets = digits.images[:count], digits.target[:count]
    captions = [f"a handwritten {DIGIT_WORDS[int(t)]}" for t in targets]
    lines = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(np.round(image * 255.0 / 16.0).astype(np.uint8), mode="L").save(buffer, format="PNG")
        write_file_atomic(out / "images" / f"{index:04d}.png", buffer.getvalue())
        lines.append(json.dumps({"image": f"images/{index:04d}.png", "caption": captions[index]}))
    num_train = len(lines) - num_val
    write_file_atomic(out / "train.jsonl", ("\n".join(lines[:num_train]) + "\n").encode())
    write_file_atomic(out / "val.jsonl", ("\n".join(lines[num_train:]) + "\n").encode())
    text = "\n".join(json.dumps({"text": c}) for c in captions[:num_train]) + "\n"
    write_file_atomic(out / "captions.jsonl", text.encode())
    tokenizer = train_tokenizer(iter(captions[:num_train]), tokenizer_vocab)
    write_file_atomic(out / "tokenizer.json", tokenizer.to_str().encode())
    return {"train": num_train, "val": num_val, "classes": len(DIGIT_WORDS)}


@dataclass
class ImageCorpus:
    """What the trainer knows as the prepared corpus: `path` holds tokenizer.json; meta: vocab_size, num_tokens,
    eos_id, source."""

    path: Path
    meta: dict = field(default_factory=dict)


def tokenizer_digest(data: bytes) -> str:
    """Short SHA-256 of tokenizer bytes (names the cached copy of a run's tokenizer)."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_image_split(cfg, preprocess) -> tuple[np.ndarray, list[str], int, list]:
    """The image-caption pairs of `cfg.images` (+ `cfg.val_images`, else the last cfg.val_fraction of the records
    held out): (pixels (N, C, S, S) float32 through `preprocess`, N captions, num_train, the records read).
    cfg is objective.multimodal (images, val_images, val_fraction, on_bad_record). Raises ConfigError when
    cfg.images is unset, DataError naming file:line:image for a bad record (unless on_bad_record=skip)."""
    from ascend_llm.errors import ConfigError

    if not cfg.images:
        raise ConfigError("objective.multimodal.images", None, "must name a JSON Lines file of "
                                                               '{"image": path, "caption": text}')
    records = [read_image_records(cfg.images, cfg.on_bad_record)]
    if cfg.val_images:
        records.append(read_image_records(cfg.val_images, cfg.on_bad_record))
    pixels = np.concatenate([load_pairs(r, preprocess) for r in records])
    captions = [c for r in records for c in r.captions]
    num_train = len(records[0].captions) if cfg.val_images else len(captions) - int(len(captions) * cfg.val_fraction)
    return pixels, captions, num_train, records
