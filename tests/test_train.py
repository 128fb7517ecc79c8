"""train.py and ovis_min/data.py on the tiny model with a small synthetic dataset drawn with PIL.

Per stage: the loss falls on a repeated batch, exactly the stage's parameters change, and the checkpoint is a
strict official-layout checkpoint. Resuming continues exactly; two CPU processes (DDP, and FSDP for stage 3) agree.
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import train
from ovis_min import losses
from ovis_min.checkpoint import load_model, open_checkpoint
from ovis_min.data import (DataConfig, Mixture, SkipRow, collate, edit_example, index_manifests, load_example,
                           t2i_example, understanding_example)
from ovis_min.prompt import Tokenizer
from ovis_min.stages import STAGES, set_trainable

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 60), "yellow": (230, 200, 20)}
RESOLUTION = 32

# What each stage must change, written out here rather than taken from train.py. The encoder's final norm is never
# used (the adapter reads the last block before it), so it is not trained.
TRAINED = {
    0: ("visual_generator.backbone.",),
    1: ("visual_tokenizer.head.", "vte."),
    2: ("visual_tokenizer.", "vte."),
    3: ("visual_tokenizer.", "vte.", "llm."),
    4: ("visual_generator.backbone.",),
    5: ("visual_generator.backbone.",),
}
TASKS = {0: 1, 1: 3, 2: 3, 3: 1, 4: 1, 5: 2}  # tasks per stage: one micro-batch of each per step
UNUSED = "visual_tokenizer.backbone.trunk.post_trunk_norm."


def draw(path: Path, color: str, shape: str, size: int = 48) -> str:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = [10, 12, size - 10, size - 12]
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLORS[color])
    image.save(path)
    return path.name


pytestmark = pytest.mark.usefixtures("single_thread")  # ckpt: the tiny checkpoint of conftest.py


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Good rows of every task first (--overfit uses the first rows), then one bad row of every kind."""
    root = tmp_path_factory.mktemp("data")
    images = {(c, s): draw(root / f"{c}_{s}.png", c, s) for c in COLORS for s in ("square", "circle")}
    rows = []
    for (color, shape), name in images.items():
        rows.append({"images": [name], "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": f"a {color} {shape}"}]})
        rows.append({"image": name, "caption": f"a {color} {shape} on white"})
    rows.append({"conversations": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]})
    rows.append({"images": [images["red", "square"], images["blue", "circle"]], "conversations": [
        {"from": "human", "value": "Image 1: <image>\nImage 2: <image>\nWhich is round?"},
        {"from": "gpt", "value": "the second"}]})
    for a, b in (("red", "blue"), ("green", "yellow"), ("blue", "red")):
        rows.append({"source": images[a, "square"], "instruction": f"make the square {b}",
                     "target": images[b, "square"]})
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    bad = [
        {"image": "missing.png", "caption": "nothing here"},  # missing image
        {"images": ["broken.png"], "conversations": [{"from": "human", "value": "<image>\nx"},
                                                     {"from": "gpt", "value": "y"}]},  # unreadable image
        {"image": images["red", "square"], "caption": "xyz " * 4000},  # too long for the model
        {"conversations": [{"from": "human", "value": "no answer follows"}]},  # nothing to learn
        {"source": images["red", "square"], "instruction": 7, "target": images["red", "square"]},  # malformed
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + bad) + "{not json\n")
    # For two processes with --overfit 2: rank 0 always gets the first row of a task, rank 1 the second, so rank 1's
    # understanding batches never hold an image while rank 0's always do.
    split = [rows[0], rows[16], rows[1], rows[3], rows[18], rows[19]]
    assert "images" in rows[0] and "images" not in rows[16] and "instruction" in rows[18]
    (root / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    return path


def run(args: list) -> list[dict]:
    return train.main([str(a) for a in [*args, "--resolution", RESOLUTION, "--workers", 0]])


def state(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(directory, dtype=torch.float32).model.state_dict()


# -- each stage ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(TRAINED))
def test_stage_learns_changes_only_its_parts_and_writes_an_official_checkpoint(stage, ckpt, manifest, tmp_path):
    out = tmp_path / "run"
    records = run(["--stage", stage, "--init", ckpt, "--data", manifest, "--out", out, "--steps", 6,
                   "--batch", TASKS[stage], "--micro-batch", 1, "--lr", 2e-3, "--min-lr", 2e-3, "--warmup", 1,
                   "--overfit", 1])
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and losses[-1] < 0.95 * losses[0], losses
    assert set(records[0]["task_loss"]) == set(STAGES[stage].mix)
    # speed: FLOPs counted on the first micro-batches, an ETA that reaches 0, no MFU on a CPU (no known peak)
    assert all(r["tflops"] > 0 and r["mfu"] is None for r in records)
    assert records[0]["eta_s"] > 0 and records[-1]["eta_s"] == 0

    step_dir = out / "step-00000006"
    assert (out / "latest").read_text().strip() == step_dir.name
    assert set(open_checkpoint(step_dir).tensors) == set(open_checkpoint(ckpt).tensors)  # the official names
    before, after = state(ckpt), state(step_dir)  # load_model is the strict loader
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {name for name in before if name.startswith(TRAINED[stage]) and not name.startswith(UNUSED)}
    assert changed == expected, (sorted(changed - expected)[:5], sorted(expected - changed)[:5])


def test_scratch_reinitialises_the_stage0_decoder_and_learns(ckpt, manifest, tmp_path):
    records = run(["--stage", 0, "--scratch", "--init", ckpt, "--data", manifest, "--out", tmp_path, "--steps", 5,
                   "--batch", 1, "--micro-batch", 1, "--lr", 3e-3, "--warmup", 1, "--overfit", 1])
    assert records[-1]["loss"] < records[0]["loss"]
    before, after = state(ckpt), state(tmp_path / "step-00000005")
    for name in before:
        assert torch.equal(before[name], after[name]) != name.startswith("visual_generator.backbone."), name


def test_a_stage_without_data_for_one_of_its_tasks_says_how_to_mix(ckpt, manifest, tmp_path):
    only_t2i = tmp_path / "t2i.jsonl"
    only_t2i.write_text(json.dumps({"image": str(manifest.parent / "red_square.png"), "caption": "red"}) + "\n")
    with pytest.raises(SystemExit, match="no understanding or edit rows.*--mix"):
        run(["--stage", 1, "--init", ckpt, "--data", only_t2i, "--out", tmp_path])
    records = run(["--stage", 1, "--init", ckpt, "--data", only_t2i, "--out", tmp_path, "--mix", "t2i=1",
                   "--steps", 1, "--batch", 1, "--micro-batch", 1])
    assert set(records[0]["task_loss"]) == {"t2i"}


def test_scratch_is_refused_for_stages_the_report_does_not_start_from_scratch(ckpt, manifest, tmp_path):
    with pytest.raises(SystemExit, match="--scratch"):
        run(["--stage", 4, "--scratch", "--init", ckpt, "--data", manifest, "--out", tmp_path])


def test_a_trained_checkpoint_samples_with_sample_py(ckpt, manifest, tmp_path, capsys):
    """--weights takes a step directory, or the run directory (its newest step)."""
    sample = pytest.importorskip("sample")
    run(["--stage", 5, "--init", ckpt, "--data", manifest, "--out", tmp_path, "--steps", 1, "--batch", 2,
         "--micro-batch", 1])
    common = ["--device", "cpu", "--steps", 2, "--seed", 0]
    assert sample.main([str(a) for a in [*common, "--weights", tmp_path / "step-00000001", "--prompt", "a red square",
                                         "--width", 32, "--height", 32, "--out", tmp_path / "t2i.png"]]) == 0
    assert sample.main([str(a) for a in [*common, "--weights", tmp_path, "--image", manifest.parent / "red_square.png",
                                         "--prompt", "make it blue", "--out", tmp_path / "edit.png"]]) == 0
    assert Image.open(tmp_path / "t2i.png").size == (32, 32)
    assert Image.open(tmp_path / "edit.png").text["model"] == str((tmp_path / "step-00000001").resolve())


# -- resume ----------------------------------------------------------------------------------------------------

def test_resume_continues_exactly(ckpt, manifest, tmp_path):
    common = ["--stage", 2, "--init", ckpt, "--data", manifest, "--steps", 4, "--batch", 6, "--micro-batch", 2,
              "--lr", 1e-3]
    whole = run([*common, "--out", tmp_path / "a"])
    first = run([*common, "--out", tmp_path / "b", "--stop-after", 2])
    rest = run(["--resume", tmp_path / "b"])  # the other arguments come from the checkpoint
    assert [r["step"] for r in first + rest] == [1, 2, 3, 4]
    for key in ("loss", "task_loss", "grad_norm", "lr", "skipped"):
        assert [r[key] for r in first + rest] == [r[key] for r in whole], key
    a = load_file(tmp_path / "a" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "b" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- two processes ---------------------------------------------------------------------------------------------

def torchrun(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *map(str, args), "--resolution", str(RESOLUTION), "--workers", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_ddp_keep_identical_replicas(ckpt, manifest, tmp_path):
    """Stage 1 mixes all tasks, one micro-batch per step: step 1 reduces gradients after an understanding batch
    in which rank 1 has no image (see `manifest`), then accumulation over the next steps."""
    out = tmp_path / "ddp"
    common = ["--stage", 1, "--init", ckpt, "--data", manifest.parent / "split.jsonl", "--micro-batch", 1,
              "--overfit", 2, "--steps", 4]
    torchrun([*common, "--out", out, "--batch", 2, "--stop-after", 2], tmp_path)
    torchrun([*common, "--out", out, "--batch", 6, "--resume", out], tmp_path)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in log] == [1, 2, None, 3, 4, None]
    assert set(log[0]["task_loss"]) == {"understanding"} and len(log[3]["task_loss"]) == 3
    assert log[-1]["replicas_identical"] and len(log[-1]["replicas"]) == 2
    state(out / "step-00000004")


def test_two_processes_fsdp_for_the_llm_stage(ckpt, manifest, tmp_path):
    """With validation on 3 rows (one process evaluates a padding batch) and sampled answers, both of which
    gather the sharded weights in step on both processes."""
    out = tmp_path / "fsdp"
    lines = manifest.read_text().splitlines()
    (tmp_path / "val.jsonl").write_text("\n".join([lines[0], lines[2], lines[16]]) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"question": "What is it?", "image": str(manifest.parent /
                                                        "red_square.png"), "max_new_tokens": 3}) + "\n")
    torchrun(["--stage", 3, "--init", ckpt, "--data", manifest.parent / "split.jsonl", "--out", out, "--steps", 2,
              "--batch", 4, "--micro-batch", 1, "--lr", 1e-3, "--overfit", 2, "--val-data", tmp_path / "val.jsonl",
              "--val-every", 2, "--sample-prompts", tmp_path / "prompts.jsonl", "--sample-every", 2], tmp_path)
    before, after = state(ckpt), state(out / "step-00000002")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {n for n in before if n.startswith(TRAINED[3]) and not n.startswith(UNUSED)}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], set(r["val_loss"])) for r in log if "val_loss" in r] == [(2, {"understanding"})]
    answer, = json.loads((out / "samples" / "step-00000002" / "samples.json").read_text())
    assert isinstance(answer["answer"], str)


# -- the loss pieces -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(ckpt):
    loaded = load_model(ckpt, dtype=torch.float32)
    cfg = DataConfig(Tokenizer(ckpt), loaded.config.preprocess, loaded.config.multimodal_max_length, RESOLUTION,
                     drop_prompt=0.0, drop_image=0.0)
    return loaded.model, cfg


def test_training_condition_equals_the_inference_condition_row_by_row(tiny, manifest):
    model, cfg = tiny
    base = manifest.parent
    short = t2i_example({"image": "red_square.png", "caption": "red"}, base, 1, cfg)
    long = t2i_example({"image": "blue_circle.png", "caption": "a blue circle, drawn large, in the middle"}, base, 2,
                       cfg)
    batch = collate([short, long], cfg.tokenizer.pad_token_id)
    with torch.no_grad():
        txt, mask = model.generation_condition(batch.input_ids, batch.attention_mask, batch.pixel_values,
                                               batch.grid_thws, left_padding=False)
    for row, example in enumerate((short, long)):
        alone = model.generation_condition(example.input_ids[None], torch.ones(1, len(example.input_ids), dtype=bool),
                                           example.pixel_values, example.grid_thws)[0][0]
        assert int(mask[row].sum()) == len(alone)
        torch.testing.assert_close(txt[row, :len(alone)], alone, rtol=1e-5, atol=1e-5)


def test_a_samples_flow_loss_does_not_depend_on_its_batch_mates(tiny, manifest):
    """Padding of shorter prompts and the dummy source tokens of rows without a source image are masked out, and
    each sample's noise and time come from its own seed."""
    model, cfg = tiny
    row = {"source": "red_square.png", "instruction": "make the square blue", "target": "blue_square.png"}
    edit = edit_example(row, manifest.parent, 5, cfg)
    no_image = edit_example(row, manifest.parent, 6, replace(cfg, drop_image=1.0))  # "no text, no image" branch
    assert edit.source is not None and no_image.source is None
    with torch.no_grad():
        together, _ = losses.generation_loss(model, collate([edit, no_image], cfg.tokenizer.pad_token_id), False)
        alone = [losses.generation_loss(model, collate([e], cfg.tokenizer.pad_token_id), False)[0]
                 for e in (edit, no_image)]
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)


def test_understanding_loss_is_cross_entropy_on_the_answer_tokens_only(tiny, manifest):
    model, cfg = tiny
    example = understanding_example({"images": ["green_circle.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a green circle"}]},
        manifest.parent, 0, cfg)
    answer = cfg.tokenizer.encode("a green circle<|im_end|>")
    assert example.labels[example.labels != -100].tolist() == answer
    batch = collate([example], cfg.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, _ = losses.understanding_loss(model, batch)
        merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                    batch.labels, left_padding=False)
        logits = model.llm(inputs_embeds=merged.embeds, attention_mask=merged.attention_mask)
        expected = torch.nn.functional.cross_entropy(logits[0, :-1], merged.labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_text_only_batches_still_give_every_trained_weight_a_gradient(ckpt, tiny):
    """DDP and FSDP need the same parameters used on every rank, also when a rank's batch has no image."""
    model = load_model(ckpt, dtype=torch.float32).model
    trained = set_trainable(model, 2)
    cfg = tiny[1]
    example = understanding_example({"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "gpt", "value": "hello"}]}, Path("."), 0, cfg)
    loss, _ = losses.TrainStep(model)(collate([example], cfg.tokenizer.pad_token_id))
    loss.backward()
    params = dict(model.named_parameters())
    assert all(params[name].grad is not None for name in trained)


# -- data ------------------------------------------------------------------------------------------------------

def test_bad_rows_are_skipped_and_counted_by_reason(manifest, tiny):
    manifests = index_manifests([manifest])
    assert manifests.malformed == 1  # the line that is not JSON
    reasons = []
    for task, refs in manifests.rows.items():
        for ref in refs:
            try:
                load_example(manifests, task, ref, 0, tiny[1])
            except SkipRow as skip:
                reasons.append(skip.reason)
    assert sorted(reasons) == sorted(["missing image", "unreadable image", "too long", "no answer", "malformed"])

    mixture = Mixture(manifests, {"t2i": 1}, tiny[1])
    batches = [mixture.next_batch(3) for _ in range(4)]  # more than an epoch of 8 good and 2 bad t2i rows
    assert all(len(b) == 3 for b in batches)
    assert mixture.skipped["missing image"] + mixture.skipped["too long"] >= 2


def test_tasks_are_interleaved_in_their_ratios(manifest, tiny):
    mixture = Mixture(index_manifests([manifest]), {"understanding": 2, "t2i": 1, "edit": 1}, tiny[1])
    order = [mixture.next_task() for _ in range(8)]
    assert order == ["understanding", "t2i", "edit", "understanding"] * 2


def test_help_explains_stages_data_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for stage in STAGES:
        assert f"RUN --stage {stage} " in text
    for needle in ("conversations", "caption", "instruction", "torchrun", "--resume", "flow matching"):
        assert needle in text
