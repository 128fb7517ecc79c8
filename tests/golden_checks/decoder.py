"""Golden checks of the image decoder: the text refiner (`refiner`) and the MMDiT (`mmdit_t2i`, `mmdit_edit`)."""
import torch

from ovis_min.mmdit import MMDiT, rope_cos_sin, rope_rotations
from ovis_min.refiner import TokenRefiner


def check_refiner(case):
    config = case.config()
    refiner = TokenRefiner(config.refiner).eval()
    refiner.load_state_dict(case.state_dict(case.meta["weight_keys_prefix"]), strict=True)
    trace = {}
    with torch.no_grad():
        tokens, cls = refiner(case.input("x"), trace=trace)
    case.expect("txt_fea", tokens)
    case.expect("txt_fea_avg", cls)
    case.expect("c", trace["c"])
    case.expect("x_in_with_cls", trace["embedded"])
    case.expect("block0_out", trace["block.0"])


def check_mmdit(case):
    config = case.config()
    model = MMDiT(config.mmdit, config.refiner).eval()
    model.load_state_dict(case.state_dict(case.meta["weight_keys_prefix"]), strict=True)
    edit = "cond_img" in case.meta["inputs"]
    assert edit == (case.meta.get("variant", "edit" if edit else "t2i") == "edit"), "variant and inputs disagree"
    img, img_ids, txt, txt_ids, t = (case.input(n) for n in ("img", "img_ids", "txt", "txt_ids", "timesteps"))
    cond_img = case.input("cond_img") if edit else None
    cond_ids = case.input("cond_img_ids") if edit else None

    with torch.no_grad():
        # the official-shaped call ...
        pred = model(img, img_ids, txt, txt_ids, t, cond_img=cond_img, cond_img_ids=cond_ids)
        # ... and the split form a sampler uses, whose intermediates are compared
        txt_tokens, cls = model.encode_text(txt)
        pe = rope_rotations(torch.cat([txt_ids, img_ids] + ([cond_ids] if edit else []), dim=1),
                            config.mmdit.axes_dim, config.mmdit.theta)  # the official 2x2 rotation matrices
        trace = {}
        pred_split = model.predict_velocity(img, txt_tokens, model.text_vector(cls), rope_cos_sin(pe, img.dtype), t,
                                            cond_img=cond_img, trace=trace)

    assert torch.equal(pred, pred_split), "forward and encode_text + rope tables + predict_velocity differ"
    case.expect("pred", pred)
    case.expect("intermediate.txt_fea", txt_tokens)
    case.expect("intermediate.txt_fea_avg", cls)
    case.expect("intermediate.pe", pe)
    case.expect("vec", trace["vec"])
    case.expect("intermediate.double0_img", trace["double.0.img"])
    case.expect("intermediate.double0_txt", trace["double.0.txt"])
    case.expect("intermediate.single0_out", trace["single.0"])
    case.expect("intermediate.final_layer_out", trace["final"])
