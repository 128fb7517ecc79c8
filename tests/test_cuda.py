"""The GPU paths on the golden tiny model, in bf16 on a CUDA device: skipped where there is none (CI is CPU-only).

What the CPU tests cannot show: the device kernels' own memory layouts, CUDA graphs on the static KV cache,
offloading to a real device, and run-to-run determinism of the GPU kernels.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from golden_case import REPO_GOLDEN, tiny_ovis
from ovis_min import flow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def source() -> Image.Image:
    return Image.open(REPO_GOLDEN / "preprocess_img0.png")


def t2i(ovis, seed: int = 3) -> np.ndarray:
    return np.asarray(ovis.text_to_image("a cat", width=64, height=48, steps=3, seed=seed)[0], dtype=np.int16)


def edit(ovis, source, seed: int = 3) -> np.ndarray:
    return np.asarray(ovis.edit(source, "make it blue", steps=3, seed=seed)[0], dtype=np.int16)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float().cpu() - expected).norm() / expected.norm())


def test_bf16_on_the_gpu_follows_float32_on_the_cpu():
    """The LLM (left-padded, so SDPA gets a mask: CUDA's masked kernel has its own output layout) and the image
    decoder in bf16 on the GPU stay within bf16 rounding of the float32 CPU model."""
    gpu, cpu = tiny_ovis("cuda", torch.bfloat16).model, tiny_ovis().model
    torch.manual_seed(0)
    ids = torch.randint(0, cpu.config.llm.vocab_size, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :10] = False
    with torch.no_grad():
        expected = cpu.llm(input_ids=ids, attention_mask=mask)
        got = gpu.llm(input_ids=ids.cuda(), attention_mask=mask.cuda())
    assert relative_error(got[mask.cuda()], expected[mask]) < 0.05

    mm = cpu.config.mmdit
    img, txt = torch.randn(1, 12, mm.in_channels), torch.randn(1, 7, mm.context_in_dim)
    img_ids, txt_ids, t = flow.latent_position_ids(3, 4), torch.zeros(1, 7, 3), torch.full((1,), 0.4)
    bf16 = lambda x: x.to("cuda", torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        expected = cpu.visual_generator.backbone(img, img_ids, txt, txt_ids, t)
        got = gpu.visual_generator.backbone(bf16(img), img_ids.cuda(), bf16(txt), txt_ids.cuda(), bf16(t))
    assert relative_error(got, expected) < 0.05


def test_the_same_seed_gives_the_same_bytes_on_the_gpu(source):
    ovis = tiny_ovis("cuda", torch.bfloat16)
    assert np.array_equal(t2i(ovis), t2i(ovis)) and not np.array_equal(t2i(ovis, seed=3), t2i(ovis, seed=4))
    assert np.array_equal(edit(ovis, source), edit(ovis, source))


def test_offload_changes_nothing_and_leaves_only_the_running_group_on_the_gpu(source):
    resident, offloaded = tiny_ovis("cuda", torch.bfloat16), tiny_ovis("cuda", torch.bfloat16, offload=True)
    assert np.array_equal(t2i(resident), t2i(offloaded))
    assert np.array_equal(edit(resident, source), edit(offloaded, source))
    assert resident.answer("What is it?", [source], max_new_tokens=6) == offloaded.answer("What is it?", [source],
                                                                                        max_new_tokens=6)
    on_gpu = {name.split(".")[0] for name, p in offloaded.model.named_parameters() if p.device.type == "cuda"}
    assert on_gpu == {"llm", "visual_tokenizer", "vte"}  # the last group to run: the answer's


def test_compiled_decoding_with_cuda_graphs_answers_like_eager(source):
    """float32, so that only compilation differs; two prompts of different lengths reuse one KV cache and so one
    captured decode graph."""
    eager, compiled = tiny_ovis("cuda"), tiny_ovis("cuda")
    compiled.compile()
    for question in ("What is it?", "Describe the image and the cat in it, please."):
        assert compiled.answer(question, [source], max_new_tokens=8) == eager.answer(question, [source],
                                                                                      max_new_tokens=8)
    assert np.abs(t2i(compiled) - t2i(eager)).max() <= 1
