"""bench.py: its FLOP formulas against torch's own count, a smoke run, and the fast paths it measures against the
plain ones (batched guidance, hoisted text vector and RoPE tables, static KV cache, channels_last VAE)."""
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from ovis_min import flow
from ovis_min.tiny import tiny_config
from ovis_min.model import decode_image_tokens
from ovis_min.pipeline import Condition, guided_velocity, sample_latents


@pytest.fixture(scope="module")
def model():
    return bench.random_model(tiny_config(), torch.float32, torch.device("cpu"), seed=0)


def counted(fn) -> int:
    """FLOPs torch counts for fn(). SDPA runs its math form, whose matmuls are counted on any device."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_random_model_fills_every_weight_once(model):
    assert not any(p.is_meta for p in model.parameters())
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight, "tied weights must stay one tensor"
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_mmdit_forward_flops(model):
    config, decoder = model.config, model.visual_generator.backbone
    text, size = 9, 64
    N = bench.grid_tokens(size)
    img, txt = torch.randn(1, N, 16), torch.randn(1, text, config.mmdit.context_in_dim)
    img_ids = flow.latent_position_ids(size // 16, size // 16)
    got = counted(lambda: decoder(img, img_ids, txt, torch.zeros(1, text, 3), torch.tensor([0.5])))
    assert got == bench.mmdit_flops(config.mmdit, text, N) + bench.refiner_flops(config.refiner, 1, text)


@pytest.mark.parametrize("edit", [False, True])
def test_guided_step_flops(model, edit):
    """One sampler step, and the step alone: refining and vector_in(CLS) happen once per generation, so a step
    does only the decoder work that depends on the step. Equal text lengths: batched branches then execute
    exactly the useful FLOPs (unequal ones add masked padding, which bench does not count)."""
    config, decoder = model.config, model.visual_generator.backbone
    size, text = 64, 6
    N = bench.grid_tokens(size)
    with_cond = (True, True, False) if edit else (False, False)
    cond_img = torch.randn(1, N, 16)
    branches = bench.guidance_branches(decoder, torch.Generator().manual_seed(0), torch.float32, torch.device("cpu"),
                                       (text,) * len(with_cond), cond_img, with_cond)
    noise = torch.randn(1, 4, size // 8, size // 8)
    one_step = counted(lambda: sample_latents(decoder, noise, [0.5, 0.4], branches, lambda v: v[0]))
    assert one_step == sum(bench.mmdit_flops(config.mmdit, text, N, N if c else 0) for c in with_cond)

    velocity = guided_velocity(decoder, branches, lambda v: v[0], 1, size // 16, size // 16)
    step = counted(lambda: velocity(flow.pack_latents(noise), 0.5))
    assert step == sum(bench.mmdit_flops(config.mmdit, text, N, N if c else 0, with_text_vector=False)
                       for c in with_cond)


def test_llm_condition_and_decode_flops(model):
    llm, cfg = model.llm, model.config.llm
    prompt = 20
    embeds = torch.randn(1, prompt, cfg.hidden_size)
    assert counted(lambda: llm.condition_states(embeds)) == bench.llm_condition_flops(cfg, prompt)

    tokens = 3
    llm.setup_cache(1, prompt + tokens)
    key_mask = torch.ones(1, prompt + tokens, dtype=torch.bool)
    with torch.no_grad():
        llm.prefill(embeds, key_mask[:, :prompt], torch.arange(prompt)[None])

    def decode():
        for i in range(tokens):
            slot = prompt + i  # attend exactly over the positions so far: the useful work
            llm.decode_step(torch.tensor([[1]]), torch.tensor([[slot]]), torch.tensor([slot]), key_mask[:, :slot + 1])
    assert counted(decode) == bench.llm_decode_flops(cfg, prompt, tokens)
    llm.free_cache()


def test_decode_bytes_are_the_weights_read_per_token(model):
    cfg = model.config.llm
    layer_and_head = sum(p.numel() for n, p in model.llm.named_parameters() if not n.startswith("model.embed"))
    # lm_head is tied to the embeddings, so it is listed once under model.embed_tokens: add it back
    per_token = layer_and_head + cfg.vocab_size * cfg.hidden_size
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 11
    assert bench.llm_decode_bytes(cfg, 10, 1, 2) == 2 * (per_token + kv)


def test_vit_flops(model):
    config = model.config
    grid = bench.vit_grid(config)
    patches = torch.randn(math.prod(grid), config.vit.num_channels * config.vit.patch_size ** 2)
    got = counted(lambda: model.visual_embeddings(patches, torch.tensor([grid])))
    assert got == bench.vit_flops(config, grid)


def test_vae_flops(model):
    vae, config = model.visual_generator.vae, model.config.vae
    latent = 8
    got = counted(lambda: decode_image_tokens(vae, torch.randn(1, (latent // 2) ** 2, 16), 8 * latent, 8 * latent))
    assert got == bench.vae_decode_flops(config, latent)
    assert counted(lambda: vae.encode(torch.randn(1, 3, 64, 64))) == bench.vae_encode_flops(config, 64)


def test_bench_smoke_run(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--tiny", "--size", "64", "--e2e", "--steps", "2", "--decode-tokens", "3",
                         "--repeat", "1", "--dtype", "fp32", "--json", str(out)])
    names = [w["name"] for w in report["workloads"]]
    assert names == ["mmdit_forward_64", "t2i_step_64", "edit_step_64", "llm_condition_512", "llm_decode",
                     "vit_448", "vae_decode_64", "t2i_64_2", "edit_64_2"]
    assert json.loads(out.read_text()) == report
    for w in report["workloads"]:
        assert w["seconds"] > 0 and w["flops"] > 0 and w["peak_mem_gb"] > 0, w
    decode = report["workloads"][4]
    assert decode["tokens_per_s"] > 0 and decode["bandwidth_pct"] > 0
    assert report["machine"]["matmul_tflops"] > 0 and report["machine"]["copy_gb_per_s"] > 0


def test_cpu_without_native_bf16_benchmarks_in_fp32(monkeypatch, capsys):
    monkeypatch.setattr(bench, "bf16_slowdown_on_cpu", lambda: 150.0)
    assert bench.parse_args(["--device", "cpu"]).dtype == "fp32"
    assert "no native bf16" in capsys.readouterr().err
    assert bench.parse_args(["--device", "cpu", "--tiny", "--dtype", "bf16"]).dtype == "bf16"  # tiny: seconds
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--dtype", "bf16"])
    assert "use --dtype fp32" in capsys.readouterr().err
    monkeypatch.setattr(bench, "bf16_slowdown_on_cpu", lambda: 0.5)
    assert bench.parse_args(["--device", "cpu"]).dtype == "bf16"


def test_bf16_probe_measures_a_ratio():
    assert bench.bf16_slowdown_on_cpu() > 0


def test_matmul_ceiling_is_sized_to_cost_milliseconds():
    ceilings = bench.Ceilings(torch.device("cpu"), torch.float32, megabytes=8)
    ceilings.measure(repeat=1)
    assert 256 <= ceilings.n <= 4096 and ceilings.flops > 0 and ceilings.bandwidth > 0


def test_only_selects_workloads():
    args = bench.parse_args(["--tiny", "--size", "32", "--only", "W5,W6"])
    model = bench.random_model(tiny_config(), torch.float32, torch.device("cpu"))
    names = [w.name for w in bench.make_workloads(model, args, torch.device("cpu"))]
    assert names == ["vit_448", "vae_decode_32"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "W9"])


# -- the fast paths equal the plain ones ---------------------------------------------------------------------------

def test_guided_velocity_batches_branches_like_separate_official_calls(model):
    """Editing, two images: cond and no-text (edit image, texts of 7 and 5 tokens) run as one masked batch,
    no-both (4 tokens, no edit image) alone; each branch equals the official one-call forward of that branch."""
    decoder = model.visual_generator.backbone
    rows, cols, batch = 3, 4, 2
    lengths, with_cond = (7, 5, 4), (True, True, False)
    torch.manual_seed(0)
    txts = [torch.randn(1, n, model.config.mmdit.context_in_dim) for n in lengths]
    cond_img = torch.randn(1, rows * cols, 16)
    branches = [Condition(*decoder.encode_text(txt), cond_img if c else None) for txt, c in zip(txts, with_cond)]
    x = torch.randn(batch, rows * cols, 16)
    img_ids, cond_ids = flow.latent_position_ids(rows, cols, batch=batch), \
        flow.latent_position_ids(rows, cols, time_index=1, batch=batch)
    with torch.no_grad():
        fast = guided_velocity(decoder, branches, torch.stack, batch, rows, cols)(x, 0.7)  # (3, batch, N, 16)
        for i, (txt, c) in enumerate(zip(txts, with_cond)):
            plain = decoder(x, img_ids, txt.expand(batch, -1, -1), torch.zeros(batch, txt.shape[1], 3),
                            torch.full((batch,), 0.7), cond_img=cond_img.expand(batch, -1, -1) if c else None,
                            cond_img_ids=cond_ids if c else None)
            torch.testing.assert_close(fast[i], plain, rtol=0, atol=1e-5)


def test_sampler_t2i_with_unequal_texts_equals_per_branch_sampling(model):
    decoder = model.visual_generator.backbone
    torch.manual_seed(1)
    branches = [Condition(*decoder.encode_text(torch.randn(1, n, model.config.mmdit.context_in_dim)))
                for n in (6, 3)]
    noise, timesteps = torch.randn(1, 4, 8, 8), [1.0, 0.6, 0.2, 0.0]
    combine = lambda v: flow.text_guidance(v[0], v[1], 5.0)
    with torch.no_grad():
        batched = sample_latents(decoder, noise, timesteps, branches, combine)

        def one_by_one(x, t):  # the plain path: one decoder call per branch, vector_in and RoPE every step
            v = []
            for b in branches:
                ids = torch.cat([torch.zeros(1, b.tokens.shape[1], 3), flow.latent_position_ids(4, 4)], dim=1)
                v.append(decoder.predict_velocity(x, b.tokens, decoder.text_vector(b.cls), decoder.rope(ids, x.dtype),
                                                  torch.tensor([t])))
            return combine(v)
        plain = flow.denoise(one_by_one, flow.pack_latents(noise), timesteps)
    torch.testing.assert_close(batched, plain, rtol=0, atol=1e-5)


def test_head_rms_norm_equals_rms_norm():
    from ovis_min.mmdit import HeadRMSNorm
    norm = HeadRMSNorm(16)
    with torch.no_grad():
        norm.scale.normal_()
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (16,), norm.scale, eps=1e-6))


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_equals_sdpa_with_repeated_kv(masked):
    """The LLM folds the query heads that share a KV head into the query length: same result as repeating KV."""
    from ovis_min import llm
    F = torch.nn.functional
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    key_mask = torch.arange(50)[None] < torch.tensor([[50], [31]])
    k2, v2 = k[:, :1].expand(2, 1, 50, 16), v[:, :1].expand(2, 1, 50, 16)
    causal = torch.ones(50, 50, dtype=torch.bool).tril().expand(2, 1, 50, 50)
    if masked:
        causal = causal & key_mask[:, None, None] | torch.eye(50, dtype=torch.bool)
    reference = F.scaled_dot_product_attention(q, k2.expand(2, 3, 50, 16), v2.expand(2, 3, 50, 16), attn_mask=causal)
    folded = llm.fold_heads(causal, 3)
    torch.testing.assert_close(llm.attention(q, k2, v2, folded), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(llm.attention(q, k2, v2, llm.attention_bias(folded, q.dtype)), reference,
                               rtol=0, atol=1e-5)


def test_channels_last_vae_paths_equal_plain_calls(model):
    from ovis_min.model import encode_image_tokens
    from ovis_min.vae import AutoencoderKL
    plain = AutoencoderKL(model.config.vae).eval()
    plain.load_state_dict(model.visual_generator.vae.state_dict())
    vae = AutoencoderKL(model.config.vae).eval()
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
