"""The image autoencoder: SDXL's AutoencoderKL (official `visual_generator.vae`).

The official Ovis-U1 code builds it with diffusers' `AutoencoderKL.from_config` (`modeling_yak.py`); this file
is the same network in plain torch, with module names chosen so that `state_dict()` keys equal the official
ones below `visual_generator.vae.`. Pixels in [-1, 1] go down 8x to a 4-channel Gaussian posterior; the
decoder maps latents back. The image decoder (mmdit.py) works in a scaled latent space, see `to_latent_space`.

Structure (SDXL: block_out (128, 256, 512, 512), 2 resnets per encoder block, 3 per decoder block):
  encoder: conv_in -> down_blocks[i] (resnets, then a stride-2 conv except in the last) -> mid_block
           (resnet, attention, resnet) -> GroupNorm -> SiLU -> conv_out (mean and logvar) -> quant_conv
  decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks[i] (resnets, then nearest x2 + conv except in
           the last) -> GroupNorm -> SiLU -> conv_out
All GroupNorms use eps 1e-6. Every op keeps the memory format of its input, so the model runs unchanged in
channels_last (`vae.to(memory_format=torch.channels_last)` and channels_last inputs).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ovis_min.config import VAEConfig

NORM_EPS = 1e-6


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected where the width changes) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        # diffusers pads only right and bottom (the conv itself has no padding), so the window is not centred.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SpatialAttention(nn.Module):
    """Single-head self-attention over all H*W positions, as diffusers' `Attention` in the VAE mid-block."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list only so that the official key `to_out.0` comes out (diffusers keeps a dropout at index 1).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        # (B, 1, HW, C): channel-last token order is a free view when x is channels_last.
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v))  # scale 1/sqrt(C): one head of width C
        return x + out.reshape(B, H, W, C).permute(0, 3, 1, 2)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        # Attentions are registered first only so that state_dict() lists keys in the official order.
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_resnets)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                      for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups,
                      downsample=i < len(widths) - 1)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 2*C_lat, H/8, W/8)
        x = self.conv_in(pixels)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        # The decoder runs one more resnet per block than the encoder. (up_blocks is registered before
        # mid_block only to list state_dict keys in the official order; mid_block runs first.)
        self.up_blocks = nn.ModuleList([
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups,
                    upsample=i < len(widths) - 1)
            for i in range(len(widths))])
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # (B, C_lat, h, w) -> (B, 3, 8h, 8w)
        x = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] (B, 3, H, W) -> posterior (mean, logvar), each (B, C_lat, H/8, W/8)."""
        moments = self.encoder(pixels)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # diffusers' DiagonalGaussianDistribution clamps here, which bounds exp(0.5*logvar) in any precision.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C_lat, h, w) -> pixels (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    @staticmethod
    def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """A posterior sample mean + std * eps.

        eps is `noise` when given; otherwise drawn from `generator` (on the generator's device, then moved), or
        from torch's global RNG when both are None, as the official `latent_dist.sample()` does.
        """
        if noise is None:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def to_latent_space(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the normalised latents the image decoder is trained on ((z - shift) * scale)."""
        if self.config.shift_factor is not None:
            latents = latents - self.config.shift_factor
        return latents * self.config.scaling_factor

    def from_latent_space(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_latent_space`, applied before `decode`."""
        latents = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            latents = latents + self.config.shift_factor
        return latents


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels (B, 3, H, W) -> uint8 images (B, H, W, 3), exactly as the official generate_image.

    The official conversion truncates (`.byte()`) rather than rounds; it is done in float32 so that a bf16
    decode does not lose levels in the scaling.
    """
    pixels = pixels.float().clamp(-1.0, 1.0).permute(0, 2, 3, 1)
    return (127.5 * (pixels + 1.0)).to(torch.uint8)
