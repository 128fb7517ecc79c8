"""Training checkpoints: OUT/step-NNNNNNNN/ in the official layout plus trainer.pt (optimizer, step, data
positions, RNG, arguments), written atomically, pruned to the newest --keep, and read back on --resume."""
import json
import math
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn

from .checkpoint import LATEST_FILE, OPTIONAL_FILES, REQUIRED_FILES, SAFETENSORS_DTYPES, open_checkpoint, save_checkpoint
from .cli import TrainError
from .data import Mixture
from .distributed import Runtime, all_gather
from .files import disk_full, temp_prefix, write_atomic

SHARD_BYTES = 5 * 2 ** 30


STEP_NAME = re.compile(r"step-(\d{8})")


def resolve_resume(path: Path) -> Path:
    """A step directory, or a run directory whose `latest` file names one."""
    if not path.is_dir():
        raise TrainError(f"--resume {path}: no such run directory")
    if (path / "trainer.pt").is_file():
        return path
    latest = path / LATEST_FILE
    if not latest.is_file():
        raise TrainError(f"--resume {path}: nothing to resume (no 'latest' file and no trainer.pt): give a run "
                         "directory written by train.py --out, or one of its step-NNNNNNNN directories")
    name = latest.read_text(errors="replace").strip()
    # `latest` only ever names a sibling step directory; anything else (a path, '..') was not written by train.py
    if not STEP_NAME.fullmatch(name):
        raise TrainError(f"--resume {path}: its 'latest' file names {name!r}, not a step-NNNNNNNN directory; "
                         "resume from a step directory instead (--resume RUN/step-NNNNNNNN)")
    step_dir = path / name
    if not (step_dir / "trainer.pt").is_file():
        raise TrainError(f"--resume {path}: 'latest' names {name}, which is missing or incomplete; resume from an "
                         "earlier step directory (--resume RUN/step-NNNNNNNN)")
    return step_dir


TRAINER_KEYS = ("step", "optimizer", "world_size", "data", "rng", "args")


def read_trainer_state(step_dir: Path) -> dict:
    """trainer.pt, read without unpickling code (weights_only), and checked to be one train.py wrote."""
    path = step_dir / "trainer.pt"
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise TrainError(f"--resume: cannot read {path} ({str(error).splitlines()[0][:120]}): the file is damaged "
                         "or not train.py's; resume from an earlier step directory") from None
    if not isinstance(state, dict) or any(key not in state for key in TRAINER_KEYS) \
            or not isinstance(state["args"], dict) or "stage" not in state["args"]:
        raise TrainError(f"--resume: {path} is not a train.py trainer state; resume from another step directory")
    return state


def full_state(step_module: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model weights under official names, optimizer state): whole on rank 0, on CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(step_module, options=options)
    prefix = "model."
    weights = {name[len(prefix):]: tensor for name, tensor in weights.items()}
    return weights, get_optimizer_state_dict(step_module, optimizer, options=options)


def write_checkpoint(out: Path, step: int, weights: dict, source: Path, trained: set[str], trainer_state: dict,
                     keep: int) -> Path:
    """Write OUT/step-NNNNNNNN atomically: a temporary directory, renamed when complete, then `latest` updated.

    A kill at any moment leaves either the previous checkpoint named by `latest` (and a temporary directory that
    the next run removes) or the new one complete. A failure (a full disk) removes the partial directory.
    """
    name = f"step-{step:08d}"
    final, tmp = out / name, out / f"{temp_prefix()}{name}"
    try:
        tmp.mkdir(parents=True)
        for file in REQUIRED_FILES + OPTIONAL_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, tmp / file)
        stored = open_checkpoint(source).tensors  # write the same names as the source (e.g. no tied lm_head)
        state = {}
        for key, info in stored.items():
            tensor = weights[key]
            # Trained weights stay float32 so that a resumed run continues exactly; frozen ones go back to the
            # dtype they were read from, which restores them bit for bit.
            state[key] = tensor.float() if key in trained else tensor.to(SAFETENSORS_DTYPES[info.dtype])
        total = sum(t.numel() * t.element_size() for t in state.values())
        save_checkpoint(state, tmp, shards=max(1, math.ceil(total / SHARD_BYTES)))
        torch.save(trainer_state, tmp / "trainer.pt")
        if final.exists():  # an older run's step of the same number, from before a resume at an earlier step
            os.replace(final, tmp.with_name(tmp.name + "-replaced"))
        os.replace(tmp, final)
        write_atomic(out / LATEST_FILE, name + "\n")
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(error):
            raise TrainError(f"the disk is full while saving {final}: the partial save was removed; free some space "
                             f"and continue with --resume {out}") from None
        raise TrainError(f"cannot save {final} ({error.strerror or error})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp.with_name(tmp.name + "-replaced"), ignore_errors=True)
    prune(out, step, keep)
    return final


def prune(out: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest checkpoints up to `step` (the one just written among them). Steps above it are
    left alone: they belong to a run that was resumed from an earlier step, and are replaced as it gets there."""
    if keep <= 0:
        return
    steps = sorted(int(m.group(1)) for p in out.iterdir() if (m := STEP_NAME.fullmatch(p.name)))
    for old in [n for n in steps if n <= step][:-keep]:
        shutil.rmtree(out / f"step-{old:08d}", ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """On resume at `step`: drop the log records of steps after it (a killed run logged them, then lost them),
    and a last line cut short by the kill, so that the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept, last_step = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        last_step = record.get("step", last_step)  # records without a step close the steps before them
        if last_step <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def rng_state(runtime: Runtime) -> dict:
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def set_rng_state(state: dict, runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def save(out: Path, step: int, step_module: nn.Module, optimizer, mixture: Mixture, source: Path, trained: set[str],
         args, runtime: Runtime) -> Path:
    """Gather weights, optimizer state and every rank's data position and RNG state; rank 0 writes. Collective."""
    weights, optim_state = full_state(step_module, optimizer)
    state = {"step": step, "optimizer": optim_state, "world_size": runtime.world,
             "data": all_gather(mixture.state_dict(), runtime), "rng": all_gather(rng_state(runtime), runtime),
             "args": {k: (str(v) if isinstance(v, Path) else [str(d) for d in v] if k == "data" else v)
                      for k, v in vars(args).items() if k not in ("resume", "out", "stop_after")}}
    if runtime.main:
        path = write_checkpoint(out, step, weights, source, trained, state, args.keep)
        print(f"saved {path}", flush=True)
    if runtime.world > 1:
        dist.barrier()
    return out / f"step-{step:08d}"


def restore(trainer_state: dict, step_module: nn.Module, optimizer, mixture: Mixture, runtime: Runtime) -> int:
    """Optimizer state, data positions and RNG state from trainer.pt; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(step_module, optimizer, optim_state_dict=trainer_state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    if trainer_state["world_size"] == runtime.world:
        mixture.load_state_dict(trainer_state["data"][runtime.rank])
        set_rng_state(trainer_state["rng"][runtime.rank], runtime)
    else:  # approximately: the same number of rows per task in total, split over the new ranks
        print(f"warning: resuming a {trainer_state['world_size']}-process run on {runtime.world} processes: data "
              f"positions and random streams restart approximately", file=sys.stderr)
        ranks = trainer_state["data"]
        mixture.load_state_dict({"micro_batches": ranks[0]["micro_batches"],
                                 "skipped": dict.fromkeys(ranks[0]["skipped"], 0),
                                 "draws": {t: sum(r["draws"][t] for r in ranks) // runtime.world
                                           for t in ranks[0]["draws"]}})
    return trainer_state["step"]
