"""Configuration of Ovis-U1: one plain dataclass per block, composed into `OvisConfig`.

Defaults are the full-size Ovis-U1-3B values. Values that could not be read from a published
config.json (they do not change any weight shape) are marked `# inferred`: the checkpoint's
config.json, read by `from_official`, is the source of truth at load time.
"""
from dataclasses import dataclass, field


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
    # Blocks that attend over whole images; the others attend within windows. None (the official default, and
    # inferred here: not published) makes every block attend over whole images; () makes every block windowed.
    fullatt_block_indexes: tuple | None = None
    preserve_original_pe: bool = True  # inferred from the report (interpolated position embeddings)
    interpolate_pe_method: str = "two_dim"  # inferred
    disable_rope: bool = False
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False


@dataclass
class AdapterConfig:
    """Visual head + probabilistic visual embedding table (`visual_tokenizer.head`, `vte`)."""
    visual_vocab_size: int = 65536  # inferred from the report's Table 1 parameter counts
    vision_hidden_size: int = 1024  # the encoder width; 2x2 merged tokens are 4x wider
    hidden_stride: int = 2
    llm_hidden_size: int = 2048
    num_indicators: int = 4  # the last rows of the table hold the image start/end markers etc.


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
    """Bidirectional token refiner in front of the decoder (official `visual_generator.backbone.txt_in`)."""
    context_in_dim: int = 4096  # last-layer + second-to-last-layer LLM states, 2 x 2048
    hidden_size: int = 1536
    num_heads: int = 24  # twice the decoder's heads: head_dim 64
    num_blocks: int = 2
    mlp_ratio: float = 4.0


@dataclass
class MMDiTConfig:
    """The image decoder (official `visual_generator.backbone`, "Yak")."""
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
    timestep_shift: bool = False  # inferred: the official code default
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


@dataclass
class PreprocessConfig:
    """Image preprocessing for the encoder (the checkpoint's preprocessor_config.json)."""
    patch_size: int = 14
    hidden_stride: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 200704
    max_pixels: int = 3211264
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # inferred: CLIP values, as in AIMv2
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)  # inferred


@dataclass
class OvisConfig:
    vit: VitConfig = field(default_factory=VitConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    multimodal_max_length: int = 2048  # prompts are cut to this many embedded tokens


def _pick(cls, values: dict, renames: dict | None = None, **overrides):
    """Build dataclass `cls` from an official config dict: keep known fields, apply renames."""
    renames = renames or {}
    names = {f for f in cls.__dataclass_fields__}
    kwargs = {}
    for key, value in values.items():
        key = renames.get(key, key)
        if key in names and value is not None:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)


def from_official(config: dict, preprocessor: dict | None = None) -> OvisConfig:
    """The whole config from an official `config.json` dict (and `preprocessor_config.json`)."""
    llm_dict = config["llm_config"]
    tok_dict = config["visual_tokenizer_config"]
    vit_dict = tok_dict["backbone_config"]
    gen_dict = config["visual_generator_config"]

    llm = _pick(LLMConfig, llm_dict, {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                                      "num_key_value_heads": "num_kv_heads"})
    if llm_dict.get("head_dim") is None:
        llm.head_dim = llm.hidden_size // llm.num_heads
    vit = _pick(VitConfig, vit_dict, {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"})
    adapter = AdapterConfig(visual_vocab_size=tok_dict["vocab_size"], vision_hidden_size=vit.hidden_size,
                            hidden_stride=tok_dict.get("hidden_stride", vit.hidden_stride),
                            llm_hidden_size=llm.hidden_size)
    mmdit = _pick(MMDiTConfig, gen_dict)
    # The official refiner runs at the decoder width with twice its heads (fixed in the code, not the config).
    refiner = RefinerConfig(context_in_dim=mmdit.context_in_dim, hidden_size=mmdit.hidden_size,
                            num_heads=2 * mmdit.num_heads, mlp_ratio=mmdit.mlp_ratio)
    vae = _pick(VAEConfig, gen_dict.get("vae_config") or {})
    preprocess = _pick(PreprocessConfig, preprocessor or {}) if preprocessor else PreprocessConfig()
    return OvisConfig(vit=vit, adapter=adapter, llm=llm, refiner=refiner, mmdit=mmdit, vae=vae,
                      preprocess=preprocess,
                      multimodal_max_length=config.get("multimodal_max_length", 2048))


def to_official(config: OvisConfig) -> dict:
    """An official `config.json` dict for `config`: the inverse of `from_official` (preprocessing excluded,
    it lives in preprocessor_config.json). Only the fields the official classes and ovis-min read are written."""
    llm, vit, adapter, mmdit, vae = config.llm, config.vit, config.adapter, config.mmdit, config.vae
    refiner = config.refiner
    if ((refiner.context_in_dim, refiner.hidden_size, refiner.num_heads, refiner.mlp_ratio)
            != (mmdit.context_in_dim, mmdit.hidden_size, 2 * mmdit.num_heads, mmdit.mlp_ratio)):
        raise ValueError("the official config.json has no refiner section: its sizes follow the decoder's "
                         "(same width and mlp_ratio, twice the heads), so a config that differs cannot be written")
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
        "use_bias": vit.use_bias,
    }
    visual_tokenizer_config = {
        "model_type": "aimv2_visual_tokenizer", "vocab_size": adapter.visual_vocab_size,
        "tokenize_function": "softmax", "hidden_stride": adapter.hidden_stride,
        "backbone_kwargs": {"hidden_stride": adapter.hidden_stride}, "backbone_config": backbone_config,
    }
    vae_config = {
        "_class_name": "AutoencoderKL", "in_channels": vae.in_channels, "out_channels": vae.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
        "block_out_channels": list(vae.block_out_channels), "layers_per_block": vae.layers_per_block,
        "act_fn": "silu", "latent_channels": vae.latent_channels, "norm_num_groups": vae.norm_num_groups,
        "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor, "force_upcast": True,
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
