"""train.py as its --help recommends on several GPUs, scaled down to the tiny checkpoint and two gloo processes, on
data as users have it: images of mixed aspect ratios (so micro-batches of different ranks hold different buckets)
and several tasks (so they hold different tasks).

FSDP on the decoder stages gives the losses of one process; every example command of `train.py --help` runs, in
order (each stage starts from the previous one's output; LoRA's examples too); and the properties behind FSDP at scale that a CPU can check: the
zero-weight passes that keep ranks in step, micro-batches left in host memory until their pass, the model reaching
the accelerator only in its run's dtypes (as shards under FSDP), passes that never read back from the device, and
stage 3's batch on 8 to 64 processes.
"""
import json
import random
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from ovis_min.train import accumulation, losses
from ovis_min.prompt import Tokenizer
from ovis_min.train.data import (Batch, DataConfig, Frozen, MicroBatch, bucket_table, collate, edit_example,
                                 understanding_example)
from ovis_min.train.distributed import Runtime
from ovis_min.checkpoint import build_model, load_checkpoint, read_config
from ovis_min.train.stages import STAGES, apply_memory_policy, micro_batch_for, set_trainable
from ovis_min.train.throughput import Throughput
from script_runner import run_script
from test_train_checkpoint import logged, start_two_processes

pytestmark = pytest.mark.usefixtures("single_thread")  # ckpt: the tiny checkpoint of conftest.py

SIZES = [(96, 48), (48, 96), (64, 64), (120, 40), (40, 120), (80, 60)]  # (width, height)
RESOLUTION = 64  # buckets 32x128, 64x64 and 128x32: the sizes above fall in all three
RUN_TIMEOUT = 240


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    """U, T, E manifests (12 rows each), HELD (two rows of every task, in two buckets) and P (a caption and an edit
    with 2 sampling steps, a question with a 3-token answer)."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "img").mkdir()
    colour = random.Random(0)
    rows = {"U": [], "T": [], "E": []}
    for i in range(12):
        width, height = SIZES[i % len(SIZES)]
        for tag in ("a", "b"):
            Image.new("RGB", (width, height), tuple(colour.randrange(256) for _ in range(3))).save(
                root / "img" / f"{i}{tag}.png")
        answer = f"colour {i} " * (i % 3 + 1)  # answers of different lengths
        rows["U"].append({"image": f"img/{i}a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": answer.strip()}]})
        rows["T"].append({"image": f"img/{i}a.png", "caption": f"a plain colour field number {i}"})
        rows["E"].append({"source": f"img/{i}a.png", "target": f"img/{i}b.png", "instruction": f"change colour {i}"})
    rows["HELD"] = [rows[task][i] for task in ("U", "T", "E") for i in (0, 1)]
    rows["P"] = [{"caption": "a red field", "steps": 2},
                 {"source": "img/0a.png", "instruction": "make it blue", "steps": 2},
                 {"question": "What colour is it?", "image": "img/1a.png", "max_new_tokens": 3}]
    paths = {}
    for name, lines in rows.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return paths


def two_process_run(args: list, cwd: Path) -> str:
    """train.py on two gloo processes (torchrun's environment); rank 0's output."""
    runs = [process.wait(RUN_TIMEOUT) for process in start_two_processes([str(a) for a in args], cwd)]
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return runs[0].stdout


def step_losses(records: list[dict]) -> torch.Tensor:
    return torch.tensor([[r["loss"], *r["task_loss"].values(), r["grad_norm"]] for r in records if "loss" in r],
                        dtype=torch.float64)


# -- FSDP on the decoder stages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, data", [(4, ["T"]), (5, ["T", "E"])])
def test_fsdp_on_two_processes_gives_the_losses_of_one(stage, data, ckpt, mixed, tmp_path):
    """Two samples a micro-batch of mixed buckets (and tasks): the ranks' micro-batches hold different numbers of
    passes, which FSDP on main met with a collective mismatch at step 1. Held-out losses are compared too."""
    args = ["--stage", stage, "--init", ckpt, *(f for name in data for f in ("--data", mixed[name])),
            "--resolution", RESOLUTION, "--batch", 4, "--micro-batch", 2, "--steps", 2, "--precision", "fp32",
            "--lr", 1e-3, "--val-data", mixed["HELD"], "--val-every", 2, "--workers", 0]
    one = train.main([str(a) for a in [*args, "--out", tmp_path / "one"]])
    two_process_run([*args, "--out", tmp_path / "two", "--parallel", "fsdp"], tmp_path)
    two = logged(tmp_path / "two")
    torch.testing.assert_close(step_losses(two), step_losses(one), rtol=1e-4, atol=0)
    validations = [[r["val_loss"] for r in records if "val_loss" in r] for records in (one, two)]
    assert validations[0][0].keys() == validations[1][0].keys() == {"t2i", *(["edit"] if stage == 5 else [])}
    torch.testing.assert_close(validations[1], validations[0], rtol=1e-4, atol=0)


# -- every example of train.py --help ------------------------------------------------------------------------------

def help_examples() -> list[str]:
    """The example commands of train.py's docstring (the stages' and LoRA's), continuation lines joined, comments
    dropped."""
    text = train.__doc__.split("\nExamples (", 1)[1].replace("\\\n", " ")
    commands = [" ".join(line.split("#")[0].split()) for line in text.splitlines()]
    return [c for c in commands if c.startswith(("RUN ", "python ")) and not c.startswith("RUN =")]


def scaled(example: str, ckpt: Path, mixed: dict[str, Path], root: Path) -> tuple[int, str, list[str]]:
    """(processes, script, arguments): the example on the tiny checkpoint and the mixed data, 3 steps, validation
    and samples at step 3, small images and batches; every other flag as written, --workers included."""
    words = shlex.split(example)
    processes = 2 if words[0] == "RUN" else 1
    script = "train.py" if processes == 2 else words[1]
    words = words[1:] if processes == 2 else words[2:]  # RUN ... / python train.py ... / python sample.py ...
    names = {"CKPT": str(ckpt), "photo.jpg": str(mixed["T"].parent / "img" / "0a.png"),
             **{k: str(v) for k, v in mixed.items()}}
    words = [names.get(w, str(root / w) if re.fullmatch(r"(runs|cache)/[\w-]+|ft-ema|[\w-]+\.safetensors", w) else w)
             for w in words]
    if script == "sample.py":  # on the tiny checkpoint the adapters were trained on, a few steps
        return processes, script, [*words, "--weights", str(ckpt), "--steps", "2", "--seed", "0",
                                   "--out", str(root / "sampled.png")]
    if "--init" in words and not Path(words[words.index("--init") + 1]).exists():  # its row was not run
        words[words.index("--init") + 1] = str(ckpt)
    flags = dict(zip(words, words[1:]))
    for flag, value in (("--resolution", RESOLUTION), ("--val-every", 3), ("--sample-every", 3), ("--steps", 3)):
        if flag in flags:
            words[words.index(flag) + 1] = str(value)
    if words[0] in ("export",) or "--resume" in words:
        return processes, script, words
    if "--resolution" not in words:
        words += ["--resolution", str(RESOLUTION)]
    if words[0] == "cache":
        return processes, script, words
    if "--steps" not in words:
        words += ["--steps", "3"]
    if "--batch" not in words:  # micro-batches of 2, which often hold two buckets or tasks
        words += ["--batch", "4", "--micro-batch", "2"]
    if processes == 1:  # the fine-tunes stop early, as an interrupted run does, so that --resume has a step left
        words += ["--stop-after", "2"]
    return processes, script, words


EXAMPLES = help_examples()


def test_the_help_has_the_examples_this_matrix_runs():
    assert len(EXAMPLES) == 14 and [e.split()[:3] for e in EXAMPLES][-7:] == [
        ["python", "train.py", "--stage"], ["python", "train.py", "--resume"], ["python", "train.py", "export"],
        ["python", "train.py", "--stage"], ["python", "train.py", "--stage"], ["python", "train.py", "export"],
        ["python", "sample.py", "--lora"]]


@pytest.fixture(scope="module")
def example_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.mark.parametrize("example", [pytest.param(e, id=" ".join(e.split()[:4])) for e in EXAMPLES])
def test_each_help_example_runs_on_two_processes(example, ckpt, mixed, example_root):
    """In the order of the help: each stage's --init is the previous one's --out (the tiny checkpoint where that
    row did not run)."""
    processes, script, args = scaled(example, ckpt, mixed, example_root)
    if processes == 2:
        output = two_process_run(args, example_root)
    else:
        run = run_script(script, *args, cwd=example_root, timeout=RUN_TIMEOUT)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        output = run.stdout
    if script == "sample.py":
        assert Image.open(args[args.index("--out") + 1]).info["lora"]  # the adapters were merged
        return
    if args[0] == "export":
        out = Path(args[args.index("--out") + 1])
        assert (out if "--lora-only" in args else out / "model.safetensors").is_file()
        return
    if args[0] == "cache":
        assert "cache " in output
        return
    out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(args[args.index("--resume") + 1])
    records = logged(out)
    assert [r["step"] for r in records if "loss" in r] == ([1, 2] if "--stop-after" in args else [1, 2, 3])
    if "--val-every" in args:
        assert any("val_loss" in r for r in records)
    if "--sample-every" in args:
        assert (out / "samples" / "step-00000003" / "samples.json").is_file()


# -- at scale, on the CPU ------------------------------------------------------------------------------------------

def test_every_rank_makes_the_same_passes_padded_with_zero_weight_ones(monkeypatch):
    """The schedule is the most passes of each kind any rank has, per micro-batch; a rank with fewer runs
    placeholders, whose loss is multiplied by 0."""
    def batch(task: str, n: int = 1) -> Batch:
        return Batch(task, None, None, None, None, None, torch.arange(n))

    mine = [MicroBatch([batch("t2i", 2)], {}), MicroBatch([batch("understanding"), batch("t2i"), batch("edit")], {})]
    theirs = [[0, 3], [1, 1]]  # another rank's passes per micro-batch: (understanding, generation)
    monkeypatch.setattr(accumulation, "all_reduce_max",
                        lambda values, runtime: [max(a, b) for a, b in zip(values, sum(theirs, []))])
    monkeypatch.setattr(accumulation, "all_reduce_sum", lambda values, runtime: [float(v) for v in values])
    made, ran = [], []

    def placeholder(kind):
        made.append(kind)
        return batch("understanding" if kind == "understanding" else "t2i")

    def module(one: Batch, scale):
        ran.append((one.task, len(one), scale.per_sample))
        return torch.zeros((), requires_grad=True) * 1.0, accumulation.Tally({one.task: torch.zeros(())}, tokens=1)

    accumulation.backward_window(module, mine, Runtime(0, 2, torch.device("cpu")), torch.autocast("cpu", enabled=False),
                           Throughput(None), placeholder)
    assert made == ["generation"]
    assert [(task, n, scale > 0) for task, n, scale in ran] == [
        ("t2i", 2, True), ("t2i", 1, False), ("t2i", 1, False),  # micro-batch 0: 1 pass, the other rank 3
        ("understanding", 1, True), ("t2i", 1, True), ("edit", 1, True)]  # micro-batch 1: 1 + 2 passes, the most


def test_micro_batches_reach_the_device_one_pass_at_a_time(monkeypatch):
    """Each Batch is moved just before its own pass, never all of a step's before the first forward."""
    events = []

    class Watched(Batch):
        def to(self, device, non_blocking=False):
            events.append(("to", int(self.seeds[0]), non_blocking))
            return self

    def module(one: Batch, scale):
        events.append(("forward", int(one.seeds[0])))
        return torch.zeros((), requires_grad=True) * 1.0, accumulation.Tally({}, tokens=1)

    micro_batches = [MicroBatch([Watched("t2i", None, None, None, None, None, torch.tensor([2 * i + j]))
                                 for j in range(2)], {}) for i in range(2)]
    accumulation.backward_window(module, micro_batches, Runtime(0, 1, torch.device("cpu")),
                           torch.autocast("cpu", enabled=False), Throughput(None))
    assert events == [e for n in range(4) for e in (("to", n, True), ("forward", n))]


def test_stage_3s_default_batch_runs_on_8_to_64_processes_and_a_micro_batch_that_cannot_names_one_that_can():
    batch = STAGES[3].batch  # 2240 = 2^6 x 35: micro-batch 4 x 32 or 64 processes does not divide it
    chosen = [micro_batch_for(batch, processes, None) for processes in (8, 16, 32, 64)]
    assert chosen == [4, 4, 2, 1]
    assert all(batch % (m * n) == 0 for m, n in zip(chosen, (8, 16, 32, 64)))
    assert micro_batch_for(batch, 32, 2) == 2  # a given one that works is kept
    with pytest.raises(ValueError, match=r"4 x 32: --micro-batch 2 works"):
        micro_batch_for(batch, 32, 4)
    with pytest.raises(ValueError, match=r"4 x 64: --micro-batch 1 works"):
        micro_batch_for(batch, 64, 4)
    with pytest.raises(ValueError, match="give a multiple of 3"):
        micro_batch_for(4, 3, None)


@pytest.mark.parametrize("stage", [3, 4])
def test_the_model_reaches_the_accelerator_in_the_runs_dtypes_and_under_fsdp_as_shards_only(stage, ckpt):
    """train.py loads the model in host memory in the checkpoint's dtypes; the memory policy makes a bf16 run's
    frozen weights bf16 there, never float32 on the accelerator, and under FSDP moves only the VAE (not sharded):
    fully_shard moves each block's shard. The meta device stands in for the accelerator."""
    for sharded in (False, True):
        model = load_checkpoint(build_model(read_config(ckpt)), ckpt, dtype=None, device="cpu")
        trained = set(set_trainable(model, stage))
        apply_memory_policy(model, STAGES[stage].mix, "bf16", torch.device("meta"), sharded)
        for name, param in model.named_parameters(remove_duplicate=False):  # lm_head: tied to the trained table
            assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
            assert param.requires_grad == (name in trained or name == "llm.lm_head.weight" and stage == 3), name
            generator = name.startswith("visual_generator.")
            if stage == 3 and generator:  # never used by an understanding-only run
                assert param.device.type == "cpu", name
            else:
                moved = not sharded or name.startswith("visual_generator.vae.")
                assert param.device.type == ("meta" if moved else "cpu"), name


@pytest.mark.parametrize("task", ["understanding", "edit", "cached edit"])
def test_a_training_pass_never_waits_for_the_device(task, ckpt, mixed):
    """Nothing in a pass reads a value back from the device (an int(), .tolist() or boolean index of a device
    tensor would stall the GPU's queue every pass): it runs with the model and the batch's data on the meta
    device, which has no values to read. The batch's layout stays on the host (Batch.to), where sizes and
    positions are read."""
    config = read_config(ckpt)
    cfg = DataConfig(Tokenizer(ckpt), config.preprocess, config.multimodal_max_length, RESOLUTION, 0.0, 0.0,
                     buckets=bucket_table(RESOLUTION))
    manifest = mixed["U" if task == "understanding" else "E"]
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:2]]
    build = understanding_example if task == "understanding" else edit_example
    examples = [build(row, manifest.parent, seed, cfg) for seed, row in enumerate(rows)]
    examples = [e for e in examples if e.image_shape == examples[0].image_shape]  # one bucket, as a pass has
    if task == "cached edit":  # what a cache holds instead of the images and the prompt
        for example in examples:
            latent = (config.vae.latent_channels, *(side // 8 for side in example.image_shape))
            example.frozen = Frozen(torch.zeros(7, 2 * config.llm.hidden_size), *(torch.zeros(latent) for _ in "mlMl"))
    model = build_model(config)  # on the meta device
    set_trainable(model, 2 if task == "understanding" else 5)
    batch = collate(examples, cfg.tokenizer.pad_token_id).to(torch.device("meta"))
    loss, tally = losses.TrainStep(model)(batch, accumulation.LossScale(per_token=1.0, per_sample=1.0))
    assert loss.device.type == "meta" and tally.tokens > 0
