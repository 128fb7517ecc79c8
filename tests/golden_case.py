"""Reading one golden case (`X.json` + `X.safetensors`) and comparing against it.

A case stores inputs as `in.<name>` and official outputs as `out.<name>`. `GoldenCase.expect` compares one
output with the tolerances of the golden README and remembers it, so the test can insist that every stored
output was either compared or explicitly declared as not produced by ovis-min (with a reason).
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ovis_min.config import OvisConfig, from_official
from ovis_min.model import OvisU1
from ovis_min.pipeline import Ovis
from ovis_min.prompt import Tokenizer

GOLDEN_DIR = Path(os.environ.get("OVIS_GOLDEN_DIR", Path(__file__).parent / "golden"))
FLOAT_ATOL = 1e-4
FLOAT_RTOL = 1e-4
UINT8_MAX_FLIPPED = 0.005  # at most 0.5% of pixels may differ, and then only by 1 (truncation noise)
REPO_GOLDEN = Path(__file__).parent / "golden"  # the copy kept with the tests: its tiny model serves other tests


def tiny_ovis(device: str = "cpu", dtype: torch.dtype = torch.float32, offload: bool = False) -> Ovis:
    """The golden tiny Ovis-U1 (official-format weights, config and tokenizer) as a pipeline on `device`."""
    config = from_official(json.loads((REPO_GOLDEN / "tiny_model_config.json").read_text()),
                           json.loads((REPO_GOLDEN / "tiny_tokenizer" / "preprocessor_config.json").read_text()))
    model = OvisU1(config).eval()
    model.load_state_dict(load_file(str(REPO_GOLDEN / "tiny_model.safetensors")), strict=True)
    model = model.to(dtype=dtype, device="cpu" if offload else device)
    return Ovis(model, Tokenizer(REPO_GOLDEN / "tiny_tokenizer"), device=device, offload=offload)


def case_metas(directory: Path) -> dict[str, dict]:
    """name -> JSON of every golden case (`*.json` with a "case" field) in `directory`."""
    metas = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(meta, dict) and "case" in meta:
            metas[path.stem] = meta
    return metas


def case_params(names: list[str], what: str) -> list:
    """Discovered case names as test parameters; none found is one parameter, None, that fails the test (a golden
    case that is not there is a failure, never a skip)."""
    return names or [pytest.param(None, id=f"no-{what}-case")]


class GoldenCase:
    def __init__(self, directory: Path, name: str | None):
        assert name is not None, f"no golden case of this kind in {directory}"
        self.dir = Path(directory)
        self.name = name
        self.meta = json.loads((self.dir / f"{name}.json").read_text())
        tensor_file = self.meta.get("files", {}).get("tensors", f"{name}.safetensors")
        self.tensors = load_file(str(self.dir / tensor_file))
        self.checked: set[str] = set()
        self.not_produced: dict[str, str] = {}

    # -- inputs -------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.meta.get("case", self.name)

    def config(self) -> OvisConfig:
        config = json.loads((self.dir / self.meta["config_file"]).read_text())
        pre_path = self.dir / self.meta.get("tokenizer_dir", "") / "preprocessor_config.json"
        preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else None
        return from_official(config, preprocessor)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Official weights under `prefix`, with the prefix removed."""
        weights = load_file(str(self.dir / self.meta["weights_file"]))
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.meta["tokenizer_dir"]

    def input(self, name: str) -> torch.Tensor:
        return self.tensors[f"in.{name}"]

    def output(self, name: str) -> torch.Tensor:
        return self.tensors[f"out.{name}"]

    def outputs(self) -> list[str]:
        return sorted(k[4:] for k in self.tensors if k.startswith("out."))

    # -- comparisons --------------------------------------------------------------------------
    def expect(self, name: str, got: torch.Tensor, where: torch.Tensor | None = None):
        """Compare `got` with the stored official output `name`; `where` masks rows (e.g. padding)."""
        want = self.output(name)
        got = got.detach().cpu()
        assert tuple(got.shape) == tuple(want.shape), f"{self.name}:{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if where is not None:
            got, want = got[where], want[where]
        if want.dtype == torch.uint8:
            diff = (got.to(torch.int16) - want.to(torch.int16)).abs()
            flipped = (diff > 0).float().mean().item()
            assert diff.max().item() <= 1 and flipped <= UINT8_MAX_FLIPPED, (
                f"{self.name}:{name}: uint8 max diff {diff.max().item()}, {flipped:.3%} of values differ")
        elif want.dtype.is_floating_point:
            err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
            assert torch.allclose(got.to(want.dtype), want, atol=FLOAT_ATOL, rtol=FLOAT_RTOL), (
                f"{self.name}:{name}: max abs error {err:.3g} (atol {FLOAT_ATOL}, rtol {FLOAT_RTOL})")
        else:
            assert got.dtype == want.dtype or not got.dtype.is_floating_point, f"{self.name}:{name}: dtype {got.dtype}"
            assert torch.equal(got.to(want.dtype), want), f"{self.name}:{name}: integer/bool values differ"
        self.checked.add(name)

    def skip_output(self, name: str, reason: str):
        """Declare a stored output that ovis-min does not produce (an internal of the official code)."""
        assert f"out.{name}" in self.tensors, f"{self.name}: no stored output {name}"
        self.not_produced[name] = reason

    def unchecked(self) -> list[str]:
        return [n for n in self.outputs() if n not in self.checked and n not in self.not_produced]
