"""The text refiner: LLM hidden states -> context tokens and one pooled vector for the image decoder.

The report (Sec. 2, Table 1: "Refiner", 81M) places a small bidirectional transformer between the LLM and the
image decoder. In the official Ovis-U1 code (`SingleTokenRefiner` in `modeling_yak.py`, the decoder's `txt_in`)
it is: a learned CLS token prepended to Linear(txt); two pre-LN blocks (self-attention, SiLU MLP) whose residual
branches are gated by a vector `c` computed from the mean over the raw input tokens; no positional encoding.
The CLS output is the pooled text vector that, with the timestep, modulates every decoder block.

The official code always calls it without a mask (its masked path fails: the mask has L entries while the
sequence has L+1 after the CLS token). `key_mask` here exists so that conditions of different lengths can be
right-padded and refined in one batch: a padded row then equals the same row refined alone.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ovis_min.config import RefinerConfig


class TextProjection(nn.Module):
    """Linear-SiLU-Linear from the mean input token to the gating vector `c`."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    """x += gate_msa * attn(LN x); x += gate_mlp * mlp(LN x). Only gates are modulated: no shift/scale."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        gate_msa, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        # the fused projection is laid out (qkv, head, channel), qkv outermost
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hs)
        x = x + gate_msa * self.self_attn_proj(attn.transpose(1, 2).reshape(B, L, D))
        return x + gate_mlp * self.mlp(self.norm2(x))


class RefinerBlocks(nn.Module):
    """Only here so that the checkpoint names read `individual_token_refiner.blocks.N`."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(RefinerBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
                                    for _ in range(config.num_blocks))


class TokenRefiner(nn.Module):
    def __init__(self, config: RefinerConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"refiner hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.input_embedder = nn.Linear(config.context_in_dim, config.hidden_size)
        self.c_embedder = TextProjection(config.context_in_dim, config.hidden_size)
        self.individual_token_refiner = RefinerBlocks(config)

    def forward(self, txt: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (B, L, context_in_dim) -> (tokens (B, L, H), cls (B, H)).

        key_mask: optional (B, L) bool, True for real tokens (right padding); padded rows must not be attended
        to nor averaged into `c`. Outputs at padded positions are meaningless.
        """
        B, L, _ = txt.shape
        if key_mask is None:
            c = self.c_embedder(txt.mean(dim=1))  # (B, H)
            attn_mask = None
        else:
            if key_mask.shape != (B, L):
                raise ValueError(f"key_mask must be (B, L) = {(B, L)}, got {tuple(key_mask.shape)}")
            keep = key_mask.to(txt.dtype)[..., None]  # (B, L, 1)
            c = self.c_embedder((txt * keep).sum(dim=1) / keep.sum(dim=1))
            # the CLS token (position 0) is always a valid key
            attn_mask = F.pad(key_mask.bool(), (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, L+1)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.input_embedder(txt)], dim=1)  # (B, L+1, H)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, attn_mask)
        return x[:, 1:], x[:, 0]
