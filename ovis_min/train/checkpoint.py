"""Training checkpoints, and the official-layout export of one.

  OUT/step-NNNNNNNN/
    state/        torch.distributed.checkpoint (DCP): the trained weights, their optimizer state and EMA, each
                  rank writing the shards it holds; any number of processes reads them back (DCP reshards)
    trainer.pt    the step, the arguments, the data position, each rank's RNG state, and where the frozen weights
                  come from (the run's --init, by path and fingerprint: they are never rewritten)
    complete      written last: a step directory without it is an interrupted save and is never resumed from; it
                  lists the size and CRC-32 of each file above, checked before a resume or an export reads them
    config.json, model*.safetensors, tokenizer and preprocessor files: at the end of a run, the export below
  OUT/latest      the newest complete step directory (what sample.py --weights OUT and --init OUT read)

The export (train.py export, and the last step of a run) is a checkpoint in the official layout: every tensor
under its official name, the trained ones (or their EMA) in float32, the others copied from the source as it
stores them, so that sample.py and ovis_min.checkpoint.load_model read it as they read the official release.
"""
import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint import (LATEST_FILE, OPTIONAL_FILES, REQUIRED_FILES, TRAINER_FILE, CheckpointError,
                          open_checkpoint, save_checkpoint)
from ..cli import TrainError
from .data import Mixture
from .distributed import (WAIT_TIMEOUT, Runtime, all_finite, all_gather, all_reduce_sum, broadcast,
                          wait_for_every_rank)
from .ema import EMA
from ..files import disk_full, temp_prefix, write_atomic
from ..lora import is_adapter, merge_into

# DCP warns at every save and load without a process group that it assumes a single process: it is one.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
SHARD_BYTES = 5 * 2 ** 30
STEP_NAME = re.compile(r"step-(\d{8})")
STATE_DIR, COMPLETE_FILE = "state", "complete"
TRAINER_KEYS = ("step", "world_size", "data", "rng", "args", "source")
FINITE_CHECKPOINTS = ("every checkpoint in {out} holds finite weights: continue from the newest with --resume {out} "
                      "and a lower --lr, or start again with one")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(step_dir: Path) -> bool:
    return (step_dir / COMPLETE_FILE).is_file()


def step_dirs(out: Path) -> dict[int, Path]:
    """Every step directory of a run, complete or not, by step."""
    return {int(m.group(1)): p for p in out.iterdir() if (m := STEP_NAME.fullmatch(p.name)) and p.is_dir()}


def complete_steps(out: Path) -> list[int]:
    return sorted(step for step, path in step_dirs(out).items() if is_complete(path))


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def resolve_resume(path: Path, flag: str = "--resume") -> tuple[Path, str]:
    """(a complete step directory whose files are as its marker lists them, why that one): the step directory
    given, or a run directory's newest complete one."""
    if not path.is_dir():
        raise TrainError(f"{flag} {path}: no such run directory")
    if STEP_NAME.fullmatch(path.name) and ((path / TRAINER_FILE).exists() or (path / STATE_DIR).exists()):
        if not is_complete(path):
            raise TrainError(f"{flag} {path}: an interrupted save (no '{COMPLETE_FILE}' marker); give the run "
                             f"directory {path.parent}, which stands for its newest complete checkpoint")
        verify_step(path, flag)
        return path, "the step directory given"
    latest = read_latest(path, flag)
    steps = complete_steps(path)
    if steps:
        newest = step_name(steps[-1])
        if latest == newest:
            why = f"the newest complete checkpoint, as {LATEST_FILE!r} says"
        elif latest is None:
            why = f"the newest complete checkpoint; the run has no {LATEST_FILE!r} file"
        elif not latest:
            why = f"the newest complete checkpoint; its {LATEST_FILE!r} file is empty"
        else:  # a kill between a step's marker and `latest`, or a step removed by hand
            why = (f"the newest complete checkpoint; its {LATEST_FILE!r} file names {latest[:40]!r}, which is "
                   f"{'older' if is_complete(path / latest) else 'not a complete checkpoint'}")
        verify_step(path / newest, flag)
        return path / newest, why
    if latest is not None:
        raise TrainError(f"{flag} {path}: its 'latest' file names {latest[:40]!r}, but the run holds no complete "
                         f"step-NNNNNNNN checkpoint (one with its '{COMPLETE_FILE}' marker); start a new run")
    raise TrainError(f"{flag} {path}: nothing to resume (no complete step-NNNNNNNN checkpoint): give a run "
                     "directory written by train.py --out, or one of its step directories")


def read_latest(run: Path, flag: str) -> str | None:
    """The step name in a run's `latest` file ("" when it is empty, None when there is none). A name reaching
    outside the run (a path, "..") is refused: nothing but the run's own step directories is ever read."""
    if not (run / LATEST_FILE).is_file():
        return None
    name = (run / LATEST_FILE).read_text(errors="replace").strip()
    if name and (run / name).resolve().parent != run.resolve():
        raise TrainError(f"{flag} {run}: its '{LATEST_FILE}' file names {name[:60]!r}, a path outside the run (it "
                         "names one of the run's step-NNNNNNNN directories); fix or remove that file")
    return name


# ---------------------------------------------------------------------------------------------------------------
# The `complete` marker: the size and CRC-32 of every file of the step (DCP stores no checksums of its own)
# ---------------------------------------------------------------------------------------------------------------
def file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(2 ** 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def step_files(step_dir: Path) -> dict[str, list]:
    """{path relative to the step directory: [size, CRC-32]} of every file in it but the marker."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != COMPLETE_FILE)
    return {p.relative_to(step_dir).as_posix(): [p.stat().st_size, file_crc(p)] for p in files}


def write_marker(step_dir: Path, step: int) -> None:
    write_atomic(step_dir / COMPLETE_FILE, json.dumps({"step": step, "files": step_files(step_dir)}) + "\n")


def verify_step(step_dir: Path, flag: str) -> None:
    """Every file the marker lists, at its size and CRC-32 (a marker of an older train.py lists none)."""
    try:
        listed = json.loads((step_dir / COMPLETE_FILE).read_text()).get("files", {})
        listed = {str(name): (int(size), str(crc)) for name, (size, crc) in listed.items()}
    except (ValueError, TypeError, AttributeError, OSError):
        raise TrainError(f"{flag}: {step_dir / COMPLETE_FILE} is damaged (not the list of the step's files that "
                         "train.py writes); resume from an earlier step directory") from None
    for name, (size, crc) in listed.items():
        path = step_dir / name
        found = path.stat().st_size if path.is_file() else None
        if found is None or found != size or file_crc(path) != crc:
            what = "is missing" if found is None else f"has {found} bytes, not {size}" if found != size else \
                "has other bytes than were saved (CRC-32 differs)"
            earlier = [n for n in complete_steps(step_dir.parent) if step_name(n) < step_dir.name]
            fallback = f"; resume from {step_dir.parent / step_name(earlier[-1])}" if earlier else ""
            raise TrainError(f"{flag}: {path} {what}: the checkpoint is damaged{fallback}")


def read_trainer_state(step_dir: Path) -> dict:
    """trainer.pt, read without unpickling code (weights_only), and checked to be one train.py wrote."""
    path = step_dir / TRAINER_FILE
    try:
        state = torch.load(path, weights_only=True)
    # random bytes make the restricted unpickler fail in many ways (an IndexError from a bad opcode argument too)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise TrainError(f"--resume: cannot read {path} ({reason}): the file is damaged "
                         "or not train.py's; resume from an earlier step directory") from None
    if not isinstance(state, dict) or any(key not in state for key in TRAINER_KEYS) \
            or not isinstance(state["args"], dict) or "stage" not in state["args"]:
        raise TrainError(f"--resume: {path} is not a train.py trainer state; resume from another step directory")
    return state


def source_fingerprint(source: Path) -> str:
    """The CRC-32 of each shard's bytes, by shard: tells a replaced or rewritten checkpoint from the original (it
    is no defence against a forged one) at about the speed the disk reads the shards."""
    return " ".join(f"{file}:{file_crc(source / file)}" for file in open_checkpoint(source).files)


def source_record(source: Path, runtime: Runtime | None = None) -> dict:
    """What a run records of its --init. The first process reads the shards and sends the fingerprint to the
    others: reading every shard on every process would only repeat it. Collective under torchrun."""
    fingerprint = source_fingerprint(source) if runtime is None or runtime.main else None
    return {"path": str(source.resolve()), "fingerprint": fingerprint if runtime is None
            else broadcast(fingerprint, runtime)}


def checked_source(trainer_state: dict, runtime: Runtime | None = None) -> Path:
    """The checkpoint the run's frozen weights (and config, tokenizer) come from, as it was when the run began.
    Checked by the first process, which sends the verdict to the others. Collective under torchrun."""
    path = Path(trainer_state["source"]["path"])
    problem = None
    if runtime is None or runtime.main:
        try:
            if source_fingerprint(path) != trainer_state["source"]["fingerprint"]:
                problem = "has changed since the run began; put the original back"
        except (CheckpointError, OSError):
            problem = "is missing or damaged; put it back where it was"
    if runtime is not None:
        problem = broadcast(problem, runtime)
    if problem is not None:
        raise TrainError(f"{path}, where the run's frozen weights, config and tokenizer come from (its --init), "
                         + problem)
    return path


def training_state(step_module: nn.Module, optimizer, ema: EMA | None) -> dict:
    """What DCP saves and loads, each tensor as this rank holds it (whole under DDP, its shards under FSDP): the
    trained weights and the EMA by official name, and the optimizer state."""
    weights, optim_state = get_state_dict(step_module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    prefix = "model."  # TrainStep's attribute
    state = {"weights": {name[len(prefix):]: tensor for name, tensor in weights.items()}, "optimizer": optim_state}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def tensors_in(state) -> list[torch.Tensor]:
    """The tensors of a nested state (dicts and lists, as the optimizer's state dict nests them)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        state = list(state.values())
    return [t for item in state for t in tensors_in(item)] if isinstance(state, (list, tuple)) else []


def saved_metadata(step_dir: Path) -> dict:
    """DCP's table of a checkpoint's tensors by flattened key ("weights.<official name>", "ema.<name>", ...)."""
    try:
        return dcp.FileSystemReader(step_dir / STATE_DIR).read_metadata().state_dict_metadata
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise unreadable(step_dir, error) from None


def load_state(step_dir: Path, state: dict, no_dist: bool) -> None:
    """Fill `state`'s tensors in place from the checkpoint, each in the layout it has here. Collective unless
    `no_dist`."""
    try:
        dcp.load(state, checkpoint_id=step_dir / STATE_DIR, no_dist=no_dist)
    except CheckpointException as error:
        raise unreadable(step_dir, next(iter(error.failures.values()))[0]) from None
    except (OSError, RuntimeError, ValueError) as error:
        raise unreadable(step_dir, error) from None


def unreadable(step_dir: Path, error: BaseException) -> TrainError:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return TrainError(f"cannot read {step_dir / STATE_DIR} ({reason}): the checkpoint is damaged or not this "
                      "run's; use an earlier step directory")


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------
def rng_state(runtime: Runtime) -> dict:
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def set_rng_state(state: dict, runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def remove_step(step_dir: Path) -> None:
    """The marker first: a kill half-way leaves an incomplete directory, never a complete-looking part of one."""
    (step_dir / COMPLETE_FILE).unlink(missing_ok=True)
    shutil.rmtree(step_dir, ignore_errors=True)


class Saver:
    """Writes a run's checkpoints into OUT/step-NNNNNNNN: every rank its shards of the state, rank 0 trainer.pt,
    then (when every shard is on disk) the marker, `latest`, and pruning to --keep.

    The state is copied to host memory while the step waits (DCP's staging), then written by a background thread
    (dcp.async_save) while training goes on; one save at a time, the next waits for the one in flight. The last
    save of a run, and the one before a stop on a signal, is written at once, the last one with the export.

    A kill at any moment leaves the previous complete checkpoint the newest, and a marker-less directory that a
    later save of that step replaces or pruning removes. A failure (a full disk) removes the partial directory.
    """

    def __init__(self, out: Path, source: dict, args, runtime: Runtime):
        self.out, self.source, self.args, self.runtime = out, source, args, runtime
        # The background writer's collectives get a group of their own, so that they never interleave with the
        # training step's; gloo, because DCP coordinates over the CPU; the long timeout, because its last gather
        # waits for the slowest rank's writing.
        self.group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if runtime.world > 1 else None
        self.pending = None  # (step, future) of the save in flight

    def save(self, step: int, step_module: nn.Module, optimizer, ema: EMA | None, mixture: Mixture,
             last: bool) -> None:
        """Collective."""
        self.wait()
        main, single = self.runtime.main, self.runtime.world == 1
        step_dir = self.out / step_name(step)
        with self.removed_on_failure(step_dir):
            if main:  # an abandoned checkpoint of the same step (see abandon_later), or an interrupted save
                remove_step(step_dir)
                step_dir.mkdir()
            wait_for_every_rank(self.runtime)  # rank 0 may have removed a large directory
            state = training_state(step_module, optimizer, ema)
            # The training loop skips the steps whose loss or gradient is not finite; a finite step can still
            # make weights overflow (a learning rate near float32's range), which no checkpoint may keep.
            if all_reduce_sum([all_finite(tensors_in(state)).logical_not()], self.runtime)[0]:
                raise TrainError(f"step {step}: the trained weights, their optimizer state or EMA are not finite, "
                                 f"so they are not saved; {FINITE_CHECKPOINTS.format(out=self.out)}")
            trainer_state = {"step": step, "world_size": self.runtime.world, "source": self.source,
                             "data": all_gather(mixture.state_dict(), self.runtime),
                             "rng": all_gather(rng_state(self.runtime), self.runtime),
                             "args": {k: (str(v) if isinstance(v, Path) else [str(d) for d in v] if k == "data" else v)
                                      for k, v in vars(self.args).items() if k not in ("resume", "out", "stop_after")}}
            if main:
                buffer = io.BytesIO()
                torch.save(trainer_state, buffer)
                write_atomic(step_dir / TRAINER_FILE, buffer.getvalue())
            if last:
                dcp.save(state, checkpoint_id=step_dir / STATE_DIR, process_group=self.group, no_dist=single)
                self.finish(step, export=step == self.args.steps)  # rank 0's export: minutes at full size
                wait_for_every_rank(self.runtime)  # no rank leaves before the marker is there
            else:
                self.pending = step, dcp.async_save(state, checkpoint_id=step_dir / STATE_DIR,
                                                    process_group=self.group, no_dist=single)

    def poll(self) -> None:
        """Complete the save in flight if its writing is done (rank 0: its marker appears soon after)."""
        if self.pending is not None and self.pending[1].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        step, future = self.pending
        self.pending = None
        with self.removed_on_failure(self.out / step_name(step)):
            future.result()  # rank 0's completes once every rank's shards and the metadata are written
            self.finish(step, export=False)

    def finish(self, step: int, export: bool) -> None:
        if not self.runtime.main:
            return
        step_dir = self.out / step_name(step)
        if export:  # the run checked its source when it began; its frozen weights were read from it then
            write_export(step_dir, step_dir, ema=False, source=Path(self.source["path"]))
        write_marker(step_dir, step)
        write_atomic(self.out / LATEST_FILE, step_dir.name + "\n")
        prune(self.out, step, self.args.keep)
        print(f"saved {step_dir}", flush=True)

    @contextlib.contextmanager
    def removed_on_failure(self, step_dir: Path):
        try:
            yield
        except (OSError, SafetensorError, CheckpointException) as error:
            if self.runtime.main:
                remove_step(step_dir)
            raise save_error(error, step_dir, f"continue with --resume {self.out}") from None
        except BaseException:
            if self.runtime.main:
                remove_step(step_dir)
            raise


def save_error(error: BaseException, target: Path, then: str) -> TrainError:
    if isinstance(error, CheckpointException):
        # DCP wraps each rank's failure; a full disk is the context of torch's serialiser's RuntimeError
        failures = [e for e, _ in error.failures.values()]
        error = next((e for e in failures + [e.__context__ for e in failures] if isinstance(e, OSError)), error)
    if disk_full(error):
        return TrainError(f"the disk is full while saving {target}: the partial save was removed; free some space "
                          f"and {then}")
    reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return TrainError(f"cannot save {target} ({reason})")


def prune(out: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `step` (the one just written among them) and remove the
    interrupted saves below it. Steps above it are left alone: the run passes them later and replaces them."""
    dirs = step_dirs(out)
    complete = [n for n in sorted(dirs) if n <= step and is_complete(dirs[n])]
    old = complete[:-keep] if keep > 0 else []
    interrupted = [n for n in dirs if n < step and not is_complete(dirs[n])]
    for n in old + interrupted:
        remove_step(dirs[n])


def abandon_later(out: Path, step: int) -> list[Path]:
    """Resuming at `step` while the run holds newer complete checkpoints (an explicit older step directory):
    those continue another line of the run, so they lose their marker (never resumed from, replaced as the run
    gets there). Returns them."""
    later = [path for n, path in sorted(step_dirs(out).items()) if n > step and is_complete(path)]
    for path in later:
        (path / COMPLETE_FILE).unlink()
    if later:  # sample.py --weights OUT and --init OUT follow `latest`
        write_atomic(out / LATEST_FILE, step_name(step) + "\n")
    return later


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


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------
def restore(step_dir: Path, trainer_state: dict, step_module: nn.Module, optimizer, ema: EMA | None,
            mixture: Mixture, runtime: Runtime) -> int:
    """Trained weights, optimizer state and EMA (resharded by DCP to this run's processes), the data position and
    the RNG state; returns the step to continue from. Collective."""
    state = training_state(step_module, optimizer, ema)
    fresh_ema = ema is not None and not any(key.startswith("ema.") for key in saved_metadata(step_dir))
    if fresh_ema:
        del state["ema"]
    load_state(step_dir, state, no_dist=runtime.world == 1)
    set_state_dict(step_module, optimizer, model_state_dict={f"model.{n}": t for n, t in state["weights"].items()},
                   optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False))
    if fresh_ema:
        ema.restart_from_weights()
        if runtime.main:
            print(f"note: {step_dir} has no EMA; it starts from the resumed weights", file=sys.stderr)
    # Each rank takes its own data position back; on another number of processes, rank 0's: the Mixture's
    # position is global (the same on every rank, whatever the number of processes and of micro-batches).
    same_world = trainer_state["world_size"] == runtime.world
    mixture.load_state_dict(trainer_state["data"][runtime.rank if same_world else 0])
    if same_world:  # otherwise the freshly seeded streams: the losses draw no random number from them
        set_rng_state(trainer_state["rng"][runtime.rank], runtime)
    return trainer_state["step"]


# ---------------------------------------------------------------------------------------------------------------
# The official-layout export
# ---------------------------------------------------------------------------------------------------------------
def read_trained(step_dir: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The trained weights saved in `step_dir` (or their EMA), float32 under the model's names, on this process
    alone."""
    key = "ema" if ema else "weights"
    trained = {fqn[len(key) + 1:]: torch.empty(info.size, dtype=torch.float32)
               for fqn, info in saved_metadata(step_dir).items() if fqn.startswith(key + ".")}
    if not trained:
        raise TrainError(f"{step_dir} holds no EMA: the run was trained without --ema-decay; export it without --ema")
    load_state(step_dir, {key: trained}, no_dist=True)
    return trained


def write_export(step_dir: Path, directory: Path, ema: bool, source: Path) -> None:
    """Fill `directory` with the official layout of `step_dir`'s weights (or their EMA), the frozen ones copied from
    `source` (the run's checked --init), on this process alone."""
    trained = read_trained(step_dir, ema)
    stored = open_checkpoint(source)  # the same names as the source (e.g. no tied lm_head)
    directory.mkdir(parents=True, exist_ok=True)
    for file in REQUIRED_FILES + OPTIONAL_FILES:
        if (source / file).is_file():
            write_atomic(directory / file, (source / file).read_bytes())
    state = {}
    for file in stored.files:
        with safe_open(source / file, framework="pt") as shard:
            for name in stored.names_in(file):
                state[name] = trained[name] if name in trained else shard.get_tensor(name)
    if any(map(is_adapter, trained)):  # a LoRA run: its adapters merged into the frozen weights, now trained ones
        args = read_trainer_state(step_dir)["args"]
        merge_into(state, trained, args["lora_alpha"] / args["lora"], dtype=torch.float32)
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_checkpoint(state, directory, shards=max(1, math.ceil(total / SHARD_BYTES)))


def export(run: Path, out: Path, ema: bool = False, step: int | None = None) -> Path:
    """`train.py export`: the run's newest complete checkpoint (or step `step`) in the official layout at `out`,
    written in a temporary directory beside it and renamed when complete."""
    step_dir, _ = resolve_resume(run if step is None else run / step_name(step), flag="export")
    if out.exists():
        raise TrainError(f"export --out {out} already exists; choose another --out or remove it")
    tmp = out.parent / f"{temp_prefix()}{out.name}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_export(step_dir, tmp, ema, checked_source(read_trainer_state(step_dir)))
        os.replace(tmp, out)
    except (OSError, SafetensorError, CheckpointException) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(error, out, "export again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM or SIGUSR1, what schedulers send a while before they stop a job: the run finishes its step, saves
    a checkpoint and exits 0.

    One request often arrives more than once: Slurm signals every process of the job step, and torchrun, signalled
    with them, passes its SIGTERM on to each training process a moment later. So a repeat is the same request: it
    is noted, and the stop goes on (stopping at once on a repeat would lose the very checkpoint the signal asks
    for; the scheduler kills the job in the end anyway). To stop at once, Ctrl-C (SIGINT): the newest complete
    checkpoint is kept. The signal may reach one rank only; `agreed` tells every rank, so that all stop after the
    same step. Install it before the DataLoader workers start (they ignore these signals, see
    data.ignore_stop_signals), so that none of them dies of a signal in the moment before it can ignore it."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            sys.stderr.write(f"\n{name} again: already stopping after this step (Ctrl-C stops at once)\n")
        else:
            sys.stderr.write(f"\n{name}: saving a checkpoint after this step, then stopping (Ctrl-C stops at "
                             "once)\n")
        sys.stderr.flush()
        self.received = self.received or signum

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any rank received a signal. Collective: every rank calls it after every step."""
        return all_reduce_sum([float(self.received is not None)], runtime)[0] > 0

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
