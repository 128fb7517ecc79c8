"""Text decoding: the loop that turns the LLM's next-token logits into an answer, around llm.py.

llm.py is the Qwen3 LLM and its static KV cache (`prefill`, `decode_step`); this file is the policy around it,
as gpt-fast's generate.py is around its model.py:
  * `generate`: Hugging Face's `generate(inputs_embeds=..., attention_mask=...)` as the official understanding path
    calls it (positions under left padding, eos and pad, stopping), one `decode_step` per token;
  * `next_token`: greedy decoding and temperature / top-k / top-p sampling;
  * `cache_length`, `attended_length`: how many cache slots to allocate and to attend over (whole KV_BLOCKs);
  * `matrix_vector_kernels`: the CPU kernel for products with one row, switched on around each decode step;
  * `compile_decode_step`: the step that `Ovis.compile` (sample.py --compile) and bench.py compile.
"""
from contextlib import nullcontext
from typing import Callable

import torch

from .llm import Qwen3

# Decode steps attend over the cache up to the current length rounded up to this many slots: few distinct shapes
# (so a compiled step is rarely re-specialised) while reading at most this many empty slots per step.
KV_BLOCK = 512
# The batch is checked for "every row finished" once every this many decode steps: a per-step check would make
# the host wait for the device after every token.
STOP_CHECK_EVERY = 8


class NonFiniteError(ArithmeticError):
    """The model computed NaN or infinity where a number was due: its weights hold such values (a damaged
    checkpoint, or a diverged training run), and what it would make is noise or black."""


def cache_length(tokens: int) -> int:
    """KV cache slots for a prompt and answer of `tokens` tokens: whole KV_BLOCKs plus a spare one, so the prefix
    a step attends over (`attended_length`) never spans the whole cache and always has the same memory layout
    (a compiled step is not re-specialised for a contiguous last block)."""
    return (-(-tokens // KV_BLOCK) + 1) * KV_BLOCK


def attended_length(slot: int) -> int:
    """The cache prefix a decode step writing `slot` attends over: rounded up to whole KV_BLOCKs, so its shape
    changes once per block, not once per token."""
    return (slot // KV_BLOCK + 1) * KV_BLOCK


def matrix_vector_kernels(device: torch.device):
    """A context for products with one row per weight matrix (decoding) on the CPU: ATen's own kernel streams
    each bf16 weight matrix once, while oneDNN repacks the matrix for every such product and runs about 1.5x
    slower. Decoding reads every weight once per token, so its speed is this kernel's.

    Entered around each call of a decode step, never inside one: torch.compile cannot trace the flags context
    (it would fall back to running the whole step eagerly), and the compiled step's matrix products are ATen
    calls that read the flags when they run."""
    if device.type != "cpu":
        return nullcontext()
    mkldnn = torch.backends.mkldnn  # only `enabled` changes; the other flags are passed back as they are
    return mkldnn.flags(enabled=False, deterministic=mkldnn.deterministic, allow_tf32=mkldnn.allow_tf32,
                        fp32_precision=mkldnn.fp32_precision)


def compile_decode_step(llm: Qwen3, device: torch.device) -> Callable[..., torch.Tensor]:
    """`llm.decode_step` compiled for decoding on `device`; on a GPU also captured as a CUDA graph
    ("reduce-overhead"): one token runs a few hundred small kernels, whose launches would otherwise take longer
    than reading the weights."""
    return torch.compile(llm.decode_step, mode="reduce-overhead" if device.type == "cuda" else None)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from float logits (B, V) -> (B,), with Hugging Face's semantics.

    temperature 0 is greedy (argmax, first index on ties). Otherwise, in Hugging Face's order: divide by the
    temperature, keep the top_k best (0 = all), keep the smallest set of best tokens whose probability reaches top_p
    (always at least the best one), and sample from the softmax.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # probability of this token and all worse ones
        drop = mass_below <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(llm: Qwen3, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 512, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             step: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """New token ids (B, T), T <= max_new_tokens, from left-padded prompt embeddings (B, L, D), like Hugging
    Face's `generate(inputs_embeds=..., attention_mask=...)` as the official understanding path calls it.

    Positions follow Hugging Face under left padding: each row's first valid token is position 0. A row that
    has produced an eos token emits pad_token_id (default: the first eos) from then on; decoding stops when
    every row has finished. temperature 0 is greedy, otherwise see `next_token`. `on_token(ids)` gets each
    step's (B,) ids (on the model's device) for streaming, for exactly the T returned steps. `step` replaces
    `llm.decode_step`, e.g. with `compile_decode_step(llm, device)`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    step = step or llm.decode_step
    # A streaming caller reads every token anyway, so checking for the end each step costs nothing more, and
    # on_token then never sees the pad-only steps after the last row finished.
    check_every = 1 if on_token is not None else STOP_CHECK_EVERY
    batch, prompt_len, _ = inputs_embeds.shape
    device = inputs_embeds.device
    valid = (torch.ones(batch, prompt_len, dtype=torch.bool, device=device) if attention_mask is None
             else attention_mask.to(device=device, dtype=torch.bool))
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    if eos is not None and pad_token_id is None:
        pad_token_id = int(eos[0])

    llm.setup_cache(batch, cache_length(prompt_len + max_new_tokens))
    cache_len = llm.cache_len()
    slots = torch.arange(cache_len, device=device)  # views of it are the cache_pos inputs: no host copies
    key_mask = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
    key_mask[:, :prompt_len] = valid

    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L); values at padding do not matter
    logits = llm.prefill(inputs_embeds, valid, positions)
    # NaN logits would decode as token 0 over and over; weights that make them make them here already
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the LLM's logits are NaN or infinite")
    position = positions[:, -1:] + 1  # (B, 1)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    tokens = []
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, top_k, generator)  # (B,)
        if eos is not None:
            token = torch.where(unfinished, token, pad_token_id)
            unfinished = unfinished & ~torch.isin(token, eos)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        last = i == max_new_tokens - 1
        if last or (eos is not None and i % check_every == check_every - 1 and not unfinished.any()):
            break
        slot = prompt_len + i
        key_mask[:, slot] = True
        with matrix_vector_kernels(device):
            logits = step(token[:, None], position, slots[slot:slot + 1], key_mask[:, :attended_length(slot)])
        position = position + 1
    ids = torch.stack(tokens, dim=1)  # (B, T)
    if eos is not None:
        # Hugging Face stops right after the step at which the last row finished; later steps only add pads.
        all_finished = torch.isin(ids, eos).cummax(dim=1).values.all(dim=0)  # (T,) every row done by step t
        if all_finished.any():
            ids = ids[:, :int(all_finished.nonzero()[0]) + 1]
    return ids
