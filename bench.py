"""Speed of ovis-min on the full-size Ovis-U1-3B, with random weights (no download needed).

    python bench.py                       # all workloads, bf16, on the GPU if there is one
    python bench.py --tiny                # the tiny test config: seconds on any CPU
    python bench.py --only W1,W5 --size 1024 --json out/bench.json
    python bench.py --e2e                 # also whole generations (50 steps; slow on a CPU)
    python bench.py --compile             # torch.compile'd decoder blocks and decode step

The model is built on the meta device and its weights are filled in place in the target dtype, so memory holds
exactly one copy of them. Each workload runs once to warm up, then three times; only the call itself is timed.
FLOPs are analytic (2*M*N*K per matmul, the same for convolutions, 4*H*Lq*Lk*D per attention; elementwise work
is free) and count the useful work only: padding that a batched path adds is not counted. The tests check the
formulas against torch's FlopCounterMode. Percentages are against this machine's matmul speed in the benchmark's
dtype (an n^3 matmul, n up to 4096) and its memory copy bandwidth, both measured in the same run, before and after
every workload; the best of those measurements is the ceiling. Rates (TFLOP/s, tokens/s, GB/s, %) use each workload's fastest
run, as the ceilings do: on a shared, noisy machine the best runs are the ones that compare.
"""
import sys

from ovis_min.cli import ctrl_c_quits_quietly, ctrl_c_raises, whole_number

ctrl_c_quits_quietly("bench.py")  # covers the seconds the imports below take

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ovis_min import flow  # noqa: E402
from ovis_min.checkpoint import build_model  # noqa: E402
from ovis_min.config import LLMConfig, MMDiTConfig, OvisConfig, RefinerConfig, VAEConfig  # noqa: E402
from ovis_min.files import write_atomic  # noqa: E402
from ovis_min.generate import (attended_length, cache_length, compile_decode_step, compile_decoder_blocks,  # noqa: E402
                               matrix_vector_kernels)
from ovis_min.model import OvisU1  # noqa: E402
from ovis_min.model import decode_image_tokens, encode_image_tokens  # noqa: E402
from ovis_min.pipeline import MAX_SIZE, Condition, sample_latents  # noqa: E402
from ovis_min.tiny import tiny_config  # noqa: E402
from ovis_min.vit import vision_layout  # noqa: E402

ctrl_c_raises()

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")

# Token counts of the workloads: the T2I prompts with their 256 image tokens give 290 (cond) and 270
# (uncond) condition tokens, an edit instruction 300.
T2I_TEXT = (290, 270)
EDIT_TEXT = (300, 290, 270)
PROMPT_LEN = 512
VIT_IMAGE = 448
TIME = 0.5


# -- analytic FLOPs ----------------------------------------------------------------------------------------------

def linear(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def attention(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    return 4 * batch * heads * q_len * k_len * head_dim


def refiner_flops(cfg: RefinerConfig, batch: int, length: int) -> int:
    """TokenRefiner on (batch, length, context_in_dim): gating vector, input projection, blocks over L+1 tokens."""
    H, C, M = cfg.hidden_size, cfg.context_in_dim, int(cfg.hidden_size * cfg.mlp_ratio)
    L = length + 1  # the CLS token
    flops = linear(batch, C, H) + linear(batch, H, H) + linear(batch * length, C, H)
    per_block = (linear(batch, H, 2 * H) + linear(batch * L, H, 3 * H) + linear(batch * L, H, H)
                 + attention(batch, cfg.num_heads, L, L, H // cfg.num_heads) + 2 * linear(batch * L, H, M))
    return flops + cfg.num_blocks * per_block


def mmdit_flops(cfg: MMDiTConfig, text: int, noise: int, cond: int = 0, with_text_vector: bool = True) -> int:
    """One decoder evaluation of one row (batch 1): `text` condition tokens, `noise` + `cond` image tokens.

    `with_text_vector`: include vector_in(CLS), which a sampler computes once per generation instead of per step.
    """
    H, nh, M = cfg.hidden_size, cfg.num_heads, int(cfg.hidden_size * cfg.mlp_ratio)
    hd = H // nh
    img, S = noise + cond, text + noise + cond
    flops = linear(img, cfg.in_channels, H) + linear(1, 256, H) + linear(1, H, H)  # img_in, time_in
    if with_text_vector:
        flops += linear(1, cfg.vec_in_dim, H) + linear(1, H, H)
    double = (linear(1, H, 9 * H) + linear(1, H, 6 * H)  # modulations
              + linear(img, H, 3 * H) + linear(text, H, 3 * H) + attention(1, nh, S, S, hd)  # joint attention
              + linear(img, H, 3 * H) + attention(1, nh, img, img, hd)  # image-only self-attention
              + 2 * linear(img, H, H) + linear(text, H, H)  # output projections
              + 2 * linear(img, H, M) + 2 * linear(text, H, M))  # MLPs
    single = (linear(1, H, 3 * H) + linear(S, H, 3 * H + M) + attention(1, nh, S, S, hd)
              + linear(S, H + M, H))
    final = linear(1, H, 2 * H) + linear(img, H, cfg.out_channels)
    return flops + cfg.depth * double + cfg.depth_single_blocks * single + final


def llm_layer_flops(cfg: LLMConfig, q_len: int, k_len: int) -> int:
    D, hd = cfg.hidden_size, cfg.head_dim
    return (linear(q_len, D, cfg.num_heads * hd) + 2 * linear(q_len, D, cfg.num_kv_heads * hd)
            + linear(q_len, cfg.num_heads * hd, D) + attention(1, cfg.num_heads, q_len, k_len, hd)
            + 3 * linear(q_len, D, cfg.intermediate_size))


def llm_condition_flops(cfg: LLMConfig, length: int) -> int:
    """The two hidden states of the generation condition: every layer, full (not causal-halved) attention, no
    logits."""
    return cfg.num_layers * llm_layer_flops(cfg, length, length)


def llm_decode_flops(cfg: LLMConfig, prompt: int, tokens: int) -> int:
    """`tokens` greedy steps after a `prompt`-token prompt, each attending over the positions so far."""
    per_step = [cfg.num_layers * llm_layer_flops(cfg, 1, prompt + i + 1) + linear(1, cfg.hidden_size, cfg.vocab_size)
                for i in range(tokens)]
    return sum(per_step)


def llm_decode_bytes(cfg: LLMConfig, prompt: int, tokens: int, itemsize: int) -> int:
    """Bytes a decode must read: every layer weight and the output head once per token, and the KV cache so far."""
    D, hd = cfg.hidden_size, cfg.head_dim
    layer = (D * cfg.num_heads * hd * 2 + 2 * D * cfg.num_kv_heads * hd + 3 * D * cfg.intermediate_size
             + 2 * D + 2 * hd)  # q, o, k, v, MLP, norms
    weights = cfg.num_layers * layer + cfg.vocab_size * D + D
    kv = sum(2 * cfg.num_layers * cfg.num_kv_heads * hd * (prompt + i + 1) for i in range(tokens))
    return (tokens * weights + kv) * itemsize


def vit_flops(config: OvisConfig, grid: tuple[int, int, int]) -> int:
    """Encoder + visual head + visual embedding of one image of `grid` (t, h, w) patches."""
    cfg, adapter = config.vit, config.adapter
    t, h, w = grid
    N, D, hd = t * h * w, cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    flops = linear(N, cfg.num_channels * cfg.patch_size ** 2, D)  # patch embed
    if cfg.preserve_original_pe and cfg.interpolate_pe_method == "two_dim":
        side = cfg.image_size // cfg.patch_size  # the table is resized by two small matmuls
        flops += 2 * D * (h * side * side + h * side * w)
    layout = vision_layout(torch.tensor([grid]), cfg)
    for i in range(cfg.num_layers):
        full = cfg.fullatt_block_indexes is None or i in cfg.fullatt_block_indexes
        runs = layout.image_runs if full else layout.window_runs
        flops += sum(attention(n, cfg.num_heads, length, length, hd) for n, length in runs)
        flops += linear(N, D, 3 * D) + linear(N, D, D) + 3 * linear(N, D, cfg.intermediate_size)
    tokens = N // cfg.hidden_stride ** 2
    flops += linear(tokens, D * cfg.hidden_stride ** 2, adapter.visual_vocab_size - adapter.num_indicators)
    return flops + linear(tokens, adapter.visual_vocab_size, adapter.llm_hidden_size)


def conv(out_channels: int, in_channels: int, kernel: int, height: int, width: int) -> int:
    return 2 * out_channels * in_channels * kernel * kernel * height * width


def resnet_flops(c_in: int, c_out: int, size: int) -> int:
    shortcut = conv(c_out, c_in, 1, size, size) if c_in != c_out else 0
    return conv(c_out, c_in, 3, size, size) + conv(c_out, c_out, 3, size, size) + shortcut


def vae_mid_flops(cfg: VAEConfig, channels: int, size: int) -> int:
    flops = 2 * resnet_flops(channels, channels, size)
    if cfg.mid_block_add_attention:
        flops += 4 * linear(size * size, channels, channels) + attention(1, 1, size * size, size * size, channels)
    return flops


def vae_decode_flops(cfg: VAEConfig, latent: int) -> int:
    """Decoder of a (1, C, latent, latent) latent to a (1, 3, 8*latent, 8*latent) image."""
    widths = cfg.block_out_channels[::-1]
    c = cfg.latent_channels
    flops = conv(c, c, 1, latent, latent) if cfg.use_post_quant_conv else 0
    flops += conv(widths[0], c, 3, latent, latent) + vae_mid_flops(cfg, widths[0], latent)
    size = latent
    for i, width in enumerate(widths):
        for j in range(cfg.layers_per_block + 1):
            flops += resnet_flops(widths[max(i - 1, 0)] if j == 0 else width, width, size)
        if i < len(widths) - 1:
            size *= 2
            flops += conv(width, width, 3, size, size)
    return flops + conv(cfg.out_channels, widths[-1], 3, size, size)


def vae_encode_flops(cfg: VAEConfig, image: int) -> int:
    """Encoder of a (1, 3, image, image) image to the posterior (mean and log-variance)."""
    widths, size = cfg.block_out_channels, image
    flops = conv(widths[0], cfg.in_channels, 3, size, size)
    for i, width in enumerate(widths):
        for j in range(cfg.layers_per_block):
            flops += resnet_flops(widths[max(i - 1, 0)] if j == 0 else width, width, size)
        if i < len(widths) - 1:
            size //= 2
            flops += conv(width, width, 3, size, size)
    flops += vae_mid_flops(cfg, widths[-1], size) + conv(2 * cfg.latent_channels, widths[-1], 3, size, size)
    return flops + (conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1, size, size) if cfg.use_quant_conv else 0)


def grid_tokens(size: int) -> int:
    """Packed latent tokens of a size x size image: one per 16x16 pixels."""
    return (size // 16) ** 2


def vit_grid(config: OvisConfig, image: int = VIT_IMAGE) -> tuple[int, int, int]:
    side = image // config.vit.patch_size
    return 1, side, side


# -- the model with random weights -------------------------------------------------------------------------------

@torch.no_grad()
def random_model(config: OvisConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> OvisU1:
    """The whole model with random weights, each allocated once in `dtype` on `device` and filled in place.

    Built on the meta device, then every parameter is replaced by real memory; parameters shared by several
    modules (the tied LLM head) stay one tensor. Weights are uniform with the variance of PyTorch's default
    init (1/fan_in), norms are 1 and biases 0, so activations keep a sane scale through all layers.
    """
    model = build_model(config).eval()
    real: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in real:
                real[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                               requires_grad=False)
            setattr(module, name, real[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, torch.zeros(buffer.shape, dtype=dtype if buffer.is_floating_point()
                                                     else buffer.dtype, device=device))
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            bound = math.sqrt(3.0 / param[0].numel())
            param.uniform_(-bound, bound, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:  # norm gains
            param.fill_(1.0)
    return model


# -- the machine -------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


class Ceilings:
    """This machine's matmul FLOP/s in the benchmark's dtype (an n^3 matmul) and its copy bandwidth, each the best
    seen over all the times `measure` is called.

    n is chosen once: doubled from 256 until one matmul takes 20 ms (or n reaches 4096), so a measurement costs
    a fraction of a second on any machine while the matmul is still large enough to run at the kernel's peak.
    Copy bandwidth is bytes copied per second, for a tensor much larger than the caches: the copy reads and
    writes that many bytes each, so the memory traffic is twice this number. A decode only reads.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, megabytes: int = 512):
        self.device, self.dtype, self.numel = device, dtype, megabytes * 2 ** 20 // 4
        self.flops = self.bandwidth = 0.0
        self.n = 256
        while self.n < 4096 and self._matmul_seconds(self.n, repeat=1) < 0.02:
            self.n *= 2

    def _matmul_seconds(self, n: int, repeat: int) -> float:
        # allocated here and freed on return, so they are not in any workload's peak memory
        a, b = (torch.randn(n, n, device=self.device).to(self.dtype) for _ in range(2))
        return best_time(lambda: a @ b, self.device, repeat)

    def measure(self, repeat: int = 2) -> None:
        self.flops = max(self.flops, 2 * self.n ** 3 / self._matmul_seconds(self.n, repeat))
        src = torch.ones(self.numel, device=self.device)
        dst = torch.empty_like(src)
        self.bandwidth = max(self.bandwidth, self.numel * 4 / best_time(lambda: dst.copy_(src), self.device, repeat))


def bf16_slowdown_on_cpu() -> float:
    """How many times slower a bf16 matmul runs than a float32 one on this CPU (a 256^3 probe, milliseconds).

    CPUs without native bf16 (AVX2 only, no AVX512-BF16 or AMX) emulate it: ~400x slower at 4096^3, so a
    full-size bf16 benchmark there would run for hours. One thread and the best of several runs, so that another
    busy process on the machine cannot hide the difference.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        fp32 = best_time(lambda: a @ a, torch.device("cpu"), 10)
        b = a.bfloat16()
        return best_time(lambda: b @ b, torch.device("cpu"), 3) / fp32
    finally:
        torch.set_num_threads(threads)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


class PeakMemory:
    """Peak memory of one workload: max allocated on CUDA, peak resident set size (VmHWM) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # Linux: writing 5 resets the process's peak RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak: an upper bound


# -- workloads ---------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    run: Callable[[], object]  # the timed call
    flops: int
    tokens: int = 0  # decode: tokens per call
    bytes: int = 0  # decode: bytes that must be read per call


@dataclass
class Result:
    name: str
    seconds: float  # median
    min_s: float
    max_s: float
    flops: float
    peak_mem_gb: float  # GPU: max allocated; CPU: peak resident set size (both include the weights)
    tflops: float = 0.0  # achieved, in the fastest run
    peak_pct: float = 0.0  # of the matmul ceiling in the benchmark's dtype
    tokens_per_s: float | None = None
    gb_per_s: float | None = None
    bandwidth_pct: float | None = None  # of the copy bandwidth

    def rate(self, workload: "Workload", ceilings: Ceilings) -> None:
        self.tflops = self.flops / self.min_s / 1e12
        self.peak_pct = 100 * self.flops / self.min_s / ceilings.flops
        if workload.tokens:
            self.tokens_per_s = workload.tokens / self.min_s
            self.gb_per_s = workload.bytes / self.min_s / 1e9
            self.bandwidth_pct = 100 * workload.bytes / self.min_s / ceilings.bandwidth


def guidance_branches(decoder, gen: torch.Generator, dtype, device, text: tuple[int, ...],
                      cond_img: torch.Tensor | None, with_cond: tuple[bool, ...]) -> list[Condition]:
    """Refined conditions of random LLM states, one per guidance branch (done once per generation)."""
    branches = []
    for length, has_cond in zip(text, with_cond):
        txt = torch.randn(1, length, decoder.config.context_in_dim, generator=gen, device=device).to(dtype)
        tokens, cls = decoder.encode_text(txt)
        branches.append(Condition(tokens, cls, cond_img if has_cond else None))
    return branches


def make_workloads(model: OvisU1, args, device: torch.device) -> list[Workload]:
    config, dtype = model.config, model.dtype
    decoder, vae, llm = model.visual_generator.backbone, model.visual_generator.vae, model.llm
    mm = config.mmdit
    gen = torch.Generator(device).manual_seed(1)
    size, latent = args.size, args.size // 8
    N = grid_tokens(size)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)
    wanted = set(args.only.split(",")) if args.only else set(WORKLOADS)
    noise = rand(1, mm.in_channels // 4, latent, latent)
    step = [TIME, TIME - 0.02]
    workloads = []

    if "W1" in wanted:
        txt = rand(1, T2I_TEXT[0], mm.context_in_dim)
        img = flow.pack_latents(noise)
        img_ids = flow.latent_position_ids(size // 16, size // 16, device=device)
        txt_ids = torch.zeros(1, T2I_TEXT[0], 3, device=device)
        t = torch.full((1,), TIME, device=device, dtype=dtype)
        workloads.append(Workload(
            f"mmdit_forward_{size}", lambda: decoder(img, img_ids, txt, txt_ids, t),
            mmdit_flops(mm, T2I_TEXT[0], N) + refiner_flops(config.refiner, 1, T2I_TEXT[0])))

    if "W2" in wanted:
        t2i = guidance_branches(decoder, gen, dtype, device, T2I_TEXT, None, (False, False))
        combine = lambda v: flow.text_guidance(v[0], v[1], 5.0)
        workloads.append(Workload(
            f"t2i_step_{size}", partial(sample_latents, decoder, noise, step, t2i, combine),
            sum(mmdit_flops(mm, n, N) for n in T2I_TEXT)))

    if "W3" in wanted:
        cond_img = rand(1, N, mm.in_channels)
        edit = guidance_branches(decoder, gen, dtype, device, EDIT_TEXT, cond_img, (True, True, False))
        combine = lambda v: flow.edit_guidance(v[0], v[1], v[2], 1.5, 6.0)
        workloads.append(Workload(
            f"edit_step_{size}", partial(sample_latents, decoder, noise, step, edit, combine),
            sum(mmdit_flops(mm, n, N, N if c else 0) for n, c in zip(EDIT_TEXT, (True, True, False)))))

    if "W4" in wanted:
        embeds = rand(1, PROMPT_LEN, config.llm.hidden_size)
        workloads.append(Workload(f"llm_condition_{PROMPT_LEN}", lambda: llm.condition_states(embeds),
                                  llm_condition_flops(config.llm, PROMPT_LEN)))
        workloads.append(decode_workload(llm, embeds, args.decode_tokens, args.compile))

    if "W5" in wanted:
        grid = vit_grid(config)
        patches = torch.randn(math.prod(grid), config.vit.num_channels * config.vit.patch_size ** 2,
                              generator=gen, device=device)
        grid_thws = torch.tensor([grid])
        workloads.append(Workload(f"vit_{VIT_IMAGE}", lambda: model.visual_embeddings(patches, grid_thws),
                                  vit_flops(config, grid)))

    if "W6" in wanted:
        tokens = flow.pack_latents(noise)
        workloads.append(Workload(f"vae_decode_{size}", lambda: decode_image_tokens(vae, tokens, size, size),
                                  vae_decode_flops(config.vae, latent)))

    if args.e2e:
        workloads += e2e_workloads(model, gen, size, args.steps, device)
    return workloads


def decode_workload(llm, embeds: torch.Tensor, tokens: int, compiled: bool = False) -> Workload:
    """Greedy decoding of `tokens` tokens after the prompt `embeds`, the loop of `generate.generate` without its
    stopping logic. The prompt is prefilled once outside the timed call; each call decodes from the same slots.
    `compiled`: the step is `compile_decode_step`'s, as `Ovis.compile` makes it (CUDA graphs on a GPU)."""
    batch, prompt, _ = embeds.shape
    device = embeds.device
    llm.setup_cache(batch, cache_length(prompt + tokens))
    cache_len = llm.cache_len()
    slots = torch.arange(cache_len, device=device)
    key_mask = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
    key_mask[:, :prompt] = True
    first = llm.prefill(embeds, key_mask[:, :prompt], slots[None, :prompt]).argmax(-1)
    step = compile_decode_step(llm, device) if compiled else llm.decode_step

    def run():
        key_mask[:, prompt:] = False  # each call decodes the same slots afresh
        token, position = first, torch.full((batch, 1), prompt, device=device)
        for i in range(tokens):
            slot = prompt + i
            key_mask[:, slot] = True
            with matrix_vector_kernels(device):  # as generate.generate calls the step
                logits = step(token[:, None], position, slots[slot:slot + 1], key_mask[:, :attended_length(slot)])
            token = logits.argmax(-1)
            position = position + 1
        return token

    cfg = llm.cfg
    itemsize = embeds.element_size()
    return Workload("llm_decode", run, llm_decode_flops(cfg, prompt, tokens), tokens=tokens,
                    bytes=llm_decode_bytes(cfg, prompt, tokens, itemsize))


def e2e_workloads(model: OvisU1, gen: torch.Generator, size: int, steps: int, device: torch.device) -> list[Workload]:
    """Whole generations as the pipeline runs them after tokenisation: per guidance branch the visual encoder on
    its condition image and the LLM condition, then refining, `steps` guided steps and the VAE decode (and for
    editing the VAE encode of the input image)."""
    config, dtype = model.config, model.dtype
    decoder, vae, llm = model.visual_generator.backbone, model.visual_generator.vae, model.llm
    mm, latent, N = config.mmdit, size // 8, grid_tokens(size)
    grid = vit_grid(config)
    patches = torch.randn(math.prod(grid), config.vit.num_channels * config.vit.patch_size ** 2, generator=gen,
                          device=device)
    grid_thws = torch.tensor([grid])
    image_tokens = math.prod(grid) // config.vit.hidden_stride ** 2
    pixels = torch.rand(1, 3, size, size, generator=gen, device=device) * 2 - 1
    noise = torch.randn(1, mm.in_channels // 4, latent, latent, generator=gen, device=device).to(dtype)
    timesteps = flow.time_schedule(steps, N, shift=mm.timestep_shift)

    def condition(length: int) -> torch.Tensor:
        text = torch.randn(1, length - image_tokens, config.llm.hidden_size, generator=gen, device=device).to(dtype)
        image = model.visual_embeddings(patches, grid_thws)[0][None]
        last, second_last = llm.condition_states(torch.cat([image, text], dim=1))
        return torch.cat([last, second_last], dim=-1)

    def generate(text: tuple[int, ...], with_cond: tuple[bool, ...], combine) -> torch.Tensor:
        states = [condition(n) for n in text]
        cond_img = encode_image_tokens(vae, pixels, generator=torch.Generator(device).manual_seed(0)) \
            if any(with_cond) else None
        branches = [Condition(*decoder.encode_text(s), cond_img if c else None) for s, c in zip(states, with_cond)]
        tokens = sample_latents(decoder, noise, timesteps, branches, combine)
        return decode_image_tokens(vae, tokens, size, size)

    def flops(text: tuple[int, ...], with_cond: tuple[bool, ...]) -> int:
        total = vae_decode_flops(config.vae, latent) + (vae_encode_flops(config.vae, size) if any(with_cond) else 0)
        for n, c in zip(text, with_cond):
            total += vit_flops(config, grid) + llm_condition_flops(config.llm, n) + refiner_flops(config.refiner, 1, n)
            total += linear(1, mm.vec_in_dim, mm.hidden_size) + linear(1, mm.hidden_size, mm.hidden_size)
            total += steps * mmdit_flops(mm, n, N, N if c else 0, with_text_vector=False)
        return total

    t2i = ((False, False), lambda v: flow.text_guidance(v[0], v[1], 5.0))
    edit = ((True, True, False), lambda v: flow.edit_guidance(v[0], v[1], v[2], 1.5, 6.0))
    return [Workload(f"t2i_{size}_{steps}", partial(generate, T2I_TEXT, *t2i), flops(T2I_TEXT, t2i[0])),
            Workload(f"edit_{size}_{steps}", partial(generate, EDIT_TEXT, *edit), flops(EDIT_TEXT, edit[0]))]


# -- running -----------------------------------------------------------------------------------------------------

@torch.no_grad()
def measure(workload: Workload, device: torch.device, memory: PeakMemory, warmup: int = 1, repeat: int = 3) -> Result:
    memory.reset()
    for _ in range(warmup):
        workload.run()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        workload.run()
        sync(device)
        times.append(time.perf_counter() - start)
    return Result(workload.name, statistics.median(times), min(times), max(times), workload.flops,
                  memory.peak() / 1e9)


def format_table(results: list[Result]) -> str:
    header = (f"{'workload':<20}{'median s':>9}{'min s':>9}{'max s':>9}{'GFLOP':>9}{'TFLOP/s':>8}{'% peak':>7}"
              f"{'mem GB':>7}{'tok/s':>8}{'GB/s':>7}{'% copy':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        decode = (f"{r.tokens_per_s:>8.1f}{r.gb_per_s:>7.1f}{r.bandwidth_pct:>7.1f}" if r.tokens_per_s else "")
        lines.append(f"{r.name:<20}{r.seconds:>9.3f}{r.min_s:>9.3f}{r.max_s:>9.3f}{r.flops / 1e9:>9.1f}"
                     f"{r.tflops:>8.3f}{r.peak_pct:>7.1f}{r.peak_mem_gb:>7.2f}{decode}")
    return "\n".join(lines)


positive, non_negative = whole_number(1), whole_number(0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default bf16 on a GPU "
                        "and on a CPU with native bf16, fp32 on other CPUs)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--size", type=whole_number(32, MAX_SIZE), default=512, help="image side in pixels for W1-W3, W6 and --e2e "
                        "(default 512)")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(WORKLOADS))
    parser.add_argument("--e2e", action="store_true", help="also time whole T2I and editing generations")
    parser.add_argument("--steps", type=whole_number(1, 1000), default=50, help="denoising steps of the --e2e generations "
                        "(default 50)")
    parser.add_argument("--decode-tokens", type=whole_number(1, LLMConfig().max_position_embeddings - PROMPT_LEN),
                        default=32, help="tokens per llm_decode call "
                        "(default 32)")
    parser.add_argument("--warmup", type=non_negative, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--repeat", type=positive, default=3, help="timed calls per workload (default 3)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder block and the LLM decode step, as Ovis.compile does; "
                             "each workload's warm-up call pays its compilation")
    parser.add_argument("--threads", type=non_negative, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test config instead of the full model "
                        "(seconds on any CPU)")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    unknown = set(args.only.split(",")) - set(WORKLOADS) if args.only else set()
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    try:
        args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                                   else args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: bench.py runs on cpu or cuda")
    if args.json:
        folder = Path(args.json).expanduser().resolve().parent
        if Path(args.json).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: cannot write a file there; give a file name in a writable folder")
    if args.dtype is None:
        args.dtype = "bf16"
        if args.device.type == "cpu":
            slowdown = bf16_slowdown_on_cpu()
            if slowdown > 3:
                args.dtype = "fp32"
                print(f"note: this CPU has no native bf16 matmul (bf16 ran {slowdown:.0f}x slower than fp32), so "
                      "the benchmark runs in fp32", file=sys.stderr)
    elif args.dtype != "fp32" and args.device.type == "cpu" and not args.tiny:
        slowdown = bf16_slowdown_on_cpu() if args.dtype == "bf16" else 0
        if slowdown > 3:
            parser.error(f"--dtype bf16: this CPU has no native bf16 matmul (bf16 ran {slowdown:.0f}x slower than "
                         "fp32), so the full model would run for hours; use --dtype fp32 (or --tiny)")
    return args


def main(argv=None) -> dict:
    # Flush denormals to zero: softmax tails and random weights produce them, and x86 CPUs handle denormal
    # floats dozens of times slower (it made the CPU attention 2.5x slower here). It changes no result that
    # matters: denormals are below 1.2e-38. Set before the first parallel region, so every thread inherits it.
    torch.set_flush_denormal(True)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    ceilings = Ceilings(device, dtype)
    ceilings.measure(repeat=5)
    config = tiny_config() if args.tiny else OvisConfig()
    start = time.perf_counter()
    model = random_model(config, dtype, device)
    build_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.compile:
        compile_decoder_blocks(model.visual_generator.backbone)
    print(f"{describe_device(device)} | torch {torch.__version__} | {args.dtype} | weights {weight_bytes / 1e9:.2f} GB "
          f"(built in {build_s:.1f} s)", flush=True)
    memory = PeakMemory(device)
    runs = []
    for workload in make_workloads(model, args, device):
        runs.append((workload, measure(workload, device, memory, args.warmup, args.repeat)))
        ceilings.measure()
        print(f"  {workload.name}: median {runs[-1][1].seconds:.3f} s, min {runs[-1][1].min_s:.3f} s", flush=True)
    results = []
    for workload, result in runs:
        result.rate(workload, ceilings)
        results.append(result)
    machine = {"device": describe_device(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch": torch.__version__, "dtype": args.dtype, "matmul_n": ceilings.n,
               "matmul_tflops": ceilings.flops / 1e12, "copy_gb_per_s": ceilings.bandwidth / 1e9,
               "weights_gb": weight_bytes / 1e9, "size": args.size, "config": "tiny" if args.tiny else "full",
               "compile": args.compile}
    print(f"ceilings: {args.dtype} matmul {ceilings.flops / 1e12:.3f} TFLOP/s ({ceilings.n}^3), copy "
          f"{ceilings.bandwidth / 1e9:.1f} GB/s; rates from the fastest run")
    print(format_table(results))
    report = {"machine": machine, "workloads": [asdict(r) for r in results]}
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2))
    return report


def run_cli() -> None:
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("bench.py: interrupted")
    except torch.OutOfMemoryError:
        sys.exit("bench.py: error: out of memory; try a smaller --size, --only a subset, or --tiny")
    except OSError as error:  # writing --json
        sys.exit(f"bench.py: error: cannot write {error.filename or 'the results'} ({error.strerror or error})")


if __name__ == "__main__":
    run_cli()
