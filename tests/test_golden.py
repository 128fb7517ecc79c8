"""Every golden case in a directory against ovis-min: one test per kind of case, each naming the block it checks.

Cases are discovered as `*.json` files with a "case" field in `OVIS_GOLDEN_DIR` (default: tests/golden); a case's
kind is that field, and a kind may carry a variant after it ("sampler_t2i_shift" is a `sampler` case). Shapes,
sizes and settings are read from each case and its config, so any directory in the same format (other seeds,
sizes, configs) runs unchanged. A kind that no test below runs, or a test that finds no case of its kind, fails.
"""
import pytest

from golden_case import GOLDEN_DIR, GoldenCase, case_metas, case_params
from golden_checks import decoder, encoder, generation, llm, pipelines, prompts, understanding

KINDS = {name: meta["case"] for name, meta in case_metas(GOLDEN_DIR).items()}  # case name -> kind
TESTED_KINDS = []  # filled by `cases_of` below, one entry per test


def cases_of(kind: str) -> list:
    """The cases of `kind` (or a variant of it), as test parameters; without any, one parameter that fails."""
    TESTED_KINDS.append(kind)
    names = [name for name, case_kind in KINDS.items() if case_kind == kind or case_kind.startswith(kind + "_")]
    return case_params(names, kind)


def run(name: str | None, check) -> None:
    case = GoldenCase(GOLDEN_DIR, name)
    check(case)
    assert case.checked, f"{name}: nothing was compared"
    assert not case.unchecked(), f"{name}: stored outputs never compared: {case.unchecked()}"


@pytest.mark.parametrize("name", cases_of("vit"))
def test_vit(name):  # ovis_min/vit.py
    run(name, encoder.check_vit)


@pytest.mark.parametrize("name", cases_of("visual_tokenizer"))
def test_visual_tokenizer(name):  # ovis_min/adapter.py on the encoder's output
    run(name, encoder.check_visual_tokenizer)


@pytest.mark.parametrize("name", cases_of("preprocess"))
def test_preprocess(name):  # ovis_min/preprocess.py + ovis_min/prompt.py
    run(name, prompts.check_preprocess)


@pytest.mark.parametrize("name", cases_of("llm"))
def test_llm(name):  # ovis_min/llm.py
    run(name, llm.check_llm)


@pytest.mark.parametrize("name", cases_of("merge"))
def test_merge(name):  # ovis_min/model.py, the multimodal merge
    run(name, understanding.check_merge)


@pytest.mark.parametrize("name", cases_of("understanding"))
def test_understanding(name):  # ovis_min/model.py + ovis_min/decode.py, greedy answers
    run(name, understanding.check_understanding)


@pytest.mark.parametrize("name", cases_of("refiner"))
def test_refiner(name):  # ovis_min/refiner.py
    run(name, decoder.check_refiner)


@pytest.mark.parametrize("name", cases_of("mmdit"))
def test_mmdit(name):  # ovis_min/mmdit.py
    run(name, decoder.check_mmdit)


@pytest.mark.parametrize("name", cases_of("vae"))
def test_vae(name):  # ovis_min/vae.py
    run(name, generation.check_vae)


@pytest.mark.parametrize("name", cases_of("sampler"))
def test_sampler(name):  # ovis_min/flow.py
    run(name, generation.check_sampler)


@pytest.mark.parametrize("name", cases_of("e2e_t2i"))
def test_e2e_t2i(name):  # ovis_min/pipeline.py, text-to-image
    run(name, pipelines.check_e2e_t2i)


@pytest.mark.parametrize("name", cases_of("e2e_edit"))
def test_e2e_edit(name):  # ovis_min/pipeline.py, editing
    run(name, pipelines.check_e2e_edit)


def test_directory_has_cases():
    assert KINDS, f"no golden cases (*.json with a 'case' field) in {GOLDEN_DIR}"


def test_every_case_is_of_a_tested_kind():
    untested = {name: kind for name, kind in KINDS.items()
                if not any(kind == tested or kind.startswith(tested + "_") for tested in TESTED_KINDS)}
    assert not untested, f"cases of a kind no test here runs: {untested}"
