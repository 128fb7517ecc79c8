"""The official Ovis-U1-3B checkpoint: where its tensors go, how to read, check and write it strictly and safely.

The checkpoint is read as published (Hugging Face `AIDC-AI/Ovis-U1-3B`, mirrored as `ATH-MaaS/Ovis-U1-3B`):
`config.json`, `model.safetensors.index.json` with its shards (or one `model.safetensors`), the tokenizer
(`tokenizer.json`, or the slow files `vocab.json`, `merges.txt`, `tokenizer_config.json`, ...) and
`preprocessor_config.json`. There is no conversion step: ovis-min's module attributes are named so that
`OvisU1.state_dict()` keys are the official tensor names, and the table below says which file of ovis-min each
official name lands in.

Safety: only safetensors are read (never a pickle), shard names from an index may not leave the checkpoint
directory, and the Python files the official repository ships for `trust_remote_code` are neither downloaded
nor run. Finding a checkpoint (a directory, a training run, a hub id) and downloading one is ovis_min/hub.py's.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, OvisConfig, from_official, preprocess_from_official
from .files import default_mode, read_json, temp_prefix, write_atomic
from .model import OvisU1
from .prompt import (SLOW_TOKENIZER_EXTRAS, SLOW_TOKENIZER_FILES, TOKENIZER_FILE, Tokenizer, TokenizerError,
                     TokenizerNotFound, missing_tokenizer_files)

HUB_IDS = ("AIDC-AI/Ovis-U1-3B", "ATH-MaaS/Ovis-U1-3B")  # the same files under the team's old and new names
DEFAULT_REPO = HUB_IDS[0]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LATEST_FILE = "latest"  # in a train.py run directory: the name of its newest step-NNNNNNNN checkpoint
TRAINER_FILE = "trainer.pt"  # in a train.py step directory: what marks it as one
PREPROCESSOR_FILE = "preprocessor_config.json"
REQUIRED_FILES = (CONFIG_FILE, PREPROCESSOR_FILE)  # plus the weights, plus a tokenizer in either form
# The tokenizer in its two forms (one of them must be complete) and the side files other tools may want.
OPTIONAL_FILES = (TOKENIZER_FILE, *SLOW_TOKENIZER_FILES, *SLOW_TOKENIZER_EXTRAS, "generation_config.json")

# Where each official tensor name lands in ovis-min. The key map is the identity: the official name *is* the
# state_dict key, so this table is for readers and porters; it also groups parameters as the report's Table 1
# counts them. The first matching prefix wins (the refiner `txt_in` lives inside the decoder's namespace).
#
#   official prefix                       ovis-min file  module (attribute path = prefix)  Table 1 row
OFFICIAL_NAMES = (
    ("llm.model.",                        "llm.py",      "Qwen3.model",                    "LLM"),
    ("llm.lm_head.",                      "llm.py",      "Qwen3.lm_head (tied, optional)", "LLM"),
    ("visual_tokenizer.backbone.",        "vit.py",      "VisionEncoder",                  "Visual encoder"),
    ("visual_tokenizer.head.",            "adapter.py",  "VisualHead",                     "Visual encoder"),
    ("vte.",                              "adapter.py",  "VisualEmbedding",                "Adapter"),
    ("visual_generator.backbone.txt_in.", "refiner.py",  "TokenRefiner",                   "Refiner"),
    ("visual_generator.backbone.",        "mmdit.py",    "MMDiT",                          "Vision decoder"),
    ("visual_generator.vae.",             "vae.py",      "AutoencoderKL",                  "VAE"),
)
TABLE1_ROWS = ("LLM", "Visual encoder", "Adapter", "Vision decoder", "Refiner", "VAE")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}



class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is. The message names the file and what to do."""


def official_part(name: str) -> tuple[str, str, str, str]:
    """The row of OFFICIAL_NAMES that tensor `name` belongs to."""
    for row in OFFICIAL_NAMES:
        if name.startswith(row[0]):
            return row
    raise KeyError(f"{name} is not an Ovis-U1 tensor name (see OFFICIAL_NAMES in ovis_min/checkpoint.py)")


def table1_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per Table 1 row of the report (tied weights counted once), plus "Total"."""
    counts = dict.fromkeys(TABLE1_ROWS, 0)
    for name, param in model.named_parameters():  # named_parameters() lists a tied Parameter once
        counts[official_part(name)[3]] += param.numel()
    counts["Total"] = sum(counts.values())
    return counts


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{row} {count / 1e6:.2f}M" if count >= 100_000 else f"{row} {count:,}"
                     for row, count in counts.items())


def download_hint(directory: Path | str | None = None) -> str:
    target = f" --dir {directory}" if directory is not None else ""
    return f"get the official weights with: python weights.py download {DEFAULT_REPO}{target}"


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# ---------------------------------------------------------------------------------------------------------------

class TensorInfo(NamedTuple):
    file: str  # shard file name, relative to the checkpoint directory
    dtype: str  # safetensors dtype name: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return SAFETENSORS_DTYPES[self.dtype].itemsize * _numel(self.shape)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


@dataclass
class Checkpoint:
    """The weights of a checkpoint directory, known from the safetensors headers alone (no tensor is read)."""
    directory: Path
    files: list[str]  # shard names, in index order
    tensors: dict[str, TensorInfo]
    total_bytes: int  # sum of the shards' tensor data
    index_total_size: int | None = None  # what the index claims, when it has one

    def names_in(self, file: str) -> list[str]:
        return [name for name, info in self.tensors.items() if info.file == file]

    def columns(self) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
        """Shapes, dtypes and files by tensor name: what `match` compares."""
        return ({name: info.shape for name, info in self.tensors.items()},
                {name: info.dtype for name, info in self.tensors.items()},
                {name: info.file for name, info in self.tensors.items()})


def safe_shard_name(name: object, index_path: Path) -> str:
    """`name` if it is a plain relative path below the checkpoint directory, else an error.

    The check is on the name itself, not on the resolved path: in the Hugging Face cache the shards are
    symlinks into a blobs/ folder, which is fine, while `../x` or `/x` in an index is never fine.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts or "" in parts:
        raise CheckpointError(f"{index_path}: refusing shard name {name!r}: shards must lie inside the checkpoint "
                              "directory (no absolute paths, no '..')")
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{index_path}: refusing shard {name!r}: only .safetensors files are read")
    return name


def read_index(directory: Path) -> tuple[dict[str, str], int | None]:
    """The weight map of `model.safetensors.index.json` (tensor name -> shard name) and its total_size."""
    path = directory / INDEX_FILE
    fix = "delete it and download the checkpoint again"
    index = read_json(path, dict, CheckpointError, fix)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: not a valid index (expected a JSON object with a non-empty 'weight_map' of "
                              f"tensor name -> shard file); {fix}")
    for shard in weight_map.values():
        safe_shard_name(shard, path)
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: 'metadata' is not an object; {fix}")
    total_size = metadata.get("total_size")
    if total_size is not None and (isinstance(total_size, bool) or not isinstance(total_size, (int, float))
                                   or total_size < 0 or total_size != int(total_size)):
        raise CheckpointError(f"{path}: metadata.total_size {total_size!r} is not a byte count; {fix}")
    return weight_map, int(total_size) if total_size is not None else None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file (dtype and shape), read by the safetensors package, which checks that
    the header is well formed and that the tensor data covers the file exactly (truncated or over-long files fail).
    """
    if not path.is_file():
        raise CheckpointError(f"missing shard {path}; {download_hint(path.parent)}")
    fix = "delete it and download it again"
    tensors = {}
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                dtype = part.get_dtype()
                if dtype not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which torch cannot hold; {fix}")
                tensors[name] = TensorInfo(path.name, dtype, tuple(part.get_shape()))
    except (SafetensorError, OSError) as error:
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes; {error}); it is truncated or "
                              f"corrupt: {fix}") from None
    return tensors


def open_checkpoint(directory: Path | str) -> Checkpoint:
    """List every tensor of a checkpoint directory with its shard, dtype and shape, checking the files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}; {download_hint(directory)}")
    index_total_size = None
    if (directory / INDEX_FILE).is_file():
        weight_map, index_total_size = read_index(directory)
        files = list(dict.fromkeys(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"no weights in {directory}: expected {INDEX_FILE} with its shards, or "
                              f"{SINGLE_FILE}; {download_hint(directory)}")
    missing = [file for file in files if not (directory / file).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} of {len(files)} shards named by {INDEX_FILE} are "
                              f"missing: {few_names(missing)}; {download_hint(directory)}")

    tensors, total_bytes = {}, 0
    for file in files:
        for name, info in read_safetensors_header(directory / file).items():
            info = info._replace(file=file)
            if name in tensors:
                raise CheckpointError(f"{directory}: tensor {name} is stored twice ({tensors[name].file}, {file})")
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(f"{directory / INDEX_FILE}: tensor {name} is in {file} but the index says "
                                      f"{weight_map.get(name)}; the index and the shards do not belong together")
            tensors[name] = info
            total_bytes += info.nbytes
    if weight_map is not None and len(weight_map) != len(tensors):
        lost = [name for name in weight_map if name not in tensors]
        raise CheckpointError(f"{directory / INDEX_FILE}: {len(lost)} indexed tensors are in none of the shards: "
                              f"{few_names(lost)}")
    return Checkpoint(directory, files, tensors, total_bytes, index_total_size)


def _read_json_object(path: Path) -> dict:
    return read_json(path, dict, CheckpointError, "fix it or download the checkpoint again")


def read_config(directory: Path | str) -> OvisConfig:
    """The model configuration of a checkpoint: config.json with preprocessor_config.json, both checked."""
    directory = Path(directory)
    path, pre_path = directory / CONFIG_FILE, directory / PREPROCESSOR_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}: not a checkpoint directory (nor a train.py run "
                              f"directory); {download_hint(directory)}")
    if not pre_path.is_file():
        # defaults would be a guess at how images are cut up; the official code refuses to run without it too
        raise CheckpointError(f"no {PREPROCESSOR_FILE} in {directory} (the image preprocessing settings); "
                              f"{download_hint(directory)}")
    config, preprocessor = _read_json_object(path), _read_json_object(pre_path)
    try:
        preprocess = preprocess_from_official(preprocessor)
    except ConfigError as error:
        raise CheckpointError(f"{pre_path}: {error}; fix it or download the checkpoint again") from None
    try:
        result = from_official(config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}; fix it or download the checkpoint again") from None
    # The encoder's patch embedding is shaped by config.json (and checked against the weights); images cut up
    # by other numbers would reach it as rows of the wrong length.
    for name, block in (("patch_size", result.vit), ("temporal_patch_size", result.vit),
                        ("hidden_stride", result.adapter)):
        if getattr(preprocess, name) != getattr(block, name):
            raise CheckpointError(f"{pre_path}: {name} {getattr(preprocess, name)} disagrees with {CONFIG_FILE}'s "
                                  f"{getattr(block, name)} (the visual encoder's weights are shaped by it); fix it "
                                  "or download the checkpoint again")
    result.preprocess = preprocess
    return result


def read_tokenizer(directory: Path) -> Tokenizer:
    """The checkpoint's tokenizer, as the pipeline uses it (its special tokens there too); CheckpointError when it
    cannot be read."""
    try:
        return Tokenizer(directory)
    except (TokenizerError, TokenizerNotFound) as error:
        raise CheckpointError(f"{error}; {download_hint(directory)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Strict matching and loading
# ---------------------------------------------------------------------------------------------------------------

def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one Parameter, e.g. [["llm.model.embed_tokens.weight", "llm.lm_head.weight"]]."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


@dataclass
class Mismatch:
    """What keeps a checkpoint from filling a model exactly."""
    missing: list[str] = field(default_factory=list)  # parameters the checkpoint does not fill
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors the model has no place for
    wrong_shape: list[str] = field(default_factory=list)  # "name: checkpoint (a, b) vs model (c, d)"
    wrong_dtype: list[str] = field(default_factory=list)  # integer data for a float parameter, or the reverse

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def describe(self) -> str:
        parts = []
        for what, names in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrong shape", self.wrong_shape), ("wrong dtype", self.wrong_dtype)):
            if names:
                parts.append(f"{len(names)} {what}: {few_names(names)}")
        return "; ".join(parts)


def match(model: nn.Module, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None,
          files: dict[str, str] | None = None) -> tuple[Mismatch, dict[str, str]]:
    """Compare checkpoint tensor shapes (and safetensors dtype names, if given) with the model's state dict.
    With `files` (tensor name -> shard), reported tensors say which file holds them.

    Returns the mismatch and the tied names to fill from another tensor ({alias: source}): of names sharing one
    Parameter, the checkpoint needs only one (a checkpoint saved from a tied model may omit `llm.lm_head.weight`).
    """
    expected = model.state_dict(keep_vars=True)
    mismatch, aliases = Mismatch(), {}
    where = (lambda name: f" [{files[name]}]") if files else (lambda name: "")
    for group in tied_groups(model):
        present = [name for name in group if name in shapes]
        source = present[0] if present else group[0]
        aliases.update({name: source for name in group if name != source})
    for name, tensor in expected.items():
        if name not in shapes:
            if name not in aliases:
                mismatch.missing.append(name)
        elif tuple(shapes[name]) != tuple(tensor.shape):
            mismatch.wrong_shape.append(f"{name}: checkpoint {tuple(shapes[name])} vs model {tuple(tensor.shape)}"
                                        + where(name))
        elif dtypes and SAFETENSORS_DTYPES[dtypes[name]].is_floating_point != tensor.is_floating_point():
            mismatch.wrong_dtype.append(f"{name}: checkpoint {dtypes[name]} vs model {tensor.dtype}" + where(name))
    mismatch.unexpected = [name + where(name) for name in shapes if name not in expected]
    return mismatch, aliases


def load_checkpoint(model: nn.Module, source: "Path | str | Checkpoint", dtype: torch.dtype | None = torch.bfloat16,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Fill `model` (built on the meta device) from a checkpoint directory (or its `open_checkpoint` listing),
    strictly, one shard at a time.

    Every tensor is read from its shard straight into `dtype` on `device` and becomes the parameter itself
    (`assign=True`), so the weights exist once, never twice. Floating tensors are cast (dtype None: none is);
    others keep their dtype.
    """
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    mismatch, aliases = match(model, *checkpoint.columns())
    if mismatch:
        raise CheckpointError(f"{checkpoint.directory} does not fit the model: {mismatch.describe()}")

    def wanted(info: TensorInfo) -> torch.dtype:
        stored = SAFETENSORS_DTYPES[info.dtype]
        return dtype if stored.is_floating_point and dtype is not None else stored

    # safe_open maps each shard: a tensor kept in its stored dtype on the CPU is the mapped file itself (pages are
    # read when first used, and stay reclaimable page cache until written); one that is cast or moved is read
    # once into its new place. Either way the weights exist once in process memory, never twice.
    stored_aliases = {}
    for file in checkpoint.files:
        try:
            with safe_open(checkpoint.directory / file, framework="pt", device="cpu") as shard:
                state = {}
                for name in checkpoint.names_in(file):
                    tensor = shard.get_tensor(name)
                    if name in aliases:
                        stored_aliases[name] = tensor
                    else:
                        state[name] = tensor.to(device, wanted(checkpoint.tensors[name]))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{checkpoint.directory / file}: cannot be read ({error}); the file changed or "
                                  "is damaged: delete it and download it again") from None
        result = model.load_state_dict(state, strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys  # ruled out by match() above
        del state

    # assign=True replaced the source Parameter; point its aliases (lm_head) at the new one again
    for alias, source in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
        if alias in stored_aliases:  # stored as well: it must really be the same matrix
            stored = stored_aliases.pop(alias).to(model.get_parameter(source).device,
                                                  model.get_parameter(source).dtype)
            if not torch.equal(stored, model.get_parameter(source).data):
                raise CheckpointError(f"{checkpoint.directory}: {alias} differs from {source}, but the model ties "
                                      "them (tie_word_embeddings); this checkpoint is not for a tied model")
    unfilled = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise CheckpointError(f"after loading, {len(unfilled)} tensors are still unset: {few_names(unfilled)}; a "
                              "module must not create tensors outside its state dict in __init__ (they stay on meta)")
    return model


def build_model(config: OvisConfig) -> OvisU1:
    """OvisU1 on the meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return OvisU1(config)


class Loaded(NamedTuple):
    model: OvisU1  # in eval mode
    config: OvisConfig
    directory: Path  # holds the tokenizer and preprocessor_config.json
    tokenizer: Tokenizer


def load_model(directory: Path | str, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> Loaded:
    """The official model from a checkpoint directory (`hub.resolve_source` finds one for a hub id). Everything
    is checked before the weights are read: the files, the configs and the tokenizer."""
    directory = Path(directory)
    missing = missing_files(directory, with_shards=False)  # the shards: open_checkpoint, from the one index read
    if missing and (directory / TRAINER_FILE).is_file():
        raise CheckpointError(f"{directory} is a training checkpoint without the weights in the official layout "
                              f"(only the last step of a run has them); write them with: python train.py export "
                              f"{directory} --out DIR, and pass --weights DIR")
    if missing:
        raise CheckpointError(f"{directory}: missing {', '.join(missing)}; {download_hint(directory)}")
    checkpoint = open_checkpoint(directory)
    config = read_config(directory)
    tokenizer = read_tokenizer(directory)
    model = load_checkpoint(build_model(config), checkpoint, dtype=dtype, device=device)
    return Loaded(model.eval(), config, directory, tokenizer)


def missing_files(directory: Path, with_shards: bool = True) -> list[str]:
    """What a checkpoint directory lacks: config, preprocessor config, a tokenizer in either form, the weights
    (the index and, `with_shards`, every shard it names; or model.safetensors). [] when complete."""
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    missing += missing_tokenizer_files(directory)
    if (directory / INDEX_FILE).is_file():
        if not with_shards:
            return missing
        try:
            shards = dict.fromkeys(read_index(directory)[0].values())
        except CheckpointError:
            return missing  # a damaged index is reported by open_checkpoint with its own message
        missing += [shard for shard in shards if not (directory / shard).is_file()]
    elif not (directory / SINGLE_FILE).is_file():
        missing.append(f"{INDEX_FILE} (or {SINGLE_FILE})")
    return missing


def check_checkpoint(directory: Path | str) -> list[str]:
    """Verify a checkpoint directory without reading its tensor data: files, config, tokenizer, and every name,
    shape and file size against the model its config.json describes. Returns a short report; raises
    CheckpointError naming the first problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}; {download_hint(directory)}")
    missing = missing_files(directory)
    if missing:
        raise CheckpointError(f"{directory}: missing {', '.join(missing)} (a tokenizer is {TOKENIZER_FILE}, or "
                              f"{', '.join(SLOW_TOKENIZER_FILES)}); {download_hint(directory)}")
    lines = [f"checkpoint {directory}"]

    def row(what: str, detail: str):
        lines.append(f"  {what:<26} ok   {detail}")

    config = read_config(directory)
    row(CONFIG_FILE, f"LLM {config.llm.num_layers} layers x {config.llm.hidden_size}, encoder {config.vit.num_layers} "
                     f"x {config.vit.hidden_size}, decoder {config.mmdit.depth}+{config.mmdit.depth_single_blocks} "
                     f"blocks x {config.mmdit.hidden_size}, visual vocab {config.adapter.visual_vocab_size}")
    vocab = len(read_tokenizer(directory))
    form = TOKENIZER_FILE if (directory / TOKENIZER_FILE).is_file() else "slow tokenizer files"
    if vocab > config.llm.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer ({form}) has {vocab} tokens, more than the LLM's "
                              f"vocab_size {config.llm.vocab_size} in {CONFIG_FILE}")
    row("tokenizer", f"{form}, {vocab} tokens (embedding rows: {config.llm.vocab_size})")
    pre = config.preprocess
    row(PREPROCESSOR_FILE, f"patch {pre.patch_size}, stride {pre.hidden_stride}, "
                           f"pixels {pre.min_pixels}..{pre.max_pixels}")

    checkpoint = open_checkpoint(directory)
    dtypes = sorted({info.dtype for info in checkpoint.tensors.values()})
    files = checkpoint.files[0] if len(checkpoint.files) == 1 else f"{len(checkpoint.files)} shards + {INDEX_FILE}"
    row("weights", f"{files}, {len(checkpoint.tensors)} tensors, {checkpoint.total_bytes / 1e6:.1f} MB, "
                   f"{'/'.join(dtypes)}; every file as long as its header says")
    if checkpoint.index_total_size is not None and checkpoint.index_total_size != checkpoint.total_bytes:
        lines.append(f"  note: {INDEX_FILE} says total_size {checkpoint.index_total_size}, the shards hold "
                     f"{checkpoint.total_bytes} bytes of tensors")

    model = build_model(config)
    mismatch, aliases = match(model, *checkpoint.columns())
    if mismatch:
        raise CheckpointError(f"{directory} does not fit the model built from its {CONFIG_FILE}: {mismatch.describe()}")
    absent = [f"{alias} (tied to {source})" for alias, source in aliases.items() if alias not in checkpoint.tensors]
    row("names and shapes", "every parameter filled, every tensor used" + (f"; absent: {', '.join(absent)}"
                                                                                if absent else ""))
    lines.append("  parameters (report's Table 1 rows): " + format_counts(table1_counts(model)))
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Writing tensors in the official layout (train.py's checkpoints; tiny.py's random ones)
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict[str, torch.Tensor], directory: Path | str, shards: int = 1) -> list[str]:
    """Write tensors as Hugging Face does: one model.safetensors, or N shards plus model.safetensors.index.json.

    Shards are contiguous runs of `state` in order, of about equal byte size. Returns the file names.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    shards = max(1, min(shards, len(names)))
    groups: list[list[str]] = [[]]
    written = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        shards_left, names_left = shards - len(groups), len(names) - i
        # next shard once this one holds its share of the bytes, or when every remaining shard needs a tensor
        if groups[-1] and shards_left and (written >= total * len(groups) / shards or names_left == shards_left):
            groups.append([])
        groups[-1].append(name)
        written += size
    files = [SINGLE_FILE] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for file, group in zip(files, groups):
        # written under a temporary name and renamed, as files.write_atomic does, without a copy in memory
        temp = directory / f"{temp_prefix()}{file}.part"  # the next run removes it if this process is killed
        try:
            save_file({n: state[n].contiguous() for n in group}, str(temp), metadata={"format": "pt"})
            os.chmod(temp, default_mode())  # safetensors creates the file private to its owner
            os.replace(temp, directory / file)
        finally:
            temp.unlink(missing_ok=True)
    if shards > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: files[i] for i, group in enumerate(groups) for n in sorted(group)}}
        write_atomic(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def few_names(names: list[str], n: int = 5) -> str:
    """The first few names and how many more: error messages stay readable for a 1000-tensor model."""
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")
