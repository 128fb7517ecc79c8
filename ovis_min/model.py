"""Ovis-U1 as one module: the blocks of the report's Figure 2 wired together.

    image ─► VisionEncoder (vit.py) ─► VisualHead (adapter.py) ─► probabilities ─► VisualEmbedding (adapter.py) ─┐
    text  ─► token embeddings (llm.py) ──────────────────────────────────────────────────────────────────────────┴► merge
    merged embeddings ─► Qwen3 (llm.py) ─► answer text                               (understanding)
                                        └► [last, second-to-last] hidden states ─► TokenRefiner (refiner.py)
                                           ─► MMDiT (mmdit.py) + flow matching (flow.py) ─► SDXL VAE (vae.py)    (generation)

Attribute names follow the official checkpoint (`llm`, `visual_tokenizer.backbone`, `visual_tokenizer.head`,
`vte`, `visual_generator.backbone`, `visual_generator.vae`), so `state_dict()` keys are the official names.
"""
from typing import NamedTuple

import torch
from torch import nn

from . import flow
from .adapter import VisualEmbedding, VisualHead
from .config import OvisConfig
from .layers import pad_rows
from .llm import Qwen3
from .mmdit import MMDiT
from .vae import AutoencoderKL
from .vit import VisionEncoder

# Negative ids the prompt builder (prompt.py) writes and merge_inputs replaces; from the official modeling code.
IGNORE_ID = -100  # label of positions that carry no loss
IMAGE_ATOM_ID = -300  # replaced by the image's visual embeddings
IMAGE_INDICATOR_IDS = (-301, -302, -303, -304)  # -301/-302 open/close an image, -303 brackets a video; -304 unused


class VisualTokenizer(nn.Module):
    """Encoder + head: pixels to a probability distribution over the visual vocabulary per 2x2 patch group."""

    def __init__(self, config: OvisConfig):
        super().__init__()
        self.backbone = VisionEncoder(config.vit)
        self.head = VisualHead(config.adapter)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> torch.Tensor:
        # (N_patches, C*p*p) -> (N_patches / 4, V)
        features = self.backbone(pixel_values, grid_thws).last_block
        return self.head.tokenize(features).probs


class VisualGenerator(nn.Module):
    """The image decoder (with its text refiner) and the VAE whose latent space it works in."""

    def __init__(self, config: OvisConfig):
        super().__init__()
        self.backbone = MMDiT(config.mmdit, config.refiner)
        self.vae = AutoencoderKL(config.vae)


class MergedInputs(NamedTuple):
    embeds: torch.Tensor  # (B, L, D) text embeddings with visual embeddings spliced in
    attention_mask: torch.Tensor  # (B, L) bool, False on padding
    labels: torch.Tensor  # (B, L) long, IGNORE_ID except supervised answer tokens; on the host
    image_mask: torch.Tensor  # (B, L) long, 1 where a position holds a visual embedding; on the host


class OvisU1(nn.Module):
    """The model: every block of Figure 2 as one nn.Module whose state_dict keys are the official names. The
    pipeline that runs it on prompts and images (tokenizer, guidance, sampling) is `pipeline.Ovis`."""

    def __init__(self, config: OvisConfig):
        super().__init__()
        self.config = config
        self.llm = Qwen3(config.llm)
        self.visual_tokenizer = VisualTokenizer(config)
        self.vte = VisualEmbedding(config.adapter)
        self.visual_generator = VisualGenerator(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.vte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vte.weight.device

    def visual_embeddings(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor) -> list[torch.Tensor]:
        """One (N_i, D) tensor of visual embeddings per image in the packed batch."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        # the encoder lays the images out from grid_thws on the host: a grid there costs no wait for the device
        probs = self.visual_tokenizer(pixel_values, grid_thws)  # (sum N_i, V)
        embeds = self.vte(probs.to(self.dtype))  # (sum N_i, D)
        tokens_per_image = (grid_thws.cpu().prod(-1) // self.config.adapter.hidden_stride ** 2).tolist()
        return list(embeds.split(tokens_per_image, dim=0))

    def merge_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pixel_values: torch.Tensor | None, grid_thws: torch.Tensor | None,
                     labels: torch.Tensor | None = None, left_padding: bool = True) -> MergedInputs:
        """Splice the images into the text: each IMAGE_ATOM_ID becomes that image's visual embeddings.

        `input_ids` (B, L) may hold the negative placeholder ids; images are consumed in order across the batch.
        Unlike the official code, a row without an image does not consume one (the official eval path does,
        which misaligns the images of the rows after it). Where the images go is read from `input_ids` on the host,
        and the labels are laid out there: ids and labels given there (as training gives them) cost no wait for
        the device.
        """
        device = self.device
        host_ids = input_ids.cpu()
        input_ids = input_ids.to(device, non_blocking=True)
        attention_mask = attention_mask.to(device, non_blocking=True).bool()
        labels = torch.full_like(host_ids, IGNORE_ID) if labels is None else labels.cpu()
        num_atoms = int((host_ids == IMAGE_ATOM_ID).sum())
        num_images = 0 if grid_thws is None else len(grid_thws)
        if num_atoms != num_images:
            raise ValueError(f"the prompts hold {num_atoms} image placeholders but {num_images} images were given")
        images = self.visual_embeddings(pixel_values, grid_thws) if num_images else []
        # negative placeholder ids have no row in the text table: embed them as id 0, then overwrite
        text_embeds = self.llm.model.embed_tokens(input_ids.clamp(min=0))  # (B, L, D)
        # a training run may keep the frozen text table in bf16 and the trained visual table in float32
        indicators = self.vte.indicator_embeds().to(text_embeds.dtype)  # (5, D)
        for i, indicator_id in enumerate(IMAGE_INDICATOR_IDS):  # where, not a boolean index: no count to wait for
            text_embeds = torch.where((input_ids == indicator_id)[..., None], indicators[i], text_embeds)

        rows, next_image = [], 0
        for ids, embeds, mask, row_labels in zip(host_ids, text_embeds, attention_mask, labels):  # labels: host
            parts = {"embeds": [], "mask": [], "labels": [], "image": []}
            start = 0
            for atom in (ids == IMAGE_ATOM_ID).nonzero().flatten().tolist() + [len(ids)]:
                parts["embeds"].append(embeds[start:atom])
                parts["mask"].append(mask[start:atom])
                parts["labels"].append(row_labels[start:atom])
                parts["image"].append(torch.zeros_like(row_labels[start:atom]))
                if atom < len(ids):
                    image = images[next_image]
                    next_image += 1
                    n = len(image)
                    parts["embeds"].append(image)
                    parts["mask"].append(torch.ones(n, dtype=torch.bool, device=device))
                    parts["labels"].append(torch.full((n,), IGNORE_ID, dtype=torch.long))
                    parts["image"].append(torch.ones(n, dtype=torch.long))
                start = atom + 1
            rows.append({k: torch.cat(v) for k, v in parts.items()})

        longest = max(len(r["mask"]) for r in rows)
        if longest > self.config.multimodal_max_length:
            raise ValueError(f"the prompt is {longest} tokens long with its images, more than the model's maximum "
                             f"of {self.config.multimodal_max_length}; shorten the text or use smaller images")
        return MergedInputs(
            embeds=pad_rows([r["embeds"] for r in rows], 0.0, left_padding),
            attention_mask=pad_rows([r["mask"] for r in rows], False, left_padding),
            labels=pad_rows([r["labels"] for r in rows], IGNORE_ID, left_padding),
            image_mask=pad_rows([r["image"] for r in rows], 0, left_padding),
        )

    def generation_condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             pixel_values: torch.Tensor | None, grid_thws: torch.Tensor | None,
                             left_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The text condition of the image decoder, (B, L, 2*D_llm), and its (B, L) mask of real positions.

        The official code concatenates the last hidden state (after the final norm) with the raw output of the
        second-to-last layer. Sampling left-pads the prompt and runs positions 0..L-1 as the official call does;
        training right-pads (the same positions for every real token). Sampling calls this under no_grad; training
        keeps the graph when the LLM or the adapter learn through the condition.
        """
        merged = self.merge_inputs(input_ids, attention_mask, pixel_values, grid_thws, left_padding=left_padding)
        last, second_last = self.llm.condition_states(merged.embeds, merged.attention_mask)
        return torch.cat([last, second_last], dim=-1), merged.attention_mask


def channels_last(vae: AutoencoderKL) -> AutoencoderKL:
    """The VAE's convolution weights in channels_last (NHWC) layout, converted in place the first time: oneDNN
    and cuDNN convolve fastest in it (about 1.3x on the CPU). Every VAE op keeps its input's memory format."""
    return vae.to(memory_format=torch.channels_last)


def encode_posterior(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) pixels in [-1, 1] -> the VAE posterior's (mean, logvar), each (B, 4, H/8, W/8)."""
    weight = next(vae.parameters())
    pixels = pixels.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last)
    return channels_last(vae).encode(pixels)


def posterior_tokens(vae: AutoencoderKL, mean: torch.Tensor, logvar: torch.Tensor,
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A sample of the posterior (mean, logvar) as (B, N, 16) packed latent tokens."""
    return flow.pack_latents(vae.to_latent_space(vae.sample_latent(mean, logvar, generator=generator, noise=noise)))


def encode_image_tokens(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, N, 16) packed latent tokens sampled from the VAE posterior: what the
    decoder generates (training targets) and sees of an image being edited."""
    return posterior_tokens(vae, *encode_posterior(vae, pixels), generator=generator, noise=noise)


def in_float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) computed in float32 over float32 copies of the module's weights. The copies are exact (bf16 to
    float32 loses nothing) and live only for this call, so a bf16 module computes as it does under the official
    code's `torch.autocast(dtype=torch.float32)`; a float32 module runs on its own weights."""
    weights = {name: weight.float() for name, weight in module.named_parameters()}
    return torch.func.functional_call(module, weights, (x.float(),))


def decode_image_tokens(vae: AutoencoderKL, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 16) packed latent tokens -> (B, 3, H, W) float32 pixels, nominally in [-1, 1] (not clamped yet).

    Decoded in float32 whatever the VAE's dtype, as the official `generate_image` does (it unscales and decodes
    under autocast to float32); a decode in bf16 lands about twice as far from the float32 image. These are
    `vae.decode`'s two steps, each through `in_float32`.
    """
    weight = next(vae.parameters())
    latents = flow.unpack_latents(tokens.to(weight.device).float(), height, width)  # (B, 4, H/8, W/8)
    latents = vae.from_latent_space(latents).contiguous(memory_format=torch.channels_last)
    vae = channels_last(vae)
    if vae.post_quant_conv is not None:
        latents = in_float32(vae.post_quant_conv, latents)
    return in_float32(vae.decoder, latents)
