"""The training losses: next-token cross-entropy for understanding, flow matching for text-to-image and editing.

Flow matching on the VAE latents: x_t = t*noise + (1-t)*x0, target velocity noise - x0 (the official sampler
integrates dx/dt = v from t=1 to 0), t logit-normal, shifted like the sampler's schedule when config.json enables
timestep_shift (flow.py).

Each function returns a sum over its batch (or a loss per sample); how those are weighted over an optimizer step's
global batch, across micro-batches and processes, is accumulation.py's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import flow
from .accumulation import LossScale, Tally
from .data import Batch
from ..model import IGNORE_ID, OvisU1, encode_image_tokens, posterior_tokens


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
