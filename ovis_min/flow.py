"""Flow matching: the sampling schedule, latent packing, guidance, the Euler sampler and the training loss.

Facts from the official Ovis-U1 code (`modeling_yak.py`: `get_schedule`, `time_shift`, `get_noise`, `denoise`,
`edit_denoise`, `compute_vae_encodings`, `unpack`). Convention: t = 1 is pure noise and t = 0 is the image;
the sampler integrates dx/dt = v from t = 1 down to t = 0 with Euler steps x += (t_next - t_cur) * v.
"""
import math
from typing import Callable

import torch


# -- schedule --------------------------------------------------------------------------------------
def schedule_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The shift exponent, linear in the number of packed image tokens: base at 256 tokens, max at 4096."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)  # the official evaluation order


def shift_time(t: torch.Tensor, mu: float) -> torch.Tensor:
    """t -> e^mu / (e^mu + 1/t - 1): spends more of the steps at high noise for larger images."""
    # Written as the official float32 tensor ops (scalar / tensor is reciprocal-then-multiply in torch), so the
    # schedule matches bit for bit: e.g. t = 1 maps to 0.99999994 for some mu, not 1. t = 0 maps to 0 via 1/0 = inf.
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def time_schedule(num_steps: int, image_seq_len: int, shift: bool, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (image); `image_seq_len` = packed tokens = ceil(H/16)*ceil(W/16)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    if shift:
        t = shift_time(t, schedule_mu(image_seq_len, base_shift, max_shift))
    return t.tolist()


# -- latent packing --------------------------------------------------------------------------------
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): each 2x2 patch becomes one token, channels ordered (c, py, px)."""
    B, C, H, W = latents.shape
    patches = latents.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return patches.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, C*4) -> (B, C, 2*ceil(height/16), 2*ceil(width/16)), with `height`/`width` the image size in pixels.

    One token covers 16x16 pixels (8x VAE downsampling, then 2x2 packing), as in the official `unpack`.
    """
    rows, cols = math.ceil(height / 16), math.ceil(width / 16)
    B, N, D = tokens.shape
    if N != rows * cols or D % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens for a {height}x{width} image: expected "
                         f"{rows}x{cols} = {rows * cols} tokens of width divisible by 4")
    patches = tokens.reshape(B, rows, cols, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, rows, 2, cols, 2)
    return patches.reshape(B, D // 4, 2 * rows, 2 * cols)


def latent_position_ids(rows: int, cols: int, time_index: float = 0, batch: int = 1,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, rows*cols, 3) float32 (t, row, col) RoPE ids of a packed token grid, in raster order.

    `rows`/`cols` count packed tokens (latent size / 2). The image being generated has t = 0; the official
    editing path gives the VAE tokens of the input image t = 1 and otherwise the same grid.
    """
    row = torch.arange(rows, dtype=torch.float32, device=device)[:, None].expand(rows, cols)
    col = torch.arange(cols, dtype=torch.float32, device=device)[None, :].expand(rows, cols)
    ids = torch.stack([torch.full_like(row, float(time_index)), row, col], dim=-1)  # (rows, cols, 3)
    return ids.reshape(1, rows * cols, 3).expand(batch, -1, -1).contiguous()


def sequence_position_ids(txt_len: int, rows: int, cols: int, edit_image: bool,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """(1, S, 3) ids of the decoder's whole sequence [text, noise tokens (, edit-image tokens)]: text ids are all
    zero (its RoPE is the identity), the noise grid has t = 0 and the edit image the same grid with t = 1."""
    ids = [torch.zeros(1, txt_len, 3, device=device), latent_position_ids(rows, cols, device=device)]
    if edit_image:
        ids.append(latent_position_ids(rows, cols, time_index=1, device=device))
    return torch.cat(ids, dim=1)


# -- guidance and sampling -------------------------------------------------------------------------
def text_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, txt_cfg: float) -> torch.Tensor:
    """Classifier-free guidance for text-to-image. uncond is the generic prompt ("Generate an image.") with the
    same blank image as cond: the two T2I branches differ only in their text."""
    return v_uncond + txt_cfg * (v_cond - v_uncond)


def edit_guidance(v_cond: torch.Tensor, v_no_txt: torch.Tensor, v_no_both: torch.Tensor,
                  img_cfg: float, txt_cfg: float) -> torch.Tensor:
    """Two-condition guidance for editing: image guidance from no_both to no_txt, text guidance on top."""
    return v_no_both + img_cfg * (v_no_txt - v_no_both) + txt_cfg * (v_cond - v_no_txt)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, t_cur: float, t_next: float) -> torch.Tensor:
    return x + (t_next - t_cur) * velocity


def denoise(velocity_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, timesteps: list[float],
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate from timesteps[0] to timesteps[-1]; velocity_fn(x, t) returns the (guided) velocity at x.

    `progress(done, total)`, if given, is called after each step.
    """
    num_steps = len(timesteps) - 1
    for step, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x = euler_step(x, velocity_fn(x, t_cur), t_cur, t_next)
        if progress is not None:
            progress(step + 1, num_steps)
    return x


def initial_noise(batch: int, height: int, width: int, seed: int | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, channels: int = 4) -> torch.Tensor:
    """Starting latents (B, channels, 2*ceil(H/16), 2*ceil(W/16)), as the official `get_noise`.

    The official code draws bfloat16 normals from `torch.Generator(device).manual_seed(seed)` on the model's
    device; the same bf16 values are then cast to `dtype`. CPU and CUDA generators give different numbers, so
    reproducing an official GPU image needs device="cuda". Pass either `seed` or your own `generator`.
    """
    if (seed is None) == (generator is None):
        raise ValueError("initial_noise: pass exactly one of seed= or generator=")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, channels, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.bfloat16)
    return noise.to(device=device, dtype=dtype)


# -- training --------------------------------------------------------------------------------------
def sample_timesteps(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     mean: float = 0.0, std: float = 1.0, image_seq_len: int | None = None,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """(B,) float32 training times in (0, 1): logit-normal, t = sigmoid(mean + std * n), as in SD3.

    The official training code is not published; logit-normal is the SD3 / rectified-flow choice and puts most
    samples at mid noise. With `image_seq_len`, t is also shifted as the sampler's schedule is for that size,
    so training sees the noise levels that sampling will visit.
    """
    n = torch.randn(batch, generator=generator, device=generator.device if generator is not None else device)
    t = torch.sigmoid(mean + std * n).to(device)
    if image_seq_len is not None:
        t = shift_time(t, schedule_mu(image_seq_len, base_shift, max_shift))
    return t


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)  # (B,) -> (B, 1, ...)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path x_t = t * noise + (1 - t) * x0: t = 1 is the sampler's starting noise, t = 0 the data."""
    t = _per_sample(t, x0)
    return t * noise + (1 - t) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = noise - x0.

    The sampler updates x += (t_next - t_cur) * v, an Euler step of dx/dt = v. Differentiating the path of
    `noisy_latents` gives dx_t/dt = noise - x0, so that is what the model must predict; the sampler walks t
    downwards (t_next < t_cur), i.e. against it, from noise towards x0.
    """
    return noise - x0


def flow_matching_loss(pred_velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training loss of each sample: the mean squared error of its predicted velocity (B, N, C) to the target,
    (B,) in float32 whatever the model dtype. Training averages it over the samples of a step (train/losses.py)."""
    error = pred_velocity.float() - velocity_target(x0, noise).float()  # (B, N, C)
    return error.square().mean(dim=tuple(range(1, error.ndim)))
