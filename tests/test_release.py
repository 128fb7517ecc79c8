"""The release layout end to end: a tiny checkpoint laid out exactly as the published one is (two shards with
their index, the tied lm_head left out, the decoder and VAE in float32 and the rest in bfloat16 as the published
torch_dtype values say, the slow tokenizer files only, the published preprocessor_config.json's shape) loads
strictly and runs the three tasks, giving the same bytes as the same weights with tokenizer.json."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_min.checkpoint import INDEX_FILE, load_model, open_checkpoint
from ovis_min.pipeline import Ovis
from ovis_min.tiny import write_tiny_checkpoint

PUBLISHED = Path(__file__).resolve().parent / "fixtures" / "Ovis-U1-3B"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("release") / "ckpt", seed=1, slow_tokenizer=True,
                                 published_dtypes=True)


def test_the_layout_is_the_published_one(release):
    names = sorted(p.name for p in release.iterdir())
    assert names == ["added_tokens.json", "config.json", "merges.txt", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", INDEX_FILE, "preprocessor_config.json",
                     "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    tensors = open_checkpoint(release).tensors
    assert "llm.lm_head.weight" not in tensors
    assert {info.dtype for name, info in tensors.items() if name.startswith("visual_generator.")} == {"F32"}
    assert {info.dtype for name, info in tensors.items() if not name.startswith("visual_generator.")} == {"BF16"}
    ours = json.loads((release / "preprocessor_config.json").read_text())
    theirs = json.loads((PUBLISHED / "preprocessor_config.json").read_text())
    assert sorted(ours) == sorted(theirs)
    assert {k: v for k, v in ours.items() if k not in ("min_pixels", "max_pixels")} == \
        {k: v for k, v in theirs.items() if k not in ("min_pixels", "max_pixels")}
    config = json.loads((release / "config.json").read_text())
    published = json.loads((PUBLISHED / "config.json").read_text())
    assert config["visual_generator_config"]["torch_dtype"] == published["visual_generator_config"]["torch_dtype"]
    assert config["llm_config"]["torch_dtype"] == published["llm_config"]["torch_dtype"]


def run_tasks(directory: Path) -> tuple[str, bytes, bytes]:
    ovis = Ovis.from_pretrained(directory, dtype=torch.float32, download=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    answer = ovis.answer("What is in the image?", images=[image], max_new_tokens=6)
    t2i = ovis.text_to_image("a cat", width=64, height=64, steps=2, seed=3)[0]
    edit = ovis.edit(image, "make it blue", steps=2, seed=3)[0]
    return answer, t2i.tobytes(), edit.tobytes()


def test_loads_strictly_and_runs_the_three_tasks_with_either_tokenizer_form(release, tmp_path):
    model = load_model(release, dtype=torch.float32).model
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    fast = tmp_path / "fast"
    shutil.copytree(release, fast)
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (fast / name).unlink()
    (fast / "tokenizer.json").write_text(
        write_tiny_checkpoint(tmp_path / "donor", shards=1).joinpath("tokenizer.json").read_text())
    slow_results, fast_results = run_tasks(release), run_tasks(fast)
    assert slow_results == fast_results
    assert isinstance(slow_results[0], str) and len(slow_results[1]) == 64 * 64 * 3
