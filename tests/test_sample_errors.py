"""sample.py's bad inputs and faults, each run as its own process: every mistake ends with a non-zero exit and one
line naming the flag or file at fault (no traceback), and no signal, full disk or second run loses an image or
leaves a partial one under an output name."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from script_runner import one_line_error, run_script, start_script
from ovis_min.tiny import write_tiny_checkpoint

FAST = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ovis") / "ckpt", seed=0, shards=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Inputs of every kind a user may pass by mistake."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.zeros((60, 80, 3), dtype=np.uint8)).save(folder / "photo.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.new("1", (20000, 10000)).save(folder / "bomb.png")  # 2e8 pixels in a few kilobytes
    (folder / "notes.txt").write_text("not an image")
    (folder / "a-file").write_text("")
    (folder / "empty-dir").mkdir()
    return folder


def offline(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "hf-cache").mkdir(exist_ok=True)
    return {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


def sample(tmp_path: Path, *args: str):
    return run_script("sample.py", *args, cwd=tmp_path, env=offline(tmp_path))


# (arguments, what the message must name); {w} is the tiny checkpoint, {f} the folder of inputs
BAD_INPUTS = [
    (["--steps", "0", "--prompt", "a cat"], ["--steps"]),
    (["--steps", "1000000000", "--prompt", "a cat"], ["--steps", "at most"]),
    (["--steps", "abc", "--prompt", "a cat"], ["--steps"]),
    (["--ask", "hi", "--max-new-tokens", "1000000000"], ["--max-new-tokens", "at most"]),
    (["--ask", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt", "a cat", "--txt-cfg", "nan"], ["--txt-cfg", "finite"]),
    (["--prompt", "a cat", "--txt-cfg", "inf"], ["--txt-cfg", "finite"]),
    (["--prompt", "a cat", "--image", "{f}/photo.png", "--img-cfg", "nan"], ["--img-cfg", "finite"]),
    (["--prompt", "a cat", "--txt-cfg=-1e30"], ["--txt-cfg", "[-1000, 1000]"]),
    (["--prompt", "a cat", "--image", "{f}/photo.png", "--img-cfg", "1e30"], ["--img-cfg", "[-1000, 1000]"]),
    (["--prompt", "a cat", "--img-cfg", "2"], ["--img-cfg", "--image"]),
    (["--ask", "hi", "--temperature", "nan"], ["--temperature"]),
    (["--ask", "hi", "--temperature", "-1"], ["--temperature"]),
    (["--ask", "hi", "--top-p", "0"], ["--top-p"]),
    (["--ask", "hi", "--top-p", "nan"], ["--top-p"]),
    (["--prompt", "a cat", "--seed", "-1"], ["--seed"]),
    (["--prompt", "a cat", "--seed", str(2 ** 63 - 1), "--num-images", "2"], ["--seed", "--num-images"]),
    (["--prompt", "a cat", "--seed", str(2 ** 63)], ["--seed"]),
    (["--prompt", "a cat", "--num-images", "0"], ["--num-images"]),
    (["--prompt", "a cat", "--width", "100000"], ["--width", "at most"]),
    (["--prompt", "a cat", "--height", "16"], ["--height", "at least"]),
    (["--prompt", "a cat \udcff\udcfe"], ["--prompt", "UTF-8"]),
    (["--prompt", "  "], ["--prompt", "empty"]),
    (["--ask", ""], ["--ask", "empty"]),
    (["--ask", "hi", "--steps", "3"], ["--steps"]),
    (["--prompt", "a", "--ask", "b"], ["--prompt", "--ask"]),
    ([], ["--prompt", "--ask"]),
    (["--prompt", "a cat", "--image", "{f}/missing.png"], ["missing.png"]),
    (["--prompt", "a cat", "--image", "{f}/corrupt.png"], ["corrupt.png"]),
    (["--prompt", "a cat", "--image", "{f}/bomb.png"], ["bomb.png", "downscale"]),
    (["--ask", "what?", "--image", "{f}/empty-dir"], ["empty-dir"]),
    (["--prompt", "a cat", "--image", "{f}/photo.png", "{f}/photo.png"], ["--image"]),
    (["--prompt", "a cat", "--out", "cat.jpg"], ["--out", ".png"]),
    (["--prompt", "a cat", "--out", "{f}/a-file"], ["a-file", "--out"]),
    (["--prompt", "a cat", "--device", "cuda:7"], ["--device"]),
    (["--prompt", "a cat", "--device", "toaster"], ["--device"]),
    (["--prompt", "a cat", "--dtype", "fp16"], ["--dtype"]),
    (["--from-png", "{f}/missing.png"], ["--from-png", "missing.png"]),
    (["--from-png", "{f}/notes.txt"], ["--from-png", "notes.txt"]),
    (["--from-png", "{f}/photo.png"], ["--from-png", "metadata"]),
    (["--prompt", "a cat", *FAST, "--weights", "{f}/empty-dir"], ["empty-dir"]),
    (["--prompts", "{f}/notes.txt", "--out", "set", "--batch-size", "100000"], ["--batch-size", "at most"]),
    (["--prompts", "{f}/notes.txt", "--out", "set", "--images-per-prompt", "0"], ["--images-per-prompt"]),
    (["--prompt", "a cat", *FAST, "--weights", "{f}/nowhere"], ["nowhere", "weights.py download"]),
]


@pytest.mark.parametrize("args,names", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_fix(tmp_path, weights, files, args, names):
    args = [a.format(w=weights, f=files) for a in args]
    if "--weights" not in args:
        args += ["--weights", str(weights)]
    run = sample(tmp_path, *args)
    assert one_line_error(run, *names), (run.returncode, run.stderr)
    last = run.stderr.strip().splitlines()[-1]  # argparse prints its usage before the error line
    assert last.startswith("sample.py: error: ") and all(n in last for n in names), run.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")


def test_two_runs_into_one_folder_both_keep_their_images(tmp_path, weights):
    runs = [start_script("sample.py", "--prompt", f"a cat {i}", *FAST, "--num-images", "2", "--weights", weights,
                         "--out", "shared", cwd=tmp_path, env=offline(tmp_path)) for i in range(2)]
    results = [r.wait() for r in runs]
    printed = [line for r in results for line in r.stdout.split()]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(printed) == len(set(printed)) == 4
    assert sorted(tmp_path / p for p in printed) == pngs(tmp_path / "shared")
    assert sorted(os.listdir(tmp_path / "shared")) == [f"t2i-{n:04d}.png" for n in range(1, 5)]
    for path in pngs(tmp_path / "shared"):
        with Image.open(path) as image:
            image.load()


def test_ctrl_c_while_sampling_leaves_no_partial_image(tmp_path, weights):
    run = start_script("sample.py", "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "1000",
                       "--weights", weights, cwd=tmp_path, env=offline(tmp_path))
    time.sleep(3)
    run.send_signal(signal.SIGINT)
    result = run.wait()
    assert result.returncode == 130 and "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or os.listdir(tmp_path / "outputs") == []


@pytest.fixture
def small_disk(tmp_path):
    """A folder on an 8 KiB file system: smaller than one PNG of the tiny model. Mounting needs root; elsewhere
    the full disk is simulated in-process (see test_full_disk_in_process)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here; test_full_disk_in_process covers the same path")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, weights, small_disk):
    run = sample(tmp_path, "--prompt", "a cat", *FAST, "--weights", str(weights), "--out", str(small_disk))
    assert one_line_error(run, "disk is full", "--out"), run.stderr
    assert os.listdir(small_disk) == []


def test_full_disk_in_process(tmp_path, monkeypatch, capsys, weights):
    """The same as on a real small disk, where mounting one is not allowed: the file system answers ENOSPC
    half-way through writing the image."""
    import errno

    import sample as sample_cli
    from ovis_min import files

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    monkeypatch.chdir(tmp_path)
    status = sample_cli.main(["--prompt", "a cat", *FAST, "--weights", str(weights), "--out", "full"])
    err = capsys.readouterr().err
    assert status == 1 and "disk is full" in err, err
    assert os.listdir(tmp_path / "full") == []


def test_leftovers_of_a_killed_run_are_removed(tmp_path, weights):
    out = tmp_path / "outputs"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    leftover = out / f".tmp-{dead.pid}-abc.part"
    leftover.write_bytes(b"\x89PNG half")
    alive = out / f".tmp-{os.getpid()}-def.part"  # a writer still running: not ours to remove
    alive.write_bytes(b"in flight")
    run = sample(tmp_path, "--prompt", "a cat", *FAST, "--weights", str(weights))
    assert run.returncode == 0, run.stderr
    assert not leftover.exists() and alive.exists()
    assert sorted(os.listdir(out)) == [alive.name, "t2i-0001.png"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, weights) -> Path:
    """Copies of the tiny checkpoint: every weight NaN; a preprocessor patch size its encoder was not built for."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("damaged")
    nan = shutil.copytree(weights, folder / "all-nan")
    for shard in nan.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        save_file({name: t.fill_(float("nan")) if t.is_floating_point() else t for name, t in tensors.items()},
                  shard, metadata=metadata)
    patch = shutil.copytree(weights, folder / "patch-size")
    pre = json.loads((patch / "preprocessor_config.json").read_text())
    pre["patch_size"] += 2
    (patch / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


@pytest.mark.usefixtures("single_thread")  # one thread, as script runs have
def test_nan_weights_end_the_run_naming_the_checkpoint(tmp_path, monkeypatch, capsys, damaged):
    """Silently black images (NaN pixels become 0) or token 0 repeated (NaN logits) would pass for results. In this
    process: the checkpoint loads in a fraction of a second, a new process would import everything again."""
    import sample as sample_cli

    monkeypatch.chdir(tmp_path)
    nan = str(damaged / "all-nan")
    for task, what in ((["--prompt", "a cat", *FAST], "image"), (["--ask", "hi", "--max-new-tokens", "2"], "logits")):
        assert sample_cli.main([*task, "--weights", nan]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("sample.py: error: ") and all(n in error for n in (what, "NaN", nan)), error
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_a_preprocessor_patch_size_the_weights_do_not_have_is_one_line(tmp_path, damaged):
    run = sample(tmp_path, "--prompt", "a cat", *FAST, "--weights", str(damaged / "patch-size"))
    assert one_line_error(run, "preprocessor_config.json", "patch_size", "config.json"), run.stderr
