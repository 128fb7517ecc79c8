"""Golden checks of the visual encoder (`vit`) and the adapter (`visual_tokenizer`)."""
import dataclasses

import torch

from ovis_min.adapter import VisualEmbedding, VisualHead
from ovis_min.golden import window_partition
from ovis_min.vit import VisionEncoder, rope_angles

BACKBONE = "visual_tokenizer.backbone."


def _encoder(case, cfg) -> VisionEncoder:
    encoder = VisionEncoder(cfg)
    encoder.load_state_dict(case.state_dict(BACKBONE), strict=True)
    return encoder.eval()


@torch.no_grad()
def check_vit(case):
    cfg = case.config().vit
    pixel_values, grid_thws = case.input("pixel_values"), case.input("grid_thws")
    # The case stores one set of outputs per position-table interpolation method ("one_dim.*", "two_dim.*").
    methods = sorted({name.split(".")[0] for name in case.outputs() if name.endswith(".last_hidden_state")})
    assert methods, "vit case has no <method>.last_hidden_state output"
    for method in methods:
        encoder = _encoder(case, dataclasses.replace(cfg, interpolate_pe_method=method))
        case.expect(f"{method}.preprocessor_out", encoder.preprocessor(pixel_values, encoder.layout(grid_thws)))
        out = encoder(pixel_values, grid_thws, all_hidden_states=True)
        for i, hidden in enumerate(out.hidden_states):
            case.expect(f"{method}.hidden_states.{i}", hidden)
        case.expect(f"{method}.last_hidden_state", out.last_hidden_state)

    case.expect("rot_pos_emb", rope_angles(grid_thws, cfg.hidden_size // cfg.num_heads, cfg.hidden_stride))
    window_index, cu_window_seqlens = window_partition(
        grid_thws, cfg.window_size // cfg.hidden_stride // cfg.patch_size, cfg.hidden_stride)
    case.expect("window_index", window_index)
    case.expect("cu_window_seqlens_raw", cu_window_seqlens)


@torch.no_grad()
def check_visual_tokenizer(case):
    cfg = case.config()
    encoder = _encoder(case, cfg.vit)
    head = VisualHead(cfg.adapter)
    head.load_state_dict(case.state_dict("visual_tokenizer.head."), strict=True)
    vte = VisualEmbedding(cfg.adapter)
    vte.load_state_dict(case.state_dict("vte."), strict=True)

    # The head reads the last block output, before post_trunk_norm.
    features = encoder(case.input("pixel_values"), case.input("grid_thws")).last_block
    tokens = head.tokenize(features)
    case.expect("features", tokens.features)
    case.expect("logits", tokens.logits)
    case.expect("tokens", tokens.probs)
    case.expect("vte_embeds", vte(tokens.probs))
    case.expect("indicator_embeds", vte.indicator_embeds())
    if "in.adapter_input" in case.tensors:  # exported sets: the adapter alone, from the stored encoder output
        case.expect("tokens", head.tokenize(case.input("adapter_input")).probs)
        case.expect("features", head.tokenize(case.input("adapter_input")).features)
