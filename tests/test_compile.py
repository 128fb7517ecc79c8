"""`Ovis.compile()` (sample.py --compile) on the golden tiny model, on the CPU with torch's default compiler:
the compiled decoder blocks and decode step give what the eager model gives."""
import numpy as np
import pytest
from PIL import Image

from golden_case import REPO_GOLDEN as GOLDEN, tiny_ovis
from ovis_min.pipeline import Ovis


@pytest.fixture(scope="module")
def pair() -> tuple[Ovis, Ovis]:
    eager, compiled = tiny_ovis(), tiny_ovis()
    compiled.compile()
    return eager, compiled


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_compiled_decoding_answers_the_same(pair):
    eager, compiled = pair
    image = Image.open(GOLDEN / "preprocess_img0.png")
    assert compiled.answer("What is it?", [image], max_new_tokens=8) == eager.answer("What is it?", [image],
                                                                                    max_new_tokens=8)


def test_compiled_decoder_makes_the_same_image(pair):
    """An edit compiles every kind of block call that sampling makes: a batch of two rows with padded, masked
    texts (the cond and no-text branches, as T2I's cond and uncond) and a row without a condition image (the
    no-both branch, as every T2I row). T2I itself is left out because its compilations cost as much again.
    Fused float32 kernels round differently, and the official uint8 conversion truncates: one level at most."""
    source = Image.open(GOLDEN / "preprocess_img0.png")
    images = [ovis.edit(source, "make it blue", steps=3, seed=1)[0] for ovis in pair]
    assert pair[1].decode_step is not None
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() <= 1
