"""`python weights.py golden`: a golden directory exported from a checkpoint is one tests/test_golden.py accepts,
every stored output (the extra intermediates included) is compared, a one-weight change is caught, and the shared
cases in tests/golden/ are left as they were."""
import hashlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_golden
from golden_case import REPO_GOLDEN, GoldenCase, case_metas
from golden_checks import decoder, encoder, generation, llm, pipelines, prompts, understanding
from ovis_min.golden import compare_golden
from ovis_min.tiny import write_tiny_checkpoint
from script_runner import one_line_error, run_script

# the check of each kind of case, as tests/test_golden.py runs them
CHECKS = {"vit": encoder.check_vit, "visual_tokenizer": encoder.check_visual_tokenizer,
          "preprocess": prompts.check_preprocess, "llm": llm.check_llm, "merge": understanding.check_merge,
          "understanding": understanding.check_understanding, "refiner": decoder.check_refiner,
          "mmdit": decoder.check_mmdit, "vae": generation.check_vae, "sampler": generation.check_sampler,
          "e2e_t2i": pipelines.check_e2e_t2i, "e2e_edit": pipelines.check_e2e_edit}


def shared_files() -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(REPO_GOLDEN.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the exported directory, the shared set's file hashes before the export)."""
    before = shared_files()
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", shards=1)
    out = tmp_path_factory.mktemp("golden") / "set"
    result = run_script("weights.py", "golden", "--weights", checkpoint, "--out", out, "--height", "64",
                        "--width", "64", "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 16 golden cases" in result.stdout
    return out, before


def test_the_check_table_is_test_golden_s():
    assert sorted(CHECKS) == sorted(test_golden.TESTED_KINDS)


def test_an_exported_set_passes_every_golden_check(exported):
    out, _ = exported
    kinds = {name: meta["case"] for name, meta in case_metas(out).items()}
    assert sorted(set(kinds.values())) == sorted(CHECKS)
    for name, kind in kinds.items():
        case = GoldenCase(out, name)
        CHECKS[kind](case)
        assert not case.unchecked(), f"{name}: stored outputs never compared: {case.unchecked()}"
        if kind == "mmdit":  # the extras: every block and the timestep embedding
            assert {"intermediate.double1_img", "intermediate.single1_out",
                    "intermediate.timestep_embedding"} <= case.checked
        if kind == "sampler":
            assert {"step0.latent_in", "step1.velocity", "vae_decode_in"} <= case.checked
    assert "in.adapter_input" in GoldenCase(out, "visual_tokenizer").tensors


def test_a_set_from_a_changed_weight_fails(exported, tmp_path):
    """The exported cases with one decoder weight changed by a little: the decoder's check must fail."""
    out, _ = exported
    weights = load_file(str(out / "model.safetensors"))
    weights["visual_generator.backbone.single_blocks.1.linear2.weight"][0, 0] += 0.01
    save_file(weights, str(tmp_path / "model.safetensors"))
    for file in out.iterdir():
        if file.name != "model.safetensors":
            (tmp_path / file.name).symlink_to(file)
    with pytest.raises(AssertionError, match="mmdit_t2i:pred"):
        decoder.check_mmdit(GoldenCase(tmp_path, "mmdit_t2i"))


def test_the_shared_cases_are_untouched(exported):
    _, before = exported
    assert shared_files() == before


def test_a_gpu_export_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script("weights.py", "golden", "--weights", tmp_path, "--out", tmp_path / "out", "--device", "cuda")
    assert one_line_error(result, "--device cuda", "--device cpu"), result.stderr[-2000:]


def test_compare_golden_reports_each_output(exported, tmp_path):
    out, _ = exported
    assert all(error == 0.0 for errors in compare_golden(out, out).values() for error in errors.values())
    for file in out.iterdir():
        if file.name != "e2e_t2i.safetensors":
            (tmp_path / file.name).symlink_to(file)
    tensors = load_file(str(out / "e2e_t2i.safetensors"))
    tensors["out.decoded"] = tensors["out.decoded"] * 1.01
    image = tensors["out.image_uint8_hwc"]
    image[0, 0, 0] = image[0, 0, 0] + 10 if image[0, 0, 0] < 128 else image[0, 0, 0] - 10
    save_file(tensors, str(tmp_path / "e2e_t2i.safetensors"))
    errors = compare_golden(out, tmp_path)["e2e_t2i"]
    assert errors["decoded"] == pytest.approx(0.01, rel=1e-3)
    assert errors["image_uint8_hwc"] == pytest.approx(10 / image.numel())
    assert errors["final_latent_tokens"] == 0.0


def test_the_readme_numpy_example_runs(monkeypatch):
    readme = (REPO_GOLDEN / "README.md").read_text()
    section = readme[readme.index("## Checking a port without torch"):]
    monkeypatch.chdir(REPO_GOLDEN.parent.parent)
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), {})


def test_an_image_size_the_edit_case_cannot_keep_is_one_line(tmp_path):
    result = run_script("weights.py", "golden", "--weights", tmp_path, "--out", tmp_path / "out", "--height", "48")
    assert one_line_error(result, "48x256", "multiples of 32"), result.stderr[-2000:]
