"""Properties of the visual encoder and adapter that the golden cases do not pin down on their own."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ovis_min.golden import window_partition
from ovis_min.adapter import VisualEmbedding, VisualHead
from ovis_min.config import AdapterConfig, OvisConfig, VitConfig
from ovis_min.vit import VisionEncoder, attention_runs, position_embeddings, segment_attention, vision_layout

GOLDEN = Path(__file__).parent / "golden"

# A tiny encoder whose windows are 2x2 merged units (4x4 patches); block 1 attends over whole images.
TINY = VitConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2, image_size=56, window_size=56,
                 fullatt_block_indexes=(1,))


def _random_encoder(cfg: VitConfig, seed: int = 0) -> VisionEncoder:
    torch.manual_seed(seed)
    encoder = VisionEncoder(cfg)
    with torch.no_grad():
        for param in encoder.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    return encoder.eval()


def _images(*grids):
    """Random patches for images of (h, w) patches, packed; and their grid_thws."""
    patch_dim = 3 * 14 * 14
    pixels = [torch.randn(h * w, patch_dim) for h, w in grids]
    grid_thws = torch.tensor([[1, h, w] for h, w in grids])
    return pixels, grid_thws


@torch.no_grad()
def test_packing_equals_encoding_each_image_alone():
    encoder = _random_encoder(TINY)
    grids = [(6, 10), (4, 4), (10, 6)]  # partial windows at the edges, one image exactly one window
    pixels, grid_thws = _images(*grids)
    packed = encoder(torch.cat(pixels), grid_thws, all_hidden_states=True)
    start = 0
    for pixel_values, grid in zip(pixels, grid_thws):
        alone = encoder(pixel_values, grid[None], all_hidden_states=True)
        end = start + pixel_values.shape[0]
        torch.testing.assert_close(packed.last_hidden_state[start:end], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
        for packed_hidden, alone_hidden in zip(packed.hidden_states, alone.hidden_states):
            torch.testing.assert_close(packed_hidden[start:end], alone_hidden, atol=1e-5, rtol=1e-5)
        start = end


@torch.no_grad()
def test_frames_of_one_grid_are_encoded_like_separate_images():
    # t frames share the position table and rotary positions and never attend to each other.
    encoder = _random_encoder(TINY)
    pixels, _ = _images((6, 10), (6, 10))
    as_frames = encoder(torch.cat(pixels), torch.tensor([[2, 6, 10]])).last_hidden_state
    as_images = encoder(torch.cat(pixels), torch.tensor([[1, 6, 10], [1, 6, 10]])).last_hidden_state
    torch.testing.assert_close(as_frames, as_images)


def test_position_embeddings_equal_direct_interpolation():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 32 * 32, 8)  # the full-size 32x32 table, narrow channels
    grid_thws = torch.tensor([[1, 20, 44], [1, 74, 74], [1, 32, 32], [1, 4, 8]])
    for method in ("one_dim", "two_dim"):
        cfg = VitConfig(hidden_size=8, num_heads=2, interpolate_pe_method=method)
        got = position_embeddings(pos_embed, vision_layout(grid_thws, cfg), method, cfg.hidden_stride)
        want = []
        for _, h, w in grid_thws.tolist():
            if method == "one_dim":
                pe = F.interpolate(pos_embed.transpose(1, 2), size=h * w, mode="linear", align_corners=False)
                pe = pe[0].T.reshape(h, w, -1)
            else:
                grid = pos_embed.reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
                pe = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
            # raster -> 2x2 unit order
            want.append(pe.reshape(h // 2, 2, w // 2, 2, -1).transpose(1, 2).reshape(h * w, -1))
        torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_segment_attention_equals_block_diagonal_mask():
    torch.manual_seed(0)
    seqlens = [16, 8, 16, 4, 8, 16, 0, 12]  # empty segments occur (official window padding)
    n, heads, head_dim = sum(seqlens), 2, 8
    q, k, v = (torch.randn(n, heads, head_dim) for _ in range(3))
    segment = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    mask = segment[:, None] == segment[None, :]  # (N, N) block diagonal
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    got = segment_attention(q, k, v, attention_runs(seqlens))
    torch.testing.assert_close(got, want.transpose(0, 1).reshape(n, heads * head_dim), atol=1e-5, rtol=1e-5)


def test_window_partition_layout():
    # 3x5 units with 2x2 windows: windows of 4, 4, 2 / 2, 2, 1 units; 2x2 units: one window plus official padding.
    window_index, cu = window_partition(torch.tensor([[1, 6, 10], [1, 4, 4]]), window_units=2, hidden_stride=2)
    assert window_index[:6].tolist() == [0, 1, 5, 6, 2, 3]
    assert sorted(window_index.tolist()) == list(range(19))
    assert cu.diff().tolist() == [16, 16, 8, 8, 8, 4, 16, 0, 0, 0]
    layout = vision_layout(torch.tensor([[1, 6, 10], [1, 4, 4]]), TINY)
    assert torch.equal(layout.unit_order[layout.unit_restore], torch.arange(19))
    # The encoder sorts each frame's windows by size so that equal windows form one batched attention call.
    assert layout.window_runs == ((2, 16), (3, 8), (1, 4), (1, 16))
    assert layout.image_runs == ((1, 60), (1, 16))


@torch.no_grad()
def test_fullatt_none_means_every_block_attends_whole_images():
    pixels, grid_thws = _images((8, 8))  # 4x4 units: four windows
    everywhere = _random_encoder(VitConfig(**{**TINY.__dict__, "fullatt_block_indexes": None}))
    listed = _random_encoder(VitConfig(**{**TINY.__dict__, "fullatt_block_indexes": (0, 1, 2)}))
    windowed = _random_encoder(VitConfig(**{**TINY.__dict__, "fullatt_block_indexes": ()}))
    assert everywhere.full_attention == [True, True, True] and windowed.full_attention == [False, False, False]
    out = everywhere(pixels[0], grid_thws).last_hidden_state
    torch.testing.assert_close(out, listed(pixels[0], grid_thws).last_hidden_state)
    assert not torch.allclose(out, windowed(pixels[0], grid_thws).last_hidden_state, atol=1e-3)


@torch.no_grad()
def test_bfloat16_keeps_dtype_and_stays_close():
    encoder = _random_encoder(TINY)
    pixels, grid_thws = _images((6, 10), (4, 4))
    want = encoder(torch.cat(pixels), grid_thws).last_hidden_state
    got = encoder.to(torch.bfloat16)(torch.cat(pixels).bfloat16(), grid_thws).last_hidden_state
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


@torch.no_grad()
def test_adapter_probabilities_and_indicator_rows():
    cfg = AdapterConfig(visual_vocab_size=24, vision_hidden_size=8, llm_hidden_size=6)
    torch.manual_seed(0)
    head, vte = VisualHead(cfg), VisualEmbedding(cfg)
    vte.weight.copy_(torch.randn_like(vte.weight))
    tokens = head.tokenize(torch.randn(12, 8))  # 12 patches -> 3 merged tokens
    assert tokens.features.shape == (3, 32) and tokens.probs.shape == (3, 24)
    torch.testing.assert_close(tokens.probs.sum(-1), torch.ones(3))
    assert torch.all(tokens.probs[:, -4:] == 0)
    torch.testing.assert_close(vte(tokens.probs), tokens.probs[:, :-4] @ vte.weight[:-4])
    # id -301 shares its row with the last real visual word (V-5); -304 uses V-2.
    assert torch.equal(vte.indicator_embeds()[0], vte.weight[24 - 5])
    assert torch.equal(vte.indicator_embeds()[3], vte.weight[24 - 2])


def test_full_size_state_dict_matches_official_manifest():
    manifest = json.loads((GOLDEN / "full_manifest.json").read_text())
    want = {e["key"]: tuple(e["shape"]) for e in manifest["keys"]
            if e["key"].startswith(("visual_tokenizer.", "vte."))}
    cfg = OvisConfig()
    with torch.device("meta"):
        modules = {"visual_tokenizer.backbone.": VisionEncoder(cfg.vit), "visual_tokenizer.head.": VisualHead(cfg.adapter),
                   "vte.": VisualEmbedding(cfg.adapter)}
    got = {prefix + key: tuple(value.shape) for prefix, module in modules.items()
           for key, value in module.state_dict().items()}
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert got == want


@torch.no_grad()
def test_forward_with_precomputed_layout_is_one_graph():
    # With the layout computed ahead (and cached by the caller) the forward has no host syncs or graph breaks,
    # so torch.compile / CUDA graphs can take it whole.
    encoder = _random_encoder(TINY)
    pixels, grid_thws = _images((6, 10), (4, 4))
    layout = vision_layout(grid_thws, TINY)
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.cat(pixels), grid_thws, layout).last_hidden_state,
                               encoder(torch.cat(pixels), grid_thws, layout).last_hidden_state)
