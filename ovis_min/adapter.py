"""The adapter: visual head + probabilistic visual embedding table (the report's "adapter", Ovis' VTE).

Facts from the official Ovis-U1 code (`modeling_ovis_u1.py`, `Aimv2VisualTokenizer` and `VisualEmbedding`):
* the head reads the encoder's LAST BLOCK OUTPUT (no post_trunk_norm); each 2x2 unit of patch features, already
  adjacent in the packed sequence, is concatenated into one 4*D vector (pixel shuffle, order tl, tr, bl, br);
* head = Linear(4*D -> V-4, no bias) + LayerNorm(eps 1e-5); its softmax (in float32, cast back) is a
  probability over the V-4 visual words, padded with 4 zero columns to the table size V;
* the embedding of a visual token is the expectation `probs @ vte.weight` over the (V, llm_hidden) table;
* the indicator ids -301..-304 (-301 opens an image, -302 closes it, -303 brackets a video) are embedded with
  table rows V-5..V-2: the official code looks up `vte(arange(V-5, V))` and uses row i for id -301-i. Quirk
  kept for checkpoint compatibility: row V-5 is therefore ALSO the last real visual word (the head predicts
  rows 0..V-5), and row V-1 is never used.
"""
from typing import NamedTuple

import torch
from torch import nn

from ovis_min.config import AdapterConfig

INDICATOR_TABLE_ROWS = 5  # the official lookup of the indicator rows is hard-coded to the last 5 rows


class VisualTokens(NamedTuple):
    features: torch.Tensor  # (N/s^2, s^2*D) merged patch features
    logits: torch.Tensor  # (N/s^2, V-4)
    probs: torch.Tensor  # (N/s^2, V) softmax over the visual words, 4 zero indicator columns


def merge_units(features: torch.Tensor, hidden_stride: int) -> torch.Tensor:
    """(N, D) patch features in unit order -> (N/s^2, s^2*D): one row per merged visual token."""
    n, dim = features.shape
    return features.reshape(n // (hidden_stride * hidden_stride), -1)


class VisualHead(nn.Sequential):
    """Linear + LayerNorm from merged features to visual-word logits (keys `0.weight`, `1.weight`, `1.bias`)."""

    def __init__(self, cfg: AdapterConfig):
        merged_dim = cfg.vision_hidden_size * cfg.hidden_stride * cfg.hidden_stride
        words = cfg.visual_vocab_size - cfg.num_indicators
        super().__init__(nn.Linear(merged_dim, words, bias=False), nn.LayerNorm(words, eps=1e-5))
        self.hidden_stride = cfg.hidden_stride
        self.num_indicators = cfg.num_indicators

    def tokenize(self, features: torch.Tensor) -> VisualTokens:
        """(N, D) last-block encoder features -> merged features, logits and (N/s^2, V) probabilities."""
        merged = merge_units(features, self.hidden_stride)
        logits = self(merged)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        # The indicator rows of the table can never be predicted: their probability columns are zero.
        probs = torch.cat([probs, probs.new_zeros(probs.shape[0], self.num_indicators)], dim=-1)
        return VisualTokens(merged, logits, probs)


class VisualEmbedding(nn.Module):
    """The (V, llm_hidden) visual embedding table (key `weight`, `vte.weight` in the checkpoint)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.visual_vocab_size, cfg.llm_hidden_size))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, V) visual-word probabilities -> (N, llm_hidden) expected embeddings."""
        return probs @ self.weight

    def indicator_embeds(self) -> torch.Tensor:
        """(5, llm_hidden): row i embeds the indicator id -301-i (rows V-5..V-1 of the table, see module doc)."""
        return self.weight[-INDICATOR_TABLE_ROWS:]
