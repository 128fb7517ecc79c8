"""The training losses: next-token cross-entropy for understanding, flow matching for text-to-image and editing.

Flow matching on the VAE latents: x_t = t*noise + (1-t)*x0, target velocity noise - x0 (the official sampler
integrates dx/dt = v from t=1 to 0), t logit-normal, shifted like the sampler's schedule when config.json enables
timestep_shift (flow.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import flow
from .data import Batch
from .model import IGNORE_ID, OvisU1, encode_image_tokens


def idle_image_term(model: OvisU1) -> torch.Tensor:
    """0 x the visual embeddings of a blank 2x2-patch image: a zero that depends on every encoder/adapter weight."""
    vit, stride = model.config.vit, model.config.adapter.hidden_stride
    width = vit.num_channels * vit.temporal_patch_size * vit.patch_size ** 2
    pixels = torch.zeros(stride * stride, width, device=model.device)
    grid = torch.tensor([[1, stride, stride]], device=model.device)
    embeds = model.visual_embeddings(pixels, grid)[0]
    return 0.0 * (embeds.sum() + model.vte.indicator_embeds().sum())


def understanding_loss(model: OvisU1, batch: Batch, idle_image: bool = False) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the supervised (assistant) tokens; (loss, LLM tokens).

    idle_image: for a batch without images, run the encoder and adapter anyway, on a blank image whose embeddings
    enter the LLM input times zero. Every rank then uses the same weights in the same order whatever its batch
    holds: DDP requires it, and FSDP would otherwise mismatch its all-gathers across ranks and hang.
    """
    zero = idle_image_term(model) if idle_image and batch.pixel_values is None else 0.0
    merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                batch.labels, left_padding=False)
    hidden = model.llm.hidden_states(inputs_embeds=merged.embeds + zero, attention_mask=merged.attention_mask)[-1]
    targets = merged.labels[:, 1:]  # position i predicts token i+1
    supervised = targets != IGNORE_ID
    # The (B, L, 152K) logits of every position would dwarf the rest of the step: project only what is learned.
    logits = model.llm.lm_head(hidden[:, :-1][supervised])  # (T, V)
    loss = F.cross_entropy(logits.float(), targets[supervised])
    return loss, int(merged.attention_mask.sum())


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, *shape) float32 normals, row i from generators[i]: a sample's noise depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def generation_loss(model: OvisU1, batch: Batch, condition_grad: bool) -> tuple[torch.Tensor, int]:
    """Flow matching on the target's VAE latent tokens; (loss, LLM + decoder tokens)."""
    vae, decoder, mm = model.visual_generator.vae, model.visual_generator.backbone, model.config.mmdit
    device = batch.target.device
    size = batch.target.shape[-1]
    channels, latent, rows = model.config.vae.latent_channels, size // 8, size // 16  # 8x VAE, then 2x2 packing
    # Each sample draws, in this order and whatever its batch holds: the VAE posterior noise of the target and of
    # the source, the flow noise, the time. So a sample's randomness depends on its seed alone.
    generators = [torch.Generator().manual_seed(int(seed)) for seed in batch.seeds]
    target_eps = per_sample_noise((channels, latent, latent), generators).to(device)
    source_eps = per_sample_noise((channels, latent, latent), generators).to(device)
    with torch.no_grad():  # the VAE is frozen
        x0 = encode_image_tokens(vae, batch.target, noise=target_eps).float()  # (B, N, 16)
        cond_img = None if batch.source is None else encode_image_tokens(vae, batch.source, noise=source_eps)
    # Only stages that train the adapter/encoder/LLM need gradients through the condition.
    with torch.set_grad_enabled(condition_grad and torch.is_grad_enabled()):
        txt, txt_mask = model.generation_condition(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                                   batch.grid_thws, left_padding=False)
    txt_tokens, cls = decoder.encode_text(txt, txt_mask)

    noise = per_sample_noise(tuple(x0.shape[1:]), generators).to(device)
    t = torch.cat([flow.sample_timesteps(1, generator=g, image_seq_len=rows * rows if mm.timestep_shift else None,
                                         base_shift=mm.base_shift, max_shift=mm.max_shift) for g in generators])
    t = t.to(device)
    x_t = flow.noisy_latents(x0, noise, t)

    batch_size, num_txt, num_img = len(batch), txt.shape[1], x0.shape[1]
    key_mask = [txt_mask, torch.ones(batch_size, num_img, dtype=torch.bool, device=device)]
    if cond_img is not None:  # rows without a source image carry zeros there, hidden by the key mask
        key_mask.append(batch.has_source[:, None].expand(batch_size, num_img))
    rope = decoder.rope(flow.sequence_position_ids(num_txt, rows, rows, edit_image=cond_img is not None,
                                                   device=device), x_t.dtype)
    velocity = decoder.predict_velocity(x_t, txt_tokens, decoder.text_vector(cls), rope, t, cond_img=cond_img,
                                        key_mask=torch.cat(key_mask, dim=1))
    tokens = int(txt_mask.sum()) + batch_size * num_img + (int(batch.has_source.sum()) * num_img
                                                           if cond_img is not None else 0)
    return flow.flow_matching_loss(velocity, x0, noise), tokens


class TrainStep(nn.Module):
    """One micro-batch -> (loss, tokens). A module around the model so that DDP/FSDP see the whole step."""

    def __init__(self, model: OvisU1):
        super().__init__()
        self.model = model
        # Whether the encoder, adapter or LLM train (in every stage that trains the LLM, the adapter trains too).
        self.upstream_trains = any(p.requires_grad for name, p in model.named_parameters()
                                   if not name.startswith("visual_generator."))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int]:
        if batch.task == "understanding":
            return understanding_loss(self.model, batch, idle_image=self.upstream_trains)
        return generation_loss(self.model, batch, condition_grad=self.upstream_trains)
