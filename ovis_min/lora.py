"""LoRA: low-rank adapters on the linear layers of the part a stage trains (Hu et al. 2021, arXiv 2106.09685).

An adapted layer keeps its weight W (out, in) frozen, in the storage dtype (bf16 on a GPU), and learns beside it
A (rank, in) and B (out, rank) in float32:

    y = x W^T + b + (alpha / rank) * (x A^T) B^T

B starts at zero, so step 0 is the base model exactly; A starts as nn.Linear's own default. Merging adds
(alpha / rank) * B @ A into W, after which the layer costs nothing extra.

Names: the adapter lives on the layer it adapts, as its bias-free `lora_A` and `lora_B` Linears, so the adapter
tensors are `<official module name>.lora_A.weight` and `.lora_B.weight`: the official name of the layer (ovis-min's
module paths are the official names, see OFFICIAL_NAMES in checkpoint.py) with the suffixes PEFT and diffusers use
in their LoRA files. The base weight keeps its official name, so checkpoints and exports are unchanged.

An adapter file (train.py export RUN --lora-only) is one safetensors file of those tensors in float32, with the rank,
alpha and targets in its metadata; sample.py --lora merges it into the weights it loads.
"""
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import few_names, official_part
from .files import default_mode, temp_prefix

# What --lora-targets adapts: the attention projections (q, k, v and out, fused or not) and the MLP of every
# transformer block of a part, where nearly all of a block's weights are and where LoRA fine-tunes of DiTs and LLMs
# put their adapters. Left out: the decoder's adaLN modulations (they read the timestep, not the content), its
# input and output layers and the LLM's embedding / lm_head (tied to the VAE's latent space and to the
# vocabulary, which a fine-tune on one's own data keeps), and norms.
#
#   target     official prefix of the part (a row of OFFICIAL_NAMES)  the layers adapted, by how their names end
TARGETS = {
    "decoder": ("visual_generator.backbone.",        ("attn.qkv", "attn.proj", "_mlp.0", "_mlp.2",  # double blocks
                                                      "linear1", "linear2")),  # single blocks: fused qkv+MLP in, out
    "refiner": ("visual_generator.backbone.txt_in.", ("self_attn_qkv", "self_attn_proj", "mlp.fc1", "mlp.fc2")),
    "llm":     ("llm.model.",                        ("q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj")),
    "encoder": ("visual_tokenizer.backbone.",        ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.fc3")),
    "head":    ("visual_tokenizer.head.",            ("head.0",)),  # the adapter's one linear layer
}
SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class AdapterError(Exception):
    """An adapter file that does not fit: the message names the file and what to do."""


class LoRALinear(nn.Linear):
    """A Linear with a low-rank adapter beside its frozen weight (the same Parameters, under the same names)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        bound = 1 / math.sqrt(base.in_features)  # nn.Linear's default init (kaiming_uniform with a=sqrt(5))
        with torch.no_grad():
            # drawn on the CPU from the caller's generator: every process of a run draws the same A
            self.lora_A.weight.copy_(torch.empty(rank, base.in_features).uniform_(-bound, bound, generator=generator))
            self.lora_B.weight.zero_()
        self.scale = alpha / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out); the adapter's path goes through (..., rank)."""
        out = super().forward(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(x)) * self.scale

    def delta(self) -> torch.Tensor:
        """(out, in) float32: what the adapter adds to the weight."""
        return self.scale * self.lora_B.weight.float() @ self.lora_A.weight.float()

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the weight (sampling then costs nothing extra); `unmerge` takes it out again."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta())
            self.merged = False


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The official names of the Linear layers that `targets` adapt, in model order."""
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:  # an adapted layer is not adapted twice
            continue
        prefix = official_part(name + ".weight")[0]
        if any(prefix == TARGETS[t][0] and name.endswith(TARGETS[t][1]) for t in targets):
            names.append(name)
    return names


def add_adapters(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, seed: int) -> list[str]:
    """Freeze every parameter of `model` and put a zero-initialised adapter on each target layer; returns the
    adapter parameter names (the only trained ones)."""
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in target_layers(model, targets):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, LoRALinear(model.get_submodule(name), rank, alpha, generator))
    return [name for name, param in model.named_parameters() if param.requires_grad]


def adapted_modules(names) -> list[str]:
    """The layers an adapter state dict names ("x.lora_A.weight", "x.lora_B.weight" -> "x"), in order."""
    return list(dict.fromkeys(name[:-len(SUFFIXES[0])] for name in names if name.endswith(SUFFIXES)))


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


@torch.no_grad()
def merge_into(weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float,
               dtype: torch.dtype | None = None) -> None:
    """weights["x.weight"] += scale * B @ A for every adapted layer x, computed in float32 and stored in `dtype`
    (default: the weight's own; `scale` = alpha / rank, times sample.py's --lora-scale)."""
    for module in adapted_modules(adapters):
        weight = weights[module + ".weight"]
        delta = scale * adapters[module + ".lora_B.weight"].float() @ adapters[module + ".lora_A.weight"].float()
        weights[module + ".weight"] = (weight.float() + delta.to(weight.device)).to(dtype or weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The adapter file
# ---------------------------------------------------------------------------------------------------------------
class AdapterFile(NamedTuple):
    path: Path
    rank: int
    alpha: float
    targets: list[str]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, from the header alone


def save_adapters(path: Path, adapters: dict[str, torch.Tensor], rank: int, alpha: float,
                  targets: list[str]) -> None:
    """One safetensors file of the adapter tensors in float32, rank, alpha and targets in its metadata; written
    under a temporary name and renamed."""
    temp = path.parent / f"{temp_prefix()}{path.name}.part"
    try:
        save_file({name: tensor.float().contiguous() for name, tensor in adapters.items()}, str(temp),
                  metadata={"format": "pt", "lora_rank": str(rank), "lora_alpha": repr(float(alpha)),
                            "lora_targets": json.dumps(list(targets))})
        os.chmod(temp, default_mode())  # safetensors creates the file private to its owner
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read_adapter_file(path: Path) -> AdapterFile:
    """The header of an adapter file, checked to be one: every tensor an A or B of a complete pair, of the rank the
    metadata gives."""
    what = f"--lora {path}"
    if not path.is_file():
        raise AdapterError(f"{what}: no such file; write one with: python train.py export RUN --lora-only --out FILE")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{what}: not a readable safetensors file ({error})") from None
    strays = [name for name in shapes if not is_adapter(name)]
    if strays or not shapes:
        raise AdapterError(f"{what}: {len(strays)} tensors are not LoRA adapters (NAME.lora_A.weight, "
                           f"NAME.lora_B.weight): {few_names(strays)}" if strays else f"{what}: holds no adapters")
    try:
        rank, alpha = int(metadata["lora_rank"]), float(metadata["lora_alpha"])
        targets = json.loads(metadata.get("lora_targets", "[]"))
    except (KeyError, ValueError):
        raise AdapterError(f"{what}: no lora_rank and lora_alpha in its metadata: not an adapter file of train.py "
                           "export --lora-only") from None
    unpaired = [m for m in adapted_modules(shapes) if any(m + s not in shapes for s in SUFFIXES)]
    bad_rank = [m for m in adapted_modules(shapes) if m not in unpaired and (
        len(shapes[m + SUFFIXES[0]]) != 2 or len(shapes[m + SUFFIXES[1]]) != 2
        or shapes[m + SUFFIXES[0]][0] != rank or shapes[m + SUFFIXES[1]][1] != rank)]
    if unpaired or bad_rank:
        raise AdapterError(f"{what}: damaged: " + "; ".join(
            f"{len(names)} layers {why}: {few_names(names)}" for names, why in
            ((unpaired, "lack lora_A or lora_B"), (bad_rank, f"are not of rank {rank}")) if names))
    return AdapterFile(path, rank, alpha, targets, shapes)


def check_fits(adapters: AdapterFile, model: nn.Module) -> None:
    """Every adapted layer is a Linear of `model` (built on the meta device: shapes only) of the adapter's shape."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown, wrong = [], []
    for module in adapted_modules(adapters.shapes):
        if module not in layers:
            unknown.append(module)
            continue
        a, b = adapters.shapes[module + SUFFIXES[0]], adapters.shapes[module + SUFFIXES[1]]
        if (b[0], a[1]) != tuple(layers[module].weight.shape):
            wrong.append(f"{module}: adapter {(b[0], a[1])} vs model {tuple(layers[module].weight.shape)}")
    if unknown or wrong:
        raise AdapterError(f"--lora {adapters.path} does not fit these weights (" + "; ".join(
            f"{len(names)} {why}: {few_names(names, 3)}" for names, why in
            ((unknown, "unknown layers"), (wrong, "of other shapes")) if names)
            + "): it was trained on another base model; pass the --weights it was trained from")


def load_adapters(adapters: AdapterFile) -> dict[str, torch.Tensor]:
    try:
        with safe_open(adapters.path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"--lora {adapters.path}: cannot be read ({error})") from None


@torch.no_grad()
def merge_adapter_file(model: nn.Module, adapters: AdapterFile, strength: float = 1.0) -> None:
    """Merge a checked adapter file into `model`'s weights, `strength` times its trained effect."""
    params = dict(model.named_parameters())
    layers = adapted_modules(adapters.shapes)
    weights = {f"{m}.weight": params[f"{m}.weight"].data for m in layers}
    merge_into(weights, load_adapters(adapters), strength * adapters.alpha / adapters.rank)
    for name, value in weights.items():
        params[name].data.copy_(value)


def adapter_bytes(model: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """The size of an adapter file (float32) for `model` (the meta device will do)."""
    layers = dict(model.named_modules())
    return sum(4 * rank * (layers[n].in_features + layers[n].out_features) for n in target_layers(model, targets))
