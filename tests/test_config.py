"""The built-in full-size configuration is the published one, and the writer gives the official code its values."""
import json
from pathlib import Path

from ovis_min.config import OvisConfig, from_official, preprocess_from_official, to_official

PUBLISHED = Path(__file__).resolve().parent / "fixtures" / "Ovis-U1-3B"


def published() -> tuple[dict, dict]:
    return tuple(json.loads((PUBLISHED / name).read_text()) for name in ("config.json", "preprocessor_config.json"))


def test_defaults_are_the_published_files_field_for_field():
    config, preprocessor = published()
    assert from_official(config, preprocessor) == OvisConfig()
    assert preprocess_from_official(preprocessor) == OvisConfig().preprocess
    defaults = OvisConfig()
    assert defaults.mmdit.timestep_shift is True and defaults.multimodal_max_length == 4496
    assert defaults.preprocess.max_pixels == 2408448 and defaults.vit.fullatt_block_indexes is None


def test_the_writer_gives_every_key_the_official_code_reads_its_published_value():
    config, _ = published()
    written = json.loads(json.dumps(to_official(OvisConfig())))

    def walk(ours: dict, theirs: dict, path: str = ""):
        for key, value in ours.items():
            if key in theirs:
                if isinstance(value, dict):
                    walk(value, theirs[key], f"{path}{key}.")
                else:
                    assert value == theirs[key], f"{path}{key}: written {value!r}, published {theirs[key]!r}"

    walk(written, config)
    gen, tok = written["visual_generator_config"], written["visual_tokenizer_config"]
    must = {"vae force_upcast": (gen["vae_config"]["force_upcast"], False),
            "vae sample_size": (gen["vae_config"]["sample_size"], 512),
            "timestep_shift": (gen["timestep_shift"], True), "base_shift": (gen["base_shift"], 0.5),
            "max_shift": (gen["max_shift"], 1.15), "multimodal_max_length": (written["multimodal_max_length"], 4496),
            "visual vocab": (tok["vocab_size"], 65536), "max_pixels": (tok["backbone_config"]["max_pixels"], 2408448),
            "interpolate_pe_method": (tok["backbone_config"]["interpolate_pe_method"], "two_dim"),
            "fullatt_block_indexes": (tok["backbone_config"]["fullatt_block_indexes"], None),
            "window_size": (tok["backbone_config"]["window_size"], 112)}
    assert {name: pair[0] for name, pair in must.items()} == {name: pair[1] for name, pair in must.items()}
