"""Golden checks of the image decoder: the text refiner (`refiner`) and the MMDiT (`mmdit_t2i`, `mmdit_edit`).

The intermediates the cases store are taken with forward hooks on the blocks, so the model has no test hooks.
"""
import torch

from ovis_min.golden import recording
from ovis_min.mmdit import MMDiT, timestep_embedding
from ovis_min.refiner import TokenRefiner


def rope_rotations(ids: torch.Tensor, axes_dim: tuple, theta: float) -> torch.Tensor:
    """The official RoPE form `pe`: (B, S, n_axes) ids -> (B, 1, S, D/2, 2, 2) float32 rotation matrices
    [[cos, -sin], [sin, cos]], one per adjacent channel pair, as the official `EmbedND` returns them."""
    rotations = []
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
        angles = ids[..., axis].float()[..., None] * freqs  # (B, S, dim/2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        rotations.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))  # (B, S, dim/2, 2, 2)
    return torch.cat(rotations, dim=-3).unsqueeze(1)


def check_refiner(case):
    config = case.config()
    refiner = TokenRefiner(config.refiner).eval()
    refiner.load_state_dict(case.state_dict(case.meta["weight_keys_prefix"]), strict=True)
    first_block = refiner.individual_token_refiner.blocks[0]
    with torch.no_grad(), recording({"c": refiner.c_embedder, "block0": first_block}) as outputs, \
            recording({"block0": first_block}, inputs=True) as inputs:
        tokens, cls = refiner(case.input("x"))
    case.expect("txt_fea", tokens)
    case.expect("txt_fea_avg", cls)
    case.expect("c", outputs["c"])
    case.expect("x_in_with_cls", inputs["block0"][0])  # the first block's x: [CLS, input_embedder(txt)]
    case.expect("block0_out", outputs["block0"])


def check_mmdit(case):
    config = case.config()
    model = MMDiT(config.mmdit, config.refiner).eval()
    model.load_state_dict(case.state_dict(case.meta["weight_keys_prefix"]), strict=True)
    edit = "cond_img" in case.meta["inputs"]
    assert edit == (case.meta.get("variant", "edit" if edit else "t2i") == "edit"), "variant and inputs disagree"
    img, img_ids, txt, txt_ids, t = (case.input(n) for n in ("img", "img_ids", "txt", "txt_ids", "timesteps"))
    cond_img = case.input("cond_img") if edit else None
    cond_ids = case.input("cond_img_ids") if edit else None
    ids = torch.cat([txt_ids, img_ids] + ([cond_ids] if edit else []), dim=1)
    blocks = {f"double{i}": block for i, block in enumerate(model.double_blocks)}
    blocks.update({f"single{i}": block for i, block in enumerate(model.single_blocks)}, final=model.final_layer)

    with torch.no_grad():
        # the official-shaped call ...
        pred = model(img, img_ids, txt, txt_ids, t, cond_img=cond_img, cond_img_ids=cond_ids)
        # ... and the split form a sampler uses, whose intermediates are compared
        txt_tokens, cls = model.encode_text(txt)
        rope = model.rope(ids)
        with recording(blocks) as outputs, recording({"final": model.final_layer}, inputs=True) as inputs:
            pred_split = model.predict_velocity(img, txt_tokens, model.text_vector(cls), rope, t, cond_img=cond_img)

    assert torch.equal(pred, pred_split), "forward and encode_text + rope tables + predict_velocity differ"
    case.expect("pred", pred)
    case.expect("intermediate.txt_fea", txt_tokens)
    case.expect("intermediate.txt_fea_avg", cls)
    # the official RoPE form, 2x2 matrices (test_mmdit checks that our tables rotate as these do)
    case.expect("intermediate.pe", rope_rotations(ids, config.mmdit.axes_dim, config.mmdit.theta))
    case.expect("vec", inputs["final"][1])  # the modulation vector every block (and the final layer) gets
    # every block's output where the case stores it (the shared set: the first of each kind)
    stored = set(case.outputs())
    for i in range(len(model.double_blocks)):
        for j, stream in enumerate(("img", "txt")):
            if f"intermediate.double{i}_{stream}" in stored or i == 0:
                case.expect(f"intermediate.double{i}_{stream}", outputs[f"double{i}"][j])
    for i in range(len(model.single_blocks)):
        if f"intermediate.single{i}_out" in stored or i == 0:
            case.expect(f"intermediate.single{i}_out", outputs[f"single{i}"])
    case.expect("intermediate.final_layer_out", outputs["final"])
    if "intermediate.timestep_embedding" in stored:
        case.expect("intermediate.timestep_embedding", timestep_embedding(t))

