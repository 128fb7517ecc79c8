"""weights.py's bad inputs, as a user meets them: each ends with a non-zero exit, no traceback, and one line that
names the flag, file or field and the fix. Every run is a process (tests/script_runner.py)."""
import json
import os
import struct
from pathlib import Path

import pytest

from ovis_min.tiny import write_tiny_checkpoint
from script_runner import one_line_error, run_script


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def config_change(section: str, key: str, value):
    def change(data):
        target = data
        for part in section.split(".") if section else []:
            target = target[part]
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return change


DELETE = object()
LLM, GEN, VIT = "llm_config", "visual_generator_config", "visual_tokenizer_config.backbone_config"

# (name, how to damage a copy of the checkpoint, names the message must hold)
CHECK_CASES = [
    ("no hidden_size", ("config.json", config_change(LLM, "hidden_size", DELETE)), ["config.json", "hidden_size"]),
    ("no visual vocab_size", ("config.json", config_change("visual_tokenizer_config", "vocab_size", DELETE)),
     ["config.json", "vocab_size"]),
    ("num_heads 0", ("config.json", config_change(GEN, "num_heads", 0)), ["num_heads", "positive integer"]),
    ("hidden_size string", ("config.json", config_change(LLM, "hidden_size", "64")), ["llm_config.hidden_size"]),
    ("layers negative", ("config.json", config_change(VIT, "num_hidden_layers", -1)), ["num_hidden_layers"]),
    ("bool as int", ("config.json", config_change(LLM, "num_attention_heads", True)), ["num_attention_heads"]),
    ("axes_dim wrong", ("config.json", config_change(GEN, "axes_dim", [4, 4, 4])), ["axes_dim"]),
    ("axes_dim not list", ("config.json", config_change(GEN, "axes_dim", 16)), ["axes_dim"]),
    ("eps string", ("config.json", config_change(LLM, "rms_norm_eps", "x")), ["rms_norm_eps"]),
    ("shift not bool", ("config.json", config_change(GEN, "timestep_shift", "yes")), ["timestep_shift"]),
    ("no llm_config", ("config.json", config_change("", "llm_config", DELETE)), ["config.json", "llm_config"]),
    ("kv heads", ("config.json", config_change(LLM, "num_key_value_heads", 3)), ["num_key_value_heads"]),
    ("config list", ("config.json", "[]"), ["config.json", "JSON object"]),
    ("config not json", ("config.json", "{"), ["config.json", "not valid JSON"]),
    ("max_pixels 0", ("preprocessor_config.json", config_change("", "max_pixels", 0)), ["preprocessor_config.json",
                                                                                         "max_pixels"]),
    ("min > max", ("preprocessor_config.json", config_change("", "min_pixels", 10 ** 9)), ["preprocessor_config.json",
                                                                                            "min_pixels"]),
    ("std zero", ("preprocessor_config.json", config_change("", "image_std", [0, 1, 1])), ["image_std"]),
    ("patch size of other weights", ("preprocessor_config.json", config_change("", "patch_size", 16)),
     ["preprocessor_config.json", "patch_size 16", "config.json"]),
    ("preprocessor corrupt", ("preprocessor_config.json", "{nope"), ["preprocessor_config.json"]),
    ("preprocessor missing", ("preprocessor_config.json", None), ["preprocessor_config.json", "weights.py download"]),
    ("total_size abc", ("model.safetensors.index.json", config_change("metadata", "total_size", "abc")),
     ["total_size"]),
    ("weight_map list", ("model.safetensors.index.json", config_change("", "weight_map", [])), ["weight_map"]),
    ("index not json", ("model.safetensors.index.json", "]"), ["model.safetensors.index.json"]),
    ("header is a list", ("model-00001-of-00002.safetensors", struct.pack("<Q", 2) + b"[]"),
     ["model-00001-of-00002.safetensors", "download it again"]),
    ("shard truncated", ("model-00002-of-00002.safetensors", "truncate"), ["model-00002-of-00002.safetensors"]),
    ("shard missing", ("model-00002-of-00002.safetensors", None), ["model-00002-of-00002.safetensors"]),
    ("tokenizer corrupt", ("tokenizer.json", "{not json"), ["tokenizer.json"]),
    ("tokenizer missing", ("tokenizer.json", None), ["tokenizer.json", "merges.txt"]),
    ("tokenizer_config corrupt", ("tokenizer_config.json", "[1"), ["tokenizer_config.json"]),
]


@pytest.mark.parametrize("name, damage, names", CHECK_CASES, ids=[case[0] for case in CHECK_CASES])
def test_check_names_what_is_wrong(tiny, tmp_path, name, damage, names):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for path in tiny.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    file, how = damage
    path = directory / file
    if how is None:
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif callable(how):
        edit_json(path, how)
    else:
        path.write_bytes(how if isinstance(how, bytes) else how.encode())
    run = run_script("weights.py", "check", directory)
    assert one_line_error(run, *names), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_tiny_refuses_to_overwrite_and_names_force(tiny, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny.iterdir()}
    run = run_script("weights.py", "tiny", tiny, "--seed", "5")
    assert one_line_error(run, "--force", "another folder")
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == before
    copy = tmp_path / "copy"
    assert run_script("weights.py", "tiny", copy).returncode == 0
    again = run_script("weights.py", "tiny", copy, "--force", "--slow-tokenizer")
    assert again.returncode == 0 and not (copy / "tokenizer.json").exists() and (copy / "vocab.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left behind


@pytest.mark.parametrize("args, names", [
    (["tiny", "{file}"], ["is a file"]),
    (["tiny", "{file}/sub"], ["{file}/sub"]),
    (["tiny", "{locked}/ckpt"], ["{locked}/ckpt", "choose a folder you can write"]),
    (["tiny", "{out}", "--shards", "0"], ["--shards 0"]),
    (["tiny", "{out}", "--seed", "-1"], ["--seed -1"]),
    (["check", "{out}/nothing"], ["no checkpoint directory", "weights.py download"]),
    (["check", "not/a-cached-repo"], ["not/a-cached-repo", "weights.py download"]),
    (["manifest", "--compare", "{file}"], ["{file}", "not a manifest"]),
    (["manifest", "--config", "{out}/nothing"], ["config.json", "weights.py download"]),
    (["download", "--dir", "{out}/x"], ["HF_ENDPOINT", "not a URL"]),
])
def test_other_bad_inputs(tmp_path, args, names):
    if os.name == "posix" and os.geteuid() == 0 and any("{locked}" in a for a in args):
        pytest.skip("file permissions do not bind root")
    files = {"file": tmp_path / "file.txt", "locked": tmp_path / "locked", "out": tmp_path / "out"}
    files["file"].write_text("x")
    files["locked"].mkdir()
    files["locked"].chmod(0o500)
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    if args[0] == "download":
        env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "localhost:8080"}
    run = run_script("weights.py", *[a.format(**files) for a in args], env=env)
    assert one_line_error(run, *[n.format(**files) for n in names]), run.stderr
