"""Flow-matching math: schedule and noise against the official values, packing, the sampler, the training target."""
import math

import pytest
import torch

from golden_case import GOLDEN_DIR, GoldenCase, case_metas, case_params
from ovis_min import flow


def cases_with(key: str, output: str | None = None) -> list:
    """Golden cases whose JSON has `key` (and lists the stored output `output`); none found fails the test."""
    return case_params([name for name, meta in case_metas(GOLDEN_DIR).items()
                        if key in meta and (output is None or output in meta.get("outputs", {}))], output or key)


def packed_tokens(meta: dict) -> int:
    # generate_image first floors the size to a multiple of 16; one packed token covers 16x16 pixels.
    height, width = 16 * (meta["height"] // 16), 16 * (meta["width"] // 16)
    return math.ceil(height / 16) * math.ceil(width / 16)


@pytest.mark.parametrize("name", cases_with("timesteps"))
def test_schedule_matches_official(name):
    case = GoldenCase(GOLDEN_DIR, name)
    meta, mmdit = case.meta, case.config().mmdit
    shift = meta.get("timestep_shift", mmdit.timestep_shift)
    got = flow.time_schedule(meta["num_steps"], packed_tokens(meta), shift,
                             base_shift=meta.get("base_shift", mmdit.base_shift),
                             max_shift=meta.get("max_shift", mmdit.max_shift))
    assert got == meta["timesteps"]  # float32 values, bit for bit


@pytest.mark.parametrize("name", cases_with("seed"))
def test_initial_noise_matches_official(name):
    case = GoldenCase(GOLDEN_DIR, name)
    meta = case.meta
    stored = case.input("noise") if "in.noise" in case.tensors else case.output("noise")
    height, width = 16 * (meta["height"] // 16), 16 * (meta["width"] // 16)
    noise = flow.initial_noise(stored.shape[0], height, width, seed=meta["seed"], channels=stored.shape[1])
    assert torch.equal(noise, stored)
    again = flow.initial_noise(stored.shape[0], height, width, generator=torch.Generator().manual_seed(meta["seed"]),
                               channels=stored.shape[1])
    assert torch.equal(again, noise)


def test_initial_noise_shape_and_dtype():
    noise = flow.initial_noise(2, 40, 72, seed=1, dtype=torch.bfloat16)
    assert noise.shape == (2, 4, 6, 10) and noise.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        flow.initial_noise(1, 32, 32)


def test_schedule_endpoints_and_shift_direction():
    plain = flow.time_schedule(10, 4096, shift=False)
    shifted = flow.time_schedule(10, 4096, shift=True)
    assert len(plain) == 11 and plain[-1] == 0.0 and shifted[-1] == 0.0
    assert all(a > b for a, b in zip(shifted, shifted[1:]))
    # a positive shift keeps more of the steps at high noise
    assert all(s >= p for s, p in zip(shifted[1:-1], plain[1:-1]))
    assert flow.schedule_mu(256) == pytest.approx(0.5) and flow.schedule_mu(4096) == pytest.approx(1.15)


def test_pack_unpack_round_trip_and_layout():
    latents = torch.randn(2, 4, 6, 8)
    tokens = flow.pack_latents(latents)
    assert tokens.shape == (2, 12, 16)
    # token (row 1, col 2) is the 2x2 patch latents[..., 2:4, 4:6] flattened as (c, py, px)
    assert torch.equal(tokens[:, 1 * 4 + 2], latents[:, :, 2:4, 4:6].reshape(2, 16))
    assert torch.equal(flow.unpack_latents(tokens, 48, 64), latents)
    with pytest.raises(ValueError):
        flow.unpack_latents(tokens, 64, 64)


def test_position_ids_layout():
    ids = flow.latent_position_ids(2, 3, time_index=1, batch=2)
    assert ids.shape == (2, 6, 3) and ids.dtype == torch.float32
    assert ids[0].tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [1, 1, 0], [1, 1, 1], [1, 1, 2]]


@pytest.mark.parametrize("name", cases_with("case", output="genprep.cond_img_ids_before_time"))
def test_position_ids_match_generation_prep(name):
    case = GoldenCase(GOLDEN_DIR, name)
    height, width = case.output("genprep.vae_pixel_values").shape[-2:]
    ids = flow.latent_position_ids(height // 16, width // 16)[0]
    assert torch.equal(ids, case.output("genprep.cond_img_ids_before_time"))


def test_guidance():
    cond, no_txt, no_both = torch.randn(3, 2, 5)
    assert torch.allclose(flow.text_guidance(cond, no_both, 1.0), cond)
    assert torch.allclose(flow.edit_guidance(cond, no_txt, no_both, 1.0, 1.0), cond)
    # with no image condition the edit rule reduces to text guidance
    assert torch.allclose(flow.edit_guidance(cond, no_both, no_both, 1.5, 5.0), flow.text_guidance(cond, no_both, 5.0))


def test_euler_on_toy_fields():
    x1 = torch.randn(3, 4, dtype=torch.float64)
    # constant velocity: Euler is exact on any schedule, x(0) = x(1) - c
    c = torch.randn(3, 4, dtype=torch.float64)
    x0 = flow.denoise(lambda x, t: c, x1, flow.time_schedule(7, 1024, shift=True))
    assert torch.allclose(x0, x1 - c)
    # dx/dt = x has x(0) = x(1) / e; Euler is first order, so doubling the steps halves the error
    errors = []
    for steps in (50, 100, 200):
        timesteps = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        errors.append((flow.denoise(lambda x, t: x, x1, timesteps) - x1 / math.e).abs().max().item())
    assert errors[2] < 1e-2 * x1.abs().max().item()
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.05) and errors[1] / errors[2] == pytest.approx(2, rel=0.05)


def test_denoise_progress_callback():
    calls = []
    flow.denoise(lambda x, t: x, torch.zeros(1), [1.0, 0.5, 0.0], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


def test_target_velocity_takes_the_sampler_from_noise_to_data():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 12, 16, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 12, 16, generator=generator, dtype=torch.float64)
    timesteps = flow.time_schedule(5, 12, shift=True)
    assert timesteps[0] == pytest.approx(1.0)
    start = flow.noisy_latents(x0, noise, torch.full((2,), timesteps[0]))
    # on a straight path the training target is the exact velocity: Euler lands on x0 from any schedule
    end = flow.denoise(lambda x, t: flow.velocity_target(x0, noise), start, timesteps)
    assert torch.allclose(end, x0, atol=1e-12)
    # and each visited point is the training path's x_t
    x = start
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        x = flow.euler_step(x, flow.velocity_target(x0, noise), t_cur, t_next)
        assert torch.allclose(x, flow.noisy_latents(x0, noise, torch.full((2,), t_next)), atol=1e-12)
    # the sign, seen from the sampler alone: the velocity that points from x_t back to x0 at rate 1/t
    end = flow.denoise(lambda x, t: (x - x0) / t, flow.noisy_latents(x0, noise, torch.ones(2)), [1.0, 0.6, 0.2, 0.0])
    assert torch.allclose(end, x0, atol=1e-12)


def test_loss_is_per_sample():
    x0, noise = torch.randn(2, 3, 5, 16)  # (pair, B, N, C)
    target = flow.velocity_target(x0, noise)
    assert torch.equal(flow.flow_matching_loss(target, x0, noise), torch.zeros(3))
    wrong = flow.flow_matching_loss(-target, x0, noise)  # (B,): each sample's own mean
    torch.testing.assert_close(wrong, 4 * target.pow(2).mean(dim=(1, 2)))
    # a sample's loss does not depend on the others in its batch
    torch.testing.assert_close(flow.flow_matching_loss(-target[:1], x0[:1], noise[:1]), wrong[:1], rtol=0, atol=0)
    loss = flow.flow_matching_loss(target.bfloat16(), x0, noise)
    assert loss.dtype == torch.float32


def test_sample_timesteps():
    t = flow.sample_timesteps(10000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10000,) and t.dtype == torch.float32
    assert 0 < t.min().item() and t.max().item() < 1 and abs(t.median().item() - 0.5) < 0.02
    again = flow.sample_timesteps(10000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    shifted = flow.sample_timesteps(10000, generator=torch.Generator().manual_seed(0), image_seq_len=4096)
    assert (shifted >= t).all() and shifted.median().item() > 0.7
