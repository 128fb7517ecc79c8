"""Training data: JSONL manifests and their index, the three tasks' examples, aspect-ratio buckets, the global
batches of the task mixing, collation, and loading in DataLoader worker processes.

A manifest is a JSON-lines file, one sample per line; image paths are relative to the manifest's folder (or
absolute). The task of a row is told by its keys:

    understanding  {"images": ["a.jpg"], "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                           {"from": "gpt", "value": "A red square."}]}
                   ("image": "a.jpg" for one image; "role"/"content" turns work too; one `<image>` marker per image,
                   in order; text-only conversations have no images)
    t2i            {"image": "a.jpg", "caption": "a red square on a white background"}
    edit           {"source": "a.jpg", "instruction": "make the square blue", "target": "b.jpg"}

Each example is built exactly as the official inference scripts build their inputs (prompt.py, preprocess.py):
understanding turns through the official chat formatter, whose labels supervise the assistant answers only;
T2I as the caption prompt about a blank white image; editing as the instruction about the source image, whose VAE
tokens also go to the decoder. Generation images are resized to cover their aspect-ratio bucket (or
`resolution` x `resolution` without buckets) and center-cropped, as the sampler's condition images are.

Classifier-free guidance needs the unconditional branches at sampling time, so conditions are dropped at random:
T2I prompts become the unconditional prompt (`drop_prompt`); edits lose the instruction but keep the image
(`drop_prompt`, the sampler's "no text" branch) or lose both (`drop_image`, its "no text, no image" branch).

Rows that cannot be used (malformed JSON or fields, missing or unreadable images, too long for the model, no answer
to learn) are skipped and counted by reason; they never stop a run.
"""
import array
import copy
import glob
import hashlib
import io
import json
import math
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import PreprocessConfig
from ..files import write_atomic
from ..layers import pad_rows
from ..preprocess import (ImageError, blank_image, condition_images, load_image, preprocess_images,
                          resize_center_crop)
from ..prompt import (IGNORE_ID, UNCONDITIONAL_PROMPT, Tokenizer, build_input_ids, check_image_count, check_length,
                      edit_prompt, preprocess_inputs, t2i_prompt)

TASKS = ("understanding", "t2i", "edit")
SKIP_REASONS = ("malformed", "missing image", "unreadable image", "too long", "no answer")
MAX_WARNINGS = 5  # per reason and process: enough to see what is wrong without flooding a long run's log
MAX_ATTEMPTS = 1000  # rows tried for one sample before the data is declared unusable


class SkipRow(Exception):
    """A row that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class DataError(ValueError):
    """The data cannot feed a task at all: training stops with this message."""


def task_of(row: dict) -> str:
    if "conversations" in row:
        return "understanding"
    if "caption" in row:
        return "t2i"
    if "instruction" in row:
        return "edit"
    raise SkipRow("malformed", f"a row needs 'conversations', 'caption' or 'instruction', got keys {sorted(row)}")


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------
class Rows:
    """The rows of one task over all manifests: row i is (file index, byte offset of its line). Backed by the
    memory-mapped index files, so ranks and loader workers share one copy in the page cache."""

    def __init__(self, parts: list[tuple[int, np.ndarray, np.ndarray]]):
        """parts: (file index, byte offsets, sort keys) of each manifest's rows of the task."""
        self.parts = [part for part in parts if len(part[1])]
        self.ends = np.cumsum([len(part[1]) for part in self.parts], dtype=np.int64)

    def _locate(self, i: int) -> tuple[tuple, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[part], i - (int(self.ends[part - 1]) if part else 0)

    def sort_key(self, i: int) -> int:
        """What batches a row with similar ones: its line's length (understanding), its image's shape packed as
        height * 2**32 + width (generation; 0 when unknown)."""
        (_, _, keys), j = self._locate(i)
        return int(keys[j])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int) -> tuple[int, int]:
        (file_index, offsets, _), j = self._locate(i)
        return file_index, int(offsets[j])


@dataclass
class Manifests:
    """Where every usable line of the manifests is, grouped by task; lines are parsed again when used."""
    files: list[Path]
    rows: dict[str, Rows]
    malformed: int = 0


INDEX_FORMAT = 2
# An index file is one int64 array: a header [INDEX_FORMAT, lines per task (TASKS order), malformed lines], then
# the byte offsets of the lines grouped the same way, then their sort keys (Rows.sort_key) in the same order.
HEAD_BYTES = 1 << 20


def index_path(manifest: Path) -> Path:
    """The index next to the manifest; its name carries the manifest's size, mtime and a hash of its first and
    last MiB, so that an edited manifest never reads a stale index."""
    stat = manifest.stat()
    digest = hashlib.sha256(f"{INDEX_FORMAT} {stat.st_size} {stat.st_mtime_ns}".encode())
    with open(manifest, "rb") as f:
        digest.update(f.read(HEAD_BYTES))
        f.seek(max(0, stat.st_size - HEAD_BYTES))
        digest.update(f.read(HEAD_BYTES))
    return manifest.with_name(f"{manifest.name}.index-{digest.hexdigest()[:16]}.npy")


def image_shape_key(row: dict) -> int:
    """height * 2**32 + width of a generation row's image, from the row's own "width" and "height"; 0 without them.

    Reading every image's header instead would cost hours on a 100M-row manifest (~8k rows/s). The shape only sorts
    a global batch so that micro-batches hold few buckets; each image's bucket is taken from the image itself."""
    height, width = row.get("height"), row.get("width")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height * 2 ** 32 + width
    return 0


def scan_manifest(path: Path) -> np.ndarray:
    """Parse every line once: the index array described at INDEX_FORMAT."""
    groups = [array.array("q") for _ in range(len(TASKS) + 1)]  # the last one: malformed lines
    keys = [array.array("q") for _ in groups]
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                    task = task_of(row)
                    key = len(line) if task == "understanding" else image_shape_key(row)
                    group = TASKS.index(task)
                except (ValueError, SkipRow, TypeError, AttributeError):
                    group, key = -1, 0
                groups[group].append(offset)
                keys[group].append(key)
            offset += len(line)
    header = [INDEX_FORMAT, *(len(g) for g in groups)]
    return np.concatenate([np.asarray(header, dtype=np.int64), *(np.frombuffer(g, dtype=np.int64) for g in groups),
                           *(np.frombuffer(k, dtype=np.int64) for k in keys)])


def read_index(path: Path) -> np.ndarray:
    """The manifest's index, memory-mapped: made once (by the first process that needs it) and reused until the
    manifest changes. A folder that cannot be written to only costs the scan."""
    cached = index_path(path)
    if cached.is_file():
        try:
            index = np.load(cached, mmap_mode="r")
            if index.dtype == np.int64 and index.ndim == 1 and index[0] == INDEX_FORMAT \
                    and len(index) == len(TASKS) + 2 + 2 * int(index[1:len(TASKS) + 2].sum()):
                return index
        except (ValueError, OSError):
            pass  # damaged: made again below
    index = scan_manifest(path)
    buffer = io.BytesIO()
    np.save(buffer, index)
    try:
        write_atomic(cached, buffer.getvalue())
    except OSError:
        return index
    for stale in path.parent.glob(f"{glob.escape(path.name)}.index-*.npy"):
        if stale != cached:
            stale.unlink(missing_ok=True)
    return np.load(cached, mmap_mode="r")


def index_manifests(paths: list[Path | str]) -> Manifests:
    """The byte offset and task of each line of the JSONL files (from their index files, made on first use).
    Unparsable lines are counted."""
    files = [Path(p) for p in paths]
    parts: dict[str, list] = {task: [] for task in TASKS}
    malformed = 0
    for file_index, path in enumerate(files):
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        index = read_index(path)
        counts = index[1:len(TASKS) + 2].tolist()
        start, lines = len(TASKS) + 2, sum(counts)
        for task, count in zip(TASKS, counts):
            parts[task].append((file_index, index[start:start + count], index[start + lines:start + lines + count]))
            start += count
        malformed += counts[-1]
    return Manifests(files, {task: Rows(p) for task, p in parts.items()}, malformed)


def read_row(manifests: Manifests, ref: tuple[int, int]) -> tuple[dict, Path]:
    """(parsed row, folder its relative paths start from)."""
    path = manifests.files[ref[0]]
    with open(path, "rb") as f:
        f.seek(ref[1])
        return json.loads(f.readline()), path.parent


# ---------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ---------------------------------------------------------------------------------------------------------------
BUCKET_STEP = 32  # bucket sides: 8x VAE, 2x2 packing, and the edit script's rounding
MAX_BUCKET_RATIO = 4


def bucket_table(resolution: int) -> list[tuple[int, int]]:
    """(height, width) pairs in multiples of 32 with an area near resolution**2, from 1:4 to 4:1: for each short
    side up to `resolution`, the long side that comes closest to the area, in both orientations."""
    area, table = resolution * resolution, set()
    for short in range(BUCKET_STEP, resolution + 1, BUCKET_STEP):
        long = round(area / short / BUCKET_STEP) * BUCKET_STEP
        if long <= MAX_BUCKET_RATIO * short:
            table |= {(short, long), (long, short)}
    return sorted(table)


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The bucket of the closest aspect ratio (in log ratio), so covering it crops as little as possible."""
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - math.log(height / width)), hw))


@dataclass
class DataConfig:
    tokenizer: Tokenizer
    preprocess: PreprocessConfig
    max_length: int  # the model's multimodal_max_length
    resolution: int = 512  # generation targets are resolution x resolution pixels
    drop_prompt: float = 0.1
    drop_image: float = 0.05
    buckets: list[tuple[int, int]] | None = None  # (height, width) of generation images; None: square crops
    # what is the same for every row, made once per process: {key: value}, see `made_once`
    made: dict = field(default_factory=dict, repr=False, compare=False)


def made_once(cfg: DataConfig, key: tuple, make):
    if key not in cfg.made:
        cfg.made[key] = make()
    return cfg.made[key]


def blank_condition(cfg: DataConfig, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, grid_thws) of the blank white condition image of a T2I prompt (and of a dropped edit)."""
    def make():
        encoder_image, _ = condition_images(blank_image(width, height), height, width, cfg.preprocess)
        return preprocess_images([encoder_image], cfg.preprocess)
    return made_once(cfg, ("blank", height, width), make)


def prompt_ids(cfg: DataConfig, prompt: str) -> torch.Tensor:
    """(L,) ids of a generation prompt; the unconditional prompt's are made once."""
    make = lambda: build_input_ids(cfg.tokenizer, prompt, generation_preface=None)[0]  # noqa: E731
    return made_once(cfg, ("ids", prompt), make) if prompt == UNCONDITIONAL_PROMPT else make()


@dataclass
class Frozen:
    """The frozen work of a generation sample, precomputed by `train.py cache`: VAE posteriors and LLM condition."""
    condition: torch.Tensor  # (L, 2*D_llm) the decoder's text condition (model.generation_condition), real positions
    target_mean: torch.Tensor  # (C, H/8, W/8) VAE posterior of the target
    target_logvar: torch.Tensor
    source_mean: torch.Tensor | None = None  # the same of an edit's source image (None: not seen)
    source_logvar: torch.Tensor | None = None


@dataclass
class Example:
    task: str
    input_ids: torch.Tensor | None  # (L,) with the image placeholder ids (None: a cached condition in `frozen`)
    labels: torch.Tensor | None  # (L,) understanding only
    pixel_values: torch.Tensor | None  # (N, C*p*p) encoder patches of the prompt's images
    grid_thws: torch.Tensor | None  # (num_images, 3)
    seed: int  # all randomness of this sample (drops, timestep, noise) derives from it
    target: torch.Tensor | None = None  # (3, H, W) in [-1, 1], the image to generate
    source: torch.Tensor | None = None  # (3, H, W) in [-1, 1], the image being edited (None: not seen)
    frozen: Frozen | None = None  # instead of the images and the prompt, with a cache

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(height, width) of a generation sample's images."""
        if self.frozen is not None:
            return 8 * self.frozen.target_mean.shape[-2], 8 * self.frozen.target_mean.shape[-1]
        return None if self.target is None else tuple(self.target.shape[-2:])


def _image(base: Path, name) -> Image.Image:
    if not isinstance(name, str) or not name:
        raise SkipRow("malformed", f"an image path must be a non-empty string, got {name!r}")
    path = base / name
    if not path.is_file():
        raise SkipRow("missing image", str(path))
    try:
        return load_image(path)
    except ImageError as error:
        raise SkipRow("unreadable image", str(error)) from None
    except Exception as error:  # e.g. PIL's DecompressionBombError: one odd file must not end a long run
        raise SkipRow("unreadable image", f"{path}: {type(error).__name__}: {error}") from None


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SkipRow("malformed", f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _tokenize(cfg: DataConfig, conversation, images: list[Image.Image]):
    """preprocess_inputs with the length check turned into a skip reason."""
    try:
        check_image_count(conversation, len(images))
        input_ids, labels, pixel_values, grid_thws = preprocess_inputs(
            cfg.tokenizer, conversation, images, cfg.preprocess, generation_preface=None)
    except ValueError as error:
        raise SkipRow("malformed", str(error)) from None
    _check_length(cfg, input_ids, grid_thws)
    return input_ids, labels, pixel_values, grid_thws


def _check_length(cfg: DataConfig, input_ids: torch.Tensor, grid_thws: torch.Tensor | None) -> None:
    try:
        check_length(input_ids, grid_thws, cfg.preprocess.hidden_stride, cfg.max_length)
    except ValueError as error:
        raise SkipRow("too long", str(error)) from None


def _generation_example(cfg: DataConfig, task: str, prompt: str, condition: tuple[torch.Tensor, torch.Tensor],
                        seed: int, target: torch.Tensor, source: torch.Tensor | None = None) -> Example:
    """A generation prompt (one `<image>` marker) about the condition image's (pixel_values, grid_thws)."""
    try:
        check_image_count(prompt, 1)  # a caption may itself hold the marker
        input_ids = prompt_ids(cfg, prompt)
    except ValueError as error:
        raise SkipRow("malformed", str(error)) from None
    pixel_values, grid_thws = condition
    _check_length(cfg, input_ids, grid_thws)
    return Example(task, input_ids, None, pixel_values, grid_thws, seed, target=target, source=source)


def understanding_example(row: dict, base: Path, seed: int, cfg: DataConfig) -> Example:
    names = row.get("images", [row["image"]] if "image" in row else [])
    if not isinstance(names, list):
        raise SkipRow("malformed", f"'images' must be a list of paths, got {names!r}")
    images = [_image(base, name) for name in names]
    input_ids, labels, pixel_values, grid_thws = _tokenize(cfg, row["conversations"], images)
    if not (labels != IGNORE_ID).any():
        raise SkipRow("no answer", "the conversation has no assistant turn to learn")
    return Example("understanding", input_ids, labels, pixel_values, grid_thws, seed)


def generation_size(cfg: DataConfig, image: Image.Image) -> tuple[int, int]:
    """(height, width) a generation image is covered and cropped to: its bucket, or the square."""
    if cfg.buckets is None:
        return cfg.resolution, cfg.resolution
    return nearest_bucket(cfg.buckets, image.height, image.width)


def t2i_example(row: dict, base: Path, seed: int, cfg: DataConfig) -> Example:
    caption = _text(row, "caption")
    image = _image(base, row.get("image"))
    height, width = generation_size(cfg, image)
    target = resize_center_crop(image, height, width)
    drop = random.Random(seed).random() < cfg.drop_prompt
    prompt = UNCONDITIONAL_PROMPT if drop else t2i_prompt(caption)
    return _generation_example(cfg, "t2i", prompt, blank_condition(cfg, height, width), seed, target)


def edit_example(row: dict, base: Path, seed: int, cfg: DataConfig) -> Example:
    """Source and target share the source's bucket, as the edit script sizes its output from its input."""
    instruction = _text(row, "instruction")
    source_image = _image(base, row.get("source"))
    height, width = generation_size(cfg, source_image)
    target = resize_center_crop(_image(base, row.get("target")), height, width)
    u = random.Random(seed).random()
    if u < cfg.drop_image:  # the sampler's "no text, no image" branch: blank image, no VAE tokens
        return _generation_example(cfg, "edit", UNCONDITIONAL_PROMPT, blank_condition(cfg, height, width), seed,
                                   target)
    encoder_image, source = condition_images(source_image, height, width, cfg.preprocess)
    prompt = UNCONDITIONAL_PROMPT if u < cfg.drop_image + cfg.drop_prompt else edit_prompt(instruction)
    condition = preprocess_images([encoder_image], cfg.preprocess)
    return _generation_example(cfg, "edit", prompt, condition, seed, target, source)


BUILDERS = {"understanding": understanding_example, "t2i": t2i_example, "edit": edit_example}


def load_example(manifests: Manifests, task: str, ref: tuple[int, int], seed: int, cfg: DataConfig) -> Example:
    try:
        row, base = read_row(manifests, ref)
        return BUILDERS[task](row, base, seed, cfg)
    except SkipRow:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # fields of the wrong type or shape
        raise SkipRow("malformed", f"{type(error).__name__}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------------------------
# The small tensors that lay a Batch out stay on the host (Batch.to); `seeds` seed CPU generators.
HOST_FIELDS = ("input_ids", "attention_mask", "labels", "grid_thws", "seeds", "has_source", "condition_mask")


@dataclass
class Batch:
    task: str
    input_ids: torch.Tensor | None  # (B, L) right-padded with the pad id (None with a cached condition)
    attention_mask: torch.Tensor | None  # (B, L) bool
    labels: torch.Tensor | None  # (B, L), IGNORE_ID on padding
    pixel_values: torch.Tensor | None  # (sum N, C*p*p) all images of the batch, in order
    grid_thws: torch.Tensor | None  # (num_images, 3)
    seeds: torch.Tensor  # (B,) int64, kept on the CPU: they seed CPU generators
    target: torch.Tensor | None = None  # (B, 3, H, W), one bucket
    source: torch.Tensor | None = None  # (B, 3, H, W), zeros where has_source is False
    has_source: torch.Tensor | None = None  # (B,) bool
    # with a cache (Frozen), instead of input_ids .. grid_thws, target and source:
    condition: torch.Tensor | None = None  # (B, L, 2*D_llm) right-padded
    condition_mask: torch.Tensor | None = None  # (B, L) bool
    target_mean: torch.Tensor | None = None  # (B, C, H/8, W/8)
    target_logvar: torch.Tensor | None = None
    source_mean: torch.Tensor | None = None  # zeros where has_source is False
    source_logvar: torch.Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """The batch's data on `device`; its layout (HOST_FIELDS) stays on the host, where the forward pass reads
        sizes and positions from it without waiting for the device, and moves what it computes with itself."""
        moved = {name: value.to(device, non_blocking=non_blocking)
                 if isinstance(value, torch.Tensor) and name not in HOST_FIELDS else value
                 for name, value in self.__dict__.items()}
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        return Batch(**{name: value.pin_memory() if isinstance(value, torch.Tensor) and name not in HOST_FIELDS
                        else value for name, value in self.__dict__.items()})

    @property
    def supervised_tokens(self) -> int:
        """Answer tokens the cross-entropy learns (position i predicts token i+1: the first token never is)."""
        return 0 if self.labels is None else int((self.labels[:, 1:] != IGNORE_ID).sum())

    def __len__(self) -> int:
        return len(self.seeds)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right padding: with causal attention the real tokens then see exactly what they see unpadded."""
    if examples[0].frozen is not None:
        return collate_frozen(examples)
    input_ids = pad_rows([e.input_ids for e in examples], pad_id, left_padding=False)
    attention_mask = pad_rows([torch.ones(len(e.input_ids), dtype=torch.bool) for e in examples], False,
                              left_padding=False)
    labels = None
    if examples[0].labels is not None:
        labels = pad_rows([e.labels for e in examples], IGNORE_ID, left_padding=False)
    with_images = [e for e in examples if e.pixel_values is not None]
    pixel_values = torch.cat([e.pixel_values for e in with_images]) if with_images else None
    grid_thws = torch.cat([e.grid_thws for e in with_images]) if with_images else None
    batch = Batch(examples[0].task, input_ids, attention_mask, labels,
                  pixel_values, grid_thws, torch.tensor([e.seed for e in examples], dtype=torch.long))
    if examples[0].target is not None:
        batch.target = torch.stack([e.target for e in examples])
        batch.has_source = torch.tensor([e.source is not None for e in examples])
        if batch.has_source.any():
            batch.source = torch.stack([e.source if e.source is not None else torch.zeros_like(e.target)
                                        for e in examples])
    return batch


def collate_frozen(examples: list[Example]) -> Batch:
    frozen = [e.frozen for e in examples]
    has_source = torch.tensor([f.source_mean is not None for f in frozen])
    batch = Batch(examples[0].task, None, None, None, None, None, torch.tensor([e.seed for e in examples]),
                  has_source=has_source,
                  condition=pad_rows([f.condition for f in frozen], 0.0, left_padding=False),
                  condition_mask=pad_rows([torch.ones(len(f.condition), dtype=torch.bool) for f in frozen], False,
                                          left_padding=False),
                  target_mean=torch.stack([f.target_mean for f in frozen]),
                  target_logvar=torch.stack([f.target_logvar for f in frozen]))
    if has_source.any():
        zeros = torch.zeros_like(frozen[0].target_mean)
        batch.source_mean = torch.stack([zeros if f.source_mean is None else f.source_mean for f in frozen])
        batch.source_logvar = torch.stack([zeros if f.source_logvar is None else f.source_logvar for f in frozen])
    return batch


# ---------------------------------------------------------------------------------------------------------------
# The global batches: which rows every optimizer step trains on
# ---------------------------------------------------------------------------------------------------------------
def sample_seed(seed: int, task: str, index: int) -> int:
    """A distinct seed per (run seed, task, stream position)."""
    return ((seed * 1_000_003 + TASKS.index(task)) * 1_000_000_007 + index) % (2 ** 63)


@dataclass(frozen=True)
class Draw:
    """One sample of a global batch: the `position`-th sample of `task`'s stream."""
    task: str
    position: int


class TaskStream:
    """The rows of one task in a fresh random order every epoch; position p is the p-th sample of the whole run.

    A row that cannot be used is replaced by the next rows of the same epoch order (attempt 1, 2, ...), and the
    sample keeps its position's seed, so what a position holds never depends on which process loads it. With
    `overfit` n, the stream cycles through the first n rows in order and each row keeps its seed (same noise, same
    timestep, same drops): a debugging mode in which the loss must fall.
    """

    def __init__(self, task: str, rows: Rows, seed: int, overfit: int = 0):
        self.task, self.rows, self.seed = task, rows, seed
        self.overfit = min(overfit, len(rows)) if overfit else 0
        # the orders of the last two epochs used: the loader reads a little ahead of the training loop, so around
        # an epoch's end both are asked for, in turns
        self._orders: dict[int, np.ndarray] = {}

    @property
    def cycle(self) -> int:
        """Rows a position can fall back on: after this many attempts every one of them was tried."""
        return self.overfit or len(self.rows)

    def index(self, position: int, attempt: int = 0) -> int:
        """The row a stream position (attempt > 0: its replacements) holds."""
        if self.overfit:
            return (position % self.overfit + attempt) % self.overfit
        epoch, within = divmod(position, len(self.rows))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.task, -1 - epoch))
            order = torch.randperm(len(self.rows), generator=generator).numpy()
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1 or e == epoch + 1}
            self._orders[epoch] = order.astype(np.int32) if len(order) < 2 ** 31 else order  # half the memory
        return int(self._orders[epoch][(within + attempt) % len(self.rows)])

    def sample_seed(self, position: int) -> int:
        """The seed of a position's sample, whichever row ends up filling it."""
        return sample_seed(self.seed, self.task, position % self.overfit if self.overfit else position)


class Mixture:
    """The run's global batches, the tasks mixed in the given ratios sample by sample.

    The sample with the largest shortfall against its task's share goes next (ratios 2:1:1 give A B C A A B C A
    ..., and the counts never drift); within a global batch the samples are sorted by task, then generation
    samples by their image's aspect ratio (so that a micro-batch mostly holds one bucket) and understanding samples by
    length (so that padding stays small): few micro-batches hold two tasks or shapes. The position (samples so far
    and per task) is the whole state: it is the same on every rank and does not depend on the number of processes
    or on how a global batch is split into micro-batches, so a run resumed on any number of processes trains on the
    very same global batches.
    """

    def __init__(self, manifests: Manifests, ratios: dict[str, float], seed: int = 0, overfit: int = 0):
        ratios = {task: r for task, r in ratios.items() if r > 0}
        empty = [task for task in ratios if len(manifests.rows[task]) == 0]
        if empty or not ratios:
            raise ValueError(f"no {' or '.join(empty) or 'training'} rows in the manifests: add data for these "
                             f"tasks or leave them out of the mix (--mix)")
        self.ratios = {task: r / sum(ratios.values()) for task, r in ratios.items()}
        self.manifests = manifests
        self.streams = {task: TaskStream(task, manifests.rows[task], seed, overfit) for task in self.ratios}
        self.samples = 0
        self.drawn = dict.fromkeys(self.ratios, 0)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)  # over all ranks, as the training loop adds them up

    def advance(self, size: int) -> list[Draw]:
        """The next `size` draws, tasks in the ratios sample by sample; the position moves past them."""
        draws = []
        for _ in range(size):
            task = max(self.ratios, key=lambda t: self.ratios[t] * (self.samples + 1) - self.drawn[t])
            draws.append(Draw(task, self.drawn[task]))
            self.drawn[task] += 1
            self.samples += 1
        return draws

    def next_global_batch(self, size: int) -> list[Draw]:
        """`advance`, grouped by task and ordered by batching key (similar lengths or aspect ratios together)."""
        return sorted(self.advance(size), key=lambda draw: (TASKS.index(draw.task), self.batching_key(draw)))

    def batching_key(self, draw: Draw) -> float:
        stream = self.streams[draw.task]
        key = stream.rows.sort_key(stream.index(draw.position))
        if draw.task == "understanding":
            return key
        height, width = divmod(key, 2 ** 32)
        return math.log(width / height) if key else 0.0  # buckets are intervals of the log aspect ratio

    def clone(self) -> "Mixture":
        """The same streams at the same position, advanced on its own."""
        other = copy.copy(self)
        other.drawn, other.skipped = dict(self.drawn), dict(self.skipped)
        return other

    def add_skipped(self, counts: dict[str, int]) -> dict[str, int]:
        """Add one step's skips of all ranks; returns the run's totals so far."""
        for reason, n in counts.items():
            self.skipped[reason] += n
        return dict(self.skipped)

    def state_dict(self) -> dict:
        return {"samples": self.samples, "drawn": dict(self.drawn), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if "samples" not in state:
            raise DataError("the checkpoint holds a per-process data position of an older train.py, which this one "
                            "cannot continue exactly; start a new run with --init from that checkpoint")
        self.samples = state["samples"]
        self.drawn.update({t: n for t, n in state["drawn"].items() if t in self.drawn})
        self.skipped.update(state["skipped"])


def rank_share(draws: list[Draw], micro_batch: int, rank: int, world: int) -> list[list[Draw]]:
    """This rank's micro-batches of a global batch: micro-batch j of rank r holds samples (j*world + r)*m .. +m."""
    chunks = [draws[i:i + micro_batch] for i in range(0, len(draws), micro_batch)]
    return chunks[rank::world]


# ---------------------------------------------------------------------------------------------------------------
# Loading: DataLoader worker processes turn a rank's micro-batches into tensors
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """One forward pass of one rank: a Batch per task it holds (in TASKS order), and what loading it skipped."""
    parts: list[Batch]
    skipped: dict[str, int]
    error: str | None = None  # the data cannot feed a task: raised as DataError by the training process

    def to(self, device: torch.device, non_blocking: bool = False) -> "MicroBatch":
        return MicroBatch([part.to(device, non_blocking) for part in self.parts], self.skipped, self.error)

    def pin_memory(self) -> "MicroBatch":
        return MicroBatch([part.pin_memory() for part in self.parts], self.skipped, self.error)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)


class MicroBatchData(torch.utils.data.Dataset):
    """Indexed by a list of Draws (a micro-batch): loads, replaces bad rows, collates per task."""

    def __init__(self, mixture: Mixture, cfg: DataConfig, cache=None):
        """cache: a frozen_cache.FrozenCache whose precomputed generation samples replace the rows' images."""
        self.manifests, self.streams, self.cfg, self.cache = mixture.manifests, mixture.streams, cfg, cache
        self.warned = dict.fromkeys(SKIP_REASONS, 0)  # per process: each worker warns on its own

    def example(self, draw: Draw, skipped: dict[str, int]) -> Example:
        stream = self.streams[draw.task]
        for attempt in range(min(stream.cycle, MAX_ATTEMPTS)):
            index, seed = stream.index(draw.position, attempt), stream.sample_seed(draw.position)
            try:
                if self.cache is not None and draw.task != "understanding":
                    return self.cache.example(draw.task, index, seed, self.cfg)
                return load_example(self.manifests, draw.task, stream.rows[index], seed, self.cfg)
            except SkipRow as skip:
                skipped[skip.reason] += 1
                self.warned[skip.reason] += 1
                if self.warned[skip.reason] <= MAX_WARNINGS:
                    more = "; more of these are only counted" if self.warned[skip.reason] == MAX_WARNINGS else ""
                    print(f"skipping a {draw.task} row ({skip}){more}", file=sys.stderr)
        if stream.cycle > MAX_ATTEMPTS:
            raise DataError(f"{MAX_ATTEMPTS} {draw.task} rows in a row could not be used; see the messages above")
        reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items() if n)
        raise DataError(f"none of the {stream.cycle} {draw.task} rows can be used (skipped: {reasons}); fix the "
                        "manifest as the messages above say, or leave the task out of --mix")

    def __getitem__(self, draws: list[Draw]) -> MicroBatch:
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        try:
            examples = [self.example(draw, skipped) for draw in draws]
        except DataError as error:  # a message, not a worker's traceback
            return MicroBatch([], skipped, str(error))
        # one Batch per task and image shape (a replacement row may fall in another bucket than the planned one)
        groups: dict[tuple, list[Example]] = {}
        for example in examples:
            groups.setdefault((TASKS.index(example.task), example.image_shape), []).append(example)
        pad_id = self.cfg.tokenizer.pad_token_id
        return MicroBatch([collate(groups[key], pad_id) for key in sorted(groups, key=lambda k: (k[0], k[1] or ()))],
                          skipped)

    def placeholder(self, kind: str) -> Batch:
        """A one-sample Batch of `kind` ("understanding" or "generation": what its pass runs) for the zero-weight
        passes that keep FSDP ranks in step (accumulation.backward_window): the first sample of the mix's first task
        of that kind, loaded once per process."""
        task = next(task for task in self.streams if (task == "understanding") == (kind == "understanding"))
        make = lambda: collate([self.example(Draw(task, 0), dict.fromkeys(SKIP_REASONS, 0))],  # noqa: E731
                               self.cfg.tokenizer.pad_token_id)
        return made_once(self.cfg, ("placeholder", task), make)


class RankSampler(torch.utils.data.Sampler):
    """This rank's micro-batches, step after step, from the mixture's position when the loader started."""

    def __init__(self, mixture: Mixture, batch: int, micro_batch: int, rank: int, world: int):
        self.mixture, self.batch, self.micro_batch, self.rank, self.world = mixture, batch, micro_batch, rank, world

    def __iter__(self):
        plan = self.mixture.clone()  # the training loop advances the original as it consumes steps
        while True:
            yield from rank_share(plan.next_global_batch(self.batch), self.micro_batch, self.rank, self.world)


def unchanged(item):
    return item


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's first act: it ignores SIGTERM, SIGUSR1 and SIGINT. Schedulers signal every process of
    a job (Slurm the whole step, a terminal's Ctrl-C the whole process group), and a worker dying of it would fail
    the step the training process is finishing; stopping is the training process's decision, which shuts its
    workers down (and a worker whose training process is gone exits by itself)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Loader:
    """The micro-batches of one rank, loaded ahead by `workers` processes (0: in the training process)."""

    def __init__(self, mixture: Mixture, data: MicroBatchData, batch: int, micro_batch: int, rank: int,
                 world: int, workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, sampler=RankSampler(mixture, batch, micro_batch, rank,
                                                                              world),
            num_workers=workers, collate_fn=unchanged, pin_memory=pin_memory,
            prefetch_factor=prefetch if workers else None, worker_init_fn=ignore_stop_signals if workers else None)
        self._iterator = iter(loader)

    def __next__(self) -> MicroBatch:
        micro = next(self._iterator)
        if micro.error:
            raise DataError(micro.error)
        return micro

    def close(self) -> None:
        self._iterator = None  # shuts the worker processes down


def parse_mix(text: str) -> dict[str, float]:
    """"understanding=2,t2i=1,edit=1" -> {"understanding": 2.0, ...}."""
    ratios = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in TASKS or not value:
            raise ValueError(f"--mix takes task=ratio pairs with tasks from {TASKS}, got {part!r}")
        ratios[name] = float(value)
        if not math.isfinite(ratios[name]) or ratios[name] < 0:
            raise ValueError(f"--mix ratio of {name} must be a non-negative number, got {value}")
    return ratios
