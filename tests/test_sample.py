"""sample.py as a user runs it, on a tiny random checkpoint in the official layout.

Script runs (each a process of its own, see script_runner) cover every task, --help, seed reproducibility,
numbered outputs, the PNG metadata round trip and each kind of user error (one line on stderr, non-zero exit, no
traceback). More variants of the same paths call `sample.main(argv)` in this process. Images are 64x64 with 2
steps. The network is never used: the Hugging Face cache is an empty folder, and offline. Bad inputs and faults
(signals, a full disk, two runs at once) are in test_sample_errors.py.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample as sample_cli
from script_runner import Run, run_script
from ovis_min.tiny import write_tiny_checkpoint
from ovis_min.pipeline import OFFLOAD_GROUPS, Ovis

FAST = ["--width", "64", "--height", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ovis") / "ckpt", seed=0, shards=2)


def offline_env(tmp_path: Path) -> dict[str, str]:
    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture
def sample(tmp_path, weights):
    """sample.py in a new process, run in a fresh folder (its default outputs/ lands there), tiny weights."""
    def run(*args: str, with_weights: bool = True, cwd: Path = tmp_path) -> Run:
        return run_script("sample.py", *args, *(["--weights", str(weights)] if with_weights else []), cwd=cwd,
                          env=offline_env(tmp_path))
    return run


@pytest.fixture
def one_thread():
    """As the subprocesses run (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sample_here(tmp_path, weights, monkeypatch, capsys, one_thread):
    """sample.main(argv) in this process, same set-up; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)

    def run(*args: str, with_weights: bool = True) -> tuple[int, str, str]:
        status = sample_cli.main([*args, *(["--weights", str(weights)] if with_weights else [])])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


def ok(result: Run) -> Run:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def saved(stdout: str, cwd: Path) -> list[Path]:
    """The image paths sample.py printed on stdout (one per line), made absolute."""
    paths = [cwd / line for line in stdout.splitlines() if line.strip()]
    assert paths and all(p.is_file() for p in paths), stdout
    return paths


def input_image(path: Path, width: int = 80, height: int = 60, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def metadata(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return np.asarray(image).tobytes()


# -- help and the four tasks ------------------------------------------------------------------------------------

def test_help_shows_every_task_with_an_example(sample):
    result = ok(sample("--help", with_weights=False))
    for example in ('--prompt "', '--image photo.jpg --prompt "', '--image photo.jpg --ask "',
                    '--image a.jpg b.jpg --ask "', 'python sample.py --ask "', "--from-png "):
        assert example in result.stdout, example
    for option in ("--weights", "--width", "--steps", "--txt-cfg", "--img-cfg", "--seed", "--num-images", "--out",
                   "--max-new-tokens", "--temperature", "--top-p", "--device", "--dtype", "--offload", "--compile"):
        assert option in result.stdout, option


def test_text_to_image(sample, tmp_path, weights):
    result = ok(sample("--prompt", "a cat on a mat", "--width", "72", "--height", "64", "--steps", "2",
                       "--seed", "7"))
    path, = saved(result.stdout, tmp_path)
    assert path == tmp_path / "outputs" / "t2i-0001.png"
    with Image.open(path) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert metadata(path) == {"task": "t2i", "prompt": "a cat on a mat", "seed": "7", "steps": "2", "txt_cfg": "5.0",
                              "width": "64", "height": "64", "model": str(weights.resolve()),
                              "Software": "ovis-min sample.py"}
    assert "width 72 rounded down to 64" in result.stderr
    assert "seed 7" in result.stderr
    assert "2/2 steps" in result.stderr  # the progress bar's last state
    assert "steps/s" in result.stderr and "peak" in result.stderr


def test_edit_defaults_to_the_input_size_rounded_as_the_official_script(sample, tmp_path):
    source = input_image(tmp_path / "in.png", 80, 60)
    result = ok(sample("--image", str(source), "--prompt", "make it blue", "--steps", "2", "--seed", "3"))
    path, = saved(result.stdout, tmp_path)
    assert path.name == "edit-0001.png"
    with Image.open(path) as image:
        assert image.size == (64, 64)  # smart_resize(60, 80, factor=32): round(1.875)=2, round(2.5)=2 (halves to even)
    assert "editing at 64x64" in result.stderr and "official edit script" in result.stderr
    info = metadata(path)
    assert (info["task"], info["txt_cfg"], info["img_cfg"], info["source"]) == ("edit", "6.0", "1.5", str(source))


def test_edit_at_a_chosen_size(sample_here, tmp_path):
    source = input_image(tmp_path / "in.png", 80, 60)
    status, out, err = sample_here("--image", str(source), "--prompt", "make it blue", "--width", "48", "--steps",
                                   "2", "--seed", "3", "--txt-cfg", "4", "--img-cfg", "2")
    assert status == 0, err
    path, = saved(out, tmp_path)
    with Image.open(path) as image:
        assert image.size == (48, 32)  # the other side keeps the input's 4:3 (36), rounded down to 16
    assert (metadata(path)["txt_cfg"], metadata(path)["img_cfg"]) == ("4.0", "2.0")


def test_understanding_streams_an_answer_about_several_images(sample, tmp_path):
    first, second = input_image(tmp_path / "a.png", seed=1), input_image(tmp_path / "b.png", 56, 84, seed=2)
    result = ok(sample("--image", str(first), str(second), "--ask", "Describe the image", "--max-new-tokens", "4"))
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "tokens/s" in result.stderr
    assert "seed" not in result.stderr  # greedy: nothing random to seed
    assert not (tmp_path / "outputs").exists()


def test_text_chat_sampling_is_seeded(sample, sample_here):
    flags = ["--ask", "Describe an image", "--max-new-tokens", "6", "--temperature", "1", "--top-p", "0.9",
             "--seed", "5"]
    result = ok(sample(*flags))
    assert "seed 5" in result.stderr and result.stdout.strip()
    status, out, _ = sample_here(*flags)
    assert status == 0 and out == result.stdout


# -- reproducibility, file names, metadata ----------------------------------------------------------------------

def test_same_flags_and_seed_give_the_same_bytes_and_new_names(sample, tmp_path):
    first, = saved(ok(sample("--prompt", "a cat", *FAST, "--seed", "11", "--out", "pics")).stdout, tmp_path)
    again, = saved(ok(sample("--prompt", "a cat", *FAST, "--seed", "11", "--out", "pics")).stdout, tmp_path)
    assert (first.name, again.name) == ("t2i-0001.png", "t2i-0002.png")
    assert first.read_bytes() == again.read_bytes()
    # several images: the seeds go on from --seed, the names from the highest number in the folder
    batch = saved(ok(sample("--prompt", "a cat", *FAST, "--seed", "11", "--num-images", "2", "--out",
                            "pics")).stdout, tmp_path)
    assert [p.name for p in batch] == ["t2i-0003.png", "t2i-0004.png"]
    assert batch[0].read_bytes() == first.read_bytes()
    assert metadata(batch[1])["seed"] == "12" and pixels(batch[1]) != pixels(first)


def test_a_file_name_is_never_overwritten_and_a_random_seed_is_printed(sample, tmp_path):
    named, = saved(ok(sample("--prompt", "a cat", *FAST, "--seed", "1", "--out", "cat.png")).stdout, tmp_path)
    assert named == tmp_path / "cat.png"
    before = named.read_bytes()
    result = ok(sample("--prompt", "a dog", *FAST, "--out", "cat.png"))
    renamed, = saved(result.stdout, tmp_path)
    assert renamed == tmp_path / "cat-0001.png" and "cat.png exists" in result.stderr
    assert named.read_bytes() == before
    assert f"seed {metadata(renamed)['seed']}," in result.stderr


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_from_png_remakes_the_same_image(sample, tmp_path, task):
    source = input_image(tmp_path / "in.png", 60, 80)
    task_flags = ["--image", str(source)] if task == "edit" else ["--width", "48", "--height", "64"]
    original, = saved(ok(sample("--prompt", "ein Bild, une image, 一张图片", *task_flags, "--steps", "2",
                                "--seed", "21", "--txt-cfg", "3.5")).stdout, tmp_path)
    # from another folder and without --weights: everything comes from the metadata
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    remade, = saved(ok(sample("--from-png", str(original), with_weights=False, cwd=elsewhere)).stdout, elsewhere)
    assert remade.read_bytes() == original.read_bytes()


def test_from_png_flags_override_the_recorded_settings(sample_here, tmp_path):
    status, out, err = sample_here("--prompt", "a cat", *FAST, "--seed", "4", "--txt-cfg", "2")
    original, = saved(out, tmp_path)
    status, out, err = sample_here("--from-png", str(original), "--seed", "9", with_weights=False)
    assert status == 0, err
    info = metadata(saved(out, tmp_path)[0])
    assert (info["seed"], info["prompt"], info["txt_cfg"], info["width"]) == ("9", "a cat", "2.0", "64")


# -- errors: one line, a non-zero exit status, no traceback -----------------------------------------------------

def error_line(result: Run, status: int) -> str:
    assert result.returncode == status, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_weights_say_how_to_get_them(sample):
    line = error_line(sample("--prompt", "a cat", *FAST, with_weights=False), 1)  # the default hub id, offline
    assert "python weights.py download" in line and "--weights DIR" in line


def test_missing_image(sample):
    assert "image not found: no-such.png" in error_line(sample("--prompt", "a cat", "--image", "no-such.png"), 1)


def test_corrupt_image(sample, tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(input_image(tmp_path / "real.png").read_bytes()[:200])
    assert "cannot read" in error_line(sample("--ask", "what is it?", "--image", str(truncated)), 1)


def test_flag_of_another_task(sample):
    line = error_line(sample("--ask", "what is it?", "--steps", "3"), 2)
    assert "--steps is for images (--prompt), not for text chat" in line


def test_size_too_small(sample):
    assert "--width 16: too small" in error_line(sample("--prompt", "a cat", "--width", "16"), 2)


def test_unwritable_output(sample, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = error_line(sample("--prompt", "a cat", *FAST, "--out", str(tmp_path / "a-file" / "x.png")), 1)
    assert "cannot write images into" in line


@pytest.mark.parametrize("args, status, expected", [
    (["--ask", "what is it?", "--image", "{garbage}"], 1, "cannot read"),
    (["--ask", "what is it?", "--image", "{folder}"], 1, "got a directory"),
    (["--ask", "hi", "--out", "x.png"], 2, "--out is for images (--prompt), not for text chat"),
    (["--ask", "hi", "--image", "{image}", "--width", "64", "--num-images", "2"], 2,
     "--width, --num-images are for images (--prompt), not for understanding"),
    (["--prompt", "a cat", "--temperature", "0.7"], 2, "--temperature is for answers (--ask)"),
    (["--prompt", "a cat", "--img-cfg", "2"], 2, "--img-cfg is the image guidance of editing: it needs --image"),
    (["--prompt", "a cat", "--ask", "what?"], 2, "different tasks"),
    (["--width", "64"], 2, "nothing to do"),
    (["--prompt", "a cat", "--image", "{image}", "{image}"], 2, "editing takes one --image"),
    (["--prompt", "a cat", "--image", "{image}", "--height", "31"], 2, "--height 31: too small"),
    (["--prompt", "a cat", "--steps", "0"], 2, "--steps 0: must be at least 1"),
    (["--ask", "hi", "--top-p", "1.5"], 2, "--top-p 1.5"),
    (["--ask", "hi", "--temperature", "-1"], 2, "--temperature -1"),
    (["--prompt", "a cat", "--out", "{image}/x.png"], 1, "cannot write images into"),
    (["--prompt", "a cat", "--out", "picture.jpg"], 2, "PNG"),
    (["--prompt", "a cat", "--device", "tpu9"], 2, "--device tpu9"),
    (["--from-png", "{image}"], 1, "no ovis-min settings"),
    (["--from-png", "{garbage}"], 1, "not a readable PNG"),
    (["--from-png", "no-such.png"], 1, "no such file"),
    (["--ask", "hi", "--weights", "{folder}"], 1, "python weights.py download"),
    (["--ask", "hi", "--weights", "{folder}/missing"], 1, "python weights.py download"),
])
def test_more_user_errors(sample_here, tmp_path, args, status, expected):
    files = {"image": input_image(tmp_path / "plain.png"), "garbage": tmp_path / "garbage.png",
             "folder": tmp_path / "folder"}
    files["garbage"].write_text("this is not an image\n")
    files["folder"].mkdir()
    result_status, out, err = sample_here(*[arg.format(**files) for arg in args],
                                          with_weights="--weights" not in args)
    assert result_status == status, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "outputs").exists()  # nothing was written


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user whom file permissions bind")
def test_read_only_output_folder(sample_here, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, _, err = sample_here("--prompt", "a cat", *FAST, "--out", str(locked))
    finally:
        locked.chmod(0o700)
    assert status == 1 and "cannot write images into" in err


def test_unknown_flag(sample_here, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_here("--prompt", "a cat", "--guidance", "3")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --guidance" in capsys.readouterr().err


# -- the library side of --offload --------------------------------------------------------------------------------

def test_offload_moves_one_group_at_a_time_and_changes_no_pixel(weights, one_thread):
    plain = Ovis.from_pretrained(weights, device="cpu", dtype=torch.float32)
    offloaded = Ovis.from_pretrained(weights, device="cpu", dtype=torch.float32, offload=True)
    kwargs = dict(width=48, height=32, steps=2, seed=5)
    assert np.array_equal(np.asarray(plain.text_to_image("a cat", **kwargs)[0]),
                          np.asarray(offloaded.text_to_image("a cat", **kwargs)[0]))
    # An offloaded answer leaves no KV cache to carry between CPU and device; a resident model keeps it for the
    # next answer.
    assert plain.answer("hi", max_new_tokens=2) == offloaded.answer("hi", max_new_tokens=2)
    assert offloaded.model.llm.cache_len() == 0 and plain.model.llm.cache_len() > 0
    # Where each group lands, with the meta device standing in for a GPU (a one-way trip: meta holds no data).
    offloaded.device = torch.device("meta")
    offloaded.use("decoder")
    for group, modules in OFFLOAD_GROUPS.items():
        for name in modules:
            devices = {p.device.type for p in offloaded.model.get_submodule(name).parameters()}
            assert devices == ({"meta"} if group == "decoder" else {"cpu"}), (group, name, devices)
