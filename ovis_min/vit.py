"""The visual encoder: AIMv2-large run at native resolution (the report's "visual encoder").

The published Ovis-U1-3B config has `fullatt_block_indexes` null: every block attends over the whole image (each
frame of it), as a plain ViT does. Read the blocks (first section) with that in mind. The window attention that
the official encoder also supports, for configurations that list some blocks in `fullatt_block_indexes` and let
the others attend within windows, is kept apart in the last section; with the published config it only decides
the order in which the blocks see the patches of an image, which attention over the whole image does not depend
on (up to float rounding).

Facts from the official Ovis-U1 code (`modeling_aimv2.py`, `configuration_aimv2.py`):
* input rows are 14x14 patches in "unit order": a unit is the hidden_stride x hidden_stride (2x2) group of
  patches that the adapter merges into one visual token, its patches are adjacent rows (row by row), and the
  units of an image follow each other in raster order; several images are packed in one sequence and described
  by `grid_thws` rows (t, h, w) in patches;
* patch embed = a p x p conv on each patch + RMSNorm, plus the learned 32x32 position table interpolated to
  each image's (h, w) (`one_dim`: linear over the flattened table, `two_dim`: bicubic on the grid);
* 2-D rotary embedding in the rotate-half layout: head_dim/4 frequencies for the row, head_dim/4 for the column;
* blocks listed in `fullatt_block_indexes` attend within each image (each frame), the others within windows of
  window_size pixels; `fullatt_block_indexes = None` (the config default, and the published value) makes every
  block attend per image;
* pre-norm blocks with a SwiGLU MLP; no biases except the patch conv's.

Everything that depends only on the image sizes (rotary tables, position-table resampling weights, the attention
order and runs) is computed apart from the blocks: `vision_layout` is a pure function of `grid_thws`, so callers
can cache it per image size, and with it the forward pass has no host synchronisation.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ovis_min.config import VitConfig
from ovis_min.layers import RMSNorm, apply_rope_half

ROPE_THETA = 10000.0


# -- blocks ----------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        if cfg.temporal_patch_size != 1:
            raise ValueError("temporal_patch_size must be 1: the official patch embed is a 2-D conv over the "
                             "colour channels only")
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A p x p conv with stride p applied to one p x p patch is a single matmul over its (c, y, x) values.
        weight = self.proj.weight.flatten(1)  # (D, C*p*p)
        tokens = F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)  # (N, D)
        return self.norm(tokens)


class Preprocessor(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.cfg = cfg
        self.patchifier = PatchEmbed(cfg)
        if cfg.preserve_original_pe:
            num_positions = (cfg.image_size // cfg.patch_size) ** 2
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
        tokens = self.patchifier(pixel_values)  # (N, D)
        if self.cfg.preserve_original_pe:
            pe = position_embeddings(self.pos_embed, layout, self.cfg.interpolate_pe_method, self.cfg.hidden_stride)
            tokens = tokens + pe.to(tokens.dtype)
        return tokens


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Non-causal attention inside each segment of a packed (N, H, hd) sequence -> (N, H*hd)."""
    n, heads, head_dim = q.shape
    outputs, start = [], 0
    for n_seg, length in runs:
        end = start + n_seg * length
        q_run, k_run, v_run = (x[start:end].reshape(n_seg, length, heads, head_dim).transpose(1, 2)
                               for x in (q, k, v))
        out = F.scaled_dot_product_attention(q_run, k_run, v_run)  # (n_seg, H, L, hd)
        outputs.append(out.transpose(1, 2).reshape(n_seg * length, heads * head_dim))
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class Attention(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.use_rope = not cfg.disable_rope
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        n, dim = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, dim // self.num_heads)  # (N, 3, H, hd)
        q, k, v = qkv.unbind(1)
        if self.use_rope:  # in the activation dtype (the official code rotates in float32 and casts back)
            qk = apply_rope_half(qkv[:, :2], cos, sin)  # (N, 2, H, hd)
            q, k = qk.unbind(1)
        return self.proj(segment_attention(q, k, v, runs))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.norm_1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.norm_2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, runs)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, cfg: VitConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.post_trunk_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class VisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (N, D) post_trunk_norm of the last block, input order
    last_block: torch.Tensor  # (N, D) the last block's output, input order, no final norm: what the adapter reads
    hidden_states: list[torch.Tensor]  # num_layers x (N, D) each block's output, input order, no final norm;
    #                                    empty unless the forward was asked for all of them


class VisionEncoder(nn.Module):
    """AIMv2 encoder over packed images: (N, C*p*p) patches + grid_thws -> (N, D) features per patch."""

    def __init__(self, cfg: VitConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"head_dim = {cfg.hidden_size}/{cfg.num_heads} must be a multiple of 4 for 2-D RoPE")
        if cfg.window_size // cfg.hidden_stride // cfg.patch_size < 1:
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merged unit "
                             f"({cfg.hidden_stride * cfg.patch_size} pixels)")
        self.cfg = cfg
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)
        full = cfg.fullatt_block_indexes
        self.full_attention = [full is None or i in full for i in range(cfg.num_layers)]

    def layout(self, grid_thws: torch.Tensor, device: torch.device | None = None) -> VisionLayout:
        return vision_layout(grid_thws, self.cfg, device)

    def forward(self, pixel_values: torch.Tensor, grid_thws: torch.Tensor, layout: VisionLayout | None = None,
                all_hidden_states: bool = False) -> VisionOutput:
        """pixel_values (N, C*p*p) rows in unit order (see the module doc), grid_thws (n_images, 3); `layout` may
        be precomputed. `all_hidden_states`: also return every block's output (to compare with the official ones);
        the model reads only the last block's."""
        if layout is None:
            layout = self.layout(grid_thws, pixel_values.device)
        units = self.cfg.hidden_stride ** 2
        tokens = self.preprocessor(pixel_values, layout)  # (N, D), input (unit) order
        tokens = reorder_units(tokens, layout.unit_order, units)  # attention order for all blocks
        rope_cos, rope_sin = layout.rope_cos.to(tokens.dtype), layout.rope_sin.to(tokens.dtype)  # once, not per block
        hidden_states = []
        for block, full in zip(self.trunk.blocks, self.full_attention):
            runs = layout.image_runs if full else layout.window_runs
            tokens = block(tokens, rope_cos, rope_sin, runs)
            if all_hidden_states:
                hidden_states.append(reorder_units(tokens, layout.unit_restore, units))
        last_block = hidden_states[-1] if all_hidden_states else reorder_units(tokens, layout.unit_restore, units)
        # The norm is per token, so normalising the un-permuted last block output is the same thing.
        return VisionOutput(self.trunk.post_trunk_norm(last_block), last_block, hidden_states)


# -- layout: pure functions of grid_thws -----------------------------------------------------------------------------

class VisionLayout(NamedTuple):
    """Everything in the encoder that depends only on the image sizes (cache it per grid_thws).

    The blocks run in "attention order" (see `window_order`, in the windows section below): units are permuted
    as wholes, and the blocks' outputs are put back in input (unit) order.
    """
    grids: tuple[tuple[int, int, int], ...]  # (t, h, w) of each image, in patches
    unit_order: torch.Tensor  # (N/s^2,) the unit at each attention-order position
    unit_restore: torch.Tensor  # (N/s^2,) the attention-order position of each unit
    rope_cos: torch.Tensor  # (N, 1, 1, head_dim) float32, attention order
    rope_sin: torch.Tensor  # (N, 1, 1, head_dim) float32, attention order
    window_runs: tuple[tuple[int, int], ...]  # attention_runs of the windows
    image_runs: tuple[tuple[int, int], ...]  # attention_runs of whole frames
    pos_resample: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # pos_embed_resamplers (empty without a table)


def vision_layout(grid_thws: torch.Tensor, cfg: VitConfig, device: torch.device | None = None) -> VisionLayout:
    stride = cfg.hidden_stride
    units = stride * stride
    grids = tuple(_grids(grid_thws, stride))
    unit_order, window_lengths = window_order(grids, stride, cfg.window_size // stride // cfg.patch_size)
    angles = rope_angles(grid_thws, cfg.hidden_size // cfg.num_heads, stride)  # (N, head_dim/2), input order
    angles = angles.reshape(-1, units, angles.shape[-1])[unit_order].reshape(-1, 1, 1, angles.shape[-1])
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half: both halves use the same angles
    resample = pos_embed_resamplers(grid_thws, cfg) if cfg.preserve_original_pe else ()
    return VisionLayout(
        grids=grids,
        unit_order=unit_order.to(device),
        unit_restore=torch.argsort(unit_order).to(device),
        rope_cos=angles.cos().to(device),
        rope_sin=angles.sin().to(device),
        window_runs=attention_runs(window_lengths),
        image_runs=attention_runs([h * w for t, h, w in grids for _ in range(t)]),
        pos_resample=tuple((a.to(device), b.to(device)) for a, b in resample),
    )


def position_embeddings(pos_embed: torch.Tensor, layout: VisionLayout, method: str, hidden_stride: int) -> torch.Tensor:
    """The learned (1, P, D) position table resized to each image, in input (unit) order: (N, D) float32.

    Float32 whatever the weight dtype, as a few small matmuls with the `pos_embed_resamplers` weights (the
    bicubic kernel itself is slow on GPU for 1024 channels).
    """
    table = pos_embed[0].float()  # (P, D)
    side = int(table.shape[0] ** 0.5)
    per_image = []
    for (t, h, w), (a, b) in zip(layout.grids, layout.pos_resample):
        if method == "two_dim":  # a: (h, side) row weights, b: (w, side) column weights
            pe = torch.einsum("hi,ijd,wj->hwd", a, table.view(side, side, -1), b).reshape(h * w, -1)
        else:  # one_dim, a: (h*w, 2) table indices, b: (h*w, 2) their weights
            pe = (table[a] * b[..., None]).sum(1)
        per_image.append(_raster_to_units(pe.repeat(t, 1), t, h, w, hidden_stride))  # (t*h*w, D)
    return torch.cat(per_image)


def rope_angles(grid_thws: torch.Tensor, head_dim: int, hidden_stride: int) -> torch.Tensor:
    """Rotary angles of every patch in input (unit) order: (N, head_dim/2) float32, [row freqs | col freqs]."""
    dim = head_dim // 2
    # float32 in any model dtype. The official scripts' `model.to(torch.bfloat16)` also rounds the reference code's
    # inv_freq buffer to bf16 and multiplies the positions in bf16 (8 significant bits), which turns a patch by up
    # to 0.4% of its angle, tenths of a radian at row 100; the float32 angles are the rotations the encoder was
    # defined with, so this is the more exact choice.
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (head_dim/4,)
    positions = []
    for t, h, w in _grids(grid_thws, hidden_stride):
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        row_col = torch.stack([rows, cols], dim=-1).reshape(h * w, 2)
        positions.append(_raster_to_units(row_col, 1, h, w, hidden_stride).repeat(t, 1))
    positions = torch.cat(positions)  # (N, 2)
    return (positions[:, :, None].float() * inv_freq).flatten(1)  # (N, 2 * head_dim/4)


def pos_embed_resamplers(grid_thws: torch.Tensor, cfg: VitConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per image, the weights that resize the learned position table to that image (see `position_embeddings`).

    Resizing is linear in the table, so its weights are found once per image size by resizing the identity with
    the official call. `two_dim` (bicubic, align_corners False) is separable: a (h, side) matrix for the rows and
    a (w, side) one for the columns. `one_dim` (linear over the flattened raster table) mixes at most two table
    entries per patch: their indices and weights, (h*w, 2) each.
    """
    side = cfg.image_size // cfg.patch_size
    eye = torch.eye(side * side if cfg.interpolate_pe_method == "one_dim" else side)
    resamplers = []
    for t, h, w in _grids(grid_thws, cfg.hidden_stride):
        if cfg.interpolate_pe_method == "two_dim":
            rows = F.interpolate(eye.view(1, side, side, 1), size=(h, 1), mode="bicubic", align_corners=False)
            cols = F.interpolate(eye.view(1, side, 1, side), size=(1, w), mode="bicubic", align_corners=False)
            resamplers.append((rows[0, :, :, 0].T, cols[0, :, 0, :].T))  # (h, side), (w, side)
        elif cfg.interpolate_pe_method == "one_dim":
            matrix = F.interpolate(eye[None], size=h * w, mode="linear", align_corners=False)[0].T  # (h*w, P)
            weights, index = matrix.topk(min(2, side * side), dim=-1)
            resamplers.append((index, weights))
        else:
            raise ValueError(f"interpolate_pe_method must be 'one_dim' or 'two_dim', got {cfg.interpolate_pe_method!r}")
    return tuple(resamplers)


def _grids(grid_thws: torch.Tensor, hidden_stride: int) -> list[tuple[int, int, int]]:
    grids = [tuple(int(v) for v in row) for row in grid_thws.tolist()]
    for t, h, w in grids:
        if h % hidden_stride or w % hidden_stride:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not a multiple of hidden_stride={hidden_stride}: "
                             f"resize images to a multiple of patch_size * hidden_stride pixels")
    return grids


def _raster_to_units(x: torch.Tensor, t: int, h: int, w: int, stride: int) -> torch.Tensor:
    """Reorder per-patch rows of one image from raster order to unit order (each stride x stride group adjacent)."""
    x = x.reshape(t, h // stride, stride, w // stride, stride, *x.shape[1:])
    return x.transpose(2, 3).reshape(t * h * w, *x.shape[5:])

# -- windows: the attention order, for configurations with window attention ------------------------------------------

def window_order(grids: tuple[tuple[int, int, int], ...], stride: int, window_units: int
                 ) -> tuple[torch.Tensor, list[int]]:
    """The attention order of the packed units, and the length in patches of each window in it.

    Attention order is the official window order (each frame's units window by window, see `window_table`),
    except that the windows of each frame are sorted by size so that equal windows are adjacent: attention is
    permutation-equivariant inside a window and the outputs are put back in input order, so this changes nothing
    but the number of SDPA calls (`attention_runs`). A block that attends over whole images sees the same order,
    which changes nothing for it either.
    """
    unit_order, window_lengths, offset = [], [], 0
    for t, h, w in grids:
        table = window_table(t, h // stride, w // stride, window_units)  # (t, n_windows, m*m)
        sizes = (table >= 0).sum(-1)  # (t, n_windows) units per window
        by_size = sizes.sort(dim=-1, descending=True, stable=True).indices  # per frame: frames stay contiguous
        table = table.gather(1, by_size[..., None].expand_as(table))
        unit_order.append(table[table >= 0] + offset)
        window_lengths += (sizes.gather(1, by_size).flatten() * stride * stride).tolist()
        offset += t * (h // stride) * (w // stride)
    return torch.cat(unit_order), window_lengths


def window_table(t: int, units_h: int, units_w: int, window_units: int) -> torch.Tensor:
    """(t, n_windows, window_units^2) unit ids of one image, window by window, -1 where a window is padding.

    As in the official code the grid is always padded by at least one window row and column (a whole empty
    row/column of windows when it divides evenly), and windows are read in raster order.
    """
    n_wh, n_ww = units_h // window_units + 1, units_w // window_units + 1
    table = torch.full((t, n_wh * window_units, n_ww * window_units), -1, dtype=torch.long)
    table[:, :units_h, :units_w] = torch.arange(t * units_h * units_w).reshape(t, units_h, units_w)
    table = table.reshape(t, n_wh, window_units, n_ww, window_units).transpose(2, 3)
    return table.reshape(t, n_wh * n_ww, window_units * window_units)


def attention_runs(seqlens: list[int]) -> tuple[tuple[int, int], ...]:
    """Consecutive segments of a packed sequence grouped into runs of equal length: ((n_segments, length), ...).

    Each run is one batched SDPA call over a contiguous slice: no mask, no padding, and window attention costs
    O(N * window) instead of O(N^2). Empty segments are dropped.
    """
    runs = []
    for length in seqlens:
        if length == 0:
            continue
        if runs and runs[-1][1] == length:
            runs[-1][0] += 1
        else:
            runs.append([1, length])
    return tuple((n, length) for n, length in runs)


def reorder_units(x: torch.Tensor, index: torch.Tensor, units: int) -> torch.Tensor:
    """Permute whole units (groups of `units` adjacent rows) of a (N, D) tensor: unit i of the result is unit
    index[i] of x."""
    n, d = x.shape
    return x.reshape(n // units, units * d).index_select(0, index).reshape(n, d)
