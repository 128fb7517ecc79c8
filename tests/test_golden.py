"""Every golden case in a directory against ovis-min.

Cases are discovered as `*.json` files with a "case" field in `OVIS_GOLDEN_DIR` (default: tests/golden).
Shapes, sizes and settings are read from each case and its config, so any directory in the same format
(other seeds, sizes, configs) runs unchanged.
"""
import importlib

import pytest

from golden_case import GOLDEN_DIR, GoldenCase, case_metas

# case kind -> (module in tests/golden_checks that compares it, the ovis-min block it exercises)
CHECKERS = {
    "vit": ("encoder", "ovis_min/vit.py"),
    "visual_tokenizer": ("encoder", "ovis_min/adapter.py"),
    "preprocess": ("prompts", "ovis_min/preprocess.py + ovis_min/prompt.py"),
    "llm": ("llm", "ovis_min/llm.py"),
    "merge": ("understanding", "ovis_min/model.py (multimodal merge)"),
    "understanding": ("understanding", "ovis_min/model.py (understanding)"),
    "refiner": ("decoder", "ovis_min/refiner.py"),
    "mmdit": ("decoder", "ovis_min/mmdit.py"),
    "vae": ("generation", "ovis_min/vae.py"),
    "sampler": ("generation", "ovis_min/flow.py"),
    "e2e_t2i": ("pipelines", "ovis_min/pipeline.py (text-to-image)"),
    "e2e_edit": ("pipelines", "ovis_min/pipeline.py (editing)"),
}


def checker_for(kind: str):
    """The longest registered prefix of `kind` ("sampler_t2i_shift" -> "sampler")."""
    parts = kind.split("_")
    for n in range(len(parts), 0, -1):
        key = "_".join(parts[:n])
        if key in CHECKERS:
            return key, CHECKERS[key]
    return None, (None, None)


CASES = list(case_metas(GOLDEN_DIR))


def test_directory_has_cases():
    assert CASES, f"no golden cases (*.json with a 'case' field) in {GOLDEN_DIR}"


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name):
    case = GoldenCase(GOLDEN_DIR, name)
    key, (module_name, block) = checker_for(case.kind)
    if key is None:
        pytest.skip(f"case kind '{case.kind}' is not known to ovis-min's golden test")
    try:
        module = importlib.import_module(f"golden_checks.{module_name}")
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in ("ovis_min", "golden_checks"):
            pytest.skip(f"block {block} is not built yet ({err.name})")
        raise
    getattr(module, f"check_{key}")(case)
    assert case.checked, f"{name}: nothing was compared"
    assert not case.unchecked(), f"{name}: stored outputs never compared: {case.unchecked()}"
