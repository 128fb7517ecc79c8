"""The training losses: next-token cross-entropy for understanding, flow matching for text-to-image and editing.

Flow matching on the VAE latents: x_t = t*noise + (1-t)*x0, target velocity noise - x0 (the official sampler
integrates dx/dt = v from t=1 to 0), t logit-normal, shifted like the sampler's schedule when config.json enables
timestep_shift (flow.py).

Weighting over an optimizer step (all micro-batches of all ranks, the "window"): the cross-entropy is summed over
the supervised tokens and divided by the window's supervised tokens, so a short answer weighs as much per token as
a long one wherever it lands (a mean per micro-batch would overweight short answers); flow matching is a mean per
sample. Each task counts by its share of the window's samples:

    loss = (understanding samples / samples) * CE sum / supervised tokens + flow-matching sum / samples

so the same global batch gives the same gradient however it is split into micro-batches and processes.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import flow
from .data import TASKS, Batch, MicroBatch
from .distributed import Runtime, all_reduce_max, all_reduce_sum, gradient_sync
from ..model import IGNORE_ID, OvisU1, encode_image_tokens, posterior_tokens
from .throughput import Throughput


def idle_image_term(model: OvisU1) -> torch.Tensor:
    """0 x the visual embeddings of a blank 2x2-patch image: a zero that depends on every encoder/adapter weight."""
    vit, stride = model.config.vit, model.config.adapter.hidden_stride
    width = vit.num_channels * vit.temporal_patch_size * vit.patch_size ** 2
    pixels = torch.zeros(stride * stride, width, device=model.device)
    grid = torch.tensor([[1, stride, stride]])  # on the host, as a batch's grids are (Batch.to)
    embeds = model.visual_embeddings(pixels, grid)[0]
    return 0.0 * (embeds.sum() + model.vte.indicator_embeds().sum())


def llm_tokens(model: OvisU1, batch: Batch) -> int:
    """Real positions the LLM runs on: the text tokens, each image placeholder replaced by its image's tokens.
    From the batch's layout tensors, which stay on the host (Batch.to): counting costs no wait for the device."""
    images = 0
    if batch.grid_thws is not None:  # each image: its tokens in place of its one placeholder
        images = int(batch.grid_thws.prod(-1).sum()) // model.config.adapter.hidden_stride ** 2 - len(batch.grid_thws)
    return int(batch.attention_mask.sum()) + images


def understanding_loss(model: OvisU1, batch: Batch, idle_image: bool = False) -> tuple[torch.Tensor, int, int]:
    """Next-token cross-entropy summed over the supervised (assistant) tokens; (loss sum, LLM tokens, LLM positions
    with the padding).

    idle_image: for a batch without images, run the encoder and adapter anyway, on a blank image whose embeddings
    enter the LLM input times zero. Every rank then uses the same weights in the same order whatever its batch
    holds: DDP requires it, and FSDP would otherwise mismatch its all-gathers across ranks and hang.
    """
    zero = idle_image_term(model) if idle_image and batch.pixel_values is None else 0.0
    merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                batch.labels, left_padding=False)
    hidden = model.llm.hidden_states(inputs_embeds=merged.embeds + zero, attention_mask=merged.attention_mask)[-1]
    targets = merged.labels[:, 1:]  # position i predicts token i+1; on the host
    supervised = targets != IGNORE_ID
    # The (B, L, 152K) logits of every position would dwarf the rest of the step: project only what is learned,
    # at positions found on the host (a boolean index on the device would wait for it to count them).
    rows, cols = (index.to(hidden.device, non_blocking=True) for index in supervised.nonzero(as_tuple=True))
    logits = model.llm.lm_head(hidden[rows, cols])  # (T, V)
    loss_sum = F.cross_entropy(logits.float(), targets[supervised].to(hidden.device, non_blocking=True),
                               reduction="sum")
    return loss_sum, llm_tokens(model, batch), merged.attention_mask.numel()


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, *shape) float32 normals, row i from generators[i]: a sample's noise depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def generation_loss(model: OvisU1, batch: Batch, condition_grad: bool) -> tuple[torch.Tensor, int]:
    """Flow matching on the target's VAE latent tokens; ((B,) loss of each sample, LLM + decoder tokens).

    A batch from a cache (train.py cache) brings the VAE posteriors and the LLM condition: neither runs."""
    vae, decoder, mm = model.visual_generator.vae, model.visual_generator.backbone, model.config.mmdit
    cached = batch.target_mean is not None
    device = batch.target_mean.device if cached else batch.target.device
    # one aspect-ratio bucket
    height, width = [8 * n for n in batch.target_mean.shape[-2:]] if cached else batch.target.shape[-2:]
    channels, rows, cols = model.config.vae.latent_channels, height // 16, width // 16  # 8x VAE, then 2x2 packing
    # Each sample draws, in this order and whatever its batch holds: the VAE posterior noise of the target and of
    # the source, the flow noise, the time. So a sample's randomness depends on its seed alone.
    generators = [torch.Generator().manual_seed(int(seed)) for seed in batch.seeds]
    target_eps = per_sample_noise((channels, height // 8, width // 8), generators).to(device)
    source_eps = per_sample_noise((channels, height // 8, width // 8), generators).to(device)
    with torch.no_grad():  # the VAE is frozen
        if cached:
            x0 = posterior_tokens(vae, batch.target_mean, batch.target_logvar, noise=target_eps).float()
            cond_img = None if batch.source_mean is None else posterior_tokens(vae, batch.source_mean,
                                                                               batch.source_logvar, noise=source_eps)
        else:
            x0 = encode_image_tokens(vae, batch.target, noise=target_eps).float()  # (B, N, 16)
            cond_img = None if batch.source is None else encode_image_tokens(vae, batch.source, noise=source_eps)
    if cached:
        txt, txt_mask = batch.condition, batch.condition_mask.to(device, non_blocking=True)
    else:  # only stages that train the adapter/encoder/LLM need gradients through the condition
        with torch.set_grad_enabled(condition_grad and torch.is_grad_enabled()):
            txt, txt_mask = model.generation_condition(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                                       batch.grid_thws, left_padding=False)
    txt_tokens, cls = decoder.encode_text(txt, txt_mask)

    noise = per_sample_noise(tuple(x0.shape[1:]), generators).to(device)
    # the shift follows the bucket's token count, as the sampler's schedule does for its size
    t = torch.cat([flow.sample_timesteps(1, generator=g, image_seq_len=rows * cols if mm.timestep_shift else None,
                                         base_shift=mm.base_shift, max_shift=mm.max_shift) for g in generators])
    t = t.to(device)
    x_t = flow.noisy_latents(x0, noise, t)

    batch_size, num_txt, num_img = len(batch), txt.shape[1], x0.shape[1]
    key_mask = [txt_mask, torch.ones(batch_size, num_img, dtype=torch.bool, device=device)]
    if cond_img is not None:  # rows without a source image carry zeros there, hidden by the key mask
        key_mask.append(batch.has_source.to(device, non_blocking=True)[:, None].expand(batch_size, num_img))
    rope = decoder.rope(flow.sequence_position_ids(num_txt, rows, cols, edit_image=cond_img is not None,
                                                   device=device))
    velocity = decoder.predict_velocity(x_t, txt_tokens, decoder.text_vector(cls), rope, t, cond_img=cond_img,
                                        key_mask=torch.cat(key_mask, dim=1))
    # counted on the host (the condition mask and has_source stay there): no wait for the device
    condition_tokens = int(batch.condition_mask.sum()) if cached else llm_tokens(model, batch)
    tokens = condition_tokens + batch_size * num_img + (int(batch.has_source.sum()) * num_img
                                                        if cond_img is not None else 0)
    return flow.flow_matching_loss(velocity, x0, noise), tokens


@dataclass
class LossScale:
    """What one sample's loss is multiplied by in a window: see the module's docstring."""
    per_token: float  # of the summed cross-entropy
    per_sample: float  # of a sample's flow-matching loss


@dataclass
class Tally:
    """What a micro-batch (or a window of them) adds up to on one rank."""
    sums: dict[str, torch.Tensor]  # task -> loss sum (detached)
    tokens: int = 0  # LLM + decoder tokens
    understanding_tokens: int = 0  # LLM tokens of understanding batches, and their positions with the padding
    understanding_positions: int = 0

    def add(self, other: "Tally") -> None:
        for task, value in other.sums.items():
            self.sums[task] = self.sums[task] + value.float() if task in self.sums else value.float()
        self.tokens += other.tokens
        self.understanding_tokens += other.understanding_tokens
        self.understanding_positions += other.understanding_positions


class TrainStep(nn.Module):
    """One forward pass: a Batch (one task, one image shape) -> (weighted loss, Tally). A module around the model
    so that DDP/FSDP see the whole pass, whichever task and bucket it holds."""

    def __init__(self, model: OvisU1):
        super().__init__()
        self.model = model
        # Whether the encoder, adapter or LLM train (in every stage that trains the LLM, the adapter trains too).
        self.upstream_trains = any(p.requires_grad for name, p in model.named_parameters()
                                   if not name.startswith("visual_generator."))

    def forward(self, batch: Batch, scale: LossScale) -> tuple[torch.Tensor, Tally]:
        if batch.task == "understanding":
            task_sum, tokens, positions = understanding_loss(self.model, batch, idle_image=self.upstream_trains)
            tally = Tally({batch.task: task_sum.detach()}, tokens, tokens, positions)
            return scale.per_token * task_sum, tally
        per_sample, tokens = generation_loss(self.model, batch, condition_grad=self.upstream_trains)
        task_sum = per_sample.sum()
        return scale.per_sample * task_sum, Tally({batch.task: task_sum.detach()}, tokens)


@dataclass
class WindowTotals:
    """One optimizer step's numbers on one rank: the Tally, counts per task (supervised tokens for understanding,
    samples for generation), understanding samples and samples."""
    tally: Tally
    counts: dict[str, int]
    understanding_samples: int
    samples: int

    def values(self) -> list[float]:
        """What the ranks add up, in the order `summary` reads."""
        tally = self.tally
        return [*(float(tally.sums[t]) if t in tally.sums else 0.0 for t in TASKS), *(self.counts[t] for t in TASKS),
                self.understanding_samples, self.samples, tally.tokens, tally.understanding_tokens,
                tally.understanding_positions]


def summary(totals: list[float]) -> tuple[float, dict[str, float], float, float | None]:
    """The all-reduced WindowTotals.values() -> (the step's loss, loss per task, tokens, padding fraction of the
    understanding batches or None)."""
    n = len(TASKS)
    sums, counts = dict(zip(TASKS, totals[:n])), dict(zip(TASKS, totals[n:2 * n]))
    understanding_samples, samples, tokens, understanding_tokens, positions = totals[2 * n:2 * n + 5]
    task_loss = {t: sums[t] / counts[t] for t in TASKS if counts[t]}
    loss = sum(sums[t] for t in TASKS if t != "understanding") / samples
    if counts["understanding"]:
        loss += understanding_samples / samples * task_loss["understanding"]
    return loss, task_loss, tokens, (1 - understanding_tokens / positions) if positions else None


def pass_kind(task: str) -> str:
    """What a forward pass of `task` runs: understanding runs the encoder and the LLM; both generation tasks run
    the same modules (encoder and LLM for the condition, unless cached, then refiner and decoder), in the same
    order, whatever their bucket."""
    return "understanding" if task == "understanding" else "generation"


PASS_KINDS = ("understanding", "generation")


def pass_schedule(micro_batches: list[MicroBatch], runtime: Runtime) -> list[dict[str, int]]:
    """Per micro-batch, the passes of each kind that every rank makes: the most any rank has (a micro-batch holds
    a pass per task and bucket, so ranks differ). Collective."""
    counts = [[sum(pass_kind(part.task) == kind for part in micro.parts) for kind in PASS_KINDS]
              for micro in micro_batches]
    most = all_reduce_max([n for row in counts for n in row], runtime)
    return [dict(zip(PASS_KINDS, most[i * len(PASS_KINDS):(i + 1) * len(PASS_KINDS)])) for i in range(len(counts))]


def backward_window(module: nn.Module, micro_batches: list[MicroBatch], runtime: Runtime, autocast,
                    throughput: Throughput, placeholder=None) -> WindowTotals:
    """Forward and backward every micro-batch of one optimizer step on this rank, one pass per task and bucket,
    weighted as the module's docstring says; `throughput` counts their FLOPs. The micro-batches stay where the
    loader left them (host memory, pinned on GPU): each part goes to the device just before its pass, so only one
    is there at a time. Collective.

    Under FSDP every rank must make the same sequence of passes, since each pass gathers the weights of the blocks
    it runs (and reduce-scatters their gradients) together with the other ranks; but a rank's micro-batch holds one
    pass per task and bucket its samples happen to fall in. So every rank makes, per micro-batch and kind of pass
    (`pass_kind`), as many passes as the rank with the most, filling its own with zero-weight passes on
    `placeholder(kind)`, a one-sample Batch. Zero-weight passes were chosen over drawing micro-batches within one
    task and bucket because the global batch, and so the gradient, then stays the same for any number of processes
    and any --micro-batch; they cost one small pass each, only where ranks differ. `placeholder` None: no padding
    (one process, or DDP, which reduces once per step and needs only that every pass uses every trained weight).
    """
    counts = dict.fromkeys(TASKS, 0)
    for micro in micro_batches:
        for batch in micro.parts:
            counts[batch.task] += batch.supervised_tokens if batch.task == "understanding" else len(batch)
    understanding_samples = sum(len(b) for m in micro_batches for b in m.parts if b.task == "understanding")
    samples = sum(len(m) for m in micro_batches)
    tokens_all, understanding_all, samples_all = all_reduce_sum(
        [counts["understanding"], understanding_samples, samples], runtime)
    # DDP and FSDP average gradients over ranks: each rank's share is scaled up by the world size to undo it.
    scale = LossScale(per_token=runtime.world * understanding_all / samples_all / max(tokens_all, 1),
                      per_sample=runtime.world / samples_all)
    schedule = pass_schedule(micro_batches, runtime) if placeholder is not None else None
    passes = []  # (batch, weighted or not)
    for i, micro in enumerate(micro_batches):
        for kind in PASS_KINDS:
            own = [(part, True) for part in micro.parts if pass_kind(part.task) == kind]
            passes += own
            if schedule is not None and schedule[i][kind] > len(own):
                passes += [(placeholder(kind), False)] * (schedule[i][kind] - len(own))
    tally = Tally({})
    for n, (batch, weighted) in enumerate(passes):
        batch = batch.to(runtime.device, non_blocking=True)
        with gradient_sync(module, n == len(passes) - 1):
            with autocast, throughput.counting(batch.task) if weighted else contextlib.nullcontext():
                loss, pass_tally = module(batch, scale if weighted else LossScale(per_token=0.0, per_sample=0.0))
            loss.backward()
        if weighted:
            throughput.micro_batch(batch.task, pass_tally.tokens)
            tally.add(pass_tally)
    return WindowTotals(tally, counts, understanding_samples, samples)
