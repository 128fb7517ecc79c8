"""The official Ovis-U1-3B checkpoint: where its tensors go, how to read it strictly and safely, how to fetch it.

The checkpoint is read as published (Hugging Face `AIDC-AI/Ovis-U1-3B`, mirrored as `ATH-MaaS/Ovis-U1-3B`):
`config.json`, `model.safetensors.index.json` with its shards (or one `model.safetensors`), `tokenizer.json` and
`preprocessor_config.json`. There is no conversion step: ovis-min's module attributes are named so that
`OvisU1.state_dict()` keys are the official tensor names, and the table below says which file of ovis-min each
official name lands in.

Safety: only safetensors are read (never a pickle), shard names from an index may not leave the checkpoint
directory, and the Python files the official repository ships for `trust_remote_code` are neither downloaded
nor run. Downloading uses the standard library only.
"""
import http.client
import json
import math
import os
import re
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from .config import OvisConfig, from_official
from .model import OvisU1

HUB_IDS = ("AIDC-AI/Ovis-U1-3B", "ATH-MaaS/Ovis-U1-3B")  # the same files under the team's old and new names
DEFAULT_REPO = HUB_IDS[0]
DEFAULT_ENDPOINT = "https://huggingface.co"

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LATEST_FILE = "latest"  # in a train.py run directory: the name of its newest step-NNNNNNNN checkpoint
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
REQUIRED_FILES = (CONFIG_FILE, TOKENIZER_FILE, PREPROCESSOR_FILE)  # plus the weights
# Hugging Face tokenizer side files: ovis-min does not need them, other tools may. Missing ones are fine.
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                  "merges.txt", "generation_config.json")

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
    start: int  # byte range of the data within the file
    end: int


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
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and weight_map
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        raise CheckpointError(f"{path}: not a valid index (expected a JSON object with a non-empty "
                              f"'weight_map'): {error}") from None
    for tensor_name, shard in weight_map.items():
        safe_shard_name(shard, path)
    total_size = (index.get("metadata") or {}).get("total_size")
    return weight_map, int(total_size) if total_size is not None else None


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking that the file is exactly as long as it says.

    A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensor bytes; the last
    tensor's end offset therefore fixes the file size, which catches truncated and over-long downloads.
    Returned offsets are made absolute (from the start of the file).
    """
    if not path.is_file():
        raise CheckpointError(f"missing shard {path}; {download_hint(path.parent)}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < header_len <= min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: not a safetensors file, or truncated ({size} bytes); delete it and "
                                  "download it again")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CheckpointError(f"{path}: corrupt safetensors header; delete it and download it again") from None
    header.pop("__metadata__", None)
    try:
        for name, info in header.items():
            start, end = (8 + header_len + offset for offset in info["data_offsets"])
            numel = math.prod(info["shape"])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]  # KeyError for a dtype torch cannot hold
            if end - start != numel * dtype.itemsize:
                raise ValueError(f"{name}: {info['dtype']} {info['shape']} in {end - start} bytes")
            info["data_offsets"] = (start, end)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt safetensors header ({error!r}); delete it and download it "
                              "again") from None
    data_end = max((info["data_offsets"][1] for info in header.values()), default=8 + header_len)
    if size != data_end:
        raise CheckpointError(f"{path}: {size} bytes on disk but its header describes {data_end} (truncated or "
                              "corrupt download); delete it and download it again")
    return header


def read_tensor(path: Path, info: TensorInfo, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of a safetensors file in its stored dtype, read into a fresh CPU tensor or into `buffer`
    (uint8, at least as large; the result is then a view of it).

    Plain reads rather than a memory map: a mapped shard would count in the process's memory next to the tensors
    made from it, i.e. two copies at the peak.
    """
    nbytes = info.end - info.start
    data = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
    with open(path, "rb") as f:
        f.seek(info.start)
        if f.readinto(data.numpy()) != len(data):
            raise CheckpointError(f"{path}: ended inside tensor data; the file changed while it was read")
    return data.view(SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)


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
                              f"missing: {_few(missing)}; {download_hint(directory)}")

    tensors, total_bytes = {}, 0
    for file in files:
        for name, info in read_safetensors_header(directory / file).items():
            if name in tensors:
                raise CheckpointError(f"{directory}: tensor {name} is stored twice ({tensors[name].file}, {file})")
            if weight_map is not None and weight_map.get(name) != file:
                raise CheckpointError(f"{directory / INDEX_FILE}: tensor {name} is in {file} but the index says "
                                      f"{weight_map.get(name)}; the index and the shards do not belong together")
            start, end = info["data_offsets"]
            tensors[name] = TensorInfo(file, info["dtype"], tuple(info["shape"]), start, end)
            total_bytes += end - start
    if weight_map is not None and len(weight_map) != len(tensors):
        lost = [name for name in weight_map if name not in tensors]
        raise CheckpointError(f"{directory / INDEX_FILE}: {len(lost)} indexed tensors are in none of the shards: "
                              f"{_few(lost)}")
    return Checkpoint(directory, files, tensors, total_bytes, index_total_size)


def read_config(directory: Path | str) -> OvisConfig:
    """The model configuration of a checkpoint: config.json, with preprocessor_config.json when present."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}: not a checkpoint directory (nor a train.py run "
                              f"directory); {download_hint(directory)}")
    try:
        config = json.loads(path.read_text())
        pre_path = directory / PREPROCESSOR_FILE
        preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
        return from_official(config, preprocessor)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not an Ovis-U1 config ({type(error).__name__}: {error})") from None


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
                parts.append(f"{len(names)} {what}: {_few(names)}")
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


def load_checkpoint(model: nn.Module, directory: Path | str, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Fill `model` (built on the meta device) from a checkpoint directory, strictly, one shard at a time.

    Every tensor is read from its shard straight into `dtype` on `device` and becomes the parameter itself
    (`assign=True`), so the weights exist once, never twice. Floating tensors are cast; others keep their dtype.
    """
    checkpoint = open_checkpoint(directory)
    mismatch, aliases = match(model, *checkpoint.columns())
    if mismatch:
        raise CheckpointError(f"{checkpoint.directory} does not fit the model: {mismatch.describe()}")

    def wanted(info: TensorInfo) -> torch.dtype:
        stored = SAFETENSORS_DTYPES[info.dtype]
        return dtype if stored.is_floating_point else stored

    # A tensor already in the wanted dtype is read straight into the memory that becomes the parameter. One that
    # is cast or sent to an accelerator is staged in a single reused buffer: per-tensor temporaries would
    # fragment the heap and could push the peak well past one copy of the weights.
    on_cpu = torch.device(device).type == "cpu"
    staged = [info.end - info.start for info in checkpoint.tensors.values()
              if not on_cpu or wanted(info) != SAFETENSORS_DTYPES[info.dtype]]
    buffer = torch.empty(max(staged, default=0), dtype=torch.uint8)

    def read(name: str) -> torch.Tensor:
        info = checkpoint.tensors[name]
        if on_cpu and wanted(info) == SAFETENSORS_DTYPES[info.dtype]:
            return read_tensor(checkpoint.directory / info.file, info)
        return read_tensor(checkpoint.directory / info.file, info, buffer).to(device, wanted(info))

    for file in checkpoint.files:
        state = {name: read(name) for name in checkpoint.names_in(file) if name not in aliases}
        result = model.load_state_dict(state, strict=False, assign=True)
        assert not result.unexpected_keys, result.unexpected_keys  # ruled out by match() above

    # assign=True replaced the source Parameter; point its aliases (lm_head) at the new one again
    for alias, source in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
        if alias in checkpoint.tensors:  # stored as well: it must really be the same matrix
            if not torch.equal(read(alias), model.get_parameter(source).data):
                raise CheckpointError(f"{checkpoint.directory}: {alias} differs from {source}, but the model ties "
                                      "them (tie_word_embeddings); this checkpoint is not for a tied model")
    unfilled = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise CheckpointError(f"after loading, {len(unfilled)} tensors are still unset: {_few(unfilled)}; a module "
                              "must not create tensors outside its state dict in __init__ (they stay on meta)")
    return model


def build_model(config: OvisConfig) -> OvisU1:
    """OvisU1 on the meta device: shapes only, no memory, no initialisation cost."""
    with torch.device("meta"):
        return OvisU1(config)


class Loaded(NamedTuple):
    model: OvisU1  # in eval mode
    config: OvisConfig
    directory: Path  # holds tokenizer.json and preprocessor_config.json


def load_model(source: str | Path = DEFAULT_REPO, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", revision: str = "main", download: bool = False) -> Loaded:
    """The official model from a local directory or a hub id (Hugging Face cache; downloaded if `download`)."""
    directory = resolve_source(source, revision=revision, download=download)
    config = read_config(directory)
    model = load_checkpoint(build_model(config), directory, dtype=dtype, device=device)
    return Loaded(model.eval(), config, directory)


def newest_step(run_directory: Path) -> Path | None:
    """The step directory a train.py run directory's `latest` file names, or None where there is none."""
    latest = run_directory / LATEST_FILE
    return run_directory / latest.read_text().strip() if latest.is_file() else None


def looks_like_hub_id(source: str | Path) -> bool:
    """`owner/name` as the hub spells repository ids (a relative path such as `ckpt/x` reads the same)."""
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(source)) is not None


def resolve_source(source: str | Path, revision: str = "main", download: bool = False) -> Path:
    """A checkpoint directory for `source`: an existing directory (a train.py run directory stands for its
    newest checkpoint, named by its `latest` file), or a hub id found in the cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        newest = None if (path / CONFIG_FILE).is_file() else newest_step(path)
        return newest or path
    repo_id = str(source)
    if not looks_like_hub_id(repo_id):
        raise CheckpointError(f"no checkpoint directory {source}; {download_hint(source)}")
    for candidate in [repo_id] + [other for other in HUB_IDS if repo_id in HUB_IDS and other != repo_id]:
        snapshot = cached_snapshot(candidate, revision)
        if snapshot is not None:
            return snapshot
    if download:
        return download_checkpoint(repo_id, revision=revision)
    raise CheckpointError(f"{repo_id} is neither a directory nor in the Hugging Face cache ({hub_cache_dir()}); "
                          f"download it with: python weights.py download {repo_id}")


def check_checkpoint(directory: Path | str) -> list[str]:
    """Verify a checkpoint directory without reading its tensor data: files, config, tokenizer, and every name,
    shape and file size against the model its config.json describes. Returns a short report; raises
    CheckpointError naming the first problem."""
    directory = Path(directory)
    missing = [file for file in REQUIRED_FILES if not (directory / file).is_file()]
    if not directory.is_dir() or missing:
        raise CheckpointError(f"{directory}: missing {', '.join(missing) or 'everything'}; {download_hint(directory)}")
    lines = [f"checkpoint {directory}"]

    def row(what: str, detail: str):
        lines.append(f"  {what:<26} ok   {detail}")

    config = read_config(directory)
    row(CONFIG_FILE, f"LLM {config.llm.num_layers} layers x {config.llm.hidden_size}, encoder {config.vit.num_layers} "
                     f"x {config.vit.hidden_size}, decoder {config.mmdit.depth}+{config.mmdit.depth_single_blocks} "
                     f"blocks x {config.mmdit.hidden_size}, visual vocab {config.adapter.visual_vocab_size}")
    try:
        vocab = Tokenizer.from_file(str(directory / TOKENIZER_FILE)).get_vocab_size()
    except Exception as error:  # the tokenizers library raises a bare Exception on a malformed file
        raise CheckpointError(f"{directory / TOKENIZER_FILE}: cannot be read ({error})") from None
    if vocab > config.llm.vocab_size:
        raise CheckpointError(f"{directory / TOKENIZER_FILE}: {vocab} tokens, more than the LLM's vocab_size "
                              f"{config.llm.vocab_size} in {CONFIG_FILE}")
    row(TOKENIZER_FILE, f"{vocab} tokens (embedding rows: {config.llm.vocab_size})")
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
# The Hugging Face cache layout: {cache}/models--{org}--{name}/snapshots/{commit}/, refs/{revision} -> commit
# ---------------------------------------------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def repo_cache_dir(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot of `repo_id` at `revision` that holds a config.json, or None."""
    repo_dir = repo_cache_dir(repo_id)
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if (snapshot / CONFIG_FILE).is_file():
        return snapshot
    if revision == "main" and (repo_dir / "snapshots").is_dir():
        # no ref written (files copied in by hand): take the newest complete-looking snapshot
        snapshots = [s for s in (repo_dir / "snapshots").iterdir() if (s / CONFIG_FILE).is_file()]
        if snapshots:
            return max(snapshots, key=lambda s: s.stat().st_mtime)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Downloading (standard library only)
# ---------------------------------------------------------------------------------------------------------------

class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """The hub redirects large files to a CDN; the token is for the hub only."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_DropAuthOnRedirect)
CHUNK = 1 << 20
ATTEMPTS = 5  # per file; a dropped connection resumes where it stopped


class _Progress:
    """One line per file on stderr: name, bar, percent, MB and speed. Redrawn in place on a terminal."""

    def __init__(self, name: str, total: int | None, done: int, enabled: bool):
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self.start, self.start_done, self.last = time.monotonic(), done, 0.0
        self.live = enabled and sys.stderr.isatty()

    def update(self, n: int):
        self.done += n
        if self.live and time.monotonic() - self.last > 0.1:
            self.last = time.monotonic()
            sys.stderr.write("\r" + self.line())
            sys.stderr.flush()

    def line(self) -> str:
        speed = (self.done - self.start_done) / max(time.monotonic() - self.start, 1e-6) / 1e6
        if self.total:
            filled = int(30 * self.done / self.total)
            return (f"{self.name[:44]:<44} [{'#' * filled}{'.' * (30 - filled)}] {100 * self.done / self.total:5.1f}% "
                    f"{self.done / 1e6:9.1f}/{self.total / 1e6:.1f} MB {speed:6.1f} MB/s")
        return f"{self.name[:44]:<44} {self.done / 1e6:9.1f} MB {speed:6.1f} MB/s"

    def close(self):
        if self.enabled:
            sys.stderr.write(("\r" if self.live else "") + self.line() + "\n")
            sys.stderr.flush()


def _unreachable(endpoint: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"cannot reach {endpoint} ({error}). Offline? Connect, set HF_ENDPOINT to a reachable "
                           "mirror, or copy the checkpoint files into a directory and pass that directory")


def _http_error(error: urllib.error.HTTPError, url: str) -> CheckpointError:
    if error.code in (401, 403):
        return CheckpointError(f"{url}: HTTP {error.code}, access denied; set HF_TOKEN to a token that can read "
                               "this repository")
    if error.code == 404:
        return CheckpointError(f"{url}: not found (HTTP 404); check the repository id and revision")
    return CheckpointError(f"{url}: HTTP {error.code} {error.reason}")


def fetch_file(url: str, dest: Path, token: str | None = None, optional: bool = False,
               progress: bool = True, verify=None) -> bool:
    """Download `url` to `dest` through `dest.incomplete`, resuming a partial file with an HTTP Range request.

    The size is checked against the server's Content-Length/Content-Range, then `verify(path)` (if given) may
    reject the content; only then is the file renamed into place, so `dest` is always complete.
    Returns False when `optional` and the server says 404.
    """
    partial = dest.with_name(dest.name + ".incomplete")
    dest.parent.mkdir(parents=True, exist_ok=True)
    headers = {"User-Agent": "ovis-min"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(url))
    last_error: Exception | None = None
    for attempt in range(ATTEMPTS):
        have = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
        try:
            with _OPENER.open(request, timeout=60) as response:
                if have and response.status == 206:
                    total = _content_range_total(response.headers.get("Content-Range"))
                    mode = "ab"
                else:  # the server ignored the range (or there was none): start over
                    have, mode = 0, "wb"
                    total = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
                bar = _Progress(dest.name, total, have, progress)
                with open(partial, mode) as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                bar.close()
            size = partial.stat().st_size
            if total is not None and size != total:
                raise http.client.IncompleteRead(b"", total - size)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # our partial file is not a prefix of this file: start over
                partial.unlink()
                last_error = error
                continue
            if error.code == 404 and optional:
                return False
            raise _http_error(error, url) from None
        except urllib.error.URLError as error:
            if have == 0 and attempt == 0:
                raise _unreachable(endpoint, error.reason) from None
            last_error = error
        except (http.client.HTTPException, OSError) as error:
            last_error = error  # dropped mid-file: the next attempt resumes from what arrived
        time.sleep(min(2 ** attempt, 10) * 0.1)
    else:
        raise CheckpointError(f"downloading {url} failed {ATTEMPTS} times (last: {last_error!r}); the part "
                              f"received is kept in {partial}: run the same command again to resume")
    if verify is not None:
        try:
            verify(partial)
        except CheckpointError as error:
            partial.unlink()
            raise CheckpointError(f"{url}: the downloaded file is damaged ({error}); it was deleted, run the same "
                                  "command again") from None
    os.replace(partial, dest)
    return True


def _content_range_total(value: str | None) -> int | None:
    """The full size from "bytes 100-999/1000"."""
    match_ = re.fullmatch(r"bytes \d+-\d+/(\d+)", (value or "").strip())
    return int(match_.group(1)) if match_ else None


def download_checkpoint(repo_id: str = DEFAULT_REPO, local_dir: Path | str | None = None, revision: str = "main",
                        endpoint: str | None = None, token: str | None = None, progress: bool = True) -> Path:
    """Fetch the checkpoint files of `repo_id` into `local_dir`, or into the Hugging Face cache layout.

    Files: config.json, the index and its shards (or model.safetensors), tokenizer.json,
    preprocessor_config.json, and the tokenizer side files that exist. Python files are never fetched.
    Files already complete are kept, so an interrupted download resumes when run again.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise CheckpointError("HF_HUB_OFFLINE is set: not downloading; unset it, or pass a directory holding the "
                              "checkpoint files")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = token or os.environ.get("HF_TOKEN") or None
    headers = {"User-Agent": "ovis-min", **({"Authorization": f"Bearer {token}"} if token else {})}

    def url(rev: str, filename: str) -> str:
        return f"{endpoint}/{repo_id}/resolve/{urllib.parse.quote(rev, safe='')}/{urllib.parse.quote(filename)}"

    # config.json first: it is small, and the hub's X-Repo-Commit header pins every later file to one commit
    try:
        with _OPENER.open(urllib.request.Request(url(revision, CONFIG_FILE), headers=headers), timeout=60) as response:
            config_bytes = response.read()
            commit = response.headers.get("X-Repo-Commit", "")
    except urllib.error.HTTPError as error:
        raise _http_error(error, url(revision, CONFIG_FILE)) from None
    except urllib.error.URLError as error:
        raise _unreachable(endpoint, error.reason) from None
    except (http.client.HTTPException, OSError) as error:
        raise _unreachable(endpoint, error) from None

    if not re.fullmatch(r"[0-9a-f]{40}", commit):  # the header names a folder below: accept a commit hash only
        commit = revision
    if local_dir is None:
        repo_dir = repo_cache_dir(repo_id)
        target = repo_dir / "snapshots" / commit
        if commit != revision:
            (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
            (repo_dir / "refs" / revision).write_text(commit)
    else:
        target = Path(local_dir).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    try:
        json.loads(config_bytes)
    except ValueError:
        raise CheckpointError(f"{url(commit, CONFIG_FILE)}: not JSON; is {endpoint} a Hugging Face endpoint?") from None
    partial = target / (CONFIG_FILE + ".incomplete")
    partial.write_bytes(config_bytes)
    os.replace(partial, target / CONFIG_FILE)

    def get(filename: str, optional: bool = False, verify=None) -> bool:
        dest = target / filename
        if dest.is_file():
            return True
        return fetch_file(url(commit, filename), dest, token, optional=optional, progress=progress, verify=verify)

    if get(INDEX_FILE, optional=True):
        weight_map, _ = read_index(target)  # checks every shard name before anything is written
        shards = list(dict.fromkeys(weight_map.values()))
    else:
        shards = [SINGLE_FILE]
    for shard in shards:
        if (target / shard).is_file():
            read_safetensors_header(target / shard)  # a complete earlier download, or a damaged file to report
        get(shard, verify=read_safetensors_header)
    for filename in (TOKENIZER_FILE, PREPROCESSOR_FILE):
        get(filename)
    for filename in OPTIONAL_FILES:
        get(filename, optional=True)
    open_checkpoint(target)  # the index and the shards belong together
    return target


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
        save_file({n: state[n].contiguous() for n in group}, str(directory / file), metadata={"format": "pt"})
    if shards > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: files[i] for i, group in enumerate(groups) for n in sorted(group)}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _few(names: list[str], n: int = 5) -> str:
    """The first few names and how many more: error messages stay readable for a 1000-tensor model."""
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")
