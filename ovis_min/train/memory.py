"""Estimated per-GPU memory of each training stage at full size: the README's table (`python -m ovis_min.train.memory`
prints it).

Weights, gradients, optimiser state and EMA come from the parameter counts of the full-size model (OvisConfig's
defaults, built on the meta device) and train.py's memory policy at its defaults: bf16, 8 processes, DDP except
FSDP for stage 3, trained parameters in float32 (AdamW: two float32 moments; EMA: one float32 copy), frozen ones
in bf16, the decoder and VAE off the GPU when the stage's tasks never use them. Under DDP, autocast keeps a bf16
copy of each float32 trained weight from forward to backward (counted with the weights); under FSDP the root's
bf16 weights (embeddings, adapter, lm_head) stay gathered through the step. Gradient checkpointing is on by default
where a stage's estimate without it exceeds CHECKPOINTING_ABOVE of an 80 GB GPU (stages.py records the choice;
tests check the two agree).

Activations are counted per token and block, from what a pre-norm block keeps for its backward in bf16: the inputs
of its norms and matmuls and the attention output, 2 bytes x (6h + 2kv + 4i) for a SwiGLU block (LLM, ViT) and
2 bytes x (8h + 2i) for a GELU one with adaLN modulation (decoder), where h is the width, kv the width of k and v,
i the MLP width; attention keeps no score matrix (SDPA's fused kernels). With gradient checkpointing a block keeps
only its float32 input (4h bytes per token) and one block at a time is recomputed in full. Understanding adds its
logits (bf16, their float32 copy and its gradient) for SUPERVISED_TOKENS answer tokens a sample. A step's
micro-batch holds one task, so a stage needs the most demanding of its tasks. The sample sizes are upper-end
assumptions, written below; allocator fragmentation, CUDA context (~0.5-1 GB) and temporary buffers are not
counted. These are estimates, not measurements: `python -m ovis_min.train.memory --measure STAGE... --tokenizer DIR`
measures them on one GPU (random full-size weights, the same sample sizes, two optimizer steps with an EMA) next to
the estimate for one process.
"""
import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..checkpoint import build_model
from ..config import OvisConfig
from ..lora import TARGETS, adapter_bytes, add_adapters
from .accumulation import LossScale
from .adapters import DEFAULT_TARGETS
from .data import DataConfig, SkipRow, collate, edit_example, t2i_example, understanding_example
from .losses import TrainStep
from ..model import OvisU1
from ..prompt import Tokenizer
from .stages import (DECODER, DEFAULT_MICRO_BATCH, STAGES, apply_memory_policy, enable_gradient_checkpointing,
                     make_optimizer, set_trainable, uses_generator)

PROCESSES = 8
GPU_BYTES = 80e9  # the GPUs the table is written for (H100/A100 80 GB)
CHECKPOINTING_ABOVE = 0.75  # of GPU_BYTES: room for what the estimate leaves out
SUPERVISED_TOKENS = 512  # answer tokens per understanding sample
PROMPT_TOKENS = 64  # text tokens of a caption or instruction prompt


@dataclass
class Estimate:
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations


def swiglu_block(h: int, kv: int, i: int) -> int:
    return 2 * (6 * h + 2 * kv + 4 * i)


def gelu_block(h: int, i: int) -> int:
    return 2 * (8 * h + 2 * i)


def encoder_tokens(pixels: int, config: OvisConfig) -> int:
    """ViT patches of an image of `pixels` pixels, resized into [min_pixels, max_pixels] as preprocessing does."""
    pre = config.preprocess
    return min(max(pixels, pre.min_pixels), pre.max_pixels) // pre.patch_size ** 2


def activation_bytes(task: str, stage: int, micro_batch: int, checkpointing: bool, config: OvisConfig,
                     trains: tuple[str, ...] | None = None) -> float:
    """`trains`: the state-dict prefixes whose weights (or adapters) train (default: the stage's)."""
    llm, vit, mm = config.llm, config.vit, config.mmdit
    trains = STAGES[stage].trains if trains is None else trains
    upstream_trains = any(not prefix.startswith("visual_generator.") for prefix in trains)
    resolution = STAGES[stage].resolution
    image_tokens = (resolution // 16) ** 2
    if task == "understanding":  # the longest prompt, its image at the largest size
        vit_tokens, llm_tokens = encoder_tokens(config.preprocess.max_pixels, config), config.multimodal_max_length
        decoder_tokens = 0
    else:  # the condition: a caption or instruction about a resolution^2 image; an edit also sees the source
        vit_tokens = encoder_tokens(resolution ** 2, config)
        llm_tokens = vit_tokens // config.adapter.hidden_stride ** 2 + PROMPT_TOKENS
        decoder_tokens = llm_tokens + image_tokens * (2 if task == "edit" else 1)
    # (tokens, per-token bytes of one block, blocks, width) of the parts whose activations the backward needs
    parts = []
    if "visual_tokenizer.backbone." in trains:
        parts.append((vit_tokens, swiglu_block(vit.hidden_size, vit.hidden_size, vit.intermediate_size),
                      vit.num_layers, vit.hidden_size))
    if upstream_trains:  # gradients reach the adapter through the LLM
        parts.append((llm_tokens, swiglu_block(llm.hidden_size, llm.num_kv_heads * llm.head_dim,
                                               llm.intermediate_size), llm.num_layers, llm.hidden_size))
    if decoder_tokens:  # the decoder trains, or gradients pass through it to the condition
        parts.append((decoder_tokens, gelu_block(mm.hidden_size, int(mm.hidden_size * mm.mlp_ratio)),
                      mm.depth + mm.depth_single_blocks + config.refiner.num_blocks, mm.hidden_size))
    if checkpointing:
        kept = sum(tokens * 4 * width * blocks for tokens, _, blocks, width in parts)
        kept += max((tokens * per_token for tokens, per_token, _, _ in parts), default=0)  # one block recomputed
    else:
        kept = sum(tokens * per_token * blocks for tokens, per_token, blocks, _ in parts)
    if task == "understanding":
        kept += SUPERVISED_TOKENS * llm.vocab_size * (2 + 4 + 4)
    return micro_batch * kept


@functools.cache
def full_size_model():
    """Shapes only (the meta device); set_trainable marks each stage's parts on it in turn."""
    return build_model(OvisConfig())


def estimate(stage: int, checkpointing: bool | None = None, processes: int = PROCESSES,
             micro_batch: int = DEFAULT_MICRO_BATCH, ema: bool = True) -> Estimate:
    config = OvisConfig()
    model = full_size_model()
    trained = set(set_trainable(model, stage))
    checkpointing = STAGES[stage].grad_checkpointing if checkpointing is None else checkpointing
    fsdp = processes > 1 and any(name.startswith("llm.") for name in trained)  # --parallel auto
    on_gpu = {name: p.numel() for name, p in model.named_parameters()
              if uses_generator(STAGES[stage].mix) or not name.startswith("visual_generator.")}
    n_trained = sum(n for name, n in on_gpu.items() if name in trained)
    n_frozen = sum(on_gpu.values()) - n_trained
    vae = sum(p.numel() for p in model.visual_generator.vae.parameters()) if uses_generator(STAGES[stage].mix) else 0
    shards = processes if fsdp else 1
    weights = (4 * n_trained + 2 * (n_frozen - vae)) / shards + 2 * vae  # FSDP leaves the VAE whole
    if not fsdp:  # autocast's bf16 copies of the float32 trained weights, kept from forward to backward
        weights += 2 * n_trained
    else:  # the root's bf16 weights (embeddings, adapter, lm_head...) stay gathered through forward and backward
        blocks = {id(p) for block in [*model.llm.model.layers, *model.visual_tokenizer.backbone.trunk.blocks]
                  for p in block.parameters()}
        weights += 2 * sum(p.numel() for name, p in model.named_parameters()
                           if id(p) not in blocks and name in on_gpu and not name.startswith("visual_generator."))
    activations = max(activation_bytes(task, stage, micro_batch, checkpointing, config)
                      for task, ratio in STAGES[stage].mix.items() if ratio)
    return Estimate(weights, 4 * n_trained / shards, 8 * n_trained / shards, 4 * n_trained / shards if ema else 0,
                    activations)


def table() -> str:
    """The README's table, in GB (1e9 bytes) per GPU."""
    lines = ["| stage | name | parallel | grad ckpt | weights | grads | AdamW | EMA | activations | total | "
             "total, other ckpt |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, spec in STAGES.items():
        default = estimate(stage)
        other = estimate(stage, checkpointing=not spec.grad_checkpointing)
        fsdp = "llm." in spec.trains
        lines.append(f"| {stage} | {spec.name} | {'FSDP' if fsdp else 'DDP'} | "
                     f"{'on' if spec.grad_checkpointing else 'off'} | "
                     + " | ".join(f"{v / 1e9:.1f}" for v in (default.weights, default.gradients, default.optimizer,
                                                             default.ema, default.activations, default.total))
                     + f" | {other.total / 1e9:.1f} |")
    return "\n".join(lines)


# LoRA rows: one GPU, micro-batch 1, the default targets and a rank of LORA_RANK.
LORA_RANK = 32
LORA_ROWS = ((5, "edit"), (3, "understanding"))


def lora_estimate(stage: int, checkpointing: bool, rank: int = LORA_RANK, micro_batch: int = 1,
                  ema: bool = True) -> Estimate:
    """One process of train.py --lora RANK with the stage's default targets: every base weight frozen in bf16 (the
    decoder and VAE off the GPU when unused), the adapters trained in float32 with their bf16 autocast copies.
    Activations as for full training of the parts the adapters are on: a frozen layer's input is kept all the
    same, for its adapter's gradient. With --cache the frozen LLM and VAE encoder do not run, but stay on the GPU
    (validation and samples use them), and their no-grad forward passes are over before the decoder's
    activations build up: the cache saves time, not peak memory, and its rows equal the ones without it."""
    config = OvisConfig()
    model = full_size_model()
    targets = DEFAULT_TARGETS[stage]
    n_adapters = adapter_bytes(model, targets, rank) // 4
    generator = uses_generator(STAGES[stage].mix)
    frozen = sum(p.numel() for name, p in model.named_parameters()
                 if generator or not name.startswith("visual_generator."))
    activations = max(activation_bytes(task, stage, micro_batch, checkpointing, config,
                                       trains=tuple(TARGETS[t][0] for t in targets))
                      for task, ratio in STAGES[stage].mix.items() if ratio)
    return Estimate(2 * frozen + (4 + 2) * n_adapters, 4 * n_adapters, 8 * n_adapters,
                    4 * n_adapters if ema else 0, activations)


def lora_table() -> str:
    """LoRA fine-tunes on one GPU, in GB: the README's second table."""
    lines = ["| stage | fine-tune | --cache | grad ckpt | adapters (rank " + str(LORA_RANK) + ") | weights | grads + "
             "AdamW + EMA | activations | total |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, what in LORA_ROWS:
        for cache in ((False, True) if STAGES[stage].trains == DECODER else (False,)):
            for checkpointing in (True, False):
                row = lora_estimate(stage, checkpointing)
                adapters = adapter_bytes(full_size_model(), DEFAULT_TARGETS[stage], LORA_RANK)
                lines.append(f"| {stage} | {what} | {'yes' if cache else 'no'} | {'on' if checkpointing else 'off'} | "
                             f"{adapters / 1e6:.0f} MB | {row.weights / 1e9:.1f} | "
                             f"{(row.gradients + row.optimizer + row.ema) / 1e9:.2f} | "
                             f"{row.activations / 1e9:.1f} | {row.total / 1e9:.1f} |")
    return "\n".join(lines)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def assumed_examples(task: str, stage: int, count: int, cfg: DataConfig, folder: Path) -> list:
    """`count` examples of the sizes the estimate assumes: the longest understanding prompt with one image at the
    largest size and SUPERVISED_TOKENS answer tokens; a PROMPT_TOKENS caption or instruction at the resolution."""
    size = cfg.resolution
    per_word = len(cfg.tokenizer.encode(" word" * 64)) / 64

    def text(tokens: int) -> str:
        return " ".join(["word"] * math.ceil(tokens / per_word))
    for seed in range(2):
        random_image(size, size, seed).save(folder / f"{seed}.png")
    if task != "understanding":
        caption = text(PROMPT_TOKENS)
        if task == "t2i":
            return [t2i_example({"image": "0.png", "caption": caption}, folder, i, cfg) for i in range(count)]
        row = {"source": "0.png", "instruction": caption, "target": "1.png"}
        return [edit_example(row, folder, i, cfg) for i in range(count)]
    side = int(cfg.preprocess.max_pixels ** 0.5)
    random_image(side, side, 2).save(folder / "large.png")
    answer = text(SUPERVISED_TOKENS)

    def examples(question_words: int) -> list | None:
        row = {"images": ["large.png"], "conversations": [
            {"from": "human", "value": "<image>\n" + " ".join(["word"] * question_words)},
            {"from": "gpt", "value": answer}]}
        try:
            return [understanding_example(row, folder, i, cfg) for i in range(count)]
        except SkipRow:  # too long
            return None
    low, high = 0, cfg.max_length  # the longest question that fits: examples(low) fits, examples(high) not
    if examples(low) is None:
        raise ValueError("no understanding prompt fits the model's multimodal_max_length")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if examples(middle) is not None else (low, middle)
    return examples(low)


def measure(stage: int, tokenizer_dir: Path, device: torch.device, folder: Path, config: OvisConfig | None = None,
            micro_batch: int = DEFAULT_MICRO_BATCH, steps: int = 2, lora: int | None = None) -> dict:
    """Peak allocated memory (bytes; None off CUDA) of `steps` bf16 optimizer steps per task of the stage on one
    device, with random weights of `config` (default: full size) and an EMA, as train.py runs them (with `lora`:
    as train.py --lora RANK does, its default targets)."""
    config = config or OvisConfig()
    with torch.device(device):
        model = OvisU1(config)
    trained = set(set_trainable(model, stage))
    if lora:
        trained = set(add_adapters(model, DEFAULT_TARGETS[stage], lora, float(lora), seed=0))
    spec = STAGES[stage]
    apply_memory_policy(model, spec.mix, "bf16", device)
    if spec.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    step_module = TrainStep(model)
    args = SimpleNamespace(weight_decay=0.01, lr=1e-5, beta1=0.9, beta2=0.95)
    optimizer = make_optimizer(step_module, args)
    params = [p for name, p in model.named_parameters() if name in trained]
    ema = [p.detach().clone() for p in params]
    cfg = DataConfig(Tokenizer(tokenizer_dir), config.preprocess, config.multimodal_max_length, spec.resolution,
                     drop_prompt=0.0, drop_image=0.0)
    peaks = {}
    for task, ratio in spec.mix.items():
        if not ratio:
            continue
        batch = collate(assumed_examples(task, stage, micro_batch, cfg, folder), cfg.tokenizer.pad_token_id)
        batch = batch.to(device)
        scale = LossScale(per_token=1 / max(1, batch.supervised_tokens), per_sample=1 / len(batch))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, _ = step_module(batch, scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1e-3)
        peaks[task] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    expected = lora_estimate(stage, spec.grad_checkpointing, lora, micro_batch) if lora else \
        estimate(stage, processes=1, micro_batch=micro_batch)
    return {"stage": stage, "peak_bytes": peaks, "estimate_bytes": expected.total}


def main() -> None:
    parser = argparse.ArgumentParser(description="The README's estimated memory table, or (--measure) the peak "
                                     "memory of full-size steps with random weights on one GPU")
    parser.add_argument("--measure", type=int, nargs="+", choices=sorted(STAGES), metavar="STAGE")
    parser.add_argument("--tokenizer", type=Path, help="a checkpoint directory with the tokenizer (--measure)")
    parser.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH)
    parser.add_argument("--lora", type=int, metavar="RANK", help="--measure a LoRA run of this rank (the table's "
                        "LoRA rows: --lora 32 --micro-batch 1)")
    parser.add_argument("--work", type=Path, default=Path("memory-images"), help="folder for the sample images")
    args = parser.parse_args()
    if not args.measure:
        print(table())
        print()
        print(lora_table())
        return
    if args.tokenizer is None or not torch.cuda.is_available():
        parser.error("--measure needs a CUDA GPU and --tokenizer DIR")
    args.work.mkdir(parents=True, exist_ok=True)
    for stage in args.measure:
        result = measure(stage, args.tokenizer, torch.device("cuda"), args.work, micro_batch=args.micro_batch,
                         lora=args.lora)
        peaks = ", ".join(f"{task} {peak / 1e9:.1f}" for task, peak in result["peak_bytes"].items())
        print(f"stage {stage}: measured peak GB {peaks}; estimated for one GPU {result['estimate_bytes'] / 1e9:.1f}",
              flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
