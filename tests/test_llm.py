"""Properties of the Qwen3 decoder (ovis_min/llm.py) and its decoding loop (ovis_min/decode.py) that the golden
forward alone does not pin down: KV-cache decoding, left padding, the image-generation condition, sampling, weight
tying and the full-size layout."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from golden_case import GOLDEN_DIR, GoldenCase
from ovis_min.config import LLMConfig
from ovis_min import decode as decoding, llm
from ovis_min.decode import attended_length, cache_length, generate, next_token
from ovis_min.llm import Qwen3

TINY = LLMConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_position_embeddings=256)


def tiny_model(seed: int = 0, cfg: LLMConfig = TINY) -> Qwen3:
    torch.manual_seed(seed)
    model = Qwen3(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a misplaced norm shows
                param.uniform_(0.5, 1.5)
        # Smaller than nn.Embedding's N(0, 1), so the tied head gives logits of order 1 and sampling has choices.
        model.model.embed_tokens.weight.normal_(0.0, 0.1)
    return model


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, D) prompts into (B, L, D) with zeros on the left, and the (B, L) valid mask."""
    length = max(row.shape[0] for row in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        embeds[i, length - row.shape[0]:] = row
        mask[i, length - row.shape[0]:] = True
    return embeds, mask


def random_prompts(model: Qwen3, lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.no_grad():
        rows = [model.model.embed_tokens(torch.randint(0, model.cfg.vocab_size, (n,))) for n in lengths]
    return left_padded(rows)


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def test_cached_greedy_decode_equals_full_reforward():
    model = tiny_model()
    embeds, mask = random_prompts(model, [9, 5, 7])
    new = generate(model, embeds, mask, max_new_tokens=12)
    assert new.shape == (3, 12)
    with torch.no_grad():
        for t in range(new.shape[1]):
            seq = torch.cat([embeds, model.model.embed_tokens(new[:, :t])], dim=1)
            seq_mask = torch.cat([mask, torch.ones(3, t, dtype=torch.bool)], dim=1)
            logits = model(inputs_embeds=seq, attention_mask=seq_mask, position_ids=hf_positions(seq_mask))
            assert torch.equal(logits[:, -1].argmax(-1), new[:, t]), f"step {t}"


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model()
    embeds, mask = random_prompts(model, [10, 3, 6])
    batch = generate(model, embeds, mask, max_new_tokens=10)
    for i in range(3):
        alone = generate(model, embeds[i:i + 1][:, mask[i]], max_new_tokens=10)
        assert torch.equal(batch[i:i + 1], alone), f"row {i}"


def test_a_large_enough_cache_is_reused_and_cleared():
    """A generation that fits the cache left by an earlier one keeps that memory (a compiled decode step keeps
    its shapes, a CUDA graph its addresses) and answers as a fresh model does, whatever the cache held."""
    model, fresh = tiny_model(), tiny_model()
    embeds, mask = random_prompts(model, [6])
    model.setup_cache(1, cache_length(3000))
    cache = model.model.layers[0].self_attn.k_cache
    for layer in model.model.layers:
        layer.self_attn.k_cache.fill_(float("nan"))
        layer.self_attn.v_cache.fill_(float("nan"))
    assert torch.equal(generate(model, embeds, mask, max_new_tokens=10),
                       generate(fresh, embeds, mask, max_new_tokens=10))
    assert model.model.layers[0].self_attn.k_cache is cache and model.cache_len() == cache_length(3000)


def test_the_attended_prefix_is_never_the_whole_cache():
    # so the prefix is always a strided view of the cache, never the contiguous whole (one compiled graph)
    for tokens in range(1, 3 * decoding.KV_BLOCK + 2):
        last_slot = tokens - 1
        assert tokens <= attended_length(last_slot) < cache_length(tokens)


def test_the_decode_step_traces_as_one_graph():
    """torch.compile takes `decode_step` whole: no graph break (the CPU kernel switch is entered around the call,
    in decode.py, and not inside the step, where dynamo cannot trace it and would run the step eagerly)."""
    model = tiny_model()
    model.setup_cache(2, cache_length(8))
    key_mask = torch.zeros(2, attended_length(6), dtype=torch.bool)
    key_mask[:, :7] = True
    with decoding.matrix_vector_kernels(torch.device("cpu")):
        explained = torch._dynamo.explain(model.decode_step)(torch.tensor([[3], [5]]), torch.tensor([[6], [6]]),
                                                             torch.tensor([6]), key_mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_attention_does_not_depend_on_the_memory_order_of_the_sdpa_output(monkeypatch):
    """CUDA's masked SDPA kernel returns its (B, H, L, hd) output laid out as (B, L, H, hd)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.rand(2, 1, 3, 5) > 0.3
    mask[..., 0] = True
    mask = llm.fold_heads(mask, 2)
    expected = llm.attention(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(llm.attention(q, k, v, mask), expected, rtol=0, atol=0)


def test_eos_stops_rows_and_pads_them():
    model = tiny_model()
    embeds, mask = random_prompts(model, [8, 6])
    free = generate(model, embeds, mask, max_new_tokens=10)
    eos, pad = [int(free[0, 2]), int(free[1, 4])], 96  # both rows finish within 5 steps
    steps = []
    stopped = generate(model, embeds, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad,
                        on_token=steps.append)
    expected, ends = free.clone(), []
    for row in expected:
        first = int(torch.isin(row, torch.tensor(eos)).nonzero()[0])
        row[first + 1:] = pad
        ends.append(first + 1)
    assert max(ends) < free.shape[1]
    assert torch.equal(stopped, expected[:, :max(ends)])
    assert torch.equal(torch.stack(steps, 1), stopped)  # streaming sees exactly the returned steps
    assert torch.equal(generate(model, embeds, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad), stopped)


def test_condition_states_equal_full_forward_hidden_states():
    model = tiny_model()
    embeds, mask = random_prompts(model, [7, 4])
    with torch.no_grad():
        states = model.hidden_states(inputs_embeds=embeds, attention_mask=mask)
        last, second_last = model.condition_states(embeds, mask)
        logits = model(inputs_embeds=embeds, attention_mask=mask)
    assert len(states) == TINY.num_layers + 1
    torch.testing.assert_close(last[mask], states[-1][mask], rtol=0, atol=0)
    torch.testing.assert_close(second_last[mask], states[-2][mask], rtol=0, atol=0)
    torch.testing.assert_close(logits, model.lm_head(states[-1]), rtol=0, atol=0)


def test_condition_states_with_one_layer_returns_the_embeddings_as_second_last():
    cfg = LLMConfig(**{**TINY.__dict__, "num_layers": 1})
    model = tiny_model(cfg=cfg)
    embeds, mask = random_prompts(model, [5])
    with torch.no_grad():
        last, second_last = model.condition_states(embeds, mask)
    assert torch.equal(second_last, embeds)


def test_top_p_sampling_is_seeded_and_top_p_zero_is_greedy():
    model = tiny_model()
    embeds, mask = random_prompts(model, [6, 9])
    runs = [generate(model, embeds, mask, max_new_tokens=16, temperature=1.3, top_p=0.9,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, embeds, mask, max_new_tokens=16, temperature=1.3, top_p=0.9,
                     generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)
    greedy = generate(model, embeds, mask, max_new_tokens=16)
    narrow = generate(model, embeds, mask, max_new_tokens=16, temperature=1.3, top_p=0.0,
                      generator=torch.Generator().manual_seed(7))
    assert torch.equal(narrow, greedy)


def test_top_p_and_top_k_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    generator = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, 1.0, top_p=0.7, generator=generator)) for _ in range(200)}
    assert picks == {1, 2}  # 0.5 < 0.7 <= 0.5 + 0.3
    picks = {int(next_token(logits, 1.0, top_k=3, generator=generator)) for _ in range(200)}
    assert picks == {1, 2, 3}
    assert int(next_token(logits)) == 1


def test_official_understanding_decode():
    """The official greedy answer and prompt logits, from the official merged embeddings."""
    if not (GOLDEN_DIR / "understanding.json").is_file():
        pytest.skip("no understanding case")
    case = GoldenCase(GOLDEN_DIR, "understanding")
    model = Qwen3(case.config().llm).eval()
    model.load_state_dict(case.state_dict("llm."))
    config = json.loads((case.tokenizer_dir / "tokenizer_config.json").read_text())
    ids = {token["content"]: int(i) for i, token in config["added_tokens_decoder"].items()}
    embeds, mask = case.output("merged_inputs_embeds"), case.output("merged_attention_mask")
    with torch.no_grad():
        case.expect("prompt_logits", model(inputs_embeds=embeds, attention_mask=mask))
    steps = case.meta["max_new_tokens"]
    case.expect("generated_ids", generate(model, embeds, mask, steps, eos_token_id=ids[config["eos_token"]],
                                          pad_token_id=ids[config["pad_token"]]))
    case.expect("generated_ids_noeos", generate(model, embeds, mask, steps))


def test_tied_head_loads_with_and_without_lm_head_and_when_nested():
    source = tiny_model(seed=3)
    full = source.state_dict()
    assert "lm_head.weight" in full
    without_head = {k: v for k, v in full.items() if k != "lm_head.weight"}
    for state in (full, without_head):
        for on_meta in (False, True):
            with torch.device("meta" if on_meta else "cpu"):
                model = Qwen3(TINY)
            model.load_state_dict(state, strict=True, assign=on_meta)
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert torch.equal(model.lm_head.weight, full["model.embed_tokens.weight"])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = Qwen3(TINY)

    outer = Outer()
    outer.load_state_dict({f"llm.{k}": v for k, v in without_head.items()}, strict=True)
    assert outer.llm.lm_head.weight is outer.llm.model.embed_tokens.weight
    assert torch.equal(outer.llm.lm_head.weight, full["model.embed_tokens.weight"])


def test_untied_head_is_its_own_parameter():
    cfg = LLMConfig(**{**TINY.__dict__, "tie_word_embeddings": False})
    model = Qwen3(cfg)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})


def test_full_size_layout_matches_official_manifest():
    manifest = json.loads((Path(__file__).parent / "golden" / "full_manifest.json").read_text())
    official = {e["key"][len("llm."):]: tuple(e["shape"]) for e in manifest["keys"] if e["key"].startswith("llm.")}
    llm = manifest["config"]["llm_config"]
    cfg = LLMConfig()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        llm["vocab_size"], llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"],
        llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"], llm["rope_theta"],
        llm["rms_norm_eps"], llm["tie_word_embeddings"])
    with torch.device("meta"):
        model = Qwen3(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == manifest["param_counts_raw"]["llm"]  # tied head once


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_equals_sdpa_with_repeated_kv(masked):
    """The LLM folds the query heads that share a KV head into the query length: same result as repeating KV."""
    F = torch.nn.functional
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    key_mask = torch.arange(50)[None] < torch.tensor([[50], [31]])
    k2, v2 = k[:, :1].expand(2, 1, 50, 16), v[:, :1].expand(2, 1, 50, 16)
    causal = torch.ones(50, 50, dtype=torch.bool).tril().expand(2, 1, 50, 50)
    if masked:
        causal = causal & key_mask[:, None, None] | torch.eye(50, dtype=torch.bool)
    reference = F.scaled_dot_product_attention(q, k2.expand(2, 3, 50, 16), v2.expand(2, 3, 50, 16), attn_mask=causal)
    folded = llm.fold_heads(causal, 3)
    torch.testing.assert_close(llm.attention(q, k2, v2, folded), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(llm.attention(q, k2, v2, llm.attention_bias(folded, q.dtype)), reference,
                               rtol=0, atol=1e-5)
