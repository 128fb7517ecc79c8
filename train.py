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
  Rows that cannot be used (malformed, missing/unreadable image, too long, no answer) are skipped and counted.
  Generation images are resized and center-cropped to --resolution squared.

Checkpoints: OUT/step-NNNNNNNN/ is a complete checkpoint in the official layout (config.json, tokenizer and
  preprocessor files copied from the source, every weight under its official name: trained ones in float32,
  frozen ones as the source stored them), so sample.py and ovis_min.checkpoint.load_model read it as they read
  the official release, and --init (a step or run directory) starts the next stage from it. trainer.pt next to
  the weights holds the optimizer state, the step, each rank's data position and RNG state, and the arguments.
  Directories are renamed into place when complete and OUT/latest names the newest; --resume OUT continues
  exactly where the run stopped.

Distributed: torchrun --nproc_per_node N train.py ... runs DDP, or FSDP2 (fully_shard per block) for stage 3,
  which trains the LLM. Gradient accumulation = batch / (micro-batch x processes). bf16 autocast on GPU
  (fp32 master weights), fp32 on CPU.

Examples (CKPT = the official checkpoint directory, e.g. from `python weights.py download --dir CKPT`;
RUN = torchrun --nproc_per_node 8 train.py; U, T, E = understanding, T2I and editing manifests):
  RUN --stage 0 --init CKPT --scratch --data T --out runs/s0
  RUN --stage 1 --init runs/s0 --scratch --data U --data T --data E --out runs/s1
  RUN --stage 2 --init runs/s1 --data U --data T --data E --out runs/s2
  RUN --stage 3 --init runs/s2 --data U --grad-checkpointing --out runs/s3
  RUN --stage 4 --init runs/s3 --data T --resolution 1024 --out runs/s4
  RUN --stage 5 --init runs/s4 --data T --data E --out runs/s5
  python train.py --stage 5 --init CKPT --data E --mix edit=1 --steps 1000 --batch 8 --micro-batch 2 --lr 1e-5 \\
      --out runs/ft                                  # a small fine-tune on one GPU
  python train.py --resume runs/ft                   # continue an interrupted run with its arguments
"""
import sys

from ovis_min.cli import ctrl_c_quits_quietly, ctrl_c_raises, real, whole_number

ctrl_c_quits_quietly("train.py")  # covers the seconds the imports below take

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from torch import nn  # noqa: E402

from ovis_min import flow  # noqa: E402
from ovis_min.checkpoint import (LATEST_FILE, OPTIONAL_FILES, REQUIRED_FILES, SAFETENSORS_DTYPES,  # noqa: E402
                                 CheckpointError, build_model, load_checkpoint, open_checkpoint, read_config,
                                 resolve_source, save_checkpoint, tied_groups)
from ovis_min.data import TASKS, Batch, DataConfig, DataError, Mixture, index_manifests, parse_mix  # noqa: E402
from ovis_min.files import disk_full, remove_leftovers, temp_prefix, write_atomic  # noqa: E402
from ovis_min.model import OvisU1  # noqa: E402
from ovis_min.pipeline import encode_image_tokens  # noqa: E402
from ovis_min.prompt import IGNORE_ID, Tokenizer  # noqa: E402

ctrl_c_raises()


class TrainError(SystemExit):
    """Something a user can fix stops the run: one line on stderr, exit status 1 (a SystemExit, so that code
    calling main() stops the same way)."""

    def __init__(self, message: str):
        super().__init__(f"train.py: error: {message}")


@dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple[str, ...]  # state-dict prefixes of the trained parameters
    mix: dict  # default task ratios
    steps: int
    batch: int  # samples per optimizer step, over all processes
    lr: float
    resolution: int  # generation images (our choice)


DECODER = ("visual_generator.backbone.",)  # the refiner is the decoder's `txt_in`
ADAPTER = ("visual_tokenizer.head.", "vte.")
ENCODER = ("visual_tokenizer.backbone.",)
STAGES = {
    0: Stage("visual decoder pretraining", DECODER, {"t2i": 1}, 500_000, 1024, 1e-4, 512),
    1: Stage("adapter pretraining", ADAPTER, {"understanding": 1, "t2i": 1, "edit": 1}, 1510, 8192, 5e-4, 512),
    2: Stage("visual encoder alignment", ENCODER + ADAPTER, {"understanding": 1, "t2i": 1, "edit": 1}, 2630, 8192,
             1e-4, 512),
    3: Stage("understanding learning", ENCODER + ADAPTER + ("llm.",), {"understanding": 1}, 23_000, 2240, 5e-5, 512),
    4: Stage("generation learning", DECODER, {"t2i": 1}, 275_000, 256, 5e-5, 1024),
    5: Stage("generation fine-tuning", DECODER, {"t2i": 1, "edit": 1}, 325_000, 256, 5e-5, 1024),
}
SCRATCH_STAGES = (0, 1)  # the parts these stages train start from random weights in the report
# The adapter reads the encoder's last block output before its final norm, so no gradient ever reaches this norm:
# it stays frozen rather than counting as trained.
NEVER_USED = ("visual_tokenizer.backbone.trunk.post_trunk_norm.",)
SHARD_BYTES = 5 * 2 ** 30


# ---------------------------------------------------------------------------------------------------------------
# Which parameters train
# ---------------------------------------------------------------------------------------------------------------
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


def enable_gradient_checkpointing(model: OvisU1) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    The composable `checkpoint` hooks into the block and keeps its parameter names (the checkpoint keys)."""
    from torch.distributed._composable import checkpoint
    decoder = model.visual_generator.backbone
    for block in [*model.llm.model.layers, *model.visual_tokenizer.backbone.trunk.blocks, *decoder.double_blocks,
                  *decoder.single_blocks, *decoder.txt_in.individual_token_refiner.blocks]:
        checkpoint(block)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------
def idle_image_term(model: OvisU1) -> torch.Tensor:
    """0 x the visual embeddings of a blank 2x2-patch image: a zero that depends on every encoder/adapter weight."""
    vit, stride = model.config.vit, model.config.adapter.hidden_stride
    width = vit.num_channels * vit.temporal_patch_size * vit.patch_size ** 2
    pixels = torch.zeros(stride * stride, width, device=model.device)
    grid = torch.tensor([[1, stride, stride]], device=model.device)
    embeds = model.visual_embeddings(pixels, grid)[0]
    return 0.0 * (embeds.sum() + model.vte.indicator_embeds().sum())


def understanding_loss(model: OvisU1, batch: Batch, idle_image: bool = False) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the supervised (assistant) tokens; (loss, LLM tokens).

    idle_image: for a batch without images, run the encoder and adapter anyway, on a blank image whose embeddings
    enter the LLM input times zero. Every rank then uses the same weights in the same order whatever its batch
    holds: DDP requires it, and FSDP would otherwise mismatch its all-gathers across ranks and hang.
    """
    zero = idle_image_term(model) if idle_image and batch.pixel_values is None else 0.0
    merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                batch.labels, left_padding=False)
    hidden = model.llm.hidden_states(inputs_embeds=merged.embeds + zero, attention_mask=merged.attention_mask)[-1]
    targets = merged.labels[:, 1:]  # position i predicts token i+1
    supervised = targets != IGNORE_ID
    # The (B, L, 152K) logits of every position would dwarf the rest of the step: project only what is learned.
    logits = model.llm.lm_head(hidden[:, :-1][supervised])  # (T, V)
    loss = F.cross_entropy(logits.float(), targets[supervised])
    return loss, int(merged.attention_mask.sum())


def generation_condition(model: OvisU1, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's text condition with gradients (the model's inference version runs under no_grad):
    (B, L, 2*D) = [last hidden state, second-to-last layer output], and the (B, L) mask of real tokens."""
    merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                left_padding=False)
    last, second_last = model.llm.condition_states(merged.embeds, merged.attention_mask)
    return torch.cat([last, second_last], dim=-1), merged.attention_mask


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, *shape) float32 normals, row i from generators[i]: a sample's noise depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def generation_loss(model: OvisU1, batch: Batch, condition_grad: bool) -> tuple[torch.Tensor, int]:
    """Flow matching on the target's VAE latent tokens; (loss, LLM + decoder tokens)."""
    vae, decoder, mm = model.visual_generator.vae, model.visual_generator.backbone, model.config.mmdit
    device = batch.target.device
    size = batch.target.shape[-1]
    channels, latent, rows = model.config.vae.latent_channels, size // 8, size // 16  # 8x VAE, then 2x2 packing
    # Each sample draws, in this order and whatever its batch holds: the VAE posterior noise of the target and of
    # the source, the flow noise, the time. So a sample's randomness depends on its seed alone.
    generators = [torch.Generator().manual_seed(int(seed)) for seed in batch.seeds]
    target_eps = per_sample_noise((channels, latent, latent), generators).to(device)
    source_eps = per_sample_noise((channels, latent, latent), generators).to(device)
    with torch.no_grad():  # the VAE is frozen
        x0 = encode_image_tokens(vae, batch.target, noise=target_eps).float()  # (B, N, 16)
        cond_img = None if batch.source is None else encode_image_tokens(vae, batch.source, noise=source_eps)
    # Only stages that train the adapter/encoder/LLM need gradients through the condition.
    with torch.set_grad_enabled(condition_grad and torch.is_grad_enabled()):
        txt, txt_mask = generation_condition(model, batch)
    txt_tokens, cls = decoder.encode_text(txt, txt_mask)

    noise = per_sample_noise(tuple(x0.shape[1:]), generators).to(device)
    t = torch.cat([flow.sample_timesteps(1, generator=g, image_seq_len=rows * rows if mm.timestep_shift else None,
                                         base_shift=mm.base_shift, max_shift=mm.max_shift) for g in generators])
    t = t.to(device)
    x_t = flow.noisy_latents(x0, noise, t)

    batch_size, num_txt, num_img = len(batch), txt.shape[1], x0.shape[1]
    key_mask = [txt_mask, torch.ones(batch_size, num_img, dtype=torch.bool, device=device)]
    if cond_img is not None:  # rows without a source image carry zeros there, hidden by the key mask
        key_mask.append(batch.has_source[:, None].expand(batch_size, num_img))
    rope = decoder.rope(flow.sequence_position_ids(num_txt, rows, rows, edit_image=cond_img is not None,
                                                   device=device), x_t.dtype)
    velocity = decoder.predict_velocity(x_t, txt_tokens, decoder.text_vector(cls), rope, t, cond_img=cond_img,
                                        key_mask=torch.cat(key_mask, dim=1))
    tokens = int(txt_mask.sum()) + batch_size * num_img + (int(batch.has_source.sum()) * num_img
                                                           if cond_img is not None else 0)
    return flow.flow_matching_loss(velocity, x0, noise), tokens


class TrainStep(nn.Module):
    """One micro-batch -> (loss, tokens). A module around the model so that DDP/FSDP see the whole step."""

    def __init__(self, model: OvisU1):
        super().__init__()
        self.model = model
        # Whether the encoder, adapter or LLM train (in every stage that trains the LLM, the adapter trains too).
        self.upstream_trains = any(p.requires_grad for name, p in model.named_parameters()
                                   if not name.startswith("visual_generator."))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        if batch.task == "understanding":
            return understanding_loss(self.model, batch, idle_image=self.upstream_trains)
        return generation_loss(self.model, batch, condition_grad=self.upstream_trains)


# ---------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_name: str | None) -> Runtime:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then join the process group (NCCL on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if "RANK" not in os.environ:
        return Runtime(0, 1, torch.device(device_name or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def wrap(step_module: TrainStep, stage: int, runtime: Runtime, parallel: str) -> nn.Module:
    """DDP, or FSDP2 when the LLM trains (stage 3): one shard group per LLM/encoder block plus the root."""
    if runtime.world == 1:
        return step_module
    if parallel == "auto":
        parallel = "fsdp" if "llm." in STAGES[stage].trains else "ddp"
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(step_module)
    from torch.distributed.fsdp import fully_shard
    model = step_module.model
    for block in [*model.llm.model.layers, *model.visual_tokenizer.backbone.trunk.blocks]:
        fully_shard(block)
    # Frozen decoder and VAE weights stay whole on every rank, never gathered (stage 3 does not even use them).
    fully_shard(step_module, ignored_params={p for p in model.visual_generator.parameters() if not p.requires_grad})
    return step_module


def gradient_sync(module: nn.Module, sync: bool):
    """Gradients are reduced on the last micro-batch of a step only."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if runtime.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(obj, runtime: Runtime) -> list:
    if runtime.world == 1:
        return [obj]
    gathered = [None] * runtime.world
    dist.all_gather_object(gathered, obj)
    return gathered


def fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's bytes: equal across ranks iff the replicas are bit-identical."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
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


def full_state(step_module: TrainStep, optimizer) -> tuple[dict, dict]:
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


def save(out: Path, step: int, step_module: TrainStep, optimizer, mixture: Mixture, source: Path, trained: set[str],
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


def restore(trainer_state: dict, step_module: TrainStep, optimizer, mixture: Mixture, runtime: Runtime) -> int:
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


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
RESUME_CHECKED = ("stage", "batch", "micro_batch", "lr", "min_lr", "warmup", "steps", "mix", "seed", "resolution",
                  "drop_prompt", "drop_image", "weight_decay", "overfit")


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
    parser.add_argument("--micro-batch", type=whole_number(1), default=4, help="samples per forward pass per process "
                        "(default 4)")
    parser.add_argument("--lr", type=real(0, open_low=True), help="peak learning rate (default: the stage's)")
    parser.add_argument("--min-lr", type=real(0), help="final learning rate of the cosine (default lr/10)")
    parser.add_argument("--warmup", type=whole_number(1), help="linear warmup steps (default 2%% of steps, at least 1, at most "
                        "2000)")
    parser.add_argument("--weight-decay", type=real(0), default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--beta1", type=real(0, 1, open_high=True), default=0.9, help="AdamW beta1 (default 0.9)")
    parser.add_argument("--beta2", type=real(0, 1, open_high=True), default=0.95, help="AdamW beta2 (default 0.95)")
    parser.add_argument("--grad-clip", type=real(0), default=1.0, help="max gradient norm (default 1; 0: no "
                        "clipping)")
    parser.add_argument("--resolution", type=whole_number(32), help="side of the square generation images, a multiple of 16 "
                        "(default: 512 for stages 0-2, 1024 for 4-5)")
    parser.add_argument("--drop-prompt", type=real(0, 1), default=0.1, help="rate at which generation prompts become "
                        "the unconditional prompt (edits keep their image; default 0.1)")
    parser.add_argument("--drop-image", type=real(0, 1), default=0.05, help="rate at which edits lose prompt and image "
                        "(default 0.05)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="autocast dtype (default bf16 on GPU, "
                        "fp32 on CPU); weights and optimizer state are float32 either way")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in the "
                        "backward pass (less memory, ~30%% more compute)")
    parser.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                        help="multi-process engine (auto: FSDP for stage 3, DDP otherwise)")
    parser.add_argument("--save-every", type=whole_number(1), default=1000, help="steps between checkpoints (and at the end; "
                        "default 1000)")
    parser.add_argument("--keep", type=whole_number(0), default=3, help="checkpoints to keep (default 3; 0: all)")
    parser.add_argument("--stop-after", type=whole_number(1), help="stop after this step with a checkpoint, keeping the "
                        "schedule of --steps (for jobs with a time limit)")
    parser.add_argument("--workers", type=whole_number(0), default=4, help="threads that read and preprocess images "
                        "(default 4)")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="seed of the data order, --scratch weights, noise and "
                        "dropout (default 0)")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--overfit", type=whole_number(0), default=0, metavar="N", help="debugging: train on the first N rows "
                        "of each task over and over, with the same noise and timesteps (the loss must fall)")
    return parser


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
        resume_dir = resolve_resume(args.resume)
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
    if isinstance(args.mix, str):
        try:
            args.mix = parse_mix(args.mix)
        except ValueError as error:
            parser.error(str(error))
    if args.device is not None:
        check_device(parser, args.device)
    return args, resume_dir, trainer_state


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
    args.warmup = min(2000, max(1, args.steps // 50)) if args.warmup is None else args.warmup
    args.resolution = stage.resolution if args.resolution is None else args.resolution
    args.mix = args.mix or dict(stage.mix)
    if args.resolution % 16:
        raise TrainError(f"--resolution {args.resolution} must be a multiple of 16 (8x VAE, then 2x2 packing)")
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
    if args.stop_after is not None and args.stop_after > args.steps:
        raise TrainError(f"--stop-after {args.stop_after} is past --steps {args.steps}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run training; returns rank 0's per-step log records (tests call this in-process)."""
    args, resume_dir, trainer_state = parse_args(argv)
    fill_defaults(args)
    if trainer_state is not None:
        changed = [f"{k} {trainer_state['args'][k]} -> {vars(args)[k]}" for k in RESUME_CHECKED
                   if trainer_state["args"].get(k) != vars(args)[k]]
        if changed:
            print(f"warning: resuming with different arguments ({'; '.join(changed)}): the run will not continue "
                  f"exactly as it would have", file=sys.stderr)

    runtime = setup_runtime(args.device)
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
    except KeyboardInterrupt:
        sys.exit("\ntrain.py: interrupted; the newest complete checkpoint is kept: continue with --resume OUT")
    except OSError as error:
        if disk_full(error):
            sys.exit(f"train.py: error: the disk is full ({error.filename or 'writing the log'}); free some space "
                     "and continue with --resume OUT")
        raise


def train(args, runtime: Runtime, resume_dir: Path | None, trainer_state: dict | None) -> list[dict]:
    stage = STAGES[args.stage]
    source = resume_dir or resolve_source(args.init)
    per_process = args.micro_batch * runtime.world
    if args.batch % per_process:
        raise TrainError(f"--batch {args.batch} is not a multiple of micro-batch x processes = {args.micro_batch} x "
                         f"{runtime.world}: adjust --batch or --micro-batch")
    accumulation = args.batch // per_process
    precision = args.precision or ("bf16" if runtime.device.type == "cuda" else "fp32")
    out = Path(args.out)

    config = read_config(source)
    # The data first: a missing manifest or task should fail before minutes of loading.
    data_cfg = DataConfig(Tokenizer(source), config.preprocess, config.multimodal_max_length, args.resolution,
                          args.drop_prompt, args.drop_image)
    try:
        manifests = index_manifests(args.data)
        mixture = Mixture(manifests, args.mix, data_cfg, seed=args.seed, rank=runtime.rank, world=runtime.world,
                          overfit=args.overfit, workers=args.workers)
    except (ValueError, FileNotFoundError) as error:
        raise TrainError(f"stage {args.stage} ({stage.name}) mixes {args.mix}: {error}") from None

    # The model: float32 master weights, the stage's parts trainable.
    model = load_checkpoint(build_model(config), source, dtype=torch.float32, device=runtime.device)
    trained = set(set_trainable(model, args.stage))
    trained |= {alias for group in tied_groups(model) if trained & set(group) for alias in group}  # lm_head
    if args.scratch and trainer_state is None:
        torch.manual_seed(args.seed)  # every rank draws the same random weights
        if args.stage == 0:
            init_decoder_(model.visual_generator.backbone)
        else:
            init_adapter_(model)
    torch.manual_seed(args.seed + runtime.rank)
    if args.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    step_module = TrainStep(model)
    wrapped = wrap(step_module, args.stage, runtime, args.parallel)
    optimizer = make_optimizer(step_module, args)

    start = 0
    if trainer_state is not None:
        start = restore(trainer_state, step_module, optimizer, mixture, runtime)

    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(out):
            print(f"note: removed {leftover.name}, a partial checkpoint of a run that was killed", file=sys.stderr)
        if trainer_state is not None:
            trim_log(out / "log.jsonl", start)
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
    log = open(out / "log.jsonl", "a") if runtime.main else None
    for step in range(start, stop):
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        began = time.perf_counter()
        loss_sums, counts, tokens = dict.fromkeys(TASKS, 0.0), dict.fromkeys(TASKS, 0), 0
        for micro in range(accumulation):
            batch = mixture.next_batch(args.micro_batch).to(runtime.device)
            with gradient_sync(wrapped, micro == accumulation - 1):
                with autocast:
                    loss, batch_tokens = wrapped(batch)
                (loss / accumulation).backward()
            loss_sums[batch.task] += loss.item()
            counts[batch.task] += 1
            tokens += batch_tokens
        grad_norm = nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        skipped = mixture.skipped
        totals = all_reduce_sum([*loss_sums.values(), *counts.values(), tokens, *skipped.values()], runtime)
        elapsed = time.perf_counter() - began
        n = len(TASKS)
        task_loss = {t: totals[i] / totals[n + i] for i, t in enumerate(TASKS) if totals[n + i]}
        record = {"step": step + 1, "loss": sum(totals[:n]) / sum(totals[n:2 * n]), "task_loss": task_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "samples_per_s": args.batch / elapsed,
                  "tokens_per_s": totals[2 * n] / elapsed, "memory_gb": peak_memory_gb(runtime.device),
                  "skipped": {reason: int(v) for reason, v in zip(skipped, totals[2 * n + 1:]) if v}}
        if runtime.main:
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(format_record(record, args.steps), flush=True)

        last = step + 1 == stop
        if last or (step + 1) % args.save_every == 0:
            # the new checkpoint is complete and is the newest: later saves copy their files from it, so that
            # pruning older ones (the resumed one among them) never takes away what a save reads
            source = save(out, step + 1, step_module, optimizer, mixture, source, trained, args, runtime)

    if runtime.world > 1 and isinstance(wrapped, nn.parallel.DistributedDataParallel):
        prints = all_gather(fingerprint(model), runtime)
        if runtime.main:
            record = {"replicas": prints, "replicas_identical": len(set(prints)) == 1}
            records.append(record)
            log.write(json.dumps(record) + "\n")
            print("replicas identical" if record["replicas_identical"] else
                  f"WARNING: the {runtime.world} replicas differ", flush=True)
    mixture.close()
    if log:
        log.close()
    if runtime.world > 1:
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still talks aborts the peer
    return records


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def format_record(record: dict, steps: int) -> str:
    tasks = ", ".join(f"{t} {v:.4f}" for t, v in record["task_loss"].items())
    line = (f"step {record['step']}/{steps} | loss {record['loss']:.4f} ({tasks}) | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['samples_per_s']:.1f} samples/s "
            f"{record['tokens_per_s']:.0f} tok/s | mem {record['memory_gb']:.1f} GB")
    if record["skipped"]:
        line += " | skipped " + ", ".join(f"{reason} {n}" for reason, n in record["skipped"].items())
    return line


if __name__ == "__main__":
    run_cli()
