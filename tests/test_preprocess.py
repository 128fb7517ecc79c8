"""Image reading and preprocessing, and the prompt format, beyond what the golden case covers."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_checks.prompts import format_prompt
from ovis_min.config import PreprocessConfig
from ovis_min.preprocess import (ImageError, blank_image, cover_and_crop, edit_target_size, load_image,
                                 preprocess_image, smart_resize, to_vae_pixels, understanding_resize)
from ovis_min.prompt import (IGNORE_ID, IMAGE_PLACEHOLDER_IDS, Tokenizer, build_input_ids, check_image_count,
                             check_length, count_images, edit_prompt, preprocess_inputs, t2i_prompt)

TOKENIZER_DIR = Path(__file__).parent / "golden" / "tiny_tokenizer"
TINY = PreprocessConfig(min_pixels=3136, max_pixels=12544)


# -- reading images -------------------------------------------------------------------------------------------
def _pixels(image):
    return np.asarray(image)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (3, 2))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"
    # Transparency is ignored, as `.convert('RGB')` in the official scripts does.
    assert _pixels(loaded)[0, 0].tolist() == [255, 0, 0]
    assert _pixels(loaded)[0, 1].tolist() == [0, 255, 0]


@pytest.mark.parametrize("mode,value,expected", [
    ("RGBA", (10, 20, 30, 0), [10, 20, 30]),  # alpha dropped, colour kept (not composited on white)
    ("LA", (100, 0), [100, 100, 100]),
    ("L", 77, [77, 77, 77]),
])
def test_alpha_and_gray_modes(tmp_path, mode, value, expected):
    Image.new(mode, (4, 3), value).save(tmp_path / "x.png")
    loaded = load_image(tmp_path / "x.png")
    assert loaded.mode == "RGB" and loaded.size == (4, 3)
    assert (_pixels(loaded) == np.array(expected, dtype=np.uint8)).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    opened = Image.open(tmp_path / "g16.png")
    assert opened.mode.startswith("I")
    loaded = load_image(tmp_path / "g16.png")
    assert _pixels(loaded)[0, :, 0].tolist() == [0, 100, 4, 255]  # PIL's convert would give [0, 255, 255, 255]


def test_thirty_two_bit_integer_with_eight_bit_values_kept():
    image = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    assert _pixels(load_image(image))[0, :, 1].tolist() == [0, 100, 255]


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    image.save(tmp_path / "c.tif")
    loaded = load_image(tmp_path / "c.tif")
    assert loaded.mode == "RGB"
    assert _pixels(loaded)[0, 0].tolist() == [255, 0, 0]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_text_file_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(path)
    assert issubclass(ImageError, ValueError)


# -- smart_resize ---------------------------------------------------------------------------------------------
def test_smart_resize_rounds_halves_to_even():
    assert smart_resize(60, 80, factor=32) == (64, 64)  # 80x60 image: round(2.5)=2, round(1.875)=2


@pytest.mark.parametrize("factor,min_pixels,max_pixels", [(28, 3136, 12544), (28, 200704, 3211264), (32, 3136, 1003520)])
def test_smart_resize_bounds(factor, min_pixels, max_pixels):
    for height in (28, 29, 50, 97, 300, 1000, 4000):
        for width in (30, 64, 111, 640, 2500):
            if max(height, width) / min(height, width) > 4:
                continue  # very elongated images may not fit small bounds at all (see the next tests)
            h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
            assert h % factor == 0 and w % factor == 0 and h > 0 and w > 0
            assert min_pixels <= h * w <= max_pixels, (height, width, h, w)


def test_smart_resize_small_images_are_scaled_up():
    h, w = smart_resize(10, 40, 28, 3136, 12544)
    assert h % 28 == 0 and w % 28 == 0 and h * w >= 3136


def test_smart_resize_extreme_aspect_ratio():
    with pytest.warns(UserWarning, match="aspect ratio"):
        h, w = smart_resize(30, 9000, 28, 3136, 1003520)
    assert h % 28 == 0 and w % 28 == 0
    with warnings.catch_warnings(), pytest.raises(ValueError, match="aspect ratio is too extreme"):
        warnings.simplefilter("ignore")
        smart_resize(28, 5600, 28, 3136, 12544)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


# -- patches --------------------------------------------------------------------------------------------------
def test_patch_rows_are_in_merge_group_order():
    cfg = PreprocessConfig(min_pixels=56 * 112, max_pixels=56 * 112)
    # A 56x112 image (already the target size, so no resampling) where each 14x14 patch has its own gray value.
    rows, cols = 4, 8
    gray = (np.arange(rows * cols).reshape(rows, cols) * 7).astype(np.uint8)
    image = Image.fromarray(np.kron(gray, np.ones((14, 14), dtype=np.uint8))).convert("RGB")
    pixel_values, grid_thws = preprocess_image(image, cfg)
    assert grid_thws.tolist() == [[1, rows, cols]]
    assert pixel_values.shape == (rows * cols, 3 * 14 * 14) and pixel_values.dtype == torch.float32
    # Undo the red-channel normalisation of the first value of each row to recover the patch's gray level.
    red = pixel_values[:, 0] * cfg.image_std[0] + cfg.image_mean[0]
    order = torch.round(red * 255 / 7).long().tolist()
    # 2x2 groups in raster order, and inside a group: top-left, top-right, bottom-left, bottom-right.
    assert order[:8] == [0, 1, 8, 9, 2, 3, 10, 11]
    assert order[16:20] == [16, 17, 24, 25]


# -- generation-side image prep -------------------------------------------------------------------------------
def test_edit_target_size_and_blank_image():
    assert edit_target_size(80, 60) == (64, 64)
    assert edit_target_size(200, 120) == (192, 128)
    blank = blank_image(64, 48)
    assert blank.size == (64, 48) and (_pixels(blank) == 255).all()
    assert torch.equal(to_vae_pixels(blank), torch.ones(3, 48, 64))


def test_cover_and_crop_centers_with_round_half_even():
    # 13 extra columns: torchvision's offset is round(6.5) = 6.
    columns = np.tile(np.arange(45, dtype=np.uint8), (32, 1))
    image = Image.fromarray(columns).convert("RGB")
    cropped = cover_and_crop(image, 32, 32)
    assert cropped.size == (32, 32)
    assert _pixels(cropped)[0, 0, 0] == 6


def test_cover_and_crop_pads_like_torchvision_when_int_falls_short():
    # (16/49)*49 truncates to 15 rows, so torchvision pads one black row at the bottom; kept for exactness.
    image = Image.new("RGB", (200, 49), (255, 255, 255))
    cropped = np.asarray(cover_and_crop(image, 16, 16))
    assert (cropped[-1] == 0).all() and (cropped[:-1] == 255).all()


def test_understanding_resize_respects_max_pixels():
    small = understanding_resize(Image.new("RGB", (192, 128)), max_pixels=3136)
    assert small.size == (56, 28)


# -- prompts --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TOKENIZER_DIR)


def test_tokenizer_specials_and_roundtrip(tokenizer):
    assert tokenizer.eos_token_id == tokenizer.token_id("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.token_id("<|endoftext|>")
    ids = tokenizer.encode("<|im_start|>user\nHello there.<|im_end|>")
    assert ids[0] == tokenizer.token_id("<|im_start|>") and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == "user\nHello there."
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello there.<|im_end|>"


def test_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_prompt_templates():
    assert t2i_prompt("a cat").startswith("<image>\nDescribe the image by detailing") and t2i_prompt("a cat").endswith(":a cat")
    assert edit_prompt("  add a hat. ") == "<image>\nadd a hat."
    assert format_prompt("hi", None) == "<|im_start|>user\nhi<|im_end|>\n"
    assert format_prompt("hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_image_markers_become_placeholders(tokenizer):
    input_ids, labels = build_input_ids(tokenizer, "<image>\n<image>\nCompare.")
    ids = input_ids.tolist()
    assert ids[6:9] == list(IMAGE_PLACEHOLDER_IDS) and ids[10:13] == list(IMAGE_PLACEHOLDER_IDS)
    assert (labels == IGNORE_ID).all()


def test_role_spellings_are_equivalent(tokenizer):
    hf_style = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    official = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    for a, b in zip(build_input_ids(tokenizer, hf_style, None), build_input_ids(tokenizer, official, None)):
        assert torch.equal(a, b)


def test_multi_turn_labels_cover_every_answer(tokenizer):
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."},
                    {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Gray."}]
    input_ids, labels = build_input_ids(tokenizer, conversation, None)
    assert input_ids[-1].item() == tokenizer.eos_token_id  # the trailing "\n" is dropped
    learned = [i for i, t in zip(input_ids.tolist(), labels.tolist()) if t != IGNORE_ID]
    answers = tokenizer.encode("A cat.<|im_end|>") + tokenizer.encode("Gray.<|im_end|>")
    assert learned == answers
    # With a generation preface nothing is learned, and an open assistant turn follows.
    input_ids, labels = build_input_ids(tokenizer, conversation, "")
    assert (labels == IGNORE_ID).all()


def test_image_count_mismatch(tokenizer):
    assert count_images([{"from": "human", "value": "<image><image>x"}]) == 2
    with pytest.raises(ValueError, match="2 <image> marker.*1 image"):
        check_image_count("<image>\n<image>\nCompare.", 1)
    with pytest.raises(ValueError, match="0 <image> marker.*1 image"):
        preprocess_inputs(tokenizer, "no marker", [blank_image(56, 56)], TINY)


def test_prompt_too_long(tokenizer):
    input_ids, labels, pixel_values, grid_thws = preprocess_inputs(tokenizer, "<image>\nHi", [blank_image(56, 56)], TINY)
    length = check_length(input_ids, grid_thws, TINY.hidden_stride, max_length=1000)
    assert length == input_ids.numel() - 1 + 4  # a 56x56 image is 2x2 merged tokens
    with pytest.raises(ValueError, match="max_length=10"):
        preprocess_inputs(tokenizer, "<image>\nHi", [blank_image(56, 56)], TINY, max_length=10)
