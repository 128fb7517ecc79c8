"""Golden check of the `preprocess` case: image preprocessing, prompt ids/labels and the generation-side image prep.

Every setting (image files, prompt texts, generation prefaces, expected sizes, the full-size constants) is read
from the case JSON, so another golden directory in the same format runs unchanged.
"""
import re
from dataclasses import replace

import torch

from ovis_min.config import PreprocessConfig
from ovis_min.prompt import Tokenizer, build_input_ids, check_image_count, turn_texts
from ovis_min.preprocess import (edit_target_size, condition_images, load_image, preprocess_image,
                                 preprocess_images, resize_for_edit, smart_resize)


def format_prompt(text_or_conversation, generation_preface: str | None = "") -> str:
    """The prompt as text, `<image>` markers left in place: the turns `build_input_ids` encodes, joined."""
    return "".join(text for _, text in turn_texts(text_or_conversation, generation_preface, enable_thinking=False))


def _entry(mapping: dict, prefix: str):
    """The value whose key starts with `prefix` (the JSON keys carry a description after the name)."""
    matches = [value for key, value in mapping.items() if key.startswith(prefix)]
    assert len(matches) == 1, f"expected one key starting with {prefix!r} in {sorted(mapping)}"
    return matches[0]


def _full_size_setting(case, cfg: PreprocessConfig):
    """The `fullconst.*` settings: (image file, preprocessing config) as the case description records them.

    The case has no structured field for them. When the description does not state them, they are the full-size
    Ovis-U1-3B constants (ovis-min's defaults) on whichever of the case's images gives the stored grid.
    """
    match = re.search(r"fullconst\.\*'?\s*=.*?patch (\d+), stride (\d+), min_pixels (\d+), max_pixels (\d+)\).*?"
                      r"on (\S+\.png)", case.meta["description"])
    if match:
        patch, stride, min_pixels, max_pixels = (int(v) for v in match.groups()[:4])
        return match.group(5), replace(cfg, patch_size=patch, hidden_stride=stride, min_pixels=min_pixels,
                                       max_pixels=max_pixels)
    full = replace(cfg, **{k: getattr(PreprocessConfig(), k)
                           for k in ("patch_size", "hidden_stride", "min_pixels", "max_pixels")})
    grid = case.output("fullconst.grid_thws")
    for spec in case.meta["images"]:
        if torch.equal(preprocess_image(load_image(case.dir / spec["file"]), full)[1], grid):
            return spec["file"], full
    raise AssertionError("no image of the case gives the stored fullconst grid with the full-size constants")


def check_preprocess(case):
    cfg = case.config().preprocess
    tokenizer = Tokenizer(case.tokenizer_dir)
    assert len(tokenizer) == case.meta["tokenizer_len"]
    assert tokenizer.pad_token_id == case.meta["pad_token_id"]
    assert tokenizer.eos_token_id == case.meta["eos_token_id"]

    def image(file_name):
        return load_image(case.dir / file_name)

    # Single images with the checkpoint's preprocessor settings.
    for k, spec in enumerate(case.meta["images"]):
        img = image(spec["file"])
        assert list(img.size) == spec["size_wh"]
        assert list(smart_resize(img.height, img.width, cfg.patch_size * cfg.hidden_stride, cfg.min_pixels,
                                 cfg.max_pixels)) == spec["smart_resize_hw"]
        pixel_values, grid_thws = preprocess_image(img, cfg)
        case.expect(f"img{k}.pixel_values", pixel_values)
        case.expect(f"img{k}.grid_thws", grid_thws)

    # Prompts: ids, labels, and the packed pixels of their images.
    for name, spec in case.meta["prompts"].items():
        conversation = spec["conversations"] if "conversations" in spec else spec["text"]
        preface = spec["generation_preface"]
        assert format_prompt(conversation, preface) == spec["formatted_prompt"], name
        input_ids, labels = build_input_ids(tokenizer, conversation, preface)
        assert input_ids.tolist() == spec["input_ids"], name
        if "labels" in spec:
            assert labels.tolist() == spec["labels"], name
        case.expect(f"{name}.input_ids", input_ids)
        case.expect(f"{name}.labels", labels)
        check_image_count(conversation, len(spec["images"]))
        if f"out.{name}.pixel_values" in case.tensors:
            pixel_values, grid_thws = preprocess_images([image(f) for f in spec["images"]], cfg)
            case.expect(f"{name}.pixel_values", pixel_values)
            case.expect(f"{name}.grid_thws", grid_thws)

    # The full-size Ovis-U1-3B constants.
    file_name, full = _full_size_setting(case, cfg)
    pixel_values, grid_thws = preprocess_image(image(file_name), full)
    case.expect("fullconst.pixel_values", pixel_values)
    case.expect("fullconst.grid_thws", grid_thws)

    # Generation-side prep as in the official edit script: target size, resize, cover/crop, [-1, 1] pixels.
    genprep = case.meta["genprep"]
    source = image(genprep["source"])
    width, height = edit_target_size(source.width, source.height)
    assert [height, width] == _entry(genprep, "edit_target_hw")
    und_image, vae_pixel_values = condition_images(resize_for_edit(source), height, width, cfg)
    assert [und_image.height, und_image.width] == _entry(genprep, "understanding_resize_hw")
    case.expect("genprep.vae_pixel_values", vae_pixel_values)
    case.skip_output("genprep.cond_img_ids_before_time",
                     "process_image_aspectratio also returns latent position ids, which the official pipeline "
                     "discards (compute_vae_encodings makes them again); ovis-min builds them only there "
                     "(checked as vae.cond_ids / e2e_edit.vae_cond_ids)")
