"""LoRA (ovis_min/lora.py, train.py --lora, export --lora-only, sample.py --lora) on the tiny model.

A zero-initialised adapter leaves the model as it was and a merged one computes what the unmerged one does; only
the adapters get gradients and optimizer state; a stage-5 and a stage-3 run overfit a few rows; a run stopped on two
processes resumes on one with the same losses; the adapter file samples the image of the merged export, and a file
made for other weights is refused in one line.
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from ovis_min.checkpoint import build_model, load_model
from ovis_min.config import OvisConfig
from ovis_min.lora import LoRALinear, add_adapters
from ovis_min.tiny import tiny_config
from ovis_min.train import accumulation, losses, memory
from ovis_min.train.adapters import DEFAULT_TARGETS
from ovis_min.train.checkpoint import saved_metadata
from ovis_min.train.data import Batch, collate, t2i_example, understanding_example
from ovis_min.train.stages import make_optimizer
from test_train import manifest, run, tiny  # noqa: F401  (fixtures)
from test_train_checkpoint import FAST, arguments, assert_same_losses, data, logged, two_processes  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")  # ckpt: the tiny checkpoint of conftest.py

# The layers each stage's adapters go on by default, written out here rather than taken from ovis_min/lora.py:
# attention and MLP of the decoder's blocks and the refiner's (stage 5), of the LLM's layers (stage 3).
ADAPTED = {
    5: re.compile(r"visual_generator\.backbone\.(double_blocks\.\d+\.(img|txt)_(attn|self_attn)\.(qkv|proj)"
                  r"|double_blocks\.\d+\.(img|txt)_mlp\.[02]|single_blocks\.\d+\.linear[12]"
                  r"|txt_in\.individual_token_refiner\.blocks\.\d+\.(self_attn_qkv|self_attn_proj|mlp\.fc[12]))"),
    3: re.compile(r"llm\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"),
}
LAYERS = {5: 32, 3: 14}  # of the tiny model: 2 double blocks x 10, 2 single x 2, 2 refiner blocks x 4; 2 LLM x 7
TARGETS = {5: ("decoder", "refiner"), 3: ("llm",)}


def stage_batch(stage: int, cfg, folder: Path) -> Batch:
    if stage == 5:
        example = t2i_example({"image": "red_square.png", "caption": "a red square"}, folder, 0, cfg)
    else:
        example = understanding_example({"images": ["red_square.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red square"}]},
            folder, 0, cfg)
    return collate([example], cfg.tokenizer.pad_token_id)


def step_loss(step: losses.TrainStep, batch: Batch) -> torch.Tensor:
    torch.manual_seed(0)  # the flow loss's noise and time
    return step(batch, accumulation.LossScale(per_token=1.0, per_sample=1.0))[0]


@pytest.mark.parametrize("stage", sorted(ADAPTED))
def test_zero_adapters_change_nothing_merged_equal_unmerged_and_only_adapters_train(stage, ckpt, tiny, manifest):
    _, cfg = tiny
    model = load_model(ckpt, dtype=torch.float32).model.train()
    batch = stage_batch(stage, cfg, manifest.parent)
    base = step_loss(losses.TrainStep(model), batch).detach()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    trained = add_adapters(model, TARGETS[stage], rank=4, alpha=8.0, seed=0)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert len(adapted) == LAYERS[stage] and all(ADAPTED[stage].fullmatch(name) for name in adapted)
    assert sorted(trained) == sorted(f"{name}.lora_{ab}.weight" for name in adapted for ab in "AB")
    step = losses.TrainStep(model)
    loss = step_loss(step, batch)
    assert torch.equal(loss.detach(), base)  # B = 0: exactly the base model

    loss.backward()  # only the adapters get gradients, and only they are in the optimizer
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    assert sorted(with_grad) == sorted(trained) and len(with_grad) == 2 * LAYERS[stage]
    optimizer = make_optimizer(step, train.build_parser().parse_args(["--lr", "1e-3"]))
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    params = dict(model.named_parameters())
    assert len(in_optimizer) == len(trained) and {id(p) for p in in_optimizer} == {id(params[n]) for n in trained}

    with torch.no_grad():
        for name in trained:  # an adapter that does something
            params[name].normal_(std=0.3)
        unmerged = step_loss(step, batch)
        for name in adapted:
            model.get_submodule(name).merge()
        merged = step_loss(step, batch)
        for name in adapted:
            model.get_submodule(name).unmerge()
    assert abs(float(unmerged) - float(base)) > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, value in before.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def runs(ckpt, manifest, tmp_path_factory) -> dict[int, tuple[Path, list[dict]]]:
    """A stage-5 (t2i and edit) and a stage-3 (understanding) LoRA run that overfit one row of each task."""
    root = tmp_path_factory.mktemp("lora")
    done = {}
    for stage, batch in ((5, 2), (3, 1)):
        out = root / f"s{stage}"
        records = run(["--stage", stage, "--init", ckpt, "--data", manifest, "--out", out, "--steps", 8,
                       "--batch", batch, "--micro-batch", 1, "--lr", 1e-2, "--min-lr", 1e-2, "--warmup", 1,
                       "--overfit", 1, "--lora", 4, "--ema-decay", 0.5])
        done[stage] = out, records
    return done


@pytest.mark.parametrize("stage", sorted(ADAPTED))
def test_a_lora_run_overfits_and_its_export_changes_only_the_adapted_layers(stage, ckpt, runs):
    out, records = runs[stage]
    loss = [r["loss"] for r in records]
    assert loss[-1] < 0.5 * loss[0], loss
    assert all(r["tflops"] > 0 and r["memory_gb"] > 0 for r in records)  # the speed and memory of the log line
    step_dir = out / "step-00000008"
    saved = saved_metadata(step_dir)  # the checkpoint: the adapters, their AdamW moments and EMA, nothing else
    adapters = {k[len("weights."):] for k in saved if k.startswith("weights.") and ".lora_" in k}
    assert len(adapters) == 2 * LAYERS[stage]
    assert {k[len("ema."):] for k in saved if k.startswith("ema.")} >= adapters
    moments = {k[len("optimizer.state.model."):].rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")}
    assert moments == adapters

    before = load_model(ckpt, dtype=torch.float32).model.state_dict()
    after = load_model(step_dir, dtype=torch.float32).model.state_dict()  # the merged official-layout export
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"{name}.weight" for name in (a.rsplit(".", 2)[0] for a in adapters)}
    assert all(ADAPTED[stage].fullmatch(name.removesuffix(".weight")) for name in changed)


def test_the_adapter_file_samples_the_image_of_the_merged_export_and_a_wrong_one_is_refused(ckpt, runs, tmp_path,
                                                                                            capsys):
    sample = pytest.importorskip("sample")
    out, _ = runs[5]
    for what in ("", "--ema"):
        train.main(["export", str(out), "--lora-only", "--out", str(tmp_path / f"lora{what}.safetensors")]
                   + ([what] if what else []))
    train.main(["export", str(out), "--ema", "--out", str(tmp_path / "merged-ema")])
    path = tmp_path / "lora.safetensors"
    with safe_open(path, framework="pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert (meta["lora_rank"], float(meta["lora_alpha"]), json.loads(meta["lora_targets"])) == \
        ("4", 4.0, ["decoder", "refiner"])
    assert len(names) == 2 * LAYERS[5] and all(ADAPTED[5].fullmatch(n.rsplit(".", 2)[0]) for n in names)

    common = ["--device", "cpu", "--steps", "2", "--seed", "0", "--prompt", "a red square", "--width", "32",
              "--height", "32"]
    images = {}
    for name, flags in (("lora", ["--weights", ckpt, "--lora", path]), ("merged", ["--weights", out]),
                        ("lora-ema", ["--weights", ckpt, "--lora", tmp_path / "lora--ema.safetensors"]),
                        ("merged-ema", ["--weights", tmp_path / "merged-ema"]), ("base", ["--weights", ckpt]),
                        ("none", ["--weights", ckpt, "--lora", path, "--lora-scale", "0"])):
        assert sample.main([*common, *map(str, flags), "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = Image.open(tmp_path / f"{name}.png").tobytes()
    assert images["lora"] == images["merged"] and images["lora-ema"] == images["merged-ema"]
    assert images["lora"] != images["base"] and images["none"] == images["base"]
    assert images["lora"] != images["lora-ema"]
    assert Image.open(tmp_path / "lora.png").text["lora"] == str(path.resolve())
    prompts = tmp_path / "prompts.jsonl"  # a benchmark set loads its weights the same way
    prompts.write_text(json.dumps({"prompt": "a red square", "id": "a", "width": 32, "height": 32}) + "\n")
    for name, flags in (("set-lora", ["--weights", ckpt, "--lora", path]), ("set-merged", ["--weights", out])):
        assert sample.main(["--device", "cpu", "--steps", "2", "--prompts", str(prompts), *map(str, flags),
                            "--out", str(tmp_path / name)]) == 0
    produced = [sorted(p for p in (tmp_path / name).rglob("*.png")) for name in ("set-lora", "set-merged")]
    assert [len(files) for files in produced] == [1, 1]
    assert Image.open(produced[0][0]).tobytes() == Image.open(produced[1][0]).tobytes()
    # a set's PNG records its LoRA as a single image's does, so --from-png re-makes it with the adapters
    assert Image.open(produced[0][0]).text["lora"] == str(path.resolve())
    assert sample.main(["--from-png", str(produced[0][0]), "--out", str(tmp_path / "again.png")]) == 0
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(produced[0][0]).tobytes()
    capsys.readouterr()

    adapters = load_file(path)
    name = next(iter(adapters)).rsplit(".", 2)[0]
    wrong = {"shape": {**adapters, f"{name}.lora_A.weight": torch.zeros(4, 7)},
             "name": {**adapters, "llm.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                      "llm.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}}
    for kind, tensors in wrong.items():
        save_file(tensors, str(tmp_path / f"{kind}.safetensors"), metadata=meta)
    cases = {"shape": ("other shapes", name), "name": ("unknown layers", "layers.9"),
             "model.safetensors": ("not LoRA adapters",)}
    for kind, words in cases.items():
        bad = ckpt / "model-00001-of-00002.safetensors" if kind == "model.safetensors" else \
            tmp_path / f"{kind}.safetensors"
        assert sample.main([*common, "--weights", str(ckpt), "--lora", str(bad), "--out", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err
        error, = [line for line in err.splitlines() if line.startswith("sample.py: error:")]
        assert "Traceback" not in err and str(bad) in error and all(w in error for w in words), err
        assert "loading" not in err  # refused before the model loads


def test_lora_resumes_from_two_processes_on_one_with_the_same_losses(ckpt, data, tmp_path):
    """DDP on two processes, stopped, continued on one: the adapters, their AdamW state and EMA reshard."""
    lora = ["--lora", "4", "--ema-decay", "0.5", "--steps", "4"]
    whole = train.main(arguments(ckpt, data, tmp_path / "whole", *lora))
    out = tmp_path / "run"
    two_processes(arguments(ckpt, data, out, *lora, "--stop-after", "2"), tmp_path)
    assert [r["replicas_identical"] for r in logged(out) if "replicas" in r] == [True]  # DDP kept them in step
    train.main(["--resume", str(out), *FAST])
    assert_same_losses(logged(out), whole)
    a, b = (load_file(run / "step-00000004" / "model.safetensors") for run in (tmp_path / "whole", out))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_lora_options_that_cannot_work_are_one_line(ckpt, manifest, tmp_path, capsys):
    common = ["--init", ckpt, "--data", manifest, "--out", tmp_path / "x"]
    for args, words in (([5, "--lora", 4, "--lora-targets", "llm"], ["--lora-targets llm", "decoder, refiner"]),
                        ([0, "--lora", 4, "--scratch"], ["--lora", "--scratch"]),
                        ([3, "--lora-alpha", 8], ["--lora-alpha", "--lora RANK"])):
        with pytest.raises(SystemExit, match=".*".join(map(re.escape, words))):
            run(["--stage", *args, *common])
    out = tmp_path / "run"
    run(["--stage", 5, *common[:-1], out, "--steps", 2, "--batch", 2, "--micro-batch", 1, "--lora", 4,
         "--stop-after", 1])
    with pytest.raises(SystemExit, match="other LoRA settings.*lora 4 -> 8"):
        run(["--resume", out, "--lora", 8])
    plain = tmp_path / "plain"
    run(["--stage", 5, *common[:-1], plain, "--steps", 1, "--batch", 1, "--micro-batch", 1, "--mix", "t2i=1"])
    with pytest.raises(SystemExit, match="not a LoRA run.*without --lora-only"):
        train.main(["export", str(plain), "--lora-only", "--out", str(tmp_path / "a.safetensors")])
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "--lora 32 --out runs/edit-lora" in text and "--lora 16" in text and "--lora-only" in text


def test_fsdp_lora_with_validation_and_samples_resumes_on_one_process(ckpt, manifest, tmp_path):
    """Stage 3 shards the LLM's blocks (FSDP), adapters with them; validation and sampled answers gather them."""
    row = json.loads(manifest.read_text().splitlines()[0])
    row["images"] = [str(manifest.parent / name) for name in row["images"]]
    (tmp_path / "val.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"question": "What is it?", "image": str(manifest.parent /
                                                        "red_square.png"), "max_new_tokens": 3}) + "\n")
    common = [str(a) for a in ["--stage", 3, "--init", ckpt, "--data", manifest, "--steps", 4, "--batch", 2,
                               "--micro-batch", 1, "--lr", 1e-2, "--overfit", 1, "--lora", 4, "--save-every", 1,
                               "--val-data", tmp_path / "val.jsonl", "--val-every", 2, *FAST]]
    whole = train.main([*common, "--out", str(tmp_path / "whole")])
    out = tmp_path / "run"
    two_processes([*common, "--out", str(out), "--stop-after", "2", "--sample-prompts",
                   str(tmp_path / "prompts.jsonl"), "--sample-every", "2"], tmp_path)
    answer, = json.loads((out / "samples" / "step-00000002" / "samples.json").read_text())
    assert isinstance(answer["answer"], str)
    train.main(["--resume", str(out), *FAST])
    assert_same_losses([r for r in logged(out) if "loss" in r], [r for r in whole if "loss" in r])
    validated = [r for r in logged(out) if "val_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    torch.testing.assert_close(torch.tensor([r["val_loss"]["understanding"] for r in validated]),
                               torch.tensor([r["val_loss"]["understanding"] for r in whole if "val_loss" in r]))


def test_a_lora_run_from_the_cache_has_the_losses_of_one_without(ckpt, data, tmp_path):
    """The cache holds the frozen LLM's and VAE's work; the adapters are on the decoder, which the cache leaves out."""
    cache = tmp_path / "cache"
    train.main([str(a) for a in ["cache", "--stage", 0, "--init", ckpt, "--data", data, "--out", cache,
                                 "--resolution", 32]])
    uncached = train.main(arguments(ckpt, data, tmp_path / "a", "--lora", "4", "--steps", "3"))
    cached = train.main(arguments(ckpt, data, tmp_path / "b", "--lora", "4", "--steps", "3", "--cache", str(cache)))
    assert_same_losses(cached, uncached)


def test_the_readme_quotes_the_lora_memory_rows_and_the_measurement_runs_lora_steps(ckpt, tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert memory.lora_table() in readme
    # the estimate's adapter count is the count of the adapters train.py puts on the full-size model
    for stage in (5, 3):
        model = build_model(OvisConfig())
        adapters = add_adapters(model, DEFAULT_TARGETS[stage], memory.LORA_RANK, 1.0, seed=0)
        count = sum(model.get_parameter(name).numel() for name in adapters)
        assert memory.lora_estimate(stage, True).optimizer == 8 * count
    assert memory.lora_estimate(5, checkpointing=True).total < 16e9  # the editing fine-tune: a 16 GB GPU
    short = replace(tiny_config(), multimodal_max_length=memory.SUPERVISED_TOKENS + 128)  # fast on a CPU
    result = memory.measure(3, ckpt, torch.device("cpu"), tmp_path, config=short, micro_batch=1, steps=1, lora=4)
    assert set(result["peak_bytes"]) == {"understanding"}
    assert result["estimate_bytes"] == memory.lora_estimate(3, True, rank=4, micro_batch=1).total
