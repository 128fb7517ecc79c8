"""The memory policy: frozen parts in bf16 in bf16 runs, FSDP2 shard groups and mixed precision, the generator
left out of what an understanding-only run shards, and the README's per-stage memory estimate."""
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import train
from ovis_min.train import memory
from ovis_min.checkpoint import load_model
from ovis_min.train.data import DataConfig
from ovis_min.train.distributed import Runtime, wrap
from ovis_min.train.losses import TrainStep
from ovis_min.prompt import Tokenizer
from ovis_min.train.stages import STAGES, apply_memory_policy, set_trainable, uses_generator
from ovis_min.tiny import tiny_config
from test_train import manifest, run  # noqa: F401  (manifest: the synthetic dataset fixture)
from test_train_watch import write_prompts

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_frozen_parts_are_stored_in_bf16_only_when_the_run_computes_in_bf16(ckpt, precision):
    model = load_model(ckpt, dtype=torch.float32).model
    trained = set(set_trainable(model, 1))
    apply_memory_policy(model, STAGES[1].mix, precision, torch.device("cpu"))
    frozen = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name in trained else frozen), name


def test_only_stages_with_generation_tasks_use_the_decoder_and_vae():
    assert [s for s, spec in STAGES.items() if not uses_generator(spec.mix)] == [3]
    assert not uses_generator({"understanding": 1, "t2i": 0})


def shard_worker(rank: int, ckpt: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    report = {}
    for stage in (1, 3):
        model = load_model(ckpt, dtype=torch.float32).model
        set_trainable(model, stage)
        apply_memory_policy(model, STAGES[stage].mix, "bf16", torch.device("cpu"), sharded=True)
        step_module = wrap(TrainStep(model), Runtime(rank, 2, torch.device("cpu")), "fsdp", "bf16",
                           uses_generator(STAGES[stage].mix))
        decoder, vae = model.visual_generator.backbone, model.visual_generator.vae
        policy = lambda module: module._get_fsdp_state()._mp_policy  # noqa: E731
        report[stage] = {
            "llm_block_sharded": all(isinstance(p, DTensor) for p in model.llm.model.layers[0].parameters()),
            "vit_block_sharded": all(isinstance(p, DTensor)
                                     for p in model.visual_tokenizer.backbone.trunk.blocks[0].parameters()),
            "decoder_blocks_sharded": [isinstance(p, DTensor) for block in [*decoder.double_blocks,
                                                                             *decoder.single_blocks]
                                       for p in block.parameters()],
            "decoder_dtypes": sorted({str(p.dtype) for p in decoder.parameters()}),
            "vae_whole": not any(isinstance(p, DTensor) for p in vae.parameters()),
            "root": [str(policy(step_module).param_dtype), str(policy(step_module).reduce_dtype)],
            "frozen_llm_block": [str(policy(model.llm.model.layers[0]).param_dtype),
                                 str(policy(model.llm.model.layers[0]).reduce_dtype)],
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_fsdp_shards_every_block_with_bf16_weights_and_float32_gradient_reduction(ckpt, tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(shard_worker, args=(str(ckpt), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        report = {int(k): v for k, v in json.loads((tmp_path / f"rank{rank}.json").read_text()).items()}
        for stage in (1, 3):
            assert report[stage]["llm_block_sharded"] and report[stage]["vit_block_sharded"]
            assert report[stage]["vae_whole"]
            assert report[stage]["root"] == ["torch.bfloat16", "torch.float32"]  # the root holds trained weights
        assert report[1]["frozen_llm_block"] == ["torch.bfloat16", "None"]  # nothing to reduce
        assert report[3]["frozen_llm_block"] == ["torch.bfloat16", "torch.float32"]  # stage 3 trains the LLM
        assert all(report[1]["decoder_blocks_sharded"])  # stage 1 runs the (frozen) decoder
        assert not any(report[3]["decoder_blocks_sharded"])  # stage 3 never does: left out, in CPU memory
        assert report[1]["decoder_dtypes"] == report[3]["decoder_dtypes"] == ["torch.bfloat16"]


def test_a_bf16_run_with_frozen_parts_in_bf16_trains_validates_and_samples(ckpt, manifest, tmp_path):
    """Stage 1 mixes every task: float32 adapter weights meet the bf16 LLM, decoder and VAE everywhere."""
    records = run(["--stage", 1, "--init", ckpt, "--data", manifest, "--out", tmp_path, "--steps", 2, "--batch", 3,
                   "--micro-batch", 1, "--precision", "bf16", "--val-data", manifest.parent / "split.jsonl",
                   "--val-every", 2, "--sample-prompts", write_prompts(manifest.parent), "--sample-every", 2])
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    validation, = [r for r in records if "val_loss" in r]
    assert set(validation["val_loss"]) == {"understanding", "t2i", "edit"}
    listing = json.loads((tmp_path / "samples" / "step-00000002" / "samples.json").read_text())
    assert [e["task"] for e in listing] == ["t2i", "edit", "understanding"]


@pytest.mark.parametrize("stage, flags, expected", [(0, [], False), (2, [], True), (3, [], True), (5, [], True),
                                                    (3, ["--no-grad-checkpointing"], False),
                                                    (0, ["--grad-checkpointing"], True)])
def test_gradient_checkpointing_defaults_to_the_stage_and_the_flag_wins(ckpt, manifest, tmp_path, stage, flags,
                                                                        expected):
    args, _, _ = train.parse_args([str(a) for a in ["--stage", stage, "--init", ckpt, "--data", manifest, "--out",
                                                    tmp_path, *flags]])
    train.fill_defaults(args)
    assert args.grad_checkpointing is expected


def test_the_readme_quotes_the_memory_estimate_and_the_checkpointing_defaults_follow_it():
    readme = (ROOT / "README.md").read_text()
    assert memory.table() in readme
    for stage, spec in STAGES.items():
        without = memory.estimate(stage, checkpointing=False).total
        assert spec.grad_checkpointing == (without > memory.CHECKPOINTING_ABOVE * memory.GPU_BYTES), stage
        assert memory.estimate(stage, checkpointing=True).activations < memory.estimate(stage, False).activations


def test_the_estimate_counts_what_each_stage_trains():
    """Stage 3 trains the LLM, encoder and adapter (2.4B parameters) under FSDP over 8 GPUs: its AdamW state per
    GPU is 8 bytes x 2.43B / 8; stage 0 trains the decoder (1.13B) under DDP: whole on every GPU."""
    assert memory.estimate(3).optimizer == pytest.approx(8 * 2.433e9 / 8, rel=0.01)
    assert memory.estimate(0).optimizer == pytest.approx(8 * 1.127e9, rel=0.01)
    assert memory.estimate(0, ema=False).ema == 0


def test_the_measurement_runs_a_stages_steps_at_the_assumed_sizes(ckpt, tmp_path):
    """On a GPU this measures the full-size model; here the tiny one goes through the same steps."""
    short = replace(tiny_config(), multimodal_max_length=memory.SUPERVISED_TOKENS + 128)  # fast on a CPU
    result = memory.measure(3, ckpt, torch.device("cpu"), tmp_path, config=short, micro_batch=1, steps=1)
    assert set(result["peak_bytes"]) == {"understanding"}
    assert result["estimate_bytes"] == memory.estimate(3, processes=1, micro_batch=1).total
    cfg = DataConfig(Tokenizer(ckpt), tiny_config().preprocess, tiny_config().multimodal_max_length, 32)
    longest, = memory.assumed_examples("understanding", 3, 1, cfg, tmp_path)
    assert (longest.labels != -100).sum() >= memory.SUPERVISED_TOKENS
    edit, = memory.assumed_examples("edit", 5, 1, cfg, tmp_path)
    assert edit.source.shape[-1] == edit.target.shape[-1] == 32
