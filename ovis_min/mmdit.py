"""The image decoder: an MMDiT that predicts the flow-matching velocity of packed VAE latent tokens.

Its names, stated once: ovis-min calls it "the image decoder" ("the decoder" for short) and its class `MMDiT`;
the checkpoint keeps it under `visual_generator.backbone.` (config section `visual_generator_config`, model
type "yak"); the official code calls it `YakTransformer`; the report's Table 1 calls it the "Vision Decoder".

Facts from the report (Sec. 2, Table 1: "Vision Decoder" 1046M + "Refiner" 81M) and the official Ovis-U1 code
(`YakTransformer` in `modeling_yak.py`, defaults in `configuration_yak.py`):
* inputs: noise tokens (4 latent channels packed 2x2 -> 16), the LLM condition refined by `txt_in`
  (refiner.py), the timestep and, for editing, the VAE tokens of the input image appended after the noise;
* vec = MLP(sinusoid(1000 t)) + MLP(text CLS) modulates every block (adaLN: shift, scale, gate);
* double-stream blocks (FLUX-style: own weights for txt and img, one joint attention) that add an image-only
  self-attention (SD3.5's "X" block), then single-stream blocks on the concatenation [txt, img];
* 3-axis RoPE over (frame, row, col) ids that rotates ADJACENT channel pairs (FLUX layout, not the ViT's
  rotate-half). Text ids are all zero, so text tokens are not rotated; edit-image tokens have frame 1.

The work that does not change during sampling (refining the text, its CLS vector, RoPE tables) is split out
(`encode_text`, `text_vector`, `rope`) so a sampler does it once; `forward` is the official one-call form.
RoPE is float32 in any model dtype, as in the official code: the tables are built in float64 and rounded once,
and q and k are rotated in float32 (bf16 tables would lose the angle's precision as the position grows, and a
1024x1024 image has 64 rows and columns of tokens).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ovis_min.config import MMDiTConfig, RefinerConfig
from ovis_min.layers import rms_norm
from ovis_min.refiner import TokenRefiner


# ----------------------------------------------------------------------------------------------------------------
# math


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """(B,) timesteps in [0, 1] -> (B, dim) float32 features [cos | sin] of 1000 t."""
    # 1000 t is rounded in t's own dtype before the float32 math: the official sampler passes t in the latent
    # dtype (bf16), and its result depends on that rounding.
    t = (t * 1000).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(ids: torch.Tensor, axes_dim: tuple, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, n_axes) position ids -> the float32 tables (cos, sin), each (B, 1, S, D), D = sum(axes_dim), that
    `apply_rope` rotates with; made once per generation.

    Axis a owns axes_dim[a]/2 consecutive channel pairs; pair j of that axis turns by pos_a * theta^(-2j/axes_dim[a]).
    The angles and their cos/sin are computed in float64 and rounded to float32 once, as the official `rope` does
    (its float64 frequencies promote the float32 ids). Pair i holds (cos_i, cos_i) and (-sin_i, sin_i): the rows of
    its rotation matrix [[cos, -sin], [sin, cos]].
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dim {tuple(axes_dim)} has {len(axes_dim)}")
    angles = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)  # (dim/2,)
        angles.append(ids[..., axis].double()[..., None] * freqs)  # (B, S, dim/2)
    angles = torch.cat(angles, dim=-1)[:, None]  # (B, 1, S, D/2) float64
    cos, sin = angles.cos().float(), angles.sin().float()
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs (2i, 2i+1) of x (B, nh, L, D) by the float32 tables of `rope_tables`:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), computed in float32 and returned in x's dtype, as the
    official `apply_rope` does."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return torch.addcmul(x32 * cos, swapped, sin).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE + softmax attention over all tokens. q, k, v (B, nh, L, hs); rope = (cos, sin) from `rope_tables`;
    key_mask (B, L), True = real token (it masks keys only) -> (B, L, nh*hs)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hs)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H) laid out (qkv, head, channel) with qkv outermost -> q, k, v each (B, nh, L, hs)."""
    B, L, _ = qkv.shape
    q, k, v = qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """The decoder's LayerNorms have no affine parameters: adaLN supplies shift and scale."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass


def gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * update, in one pass."""
    return torch.addcmul(x, gate, update)


# ----------------------------------------------------------------------------------------------------------------
# blocks


class HeadRMSNorm(nn.Module):
    """RMSNorm over one head's channels (eps 1e-6). Not layers.RMSNorm: the checkpoint calls the gain `scale`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = HeadRMSNorm(head_dim)
        self.key_norm = HeadRMSNorm(head_dim)


class AttentionWeights(nn.Module):
    """The projections of one attention (qkv in, proj out). The attention itself runs in the block, because in
    a double block the text and image streams attend jointly with their own weights."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, H) -> q, k, v each (B, nh, L, hs), q and k RMS-normalised."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    """vec (B, H) -> `n` vectors (B, 1, H): (shift, scale, gate) for each modulated sub-layer, in that order."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None].chunk(self.n, dim=-1)


def mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(approximate="tanh"), nn.Linear(hidden_dim, dim))


class DoubleBlock(nn.Module):
    """Text and image keep separate weights and meet in one joint attention; the image stream also has an
    image-only self-attention, fed the same normalised image under its own (third) modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, 9)
        self.img_attn = AttentionWeights(hidden_size, num_heads, qkv_bias)
        self.img_self_attn = AttentionWeights(hidden_size, num_heads, qkv_bias)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, 6)
        self.txt_attn = AttentionWeights(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, H), txt (B, L, H), rope tables over [txt, img], key_mask (B, L+N) -> new (img, txt)."""
        L = txt.shape[1]
        (img_shift1, img_scale1, img_gate1,  # joint attention
         img_shift2, img_scale2, img_gate2,  # MLP
         img_shift3, img_scale3, img_gate3) = self.img_mod(vec)  # image-only self-attention
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_normed = layer_norm(img)
        img_q, img_k, img_v = self.img_attn.heads(modulate(img_normed, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(layer_norm(txt), txt_shift1, txt_scale1))
        joint = attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2),
                          torch.cat([txt_v, img_v], dim=2), rope, key_mask)  # (B, L+N, H)

        self_q, self_k, self_v = self.img_self_attn.heads(modulate(img_normed, img_shift3, img_scale3))
        img_key_mask = None if key_mask is None else key_mask[:, L:]
        img_rope = tuple(table[:, :, L:] for table in rope)
        img_self = attention(self_q, self_k, self_v, img_rope, img_key_mask)  # (B, N, H)

        img = gated(img, img_gate1, self.img_attn.proj(joint[:, L:]))
        img = gated(img, img_gate3, self.img_self_attn.proj(img_self))
        img = gated(img, img_gate2, self.img_mlp(modulate(layer_norm(img), img_shift2, img_scale2)))
        txt = gated(txt, txt_gate1, self.txt_attn.proj(joint[:, :L]))
        txt = gated(txt, txt_gate2, self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2)))
        return img, txt


class SingleBlock(nn.Module):
    """One stream over [txt, img]: linear1 makes qkv and the MLP input in parallel, linear2 mixes both back."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.split_sizes = [3 * hidden_size, int(hidden_size * mlp_ratio)]
        self.linear1 = nn.Linear(hidden_size, sum(self.split_sizes))
        self.linear2 = nn.Linear(hidden_size + self.split_sizes[1], hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, 3)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = self.linear1(modulate(layer_norm(x), shift, scale)).split(self.split_sizes, dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope, key_mask)  # (B, S, H)
        return gated(x, gate, self.linear2(torch.cat([attn, F.gelu(mlp_in, approximate="tanh")], dim=-1)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # shift first, as in DiT and FLUX
        return self.linear(modulate(layer_norm(x), shift, scale))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ----------------------------------------------------------------------------------------------------------------
# the image decoder


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig, refiner_config: RefinerConfig):
        super().__init__()
        H, nh = config.hidden_size, config.num_heads
        if H % nh:
            raise ValueError(f"mmdit hidden_size {H} is not divisible by num_heads {nh}")
        if sum(config.axes_dim) != H // nh:
            raise ValueError(f"mmdit axes_dim {tuple(config.axes_dim)} must sum to the head size {H // nh}")
        if config.vec_in_dim != H or refiner_config.hidden_size != H:
            raise ValueError(f"vector_in reads the refiner's CLS output: vec_in_dim ({config.vec_in_dim}) and "
                             f"refiner hidden_size ({refiner_config.hidden_size}) must equal hidden_size ({H})")
        if refiner_config.context_in_dim != config.context_in_dim:
            raise ValueError(f"refiner context_in_dim {refiner_config.context_in_dim} != mmdit context_in_dim "
                             f"{config.context_in_dim}")
        self.config = config
        self.img_in = nn.Linear(config.in_channels, H)
        self.time_in = MLPEmbedder(256, H)
        self.vector_in = MLPEmbedder(config.vec_in_dim, H)
        self.txt_in = TokenRefiner(refiner_config)
        self.double_blocks = nn.ModuleList(DoubleBlock(H, nh, config.mlp_ratio, config.qkv_bias)
                                           for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(H, nh, config.mlp_ratio)
                                           for _ in range(config.depth_single_blocks))
        self.final_layer = FinalLayer(H, config.out_channels)

    def encode_text(self, txt: torch.Tensor, txt_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM condition (B, L, context_in_dim) -> (txt_tokens (B, L, H), cls (B, H)); once per generation.

        txt_mask: (B, L) bool for right-padded batches of conditions (see refiner.py); None = all real.
        """
        return self.txt_in(txt, txt_mask)

    def rope(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (B, S, 3) of the whole sequence [txt, img(, cond_img)] -> the float32 (cos, sin) tables
        (B, 1, S, hs) that every attention of `predict_velocity` applies."""
        return rope_tables(ids, self.config.axes_dim, self.config.theta)

    def text_vector(self, cls: torch.Tensor) -> torch.Tensor:
        """The CLS part of the modulation vector, vector_in(cls) (B, H): it does not change with the step."""
        return self.vector_in(cls)

    def predict_velocity(self, img: torch.Tensor, txt_tokens: torch.Tensor, txt_vec: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor], timesteps: torch.Tensor,
                         cond_img: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """One decoder evaluation -> velocity (B, N, out_channels) for the N noise tokens.

        img (B, N, in_channels) noise tokens; txt_tokens from `encode_text` and txt_vec = `text_vector(cls)`;
        rope = `rope(ids)` over the sequence [txt (L), img (N), cond_img (Nc)], batch B or 1;
        timesteps (B,) in [0, 1], in the latent dtype as the official sampler passes it; cond_img (B, Nc,
        in_channels) VAE tokens of the edited image.
        key_mask (B, L+N+Nc) bool, True for real tokens: lets rows with padded text (or without a cond image,
        padded with dummy tokens) share one batch; padded positions are never attended to.
        txt_vec and rope depend only on the condition and the grid, so a sampler makes them once per generation
        and a step does only the work that changes with the step.
        """
        num_img, L = img.shape[1], txt_tokens.shape[1]
        if cond_img is not None:
            img = torch.cat([img, cond_img], dim=1)  # the edit image attends as extra image tokens
        S = L + img.shape[1]
        if rope[0].shape[2] != S:
            raise ValueError(f"rope covers {rope[0].shape[2]} tokens but the sequence [txt, img, cond_img] has {S}")
        if key_mask is not None and tuple(key_mask.shape) != (img.shape[0], S):
            raise ValueError(f"key_mask must be (B, L+N+Nc) = {(img.shape[0], S)}, got {tuple(key_mask.shape)}")

        img = self.img_in(img)  # (B, N+Nc, H)
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype)) + txt_vec  # (B, H)
        txt = txt_tokens
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, key_mask)
        x = torch.cat([txt, img], dim=1)  # (B, S, H)
        for block in self.single_blocks:
            x = block(x, vec, rope, key_mask)
        out = self.final_layer(x[:, L:], vec)  # (B, N+Nc, out_channels)
        return out[:, :num_img]

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, cond_img: torch.Tensor | None = None,
                cond_img_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The official call: raw LLM condition txt (B, L, context_in_dim) and position ids -> velocity (B, N, C)."""
        txt_tokens, cls = self.encode_text(txt)
        ids = [txt_ids, img_ids] if cond_img is None else [txt_ids, img_ids, cond_img_ids]
        rope = self.rope(torch.cat(ids, dim=1))
        return self.predict_velocity(img, txt_tokens, self.text_vector(cls), rope, timesteps, cond_img)
