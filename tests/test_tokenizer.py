"""The tokenizer in either form: tokenizer.json, or the slow files built into the same fast tokenizer."""
import unicodedata

import pytest

from ovis_min.prompt import Tokenizer, TokenizerNotFound
from ovis_min.tiny import ADDED_TOKENS, SPECIAL_TOKENS, write_tiny_checkpoint


def corpus() -> list[str]:
    pieces = ["hello", "Hello World", "the image of a cat", "日本語のテキスト", "中文，标点。", "한국어", "😀🎉👍🏽",
              "👨‍👩‍👧", "e\u0301", "café", "Cafe\u0301", "1234567890" * 3, "3.14159", "x = [i ** 2 for i in range(10)]",
              "def f(a, b):\n\treturn a+b\n", "\t\t\tindent", "\n\n\n", "a\r\nb", "  leading", "trailing   ",
              "it's", "We'll", "I'M", "<image>", "<image>\nDescribe it.", "Image 1: <image>\nImage 2: <image>\n",
              "<think>\n\n</think>\n\n", "naïve façade", "Ünïcödé", "ÿ\x00\x01\x7f", "русский текст", "ελληνικά",
              "עברית", "العربية", "emoji🙂text", "mixed 日本 text 123", "$$$", "@user #tag", "http://x.y/z?q=1",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n"]
    texts = list(pieces)
    for i, a in enumerate(pieces):  # pairs, so splits and merges meet at every kind of boundary
        texts.append(a + " " + pieces[(i * 7 + 3) % len(pieces)])
        texts.append(pieces[(i * 5 + 1) % len(pieces)] + a)
        texts.append(a * 3)
        texts.append(f"<|im_start|>user\n<image>\n{a}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for token in (*SPECIAL_TOKENS, *ADDED_TOKENS):
        texts += [token, f"x{token}y", f" {token} ", token * 2]
    return texts


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    fast = write_tiny_checkpoint(root / "fast", shards=1)
    slow = write_tiny_checkpoint(root / "slow", shards=1, slow_tokenizer=True)
    assert not (slow / "tokenizer.json").exists() and (slow / "merges.txt").is_file()
    return Tokenizer(fast), Tokenizer(slow)


def test_both_forms_give_the_same_ids_and_round_trip(both):
    fast, slow = both
    texts = corpus()
    assert len(texts) >= 200
    for text in texts:
        ids = fast.encode(text)
        assert slow.encode(text) == ids, text
        nfc = unicodedata.normalize("NFC", text)  # both normalise to NFC, as Qwen2's tokenizer does
        assert fast.decode(ids, skip_special_tokens=False) == nfc == slow.decode(ids, skip_special_tokens=False)
    assert (fast.eos_token_id, fast.pad_token_id, fast.token_id("<|im_start|>")) == \
        (slow.eos_token_id, slow.pad_token_id, slow.token_id("<|im_start|>"))
    assert len(fast) == len(slow)


def test_golden_slow_files_match_its_tokenizer_json(tmp_path):
    golden = __import__("pathlib").Path(__file__).resolve().parent / "golden" / "tiny_tokenizer"
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((golden / name).read_bytes())
    fast, slow = Tokenizer(golden), Tokenizer(tmp_path)
    assert all(fast.encode(text) == slow.encode(text) for text in corpus())


def test_neither_form_complete_names_what_is_missing(tmp_path):
    slow = write_tiny_checkpoint(tmp_path / "slow", shards=1, slow_tokenizer=True)
    (slow / "merges.txt").unlink()
    with pytest.raises(TokenizerNotFound, match=r"tokenizer.json.*missing: merges.txt"):
        Tokenizer(slow)
