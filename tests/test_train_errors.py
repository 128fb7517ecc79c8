"""train.py's bad inputs and faults: every mistake is one line naming the flag, file or field (no traceback, exit
status not 0), checked before the model loads where it can be; and no kill, full disk or resume loses a
checkpoint: pruning with --keep never removes what a run still reads, a kill at any point of a save resumes from
the last complete checkpoint with exactly the losses of an uninterrupted run, and the log reads as one run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image

import train
from ovis_min.train import checkpoint as train_checkpoint
from ovis_min.train.distributed import WAIT_TIMEOUT, setup_runtime
from script_runner import one_line_error, run_script, start_script

FAST = ["--resolution", "32", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("single_thread")  # ckpt: the tiny checkpoint of conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with good and broken manifests."""
    root = tmp_path_factory.mktemp("data")
    for i, color in enumerate([(220, 30, 30), (30, 30, 220), (30, 170, 60), (230, 200, 20)]):
        Image.new("RGB", (48, 48), color).save(root / f"c{i}.png")
    rows = [{"image": f"c{i}.png", "caption": f"colour {i}"} for i in range(4)]
    rows += [{"source": "c0.png", "instruction": "make it blue", "target": "c1.png"},
             {"source": "c2.png", "instruction": "make it yellow", "target": "c3.png"}]
    rows += [{"images": ["c0.png"], "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                      {"from": "gpt", "value": "red"}]}]
    write = lambda name, lines: (root / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    write("good.jsonl", rows)
    write("missing-images.jsonl", [{"image": "nowhere.png", "caption": "x"}] * 3)
    write("wrong-types.jsonl", [{"image": "c0.png", "caption": 7}, {"image": ["c0.png"], "caption": "x"}])
    write("markers.jsonl", [{"images": ["c0.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "y"}]}])
    (root / "not-json.jsonl").write_text("{oops\n")
    (root / "a-file").write_text("")
    return root


def runs_dir(tmp_path: Path) -> Path:
    """Run directories of every kind a --resume may be given."""
    runs = tmp_path / "runs"
    for name in ("empty", "dangling", "escaping", "corrupt", "random", "foreign"):
        (runs / name).mkdir(parents=True)
    (runs / "dangling" / "latest").write_text("step-00000009\n")
    (runs / "escaping" / "latest").write_text("../../etc\n")
    for name, payload in (("corrupt", b"PK\x03\x04 truncated"), ("random", os.urandom(256))):
        step = runs / name / "step-00000001"
        step.mkdir()
        (step / "trainer.pt").write_bytes(payload)
        (step / "complete").write_text('{"step": 1}\n')
        (runs / name / "latest").write_text("step-00000001\n")
    step = runs / "foreign" / "step-00000001"
    step.mkdir()
    torch.save({"weights": torch.zeros(2)}, step / "trainer.pt")  # a torch file, not train.py's state
    (step / "complete").write_text('{"step": 1}\n')
    return runs


BASE = ["--stage", "0", "--init", "{c}", "--data", "{d}/good.jsonl", "--out", "out", "--steps", "2", "--batch", "1",
        "--micro-batch", "1"]

# (arguments replacing or adding to BASE, what the message must name)
BAD_INPUTS = [
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-1"], ["--steps"]),
    (["--resolution", "0"], ["--resolution"]),
    (["--resolution", "40"], ["--resolution", "16"]),
    (["--drop-prompt", "5"], ["--drop-prompt"]),
    (["--drop-image", "-0.1"], ["--drop-image"]),
    (["--micro-batch", "0"], ["--micro-batch"]),
    (["--batch", "-2"], ["--batch"]),
    (["--batch", "3", "--micro-batch", "2"], ["--batch", "--micro-batch"]),
    (["--save-every", "0"], ["--save-every"]),
    (["--keep", "-1"], ["--keep"]),
    (["--warmup", "0"], ["--warmup"]),
    (["--lr", "nan"], ["--lr"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "1e39"], ["--lr"]),
    (["--min-lr", "1e39"], ["--min-lr"]),
    (["--weight-decay", "1e39"], ["--weight-decay"]),
    (["--lr", "1e-3", "--min-lr", "1e-2"], ["--min-lr", "--lr"]),
    (["--lr", "0.5", "--weight-decay", "2"], ["--weight-decay", "2"]),
    (["--lora-alpha", "1e39", "--lora", "4"], ["--lora-alpha"]),
    (["--beta2", "1"], ["--beta2"]),
    (["--grad-clip", "inf"], ["--grad-clip"]),
    (["--seed", "-3"], ["--seed"]),
    (["--mix", "t2i:1"], ["--mix"]),
    (["--mix", "understanding=1"], ["--mix", "t2i"]),
    (["--mix", "t2i=0"], ["--mix"]),
    (["--stop-after", "5"], ["--stop-after", "--steps"]),
    (["--dist-timeout", "0"], ["--dist-timeout"]),
    (["--max-nonfinite", "0"], ["--max-nonfinite"]),
    (["--device", "cuda"], ["--device"]),
    (["--device", "toaster"], ["--device"]),
    (["--stage", "9"], ["--stage"]),
    (["--stage", "4", "--scratch"], ["--scratch"]),
    (["--data", "{d}/missing.jsonl"], ["missing.jsonl"]),
    (["--data", "{d}/missing-images.jsonl"], ["t2i", "missing image"]),
    (["--data", "{d}/wrong-types.jsonl"], ["t2i", "malformed"]),
    (["--stage", "3", "--data", "{d}/markers.jsonl"], ["understanding", "malformed"]),
    (["--data", "{d}/not-json.jsonl"], ["t2i"]),
    (["--init", "{d}/no-checkpoint"], ["no-checkpoint"]),
    (["--out", "{d}/a-file"], ["--out", "a-file"]),
    (["--out", "{d}/a-file/run"], ["--out", "a-file", "not a folder"]),
    (["--resume", "{r}/nowhere"], ["--resume", "nowhere"]),
    (["--resume", "{r}/empty"], ["--resume", "empty"]),
    (["--resume", "{r}/dangling"], ["--resume", "latest"]),
    (["--resume", "{r}/escaping"], ["--resume", "latest"]),
    (["--resume", "{r}/corrupt"], ["trainer.pt"]),
    (["--resume", "{r}/random"], ["trainer.pt"]),
    (["--resume", "{r}/foreign"], ["trainer.pt"]),
    (["--val-every", "10"], ["--val-every", "--val-data"]),
    (["--val-every", "0", "--val-data", "{d}/good.jsonl"], ["--val-every"]),
    (["--val-data", "{d}/missing.jsonl"], ["--val-data", "missing.jsonl"]),
    (["--val-data", "{d}/missing-images.jsonl"], ["--val-data", "t2i"]),
    (["--sample-every", "10"], ["--sample-every", "--sample-prompts"]),
    (["--sample-prompts", "{d}/missing.jsonl"], ["--sample-prompts", "missing.jsonl"]),
    (["--sample-prompts", "{d}/not-json.jsonl"], ["--sample-prompts", "line 1"]),
    (["--sample-prompts", "{d}/markers.jsonl"], ["--sample-prompts", "caption"]),
]


def with_base(changes: list[str]) -> list[str]:
    """BASE with each flag of `changes` replaced (or added)."""
    args, i = list(BASE), 0
    while i < len(changes):
        name = changes[i]
        value = [] if name == "--scratch" else [changes[i + 1]]
        if name == "--resume":  # a resume takes everything from the run
            return ["--resume", *value]
        if name in args:
            args[args.index(name) + 1:args.index(name) + 2] = value
        else:
            args += [name, *value]
        i += 1 + len(value)
    return args


@pytest.mark.parametrize("changes,names", BAD_INPUTS, ids=[" ".join(c)[:50] for c, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, ckpt, data, changes, names):
    runs = runs_dir(tmp_path)
    args = [a.format(c=ckpt, d=data, r=runs) for a in with_base(changes)]
    result = run_script("train.py", *FAST, *args, cwd=tmp_path)  # the case's own flags come last and win
    assert one_line_error(result, *names), (result.returncode, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and all(n in last for n in names), result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("step-*")) if (tmp_path / "out").exists() else True


def test_a_second_run_into_a_finished_run_directory_says_resume(tmp_path, ckpt, data):
    args = [a.format(c=ckpt, d=data) for a in BASE]
    assert run_script("train.py", *args, *FAST, cwd=tmp_path).returncode == 0
    again = run_script("train.py", *args, *FAST, cwd=tmp_path)
    assert one_line_error(again, "--resume out"), again.stderr


def test_full_disk_while_saving_is_one_line_and_removes_the_partial_save(tmp_path, ckpt, data):
    out = tmp_path / "small"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")  # the in-process test below covers the same path
    try:
        args = [a.format(c=ckpt, d=data) for a in with_base(["--out", str(out / "run")])]
        result = run_script("train.py", *args, *FAST, cwd=tmp_path)
        assert one_line_error(result, "disk is full", "--resume"), result.stderr[-2000:]
        assert [p.name for p in (out / "run").iterdir()] == ["log.jsonl"]
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_full_disk_in_process(tmp_path, ckpt, data, monkeypatch):
    """As on a real small disk: the weights file cannot be written."""
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_checkpoint, "save_checkpoint", no_space)
    with pytest.raises(SystemExit, match="disk is full.*--resume"):
        train.main([a.format(c=ckpt, d=data) for a in with_base(["--out", str(tmp_path / "run")])] + FAST)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.jsonl"]


def test_out_on_a_read_only_file_system_is_one_line_before_loading(tmp_path, ckpt, data, monkeypatch, capsys):
    """Root writes through permissions, so the read-only file system is the answer its probe file gets."""
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(train.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(train, "load_checkpoint", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit):
        train.main([a.format(c=ckpt, d=data) for a in with_base(["--out", str(tmp_path / "ro" / "run")])] + FAST)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --out" in last and "Read-only file system" in last, last  # argparse names the program
    assert not (tmp_path / "ro").exists()


def test_init_with_a_corrupt_tokenizer_is_one_line(tmp_path, ckpt, data, monkeypatch):
    import shutil

    init = shutil.copytree(ckpt, tmp_path / "init")
    (init / "tokenizer.json").write_text("{not json")
    monkeypatch.setattr(sys, "argv", ["train.py", *[a.format(c=init, d=data) for a in BASE], *FAST])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"^train.py: error: .*{init / 'tokenizer.json'}[^\n]*$"):
        train.run_cli()  # what `python train.py` runs


def test_resume_says_which_step_and_why_refuses_latest_outside_the_run_and_damaged_bytes(tmp_path, ckpt, data,
                                                                                         capsys):
    from ovis_min.checkpoint import CheckpointError
    from ovis_min.hub import resolve_source

    out = tmp_path / "run"
    train.main(common(ckpt, data, out) + ["--stop-after", "2"])
    step1, step2 = out / "step-00000001", out / "step-00000002"
    for latest, why in (("step-00000002\n", "as 'latest' says"), (None, "no 'latest' file"), ("", "is empty"),
                        ("step-00000009\n", "'step-00000009', which is not a complete checkpoint"),
                        ("step-00000001\n", "'step-00000001', which is older")):
        (out / "latest").unlink(missing_ok=True)
        if latest is not None:
            (out / "latest").write_text(latest)
        capsys.readouterr()
        assert train.parse_args(["--resume", str(out), *FAST])[1] == step2
        assert f"resuming from {step2}: the newest complete checkpoint" in capsys.readouterr().err
        assert why in train_checkpoint.resolve_resume(out)[1]
    # `latest` naming a path outside the run: refused by --resume, export and sample.py --weights RUN
    (out / "latest").write_text("../../../etc\n")
    with pytest.raises(SystemExit, match="train.py: error: --resume .*'latest' file names '../../../etc', a path "
                                         "outside the run"):
        train.main(["--resume", str(out), *FAST])
    with pytest.raises(SystemExit, match="outside the run"):
        train.main(["export", str(out), "--out", str(tmp_path / "e")])
    with pytest.raises(CheckpointError, match="../../../etc"):
        resolve_source(out)
    (out / "latest").write_text("step-00000002\n")
    # one byte of a shard changed, its size kept: the marker's CRC-32 tells, and the step before is named
    shard = next((step2 / "state").glob("*.distcp"))
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0x01
    shard.write_bytes(bytes(data_bytes))
    with pytest.raises(SystemExit, match=f"train.py: error: --resume: {shard}.*CRC-32.*damaged; resume from {step1}"):
        train.main(["--resume", str(out), *FAST])
    with pytest.raises(SystemExit, match="CRC-32"):
        train.main(["export", str(out), "--out", str(tmp_path / "e")])
    data_bytes[len(data_bytes) // 2] ^= 0x01
    shard.write_bytes(bytes(data_bytes))
    (step2 / "trainer.pt").write_bytes(b"")  # cut short: the size tells
    with pytest.raises(SystemExit, match=f"trainer.pt has 0 bytes, not .*; resume from {step1}"):
        train_checkpoint.resolve_resume(step2)
    assert not (tmp_path / "e").exists()


# -- resume, keep, kill ------------------------------------------------------------------------------------------

def common(ckpt, data, out: Path) -> list[str]:
    return ["--stage", "5", "--init", str(ckpt), "--data", str(data / "good.jsonl"), "--out", str(out), "--steps", "6",
            "--batch", "2", "--micro-batch", "1", "--lr", "1e-3", "--save-every", "1", *FAST]


@pytest.fixture(scope="module")
def whole(ckpt, data, tmp_path_factory) -> list[dict]:
    """The uninterrupted run every interrupted one must equal."""
    return train.main(common(ckpt, data, tmp_path_factory.mktemp("whole") / "run"))


def losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "step" in r]


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def steps_kept(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("step-"))


@pytest.mark.parametrize("keep", [1, 3])
def test_resume_through_several_saves_with_keep(ckpt, data, tmp_path, whole, keep):
    out = tmp_path / "run"
    args = common(ckpt, data, out) + ["--keep", str(keep)]
    records = train.main(args + ["--stop-after", "2"])
    records += train.main(["--resume", str(out), "--stop-after", "4", *FAST])
    assert len(steps_kept(out)) == min(keep, 4)
    records += train.main(["--resume", str(out), *FAST])
    assert losses(records) == losses(whole)
    assert losses(logged(out)) == losses(whole)
    assert steps_kept(out) == [f"step-{n:08d}" for n in range(7 - keep, 7)]
    assert (out / "latest").read_text().strip() == "step-00000006"


def test_resume_from_an_older_step_with_keep_1(ckpt, data, tmp_path, whole):
    out = tmp_path / "run"
    train.main(common(ckpt, data, out) + ["--keep", "0", "--stop-after", "4"])
    records = train.main(["--resume", str(out / "step-00000002"), "--keep", "1", *FAST])
    assert losses(records) == losses(whole)[2:]
    assert steps_kept(out) == ["step-00000006"] and (out / "latest").read_text().strip() == "step-00000006"
    assert losses(logged(out)) == losses(whole)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_every_state_a_killed_save_can_leave_resumes_exactly(ckpt, data, tmp_path, whole):
    """A save is: step-N's state written, its `complete` marker written, then `latest` replaced. A kill between any
    two of these leaves one of the states made here by hand; each resumes like the uninterrupted run."""
    out = tmp_path / "run"
    train.main(common(ckpt, data, out) + ["--keep", "0", "--stop-after", "3"])
    # killed while writing step 3's state: no marker, part of the state missing
    (out / "step-00000003" / "complete").unlink()
    (out / "step-00000003" / "state" / ".metadata").unlink()
    (out / "latest").write_text("step-00000002\n")
    records = train.main(["--resume", str(out), "--stop-after", "3", *FAST])
    assert losses(records) == losses(whole)[2:3]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    # killed after the marker, before `latest` was replaced: the newest complete checkpoint is step 3
    (out / "latest").write_text("step-00000002\n")
    records = train.main(["--resume", str(out), "--stop-after", "4", *FAST])
    assert losses(records) == losses(whole)[3:4]
    # killed while writing `latest`'s temporary file
    (out / f".tmp-{dead_pid()}-latest.part").write_text("step-0000")
    records = train.main(["--resume", str(out), *FAST])
    assert losses(records) == losses(whole)[4:]
    assert losses(logged(out)) == losses(whole)


def test_kill_9_during_training_resumes_with_identical_losses(ckpt, data, tmp_path, whole):
    out = tmp_path / "run"
    run = start_script("train.py", *common(ckpt, data, out), cwd=tmp_path)
    run.wait_for("saved")  # at least one checkpoint
    time.sleep(0.3)  # then anywhere in what follows: a step, a save, a prune
    run.send_signal(signal.SIGKILL)
    run.wait()
    result = run_script("train.py", "--resume", str(out), *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(logged(out)) == losses(whole)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_the_process_group_and_the_group_of_long_waits_get_their_timeouts(monkeypatch, capsys):
    """--dist-timeout reaches init_process_group; the waits for one rank's long work (indexing, the export, the end
    of `train.py cache`) have a gloo group of their own with a far longer timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": port}.items():
        monkeypatch.setenv(name, value)
    runtime = setup_runtime("cpu", timedelta(minutes=7))
    try:
        timeout = lambda group: group._get_backend(torch.device("cpu")).options._timeout  # noqa: E731
        assert timeout(dist.group.WORLD) == timedelta(minutes=7)
        assert timeout(runtime.waits) == WAIT_TIMEOUT >= timedelta(hours=12)
    finally:
        dist.destroy_process_group()
    assert train.build_parser().parse_args(["--dist-timeout", "7"]).dist_timeout == 7
    with pytest.raises(SystemExit):  # the cache command takes the flag too
        train.main(["cache", "--stage", "4", "--init", "x", "--data", "x", "--out", "x", "--dist-timeout", "-1"])
    assert "--dist-timeout" in capsys.readouterr().err
