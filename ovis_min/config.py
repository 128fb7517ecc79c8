"""Configuration of Ovis-U1: one plain dataclass per block, composed into `OvisConfig`.

Defaults are the full-size Ovis-U1-3B values, field for field those of the published `config.json` and
`preprocessor_config.json` of Hugging Face `AIDC-AI/Ovis-U1-3B` (the tests hold copies of both files and check
the equality). Fields the published files do not carry say where their value comes from. At load time the
checkpoint's own files, read by `from_official`, are the source of truth; a file that lacks a field the weight
shapes depend on, or holds a value of the wrong kind, is refused with the field's name (`ConfigError`).
"""
import math
from dataclasses import MISSING as dataclass_missing
from dataclasses import dataclass, field, fields


@dataclass
class VitConfig:
    """AIMv2-large native-resolution encoder (official `visual_tokenizer.backbone`)."""
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 24
    num_heads: int = 8
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448  # the learned position table covers (448/14)^2 = 1024 patches
    temporal_patch_size: int = 1
    hidden_stride: int = 2  # 2x2 patches are merged into one visual token by the adapter
    window_size: int = 112  # in pixels: 112/14/2 = 4x4 merged units per attention window
    # Blocks that attend over whole images; the others attend within windows. None (the published value) makes
    # every block attend over whole images; () makes every block windowed.
    fullatt_block_indexes: tuple | None = None
    preserve_original_pe: bool = True
    interpolate_pe_method: str = "two_dim"
    disable_rope: bool = False
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False


@dataclass
class AdapterConfig:
    """Visual head + probabilistic visual embedding table (`visual_tokenizer.head`, `vte`)."""
    visual_vocab_size: int = 65536  # visual_tokenizer_config.vocab_size
    vision_hidden_size: int = 1024  # the encoder width; 2x2 merged tokens are 4x wider
    hidden_stride: int = 2
    llm_hidden_size: int = 2048
    num_indicators: int = 4  # the last rows of the table hold the image start/end markers (official code)


@dataclass
class LLMConfig:
    """Qwen3-1.7B decoder (official `llm`)."""
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True


@dataclass
class RefinerConfig:
    """Bidirectional token refiner in front of the decoder (official `visual_generator.backbone.txt_in`).

    config.json has no section for it: the official code builds it from the decoder's sizes."""
    context_in_dim: int = 4096  # last-layer + second-to-last-layer LLM states, 2 x 2048
    hidden_size: int = 1536
    num_heads: int = 24  # twice the decoder's heads: head_dim 64
    num_blocks: int = 2
    mlp_ratio: float = 4.0


@dataclass
class MMDiTConfig:
    """The image decoder (mmdit.py, which lists its official names)."""
    in_channels: int = 16  # 4 VAE latent channels x 2x2 packing
    out_channels: int = 16
    vec_in_dim: int = 1536
    context_in_dim: int = 4096
    hidden_size: int = 1536
    mlp_ratio: float = 4.0
    num_heads: int = 12
    depth: int = 6  # double-stream blocks
    depth_single_blocks: int = 12
    axes_dim: tuple = (16, 56, 56)  # RoPE channels for the (t, row, col) position ids
    theta: int = 10_000
    qkv_bias: bool = True
    timestep_shift: bool = True  # published: true (the official code's own default is false)
    base_shift: float = 0.5
    max_shift: float = 1.15


@dataclass
class VAEConfig:
    """SDXL AutoencoderKL (official `visual_generator.vae`)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512  # diffusers' tiling size; ovis-min does not tile, written for the official code
    force_upcast: bool = False  # published: false (the VAE runs in the model's dtype)


@dataclass
class PreprocessConfig:
    """Image preprocessing for the encoder (the checkpoint's preprocessor_config.json)."""
    patch_size: int = 14
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 200704
    max_pixels: int = 2408448
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's values
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OvisConfig:
    vit: VitConfig = field(default_factory=VitConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    multimodal_max_length: int = 4496  # the longest prompt, in embedded tokens (text + visual)


class ConfigError(ValueError):
    """A config.json or preprocessor_config.json value ovis-min cannot build from; the message names the field."""


# Official keys the weight shapes depend on: a file without them is refused rather than completed with the
# full-size values, which would only fail later as a wall of shape mismatches (or, worse, fit by accident).
REQUIRED = {
    "llm_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads"),
    "visual_tokenizer_config": ("vocab_size",),
    "visual_tokenizer_config.backbone_config": ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "patch_size", "image_size"),
    "visual_generator_config": ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size",
                                "num_heads", "depth", "depth_single_blocks", "axes_dim"),
    "visual_generator_config.vae_config": ("block_out_channels", "layers_per_block", "latent_channels"),
}
ANY_SIGN = ("base_shift", "max_shift", "shift_factor")  # float fields that may be zero or negative
COUNTS_FROM_ZERO = ("fullatt_block_indexes",)  # integer lists whose entries may be 0 (block indexes)


def _kind(annotation) -> tuple[type, bool]:
    """(type, None allowed) of a dataclass field annotation such as `int`, `tuple | None`."""
    members = getattr(annotation, "__args__", None)
    if members:
        return next(m for m in members if m is not type(None)), type(None) in members
    return annotation, False


def _checked(where: str, value, kind: type, default):
    """`value` as field type `kind`, or a ConfigError naming `where` (e.g. "llm_config.hidden_size")."""
    name = where.rsplit(".", 1)[-1]

    def fail(expected: str):
        raise ConfigError(f"{where}: {value!r} is not {expected}")

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if kind is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail("a positive integer")
        return value
    if kind is float:
        if not number(value) or (value <= 0 and name not in ANY_SIGN):
            fail("a number" if name in ANY_SIGN else "a positive number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if kind is tuple:
        ints = default is None or all(isinstance(x, int) for x in default)
        least = 0 if name in COUNTS_FROM_ZERO else 1
        if not isinstance(value, list) or not (value or name in COUNTS_FROM_ZERO):
            fail("a list of integers" if ints else "a list of numbers")
        for x in value:
            if ints and (not isinstance(x, int) or isinstance(x, bool) or x < least):
                fail(f"a list of integers >= {least}")
            if not ints and not number(x):
                fail("a list of numbers")
        return tuple(value)
    raise AssertionError(kind)


def _require(values: dict, section: str) -> None:
    """`values` is a JSON object holding the section's REQUIRED keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a JSON object, got {type(values).__name__}")
    missing = [key for key in REQUIRED.get(section, ()) if values.get(key) is None]
    if missing:
        raise ConfigError(f"{section}: missing {', '.join(missing)} (the weight shapes depend on "
                          f"{'it' if len(missing) == 1 else 'them'}; refusing to guess)")


def _pick(cls, values: dict, section: str, renames: dict | None = None, **overrides):
    """Build dataclass `cls` from one section of an official config: known fields are type-checked, renamed
    ones mapped, the section's REQUIRED keys must be there, the rest keeps its default."""
    _require(values, section)
    renames = renames or {}
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = renames.get(key, key)
        if name in known and name not in overrides and value is not None:
            kind, _ = _kind(known[name].type)
            default = known[name].default if known[name].default is not dataclass_missing else None
            kwargs[name] = _checked(f"{section}.{key}", value, kind, default)
    kwargs.update(overrides)
    return cls(**kwargs)


def _section(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: " + ("missing" if value is None else
                                                f"expected a JSON object, got {type(value).__name__}"))
    return value


def preprocess_from_official(preprocessor: dict) -> PreprocessConfig:
    """The image preprocessing of a `preprocessor_config.json` dict, checked."""
    pre = _pick(PreprocessConfig, preprocessor, "preprocessor_config.json")
    if pre.min_pixels > pre.max_pixels:
        raise ConfigError(f"preprocessor_config.json: min_pixels {pre.min_pixels} is larger than max_pixels "
                          f"{pre.max_pixels}")
    unit = pre.patch_size * pre.hidden_stride
    if pre.max_pixels < unit * unit:
        raise ConfigError(f"preprocessor_config.json.max_pixels: {pre.max_pixels} is less than one "
                          f"{unit}x{unit} visual token (patch_size x hidden_stride)")
    for name in ("image_mean", "image_std"):
        if len(getattr(pre, name)) != 3:
            raise ConfigError(f"preprocessor_config.json.{name}: expected 3 values (R, G, B), got "
                              f"{len(getattr(pre, name))}")
    if min(pre.image_std) <= 0:
        raise ConfigError(f"preprocessor_config.json.image_std: {list(pre.image_std)} must be positive")
    return pre


def from_official(config: dict, preprocessor: dict | None = None) -> OvisConfig:
    """The whole config from an official `config.json` dict (and `preprocessor_config.json`; without it the
    preprocessing keeps its defaults). Raises ConfigError naming the first field that cannot be used."""
    if not isinstance(config, dict):
        raise ConfigError(f"expected a JSON object, got {type(config).__name__}")
    llm_dict = _section(config, "llm_config", "")
    tok_dict = _section(config, "visual_tokenizer_config", "")
    vit_dict = _section(tok_dict, "backbone_config", "visual_tokenizer_config.")
    gen_dict = _section(config, "visual_generator_config", "")
    vae_dict = _section(gen_dict, "vae_config", "visual_generator_config.")

    llm = _pick(LLMConfig, llm_dict, "llm_config", {"num_hidden_layers": "num_layers",
                                                    "num_attention_heads": "num_heads",
                                                    "num_key_value_heads": "num_kv_heads"})
    if llm_dict.get("head_dim") is None:
        llm.head_dim = llm.hidden_size // llm.num_heads
    vit = _pick(VitConfig, vit_dict, "visual_tokenizer_config.backbone_config",
                {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"})
    hidden_stride = _checked("visual_tokenizer_config.hidden_stride", tok_dict.get("hidden_stride", vit.hidden_stride),
                             int, None)
    _require(tok_dict, "visual_tokenizer_config")  # read field by field below, not through _pick
    adapter = AdapterConfig(visual_vocab_size=_checked("visual_tokenizer_config.vocab_size", tok_dict["vocab_size"],
                                                       int, None),
                            vision_hidden_size=vit.hidden_size, hidden_stride=hidden_stride,
                            llm_hidden_size=llm.hidden_size)
    mmdit = _pick(MMDiTConfig, gen_dict, "visual_generator_config")
    # The official refiner runs at the decoder width with twice its heads (fixed in the code, not the config).
    refiner = RefinerConfig(context_in_dim=mmdit.context_in_dim, hidden_size=mmdit.hidden_size,
                            num_heads=2 * mmdit.num_heads, mlp_ratio=mmdit.mlp_ratio)
    vae = _pick(VAEConfig, vae_dict, "visual_generator_config.vae_config")
    preprocess = preprocess_from_official(preprocessor) if preprocessor is not None else PreprocessConfig()
    max_length = config.get("multimodal_max_length", OvisConfig.multimodal_max_length)
    result = OvisConfig(vit=vit, adapter=adapter, llm=llm, refiner=refiner, mmdit=mmdit, vae=vae,
                        preprocess=preprocess,
                        multimodal_max_length=_checked("multimodal_max_length", max_length, int, None))
    validate(result)
    return result


def validate(config: OvisConfig) -> None:
    """The relations between fields that the blocks rely on; a ConfigError names the official keys."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    llm, vit, mmdit, vae = config.llm, config.vit, config.mmdit, config.vae
    need(llm.num_heads % llm.num_kv_heads == 0, f"llm_config: num_attention_heads {llm.num_heads} is not a "
                                                 f"multiple of num_key_value_heads {llm.num_kv_heads}")
    need(vit.hidden_size % vit.num_heads == 0, f"visual_tokenizer_config.backbone_config: hidden_size "
                                               f"{vit.hidden_size} is not a multiple of num_attention_heads "
                                               f"{vit.num_heads}")
    need(all(i < vit.num_layers for i in vit.fullatt_block_indexes or ()),
         f"visual_tokenizer_config.backbone_config.fullatt_block_indexes: {list(vit.fullatt_block_indexes or ())} "
         f"names a block past num_hidden_layers {vit.num_layers}")
    need(mmdit.hidden_size % mmdit.num_heads == 0 and sum(mmdit.axes_dim) == mmdit.hidden_size // mmdit.num_heads,
         f"visual_generator_config: axes_dim {list(mmdit.axes_dim)} must add up to hidden_size / num_heads "
         f"({mmdit.hidden_size} / {mmdit.num_heads})")
    need(all(c % vae.norm_num_groups == 0 for c in vae.block_out_channels),
         f"visual_generator_config.vae_config: block_out_channels {list(vae.block_out_channels)} are not all "
         f"multiples of norm_num_groups {vae.norm_num_groups}")


def to_official(config: OvisConfig) -> dict:
    """An official `config.json` dict for `config`: the inverse of `from_official` (the preprocessing lives in
    preprocessor_config.json; its pixel limits are repeated here, as published). Only the fields the official
    classes and ovis-min read are written."""
    llm, vit, adapter, mmdit, vae = config.llm, config.vit, config.adapter, config.mmdit, config.vae
    refiner = config.refiner
    if ((refiner.context_in_dim, refiner.hidden_size, refiner.num_heads, refiner.mlp_ratio)
            != (mmdit.context_in_dim, mmdit.hidden_size, 2 * mmdit.num_heads, mmdit.mlp_ratio)):
        raise ValueError("the official config.json has no refiner section: its sizes follow the decoder's "
                         "(same width and mlp_ratio, twice the heads), so a config that differs cannot be written")
    # The published config.json repeats the pixel limits of preprocessor_config.json in four places.
    pixels = {"min_pixels": config.preprocess.min_pixels, "max_pixels": config.preprocess.max_pixels}
    llm_config = {
        "model_type": "qwen3", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim,
        "rope_theta": llm.rope_theta, "rms_norm_eps": llm.rms_norm_eps,
        "max_position_embeddings": llm.max_position_embeddings, "tie_word_embeddings": llm.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False,
    }
    backbone_config = {
        "model_type": "aimv2", "hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
        "num_hidden_layers": vit.num_layers, "num_attention_heads": vit.num_heads,
        "num_channels": vit.num_channels, "patch_size": vit.patch_size, "image_size": vit.image_size,
        "temporal_patch_size": vit.temporal_patch_size, "hidden_stride": vit.hidden_stride,
        "window_size": vit.window_size, "fullatt_block_indexes": (None if vit.fullatt_block_indexes is None
                                                            else list(vit.fullatt_block_indexes)),
        "preserve_original_pe": vit.preserve_original_pe, "interpolate_pe_method": vit.interpolate_pe_method,
        "disable_rope": vit.disable_rope, "rms_norm_eps": vit.rms_norm_eps, "qkv_bias": vit.qkv_bias,
        "use_bias": vit.use_bias, **pixels,
    }
    visual_tokenizer_config = {
        "model_type": "aimv2_visual_tokenizer", "vocab_size": adapter.visual_vocab_size,
        "tokenize_function": "softmax", "hidden_stride": adapter.hidden_stride,
        "backbone_kwargs": {"hidden_stride": adapter.hidden_stride, **pixels}, "backbone_config": backbone_config,
        "image_processor_new_kwargs": {"hidden_stride": adapter.hidden_stride, **pixels}, **pixels,
    }
    vae_config = {
        "_class_name": "AutoencoderKL", "in_channels": vae.in_channels, "out_channels": vae.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
        "block_out_channels": list(vae.block_out_channels), "layers_per_block": vae.layers_per_block,
        "act_fn": "silu", "latent_channels": vae.latent_channels, "norm_num_groups": vae.norm_num_groups,
        "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor,
        "force_upcast": vae.force_upcast, "sample_size": vae.sample_size,
        "use_quant_conv": vae.use_quant_conv, "use_post_quant_conv": vae.use_post_quant_conv,
        "mid_block_add_attention": vae.mid_block_add_attention,
    }
    visual_generator_config = {
        "model_type": "yak", "in_channels": mmdit.in_channels, "out_channels": mmdit.out_channels,
        "vec_in_dim": mmdit.vec_in_dim, "context_in_dim": mmdit.context_in_dim, "hidden_size": mmdit.hidden_size,
        "mlp_ratio": mmdit.mlp_ratio, "num_heads": mmdit.num_heads, "depth": mmdit.depth,
        "depth_single_blocks": mmdit.depth_single_blocks, "axes_dim": list(mmdit.axes_dim), "theta": mmdit.theta,
        "qkv_bias": mmdit.qkv_bias, "guidance_embed": False, "txt_type": "refiner",
        "timestep_shift": mmdit.timestep_shift, "base_shift": mmdit.base_shift, "max_shift": mmdit.max_shift,
        "vae_config": vae_config,
    }
    return {
        "model_type": "ovis_u1", "architectures": ["OvisU1"], "hidden_size": llm.hidden_size,
        "multimodal_max_length": config.multimodal_max_length,
        "conversation_formatter_class": "Qwen3ConversationFormatter", "tie_word_embeddings": llm.tie_word_embeddings,
        "llm_config": llm_config, "visual_tokenizer_config": visual_tokenizer_config,
        "visual_generator_config": visual_generator_config,
    }
