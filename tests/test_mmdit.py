"""Properties of the image decoder (refiner.py + mmdit.py) that the golden cases do not cover."""
import json
from pathlib import Path

import pytest
import torch

from golden_checks.decoder import rope_rotations
from ovis_min import flow
from ovis_min.config import MMDiTConfig, RefinerConfig
from ovis_min.mmdit import HeadRMSNorm, MMDiT, apply_rope, rope_tables
from ovis_min.refiner import TokenRefiner

MANIFEST = Path(__file__).parent / "golden" / "full_manifest.json"
PREFIX = "visual_generator.backbone."


def tiny_configs() -> tuple[MMDiTConfig, RefinerConfig]:
    mmdit = MMDiTConfig(vec_in_dim=64, context_in_dim=48, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14))
    refiner = RefinerConfig(context_in_dim=48, hidden_size=64, num_heads=4)
    return mmdit, refiner


def tiny_model(seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(*tiny_configs()).eval()
    with torch.no_grad():  # default init leaves the norm gains at 1 and the CLS token at 0: make them matter
        for name, param in model.named_parameters():
            if name.endswith(".scale") or name.endswith("cls_token"):
                param.normal_(1.0 if name.endswith(".scale") else 0.0, 0.3)
    return model


def grid_ids(batch: int, rows: int, cols: int, frame: float = 0.0) -> torch.Tensor:
    """(batch, rows*cols, 3) ids (frame, row, col) in raster order, as the official sampler builds them."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.full(r.shape, frame), r.float(), c.float()], dim=-1)  # (rows, cols, 3)
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


@pytest.mark.parametrize("edit", [False, True])
def test_forward_equals_split_calls(edit):
    model = tiny_model()
    B, N, L, rows, cols = 2, 12, 5, 3, 4
    img, txt, t = torch.randn(B, N, 16), torch.randn(B, L, 48), torch.tensor([0.9, 0.3])
    img_ids, txt_ids = grid_ids(B, rows, cols), torch.zeros(B, L, 3)
    cond = torch.randn(B, N, 16) if edit else None
    cond_ids = grid_ids(B, rows, cols, frame=1.0) if edit else None
    with torch.no_grad():
        full = model(img, img_ids, txt, txt_ids, t, cond_img=cond, cond_img_ids=cond_ids)
        tokens, cls = model.encode_text(txt)
        # the RoPE table is the same for every row: a batch-1 table must broadcast
        rope = model.rope(torch.cat([txt_ids, img_ids] + ([cond_ids] if edit else []), dim=1)[:1])
        split = model.predict_velocity(img, tokens, model.text_vector(cls), rope, t, cond_img=cond)
    assert full.shape == (B, N, 16)
    torch.testing.assert_close(split, full, rtol=0, atol=1e-6)


def test_rope_tables_rotate_like_the_official_matrices():
    ids = torch.cat([torch.zeros(1, 5, 3), flow.latent_position_ids(3, 4, time_index=1)], dim=1)
    pe = rope_rotations(ids, (4, 14, 14), 10_000)  # the official 2x2 form
    x = torch.randn(2, 3, 17, 32)
    pairs = x.unflatten(-1, (-1, 1, 2))
    official = (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).flatten(-2)  # the official apply_rope
    torch.testing.assert_close(apply_rope(x, *rope_tables(ids, (4, 14, 14), 10_000)), official,
                               rtol=0, atol=1e-6)


def test_rope_is_built_and_applied_in_float32_as_the_official_code():
    """At the positions of a 1024x1024 edit (64x64 tokens twice): the tables are float32, equal to the official `rope`
    (float64 angles and cos/sin, rounded once), and a bf16 q is rotated in float32 and rounded once."""
    ids = torch.cat([torch.zeros(1, 7, 3), flow.latent_position_ids(64, 64),
                     flow.latent_position_ids(64, 64, time_index=1)], dim=1)
    axes_dim, theta = (16, 56, 56), 10_000
    cos, sin = rope_tables(ids, axes_dim, theta)
    assert cos.dtype == sin.dtype == torch.float32
    angles = []
    for axis, dim in enumerate(axes_dim):  # the official construction: float64 frequencies promote the ids
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(torch.einsum("...n,d->...nd", ids[..., axis], omega))
    angles = torch.cat(angles, dim=-1)[:, None]  # (1, 1, S, 64) float64
    assert torch.equal(cos[..., 0::2], angles.cos().float()) and torch.equal(sin[..., 1::2], angles.sin().float())

    x = torch.randn(1, 1, ids.shape[1], 128).bfloat16()
    pairs = x.float().unflatten(-1, (-1, 2))
    c, s = angles.cos().float(), angles.sin().float()
    official = torch.stack([c * pairs[..., 0] - s * pairs[..., 1], s * pairs[..., 0] + c * pairs[..., 1]], -1)
    rotated = apply_rope(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float(), official.flatten(-2), rtol=2 ** -8, atol=1e-6)  # one bf16 rounding


def test_refiner_key_mask_reproduces_unpadded_rows():
    mmdit, refiner_config = tiny_configs()
    torch.manual_seed(0)
    refiner = TokenRefiner(refiner_config).eval()
    with torch.no_grad():
        refiner.cls_token.normal_()
        long, short = torch.randn(1, 9, 48), torch.randn(1, 4, 48)
        padded = torch.cat([long, torch.cat([short, torch.randn(1, 5, 48)], dim=1)])  # garbage padding
        mask = torch.arange(9)[None] < torch.tensor([[9], [4]])
        tokens, cls = refiner(padded, key_mask=mask)
        alone_tokens, alone_cls = refiner(short)
        unpadded_tokens, _ = refiner(long)
        unmasked_tokens, _ = refiner(padded)
    torch.testing.assert_close(tokens[1, :4], alone_tokens[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(cls[1], alone_cls[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens[0], unpadded_tokens[0], rtol=0, atol=1e-5)
    assert (unmasked_tokens[1, :4] - alone_tokens[0]).abs().max() > 1e-3, "padding should matter without the mask"


def test_batched_guidance_branches_with_key_mask_equal_separate_calls():
    """Editing guidance: cond (long text + edit image), no_txt (short text + edit image), no_both (short text,
    no edit image) in ONE forward with right-padded text and dummy edit tokens, against three forwards."""
    model = tiny_model(1)
    N, rows, cols = 12, 3, 4
    lengths = [7, 3, 4]
    with_cond = [True, True, False]
    txts = [torch.randn(1, n, 48) for n in lengths]
    img, cond, t = torch.randn(1, N, 16), torch.randn(1, N, 16), torch.tensor([0.7])
    img_ids, cond_ids = grid_ids(1, rows, cols), grid_ids(1, rows, cols, frame=1.0)

    with torch.no_grad():
        separate = []
        for txt, has_cond in zip(txts, with_cond):
            separate.append(model(img, img_ids, txt, torch.zeros(1, txt.shape[1], 3), t,
                                  cond_img=cond if has_cond else None, cond_img_ids=cond_ids if has_cond else None))

        B, L = len(txts), max(lengths)
        txt = torch.zeros(B, L, 48)
        for i, one in enumerate(txts):
            txt[i, :lengths[i]] = one[0]
        txt_mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)
        key_mask = torch.cat([txt_mask, torch.ones(B, N, dtype=torch.bool),
                              torch.tensor(with_cond)[:, None].expand(B, N)], dim=1)  # (B, L+N+N)
        tokens, cls = model.encode_text(txt, txt_mask)
        rope = model.rope(torch.cat([torch.zeros(1, L, 3), img_ids, cond_ids], dim=1))
        txt_vec = model.text_vector(cls)
        batched = model.predict_velocity(img.expand(B, -1, -1), tokens, txt_vec, rope, t.expand(B),
                                         cond_img=cond.expand(B, -1, -1), key_mask=key_mask)
        unmasked = model.predict_velocity(img.expand(B, -1, -1), tokens, txt_vec, rope, t.expand(B),
                                          cond_img=cond.expand(B, -1, -1))
    for i in range(B):
        torch.testing.assert_close(batched[i], separate[i][0], rtol=0, atol=1e-5)
    assert (unmasked[2] - separate[2][0]).abs().max() > 1e-3, "the dummy edit tokens should matter without the mask"


def test_bfloat16_runs_in_bfloat16_and_stays_close():
    model = tiny_model(2)
    B, N, L = 2, 12, 5
    img, txt, t = torch.randn(B, N, 16), torch.randn(B, L, 48), torch.tensor([0.9, 0.3])
    ids = (grid_ids(B, 3, 4), torch.zeros(B, L, 3))
    with torch.no_grad():
        ref = model(img, ids[0], txt, ids[1], t)
        model = model.to(torch.bfloat16)
        out = model(img.bfloat16(), ids[0], txt.bfloat16(), ids[1], t.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_full_size_layout_matches_the_official_state_dict():
    manifest = json.loads(MANIFEST.read_text())
    official = {e["key"][len(PREFIX):]: tuple(e["shape"]) for e in manifest["keys"] if e["key"].startswith(PREFIX)}
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig(), RefinerConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(official) - set(ours)) == [], "official keys missing"
    assert sorted(set(ours) - set(official)) == [], "keys the checkpoint does not have"
    assert {k for k in ours if ours[k] != official[k]} == set(), "shape mismatches"

    refiner = sum(p.numel() for n, p in model.named_parameters() if n.startswith("txt_in."))
    decoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("txt_in."))
    counts = manifest["param_counts_raw"]
    assert (decoder, refiner) == (counts["vision_decoder_excl_refiner"], counts["refiner_txt_in"])
    # the report's Table 1 as counted in the golden README: 1046.17M and 81.05M
    assert (round(decoder / 1e6, 2), round(refiner / 1e6, 2)) == (1046.17, 81.05)


def test_head_rms_norm_equals_rms_norm():
    norm = HeadRMSNorm(16)
    with torch.no_grad():
        norm.scale.normal_()
    x = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (16,), norm.scale, eps=1e-6))
