"""A tiny random Ovis-U1 checkpoint in exactly the official layout, for smoke tests, demos and porters.

`python weights.py tiny DIR` writes one: config.json, sharded safetensors with their index, a Qwen-style
byte-level BPE tokenizer (the Qwen specials, a handful of merges) as tokenizer.json or, with --slow-tokenizer,
as the slow files, and preprocessor_config.json. It has every structural feature of the real model at under a
million parameters, so every code path runs in a second on a CPU; its outputs are noise. Its weights come from
`random_model`, which fills a model of any config in place (bench.py times the full size with it).
"""
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn

from .checkpoint import CONFIG_FILE, PREPROCESSOR_FILE, CheckpointError, build_model, save_checkpoint
from .config import (AdapterConfig, LLMConfig, MMDiTConfig, OvisConfig, PreprocessConfig, RefinerConfig,
                     VAEConfig, VitConfig, to_official)
from .files import default_mode, temp_prefix, write_atomic
from .model import OvisU1
from .prompt import QWEN_SPLIT, TOKENIZER_FILE


def tiny_config() -> OvisConfig:
    """An Ovis-U1 of under a million parameters with every structural feature of the real one.

    The sizes are those of the golden tiny model; all widths stay multiples of the head and group counts."""
    vit = VitConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, image_size=56, window_size=56,
                    fullatt_block_indexes=(1,))
    llm = LLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
    adapter = AdapterConfig(visual_vocab_size=64, vision_hidden_size=32, llm_hidden_size=64)
    mmdit = MMDiTConfig(vec_in_dim=64, context_in_dim=128, hidden_size=64, num_heads=2, depth=2,
                        depth_single_blocks=2, axes_dim=(4, 14, 14), timestep_shift=True)
    refiner = RefinerConfig(context_in_dim=128, hidden_size=64, num_heads=4)
    vae = VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    preprocess = PreprocessConfig(min_pixels=3136, max_pixels=12544)
    return OvisConfig(vit=vit, adapter=adapter, llm=llm, refiner=refiner, mmdit=mmdit, vae=vae, preprocess=preprocess)


def preprocessor_json(pre: PreprocessConfig) -> dict:
    """preprocessor_config.json in the shape of the published one: a CLIP image processor whose size and crop are
    switched off (-1; the visual tokenizer resizes itself) plus the pixel limits and patching."""
    return {
        "crop_size": {"height": -1, "width": -1}, "do_center_crop": False, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "hidden_stride": pre.hidden_stride,
        "image_mean": list(pre.image_mean), "image_processor_type": "CLIPImageProcessor",
        "image_std": list(pre.image_std), "max_pixels": pre.max_pixels, "min_pixels": pre.min_pixels,
        "patch_size": pre.patch_size, "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": -1},
        "temporal_patch_size": pre.temporal_patch_size,
    }


@torch.no_grad()
def random_model(config: OvisConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0) -> OvisU1:
    """The whole model with seeded random weights, each allocated once in `dtype` on `device` and filled in place
    (built on the meta device first, so memory never holds a second copy; the tied LLM head stays one tensor).

    Scaled like a trained network so activations stay O(1): matrices ~ N(0, 1/fan_in), norm scales ~ 1,
    biases small. Nothing is zero, so every path (adaLN gates included) is exercised.
    """
    model = build_model(config).eval()
    real: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in real:
                real[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                               requires_grad=False)
            setattr(module, name, real[id(param)])
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():  # a tied Parameter is listed once
        param.normal_(generator=generator)
        if param.dim() >= 2:
            param.div_(math.sqrt(param[0].numel()))
        elif name.endswith("bias"):
            param.mul_(0.02)
        else:  # norm scales
            param.mul_(0.02).add_(1.0)
    return model


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, turn end = eos
ADDED_TOKENS = ("<think>", "</think>")  # ordinary (non-special) added tokens, as in Qwen3
TINY_WORDS = ("the", "image", "Generate", "Describe", "an", "of", "and", "is", "it", "in", "a", "cat", "photo", "user")


def tiny_tokenizer() -> Tokenizer:
    """A Qwen-style byte-level BPE tokenizer: 256 byte symbols, merges for a few words, the Qwen specials."""
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in TINY_WORDS:
        # spell the word left to right, then join it to a leading space ("Ġ" is the byte-level space)
        pairs = [(word[:end - 1], word[end - 1]) for end in range(2, len(word) + 1)] + [("Ġ", word)]
        for pair in pairs:
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault("".join(pair), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS])
    return tokenizer


def tokenizer_config_json(tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json of a Qwen2 fast tokenizer (what transformers needs to open tokenizer.json)."""
    added = {}
    for token in (*SPECIAL_TOKENS, *ADDED_TOKENS):
        added[str(tokenizer.token_to_id(token))] = {"content": token, "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False,
                                                    "special": token in SPECIAL_TOKENS}
    return {"added_tokens_decoder": added, "bos_token": None, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
            "model_max_length": 131072, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None}


def tokenizer_files(tokenizer: Tokenizer, slow: bool = False) -> dict[str, str]:
    """The tokenizer's files by name, as transformers' Qwen2 tokenizers save them: tokenizer.json, or with `slow`
    vocab.json, merges.txt and added_tokens.json; either way tokenizer_config.json and special_tokens_map.json."""
    files = {"tokenizer_config.json": json.dumps(tokenizer_config_json(tokenizer), indent=2) + "\n",
             "special_tokens_map.json": json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n"}
    if not slow:
        return {TOKENIZER_FILE: tokenizer.to_str(pretty=True), **files}
    document = json.loads(tokenizer.to_str())
    merges = [pair if isinstance(pair, list) else pair.split(" ") for pair in document["model"]["merges"]]
    added = {entry["content"]: entry["id"] for entry in document["added_tokens"]}
    return {"vocab.json": json.dumps(document["model"]["vocab"], ensure_ascii=False) + "\n",
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "added_tokens.json": json.dumps(added, indent=2, sort_keys=True) + "\n", **files}


SPECIAL_TOKENS_MAP = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
PUBLISHED_FLOAT32 = ("visual_generator.",)  # stored in float32 as published (torch_dtype); the rest in bfloat16


def write_tiny_checkpoint(directory: Path | str, seed: int = 0, shards: int = 2, config: OvisConfig | None = None,
                          slow_tokenizer: bool = False, force: bool = False, published_dtypes: bool = False) -> Path:
    """A tiny random checkpoint in exactly the official layout: config, sharded weights + index, tokenizer
    (tokenizer.json, or the slow files with `slow_tokenizer`), preprocessor config.

    The weights are float32; with `published_dtypes` they are stored as the published checkpoint says (decoder
    and VAE in float32, the rest in bfloat16). Everything is written into a temporary folder beside `directory`
    and renamed into place when complete, so an interrupted run never leaves a checkpoint that looks finished.
    An existing non-empty `directory` is replaced only with `force`.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a folder: choose another folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise CheckpointError(f"{directory} is not empty ({', '.join(sorted(p.name for p in directory.iterdir())[:4])}"
                              "...): pass --force to replace it, or choose another folder")
    config = config or tiny_config()
    tokenizer = tiny_tokenizer()
    if tokenizer.get_vocab_size() > config.llm.vocab_size:
        raise ValueError(f"the tiny tokenizer has {tokenizer.get_vocab_size()} tokens, more than the LLM's "
                         f"vocab_size {config.llm.vocab_size}")
    state = {name: param.data for name, param in random_model(config, seed=seed).named_parameters()}
    official = to_official(config)
    if published_dtypes:
        state = {name: tensor if name.startswith(PUBLISHED_FLOAT32) else tensor.bfloat16()
                 for name, tensor in state.items()}
        official["torch_dtype"] = official["llm_config"]["torch_dtype"] = "bfloat16"
        official["visual_tokenizer_config"]["backbone_config"]["torch_dtype"] = "bfloat16"
        official["visual_generator_config"]["torch_dtype"] = "float32"
    files = {CONFIG_FILE: json.dumps(official, indent=2) + "\n",
             PREPROCESSOR_FILE: json.dumps(preprocessor_json(config.preprocess), indent=2) + "\n",
             **tokenizer_files(tokenizer, slow_tokenizer)}

    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}{directory.name}-", dir=directory.parent))
    try:
        save_checkpoint(state, temp, shards)
        for name, text in files.items():
            write_atomic(temp / name, text)
        os.chmod(temp, default_mode(directory=True))  # mkdtemp makes it private; the files already have their modes
        if directory.exists():  # with force: swap the old one out, the new one in, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f"{temp_prefix()}{directory.name}-old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(temp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory
