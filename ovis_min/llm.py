"""Qwen3-1.7B, the language model of Ovis-U1 (official `llm`, a standard Hugging Face Qwen3ForCausalLM).

It serves three paths of the report's Figure 2:
  * understanding: `prefill` and `decode_step` on a static KV cache (the decoding loop is decode.py's);
  * image generation: `condition_states` gives the text condition of the image decoder;
  * tests and scoring: `forward` (logits) and `hidden_states` (every layer, Hugging Face convention).

Block: x += o(attn(RoPE(q_norm(q)), RoPE(k_norm(k)), v)) on RMSNorm(x); x += down(silu(gate) * up) on RMSNorm(x).
Grouped-query attention (16 query heads share 8 KV heads), per-head RMSNorm of q and k, rotate-half RoPE with
theta 1e6, tied input/output embeddings. Decoding uses a static KV cache written in place, so one decode step has
fixed shapes and `torch.compile` can take `decode_step` whole.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .layers import RMSNorm, apply_rope_half

# -- math ----------------------------------------------------------------------------------------------------------

def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, 1, L, head_dim) for integer positions (B, L), rotate-half layout, computed in float32.

    Recomputed on every call rather than stored, so the model holds no derived buffers and can be built on the meta
    device; Hugging Face also computes them in float32 and casts to the activation dtype.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    # float32 in any model dtype. The official scripts' `model.to(torch.bfloat16)` rounds Hugging Face's inv_freq
    # buffer to bf16 (8 significant bits, up to 0.2% off), and the error grows with the position: radians at
    # position 1000. The float32 frequencies are the ones Qwen3 was defined with, so this is the more exact choice.
    inv_freq = 1.0 / (theta ** exponents)  # (head_dim/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, L, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def causal_mask(attention_mask: torch.Tensor | None, batch: int, length: int,
                device: torch.device) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal, and only to valid keys when `attention_mask` (B, L) is given.

    Every query may also attend to itself, so a left-padding query (which has no valid key at or before it) still
    gets a finite output instead of NaN; NaN would otherwise leak into valid rows through 0 * NaN in the attention
    product. Outputs at padding queries are meaningless either way, as in the official model.
    """
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (L, L)
    if attention_mask is None:
        return allowed.expand(batch, 1, length, length)
    keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L)
    itself = torch.eye(length, dtype=torch.bool, device=device)
    return allowed & (keys | itself)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form (0 / -inf) of a bool mask, built once per pass instead of by SDPA in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def fold_heads(mask: torch.Tensor, group: int) -> torch.Tensor:
    """A (B, 1, Lq, Lk) mask in the query layout of `attention`: each row repeated for the `group` query heads
    that share one KV head -> (B, 1, group*Lq, Lk); a single row (decoding) broadcasts as it is. Made once per
    pass, not per layer: training then keeps one copy for the backward pass instead of one per layer."""
    batch, _, q_len, k_len = mask.shape
    if q_len == 1:
        return mask
    return mask[:, :, None].expand(batch, 1, group, q_len, k_len).reshape(batch, 1, group * q_len, k_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query SDPA. q (B, H, Lq, hd); k, v (B, Hkv, Lk, hd); mask (B, 1, H/Hkv*Lq or 1, Lk) from
    `fold_heads`, bool or additive -> (B, H, Lq, hd).

    The H/Hkv query heads that share one KV head are folded into the query length, so the keys and values (the
    whole KV cache when decoding) are read once and never copied per head. Query head h uses KV head h // (H/Hkv),
    as in Hugging Face's `repeat_kv`. SDPA's own `enable_gqa=True` computes the same but is not used: every call
    here has a mask, and on CUDA the fused kernel that takes a mask (memory-efficient) rejects unequal head counts
    while flash takes no mask, so SDPA would fall back to its O(L^2)-memory math kernel; on the CPU it was no
    faster (fp32 prefill the same, one decode step's attention 1.25x slower; bf16 up to 1.7x faster).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads * q_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, group*Lq, hd)
    # reshape, not view: CUDA's masked kernel returns its output in (B, L, H, hd) memory order
    return out.reshape(batch, heads, q_len, head_dim)


# -- blocks --------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        # Static KV cache (B, Hkv, max_len, hd), allocated by Qwen3.setup_cache; not part of the checkpoint.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); mask (B, 1, H/Hkv*L or 1, Lk) from `fold_heads`. With `cache_pos` (L,), k/v are written
        to those cache slots and the queries attend over the first Lk = mask.shape[-1] slots of the cache; without
        it, over this x alone."""
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin)  # (B, H or Hkv, L, hd)
        if cache_pos is not None:
            if self.k_cache is None:
                raise RuntimeError("no KV cache: call Qwen3.setup_cache(batch_size, max_len) before decoding")
            # under autocast k and v come out in bf16 while the cache has the weights' dtype
            self.k_cache.index_copy_(2, cache_pos, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, cache_pos, v.to(self.v_cache.dtype))
            k, v = self.k_cache[:, :, :mask.shape[-1]], self.v_cache[:, :, :mask.shape[-1]]
        out = attention(q, k, v, mask)  # (B, H, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Embeddings, decoder layers and final norm: the official `llm.model`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3(nn.Module):
    """The official `llm`: state_dict keys are the checkpoint's names below `llm.`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            # Checkpoints of tied models usually omit lm_head.weight; these hooks make loading work with or without
            # it (also when this model is a submodule, and with assign=True, which would otherwise untie them).
            self.register_load_state_dict_pre_hook(self._fill_tied_head)
            self.register_load_state_dict_post_hook(self._retie_head)

    @staticmethod
    def _fill_tied_head(module, state_dict, prefix, *args):
        # Like Hugging Face's weight tying, the input embeddings win over a stored lm_head.weight.
        embed_key = prefix + "model.embed_tokens.weight"
        if embed_key in state_dict:
            state_dict[prefix + "lm_head.weight"] = state_dict[embed_key]

    @staticmethod
    def _retie_head(module, incompatible_keys):
        module.lm_head.weight = module.model.embed_tokens.weight

    # -- full-sequence passes (no cache) ---------------------------------------------------------------------------

    def _inputs(self, input_ids, inputs_embeds, attention_mask, position_ids):
        """Embeddings (B, L, D), mask (B, 1, H/Hkv*L, L) (see `fold_heads`), cos/sin for the full-sequence
        passes."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length, _ = x.shape
        if position_ids is None:
            # The official forward (and generate_condition) uses 0..L-1 for every row, even a left-padded one.
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_bias(causal_mask(attention_mask, batch, length, x.device), x.dtype)
        return x, fold_heads(mask, self.cfg.num_heads // self.cfg.num_kv_heads), cos, sin

    def hidden_states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """num_layers + 1 tensors (B, L, D) in Hugging Face's convention: [0] the input embeddings, [i] the raw output
        of layer i-1 (0-based) for i < num_layers, and the last entry the final RMSNorm of the last layer's output
        (the last layer's raw output is not in the list)."""
        x, mask, cos, sin = self._inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        states = [x]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
            states.append(x)
        states[-1] = self.model.norm(x)
        return states

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for every position. attention_mask (B, L) marks valid tokens (left padding);
        position_ids (B, L) default to 0..L-1 for every row, as in the official forward."""
        x, mask, cos, sin = self._inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))

    def condition_states(self, inputs_embeds: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(last, second_last), each (B, L, D): the official image-generation condition is cat of these two, i.e.
        Hugging Face's hidden_states[-1] (final norm of the last layer's output) and hidden_states[-2] (the raw
        output of the second-to-last layer, i.e. the last layer's input). No logits, no cache; positions 0..L-1,
        as generate_condition passes no position_ids."""
        x, mask, cos, sin = self._inputs(None, inputs_embeds, attention_mask, None)
        *first_layers, last_layer = self.model.layers
        for layer in first_layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(last_layer(x, cos, sin, mask)), x

    # -- decoding with a static KV cache ----------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int) -> None:
        """Zeroed (B, Hkv, >= max_len, hd) K and V buffers per layer, in the weights' dtype and device.

        An existing cache of the same batch size, dtype and device and at least max_len slots is zeroed and kept:
        generations of any shorter length reuse the same memory, so a compiled decode step keeps its shapes (and
        a CUDA graph its addresses). Zeros, not empty memory: slots that are masked out are still multiplied by
        a zero attention weight, and 0 * NaN would be NaN.
        """
        weight = self.model.embed_tokens.weight
        cache = self.model.layers[0].self_attn.k_cache
        if (cache is not None and cache.shape[0] == batch_size and cache.shape[2] >= max_len
                and cache.dtype == weight.dtype and cache.device == weight.device):
            for layer in self.model.layers:
                layer.self_attn.k_cache.zero_()
                layer.self_attn.v_cache.zero_()
            return
        shape = (batch_size, self.cfg.num_kv_heads, max_len, self.cfg.head_dim)
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None  # free the old cache before the new one
            layer.self_attn.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    def free_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None

    def cache_len(self) -> int:
        cache = self.model.layers[0].self_attn.k_cache
        return 0 if cache is None else cache.shape[2]

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, L, D), writing cache slots 0..L-1; return float logits (B, V) of the last position."""
        x, mask, cos, sin = self._inputs(None, inputs_embeds, attention_mask, position_ids)
        cache_pos = torch.arange(x.shape[1], device=x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        return self.lm_head(self.model.norm(x[:, -1])).float()

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_pos: torch.Tensor,
                    key_mask: torch.Tensor) -> torch.Tensor:
        """One token per row: input_ids and position_ids (B, 1); cache_pos (1,) the slot to write; key_mask
        (B, Lk) bool the cache slots each row may attend to (this one included). Returns float logits (B, V).

        All shapes are fixed for a given Lk, so torch.compile takes it whole (the caches are buffers, mutated in
        place)."""
        x = self.model.embed_tokens(input_ids)  # (B, 1, D)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_bias(key_mask, x.dtype)[:, None, None, :]  # (B, 1, 1, Lk)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_pos)
        return self.lm_head(self.model.norm(x[:, -1])).float()
