"""Train Ovis-U1: the six stages of the report's Table 2, on one process or many (torchrun).

  stage  trains                                    tasks (default mix)                 steps   batch   lr
  0      refiner + decoder (from scratch*)         T2I                                 500K    1024    1e-4
  1      adapter: visual head + VTE (from scratch*) understanding, T2I, editing (1:1:1) 1.51K   8192    5e-4
  2      visual encoder + adapter                  understanding, T2I, editing (1:1:1) 2.63K   8192    1e-4
  3      visual encoder + adapter + LLM            understanding                       23K     2240    5e-5
  4      refiner + decoder                         T2I                                 275K    256     5e-5
  5      refiner + decoder                         T2I, editing (1:1)                  325K    256     5e-5
  * the report starts these parts from random weights: pass --scratch to do the same; without it they are
    fine-tuned from --init. Everything a stage does not train is frozen (no gradients, no optimizer state); the
    VAE is always frozen. In stages 1-2 the generation losses flow through the frozen LLM, refiner and decoder
    back into the adapter (and encoder). Mixing ratios, warmup, weight decay and resolution are not in the
    report: the defaults here are our choices.

Losses
  understanding  next-token cross-entropy on the assistant answers (labels from the official chat formatter)
  T2I, editing   flow matching on the VAE latents: x_t = t*noise + (1-t)*x0, target velocity noise - x0 (the
                 official sampler integrates dx/dt = v from t=1 to 0), t logit-normal, shifted like the
                 sampler's schedule when config.json enables timestep_shift (ovis_min/flow.py). Prompts are
                 dropped to the unconditional one (--drop-prompt) and, for edits, the source image too
                 (--drop-image), so that classifier-free guidance works when sampling.

Data: JSONL manifests (--data, repeatable); each line's keys tell its task, image paths are relative to the file:
  {"images": ["a.jpg"], "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                          {"from": "gpt", "value": "A cat."}]}
  {"image": "a.jpg", "caption": "a cat on a sofa"}
  {"source": "a.jpg", "instruction": "make the cat black", "target": "b.jpg"}
  Rows that cannot be used (malformed, missing/unreadable image, too long, no answer) are skipped and counted
  (and replaced by other rows). Generation rows may give their image's "width" and "height": a global batch then
  sorts them by aspect ratio, so that micro-batches hold one bucket (without them, buckets still come out right
  but micro-batches mix more of them). Each manifest is indexed once into MANIFEST.index-HASH.npy next to it
  (remade when the manifest changes), which the other processes and later runs read.
  Generation images are batched by aspect-ratio bucket (--buckets): height x width in multiples of 32 with an area
  near --resolution squared, from 1:4 to 4:1; each image is resized to cover its bucket and center-cropped, an
  edit's target to its source's bucket, and the timestep shift uses the bucket's token count. Understanding keeps
  native resolution and is batched by length (the log reports the padding fraction).

Mixing and loss weighting: each optimizer step trains on one global batch of --batch samples, the tasks in the
  stage's ratios sample by sample; its samples are split into micro-batches over processes and accumulation
  steps, so each process (and micro-batch) draws its own task, and a micro-batch may hold two tasks. The
  understanding cross-entropy is summed over answer tokens and divided by the answer tokens of the whole global
  batch; flow matching is a mean per sample; each task weighs its share of samples. The same global batch gives
  the same gradient on any number of processes and with any --micro-batch, and a checkpoint's data position is
  the same for every process count.

Data loading runs in --workers DataLoader processes per training process, each process reading its own share,
  prefetched, pinned on GPU; the log separates the time the step waited for data from its compute time.

Cached frozen work (decoder stages 0, 4, 5, whose VAE and LLM are frozen):
  torchrun --nproc_per_node 8 train.py cache --stage 4 --init runs/s3 --data T --resolution 1024 --out caches/t2i
  torchrun --nproc_per_node 8 train.py --stage 4 --init runs/s3 --data T --resolution 1024 --cache caches/t2i \\
      --out runs/s4
  The cache holds each row's VAE posterior (training still draws its latent) and LLM condition, and the
  unconditional prompt's; the prompt and image drops stay random. It is resumable (run the same command again),
  split over the processes under torchrun, and refused by a run with other frozen weights, data, resolution,
  buckets or precision.

Checkpoints: OUT/step-NNNNNNNN/ holds the training state: the trained weights, their optimizer state and EMA,
  written by every process in parallel (torch.distributed.checkpoint), and trainer.pt (step, data position, RNG
  state, arguments). Frozen weights are not rewritten: they come from --init, which must stay where it is. A
  step directory counts once its `complete` marker is written, last, with the size and CRC-32 of each of its
  files (checked by --resume and export); OUT/latest names the newest. --resume OUT continues exactly where the
  run stopped, on any number of processes. The last step of a run is also exported in the official layout
  (config.json, tokenizer and preprocessor files copied from --init, every weight under its official name:
  trained ones in float32, frozen ones as --init stores them), so sample.py --weights OUT,
  ovis_min.checkpoint.load_model and --init OUT (the next stage) read it as they read the official release;
  `train.py export` writes one for any step, or for the EMA.
  SIGTERM or SIGUSR1 (what schedulers send a while before they stop a job) to any process of the run, or to all of
  them (Slurm signals every process of the job, DataLoader workers included, which ignore it): every process
  finishes its step, the run saves a checkpoint and exits 0. The signal arriving again (torchrun passes its own
  SIGTERM on) is the same request; Ctrl-C (SIGINT) stops at once, keeping the newest complete checkpoint. Under
  torchrun, which kills the processes 30 s after passing SIGTERM on and dies of SIGUSR1: send SIGTERM, or SIGUSR1
  to the train.py processes only.
  A step whose loss or gradient norm is not finite is skipped with a warning: the weights, optimizer state and
  EMA keep their values, so no checkpoint holds a non-finite weight; --max-nonfinite such steps in a row stop the
  run with an error.

Distributed: torchrun --nproc_per_node N train.py ... runs DDP, or FSDP2 (fully_shard per block) for stage 3,
  which trains the LLM, and for any stage with --parallel fsdp. Gradient accumulation = batch / (micro-batch x
  processes); the default micro-batch is the largest up to 4 that divides it (stage 3's 2240 on 32 processes: 2).
  bf16 autocast on GPU (fp32 master weights), fp32 on CPU. A collective waits --dist-timeout minutes for the other
  processes; rank 0's work alone (indexing new manifests, the final export) is waited for on a separate CPU group,
  for far longer.

Memory: under bf16, frozen weights are stored in bf16 and FSDP gathers weights in bf16 and reduces gradients in
  float32; --parallel fsdp shards the decoder's blocks too; a run without generation tasks (stage 3) keeps the
  decoder and VAE in CPU memory. Gradient checkpointing is on by default for stages 2, 3 and 5
  (--no-grad-checkpointing turns it off). The README has a per-stage memory estimate at full size.

Watching a run: each step's line has the loss per task, speed, an ETA (mean of the last 20 steps) and the
  achieved TFLOP/s with the MFU against the GPU's bf16/fp32 peak (FLOPs counted on the first micro-batch of each
  mix of tasks; no MFU on CPU). --val-data ROWS --val-every N logs the loss per task on held-out rows (fixed seeds, no drops);
  --sample-prompts FILE --sample-every N writes fixed-seed images and answers to OUT/samples/step-NNNNNNNN/. A
  prompts file is JSON lines: {"caption": ...}, {"source": "a.jpg", "instruction": ...} or {"question": ...,
  "image": "a.jpg"}, each optionally with "seed", "steps" (default 30) and "max_new_tokens" (default 64).

Examples (CKPT = the official checkpoint directory, e.g. from `python weights.py download --dir CKPT`;
RUN = torchrun --nproc_per_node 8 train.py; U, T, E = understanding, T2I and editing manifests, HELD = held-out
rows of the stage's tasks, P = sample prompts):
  RUN --stage 0 --init CKPT --scratch --data T --out runs/s0 --val-data HELD --val-every 2000 \\
      --sample-prompts P --sample-every 5000
  RUN --stage 1 --init runs/s0 --scratch --data U --data T --data E --out runs/s1 --val-data HELD --val-every 100 \\
      --sample-prompts P --sample-every 250
  RUN --stage 2 --init runs/s1 --data U --data T --data E --out runs/s2 --val-data HELD --val-every 100
  RUN --stage 3 --init runs/s2 --data U --out runs/s3 --val-data HELD --val-every 1000 --sample-prompts P \\
      --sample-every 1000                            # checkpointing is on by default here
  RUN cache --stage 4 --init runs/s3 --data T --resolution 1024 --out cache/s4   # frozen VAE + LLM work, once
  RUN --stage 4 --init runs/s3 --data T --resolution 1024 --cache cache/s4 --out runs/s4 --parallel fsdp \\
      --grad-checkpointing --ema-decay 0.9999 --workers 8 --sample-prompts P --sample-every 5000
                                                     # the decoder sharded, if DDP does not fit
  RUN --stage 5 --init runs/s4 --data T --data E --out runs/s5 --ema-decay 0.9999 --sample-prompts P \\
      --sample-every 5000 --no-grad-checkpointing    # faster, where the memory allows
  python train.py --stage 5 --init CKPT --data E --mix edit=1 --steps 1000 --batch 8 --micro-batch 2 --lr 1e-5 \\
      --ema-decay 0.999 --out runs/ft                # a small fine-tune on one GPU, with an EMA
  python train.py --resume runs/ft                   # continue an interrupted run with its arguments
  python train.py export runs/ft --ema --out ft-ema  # the EMA of the newest checkpoint, for sample.py --weights

LoRA (--lora RANK): low-rank adapters on the attention and MLP layers of the stage's part (--lora-targets), the
  rest frozen in bf16: only the adapters have gradients, AdamW state and EMA, so a fine-tune fits one smaller GPU.
  Checkpoints, --resume, DDP/FSDP, --cache, validation and samples work as without it. The run's last step (and
  `train.py export RUN --out DIR`) holds the adapters merged into the official layout; --lora-only exports them
  alone, for sample.py --lora FILE:
  python train.py --stage 5 --init CKPT --data E --mix edit=1 --steps 2000 --batch 8 --micro-batch 1 --lr 1e-4 \\
      --lora 32 --out runs/edit-lora                 # an editing fine-tune on one GPU
  python train.py --stage 3 --init CKPT --data U --steps 2000 --batch 16 --micro-batch 1 --lr 1e-4 --lora 16 \\
      --out runs/vqa-lora                            # an understanding fine-tune on one GPU (the LLM's layers)
  python train.py export runs/edit-lora --lora-only --out edit-lora.safetensors
  python sample.py --lora edit-lora.safetensors --image photo.jpg --prompt "make it snow"
"""
import sys

from ovis_min.cli import ctrl_c_quits_quietly, ctrl_c_raises, real, whole_number

ctrl_c_quits_quietly("train.py")  # covers the seconds the imports below take

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from ovis_min.checkpoint import (LATEST_FILE, CheckpointError, build_model, load_checkpoint, read_config,  # noqa: E402
                                 read_tokenizer, tied_groups)
from ovis_min.cli import TrainError  # noqa: E402
from ovis_min.train.data import (SKIP_REASONS, DataConfig, DataError, Loader, MicroBatchData, Mixture,  # noqa: E402
                                 bucket_table, index_manifests, parse_mix)
from ovis_min.train.distributed import (WAIT_TIMEOUT, Runtime, all_gather, all_reduce_sum, fingerprint,  # noqa: E402
                                        main_rank_first, setup_runtime, wait_for_every_rank, wrap)
from ovis_min.files import disk_full, remove_leftovers, temp_prefix  # noqa: E402
from ovis_min.decode import NonFiniteError  # noqa: E402
from ovis_min.hub import resolve_source  # noqa: E402
from ovis_min.train.frozen_cache import (CacheError, FrozenCache, build_cache, settings,  # noqa: E402
                                         weights_fingerprint)
from ovis_min.train.accumulation import backward_window, summary  # noqa: E402
from ovis_min.train.losses import TrainStep  # noqa: E402
from ovis_min.perf import peak_memory_gb  # noqa: E402
from ovis_min.train.samples import read_sample_prompts, write_samples  # noqa: E402
from ovis_min.train.stages import (DECODER, DEFAULT_MICRO_BATCH, SCRATCH_STAGES, STAGES, apply_memory_policy,  # noqa: E402
                                   enable_gradient_checkpointing, init_adapter_, init_decoder_, learning_rate,
                                   make_optimizer, micro_batch_for, set_trainable, uses_generator)
from ovis_min.train.ema import EMA  # noqa: E402
from ovis_min.train.throughput import Throughput, format_duration, peak_flops  # noqa: E402
from ovis_min.train.checkpoint import (FINITE_CHECKPOINTS, Saver, StopRequest, abandon_later,  # noqa: E402
                                       checked_source, export, read_trainer_state, resolve_resume, restore,
                                       source_record, trim_log)
from ovis_min.train.validation import format_validation, load_held_out, validate  # noqa: E402
from ovis_min.lora import TARGETS as LORA_TARGETS, add_adapters  # noqa: E402
from ovis_min.train.adapters import MAX_LORA_ALPHA, export_adapters, fill_lora_defaults  # noqa: E402

ctrl_c_raises()


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
DIST_TIMEOUT_HELP = ("under torchrun: how long a process waits for the others in a collective before the run fails "
                     "(default 30; NCCL's own is 10). Work that rank 0 does alone (indexing new manifests, the "
                     "export at the end) and the end of train.py cache are waited for up to "
                     f"{WAIT_TIMEOUT.total_seconds() / 3600:g} hours instead")
RESUME_CHECKED = ("stage", "batch", "micro_batch", "lr", "min_lr", "warmup", "steps", "mix", "seed", "resolution",
                  "drop_prompt", "drop_image", "weight_decay", "overfit", "buckets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), help="training stage of Table 2 (required "
                        "unless resuming)")
    parser.add_argument("--init", type=Path, help="checkpoint in the official layout to start from (the official "
                        "release, or a step/run directory of an earlier stage)")
    parser.add_argument("--scratch", action="store_true", help="start the parts stage 0 (refiner + decoder) or "
                        "stage 1 (adapter) trains from random weights, as the report does")
    parser.add_argument("--resume", type=Path, help="continue a run: its directory (newest checkpoint) or a step "
                        "directory; arguments not given are the run's own")
    parser.add_argument("--data", type=Path, action="append", default=[], help="JSONL manifest (repeatable)")
    parser.add_argument("--mix", help="task ratios, e.g. understanding=2,t2i=1,edit=1 (default: the stage's tasks "
                        "in the ratios of the table above)")
    parser.add_argument("--out", type=Path, help="run directory for checkpoints and log.jsonl")
    parser.add_argument("--steps", type=whole_number(1), help="optimizer steps (default: the stage's)")
    parser.add_argument("--batch", type=whole_number(1), help="samples per optimizer step over all processes (default: the "
                        "stage's)")
    parser.add_argument("--micro-batch", type=whole_number(1), help="samples per forward pass per process "
                        f"(default {DEFAULT_MICRO_BATCH}, or the largest below it that splits --batch evenly over "
                        "the processes)")
    parser.add_argument("--lr", type=real(0, 1, open_low=True), help="peak learning rate, at most 1 (default: the "
                        "stage's)")
    parser.add_argument("--min-lr", type=real(0, 1), help="final learning rate of the cosine, at most --lr (default "
                        "lr/10)")
    parser.add_argument("--warmup", type=whole_number(1), help="linear warmup steps (default 2%% of steps, at least 1, at most "
                        "2000)")
    parser.add_argument("--weight-decay", type=real(0), default=0.01, help="AdamW weight decay, below 1 / lr "
                        "(default 0.01)")
    parser.add_argument("--beta1", type=real(0, 1, open_high=True), default=0.9, help="AdamW beta1 (default 0.9)")
    parser.add_argument("--beta2", type=real(0, 1, open_high=True), default=0.95, help="AdamW beta2 (default 0.95)")
    parser.add_argument("--grad-clip", type=real(0), default=1.0, help="max gradient norm (default 1; 0: no "
                        "clipping)")
    parser.add_argument("--resolution", type=whole_number(32), help="generation images have about this side squared "
                        "as area (see --buckets), a multiple of 16 (default: 512 for stages 0-2, 1024 for 4-5)")
    parser.add_argument("--drop-prompt", type=real(0, 1), default=0.1, help="rate at which generation prompts become "
                        "the unconditional prompt (edits keep their image; default 0.1)")
    parser.add_argument("--drop-image", type=real(0, 1), default=0.05, help="rate at which edits lose prompt and image "
                        "(default 0.05)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast dtype (default bf16 on GPU, "
                        "fp32 on CPU); weights and optimizer state are float32 either way")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="recompute block "
                        "activations in the backward pass (less memory, ~30%% more compute; default: on for "
                        "stages 2, 3 and 5, whose estimated memory per GPU exceeds 60 GB without it, see README)")
    parser.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                        help="multi-process engine (auto: FSDP for stage 3, DDP otherwise)")
    parser.add_argument("--dist-timeout", type=real(0, open_low=True), default=30, metavar="MINUTES",
                        help=DIST_TIMEOUT_HELP)
    parser.add_argument("--max-nonfinite", type=whole_number(1), default=5, metavar="N", help="a step whose loss "
                        "or gradient norm is not finite is skipped with a warning (no update, the EMA and "
                        "checkpoints keep finite weights); N of them in a row stop the run with an error "
                        "(default 5)")
    parser.add_argument("--save-every", type=whole_number(1), default=1000, help="steps between checkpoints (and at the end; "
                        "default 1000)")
    parser.add_argument("--keep", type=whole_number(0), default=3, help="complete checkpoints to keep, the newest "
                        "always among them (default 3; 0: all)")
    parser.add_argument("--stop-after", type=whole_number(1), help="stop after this step with a checkpoint, keeping the "
                        "schedule of --steps (for jobs with a time limit)")
    parser.add_argument("--buckets", choices=("aspect", "none"), default="aspect", help="generation images: "
                        "'aspect' batches them by aspect-ratio bucket (height x width in multiples of 32 with an "
                        "area near --resolution squared, 1:4 to 4:1), each covered and center-cropped to its "
                        "bucket, an edit's target to its source's; 'none': square --resolution crops "
                        "(default aspect)")
    parser.add_argument("--cache", type=Path, help="decoder stages (0, 4, 5): train from the VAE posteriors and LLM "
                        "conditions precomputed by `train.py cache` (see above) instead of running the frozen VAE "
                        "encoder and LLM every step, e.g. --cache caches/t2i-1024")
    parser.add_argument("--workers", type=whole_number(0), default=4, help="DataLoader worker processes per "
                        "process that read and preprocess the data ahead of the step, e.g. --workers 8 (default 4; "
                        "0: in the training process)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="seed of the data order, --scratch weights, noise and "
                        "dropout (default 0)")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--overfit", type=whole_number(0), default=0, metavar="N", help="debugging: train on the first N rows "
                        "of each task over and over, with the same noise and timesteps (the loss must fall)")
    # checkpoints
    parser.add_argument("--ema-decay", type=real(0, 1, open_high=True), metavar="D", help="keep a float32 EMA of the "
                        "trained weights, ema = D*ema + (1-D)*weights after every step, saved with the checkpoints "
                        "(e.g. --ema-decay 0.9999 for stages 4-5; export it with train.py export RUN --ema)")
    lora = parser.add_argument_group("LoRA (ovis_min/lora.py)")
    lora.add_argument("--lora", type=whole_number(1), metavar="RANK", help="train low-rank adapters of this rank on "
                      "the stage's linear layers instead of the layers themselves, which stay frozen (in bf16 on a "
                      "GPU); export them with train.py export RUN --lora-only, e.g. --lora 16")
    lora.add_argument("--lora-alpha", type=real(0, MAX_LORA_ALPHA, open_low=True), metavar="A", help="the adapters' "
                      f"output is scaled by A / RANK (default A = RANK, at most {MAX_LORA_ALPHA:g})")
    lora.add_argument("--lora-targets", nargs="+", choices=tuple(LORA_TARGETS), metavar="PART", help="the parts "
                      "whose attention and MLP layers get adapters: decoder, refiner, llm, encoder, head (default: "
                      "decoder refiner for stages 0, 4, 5; llm for stage 3; encoder head for stage 2; head for 1)")
    watch = parser.add_argument_group("watching a run")
    watch.add_argument("--val-data", type=Path, metavar="ROWS", help="held-out manifest (the --data format): its "
                       "loss per task is logged every --val-every steps, with fixed seeds and no prompt/image drops")
    watch.add_argument("--val-every", type=whole_number(1), metavar="N", help="steps between validations (default "
                       "1000; needs --val-data)")
    watch.add_argument("--sample-prompts", type=Path, metavar="FILE", help="JSONL of captions, edits and questions "
                       "(format in ovis_min/train/samples.py) sampled with fixed seeds every --sample-every steps into "
                       "OUT/samples/step-NNNNNNNN/")
    watch.add_argument("--sample-every", type=whole_number(1), metavar="N", help="steps between samples (default "
                       "1000; needs --sample-prompts)")
    return parser


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py export", description="Write a training checkpoint in the "
                                     "official layout, for sample.py --weights, load_model and --init. Example: "
                                     "python train.py export runs/s5 --ema --out s5-ema")
    parser.add_argument("run", type=Path, help="run directory (its newest complete checkpoint) or step directory")
    parser.add_argument("--step", type=whole_number(1), help="the step to export (default: the newest)")
    parser.add_argument("--ema", action="store_true", help="the EMA of the weights (a run with --ema-decay)")
    parser.add_argument("--lora-only", action="store_true", help="a --lora run's adapters alone, as one "
                        "safetensors file for sample.py --lora (without it: merged into the official layout)")
    parser.add_argument("--out", type=Path, required=True, help="new directory to write (with --lora-only: the "
                        "file, e.g. style.safetensors)")
    return parser


def build_cache_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py cache", description="Precompute what the frozen VAE and LLM "
                                     "make of every generation row for the decoder stages (0, 4, 5), for "
                                     "train.py --cache. Resumable (an interrupted run continues), split over the "
                                     "processes under torchrun. Example: torchrun --nproc_per_node 8 train.py cache "
                                     "--stage 4 --init runs/s3 --data T --resolution 1024 --out caches/t2i-1024")
    parser.add_argument("--stage", type=int, choices=[s for s in sorted(STAGES) if STAGES[s].trains == DECODER],
                        required=True, help="the decoder stage the cache is for")
    parser.add_argument("--init", type=Path, required=True, help="the weights the stage starts from (as train.py)")
    parser.add_argument("--data", type=Path, action="append", required=True, help="JSONL manifest (repeatable, as "
                        "train.py's, in the same order)")
    parser.add_argument("--out", type=Path, required=True, help="the cache folder")
    parser.add_argument("--resolution", type=whole_number(32), help="as train.py's (default: the stage's)")
    parser.add_argument("--buckets", choices=("aspect", "none"), default="aspect", help="as train.py's")
    parser.add_argument("--micro-batch", type=whole_number(1), default=16, help="rows per forward pass (default 16)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="as train.py's (default bf16 on GPU)")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--dist-timeout", type=real(0, open_low=True), default=30, metavar="MINUTES",
                        help=DIST_TIMEOUT_HELP)
    return parser


def cache_main(argv: list[str]) -> dict[str, int]:
    """`train.py cache`: returns the rows written per task."""
    args = build_cache_parser().parse_args(argv)
    for manifest in args.data:
        if not manifest.is_file():
            raise TrainError(f"--data {manifest}: no such file")
    resolution = args.resolution or STAGES[args.stage].resolution
    if resolution % (16 if args.buckets == "none" else 32):
        raise TrainError(f"--resolution {resolution}: give a multiple of 32 (16 with --buckets none), as for training")
    runtime = setup_runtime(args.device, timedelta(minutes=args.dist_timeout))
    try:
        source = resolve_source(args.init)
        config = read_config(source)
        cfg = DataConfig(read_tokenizer(source), config.preprocess, config.multimodal_max_length, resolution,
                         buckets=None if args.buckets == "none" else bucket_table(resolution))
        with main_rank_first(runtime):
            manifests = index_manifests(args.data)
        tasks = [task for task in STAGES[args.stage].mix if len(manifests.rows[task])]
        model = load_checkpoint(build_model(config), source, dtype=torch.float32, device=runtime.device).eval()
        precision = args.precision or ("bf16" if runtime.device.type == "cuda" else "fp32")
        autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        wanted = settings(weights_fingerprint(model, runtime), manifests, cfg, precision)
        written = build_cache(model, manifests, tasks, cfg, args.out, runtime, args.micro_batch, wanted, autocast)
        wait_for_every_rank(runtime)  # the ranks' shares may take them very different times
        print(f"cache {args.out}: {', '.join(f'{t} {len(manifests.rows[t])} rows' for t in tasks)} "
              f"(this process wrote {', '.join(f'{t} {n}' for t, n in written.items())})", flush=True)
        return written
    except CacheError as error:
        raise TrainError(str(error)) from None
    finally:
        if runtime.world > 1:
            dist.destroy_process_group()


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags the command line really gave (a flag given with its default value counts)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Path | None, dict | None]:
    """(arguments, step directory to resume, its trainer state). On --resume, every argument not given on the
    command line is the resumed run's."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resume_dir = trainer_state = None
    if args.resume is not None:
        resume_dir, why = resolve_resume(args.resume)
        if os.environ.get("RANK", "0") == "0":
            print(f"resuming from {resume_dir}: {why}", file=sys.stderr)
        trainer_state = read_trainer_state(resume_dir)
        given = given_flags(argv)
        for key, value in trainer_state["args"].items():
            if key in vars(args) and key not in given:
                setattr(args, key, [Path(v) for v in value] if key == "data" else
                        Path(value) if key == "init" and value is not None else value)
        if args.stage != trainer_state["args"]["stage"]:
            parser.error(f"{resume_dir} is a stage-{trainer_state['args']['stage']} run; to go on with stage "
                         f"{args.stage}, start a new run with --init {resume_dir}")
        args.out = args.out or resume_dir.parent
    if args.stage is None or args.out is None or (args.init is None and resume_dir is None):
        parser.error("give --stage, --init and --out (or --resume)")
    if not args.data:
        parser.error("give at least one --data manifest (the format is described above)")
    for manifest in args.data:
        if not Path(manifest).is_file():
            parser.error(f"--data {manifest}: no such file")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: a file, not a folder; choose another --out")
    if resume_dir is None and args.out.is_dir() and (args.out / LATEST_FILE).exists():
        parser.error(f"--out {args.out} already holds a run; continue it with --resume {args.out}, or choose "
                     "another --out")
    reason = unwritable(args.out)
    if reason:
        parser.error(f"--out {args.out}: cannot write there ({reason}); choose another --out")
    if isinstance(args.mix, str):
        try:
            args.mix = parse_mix(args.mix)
        except ValueError as error:
            parser.error(str(error))
    if args.device is not None:
        check_device(parser, args.device)
    check_watch_flags(parser, args)
    return args, resume_dir, trainer_state


def unwritable(folder: Path) -> str | None:
    """Why no file can be made in `folder` or in the folder it would be created in (a read-only file system, no
    permission, a file where a folder should be), or None. Creates nothing: a run that stops early leaves no trace."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        descriptor, probe = tempfile.mkstemp(prefix=temp_prefix(), dir=existing)
    except OSError as error:
        return f"{existing}: {error.strerror or error}"
    os.close(descriptor)
    os.unlink(probe)
    return None


def check_watch_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.val_data is not None and not Path(args.val_data).is_file():
        parser.error(f"--val-data {args.val_data}: no such file")
    if args.val_every is not None and args.val_data is None:
        parser.error("--val-every: give the held-out rows with --val-data ROWS")
    if args.sample_prompts is not None and not Path(args.sample_prompts).is_file():
        parser.error(f"--sample-prompts {args.sample_prompts}: no such file")
    if args.sample_every is not None and args.sample_prompts is None:
        parser.error("--sample-every: give the prompts with --sample-prompts FILE")


def check_device(parser: argparse.ArgumentParser, name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device name; use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {name}: train.py runs on cuda or cpu")


def fill_defaults(args: argparse.Namespace) -> None:
    stage = STAGES[args.stage]
    args.steps = stage.steps if args.steps is None else args.steps
    args.batch = stage.batch if args.batch is None else args.batch
    args.lr = stage.lr if args.lr is None else args.lr
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if args.min_lr > args.lr:
        raise TrainError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine decays from --lr to "
                         "--min-lr; give a smaller --min-lr")
    if args.lr * args.weight_decay >= 1:  # AdamW multiplies the weights by 1 - lr * weight decay each step
        raise TrainError(f"--weight-decay {args.weight_decay:g} at --lr {args.lr:g} would flip the weights' sign "
                         "every step (AdamW scales them by 1 - lr x weight decay); give a weight decay below "
                         f"{1 / args.lr:g}")
    args.warmup = min(2000, max(1, args.steps // 50)) if args.warmup is None else args.warmup
    args.resolution = stage.resolution if args.resolution is None else args.resolution
    args.mix = args.mix or dict(stage.mix)
    args.grad_checkpointing = stage.grad_checkpointing if args.grad_checkpointing is None else args.grad_checkpointing
    if args.val_data is not None:
        args.val_every = args.val_every or 1000
    if args.sample_prompts is not None:
        args.sample_every = args.sample_every or 1000
    if args.resolution % 16:
        raise TrainError(f"--resolution {args.resolution} must be a multiple of 16 (8x VAE, then 2x2 packing)")
    if args.resolution % 32 and args.buckets != "none":
        raise TrainError(f"--resolution {args.resolution}: aspect-ratio buckets have sides in multiples of 32; give "
                         "a multiple of 32, or --buckets none for square crops")
    if args.scratch and args.stage not in SCRATCH_STAGES:
        first = " and ".join(map(str, SCRATCH_STAGES))
        raise TrainError(f"--scratch: the report starts only stages {first} from random weights; stage {args.stage} "
                         f"continues from the previous stage's checkpoint (--init)")
    stray = [task for task in args.mix if task not in stage.mix]
    if stray:
        raise TrainError(f"--mix: stage {args.stage} ({stage.name}) trains on {', '.join(stage.mix)}, not "
                         f"{', '.join(stray)}")
    if not any(args.mix.values()):
        raise TrainError("--mix: every ratio is 0; give at least one task a ratio above 0")
    args.cache = None if args.cache is None else Path(args.cache)  # a resumed run's arguments hold strings
    if args.cache is not None and stage.trains != DECODER:
        raise TrainError(f"--cache: stage {args.stage} trains through the LLM or the encoder, which a cache would "
                         "freeze; only the decoder stages (0, 4, 5) train from a cache")
    if args.cache is not None and not args.cache.is_dir():
        raise TrainError(f"--cache {args.cache}: no such folder; make it with python train.py cache")
    if args.stop_after is not None and args.stop_after > args.steps:
        raise TrainError(f"--stop-after {args.stop_after} is past --steps {args.steps}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run training; returns rank 0's per-step log records (tests call this in-process)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
    if argv[:1] == ["export"]:
        options = build_export_parser().parse_args(argv[1:])
        write = export_adapters if options.lora_only else export
        print(f"wrote {write(options.run, options.out, options.ema, options.step)}")
        return []
    args, resume_dir, trainer_state = parse_args(argv)
    fill_defaults(args)
    fill_lora_defaults(args, trainer_state)
    if trainer_state is not None:
        changed = [f"{k} {trainer_state['args'][k]} -> {vars(args)[k]}" for k in RESUME_CHECKED
                   if trainer_state["args"].get(k) != vars(args)[k]]
        if changed:
            print(f"warning: resuming with different arguments ({'; '.join(changed)}): the run will not continue "
                  f"exactly as it would have", file=sys.stderr)

    runtime = setup_runtime(args.device, timedelta(minutes=args.dist_timeout))
    try:
        return train(args, runtime, resume_dir, trainer_state)
    finally:
        if runtime.world > 1:
            # DDP's reducer must go before its process group: freed later, by the garbage collector at exit, it
            # can abort the process.
            gc.collect()
            dist.destroy_process_group()


def run_cli() -> None:
    """main() for the command line: the errors a user can cause become one line and a non-zero exit."""
    try:
        main()
    except (CheckpointError, DataError) as error:
        sys.exit(f"train.py: error: {error}")
    except NonFiniteError as error:  # from --sample-prompts: NaN weights, which every later step keeps
        sys.exit(f"train.py: error: sampling: {error}: the trained weights hold NaN or infinite values (the run "
                 "diverged); resume from an earlier step directory with a lower --lr")
    except KeyboardInterrupt:
        sys.exit("\ntrain.py: interrupted; the newest complete checkpoint is kept: continue with --resume OUT")
    except OSError as error:
        if disk_full(error):
            sys.exit(f"train.py: error: the disk is full ({error.filename or 'writing the log'}); free some space "
                     "and continue with --resume OUT")
        # --out and the inputs were checked first: this is a file system failing or changing under the run
        sys.exit(f"train.py: error: {error.filename or 'a file'}: {error.strerror or error}")


def train(args, runtime: Runtime, resume_dir: Path | None, trainer_state: dict | None) -> list[dict]:
    stage = STAGES[args.stage]
    source = checked_source(trainer_state, runtime) if trainer_state is not None else resolve_source(args.init)
    try:
        args.micro_batch = micro_batch_for(args.batch, runtime.world, args.micro_batch)
    except ValueError as error:
        raise TrainError(str(error)) from None
    accumulation = args.batch // (args.micro_batch * runtime.world)
    precision = args.precision or ("bf16" if runtime.device.type == "cuda" else "fp32")
    out = Path(args.out)

    config = read_config(source)
    # The data first: a missing manifest or task should fail before minutes of loading.
    data_cfg = DataConfig(read_tokenizer(source), config.preprocess, config.multimodal_max_length, args.resolution,
                          args.drop_prompt, args.drop_image,
                          buckets=None if args.buckets == "none" else bucket_table(args.resolution))
    try:
        with main_rank_first(runtime):  # rank 0 indexes new manifests; the others then read its index files
            manifests = index_manifests(args.data)
        mixture = Mixture(manifests, args.mix, args.seed, args.overfit)
    except (ValueError, FileNotFoundError) as error:
        raise TrainError(f"stage {args.stage} ({stage.name}) mixes {args.mix}: {error}") from None
    held_out = None
    if args.val_data is not None:
        try:
            held_out = load_held_out(Path(args.val_data), list(mixture.ratios), data_cfg, args.micro_batch)
        except ValueError as error:
            raise TrainError(str(error)) from None
    sample_prompts = None
    if args.sample_prompts is not None:
        try:
            sample_prompts = read_sample_prompts(Path(args.sample_prompts), list(mixture.ratios))
        except ValueError as error:
            raise TrainError(str(error)) from None

    # The model, in host memory in the checkpoint's dtypes (frozen bf16 weights stay the mapped files) until the
    # memory policy gives the stage's trained parts float32 master weights and moves it to the device.
    model = load_checkpoint(build_model(config), source, dtype=None, device="cpu")
    # what the cache's values depend on, as loaded (before sharding and the bf16 storage of frozen weights)
    weights_print = weights_fingerprint(model, runtime) if args.cache is not None else None
    trained = set(set_trainable(model, args.stage))
    trained |= {alias for group in tied_groups(model) if trained & set(group) for alias in group}  # lm_head
    parallel = args.parallel if args.parallel != "auto" else "fsdp" if "llm." in stage.trains else "ddp"
    sharded = parallel == "fsdp" and runtime.world > 1
    apply_memory_policy(model, mixture.ratios, precision, runtime.device, sharded)
    if args.scratch and trainer_state is None:
        torch.manual_seed(args.seed)  # every rank draws the same random weights
        if args.stage == 0:
            init_decoder_(model.visual_generator.backbone)
        else:
            init_adapter_(model)
    if args.lora:  # only the adapters train; every process draws the same ones
        trained = set(add_adapters(model, tuple(args.lora_targets), args.lora, args.lora_alpha, args.seed))
    torch.manual_seed(args.seed + runtime.rank)
    if args.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    step_module = TrainStep(model)
    wrapped = wrap(step_module, runtime, parallel, precision, uses_generator(mixture.ratios))
    optimizer = make_optimizer(step_module, args)
    ema = EMA(model, args.ema_decay) if args.ema_decay else None
    frozen = trainer_state["source"] if trainer_state is not None else source_record(source, runtime)

    start = 0
    if trainer_state is not None:
        start = restore(resume_dir, trainer_state, step_module, optimizer, ema, mixture, runtime)

    cache = None
    if args.cache is not None:
        try:
            cache = FrozenCache(args.cache, settings(weights_print, manifests, data_cfg, precision), manifests,
                                [task for task in mixture.ratios if task != "understanding"])
        except CacheError as error:
            raise TrainError(str(error)) from None
    stop_request = StopRequest()  # before the loader's workers start: see StopRequest
    # after restore: the loader starts at the restored data position
    data = MicroBatchData(mixture, data_cfg, cache)
    loader = Loader(mixture, data, args.batch, args.micro_batch, runtime.rank, runtime.world, args.workers,
                    pin_memory=runtime.device.type == "cuda")
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(out):
            print(f"note: removed {leftover.name}, a partial checkpoint of a run that was killed", file=sys.stderr)
        if trainer_state is not None:
            trim_log(out / "log.jsonl", start)
            for later in abandon_later(out, start):
                print(f"note: {later.name} continues the run past {resume_dir.name} another way; it will be "
                      "replaced", file=sys.stderr)
        counts = sum(p.numel() for n, p in model.named_parameters() if n in trained)
        print(f"stage {args.stage} ({stage.name}): training {counts / 1e6:.2f}M parameters ({len(trained)} tensors) "
              f"on {', '.join(f'{t} {r:g}' for t, r in mixture.ratios.items())}; {runtime.world} process(es) x "
              f"micro-batch {args.micro_batch} x {accumulation} accumulation = batch {args.batch}; {precision} on "
              f"{runtime.device}; steps {start}..{args.steps}; "
              f"{', '.join(f'{t} {len(r)} rows' for t, r in manifests.rows.items() if len(r))}"
              + (f"; {manifests.malformed} malformed lines" if manifests.malformed else ""))

    autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    params = [p for p in step_module.parameters() if p.requires_grad]
    stop = min(args.steps, args.stop_after or args.steps)
    records = []
    throughput = Throughput(peak_flops(runtime.device, precision))
    log = open(out / "log.jsonl", "a") if runtime.main else None
    saver = Saver(out, frozen, args, runtime)
    nonfinite_in_a_row = 0
    for step in range(start, stop):
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        began = time.perf_counter()
        micro_batches = [next(loader) for _ in range(accumulation)]  # in host memory until their pass
        mixture.advance(args.batch)  # to the position the loader has now delivered
        data_wait = time.perf_counter() - began
        window = backward_window(wrapped, micro_batches, runtime, autocast, throughput,
                                 placeholder=data.placeholder if sharded else None)
        grad_norm = nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        values = window.values()
        totals = all_reduce_sum([*values, throughput.step_flops,
                                 *(sum(m.skipped[r] for m in micro_batches) for r in SKIP_REASONS),
                                 torch.isfinite(grad_norm).logical_not()], runtime)
        loss, task_loss, tokens, padding = summary(totals[:len(values)])
        skipped = mixture.add_skipped(dict(zip(SKIP_REASONS, map(int, totals[len(values) + 1:-1]))))
        # A non-finite loss or gradient never reaches the weights, the optimizer state or the EMA: the step is
        # skipped (its data is spent, the schedule goes on). The ranks decide on the same all-reduced numbers.
        finite = math.isfinite(loss) and totals[-1] == 0
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        if finite:
            optimizer.step()
            if ema is not None:
                ema.update()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        record = {"step": step + 1, "loss": loss, "task_loss": task_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "nonfinite": not finite, "samples_per_s": args.batch / elapsed,
                  "tokens_per_s": tokens / elapsed, "memory_gb": peak_memory_gb(runtime.device),
                  "data_wait_s": data_wait, "compute_s": elapsed - data_wait, "padding": padding,
                  "skipped": {reason: n for reason, n in skipped.items() if n},
                  **throughput.end_step(elapsed, totals[len(values)], runtime.world, stop - step - 1)}
        if runtime.main:
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(format_record(record, args.steps), flush=True)
        if not finite:
            skip_nonfinite_step(record, nonfinite_in_a_row, args, runtime, saver)

        if held_out is not None and (step + 1) % args.val_every == 0:
            record = {"step": step + 1, "val_loss": validate(step_module, held_out, runtime, autocast)}
            if runtime.main:
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(format_validation(record), flush=True)
        if sample_prompts is not None and (step + 1) % args.sample_every == 0:
            write_samples(model, data_cfg.tokenizer, sample_prompts,
                          out / "samples" / f"step-{step + 1:08d}" if runtime.main else None, args.resolution,
                          runtime.device, autocast, fsdp_root=wrapped if sharded else None,
                          weights=None if ema is None else ema.weights)

        preempted = stop_request.agreed(runtime)
        last = step + 1 == stop or preempted
        saver.poll()
        if last or (step + 1) % args.save_every == 0:
            saver.save(step + 1, step_module, optimizer, ema, mixture, last)
        if preempted:
            if runtime.main:
                print(f"stopped after step {step + 1}, as a stop signal asked; continue with --resume {out}",
                      flush=True)
            break
    stop_request.close()

    if runtime.world > 1 and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        prints = all_gather(fingerprint(model), runtime)
        if runtime.main:
            record = {"replicas": prints, "replicas_identical": len(set(prints)) == 1}
            records.append(record)
            log.write(json.dumps(record) + "\n")
            print("replicas identical" if record["replicas_identical"] else
                  f"WARNING: the {runtime.world} replicas differ", flush=True)
    loader.close()
    if log:
        log.close()
    if runtime.world > 1:
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still talks aborts the peer
    return records


def skip_nonfinite_step(record: dict, in_a_row: int, args, runtime: Runtime, saver: Saver) -> None:
    """A warning for a skipped step; the error that stops the run after --max-nonfinite of them in a row (a
    diverged run does not recover by itself, its later steps are all non-finite too)."""
    if runtime.main:
        print(f"warning: step {record['step']}: loss {record['loss']:g}, gradient norm {record['grad_norm']:g}: "
              f"not finite, the step is skipped (weights, optimizer state and EMA unchanged); {in_a_row} in a row, "
              f"the run stops at {args.max_nonfinite} (--max-nonfinite)", file=sys.stderr, flush=True)
    if in_a_row >= args.max_nonfinite:
        saver.wait()
        raise TrainError(f"steps {record['step'] + 1 - in_a_row}-{record['step']}: {in_a_row} non-finite steps in "
                         f"a row (--max-nonfinite), the run diverged; {FINITE_CHECKPOINTS.format(out=args.out)}")


def format_record(record: dict, steps: int) -> str:
    tasks = ", ".join(f"{t} {v:.4f}" for t, v in record["task_loss"].items())
    line = (f"step {record['step']}/{steps} | loss {record['loss']:.4f} ({tasks}) | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['samples_per_s']:.1f} samples/s "
            f"{record['tokens_per_s']:.0f} tok/s | data wait {record['data_wait_s']:.2f}s compute "
            f"{record['compute_s']:.2f}s | mem {record['memory_gb']:.1f} GB")
    if record["padding"] is not None:
        line += f" | padding {record['padding']:.0%}"
    line += f" | {record['tflops']:.2f} TFLOP/s" + (f" mfu {100 * record['mfu']:.1f}%" if record["mfu"] else "")
    line += f" | eta {format_duration(record['eta_s'])}"
    if record["skipped"]:
        line += " | skipped " + ", ".join(f"{reason} {n}" for reason, n in record["skipped"].items())
    return line


if __name__ == "__main__":
    run_cli()
