"""Reading the official checkpoint: the full-size name map, strict loading, safety, the cache layout, the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ovis_min.checkpoint import (INDEX_FILE, OFFICIAL_NAMES, CheckpointError, build_model, check_checkpoint,
                                 load_checkpoint, load_model, official_part, open_checkpoint, save_checkpoint,
                                 table1_counts)
from ovis_min import checkpoint
from ovis_min.hub import resolve_source
from ovis_min.prompt import Tokenizer
from ovis_min.config import OvisConfig, from_official, to_official
from ovis_min.tiny import preprocessor_json, tiny_config, tiny_tokenizer, write_tiny_checkpoint
import weights
from script_runner import one_line_error, run_script

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
MANIFEST = json.loads((GOLDEN / "full_manifest.json").read_text())


# -- the full-size model against the official manifest ------------------------------------------------------------

def test_full_size_model_matches_the_official_manifest():
    model = build_model(OvisConfig())
    ours = model.state_dict(keep_vars=True)
    official = {entry["key"]: tuple(entry["shape"]) for entry in MANIFEST["keys"]}
    assert len(official) == MANIFEST["num_keys"] == len(MANIFEST["keys"])
    assert sorted(ours) == sorted(official), (set(official) - set(ours), set(ours) - set(official))
    wrong = [name for name in official if tuple(ours[name].shape) != official[name]]
    assert not wrong, wrong[:5]

    # each official key is exactly one parameter; the only shared one is the tied lm_head, as the manifest says
    by_param: dict[int, list[str]] = {}
    for name, tensor in ours.items():
        assert isinstance(tensor, nn.Parameter), f"{name} is not a parameter"
        by_param.setdefault(id(tensor), []).append(name)
    shared = [names for names in by_param.values() if len(names) > 1]
    assert shared == [["llm.model.embed_tokens.weight", "llm.lm_head.weight"]]
    not_parameters = [e["key"] for e in MANIFEST["keys"] if not e["is_parameter"]]
    assert not_parameters == ["llm.lm_head.weight"]
    assert all(tensor.is_meta for tensor in ours.values())


def test_full_size_parameter_counts_match_table1_as_counted_in_the_manifest():
    counts = table1_counts(build_model(OvisConfig()))
    raw = MANIFEST["param_counts_raw"]
    assert counts == {
        "LLM": raw["llm"],
        "Visual encoder": raw["visual_encoder"] + raw["adapter_head"],
        "Adapter": raw["vte"],
        "Vision decoder": raw["vision_decoder_excl_refiner"],
        "Refiner": raw["refiner_txt_in"],
        "VAE": raw["vae"],
        "Total": raw["total"],
    }
    ours_m = {row: round(count / 1e6, 2) for row, count in counts.items()}
    table = {row.split(" (")[0]: v["ours_M"] for row, v in MANIFEST["table1_comparison"].items()}
    assert ours_m["LLM"] == table["LLM"] and ours_m["Total"] == table["Total"]
    assert ours_m["Vision decoder"] == table["Vision Decoder"] and ours_m["Refiner"] == table["Refiner"]


def test_every_official_name_has_one_row_in_the_table():
    for entry in MANIFEST["keys"]:
        assert official_part(entry["key"]) in OFFICIAL_NAMES
    with pytest.raises(KeyError):
        official_part("model.layers.0.weight")


def test_manifest_command_compares(tmp_path, capsys):
    assert weights.main(["manifest", "--compare", str(GOLDEN / "full_manifest.json")]) == 0
    assert "match the model" in capsys.readouterr().out
    broken = json.loads((GOLDEN / "full_manifest.json").read_text())
    broken["keys"][1]["shape"] = [1, 2]
    broken["keys"].append({"key": "llm.extra.weight", "shape": [3]})
    (tmp_path / "m.json").write_text(json.dumps(broken))
    assert weights.main(["manifest", "--compare", str(tmp_path / "m.json")]) == 1
    err = capsys.readouterr().err
    assert "llm.model.layers.0.self_attn.q_proj.weight" in err and "llm.extra.weight" in err


# -- strict loading, on a small stand-in with official names -------------------------------------------------------

class StandIn(nn.Module):
    """A few official names, with the tied LM head and a non-float buffer, small enough to build in a test."""

    def __init__(self):
        super().__init__()
        self.llm = nn.Module()
        self.llm.model = nn.Module()
        self.llm.model.embed_tokens = nn.Embedding(11, 4)
        self.llm.model.norm = nn.LayerNorm(4)
        self.llm.lm_head = nn.Linear(4, 11, bias=False)
        self.llm.lm_head.weight = self.llm.model.embed_tokens.weight
        self.vte = nn.Embedding(6, 4)
        self.visual_generator = nn.Module()
        self.visual_generator.backbone = nn.Module()
        self.visual_generator.backbone.img_in = nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def stand_in_weights(seed: int = 0, with_lm_head: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {name: torch.randn(t.shape) if t.is_floating_point() else torch.arange(t.numel())
             for name, t in StandIn().state_dict().items()}
    if with_lm_head:
        state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"].clone()
    else:
        del state["llm.lm_head.weight"]
    return state


def meta_stand_in() -> StandIn:
    with torch.device("meta"):
        return StandIn()


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_and_single_file_load_exactly(tmp_path, shards):
    state = stand_in_weights()
    files = save_checkpoint(state, tmp_path, shards)
    assert len(files) == shards and (tmp_path / INDEX_FILE).exists() == (shards > 1)
    model = load_checkpoint(meta_stand_in(), tmp_path, dtype=torch.float32)
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight  # still tied after assign=True
    assert model.steps.dtype == torch.int64


def test_loads_in_bfloat16_straight_from_float32(tmp_path):
    state = stand_in_weights()
    save_checkpoint(state, tmp_path, 2)
    model = load_checkpoint(meta_stand_in(), tmp_path, dtype=torch.bfloat16)
    assert model.vte.weight.dtype == torch.bfloat16 and model.llm.lm_head.weight.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64  # integers are not cast
    assert torch.equal(model.vte.weight, state["vte.weight"].bfloat16())
    assert all(not t.is_meta for t in model.state_dict().values())


def test_stored_lm_head_must_equal_the_tied_embeddings(tmp_path):
    save_checkpoint(stand_in_weights(with_lm_head=True), tmp_path / "same")
    model = load_checkpoint(meta_stand_in(), tmp_path / "same", dtype=torch.float32)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight

    state = stand_in_weights(with_lm_head=True)
    state["llm.lm_head.weight"] += 1
    save_checkpoint(state, tmp_path / "differs")
    with pytest.raises(CheckpointError, match="llm.lm_head.weight differs"):
        load_checkpoint(meta_stand_in(), tmp_path / "differs")


def test_missing_shard_names_the_file_and_the_fix(tmp_path):
    files = save_checkpoint(stand_in_weights(), tmp_path, 3)
    (tmp_path / files[1]).unlink()
    with pytest.raises(CheckpointError, match="missing") as error:
        load_checkpoint(meta_stand_in(), tmp_path)
    assert files[1] in str(error.value) and "python weights.py download" in str(error.value)


def test_no_weights_at_all_says_how_to_get_them(tmp_path):
    with pytest.raises(CheckpointError, match=r"model.safetensors.*python weights.py download"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "appended", "garbage", "empty"])
def test_corrupt_or_truncated_shard_is_detected_before_loading(tmp_path, damage):
    files = save_checkpoint(stand_in_weights(), tmp_path, 2)
    path = tmp_path / files[1]
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-7], "appended": data + b"x", "garbage": b"\x00" * 64 + data[64:],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(meta_stand_in(), tmp_path)
    assert files[1] in str(error.value)


def test_wrong_shape_is_reported_with_both_shapes(tmp_path):
    state = stand_in_weights()
    state["vte.weight"] = torch.randn(7, 4)
    files = save_checkpoint(state, tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"1 wrong shape: vte.weight: checkpoint \(7, 4\) vs model \(6, 4\)"
                                              rf" \[{files[1]}\]"):
        load_checkpoint(meta_stand_in(), tmp_path)


def test_extra_key_is_reported(tmp_path):
    state = stand_in_weights()
    state["visual_generator.backbone.extra.weight"] = torch.randn(2)
    files = save_checkpoint(state, tmp_path, 2)
    with pytest.raises(CheckpointError, match=rf"1 unexpected: visual_generator.backbone.extra.weight \[{files[1]}\]"):
        load_checkpoint(meta_stand_in(), tmp_path)


def test_missing_keys_are_listed_then_counted(tmp_path):
    state = stand_in_weights()
    del state["visual_generator.backbone.img_in.bias"]
    save_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointError, match=r"1 missing: visual_generator.backbone.img_in.bias") as error:
        load_checkpoint(meta_stand_in(), tmp_path)
    assert str(tmp_path) in str(error.value)  # names where it looked

    save_checkpoint({"vte.weight": torch.randn(6, 4)}, tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"6 missing: .*, \.\.\. \(1 more\)"):
        load_checkpoint(meta_stand_in(), tmp_path / "bare")


def test_wrong_dtype_kind_is_reported(tmp_path):
    state = stand_in_weights()
    state["vte.weight"] = torch.zeros(6, 4, dtype=torch.int32)
    save_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointError, match="wrong dtype: vte.weight: checkpoint I32"):
        load_checkpoint(meta_stand_in(), tmp_path)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd.safetensors", "a/../../x.safetensors",
                                  "C:\\x.safetensors", "model.bin", "..\\x.safetensors"])
def test_index_with_a_shard_outside_the_directory_is_refused(tmp_path, evil):
    checkpoint = tmp_path / "ckpt"
    files = save_checkpoint(stand_in_weights(), checkpoint, 2)
    save_file({"vte.weight": torch.randn(6, 4)}, str(tmp_path / "outside.safetensors"))
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    index["weight_map"]["vte.weight"] = evil
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing shard"):
        load_checkpoint(meta_stand_in(), checkpoint)
    assert files


def test_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    files = save_checkpoint(stand_in_weights(), tmp_path, 2)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    moved = next(name for name, file in index["weight_map"].items() if file == files[0])
    index["weight_map"][moved] = files[1]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="do not belong together"):
        open_checkpoint(tmp_path)


# -- the Hugging Face cache layout --------------------------------------------------------------------------------

def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40):
    """Files as huggingface_hub stores them: blobs, snapshot symlinks to the blobs, refs/main -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_is_found_in_the_cache_with_symlinked_shards(tmp_path):
    """huggingface_hub reads HF_HOME / HF_HUB_CACHE when imported, so this runs as a process, as users run it."""
    source = write_tiny_checkpoint(tmp_path / "src")
    files = {path.name: path.read_bytes() for path in source.iterdir()}
    snapshot = make_hub_cache(tmp_path / "hf" / "hub", "AIDC-AI/Ovis-U1-3B", files)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": "", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE")
    for repo_id in ("AIDC-AI/Ovis-U1-3B", "ATH-MaaS/Ovis-U1-3B"):  # the same checkpoint under the team's new name
        run = run_script("weights.py", "check", repo_id, env={**env, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")})
        assert run.returncode == 0 and f"checkpoint {snapshot}" in run.stdout, run.stderr
    elsewhere = run_script("weights.py", "check", "AIDC-AI/Ovis-U1-3B",
                           env={**env, "HF_HUB_CACHE": str(tmp_path / "elsewhere")})  # takes precedence over HF_HOME
    assert one_line_error(elsewhere, "python weights.py download AIDC-AI/Ovis-U1-3B")
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        resolve_source(str(tmp_path / "not" / "there"))


# -- the real model: golden tiny checkpoint, tiny checkpoints, the check command ------------------------------------

def golden_checkpoint_dir(tmp_path: Path) -> Path:
    """The golden tiny official checkpoint arranged as a checkpoint directory (a single model.safetensors)."""
    directory = tmp_path / "golden"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(GOLDEN / "tiny_model.safetensors")
    (directory / "config.json").symlink_to(GOLDEN / "tiny_model_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (directory / name).symlink_to(GOLDEN / "tiny_tokenizer" / name)
    return directory


def test_golden_tiny_official_checkpoint_loads_strictly(tmp_path):
    model, config, directory, _ = load_model(golden_checkpoint_dir(tmp_path), dtype=torch.float32)
    official = load_file(str(GOLDEN / "tiny_model.safetensors"))
    ours = model.state_dict()
    assert sorted(ours) == sorted(official)  # the golden file stores the tied lm_head too
    assert all(torch.equal(ours[name], tensor) for name, tensor in official.items())
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert not model.training and config.llm.hidden_size == 64


def test_tiny_checkpoint_has_the_official_layout_and_loads_in_bf16(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "tiny", seed=3, shards=3)
    names = sorted(path.name for path in directory.iterdir())
    assert names == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_FILE, "preprocessor_config.json",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((directory / "config.json").read_text())
    golden = json.loads((ROOT / "tests" / "fixtures" / "Ovis-U1-3B" / "config.json").read_text())  # as published
    assert set(config) - {"tie_word_embeddings"} <= set(golden) and config["model_type"] == "ovis_u1"
    for section in ("llm_config", "visual_tokenizer_config", "visual_generator_config"):
        assert set(config[section]) <= set(golden[section]), set(config[section]) - set(golden[section])
    assert from_official(config, preprocessor_json(tiny_config().preprocess)) == tiny_config()

    model = load_model(directory, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "llm.lm_head.weight" not in open_checkpoint(directory).tensors  # tied, so left out, as published
    # the seed fixes the weights, whatever the sharding
    single = load_file(str(write_tiny_checkpoint(tmp_path / "again", seed=3, shards=1) / "model.safetensors"))
    sharded = {k: v for path in sorted(directory.glob("model-*.safetensors")) for k, v in load_file(str(path)).items()}
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_tiny_tokenizer_speaks_the_qwen_chat_format():
    tokenizer = tiny_tokenizer()
    text = "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert ids.count(tokenizer.token_to_id(token)) == text.count(token) or token == "<|endoftext|>"
    assert tokenizer.get_vocab_size() <= tiny_config().llm.vocab_size


def test_to_official_round_trips():
    for config in (OvisConfig(), tiny_config()):
        written = json.loads(json.dumps(to_official(config)))  # as it goes through config.json
        assert from_official(written, preprocessor_json(config.preprocess)) == config
    golden = from_official(json.loads((GOLDEN / "tiny_model_config.json").read_text()))
    assert from_official(to_official(golden)) == golden


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "weights.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_check_command_exit_codes(tmp_path):
    directory = tmp_path / "tiny"
    assert weights.main(["tiny", str(directory), "--shards", "2"]) == 0
    ok = run_cli("check", str(directory))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "every parameter filled" in ok.stdout and len(ok.stdout.splitlines()) < 12

    shard = directory / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    truncated = run_cli("check", str(directory))
    assert truncated.returncode == 1 and "model-00002-of-00002.safetensors" in truncated.stderr


def test_check_command_names_the_problem(tmp_path, capsys):
    directory = write_tiny_checkpoint(tmp_path / "tiny", shards=2)
    config = json.loads((directory / "config.json").read_text())
    config["llm_config"]["num_hidden_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    assert weights.main(["check", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "llm.model.layers.2" in err

    (directory / "config.json").unlink()
    assert weights.main(["check", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "weights.py download" in err

    assert weights.main(["check", str(tmp_path / "nothing")]) == 1
    assert "weights.py download" in capsys.readouterr().err


def test_check_on_the_golden_checkpoint(tmp_path):
    lines = check_checkpoint(golden_checkpoint_dir(tmp_path))
    assert any("360 tensors" in line for line in lines)


PEAK_MEMORY_SCRIPT = """
import sys, threading, time, torch
from torch import nn
from ovis_min.checkpoint import load_checkpoint

def anon():  # private memory: what a second copy of the weights would add to (mapped file pages are not in it)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))

with torch.device("meta"):
    model = nn.Sequential(*[nn.Linear(2500, 2000, bias=False) for _ in range(10)])
before, peak, done = anon(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
watcher = threading.Thread(target=watch)
watcher.start()
load_checkpoint(model, sys.argv[1], dtype=getattr(torch, sys.argv[2]))
done.set()
watcher.join()
print(max(peak[0], anon()) - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_memory_is_one_copy_of_the_weights(tmp_path):
    """200 MB of float32 loaded as 100 MB of bfloat16: private memory grows by the bf16 copy plus about one float32
    tensor; loaded as float32 it does not grow at all (the parameters are the mapped file, read on first use)."""
    save_checkpoint({f"{i}.weight": torch.randn(2000, 2500) for i in range(10)}, tmp_path, 2)
    weights_bytes, largest_float32 = 10 * 2000 * 2500 * 2, 2000 * 2500 * 4
    for dtype, bound in (("bfloat16", weights_bytes + 2 * largest_float32), ("float32", 2 * largest_float32)):
        result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tmp_path), dtype], capture_output=True,
                                text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) < bound, (dtype, int(result.stdout) / 1e6)


def test_a_load_reads_the_index_once_and_keeps_its_tokenizer(tmp_path, monkeypatch):
    directory = write_tiny_checkpoint(tmp_path / "tiny", shards=3)
    reads = []
    read_index = checkpoint.read_index
    monkeypatch.setattr(checkpoint, "read_index", lambda d: reads.append(d) or read_index(d))
    loaded = load_model(directory, dtype=torch.float32)
    assert len(reads) == 1
    assert loaded.tokenizer.encode("a cat") == Tokenizer(directory).encode("a cat")
