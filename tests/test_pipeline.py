"""The pipeline beyond the golden cases: understanding on the golden tiny model (batching, several images, text
only), and the batched guidance of the sampler against one decoder call per branch."""
import pytest
import torch
from PIL import Image

from golden_case import REPO_GOLDEN as GOLDEN, tiny_ovis
from ovis_min import flow
from ovis_min.pipeline import Condition, guided_velocity, sample_latents
from ovis_min.tiny import random_model, tiny_config


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
    # without markers the images go first, one "Image k: <image>" line each, as in the official multi-image script
    implicit = ovis.answer("Which is brighter?", [img0, img1], max_new_tokens=5)
    explicit = ovis.answer("Image 1: <image>\nImage 2: <image>\nWhich is brighter?", [img0, img1],
                           max_new_tokens=5)
    assert implicit == explicit
    # markers the user placed stay where they are: the same images after the question read differently
    assert ovis.answer("Which is brighter? <image> <image>", [img0, img1], max_new_tokens=5) != implicit
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


# -- sampling: the batched guidance branches equal one plain decoder call per branch ---------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


def test_guided_velocity_batches_branches_like_separate_official_calls(model):
    """Editing, two images: cond and no-text (edit image, texts of 7 and 5 tokens) run as one masked batch,
    no-both (4 tokens, no edit image) alone; each branch equals the official one-call forward of that branch."""
    decoder = model.visual_generator.backbone
    rows, cols, batch = 3, 4, 2
    lengths, with_cond = (7, 5, 4), (True, True, False)
    torch.manual_seed(0)
    txts = [torch.randn(1, n, model.config.mmdit.context_in_dim) for n in lengths]
    cond_img = torch.randn(1, rows * cols, 16)
    branches = [Condition(*decoder.encode_text(txt), cond_img if c else None) for txt, c in zip(txts, with_cond)]
    x = torch.randn(batch, rows * cols, 16)
    img_ids, cond_ids = flow.latent_position_ids(rows, cols, batch=batch), \
        flow.latent_position_ids(rows, cols, time_index=1, batch=batch)
    with torch.no_grad():
        fast = guided_velocity(decoder, branches, torch.stack, batch, rows, cols)(x, 0.7)  # (3, batch, N, 16)
        for i, (txt, c) in enumerate(zip(txts, with_cond)):
            plain = decoder(x, img_ids, txt.expand(batch, -1, -1), torch.zeros(batch, txt.shape[1], 3),
                            torch.full((batch,), 0.7), cond_img=cond_img.expand(batch, -1, -1) if c else None,
                            cond_img_ids=cond_ids if c else None)
            torch.testing.assert_close(fast[i], plain, rtol=0, atol=1e-5)


def test_sampler_t2i_with_unequal_texts_equals_per_branch_sampling(model):
    decoder = model.visual_generator.backbone
    torch.manual_seed(1)
    branches = [Condition(*decoder.encode_text(torch.randn(1, n, model.config.mmdit.context_in_dim)))
                for n in (6, 3)]
    noise, timesteps = torch.randn(1, 4, 8, 8), [1.0, 0.6, 0.2, 0.0]
    combine = lambda v: flow.text_guidance(v[0], v[1], 5.0)
    with torch.no_grad():
        batched = sample_latents(decoder, noise, timesteps, branches, combine)

        def one_by_one(x, t):  # the plain path: one decoder call per branch, vector_in and RoPE every step
            v = []
            for b in branches:
                ids = torch.cat([torch.zeros(1, b.tokens.shape[1], 3), flow.latent_position_ids(4, 4)], dim=1)
                v.append(decoder.predict_velocity(x, b.tokens, decoder.text_vector(b.cls), decoder.rope(ids),
                                                  torch.tensor([t])))
            return combine(v)
        plain = flow.denoise(one_by_one, flow.pack_latents(noise), timesteps)
    torch.testing.assert_close(batched, plain, rtol=0, atol=1e-5)
