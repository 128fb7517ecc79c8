"""The six training stages of the report's Table 2: what each trains, on which tasks, for how long, and how the
parts it starts from scratch are initialised; the learning-rate schedule and the optimiser they share."""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from ..model import OvisU1


@dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple[str, ...]  # state-dict prefixes of the trained parameters
    mix: dict  # default task ratios
    steps: int
    batch: int  # samples per optimizer step, over all processes
    lr: float
    resolution: int  # generation images (our choice)
    grad_checkpointing: bool  # by default: where memory.py's estimate without it exceeds 60 GB (0.75 of an 80 GB GPU)


DECODER = ("visual_generator.backbone.",)  # the refiner is the decoder's `txt_in`
ADAPTER = ("visual_tokenizer.head.", "vte.")
ENCODER = ("visual_tokenizer.backbone.",)
STAGES = {
    0: Stage("visual decoder pretraining", DECODER, {"t2i": 1}, 500_000, 1024, 1e-4, 512, False),
    1: Stage("adapter pretraining", ADAPTER, {"understanding": 1, "t2i": 1, "edit": 1}, 1510, 8192, 5e-4, 512,
             False),
    2: Stage("visual encoder alignment", ENCODER + ADAPTER, {"understanding": 1, "t2i": 1, "edit": 1}, 2630, 8192,
             1e-4, 512, True),
    3: Stage("understanding learning", ENCODER + ADAPTER + ("llm.",), {"understanding": 1}, 23_000, 2240, 5e-5, 512,
             True),
    4: Stage("generation learning", DECODER, {"t2i": 1}, 275_000, 256, 5e-5, 1024, False),
    5: Stage("generation fine-tuning", DECODER, {"t2i": 1, "edit": 1}, 325_000, 256, 5e-5, 1024, True),
}
DEFAULT_MICRO_BATCH = 4  # samples per forward pass and process
GENERATION_TASKS = ("t2i", "edit")
SCRATCH_STAGES = (0, 1)  # the parts these stages train start from random weights in the report
# The adapter reads the encoder's last block output before its final norm, so no gradient ever reaches this norm:
# it stays frozen rather than counting as trained.
NEVER_USED = ("visual_tokenizer.backbone.trunk.post_trunk_norm.",)


def micro_batch_for(batch: int, processes: int, micro_batch: int | None) -> int:
    """Samples per forward pass and process: `micro_batch` (--micro-batch) if given, else the largest up to
    DEFAULT_MICRO_BATCH that splits `batch` evenly over the processes (stage 3's 2240 on 8, 16, 32 and 64
    processes: 4, 4, 2 and 1). ValueError, naming what works, if none does."""
    fits = [m for m in range(1, batch // processes + 1) if batch % (m * processes) == 0]
    if not fits:
        raise ValueError(f"--batch {batch} cannot be split over {processes} processes: give a multiple of "
                         f"{processes}")
    if micro_batch is None:
        return max(m for m in fits if m <= DEFAULT_MICRO_BATCH)
    if micro_batch not in fits:
        works = max(m for m in fits if m < micro_batch)
        raise ValueError(f"--batch {batch} is not a multiple of micro-batch x processes = {micro_batch} x "
                         f"{processes}: --micro-batch {works} works, or adjust --batch")
    return micro_batch


def uses_generator(mix: dict[str, float]) -> bool:
    """Whether a run on these task ratios ever runs the decoder or the VAE."""
    return any(mix.get(task, 0) > 0 for task in GENERATION_TASKS)


def set_trainable(model: OvisU1, stage: int) -> list[str]:
    """requires_grad on the stage's parts only; returns the trained parameter names."""
    trained = []
    for name, param in model.named_parameters():
        train = name.startswith(STAGES[stage].trains) and not name.startswith(NEVER_USED)
        param.requires_grad_(train)
        if train:
            trained.append(name)
    return trained


@torch.no_grad()
def init_decoder_(decoder: nn.Module) -> None:
    """Random refiner + decoder, DiT style: xavier linears, zero biases, unit norms, and zero adaLN modulations
    and output layer, so every block starts as the identity and the first velocity is 0."""
    for module in decoder.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    for name, param in decoder.named_parameters():
        if name.endswith(".scale"):  # per-head q/k RMSNorm gains
            nn.init.ones_(param)
        if "_mod." in name or "modulation" in name or name.startswith("final_layer.linear."):
            nn.init.zeros_(param)
    nn.init.normal_(decoder.txt_in.cls_token, std=0.02)


@torch.no_grad()
def init_adapter_(model: OvisU1) -> None:
    """Random visual head and visual embedding table. The table gets the spread of the LLM's text embeddings, so
    visual and text tokens enter the LLM at the same scale."""
    for module in model.visual_tokenizer.head:
        module.reset_parameters()
    nn.init.normal_(model.vte.weight, std=float(model.llm.model.embed_tokens.weight.std()))


def apply_memory_policy(model: OvisU1, mix: dict[str, float], precision: str, device: torch.device,
                        sharded: bool = False) -> None:
    """Trained weights in float32, frozen ones in bf16 when the run computes in bf16 (float32 otherwise, so CPU
    runs stay exact); then onto `device`, but the decoder and VAE only when the run's tasks use them (stage 3
    keeps them in CPU memory). Under FSDP (`sharded`) only the VAE, which is not sharded, goes now: fully_shard
    takes each block's shard to the device itself, so no rank ever holds the whole model there.

    Called on the model as loaded in host memory in the checkpoint's dtypes: a frozen weight stored in bf16 stays
    the mapped file, and nothing is float32 that need not be."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad or precision != "bf16" else torch.bfloat16)
    generator = model.visual_generator
    if sharded:
        if uses_generator(mix):
            generator.vae.to(device)
        return
    for part in [model.llm, model.visual_tokenizer, model.vte, *([generator] if uses_generator(mix) else [])]:
        part.to(device)


def enable_gradient_checkpointing(model: OvisU1) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    The composable `checkpoint` hooks into the block and keeps its parameter names (the checkpoint keys)."""
    decoder = model.visual_generator.backbone
    for block in [*model.llm.model.layers, *model.visual_tokenizer.backbone.trunk.blocks, *decoder.double_blocks,
                  *decoder.single_blocks, *decoder.txt_in.individual_token_refiner.blocks]:
        checkpoint(block)


def learning_rate(step: int, args) -> float:
    """Linear warmup to --lr over --warmup steps, then cosine decay to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(module: nn.Module, args) -> torch.optim.AdamW:
    """AdamW over the trained parameters; matrices decay, gains and biases do not."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))
