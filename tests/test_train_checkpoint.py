"""Training checkpoints on the tiny model: the sharded state resumes on another number of processes with the
losses of an uninterrupted run, a kill -9 during a save resumes from the checkpoint before it, --keep, the
official-layout export (sample.py reads it), the EMA, SIGTERM as schedulers send it, and a diverging run, whose
checkpoints never hold a non-finite tensor.

Resuming on another number of processes continues with exactly the same batches because Mixture.state_dict() is
a global data position (the same on every rank, whatever the number of processes). One process and two give the
same losses up to float rounding only (gradients are averaged over the ranks instead of over the accumulated
micro-batches): runs on different numbers of processes are compared with assert_close, on the same number exactly.
"""
import json
import math
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import train
from ovis_min.train import checkpoint as train_checkpoint
from ovis_min.checkpoint import CheckpointError, load_model
from ovis_min.hub import resolve_source
from ovis_min.train.distributed import Runtime
from ovis_min.train.ema import EMA
from script_runner import run_script, start_script

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--resolution", "32", "--workers", "0"]
DEFAULT_WORKERS = ["--workers", str(train.build_parser().get_default("workers"))]  # DataLoader processes, as users run
STEPS = 6

pytestmark = pytest.mark.usefixtures("single_thread")  # ckpt: the tiny checkpoint of conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Eight text-to-image rows: one task, so that one process and two take the same rows for a step."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 255 - 30 * i, 90)).save(root / f"c{i}.png")
        rows.append({"image": f"c{i}.png", "caption": f"colour number {i}"})
    path = root / "t2i.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arguments(ckpt: Path, data: Path, out: Path, *extra) -> list[str]:
    """Stage 0 (the decoder), batch 2: two processes of one sample, or one process accumulating two."""
    return [str(a) for a in ["--stage", 0, "--init", ckpt, "--data", data, "--out", out, "--steps", STEPS,
                             "--batch", 2, "--micro-batch", 1, "--lr", 1e-3, "--save-every", 1, *FAST, *extra]]


def start_two_processes(args: list[str], cwd: Path, own_groups: bool = False) -> list:
    """A two-process run with the environment torchrun gives its workers, each process forked from
    script_runner's preloaded server (no torch start-up per process); with `own_groups`, each process and its
    DataLoader workers are a process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    return [start_script("train.py", *args, cwd=cwd, own_group=own_groups,
                         env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
                              "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
            for rank in (0, 1)]


def two_processes(args: list[str], cwd: Path) -> str:
    """Run on two processes; returns rank 0's output."""
    runs = [process.wait() for process in start_two_processes(args, cwd)]
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return runs[0].stdout


@pytest.fixture(scope="module")
def whole(ckpt, data, tmp_path_factory) -> list[dict]:
    """The uninterrupted one-process run every other run must equal."""
    return train.main(arguments(ckpt, data, tmp_path_factory.mktemp("whole") / "run"))


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "step" in r]


def assert_same_losses(records: list[dict], reference: list[dict]) -> None:
    """The same steps with the same losses and gradient norms, up to float rounding."""
    assert [r[0] for r in losses(records)] == [r[0] for r in losses(reference)]
    got, want = (torch.tensor([r[1:] for r in losses(x)], dtype=torch.float64) for x in (records, reference))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def complete_steps(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("step-*") if (p / "complete").is_file())


# -- preemption and another number of processes --------------------------------------------------------------

def stopped_on_a_signal(out: Path, runs: list) -> None:
    """Both ranks stopped after the same step, saved it completely, and exited 0."""
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    stopped = int(complete_steps(out)[-1][len("step-"):])
    assert stopped < STEPS and f"stopped after step {stopped}," in runs[0].stdout, runs[0].stdout[-3000:]
    assert not (out / f"step-{stopped + 1:08d}").exists()
    assert (out / "latest").read_text() == f"step-{stopped:08d}\n"


@pytest.fixture(scope="module")
def preempted(ckpt, data, tmp_path_factory) -> Path:
    """A two-process run (default --workers) whose rank 1 alone got SIGTERM after step 1."""
    out = tmp_path_factory.mktemp("preempted") / "run"
    ranks = start_two_processes(arguments(ckpt, data, out, *DEFAULT_WORKERS), out.parent)
    ranks[0].wait_for("step 1/")
    ranks[1].send_signal(signal.SIGTERM)  # rank 0 learns it from the all_reduce
    stopped_on_a_signal(out, [rank.wait() for rank in ranks])
    return out


def test_sigterm_stops_a_two_process_run_after_a_checkpoint_and_the_resume_continues(preempted, tmp_path, whole):
    out = tmp_path / "run"
    shutil.copytree(preempted, out)
    two_processes(["--resume", str(out), *FAST], tmp_path)
    assert_same_losses(logged(out), whole)


def test_sigterm_to_the_whole_job_then_again_stops_after_a_checkpoint_and_the_resume_continues(ckpt, data, tmp_path,
                                                                                              whole):
    """What a scheduler does to a torchrun job: Slurm signals every process of the job, here each rank's process
    group (the rank and its DataLoader workers, default --workers); torchrun, signalled too, passes SIGTERM on to
    the training processes, which so get it twice within a moment. One request: no worker dies of it, both ranks
    stop after the same step with a checkpoint and exit 0 (the main-process-only delivery is `preempted`'s)."""
    out = tmp_path / "run"
    ranks = start_two_processes(arguments(ckpt, data, out, *DEFAULT_WORKERS), tmp_path, own_groups=True)
    ranks[0].wait_for("step 1/")
    for rank in ranks:
        rank.signal_group(signal.SIGTERM)
    for rank in ranks:  # handled before the second, which the OS would otherwise merge into the first
        rank.wait_for("SIGTERM: saving a checkpoint", stderr=True)
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    runs = [rank.wait() for rank in ranks]
    stopped_on_a_signal(out, runs)
    assert all("SIGTERM again: already stopping" in run.stderr and "DataLoader worker" not in run.stderr
               for run in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    train.main(["--resume", str(out), *FAST])
    assert_same_losses(logged(out), whole)


def test_resume_two_processes_on_one_continues_exactly(preempted, tmp_path, whole):
    out = tmp_path / "run"
    shutil.copytree(preempted, out)
    train.main(["--resume", str(out), *FAST])
    assert_same_losses(logged(out), whole)


def test_resume_one_process_on_two_continues_exactly(ckpt, data, tmp_path, whole):
    out = tmp_path / "run"
    train.main(arguments(ckpt, data, out, "--stop-after", 3))
    two_processes(["--resume", str(out), *FAST], tmp_path)
    assert_same_losses(logged(out), whole)


def test_fsdp_weights_optimizer_and_ema_reshard_from_two_processes_to_one(ckpt, tmp_path):
    """Stage 3 shards the LLM and the encoder over the ranks (FSDP2). --overfit 1 repeats one sample with its own
    noise, so the batches do not depend on the data position: only the state's resharding is tested here."""
    manifest = tmp_path / "u.jsonl"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    manifest.write_text(json.dumps({"images": ["red.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    common = ["--stage", 3, "--data", manifest, "--steps", 4, "--overfit", 1, "--ema-decay", 0.5]
    whole = train.main(arguments(ckpt, manifest, tmp_path / "whole", *common))
    out = tmp_path / "run"
    two_processes(arguments(ckpt, manifest, out, *common, "--stop-after", 2), tmp_path)
    train.main(["--resume", str(out), *FAST])
    assert_same_losses(logged(out), whole)
    for ema in (False, True):
        a, b = (exported(run, 4, tmp_path / f"{run.name}-{ema}", ema) for run in (tmp_path / "whole", out))
        for name in a:  # Adam moves a weight by up to lr = 1e-3 a step; rounding stays far below one step
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


# -- kill -9, keep -----------------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
from ovis_min.checkpoint import CheckpointError, load_model
from ovis_min.train import checkpoint as train_checkpoint

write_atomic = train_checkpoint.write_atomic


def killed_before_the_marker(path, data, replace=True):
    # kill -9 in the middle of step 3's save: its state and trainer.pt are written, its marker is not
    if path.name == "complete" and path.parent.name == "step-00000003":
        os.kill(os.getpid(), signal.SIGKILL)
    return write_atomic(path, data, replace)


train_checkpoint.write_atomic = killed_before_the_marker
train.main(sys.argv[1:])
"""


def test_kill_9_during_a_save_resumes_from_the_checkpoint_before_and_keep_2_leaves_two(ckpt, data, tmp_path, whole):
    out = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    killed = run_script(str(killer), *arguments(ckpt, data, out, "--keep", 2), cwd=tmp_path)
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "step-00000003" / "trainer.pt").is_file() and complete_steps(out) == ["step-00000001",
                                                                                       "step-00000002"]
    records = train.main(["--resume", str(out), *FAST])
    assert losses(records) == losses(whole)[2:]
    assert losses(logged(out)) == losses(whole)
    kept = [f"step-{n:08d}" for n in (STEPS - 1, STEPS)]
    assert sorted(p.name for p in out.glob("step-*")) == complete_steps(out) == kept


# -- export and EMA ----------------------------------------------------------------------------------------------

def exported(run: Path, step: int, out: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    train.main(["export", str(run), "--step", str(step), "--out", str(out), *(["--ema"] if ema else [])])
    return load_file(out / "model.safetensors")


def test_ema_follows_its_formula_survives_resume_and_its_export_samples(ckpt, data, tmp_path):
    decay, steps = 0.75, 3
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--steps", steps, "--ema-decay", decay, "--keep", 0]
    train.main(arguments(ckpt, data, a, *common))
    train.main(arguments(ckpt, data, b, *common, "--stop-after", 2))
    train.main(["--resume", str(b), *FAST])

    start = {**load_file(ckpt / "model-00001-of-00002.safetensors"),
             **load_file(ckpt / "model-00002-of-00002.safetensors")}
    weights = [start] + [exported(a, n, tmp_path / f"w{n}") for n in range(1, steps + 1)]
    emas = [start] + [exported(a, n, tmp_path / f"ema{n}", ema=True) for n in range(1, steps + 1)]
    trained = [name for name in start if name.startswith("visual_generator.backbone.")]
    for n in range(1, steps + 1):
        assert emas[n].keys() == start.keys()
        assert all(torch.equal(emas[n][k], start[k]) for k in start if k not in trained)  # frozen: the source's
        for name in trained:
            torch.testing.assert_close(emas[n][name], decay * emas[n - 1][name] + (1 - decay) * weights[n][name])
    assert any(not torch.equal(emas[steps][k], weights[steps][k]) for k in trained)

    resumed = exported(b, steps, tmp_path / "ema-resumed", ema=True)
    assert all(torch.equal(resumed[k], emas[steps][k]) for k in start)

    sample = pytest.importorskip("sample")
    image = tmp_path / "ema.png"
    assert sample.main(["--weights", str(tmp_path / f"ema{steps}"), "--prompt", "colour number 3", "--width", "32",
                        "--height", "32", "--steps", "2", "--device", "cpu", "--out", str(image)]) == 0
    assert Image.open(image).size == (32, 32)


def test_export_and_resume_errors_are_one_line_naming_the_fix(ckpt, data, tmp_path):
    out = tmp_path / "run"
    train.main(arguments(ckpt, data, out, "--steps", 1))
    for args, names in ((["--ema", "--out", tmp_path / "e"], ["--ema-decay", "without --ema"]),
                        (["--step", 7, "--out", tmp_path / "e"], ["step-00000007"]),
                        (["--out", out], ["--out", "already exists"])):
        result = run_script("train.py", "export", str(out), *map(str, args), cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert all(name in result.stderr for name in names), result.stderr
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".tmp-*"))
    middle = tmp_path / "middle"  # a step before the last: no export
    train.main(arguments(ckpt, data, middle, "--stop-after", 1))
    with pytest.raises(CheckpointError, match=f"training checkpoint.*python train.py export {middle}/step-00000001"):
        load_model(resolve_source(middle))  # what sample.py --weights RUN does
    (out / "step-00000001" / "state" / "__0_0.distcp").write_bytes(b"")  # damaged
    for args in (["export", out, "--out", tmp_path / "e"], ["--resume", out, *FAST]):
        result = run_script("train.py", *map(str, args), cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "__0_0.distcp has 0 bytes" in result.stderr and "damaged" in result.stderr, result.stderr




def test_a_resume_whose_init_changed_is_one_line_naming_the_fix(ckpt, data, tmp_path):
    """The frozen weights are not in the checkpoints: they are read from --init again, which must not change."""
    source = tmp_path / "source"
    shutil.copytree(ckpt, source)
    out = tmp_path / "run"
    train.main(arguments(source, data, out, "--stop-after", 1))
    shard = source / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))  # another checkpoint of the same tensors
    result = run_script("train.py", "--resume", str(out), *FAST, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(source) in result.stderr and "changed" in result.stderr
    shutil.rmtree(source)
    result = run_script("train.py", "--resume", str(out), *FAST, cwd=tmp_path)
    assert result.returncode == 1 and "missing" in result.stderr and "Traceback" not in result.stderr


def test_help_documents_export_and_the_ema(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["export", "--help"])
    assert exit_info.value.code == 0 and "--ema" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "--ema-decay" in text and "train.py export" in text and "SIGTERM" in text
    assert "--max-nonfinite" in text and "--dist-timeout" in text


# -- divergence -------------------------------------------------------------------------------------------------

def saved_state(step_dir: Path, tmp_path: Path) -> dict:
    """A checkpoint's whole state (weights, EMA, optimizer state), read back as one torch file."""
    dcp_to_torch_save(step_dir / "state", tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=False)


def test_a_diverging_run_skips_non_finite_steps_keeps_finite_checkpoints_and_stops(ckpt, data, tmp_path, capsys):
    """The learning rate of a run that diverges at once (as in `--stage 4 --lr 1 --grad-clip 0 --ema-decay 0.9
    --save-every 1`): a step with a non-finite loss leaves the weights, the optimizer state and the EMA as they were, every
    checkpoint holds finite tensors only, and --max-nonfinite such steps in a row stop the run with one line (a
    TrainError: exit status 1, no traceback)."""
    out = tmp_path / "run"
    steps, limit = 12, 3
    with pytest.raises(SystemExit) as stop:
        train.main(arguments(ckpt, data, out, "--stage", 4, "--lr", "1", "--grad-clip", "0", "--ema-decay", 0.9, "--steps", steps,
                             "--keep", 0, "--max-nonfinite", limit))
    error, stderr = stop.value.code, capsys.readouterr().err
    records = [r for r in logged(out) if "loss" in r]
    skipped = [r["step"] for r in records if r["nonfinite"]]
    assert [math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records] == \
        [not r["nonfinite"] for r in records]
    last = records[-1]["step"]  # the run stopped at the limit-th non-finite step in a row, before --steps
    assert last < steps and skipped[-limit:] == list(range(last - limit + 1, last + 1))
    first = last - limit + 1
    assert isinstance(error, str) and "\n" not in error
    assert error.startswith(f"train.py: error: steps {first}-{last}: {limit} non-finite steps in a row")
    assert "--lr" in error and "--max-nonfinite" in error and f"--resume {out}" in error
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: step ")]
    assert [int(line.split()[2].rstrip(":")) for line in warnings] == skipped
    assert all("skipped" in line for line in warnings)
    saved = complete_steps(out)
    assert any(int(name[len("step-"):]) in skipped for name in saved)  # saves after skipped steps too
    for name in saved:
        state = saved_state(out / name, tmp_path)
        assert state.keys() == {"weights", "optimizer", "ema"}
        tensors = train_checkpoint.tensors_in(state)
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name


def test_a_save_refuses_non_finite_weights_or_ema(tmp_path):
    """The loop skips non-finite steps; weights that overflow in a finite step (a learning rate near float32's
    range) are the save's to refuse: nothing is written, and the message names the way on."""
    step_module = nn.Module()
    step_module.model = nn.Linear(2, 2)
    ema = EMA(step_module.model, 0.5)
    with torch.no_grad():
        step_module.model.weight[0, 0] = float("inf")
    ema.update()
    saver = train_checkpoint.Saver(tmp_path, {}, None, Runtime(0, 1, torch.device("cpu")))
    with pytest.raises(SystemExit, match=f"step 3: .* not finite.*--resume {tmp_path} and a lower --lr"):
        saver.save(3, step_module, torch.optim.AdamW(step_module.parameters()), ema, None, last=True)
    assert list(tmp_path.iterdir()) == []


def test_resuming_an_older_step_makes_latest_name_it(tmp_path):
    """The newer checkpoints a resume from an older step abandons lose their marker, and `latest` (which
    sample.py --weights RUN and --init RUN follow) names the resumed step until the run saves again."""
    for step in (2, 3, 4):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / train_checkpoint.COMPLETE_FILE).write_text("{}\n")
    (tmp_path / "latest").write_text("step-00000004\n")
    abandoned = train_checkpoint.abandon_later(tmp_path, 2)
    assert [p.name for p in abandoned] == ["step-00000003", "step-00000004"]
    assert not any(train_checkpoint.is_complete(p) for p in abandoned)
    assert (tmp_path / "latest").read_text() == "step-00000002\n"


def test_only_the_first_process_reads_the_source_shards(ckpt, monkeypatch):
    """--init's fingerprint (a CRC of every shard) is read by rank 0 and sent to the others, for a new run and
    for a resume's check: on rank 1 reading the shards fails the test, and rank 0's verdict is what rank 1 says."""
    def read_shards(source):
        raise AssertionError("rank 1 read the source's shards")

    sent = []
    monkeypatch.setattr(train_checkpoint, "source_fingerprint", read_shards)
    monkeypatch.setattr(train_checkpoint, "broadcast", lambda obj, runtime: sent.pop(0))
    second = Runtime(1, 2, torch.device("cpu"))
    sent.append("model-00001-of-00002.safetensors:1234")
    record = train_checkpoint.source_record(ckpt, second)
    assert record == {"path": str(ckpt.resolve()), "fingerprint": "model-00001-of-00002.safetensors:1234"}
    sent.append(None)  # rank 0 found the source unchanged
    assert train_checkpoint.checked_source({"source": record}, second) == Path(record["path"])
    sent.append("has changed since the run began; put the original back")
    with pytest.raises(SystemExit, match="has changed since the run began"):
        train_checkpoint.checked_source({"source": record}, second)
