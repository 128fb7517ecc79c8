"""Held-out losses during training (--val-data, --val-every).

The held-out rows are fixed, and so is everything random about them: row i of a task always has seed i, and no
prompt or image is dropped, so the loss measures the conditional model and two validations of the same weights
agree exactly. Rows are grouped in fixed batches of one task and one aspect-ratio bucket (in file order within a
bucket), each one forward pass; batch k goes to process k mod world, so the value does not depend on the number
of processes, and every process makes the same number of passes of each task (FSDP gathers weights per pass).
A task's loss is weighted as in training: cross-entropy per supervised token, flow matching per row.

Validation must not change training: it runs in eval mode under no_grad, and inside torch.random.fork_rng, so
whatever it draws from the global generators is given back; a run's training losses are the same with and without
it.
"""
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .data import SKIP_REASONS, TASKS, Batch, DataConfig, Manifests, SkipRow, collate, index_manifests, load_example
from .distributed import Runtime, all_reduce_sum
from .accumulation import LossScale


@dataclass
class HeldOut:
    manifests: Manifests
    batches: dict[str, list[list[tuple]]]  # task -> its batches of (row, seed), one bucket each
    cfg: DataConfig  # no drops
    skipped: dict[str, int]


def load_held_out(path: Path, tasks: list[str], cfg: DataConfig, micro_batch: int) -> HeldOut:
    """The usable rows of `tasks` in the manifest at `path` (each row is read once here to know it is usable)."""
    manifests = index_manifests([path])
    cfg = replace(cfg, drop_prompt=0.0, drop_image=0.0)
    batches, skipped = {}, dict.fromkeys(SKIP_REASONS, 0)
    for task in tasks:
        buckets = {}  # image shape -> [(row, seed)] (understanding: one group)
        for seed, ref in enumerate(manifests.rows[task]):
            try:
                example = load_example(manifests, task, ref, seed, cfg)
                buckets.setdefault(example.image_shape, []).append((ref, seed))
            except SkipRow as skip:
                skipped[skip.reason] += 1
        batches[task] = [rows[i:i + micro_batch] for rows in buckets.values()
                         for i in range(0, len(rows), micro_batch)]
    if not any(batches.values()):
        raise ValueError(f"--val-data {path}: no usable {' or '.join(tasks)} rows (the tasks this stage trains); "
                         "give a manifest in the --data format with rows of these tasks")
    return HeldOut(manifests, batches, cfg, skipped)


def held_out_batch(held_out: HeldOut, task: str, index: int) -> Batch:
    examples = [load_example(held_out.manifests, task, ref, seed, held_out.cfg)
                for ref, seed in held_out.batches[task][index]]
    return collate(examples, held_out.cfg.tokenizer.pad_token_id)


@torch.no_grad()
def validate(step_module: nn.Module, held_out: HeldOut, runtime: Runtime, autocast) -> dict[str, float]:
    """Loss per task on the held-out rows. `step_module`: the TrainStep (the FSDP module itself under FSDP, never
    the DDP wrapper, whose forward would talk to the other processes)."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    was_training = step_module.training
    step_module.eval()
    sums = []
    with torch.random.fork_rng(devices=devices):
        for task in TASKS:
            loss_sum, count = torch.zeros((), dtype=torch.float64, device=runtime.device), 0
            batches = len(held_out.batches.get(task, []))
            # Every process runs the same number of batches (under FSDP each forward gathers weights from all of
            # them); the ones past the end repeat batch 0 with weight 0.
            for k in range(runtime.rank, runtime.world * math.ceil(batches / runtime.world), runtime.world):
                batch = held_out_batch(held_out, task, k if k < batches else 0).to(runtime.device)
                with autocast:
                    _, tally = step_module(batch, LossScale(per_token=1.0, per_sample=1.0))
                if k < batches:  # sums of token cross-entropies or of per-row losses, and what they are over
                    loss_sum = loss_sum + tally.sums[task].double()
                    count += batch.supervised_tokens if task == "understanding" else len(batch)
            sums += [loss_sum, count]
    step_module.train(was_training)
    totals = all_reduce_sum(sums, runtime)
    return {task: totals[2 * i] / totals[2 * i + 1] for i, task in enumerate(TASKS) if totals[2 * i + 1]}


def format_validation(record: dict) -> str:
    return f"validation at step {record['step']} | " + ", ".join(f"{task} {loss:.4f}"
                                                                 for task, loss in record["val_loss"].items())
