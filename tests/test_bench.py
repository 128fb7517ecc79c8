"""bench.py and ovis_min/perf.py: FLOPs as torch counts them, on plain forms that compute what the timed calls
compute without their padding; the decode byte count; a smoke run; the ceilings and the dtype choice."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
from ovis_min.perf import count_flops
from ovis_min.pipeline import sample_latents
from ovis_min.tiny import random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), torch.float32, torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def workloads(model):
    args = bench.parse_args(["--tiny", "--dtype", "fp32", "--size", "64", "--e2e", "--steps", "2",
                             "--decode-tokens", "3"])
    return {w.name: w for w in bench.make_workloads(model, args, torch.device("cpu"))}


def test_random_model_fills_every_weight_once(model):
    assert not any(p.is_meta for p in model.parameters())
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight, "tied weights must stay one tensor"
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and (p != 0).any(), name


@pytest.mark.parametrize("backward", [False, True])
def test_cpu_attention_is_counted_as_its_matmuls(backward):
    """The fused CPU kernel is counted as the math form's two matmuls (4*B*H*Lq*Lk*D); its backward as torch
    counts the fused CUDA kernels' (2.5x the forward, the recomputed scores included)."""
    q, k, v = (torch.randn(2, 3, 50, 16, requires_grad=backward) for _ in range(3))
    mask = torch.rand(2, 1, 50, 50) > 0.5
    call = (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()) if backward else \
        (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    forward = 4 * 2 * 3 * 50 * 50 * 16
    assert count_flops(call) == (forward + 2.5 * forward if backward else forward)
    with sdpa_kernel(SDPBackend.MATH):
        assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).detach()) == forward


def test_plain_forms_compute_what_the_timed_calls_compute(workloads):
    """A plain form may differ from its timed call only in the padding and masked keys it leaves out."""
    with torch.no_grad():
        for name, workload in workloads.items():
            if workload.plain is None:
                continue
            fast, plain = workload.run(), workload.plain()
            if name == "llm_decode":
                assert torch.equal(fast, plain), name  # the greedy tokens
            else:
                torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5, msg=name)


def test_padding_is_counted_in_the_timed_calls_but_not_in_the_flops(workloads):
    """bench's texts differ in length (the batched branches pad) and decode steps attend over whole KV blocks:
    the timed calls execute more FLOPs than the plain forms, and bench reports the plain ones."""
    with torch.no_grad():
        for name in ("t2i_step_64", "edit_step_64", "llm_decode", "t2i_64_2", "edit_64_2"):
            workload = workloads[name]
            assert count_flops(workload.run) > count_flops(workload.plain), name
        bench.count_useful_flops(list(workloads.values()))
    assert all(w.flops == count_flops(w.plain or w.run) > 0 for w in workloads.values())


@pytest.mark.parametrize("edit", [False, True])
def test_batched_branches_of_equal_length_execute_exactly_the_plain_flops(model, edit):
    """Without padding, batching the guidance branches changes how the work is grouped, not how much there is."""
    decoder = model.visual_generator.backbone
    with_cond = (True, True, False) if edit else (False, False)
    branches = bench.guidance_branches(decoder, torch.Generator().manual_seed(0), torch.float32, torch.device("cpu"),
                                       (6,) * len(with_cond), torch.randn(1, 16, 16), with_cond)
    noise = torch.randn(1, 4, 8, 8)
    first = lambda v: v[0]
    assert count_flops(lambda: sample_latents(decoder, noise, [0.5, 0.4], branches, first)) == \
        count_flops(lambda: bench.branch_by_branch(decoder, noise, [0.5, 0.4], branches, first))


def test_decode_bytes_are_the_weights_read_per_token(model):
    cfg = model.config.llm
    layer_and_head = sum(p.numel() for n, p in model.llm.named_parameters() if not n.startswith("model.embed"))
    # lm_head is tied to the embeddings, so it is listed once under model.embed_tokens: add it back
    per_token = layer_and_head + cfg.vocab_size * cfg.hidden_size
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 11
    workload = bench.decode_workload(model.llm, torch.randn(1, 10, cfg.hidden_size), tokens=1)
    model.llm.free_cache()
    assert workload.bytes == 4 * (per_token + kv)


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
    model = random_model(tiny_config())
    names = [w.name for w in bench.make_workloads(model, args, torch.device("cpu"))]
    assert names == ["vit_448", "vae_decode_32"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "W9"])


def test_offloaded_generations_compute_what_resident_ones_do(model):
    """--offload's stage moves (here to the CPU itself, a no-op) leave a generation's result unchanged; editing
    uses every stage, the VAE twice."""
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    resident = bench.e2e_workloads(model, gen(), 32, 1, torch.device("cpu"))[1]
    offloaded = bench.e2e_workloads(model, gen(), 32, 1, torch.device("cpu"), offload=True)[1]
    assert resident.name == offloaded.name == "edit_32_1"
    with torch.no_grad():
        assert torch.equal(resident.run(), offloaded.run())


def test_gpu_check_and_offload_refuse_cleanly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        bench.parse_args(["--gpu-check", "--json", "gpu.json"])
    assert "--gpu-check needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--e2e", "--offload"])
    assert "--offload moves stages to a GPU" in capsys.readouterr().err


def test_gpu_check_parts_fail_loudly_and_never_hang():
    started = bench.time.perf_counter()
    hung = bench.run_part(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)  # a child of its own too
    assert hung["status"] == "timeout" and bench.time.perf_counter() - started < 10
    broken = bench.run_part(["sh", "-c", "echo boom; exit 3"], timeout=10)
    assert broken["status"] == "failed" and broken["returncode"] == 3 and "boom" in broken["output_tail"]
    assert bench.run_part(["true"], timeout=10)["status"] == "ok"


def test_gpu_check_summary_and_goals():
    workload = lambda name, s, mem, tokens=None: {"name": name, "seconds": s, "min_s": s, "peak_mem_gb": mem,  # noqa: E731
                                                  "peak_pct": 40.0, "tokens_per_s": tokens}
    resident = bench.bench_summary({"workloads": [workload("t2i_1024_50", 2.5, 9.0), workload("edit_1024_50", 4, 11),
                                                  workload("llm_decode", 0.05, 8.0, 640.0)]})
    assert resident["t2i_1024_50"]["steps_per_s"] == 20.0 and resident["llm_decode"]["tokens_per_s"] == 640.0
    offloaded = bench.bench_summary({"workloads": [workload("t2i_1024_50", 3.0, 5.5)]})
    goals = bench.goals(resident, offloaded)
    assert goals["t2i_1024_50_seconds"] == {"value": 2.5, "goal": 2.0, "met": False}
    assert goals["decode_tokens_per_s"]["met"] and goals["offload_peak_memory_gb"]["met"]
    assert goals["peak_memory_gb"] == {"value": 11, "goal": 10.5, "met": False}
    assert bench.goals({}, {})["t2i_1024_50_seconds"]["met"] is None  # a part that gave no numbers
