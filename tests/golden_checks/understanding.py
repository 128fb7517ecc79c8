"""Golden checks of the whole understanding path: the multimodal merge and greedy answering."""
import torch

from golden_checks.common import load_model
from ovis_min.decode import generate
from ovis_min.prompt import Tokenizer


def check_merge(case):
    """merge_inputs on a 2-row batch with 1 and 2 images, left and right padded."""
    model = load_model(case)
    ids, mask = case.input("input_ids"), case.input("attention_mask")
    pixels, grids = case.input("pixel_values"), case.input("grid_thws")
    with torch.no_grad():
        for side, left in (("left", True), ("right", False)):
            merged = model.merge_inputs(ids, mask, pixels, grids, left_padding=left)
            case.expect(f"{side}.inputs_embeds", merged.embeds)
            case.expect(f"{side}.attention_mask", merged.attention_mask)
            case.expect(f"{side}.labels", merged.labels)
            case.expect(f"{side}.input_img_labels", merged.image_mask)


def check_understanding(case):
    """The official test_img_to_txt.py path: merged prompt, its logits, and greedy new tokens."""
    model = load_model(case)
    tokenizer = Tokenizer(case.tokenizer_dir)
    ids, mask = case.input("input_ids"), case.input("attention_mask")
    with torch.no_grad():
        merged = model.merge_inputs(ids, mask, case.input("pixel_values"), case.input("grid_thws"))
        case.expect("merged_inputs_embeds", merged.embeds)
        case.expect("merged_attention_mask", merged.attention_mask)
        case.expect("prompt_logits", model.llm(inputs_embeds=merged.embeds, attention_mask=merged.attention_mask))
        max_new = case.output("generated_ids").shape[1]
        for name, eos in (("generated_ids", tokenizer.eos_token_id), ("generated_ids_noeos", None)):
            new_ids = generate(model.llm, merged.embeds, merged.attention_mask, max_new_tokens=max_new,
                               eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            case.expect(name, new_ids)
