"""The understanding entry point on the golden tiny model: batching, several images, text only."""
import pytest
from PIL import Image

from golden_case import REPO_GOLDEN as GOLDEN, tiny_ovis


@pytest.fixture(scope="module")
def ovis():
    return tiny_ovis()


def images():
    return [Image.open(GOLDEN / f"preprocess_img{i}.png") for i in range(3)]


def test_a_left_padded_batch_answers_like_each_question_alone(ovis):
    img0, img1, img2 = images()
    questions = ["What is it?", "Compare the two pictures, please.", "Say hi."]
    row_images = [[img0], [img1, img2], []]
    batched = ovis.answer(questions, row_images, max_new_tokens=6)
    alone = [ovis.answer(q, im, max_new_tokens=6) for q, im in zip(questions, row_images)]
    assert batched == alone


def test_the_question_gets_one_image_marker_per_image(ovis):
    img0, img1, _ = images()
    # without markers the official scripts put the images first; with them they stay where the user put them
    implicit = ovis.answer("Which is brighter?", [img0, img1], max_new_tokens=5)
    explicit = ovis.answer("Image 1: <image>\nImage 2: <image>\nWhich is brighter?", [img0, img1],
                           max_new_tokens=5)
    assert isinstance(implicit, str) and isinstance(explicit, str)
    with pytest.raises(ValueError, match="marker"):
        ovis.answer("<image> and <image>?", [img0], max_new_tokens=2)


def test_streamed_text_equals_the_returned_answer(ovis):
    pieces = []
    answer = ovis.answer("What is it?", images()[:1], max_new_tokens=8, on_text=pieces.append)
    assert "".join(pieces) == answer


def test_sampling_is_reproducible_from_the_seed(ovis):
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    first = ovis.answer("Say something.", None, seed=3, **kwargs)
    assert ovis.answer("Say something.", None, seed=3, **kwargs) == first
