"""Cached frozen work of the decoder stages (0, 4, 5): what the frozen VAE and LLM make of every generation row,
computed once by `train.py cache` instead of at every step.

Per row: the VAE posterior (mean and log-variance, so that training still draws its own latent sample) of the
target, and of an edit's source; the LLM condition (model.generation_condition) of its prompt, and of an edit's
"no text" prompt about its source. Per bucket: the condition of the unconditional prompt about the blank image. The
prompt and image drops stay random at training time, as without a cache.

Layout of CACHE/: `cache.json` (the settings it was made with, checked by every use), `unconditional.safetensors`,
and `TASK-NNNNNN.safetensors`, shard N holding rows N*ROWS_PER_SHARD.. of the task in the manifests' index order,
tensors named `ROW.target_mean` etc., unusable rows listed with their skip reason in the shard's metadata. Shards
are written atomically and split over the ranks, and those already there are kept: an interrupted `train.py cache`
continues where it stopped.
"""
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .data import (DataConfig, Example, Frozen, Manifests, SkipRow, blank_condition, collate, index_path,
                   load_example, prompt_ids)
from .distributed import Runtime, broadcast, fingerprint
from ..files import read_json, write_atomic
from ..model import OvisU1, encode_posterior
from ..prompt import UNCONDITIONAL_PROMPT

CACHE_FORMAT = 1
ROWS_PER_SHARD = 256
OPEN_SHARDS = 32  # per process: safetensors handles kept open (file descriptors)
SETTINGS_FILE = "cache.json"


class CacheError(ValueError):
    """A cache that cannot be used for this run: the message says why and what to do."""


def weights_fingerprint(model: OvisU1, runtime: Runtime) -> str:
    """The hash of every weight the cached values depend on: all but the decoder's (and its refiner's), which
    train. Taken once, by the first process, and sent to the others (hashing billions of parameters on every
    process would only repeat it), from the weights as loaded: before sharding, which splits them over the
    processes, and before a bf16 run stores the frozen ones in bf16."""
    digest = fingerprint(model, leave_out="visual_generator.backbone.")[:16] if runtime.main else None
    return broadcast(digest, runtime)


def settings(weights: str, manifests: Manifests, cfg: DataConfig, precision: str) -> dict:
    """Everything that changes the cached values, as cache.json holds it; a cache is used only with the same.
    `weights`: weights_fingerprint."""
    return json.loads(json.dumps({
        "format": CACHE_FORMAT, "weights": weights,
        "manifests": [index_path(path).name for path in manifests.files], "resolution": cfg.resolution,
        "buckets": cfg.buckets, "max_length": cfg.max_length, "precision": precision}))


def shard_path(cache: Path, task: str, shard: int) -> Path:
    return cache / f"{task}-{shard:06d}.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Making the cache
# ---------------------------------------------------------------------------------------------------------------
def _variants(task: str, row_index: int, manifests: Manifests, cfg: DataConfig) -> dict[str, Example]:
    """The examples whose frozen work a row needs: its prompt, and an edit's "no text" prompt with its source."""
    ref = manifests.rows[task][row_index]
    full = load_example(manifests, task, ref, 0, replace(cfg, drop_prompt=0.0, drop_image=0.0))
    if task == "t2i":
        return {"": full}
    no_text = replace(full, input_ids=prompt_ids(cfg, UNCONDITIONAL_PROMPT))
    return {"": full, "no_text": no_text}


@torch.no_grad()
def _frozen_work(model: OvisU1, examples: list[Example], pad_id: int, autocast,
                 posteriors: bool) -> list[dict[str, torch.Tensor]]:
    """Per example: condition, and target (and source) posteriors; one batch of one image shape. Kept in the dtype
    they were computed in (bf16 under bf16 autocast), which is what training computes them in too."""
    batch = collate(examples, pad_id)
    vae = model.visual_generator.vae
    with autocast:
        txt, mask = model.generation_condition(batch.input_ids.to(model.device), batch.attention_mask.to(model.device),
                                               batch.pixel_values.to(model.device), batch.grid_thws.to(model.device),
                                               left_padding=False)
        encoded = {}
        for name, pixels in (("target", batch.target), ("source", batch.source)):
            if posteriors and pixels is not None:
                encoded[name] = encode_posterior(vae, pixels)
    out = []
    for i, example in enumerate(examples):
        values = {"condition": txt[i, mask[i]]}
        for name, (mean, logvar) in encoded.items():
            if name == "target" or example.source is not None:
                values[f"{name}_mean"], values[f"{name}_logvar"] = mean[i], logvar[i]
        out.append({k: v.contiguous().cpu() for k, v in values.items()})
    return out


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], skipped: dict[int, str]) -> None:
    write_atomic(path, save(tensors, metadata={"skipped": json.dumps(skipped)}))


def build_cache(model: OvisU1, manifests: Manifests, tasks: list[str], cfg: DataConfig, out: Path, runtime: Runtime,
                micro_batch: int, wanted: dict, autocast) -> dict[str, int]:
    """Write this rank's missing shards of CACHE (rank r: shards r, r+W, ...); returns the rows written per task.
    `wanted`: the run's `settings`. Refuses a folder holding a cache of other settings."""
    check_settings(out, wanted, fix="choose another --out, or delete it to make it again")
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SETTINGS_FILE, json.dumps(wanted, indent=1) + "\n")
        if not (out / "unconditional.safetensors").is_file():
            shapes = cfg.buckets or [(cfg.resolution, cfg.resolution)]
            tensors = {f"{h}x{w}": _unconditional(model, cfg, h, w, autocast) for h, w in shapes}
            write_atomic(out / "unconditional.safetensors", save(tensors))
    pad_id = cfg.tokenizer.pad_token_id
    written = dict.fromkeys(tasks, 0)
    for task in tasks:
        rows = len(manifests.rows[task])
        for shard in range(runtime.rank, math.ceil(rows / ROWS_PER_SHARD), runtime.world):
            path = shard_path(out, task, shard)
            if path.is_file():
                continue
            tensors, skipped, pending = {}, {}, {}  # pending: (image shape, variant) -> [(row, variant, example)]
            for row in range(shard * ROWS_PER_SHARD, min(rows, (shard + 1) * ROWS_PER_SHARD)):
                try:
                    for variant, example in _variants(task, row, manifests, cfg).items():
                        pending.setdefault((example.image_shape, variant), []).append((row, variant, example))
                except SkipRow as skip:
                    skipped[row] = skip.reason
            for group in pending.values():
                for start in range(0, len(group), micro_batch):
                    chunk = group[start:start + micro_batch]
                    # a variant's posteriors are the full prompt's: only its condition is new
                    work = _frozen_work(model, [e for *_, e in chunk], pad_id, autocast, posteriors=not chunk[0][1])
                    for (row, variant, _), values in zip(chunk, work):
                        if variant:
                            tensors[f"{row}.condition_{variant}"] = values["condition"]
                        else:
                            tensors.update({f"{row}.{name}": value for name, value in values.items()})
            _write_shard(path, tensors, skipped)
            written[task] += len({int(name.split(".")[0]) for name in tensors})
    return written


def _unconditional(model: OvisU1, cfg: DataConfig, height: int, width: int, autocast) -> torch.Tensor:
    pixel_values, grid_thws = blank_condition(cfg, height, width)
    input_ids = prompt_ids(cfg, UNCONDITIONAL_PROMPT)[None].to(model.device)
    with torch.no_grad(), autocast:
        txt, _ = model.generation_condition(input_ids, torch.ones_like(input_ids, dtype=torch.bool),
                                            pixel_values.to(model.device), grid_thws.to(model.device),
                                            left_padding=False)
    return txt[0].cpu().contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Training from the cache
# ---------------------------------------------------------------------------------------------------------------
def check_settings(cache: Path, wanted: dict, fix: str) -> None:
    path = cache / SETTINGS_FILE
    if not path.is_file():
        return
    found = read_json(path, dict, CacheError, fix)
    changed = [key for key in wanted if found.get(key) != wanted[key]]
    if changed:
        what = {"weights": "other weights", "manifests": "other --data manifests (or they changed)"}
        names = ", ".join(what.get(key, f"{key} {found.get(key)} (this run: {wanted[key]})") for key in changed)
        raise CacheError(f"{cache} was made with {names}; {fix}")


class FrozenCache:
    """Generation examples from a cache: the row's frozen work, with this sample's drops (as data.py draws them)."""

    def __init__(self, cache: Path, wanted: dict, manifests: Manifests, tasks: list[str]):
        fix = "make it for this run with python train.py cache (same --init, --data, --resolution, --buckets)"
        if not (cache / SETTINGS_FILE).is_file():
            raise CacheError(f"--cache {cache}: not a cache; {fix}")
        check_settings(cache, wanted, f"{fix}, or train without --cache")
        for task in tasks:
            shards = math.ceil(len(manifests.rows[task]) / ROWS_PER_SHARD)
            missing = [n for n in range(shards) if not shard_path(cache, task, n).is_file()]
            if missing:
                raise CacheError(f"--cache {cache}: {len(missing)} of its {shards} {task} shards are missing (an "
                                 f"interrupted train.py cache); run it again to finish it")
        self.cache = cache
        self._open: dict[tuple[str, int], tuple] = {}  # per process: (safetensors handle, skipped rows)
        with safe_open(cache / "unconditional.safetensors", "pt") as f:
            self.unconditional = {tuple(map(int, key.split("x"))): f.get_tensor(key) for key in f.keys()}

    def _shard(self, task: str, row: int):
        key = (task, row // ROWS_PER_SHARD)
        if key not in self._open:
            if len(self._open) >= OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))  # the oldest opened
            try:
                handle = safe_open(shard_path(self.cache, *key), "pt")
                self._open[key] = handle, json.loads(handle.metadata()["skipped"])
            except (SafetensorError, OSError, KeyError, ValueError) as error:
                raise CacheError(f"--cache {self.cache}: cannot read {shard_path(self.cache, *key).name} "
                                 f"({error}); delete it and run train.py cache again to remake it") from None
        return self._open[key]

    def example(self, task: str, row: int, seed: int, cfg: DataConfig) -> Example:
        handle, skipped = self._shard(task, row)
        if str(row) in skipped:
            raise SkipRow(skipped[str(row)], f"row {row} of the {task} rows (when the cache was made)")
        get = lambda name: handle.get_tensor(f"{row}.{name}")  # noqa: E731
        mean, logvar = get("target_mean"), get("target_logvar")
        shape = (8 * mean.shape[-2], 8 * mean.shape[-1])
        u = random.Random(seed).random()  # the sample's drop draw, as t2i_example and edit_example make it
        if task == "t2i":
            condition = self.unconditional[shape] if u < cfg.drop_prompt else get("condition")
            return Example(task, None, None, None, None, seed, frozen=Frozen(condition, mean, logvar))
        if u < cfg.drop_image:  # the "no text, no image" branch
            return Example(task, None, None, None, None, seed, frozen=Frozen(self.unconditional[shape], mean, logvar))
        condition = get("condition_no_text") if u < cfg.drop_image + cfg.drop_prompt else get("condition")
        frozen = Frozen(condition, mean, logvar, get("source_mean"), get("source_logvar"))
        return Example(task, None, None, None, None, seed, frozen=frozen)

