"""Prompts: the tokenizer, Ovis-U1's Qwen3 chat format with image placeholders, and the scripts' prompt strings.

Facts from the official Ovis-U1 code: the special ids and `Qwen3ConversationFormatter` (configuration_ovis_u1.py),
`preprocess_inputs` and `construct_image_placeholders` (modeling_ovis_u1.py), and the prompt strings of
test_img_to_txt.py, test_multi_img_to_txt.py, test_txt_to_img.py and test_img_edit.py.

A turn is tokenized on its own, each `<image>` becoming [-301, -300, -302]; the model later swaps -301/-302 for
indicator embeddings and -300 for the image's visual tokens. Labels are IGNORE_ID except the assistant answer.
"""
import json
from pathlib import Path

import tokenizers
import torch
from PIL import Image

from ovis_min.config import PreprocessConfig
from ovis_min.files import read_json
from ovis_min.model import IGNORE_ID, IMAGE_ATOM_ID, IMAGE_INDICATOR_IDS
from ovis_min.preprocess import preprocess_images

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER_IDS = (IMAGE_INDICATOR_IDS[0], IMAGE_ATOM_ID, IMAGE_INDICATOR_IDS[1])

# Qwen3 chat markup, as the official formatter writes it.
ROLE_PREFIXES = {
    "system": "<|im_start|>system\n",
    "human": "<|im_start|>user\n",
    "gpt": "<|im_start|>assistant\n",
    "ignored_gpt": "<|im_start|>assistant\n",  # an assistant turn that is never a training target
}
ROLE_ALIASES = {"user": "human", "assistant": "gpt"}  # chat-template spellings of the same roles
IM_END = "<|im_end|>\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # prefilled in every assistant turn unless thinking is enabled

# Prompt strings of the official scripts.
# test_img_to_txt.py: "<image>\n" + question.
UNDERSTANDING_PREFIX = IMAGE_TOKEN + "\n"
# test_txt_to_img.py: this prefix + the caption, asked about a blank white image.
T2I_PREFIX = ("<image>\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
              "and spatial relationships of the objects:")
# test_txt_to_img.py / test_img_edit.py: the unconditional prompt, with the blank image or the input image.
UNCONDITIONAL_PROMPT = "<image>\nGenerate an image."
# test_img_edit.py: "<image>\n" + instruction.strip().
EDIT_PREFIX = IMAGE_TOKEN + "\n"


def understanding_prompt(question: str) -> str:
    return UNDERSTANDING_PREFIX + question


def multi_image_prompt(question: str, num_images: int) -> str:
    """test_multi_img_to_txt.py: one "Image k: <image>" line per image, then the question."""
    lines = [f"Image {k + 1}: {IMAGE_TOKEN}" for k in range(num_images)]
    return "\n".join(lines) + "\n" + question


def question_prompt(question: str, num_images: int) -> str:
    """A question about `num_images` images in the form of the official scripts; a question that places its own
    `<image>` markers (or has no image) is kept as it is."""
    if IMAGE_TOKEN in question or num_images == 0:
        return question
    return understanding_prompt(question) if num_images == 1 else multi_image_prompt(question, num_images)


def t2i_prompt(caption: str) -> str:
    return T2I_PREFIX + caption


def edit_prompt(instruction: str) -> str:
    return EDIT_PREFIX + instruction.strip()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
TOKENIZER_FILE = "tokenizer.json"  # the fast form: everything in one file
# The slow form, as transformers' Qwen2Tokenizer reads it: the byte-level vocabulary and merges, and the added
# tokens with their ids and flags (tokenizer_config.json's added_tokens_decoder, and/or added_tokens.json).
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
SLOW_TOKENIZER_EXTRAS = ("added_tokens.json", "special_tokens_map.json")
# Qwen2's pre-tokenizer split (its tokenizer.json, and transformers' Qwen2 slow-to-fast conversion).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    """Tokenizer files that cannot be read; the message names the file."""


class TokenizerNotFound(FileNotFoundError):
    """Neither form of the tokenizer is complete; the message names the missing files."""


def missing_tokenizer_files(directory: Path) -> list[str]:
    """[] when `directory` holds a complete tokenizer in either form, else the files that would complete the
    slow form (the fast form is the single tokenizer.json)."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return []
    return [name for name in SLOW_TOKENIZER_FILES if not (directory / name).is_file()]


def _read_json(path: Path, kind: type = dict):
    return read_json(path, kind, TokenizerError, "download it again")


def _slow_added_tokens(directory: Path) -> list[dict]:
    """The added tokens of the slow form, as tokenizer.json lists them: id, content and the five flags."""
    config = _read_json(directory / "tokenizer_config.json")
    special_map = (_read_json(directory / "special_tokens_map.json")
                   if (directory / "special_tokens_map.json").is_file() else {})
    specials = set()
    for value in [*special_map.values(), *(special_map.get("additional_special_tokens") or [])]:
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            specials.add(value)
    by_id = {}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{directory / 'tokenizer_config.json'}: added_tokens_decoder is not an object")
    for key, entry in decoder.items():
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise TokenizerError(f"{directory / 'tokenizer_config.json'}: added_tokens_decoder entry {key!r} is not "
                                 "an id with a {'content': ...} object")
        by_id[int(key)] = {"id": int(key), "content": entry["content"],
                           **{flag: bool(entry.get(flag, False)) for flag in ("single_word", "lstrip", "rstrip")},
                           "normalized": bool(entry.get("normalized", not entry.get("special", False))),
                           "special": bool(entry.get("special", False))}
    if (directory / "added_tokens.json").is_file():  # content -> id; the flags come from the special-token map
        for content, token_id in _read_json(directory / "added_tokens.json").items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise TokenizerError(f"{directory / 'added_tokens.json'}: id {token_id!r} of {content!r} is not an id")
            by_id.setdefault(token_id, {"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": content in specials})
    return [by_id[i] for i in sorted(by_id)]


def slow_tokenizer_json(directory: Path | str) -> str:
    """The tokenizer.json document that transformers' conversion of Qwen2's slow tokenizer files makes: byte-level
    BPE over the vocabulary and merges, NFC normalisation, Qwen2's split pattern, byte-level decoding, and the added
    tokens at their ids."""
    directory = Path(directory)
    vocab = _read_json(directory / "vocab.json")
    if not all(isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) for t, i in vocab.items()):
        raise TokenizerError(f"{directory / 'vocab.json'}: expected an object of token -> id")
    try:
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{directory / 'merges.txt'}: cannot be read ({error}); download it again") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise TokenizerError(f"{directory / 'merges.txt'}: line {number} is not two symbols separated by a "
                                 f"space: {line[:40]!r}")
        merges.append(pair)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    document = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _slow_added_tokens(directory),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(document, ensure_ascii=False)


def load_tokenizer(directory: Path | str) -> tokenizers.Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json when present, else the same fast tokenizer built from the slow
    files. Raises TokenizerNotFound naming what is missing, TokenizerError naming what cannot be read."""
    directory = Path(directory)
    missing = missing_tokenizer_files(directory)
    if missing:
        raise TokenizerNotFound(f"no tokenizer in {directory}: expected {TOKENIZER_FILE}, or the slow tokenizer files "
                             f"{', '.join(SLOW_TOKENIZER_FILES)} (missing: {', '.join(missing)})")
    fast = directory / TOKENIZER_FILE
    try:
        if fast.is_file():
            return tokenizers.Tokenizer.from_file(str(fast))
        return tokenizers.Tokenizer.from_str(slow_tokenizer_json(directory))
    except TokenizerError:
        raise
    except Exception as error:  # the tokenizers library raises a bare Exception on a malformed document
        where = fast if fast.is_file() else directory / "vocab.json"
        raise TokenizerError(f"{where}: not a tokenizer the tokenizers library can read ({error}); download it "
                             "again") from None


def _special_token_names(directory: Path) -> dict[str, str]:
    """Special-token strings from tokenizer_config.json, overridden by special_tokens_map.json (HF's order)."""
    names = {}
    for file_name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / file_name
        if not path.is_file():
            continue
        entries = _read_json(path)
        for key in ("eos_token", "pad_token"):
            value = entries.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value and isinstance(value, str):
                names[key] = value
    return names


class Tokenizer:
    """The checkpoint's tokenizer (byte-level BPE, from tokenizer.json or the slow files), used as HF's fast
    tokenizer would be.

    `encode` never adds special tokens (the chat markup is written out as text) and never truncates or pads.
    """

    def __init__(self, directory: "str | Path"):
        directory = Path(directory)
        self.directory = directory
        self.backend = load_tokenizer(directory)
        # HF switches off any truncation/padding stored in the file unless asked for.
        self.backend.no_truncation()
        self.backend.no_padding()
        names = _special_token_names(directory)
        self.eos_token = names.get("eos_token", "<|im_end|>")
        self.pad_token = names.get("pad_token", "<|endoftext|>")
        self.eos_token_id = self.token_id(self.eos_token)
        self.pad_token_id = self.token_id(self.pad_token)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the tokenizer of {self.directory}")
        return token_id

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: "list[int] | torch.Tensor", skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Conversation format
# ---------------------------------------------------------------------------------------------------------------
def _as_turns(text_or_conversation: "str | list[dict]") -> list[tuple[str, str]]:
    """A question string or a list of turns ({"from", "value"} or {"role", "content"}) -> [(role, text)]."""
    if isinstance(text_or_conversation, str):
        return [("human", text_or_conversation)]
    if not isinstance(text_or_conversation, (list, tuple)):
        raise ValueError(f"expected a string or a list of turns, got {type(text_or_conversation).__name__}")
    if not text_or_conversation:
        raise ValueError("the conversation is empty: give at least one turn")
    turns = []
    for k, turn in enumerate(text_or_conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k} must be a dict, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLE_PREFIXES or not isinstance(text, str):
            raise ValueError(f"turn {k} must have a role in {sorted(ROLE_PREFIXES) + sorted(ROLE_ALIASES)} "
                             f"('from' or 'role') and a text ('value' or 'content'), got {turn!r}")
        turns.append((role, text))
    return turns


def turn_texts(text_or_conversation: "str | list[dict]", generation_preface: str | None,
                enable_thinking: bool) -> list[tuple[str, str]]:
    """[(role, formatted text of the turn)]. A non-None `generation_preface` opens a final, unfinished assistant
    turn (inference); with None every turn is closed by <|im_end|>\\n (generation conditions, training)."""
    turns = _as_turns(text_or_conversation)
    if generation_preface is not None:
        turns.append(("gpt", generation_preface))
    texts = []
    for k, (role, message) in enumerate(turns):
        text = ROLE_PREFIXES[role]
        if role == "gpt" and not enable_thinking:
            text += EMPTY_THINK
        text += message
        if k < len(turns) - 1 or generation_preface is None:
            text += IM_END
        texts.append((role, text))
    return texts


def _encode_with_images(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokens of `text`, each `<image>` replaced by the placeholder ids; text between markers is encoded apart."""
    ids = []
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            ids.extend(IMAGE_PLACEHOLDER_IDS)
        ids.extend(tokenizer.encode(chunk))
    return ids


def build_input_ids(tokenizer: Tokenizer, text_or_conversation: "str | list[dict]",
                    generation_preface: str | None = "",
                    enable_thinking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (L,) long, labels (L,) long) exactly as the official formatter + preprocess_inputs build them.

    Labels are IGNORE_ID except, when generation_preface is None, the tokens of each assistant ("gpt") answer
    and its <|im_end|>; the prefilled "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n" is not a target, and
    the "\\n" after the last <|im_end|> is dropped altogether.
    """
    answer_start = len(tokenizer.encode(ROLE_PREFIXES["gpt"] + ("" if enable_thinking else EMPTY_THINK)))
    input_ids, labels = [], []
    turns = turn_texts(text_or_conversation, generation_preface, enable_thinking)
    for role, text in turns:
        ids = _encode_with_images(tokenizer, text)
        turn_labels = [IGNORE_ID] * len(ids)
        if role == "gpt" and generation_preface is None:
            # The final "\n" after <|im_end|> is not worth learning, so [:-1].
            turn_labels[answer_start:-1] = [t if t >= 0 else IGNORE_ID for t in ids[answer_start:-1]]
        input_ids += ids
        labels += turn_labels
    if turns[-1][0] == "gpt" and generation_preface is None:
        # A training sample ends right after the answer's <|im_end|>.
        input_ids.pop()
        labels.pop()
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Checks and the whole official `preprocess_inputs`
# ---------------------------------------------------------------------------------------------------------------
def count_images(text_or_conversation: "str | list[dict]") -> int:
    """Number of `<image>` markers in a prompt or conversation."""
    return sum(text.count(IMAGE_TOKEN) for _, text in _as_turns(text_or_conversation))


def check_image_count(text_or_conversation: "str | list[dict]", num_images: int) -> None:
    """The official code silently ignores extra images and, in the scripts, replaces missing ones with a mock
    image; here both are errors."""
    markers = count_images(text_or_conversation)
    if markers != num_images:
        raise ValueError(f"the prompt has {markers} {IMAGE_TOKEN} marker(s) but {num_images} image(s) were given: "
                         f"put one {IMAGE_TOKEN} in the text where each image belongs, in order")


def check_length(input_ids: torch.Tensor, grid_thws: torch.Tensor | None, hidden_stride: int,
                 max_length: int) -> int:
    """Length of the sequence the LLM will see (each -300 replaced by t*h*w/stride^2 visual tokens); an error if
    it exceeds `max_length` (the official code would silently cut it to multimodal_max_length)."""
    visual = 0 if grid_thws is None else int(grid_thws.prod(dim=-1).sum()) // hidden_stride ** 2
    atoms = int((input_ids == IMAGE_ATOM_ID).sum())
    length = input_ids.numel() - atoms + visual
    if length > max_length:
        raise ValueError(f"prompt is {length} tokens long with its images ({visual} visual tokens), more than "
                         f"max_length={max_length}: shorten the text, or lower max_pixels to use fewer image tokens")
    return length


def preprocess_inputs(tokenizer: Tokenizer, text_or_conversation: "str | list[dict]", images: list[Image.Image],
                      cfg: PreprocessConfig, generation_preface: str | None = "", min_pixels: int | None = None,
                      max_pixels: int | None = None, max_length: int | None = None, enable_thinking: bool = False,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids (L,), labels (L,), pixel_values (N, D) or None, grid_thws (num_images, 3) or None).

    The official `preprocess_inputs`: images are matched to the `<image>` markers in order and packed one
    after the other. `max_length` (e.g. multimodal_max_length) bounds the length with visual tokens.
    """
    check_image_count(text_or_conversation, len(images))
    input_ids, labels = build_input_ids(tokenizer, text_or_conversation, generation_preface, enable_thinking)
    pixel_values, grid_thws = preprocess_images(images, cfg, min_pixels, max_pixels)
    if max_length is not None:
        check_length(input_ids, grid_thws, cfg.hidden_stride, max_length)
    return input_ids, labels, pixel_values, grid_thws
