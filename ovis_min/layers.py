"""Small pieces of math shared by several blocks."""
import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the gain, as Qwen3, AIMv2 and the decoder's QK-norm all do
    (written out: F.rms_norm is several times slower on bf16 CPU tensors)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the "rotate-half" layout: channel i pairs with channel i + D/2.

    `cos`/`sin` have the full head width D (the D/2 frequencies repeated twice) and broadcast against `x`.
    """
    return x * cos + rotate_half(x) * sin


def pad_rows(rows: list[torch.Tensor], value, left_padding: bool) -> torch.Tensor:
    """Stack variable-length rows into (B, L_max, ...), padding on the left or the right."""
    longest = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    for i, row in enumerate(rows):
        if left_padding:
            out[i, longest - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out
