"""Gradient accumulation over one optimizer step: how each pass's loss is weighted, the passes every rank makes,
and what the step adds up to.

nanoGPT divides each micro-batch's mean loss by the number of micro-batches. That is right only when every
micro-batch weighs the same; here a micro-batch mixes tasks, and an understanding batch's weight is its supervised
tokens, which differ from batch to batch. So the weights are taken over the whole step (all micro-batches of all
ranks, the "window"): the cross-entropy is summed over the supervised tokens and divided by the window's supervised
tokens, so a short answer weighs as much per token as a long one wherever it lands (a mean per micro-batch would
overweight short answers); flow matching is a mean per sample. Each task counts by its share of the window's
samples:

    loss = (understanding samples / samples) * CE sum / supervised tokens + flow-matching sum / samples

so the same global batch gives the same gradient however it is split into micro-batches and processes.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .data import TASKS, MicroBatch
from .distributed import Runtime, all_reduce_max, all_reduce_sum, gradient_sync
from .throughput import Throughput


@dataclass
class LossScale:
    """What one sample's loss is multiplied by in a window: see the module's docstring."""
    per_token: float  # of the summed cross-entropy
    per_sample: float  # of a sample's flow-matching loss


@dataclass
class Tally:
    """What a micro-batch (or a window of them) adds up to on one rank."""
    sums: dict[str, torch.Tensor]  # task -> loss sum (detached)
    tokens: int = 0  # LLM + decoder tokens
    understanding_tokens: int = 0  # LLM tokens of understanding batches, and their positions with the padding
    understanding_positions: int = 0

    def add(self, other: "Tally") -> None:
        for task, value in other.sums.items():
            self.sums[task] = self.sums[task] + value.float() if task in self.sums else value.float()
        self.tokens += other.tokens
        self.understanding_tokens += other.understanding_tokens
        self.understanding_positions += other.understanding_positions


@dataclass
class WindowCounts:
    """What one rank's share of a window weighs: supervised tokens (understanding) or samples (generation) per task,
    understanding samples and samples."""
    per_task: dict[str, int]
    understanding_samples: int
    samples: int


def window_counts(micro_batches: list[MicroBatch]) -> WindowCounts:
    per_task = dict.fromkeys(TASKS, 0)
    for micro in micro_batches:
        for batch in micro.parts:
            per_task[batch.task] += batch.supervised_tokens if batch.task == "understanding" else len(batch)
    understanding_samples = sum(len(b) for m in micro_batches for b in m.parts if b.task == "understanding")
    return WindowCounts(per_task, understanding_samples, sum(len(m) for m in micro_batches))


def loss_scale(counts: WindowCounts, runtime: Runtime) -> LossScale:
    """The module docstring's weights, from the whole window's counts. Collective."""
    tokens, understanding_samples, samples = all_reduce_sum(
        [counts.per_task["understanding"], counts.understanding_samples, counts.samples], runtime)
    # DDP and FSDP average gradients over ranks: each rank's share is scaled up by the world size to undo it.
    return LossScale(per_token=runtime.world * understanding_samples / samples / max(tokens, 1),
                     per_sample=runtime.world / samples)


@dataclass
class WindowTotals:
    """One optimizer step's numbers on one rank: the Tally of its passes and the counts they were weighted by."""
    tally: Tally
    counts: WindowCounts

    def values(self) -> list[float]:
        """What the ranks add up, in the order `summary` reads."""
        tally, counts = self.tally, self.counts
        return [*(float(tally.sums[t]) if t in tally.sums else 0.0 for t in TASKS),
                *(counts.per_task[t] for t in TASKS), counts.understanding_samples, counts.samples, tally.tokens,
                tally.understanding_tokens, tally.understanding_positions]


def summary(totals: list[float]) -> tuple[float, dict[str, float], float, float | None]:
    """The all-reduced WindowTotals.values() -> (the step's loss, loss per task, tokens, padding fraction of the
    understanding batches or None)."""
    n = len(TASKS)
    sums, counts = dict(zip(TASKS, totals[:n])), dict(zip(TASKS, totals[n:2 * n]))
    understanding_samples, samples, tokens, understanding_tokens, positions = totals[2 * n:2 * n + 5]
    task_loss = {t: sums[t] / counts[t] for t in TASKS if counts[t]}
    loss = sum(sums[t] for t in TASKS if t != "understanding") / samples
    if counts["understanding"]:
        loss += understanding_samples / samples * task_loss["understanding"]
    return loss, task_loss, tokens, (1 - understanding_tokens / positions) if positions else None


def pass_kind(task: str) -> str:
    """What a forward pass of `task` runs: understanding runs the encoder and the LLM; both generation tasks run
    the same modules (encoder and LLM for the condition, unless cached, then refiner and decoder), in the same
    order, whatever their bucket."""
    return "understanding" if task == "understanding" else "generation"


PASS_KINDS = ("understanding", "generation")


def pass_schedule(micro_batches: list[MicroBatch], runtime: Runtime) -> list[dict[str, int]]:
    """Per micro-batch, the passes of each kind that every rank makes: the most any rank has (a micro-batch holds
    a pass per task and bucket, so ranks differ). Collective."""
    counts = [[sum(pass_kind(part.task) == kind for part in micro.parts) for kind in PASS_KINDS]
              for micro in micro_batches]
    most = all_reduce_max([n for row in counts for n in row], runtime)
    return [dict(zip(PASS_KINDS, most[i * len(PASS_KINDS):(i + 1) * len(PASS_KINDS)])) for i in range(len(counts))]


def backward_window(module: nn.Module, micro_batches: list[MicroBatch], runtime: Runtime, autocast,
                    throughput: Throughput, placeholder=None) -> WindowTotals:
    """Forward and backward every micro-batch of one optimizer step on this rank, one pass per task and bucket,
    weighted as this module's docstring says; `throughput` counts their FLOPs. The micro-batches stay where the
    loader left them (host memory, pinned on GPU): each part goes to the device just before its pass, so only one
    is there at a time. Collective.

    Under FSDP every rank must make the same sequence of passes, since each pass gathers the weights of the blocks
    it runs (and reduce-scatters their gradients) together with the other ranks; but a rank's micro-batch holds one
    pass per task and bucket its samples happen to fall in. So every rank makes, per micro-batch and kind of pass
    (`pass_kind`), as many passes as the rank with the most, filling its own with zero-weight passes on
    `placeholder(kind)`, a one-sample Batch. Zero-weight passes were chosen over drawing micro-batches within one
    task and bucket because the global batch, and so the gradient, then stays the same for any number of processes
    and any --micro-batch; they cost one small pass each, only where ranks differ. `placeholder` None: no padding
    (one process, or DDP, which reduces once per step and needs only that every pass uses every trained weight).
    """
    counts = window_counts(micro_batches)
    scale = loss_scale(counts, runtime)
    schedule = pass_schedule(micro_batches, runtime) if placeholder is not None else None
    passes = []  # (batch, weighted or not)
    for i, micro in enumerate(micro_batches):
        for kind in PASS_KINDS:
            own = [(part, True) for part in micro.parts if pass_kind(part.task) == kind]
            passes += own
            if schedule is not None and schedule[i][kind] > len(own):
                passes += [(placeholder(kind), False)] * (schedule[i][kind] - len(own))
    tally = Tally({})
    for n, (batch, weighted) in enumerate(passes):
        batch = batch.to(runtime.device, non_blocking=True)
        with gradient_sync(module, n == len(passes) - 1):
            with autocast, throughput.counting(batch.task) if weighted else contextlib.nullcontext():
                loss, pass_tally = module(batch, scale if weighted else LossScale(per_token=0.0, per_sample=0.0))
            loss.backward()
        if weighted:
            throughput.micro_batch(batch.task, pass_tally.tokens)
            tally.add(pass_tally)
    return WindowTotals(tally, counts)
