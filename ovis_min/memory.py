"""Estimated per-GPU memory of each training stage at full size: the README's table (`python -m ovis_min.memory`
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
counted. These are estimates, not measurements.
"""
import functools
from dataclasses import dataclass

from .checkpoint import build_model
from .config import OvisConfig
from .stages import DEFAULT_MICRO_BATCH, STAGES, set_trainable, uses_generator

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


def activation_bytes(task: str, stage: int, micro_batch: int, checkpointing: bool, config: OvisConfig) -> float:
    llm, vit, mm = config.llm, config.vit, config.mmdit
    trains = STAGES[stage].trains
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
    fsdp = any(name.startswith("llm.") for name in trained)  # --parallel auto
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
    lines = ["| stage | trains | parallel | grad ckpt | weights | grads | AdamW | EMA | activations | total | "
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


if __name__ == "__main__":
    print(table())
