"""Golden checks of the generation side: the VAE (`vae` case) and the sampler (`sampler_*` cases)."""
import torch

from ovis_min.flow import (edit_guidance, latent_position_ids, pack_latents, text_guidance, time_schedule,
                           unpack_latents)
from ovis_min.golden import sample_with_steps
from ovis_min.mmdit import MMDiT
from ovis_min.model import decode_image_tokens
from ovis_min.pipeline import Condition, denoise_one_image, sample_latents
from ovis_min.vae import AutoencoderKL, to_uint8


# -- vae -------------------------------------------------------------------------------------------
def check_vae(case):
    """Encode -> posterior, scaled+packed sample and mean tokens, cond ids, decode of the mean, uint8 image."""
    config = case.config().vae
    vae = AutoencoderKL(config).eval()
    vae.load_state_dict(case.state_dict(case.meta["weight_keys_prefix"]), strict=True)
    pixels = case.input("pixel_values")
    height, width = pixels.shape[-2:]

    with torch.no_grad():
        mean, logvar = vae.encode(pixels)
        case.expect("posterior_mean", mean)
        case.expect("posterior_logvar", logvar)

        # The official sample uses torch's global RNG; the case stores the eps it drew, so inject it.
        sample = vae.sample_latent(mean, logvar, noise=case.input("eps"))
        case.expect("sample_tokens", pack_latents(vae.to_latent_space(sample)))
        rows, cols = mean.shape[-2] // 2, mean.shape[-1] // 2
        case.expect("cond_ids", latent_position_ids(rows, cols, time_index=1, batch=mean.shape[0]))

        mean_tokens = pack_latents(vae.to_latent_space(mean))
        case.expect("mean_tokens", mean_tokens)
        decoded = vae.decode(vae.from_latent_space(unpack_latents(mean_tokens, height, width)))
        case.expect("decoded", decoded)
        case.expect("decoded_uint8_hwc", to_uint8(decoded))


# -- sampler ---------------------------------------------------------------------------------------
def check_sampler(case):
    """The official `generate_image` from given conditions: noise -> Euler with guidance -> VAE decode."""
    config = case.config()
    meta = case.meta
    mm = config.mmdit
    decoder = MMDiT(mm, config.refiner).eval()
    decoder.load_state_dict(case.state_dict("visual_generator.backbone."), strict=True)
    vae = AutoencoderKL(config.vae).eval()
    vae.load_state_dict(case.state_dict("visual_generator.vae."), strict=True)
    height, width = meta["height"], meta["width"]

    noise = case.input("noise")
    img_tokens = pack_latents(noise)
    case.expect("img_tokens_init", img_tokens)
    rows, cols = noise.shape[-2] // 2, noise.shape[-1] // 2
    case.expect("img_ids", latent_position_ids(rows, cols, batch=noise.shape[0]))
    timesteps = time_schedule(meta["num_steps"], img_tokens.shape[1], shift=meta["timestep_shift"],
                              base_shift=meta.get("base_shift", mm.base_shift),
                              max_shift=meta.get("max_shift", mm.max_shift))
    assert torch.allclose(torch.tensor(timesteps), torch.tensor(meta["timesteps"]), atol=1e-7, rtol=0)

    def branch(name, cond_img=None):
        tokens, cls = decoder.encode_text(case.input(name))
        return Condition(tokens, cls, cond_img)

    with torch.no_grad():
        if meta["variant"] == "edit":
            image_tokens = case.input("vae_cond_tokens")  # drawn by the official code from torch's global RNG
            branches = [branch("cond_txt", image_tokens), branch("no_txt_txt", image_tokens), branch("no_both_txt")]
            combine = lambda v: edit_guidance(v[0], v[1], v[2], meta["img_cfg"], meta["txt_cfg"])
            img_cfg = meta["img_cfg"]
        else:
            branches = [branch("cond_txt"), branch("no_both_txt")]
            combine = lambda v: text_guidance(v[0], v[1], meta["txt_cfg"])
            img_cfg = None
        if "out.step0.velocity" in case.tensors:  # exported sets: the latent entering each step, its velocity
            final, steps = sample_with_steps(decoder, noise, timesteps, branches, combine)
            for i, (x, v) in enumerate(steps):
                case.expect(f"step{i}.latent_in", x)
                case.expect(f"step{i}.velocity", v)
        else:
            final = sample_latents(decoder, noise, timesteps, branches, combine)
        case.expect("final_latent_tokens", final)
        # the plain loop, the spec of the batched one, gives the official latents too
        case.expect("final_latent_tokens", denoise_one_image(decoder, noise, timesteps, branches, meta["txt_cfg"],
                                                             img_cfg))
        case.expect("vae_decode_in", vae.from_latent_space(unpack_latents(final, height, width)))
        decoded = decode_image_tokens(vae, final, height, width)
        case.expect("decoded", decoded)
        case.expect("image_uint8_hwc", to_uint8(decoded))
