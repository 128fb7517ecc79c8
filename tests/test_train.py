"""train.py and ovis_min/train/data.py on the tiny model with a small synthetic dataset drawn with PIL.

Per stage: the loss falls on a repeated batch, exactly the stage's parameters change, and the checkpoint is a
strict official-layout checkpoint. Resuming continues exactly; two CPU processes (DDP, and FSDP for stage 3) agree.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import train
from ovis_min.train import accumulation, losses
from ovis_min.checkpoint import load_model, open_checkpoint
from ovis_min import vae
from ovis_min.train import data, frozen_cache
from ovis_min import model as model_module
from ovis_min.train.data import (DataConfig, Loader, MicroBatchData, Mixture, SkipRow, collate, edit_example,
                                 index_manifests, load_example, read_row, scan_manifest, t2i_example, understanding_example)
from ovis_min.preprocess import blank_image, condition_images, resize_center_crop
from ovis_min.prompt import UNCONDITIONAL_PROMPT, Tokenizer, preprocess_inputs, t2i_prompt
from ovis_min.train.distributed import Runtime
from ovis_min.train.stages import STAGES, set_trainable
from ovis_min.train.throughput import Throughput
from ovis_min.tiny import write_tiny_checkpoint

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
    # With --overfit 2 a run's understanding samples alternate between the first row (an image) and the second (none).
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


def test_loader_worker_processes_give_the_same_run_and_resume_exactly(ckpt, manifest, tmp_path):
    """Rows are loaded ahead by two worker processes; the checkpoint holds the position the training consumed, not
    the one the workers had read ahead to."""
    common = ["--stage", 5, "--init", ckpt, "--data", manifest, "--steps", 3, "--batch", 4, "--micro-batch", 2,
              "--resolution", RESOLUTION]
    inline = run([*common, "--out", tmp_path / "a"])
    with_workers = [*map(str, common), "--out", str(tmp_path / "b"), "--workers", "2"]
    first = train.main([*with_workers, "--stop-after", "1"])
    rest = train.main(["--resume", str(tmp_path / "b")])  # with its 2 workers
    for key in ("loss", "task_loss", "grad_norm", "skipped"):
        assert [r[key] for r in first + rest] == [r[key] for r in inline], key
    assert all(r["data_wait_s"] >= 0 and r["compute_s"] > 0 for r in first + rest)


def test_the_global_batches_do_not_depend_on_processes_or_micro_batches(manifest):
    """What each step trains on, and the position a checkpoint keeps, are the same on 1 or 3 processes."""
    manifests = index_manifests([manifest])
    ratios = {"understanding": 1, "t2i": 1, "edit": 1}
    one = Mixture(manifests, ratios)
    steps = [one.next_global_batch(6) for _ in range(3)]
    for world, micro_batch in ((3, 1), (2, 3), (1, 2)):
        sampler = iter(data.RankSampler(Mixture(manifests, ratios), 6, micro_batch, 0, 1))
        shares = [iter(data.RankSampler(Mixture(manifests, ratios), 6, micro_batch, r, world)) for r in range(world)]
        for step in steps:
            per_rank = [[d for _ in range(6 // (micro_batch * world)) for d in next(share)] for share in shares]
            assert sorted((d.task, d.position) for rank in per_rank for d in rank) == \
                sorted((d.task, d.position) for d in step), (world, micro_batch)
            assert [d for _ in range(6 // micro_batch) for d in next(sampler)] == step
    resumed = Mixture(manifests, ratios)
    resumed.load_state_dict(one.state_dict())
    assert resumed.next_global_batch(6) == one.next_global_batch(6)


# -- two processes ---------------------------------------------------------------------------------------------

def torchrun(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *map(str, args), "--resolution", str(RESOLUTION), "--workers", "0"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_ddp_keep_identical_replicas(ckpt, manifest, tmp_path):
    """Stage 1 mixes all tasks and each rank draws its own: step 1 reduces gradients after rank 0 ran an
    understanding batch and rank 1 a T2I one, step 2 after a text-only understanding batch (see `manifest`) on rank 0
    and an edit on rank 1, then accumulation over the next steps."""
    out = tmp_path / "ddp"
    common = ["--stage", 1, "--init", ckpt, "--data", manifest.parent / "split.jsonl", "--micro-batch", 1,
              "--overfit", 2, "--steps", 4]
    torchrun([*common, "--out", out, "--batch", 2, "--stop-after", 2], tmp_path)
    torchrun([*common, "--out", out, "--batch", 6, "--resume", out], tmp_path)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in log] == [1, 2, None, 3, 4, None]
    assert set(log[0]["task_loss"]) == {"understanding", "t2i"}
    assert set(log[1]["task_loss"]) == {"understanding", "edit"}
    assert len(log[3]["task_loss"]) == 3
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
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_understanding_loss_is_cross_entropy_on_the_answer_tokens_only(tiny, manifest):
    model, cfg = tiny
    example = understanding_example({"images": ["green_circle.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a green circle"}]},
        manifest.parent, 0, cfg)
    answer = cfg.tokenizer.encode("a green circle<|im_end|>")
    assert example.labels[example.labels != -100].tolist() == answer
    batch = collate([example], cfg.tokenizer.pad_token_id)
    assert batch.supervised_tokens == len(answer)
    with torch.no_grad():
        loss_sum, _, _ = losses.understanding_loss(model, batch)
        merged = model.merge_inputs(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.grid_thws,
                                    batch.labels, left_padding=False)
        logits = model.llm(inputs_embeds=merged.embeds, attention_mask=merged.attention_mask)
        expected = torch.nn.functional.cross_entropy(logits[0, :-1], merged.labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss_sum / len(answer), expected)


def test_text_only_batches_still_give_every_trained_weight_a_gradient(ckpt, tiny):
    """DDP and FSDP need the same parameters used on every rank, also when a rank's batch has no image."""
    model = load_model(ckpt, dtype=torch.float32).model
    trained = set_trainable(model, 2)
    cfg = tiny[1]
    example = understanding_example({"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "gpt", "value": "hello"}]}, Path("."), 0, cfg)
    batch = collate([example], cfg.tokenizer.pad_token_id)
    loss, _ = losses.TrainStep(model)(batch, accumulation.LossScale(per_token=1.0, per_sample=1.0))
    loss.backward()
    params = dict(model.named_parameters())
    assert all(params[name].grad is not None for name in trained)


# -- loss weighting over the window ----------------------------------------------------------------------------

def window_gradients(ckpt: Path, manifest: Path, batch: int, micro_batch: int, rank: int = 0,
                     world: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of stage 1's first optimizer step (all three tasks) on this rank, after the DDP reduction."""
    loaded = load_model(ckpt, dtype=torch.float32)
    trained = set_trainable(loaded.model, 1)
    cfg = DataConfig(Tokenizer(ckpt), loaded.config.preprocess, loaded.config.multimodal_max_length, RESOLUTION)
    manifests = index_manifests([manifest])
    mixture = Mixture(manifests, {"understanding": 1, "t2i": 1, "edit": 1})
    loader = Loader(mixture, MicroBatchData(mixture, cfg),
                    batch, micro_batch, rank, world)
    runtime = Runtime(rank, world, torch.device("cpu"))
    step = losses.TrainStep(loaded.model)
    module = torch.nn.parallel.DistributedDataParallel(step) if world > 1 else step
    micro_batches = [next(loader) for _ in range(batch // (micro_batch * world))]
    accumulation.backward_window(module, micro_batches, runtime, contextlib.nullcontext(), Throughput(None))
    params = dict(loaded.model.named_parameters())
    return {name: params[name].grad for name in sorted(trained)}


def _two_process_gradients(rank: int, ckpt: Path, manifest: Path, out: Path) -> None:
    """Micro-batches of 1 (3 per rank) and of 3 (one per rank, holding several tasks)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2)
    try:
        grads = [window_gradients(ckpt, manifest, 6, micro_batch, rank, 2) for micro_batch in (1, 3)]
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_the_same_global_batch_gives_the_same_gradient_however_it_is_split(ckpt, manifest, tmp_path):
    """6 samples of three tasks: one micro-batch holding all three, 3 or 6 micro-batches, 2 processes with 3
    micro-batches each or one mixed one each. Answers of different lengths land in different micro-batches, so a
    mean per micro-batch would weigh their tokens differently."""
    whole = window_gradients(ckpt, manifest, 6, 6)
    assert all(g is not None and g.abs().sum() > 0 for g in whole.values())
    splits = [window_gradients(ckpt, manifest, 6, 2), window_gradients(ckpt, manifest, 6, 1)]
    torch.multiprocessing.spawn(_two_process_gradients, args=(ckpt, manifest, tmp_path / "grads.pt"), nprocs=2)
    splits += torch.load(tmp_path / "grads.pt")
    for grads in splits:
        assert grads.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(grads[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


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

    mixture = Mixture(manifests, {"t2i": 1})
    loader = Loader(mixture, MicroBatchData(mixture, tiny[1]), batch=3, micro_batch=3,
                    rank=0, world=1)
    batches = [next(loader) for _ in range(4)]  # more than an epoch of 8 good and 2 bad t2i rows
    assert all(len(b) == 3 for b in batches)
    assert sum(b.skipped["missing image"] + b.skipped["too long"] for b in batches) >= 2


def test_the_blank_condition_and_the_unconditional_ids_are_made_once(tiny, manifest, monkeypatch):
    model, cfg = tiny
    cfg = replace(cfg, made={})
    calls = []
    monkeypatch.setattr(data, "condition_images", lambda *a: calls.append(a) or condition_images(*a))
    examples = [t2i_example({"image": "red_square.png", "caption": caption}, manifest.parent, seed,
                            replace(cfg, drop_prompt=drop)) for seed, (caption, drop) in
                enumerate([("red", 0.0), ("a blue one", 0.0), ("dropped", 1.0), ("dropped too", 1.0)])]
    assert len(calls) == 1
    encoder_image, _ = condition_images(blank_image(RESOLUTION, RESOLUTION), RESOLUTION, RESOLUTION, cfg.preprocess)
    for example, prompt in zip(examples, [t2i_prompt("red"), t2i_prompt("a blue one"), UNCONDITIONAL_PROMPT,
                                          UNCONDITIONAL_PROMPT]):
        input_ids, _, pixel_values, grid_thws = preprocess_inputs(cfg.tokenizer, prompt, [encoder_image],
                                                                  cfg.preprocess, generation_preface=None)
        assert torch.equal(example.input_ids, input_ids) and torch.equal(example.pixel_values, pixel_values)
        assert torch.equal(example.grid_thws, grid_thws)


def test_a_manifest_is_indexed_once_until_it_changes(manifest, tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    path.write_bytes(manifest.read_bytes())
    first = index_manifests([path])
    scans = []
    monkeypatch.setattr(data, "scan_manifest", lambda p: scans.append(p) or scan_manifest(p))
    again = index_manifests([path])  # another rank, or the next run
    assert scans == [] and again.malformed == first.malformed == 1
    assert {t: list(r) for t, r in again.rows.items()} == {t: list(r) for t, r in first.rows.items()}

    with open(path, "a") as f:  # an edited manifest is indexed again, and its old index removed
        f.write(json.dumps({"image": "red_square.png", "caption": "one more"}) + "\n")
    grown = index_manifests([path])
    assert len(scans) == 1 and len(grown.rows["t2i"]) == len(first.rows["t2i"]) + 1
    assert len(list(tmp_path.glob("m.jsonl.index-*.npy"))) == 1
    assert read_row(grown, grown.rows["t2i"][len(grown.rows["t2i"]) - 1])[0]["caption"] == "one more"

    index_file, = tmp_path.glob("m.jsonl.index-*.npy")
    index_file.write_bytes(b"not an index")  # a damaged index is made again
    assert len(index_manifests([path]).rows["t2i"]) == len(grown.rows["t2i"]) and len(scans) == 2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Generation rows of several aspect ratios, and edits whose target is a little off the source's shape."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for i, (height, width) in enumerate([(100, 200), (200, 100), (90, 90), (140, 150), (60, 130), (130, 70)] * 2):
        Image.new("RGB", (width, height), tuple(COLORS.values())[i % 4]).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture {i}", "width": width, "height": height})
    for i in range(3):
        Image.new("RGB", (200, 104), (255, 255, 255)).save(root / f"target{i}.png")
        rows.append({"source": f"{i}.png", "instruction": "make it white", "target": f"target{i}.png"})
    rows.append({"images": ["0.png"], "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                        {"from": "gpt", "value": "a red picture"}]})
    rows.append({"conversations": [{"from": "human", "value": "Say hi, please, to everyone in the room."},
                                   {"from": "gpt", "value": "hi"}]})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "rows.jsonl"


def test_generation_micro_batches_are_aspect_ratio_buckets(tiny, shapes):
    cfg = replace(tiny[1], resolution=96, buckets=data.bucket_table(96), made={})
    assert cfg.buckets == [(64, 128), (96, 96), (128, 64)]
    manifests = index_manifests([shapes])
    mixture = Mixture(manifests, {"t2i": 2, "edit": 1})
    loader = Loader(mixture, MicroBatchData(mixture, cfg), batch=6, micro_batch=3, rank=0, world=1)
    parts = [part for _ in range(6) for part in next(loader).parts]
    assert len({part.target.shape[-2:] for part in parts}) == 3  # every part is one bucket (a stack of one shape)
    for _ in range(3):  # a global batch sorts each task's samples by aspect ratio, so micro-batches rarely mix buckets
        draws = mixture.next_global_batch(6)
        for task in ("t2i", "edit"):
            keys = [mixture.batching_key(d) for d in draws if d.task == task]
            assert keys == sorted(keys) and (task == "edit" or len(set(keys)) > 1)  # edits: no width/height given
    for part in (p for p in parts if p.task == "edit" and p.source is not None):
        assert part.source.shape == part.target.shape  # an edit's images share the source's bucket
    for name in sorted({r.name for r in shapes.parent.glob("*.png")}):  # covered and cropped, never stretched
        image = Image.open(shapes.parent / name)
        height, width = data.nearest_bucket(cfg.buckets, image.height, image.width)
        assert abs(math.log(height / width) - math.log(image.height / image.width)) < 0.4, name
        example = t2i_example({"image": name, "caption": "x"}, shapes.parent, 0, cfg)
        assert torch.equal(example.target, resize_center_crop(image, height, width))


def test_the_timestep_shift_follows_the_buckets_token_count(tiny, shapes, monkeypatch):
    model, cfg = tiny
    cfg = replace(cfg, resolution=64, buckets=data.bucket_table(64), made={})
    example = t2i_example({"image": "4.png", "caption": "wide"}, shapes.parent, 0, cfg)  # 130 x 60: the 1:4 bucket
    assert example.target.shape == (3, 32, 128)
    lengths = []
    sample_timesteps = losses.flow.sample_timesteps
    monkeypatch.setattr(losses.flow, "sample_timesteps",
                        lambda *a, image_seq_len, **k: lengths.append(image_seq_len) or sample_timesteps(
                            *a, image_seq_len=image_seq_len, **k))
    with torch.no_grad():
        per_sample, _ = losses.generation_loss(model, collate([example], cfg.tokenizer.pad_token_id), False)
    assert per_sample.shape == (1,) and torch.isfinite(per_sample).all()
    assert lengths == [(32 // 16) * (128 // 16) if model.config.mmdit.timestep_shift else None]


def test_a_run_with_buckets_logs_the_understanding_padding(ckpt, shapes, tmp_path, capsys):
    common = ["--stage", 1, "--init", ckpt, "--data", shapes, "--steps", 1, "--batch", 6, "--micro-batch", 2]
    record, = run([*common, "--out", tmp_path / "a", "--resolution", 64])
    assert set(record["task_loss"]) == {"understanding", "t2i", "edit"} and 0 < record["padding"] < 1
    assert f"padding {record['padding']:.0%}" in capsys.readouterr().out
    square, = run([*common, "--out", tmp_path / "b", "--resolution", 64, "--buckets", "none"])
    assert square["task_loss"]["understanding"] == record["task_loss"]["understanding"]  # buckets are generation's


def test_training_from_the_cache_gives_the_same_losses_without_the_vae_encoder_and_the_llm(ckpt, shapes, tmp_path,
                                                                                           monkeypatch):
    cache = tmp_path / "cache"
    made = ["cache", "--stage", 5, "--init", ckpt, "--data", shapes, "--out", cache, "--resolution", 64]
    assert train.main([str(a) for a in made]) == {"t2i": 12, "edit": 3}
    assert train.main([str(a) for a in made]) == {"t2i": 0, "edit": 0}  # resumable: finished shards are kept
    (cache / "edit-000000.safetensors").unlink()
    assert train.main([str(a) for a in made]) == {"t2i": 0, "edit": 3}

    go = lambda args: train.main([str(a) for a in [*args, "--workers", 0]])  # noqa: E731 (run() sets 32 px)
    common = ["--stage", 5, "--init", ckpt, "--data", shapes, "--steps", 3, "--batch", 4, "--micro-batch", 2,
              "--resolution", 64, "--drop-prompt", 0.3, "--drop-image", 0.3]
    uncached = go([*common, "--out", tmp_path / "a"])
    calls = []
    for owner, name in ((vae.AutoencoderKL, "encode"), (model_module.OvisU1, "generation_condition")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    cached = go([*common, "--out", tmp_path / "b", "--cache", cache])
    assert calls == []
    for a, b in zip(uncached, cached):
        assert a["task_loss"].keys() == b["task_loss"].keys()
        torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b["grad_norm"], a["grad_norm"], rtol=1e-4, atol=1e-6)

    for changed, needle in ((["--resolution", 96], "resolution 64"), (["--buckets", "none"], "buckets"),
                            (["--init", write_tiny_checkpoint(tmp_path / "other", seed=1)], "other weights"),
                            (["--stage", 2], "decoder stages")):
        with pytest.raises(SystemExit, match=needle):
            go([*common, "--out", tmp_path / f"c{len(calls)}", "--cache", cache, *changed])
        calls.append(needle)
    with pytest.raises(SystemExit, match="resolution"):  # nor is it overwritten by a cache of other settings
        train.main([str(a) for a in [*made[:-1], 96]])


def test_the_cache_is_split_over_ranks_and_used_only_when_complete(ckpt, tiny, shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(frozen_cache, "ROWS_PER_SHARD", 4)  # 12 T2I rows: 3 shards, 2 for rank 0 and 1 for rank 1
    model = load_model(ckpt, dtype=torch.float32).model
    cfg = replace(tiny[1], resolution=64, buckets=data.bucket_table(64), made={})
    manifests = index_manifests([shapes])
    weights = frozen_cache.weights_fingerprint(model, Runtime(0, 1, torch.device("cpu")))
    wanted = frozen_cache.settings(weights, manifests, cfg, "fp32")

    def build(rank: int) -> dict[str, int]:
        runtime = Runtime(rank, 2, torch.device("cpu"))
        return frozen_cache.build_cache(model, manifests, ["t2i"], cfg, tmp_path, runtime, 4, wanted,
                                        contextlib.nullcontext())

    assert build(0) == {"t2i": 8}
    with pytest.raises(frozen_cache.CacheError, match="1 of its 3 t2i shards are missing"):
        frozen_cache.FrozenCache(tmp_path, wanted, manifests, ["t2i"])
    assert build(1) == {"t2i": 4}
    cache = frozen_cache.FrozenCache(tmp_path, wanted, manifests, ["t2i"])
    example = cache.example("t2i", 5, 0, replace(cfg, drop_prompt=0.0))
    assert example.image_shape == data.nearest_bucket(cfg.buckets, *Image.open(shapes.parent / "5.png").size[::-1])


def test_tasks_are_interleaved_in_their_ratios(manifest):
    mixture = Mixture(index_manifests([manifest]), {"understanding": 2, "t2i": 1, "edit": 1})
    order = [draw.task for _ in range(8) for draw in mixture.next_global_batch(1)]
    assert order == ["understanding", "t2i", "edit", "understanding"] * 2
    # a global batch groups its samples by task, understanding ones from short to long
    draws = mixture.next_global_batch(8)
    assert sorted((d.task, d.position) for d in draws) == sorted(
        [("understanding", 4), ("understanding", 5), ("understanding", 6), ("understanding", 7), ("t2i", 2),
         ("t2i", 3), ("edit", 2), ("edit", 3)])
    assert [d.task for d in draws] == ["understanding"] * 4 + ["t2i"] * 2 + ["edit"] * 2
    stream = mixture.streams["understanding"]
    lengths = [stream.rows.sort_key(stream.index(d.position)) for d in draws[:4]]
    assert lengths == sorted(lengths) and len(set(lengths)) > 1


def test_help_explains_stages_data_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for stage in STAGES:
        assert f"RUN --stage {stage} " in text
    for needle in ("conversations", "caption", "instruction", "torchrun", "--resume", "flow matching", "--buckets",
                   "--workers", "DataLoader", "train.py cache", "--cache", "global batch", "answer tokens"):
        assert needle in text
