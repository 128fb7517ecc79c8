"""The VAE beyond the golden case: full-size layout, channels_last, dtypes, sampling and uint8 conversion."""
import json
import math

import pytest
import torch

from golden_case import GOLDEN_DIR, GoldenCase
from ovis_min import flow
from ovis_min.config import VAEConfig
from ovis_min.model import decode_image_tokens, encode_image_tokens
from ovis_min.vae import AutoencoderKL, to_uint8

MANIFEST = GOLDEN_DIR / "full_manifest.json"
PREFIX = "visual_generator.vae."
TINY = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY).eval()
    with torch.no_grad():  # default init leaves biases small; randomise everything so every path matters
        for p in vae.parameters():
            p.normal_(0, 0.2)
    return vae


@pytest.mark.skipif(not MANIFEST.is_file(), reason="no full_manifest.json in the golden directory")
def test_full_size_layout_matches_official():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    manifest = json.loads(MANIFEST.read_text())
    want = [(e["key"][len(PREFIX):], tuple(e["shape"])) for e in manifest["keys"] if e["key"].startswith(PREFIX)]
    got = [(k, tuple(v.shape)) for k, v in vae.state_dict().items()]
    assert got == want
    params = sum(p.numel() for p in vae.parameters())
    assert params == sum(math.prod(shape) for _, shape in want)
    assert round(params / 1e6, 2) == 83.65


def test_channels_last_matches_contiguous():
    vae = tiny_vae()
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        mean, logvar = vae.encode(pixels)
        decoded = vae.decode(latents)
        vae_cl = vae.to(memory_format=torch.channels_last)
        mean_cl, logvar_cl = vae_cl.encode(pixels.contiguous(memory_format=torch.channels_last))
        decoded_cl = vae_cl.decode(latents.contiguous(memory_format=torch.channels_last))
    assert decoded_cl.is_contiguous(memory_format=torch.channels_last)
    scale = decoded.abs().max().item()
    assert torch.allclose(decoded_cl, decoded, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(mean_cl, mean, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logvar_cl, logvar, atol=1e-5, rtol=1e-5)


def test_bfloat16_keeps_dtype_and_stays_close():
    vae = tiny_vae()
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        want = vae.decode(latents)
        got = vae.to(torch.bfloat16).decode(latents.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 0.05 * want.abs().max().item()


def test_logvar_clamped_and_latent_scaling():
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 1e3  # force huge log-variances
        _, logvar = vae.encode(torch.zeros(1, 3, 16, 16))
    assert logvar.max().item() == 20.0
    z = torch.randn(1, 4, 2, 2)
    assert torch.allclose(vae.to_latent_space(z), z * 0.13025)
    assert torch.allclose(vae.from_latent_space(vae.to_latent_space(z)), z)
    shifted = AutoencoderKL(VAEConfig(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                                      scaling_factor=0.5, shift_factor=0.1))
    assert torch.allclose(shifted.to_latent_space(z), (z - 0.1) * 0.5)
    assert torch.allclose(shifted.from_latent_space(shifted.to_latent_space(z)), z)


def test_sample_latent_sources():
    mean, logvar = torch.randn(2, 1, 4, 3, 3)
    eps = torch.randn(1, 4, 3, 3)
    assert torch.allclose(AutoencoderKL.sample_latent(mean, logvar, noise=eps), mean + torch.exp(0.5 * logvar) * eps)
    a = AutoencoderKL.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(3))
    b = AutoencoderKL.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.skipif(not (GOLDEN_DIR / "vae.json").is_file(), reason="no vae golden case")
def test_global_rng_sample_reproduces_the_stored_eps():
    # The official sample draws from torch's global RNG; the case recorded the seed it set just before.
    case = GoldenCase(GOLDEN_DIR, "vae")
    eps = case.input("eps")
    zeros = torch.zeros_like(eps)
    torch.manual_seed(case.meta["sample_seed"])
    assert torch.equal(AutoencoderKL.sample_latent(zeros, zeros), eps)


def test_to_uint8_truncates_like_official():
    pixels = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    image = to_uint8(pixels)
    assert image.shape == (1, 1, 6, 3) and image.dtype == torch.uint8
    # 127.5 * (0 + 1) = 127.5 -> 127 and 127.5 * 1.999 = 254.87 -> 254: truncation, not rounding
    assert image[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_channels_last_pixel_token_paths_equal_plain_calls():
    """decode_image_tokens and encode_image_tokens convert the VAE to channels_last in place: same values as the plain
    calls on a contiguous copy."""
    plain = tiny_vae()
    vae = AutoencoderKL(TINY).eval()
    vae.load_state_dict(plain.state_dict())
    tokens, pixels, eps = torch.randn(1, 16, 16), torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        decoded = decode_image_tokens(vae, tokens, 64, 64)
        assert decoded.is_contiguous(memory_format=torch.channels_last)
        expected = plain.decode(plain.from_latent_space(flow.unpack_latents(tokens, 64, 64)))
        torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)
        mean, logvar = plain.encode(pixels)
        expected = flow.pack_latents(plain.to_latent_space(plain.sample_latent(mean, logvar, noise=eps)))
        torch.testing.assert_close(encode_image_tokens(vae, pixels, noise=eps), expected, rtol=0, atol=1e-5)


def test_a_bf16_vae_decodes_in_float32_over_its_bf16_weights():
    """As the official generate_image (autocast to float32): the image a bf16 VAE decodes equals a float32 decode
    with the same bf16-rounded weights, not a bf16 decode, and the VAE keeps its bf16 weights."""
    vae = tiny_vae(3).to(torch.bfloat16)
    same_weights = AutoencoderKL(TINY).eval()
    same_weights.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    tokens = torch.randn(1, 4, 16)  # a 32x32 image: bf16 convolutions are slow on CPUs without it
    with torch.no_grad():
        decoded = decode_image_tokens(vae, tokens, 32, 32)
        assert decoded.dtype == torch.float32
        assert torch.equal(decoded, decode_image_tokens(same_weights, tokens, 32, 32))
        plain = same_weights.decode(same_weights.from_latent_space(flow.unpack_latents(tokens, 32, 32)))
        torch.testing.assert_close(decoded, plain, rtol=0, atol=1e-5)
        in_bf16 = vae.decode(vae.from_latent_space(flow.unpack_latents(tokens, 32, 32)).bfloat16())
        assert (in_bf16.float() - plain).abs().max() > 1e-3  # what the test tells apart
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
