"""Watching a run: the speed fields of the log line (ETA, FLOPs, MFU), validation losses and samples."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import train
from ovis_min.train import losses, throughput, validation
from ovis_min.checkpoint import load_model
from ovis_min.prompt import Tokenizer
from ovis_min.train.samples import read_sample_prompts, write_samples
from ovis_min.train.throughput import FlopCounter, Throughput, peak_flops
from test_train import manifest, run  # noqa: F401  (manifest: the synthetic dataset fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_flops_count_the_forward_and_charge_the_backward_per_operand_needing_a_gradient():
    layer = nn.Linear(8, 16)
    x = torch.randn(4, 8)
    matmul = 2 * 4 * 8 * 16
    with FlopCounter() as counter:
        layer(x)  # weight trained, input not: forward + the weight's gradient (+ the bias, counted as one more)
    assert counter.flops == 3 * matmul
    with torch.no_grad(), FlopCounter() as counter:
        layer(x)
    assert counter.flops == matmul
    layer.requires_grad_(False)
    with FlopCounter() as counter:
        layer(x.requires_grad_())  # a frozen layer that gradients flow through: forward + the input's gradient
    assert counter.flops == 2 * matmul


def test_a_counted_forward_leaves_the_gradients_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(16, 8)

    def grads(counting: bool) -> list[torch.Tensor]:
        model.zero_grad()
        with FlopCounter() if counting else torch.enable_grad():
            loss = model(x).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads(False), grads(True)))


def test_eta_is_the_mean_of_recent_step_times_times_the_steps_left():
    meter = Throughput(peak=2e12)
    with meter.counting("t2i"):
        nn.Linear(4, 4)(torch.randn(1, 4))
    meter.micro_batch("t2i", tokens=1)
    assert meter.flops_per_token["t2i"] == 3 * 2 * 16
    first = meter.end_step(seconds=2.0, total_flops=4e12, world=2, steps_left=10)
    assert first["eta_s"] == 20.0 and first["tflops"] == 1.0 and first["mfu"] == 0.5
    for _ in range(throughput.RECENT_STEPS):
        last = meter.end_step(seconds=1.0, total_flops=0.0, world=1, steps_left=3)
    assert last["eta_s"] == 3.0  # the slow first step has left the window
    assert Throughput(peak=None).end_step(1.0, 1e12, 1, 0)["mfu"] is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)])
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), "bf16") == peak
    assert peak_flops(torch.device("cpu"), "bf16") is None


# -- in a run --------------------------------------------------------------------------------------------------

def training_view(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["task_loss"], r["grad_norm"]) for r in records if "loss" in r]


def test_validation_logs_each_tasks_held_out_loss_and_leaves_training_unchanged(ckpt, manifest, tmp_path,
                                                                               monkeypatch):
    forward, modes, rng_kept = losses.TrainStep.forward, [], []

    def drawing_forward(self, micro, scale):  # as a model with randomness would, validation draws from torch's RNG
        modes.append(self.training)
        if not self.training:
            torch.rand(1)
        return forward(self, micro, scale)

    def checked_validate(*args, **kwargs):
        before = torch.get_rng_state()
        result = validation.validate(*args, **kwargs)
        rng_kept.append(torch.equal(before, torch.get_rng_state()))
        return result
    monkeypatch.setattr(losses.TrainStep, "forward", drawing_forward)
    monkeypatch.setattr(train, "validate", checked_validate)
    common = ["--stage", 2, "--init", ckpt, "--data", manifest, "--steps", 3, "--batch", 4, "--micro-batch", 2,
              "--lr", 1e-3]
    plain = run([*common, "--out", tmp_path / "plain"])
    training_passes = len(modes)  # one forward per task and bucket of each micro-batch
    assert all(modes) and training_passes >= 3 * 2  # at least one per micro-batch
    watched = run([*common, "--out", tmp_path / "watched", "--val-data", manifest.parent / "split.jsonl",
                   "--val-every", 1])
    assert training_view(watched) == training_view(plain)
    assert rng_kept == [True] * 3 and modes.count(True) == 2 * training_passes  # training stays in train mode
    validations = [r for r in watched if "val_loss" in r]
    assert [r["step"] for r in validations] == [1, 2, 3]
    assert all(set(r["val_loss"]) == {"understanding", "t2i", "edit"} for r in validations)
    assert all(0 < loss < 100 for r in validations for loss in r["val_loss"].values())
    logged = [json.loads(line) for line in (tmp_path / "watched" / "log.jsonl").read_text().splitlines()]
    assert [r for r in logged if "val_loss" in r] == validations


def write_prompts(folder: Path) -> Path:
    rows = [{"caption": "a red square", "steps": 2}, {"source": "red_square.png", "instruction": "make it blue",
                                                      "steps": 2, "seed": 7},
            {"question": "What is in the image?", "image": "blue_circle.png", "max_new_tokens": 4}]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_samples_are_written_under_the_run_with_fixed_seeds(ckpt, manifest, tmp_path):
    prompts = write_prompts(manifest.parent)
    records = run(["--stage", 1, "--init", ckpt, "--data", manifest, "--out", tmp_path, "--steps", 2, "--batch", 1,
                   "--micro-batch", 1, "--sample-prompts", prompts, "--sample-every", 2])
    assert len(records) == 2
    folder = tmp_path / "samples" / "step-00000002"
    listing = json.loads((folder / "samples.json").read_text())
    assert [e["task"] for e in listing] == ["t2i", "edit", "understanding"]
    assert listing[1]["seed"] == 7 and isinstance(listing[2]["answer"], str)
    for entry in listing[:2]:
        assert Image.open(folder / entry["image"]).size == (32, 32)
    assert sorted(p.name for p in folder.iterdir()) == ["00-t2i.png", "01-edit.png", "samples.json"]  # no leftovers
    assert not (tmp_path / "samples" / "step-00000001").exists()


def test_sampling_uses_the_weights_it_is_given_and_gives_the_models_own_back(ckpt, manifest):
    loaded = load_model(ckpt, dtype=torch.float32)
    model, tokenizer = loaded.model.train(), Tokenizer(ckpt)
    prompts = read_sample_prompts(write_prompts(manifest.parent), ["t2i"])
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    decoder = "visual_generator.backbone.final_layer.linear.bias"
    shifted = {decoder: own[decoder] + 0.5}  # as an EMA of the decoder would be
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)

    def image(weights) -> bytes:
        write_samples(model, tokenizer, prompts, manifest.parent / "s", 32, cpu, off, weights=weights)
        return (manifest.parent / "s" / "00-t2i.png").read_bytes()
    plain, again, with_shift = image(None), image(None), image(shifted)
    assert plain == again != with_shift
    assert model.training and all(torch.equal(p, own[name]) for name, p in model.named_parameters())


def test_help_documents_the_new_flags_with_examples(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    examples = text[text.index("Examples"):text.index("options:")]
    for flag in ("--val-data", "--val-every", "--sample-prompts", "--sample-every", "--grad-checkpointing",
                 "--no-grad-checkpointing"):
        assert text.count(flag) >= 2 and flag in examples, flag  # in the examples and in the options list
    for needle in ("ETA", "MFU", "OUT/samples/step-NNNNNNNN", '"caption"', '"question"', '"instruction"'):
        assert needle in text, needle


def test_on_resume_a_flag_given_wins_over_the_saved_value_even_when_it_is_the_default(ckpt, manifest, tmp_path):
    run(["--stage", 2, "--init", ckpt, "--data", manifest, "--out", tmp_path, "--steps", 2, "--stop-after", 1,
         "--batch", 2, "--micro-batch", 2, "--no-grad-checkpointing", "--val-data", manifest, "--val-every", 5])

    def resumed(*flags) -> dict:
        args, _, _ = train.parse_args(["--resume", str(tmp_path), *flags])
        train.fill_defaults(args)
        return {k: vars(args)[k] for k in ("micro_batch", "grad_checkpointing", "val_every")}
    assert resumed() == {"micro_batch": 2, "grad_checkpointing": False, "val_every": 5}
    assert resumed("--micro-batch", "4", "--grad-checkpointing", "--val-every", "1000") == {
        "micro_batch": 4, "grad_checkpointing": True, "val_every": 1000}  # 4 and 1000 are the defaults
