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


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_compiled_decoder_makes_the_same_image(pair, task):
    # Fused float32 kernels round differently, and the official uint8 conversion truncates: one level at most.
    eager, compiled = pair
    if task == "t2i":
        images = [ovis.text_to_image("a cat", width=64, height=64, steps=3, seed=1)[0] for ovis in pair]
    else:
        source = Image.open(GOLDEN / "preprocess_img0.png")
        images = [ovis.edit(source, "make it blue", steps=3, seed=1)[0] for ovis in pair]
    assert compiled.decode_step is not None
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() <= 1
