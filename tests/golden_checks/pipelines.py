"""Golden checks of text-to-image and editing end to end, from the prompt text and the input image.

The case stores the official token ids and pixels of every guidance branch as inputs; ovis-min builds its own
from the prompt and image (so preprocessing is checked too) and they must be identical.
"""
import torch
from PIL import Image

from golden_case import FLOAT_ATOL, FLOAT_RTOL
from golden_checks.common import load_model
from ovis_min import flow
from ovis_min.model import decode_image_tokens
from ovis_min.pipeline import Ovis, denoise_one_image, sample_latents
from ovis_min.preprocess import blank_image, condition_images, edit_target_size, resize_for_edit
from ovis_min.prompt import UNCONDITIONAL_PROMPT, Tokenizer, preprocess_inputs
from ovis_min.vae import to_uint8


def pipeline_for(case) -> Ovis:
    model = load_model(case)
    model.config.mmdit.timestep_shift = case.meta.get("timestep_shift", model.config.mmdit.timestep_shift)
    return Ovis(model, Tokenizer(case.tokenizer_dir))


def same_inputs_as_official(case, ovis: Ovis, branch: str, prompt: str, image: Image.Image, height, width):
    """Our ids and pixels of one guidance branch equal the official ones stored as inputs."""
    encoder_image, vae_pixels = condition_images(image, height, width, ovis.config.preprocess)
    ids, _, pixels, grids = preprocess_inputs(ovis.tokenizer, prompt, [encoder_image], ovis.config.preprocess,
                                              generation_preface=None)
    assert torch.equal(ids[None], case.input(f"{branch}.input_ids")), f"{branch}: token ids differ"
    assert torch.equal(grids, case.input(f"{branch}.grid_thws")), f"{branch}: grid differs"
    assert torch.allclose(pixels, case.input(f"{branch}.pixel_values"), atol=1e-5), f"{branch}: pixels differ"
    if f"in.{branch}.vae_pixel_values" in case.tensors:
        assert torch.allclose(vae_pixels[None], case.input(f"{branch}.vae_pixel_values"), atol=1e-5)


def finish(case, ovis: Ovis, branches, combine, height, width, img_cfg=None):
    meta = case.meta
    noise = ovis.initial_noise(1, height, width, meta["seed"]).float()
    case.expect("noise", noise)
    timesteps = ovis.schedule(meta["num_steps"], height, width)
    assert torch.allclose(torch.tensor(timesteps), torch.tensor(meta["timesteps"]), atol=1e-7, rtol=0)
    decoder = ovis.model.visual_generator.backbone
    final = sample_latents(decoder, noise, timesteps, branches, combine)
    case.expect("final_latent_tokens", final)
    # The plain loop (one decoder call per branch and step) is the spec of the batched one: both match the
    # official latents, and each other within the same tolerance.
    plain = denoise_one_image(decoder, noise, timesteps, branches, meta["txt_cfg"], img_cfg)
    case.expect("final_latent_tokens", plain)
    torch.testing.assert_close(final, plain, atol=FLOAT_ATOL, rtol=FLOAT_RTOL)
    vae = ovis.model.visual_generator.vae
    if "out.vae_decode_in" in case.tensors:  # exported sets: the VAE decoder's input
        case.expect("vae_decode_in", vae.from_latent_space(flow.unpack_latents(final, height, width)))
    decoded = decode_image_tokens(vae, final, height, width)
    case.expect("decoded", decoded)
    case.expect("image_uint8_hwc", to_uint8(decoded)[0])


def check_e2e_t2i(case):
    meta = case.meta
    ovis = pipeline_for(case)
    height, width = meta["height"], meta["width"]
    blank = blank_image(width, height)
    with torch.no_grad():
        same_inputs_as_official(case, ovis, "uncond", meta["uncond_prompt"], blank, height, width)
        same_inputs_as_official(case, ovis, "cond", meta["prompt"], blank, height, width)
        cond_txt, _ = ovis.condition(meta["prompt"], blank, height, width)
        uncond_txt, _ = ovis.condition(meta["uncond_prompt"], blank, height, width)
        case.expect("cond_txt", cond_txt)
        case.expect("no_both_cond_txt", uncond_txt)
        branches = [ovis.refine(cond_txt), ovis.refine(uncond_txt)]
        finish(case, ovis, branches, lambda v: flow.text_guidance(v[0], v[1], meta["txt_cfg"]), height, width)


def check_e2e_edit(case):
    meta = case.meta
    ovis = pipeline_for(case)
    source = Image.open(case.dir / meta["input_image"])
    width, height = edit_target_size(source.width, source.height)
    assert (height, width) == (meta["height"], meta["width"]), "edit target size differs from the official one"
    image = resize_for_edit(source)
    blank = blank_image(width, height)
    assert meta["uncond_prompt"] == UNCONDITIONAL_PROMPT
    with torch.no_grad():
        same_inputs_as_official(case, ovis, "no_both", meta["uncond_prompt"], blank, height, width)
        same_inputs_as_official(case, ovis, "no_txt", meta["uncond_prompt"], image, height, width)
        same_inputs_as_official(case, ovis, "cond", meta["prompt"], image, height, width)
        cond_txt, vae_pixels = ovis.condition(meta["prompt"], image, height, width)
        no_txt_txt, _ = ovis.condition(meta["uncond_prompt"], image, height, width)
        no_both_txt, _ = ovis.condition(meta["uncond_prompt"], blank, height, width)
        case.expect("cond_txt", cond_txt)
        case.expect("no_txt_cond_txt", no_txt_txt)
        case.expect("no_both_cond_txt", no_both_txt)
        # The official VAE sample of the input image comes from torch's global RNG: inject the stored one.
        image_tokens = case.input("vae_cond_tokens(sampled)")
        rows, cols = height // 16, width // 16
        case.expect("vae_cond_ids", flow.latent_position_ids(rows, cols, time_index=1))
        branches = [ovis.refine(cond_txt, image_tokens), ovis.refine(no_txt_txt, image_tokens),
                    ovis.refine(no_both_txt)]
        combine = lambda v: flow.edit_guidance(v[0], v[1], v[2], meta["img_cfg"], meta["txt_cfg"])
        finish(case, ovis, branches, combine, height, width, img_cfg=meta["img_cfg"])
