"""sample.py --prompts / --edits / --questions: benchmark sets in the layouts their scorers read.

On the tiny random checkpoint, 64x64 images and 2 steps: every layout exactly (folders, names, metadata lines,
grid size), the PNG metadata that --from-png re-makes each image from, resuming (a killed run finishes with the
files of an uninterrupted one), 2 processes under torchrun (gloo, CPU) write the bytes of 1, batching within the
golden tolerance, and bad rows counted. Runs are processes forked by tests/script_runner.py.
"""
import argparse
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_min import benchmarks, pipeline
from ovis_min.pipeline import Ovis
from ovis_min.preprocess import edit_target_size
from ovis_min.tiny import write_tiny_checkpoint
from script_runner import ROOT, one_line_error, run_script, script_env, start_script

FAST = ["--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]
PROMPTS = ["a photo of a bench", "a photo of a cat and a dog sitting together on a long green sofa", "a red cube",
           "two blue birds", "a clock tower at night, oil painting", "a bowl of fruit"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ovis") / "ckpt", seed=0)


@pytest.fixture
def sample(tmp_path, weights):
    """sample.py as a process in tmp_path, tiny weights, offline."""
    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(*args, check: bool = True):
        result = run_script("sample.py", *args, "--weights", weights, cwd=tmp_path, env=env)
        if check:
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return result
    return run


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def geneval_file(path: Path, prompts: list[str]) -> Path:
    return write_lines(path, [{"tag": "single_object", "include": [{"class": "x", "count": 1}], "prompt": p}
                              for p in prompts])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


def input_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


# -- reading, seeds, sharding (no model) ----------------------------------------------------------------------------

def test_item_seeds_depend_on_base_seed_and_id_only():
    assert benchmarks.item_seed(0, "00001") == benchmarks.item_seed(0, "00001")
    assert len({benchmarks.item_seed(0, f"{i:05d}") for i in range(1000)}) == 1000
    assert benchmarks.item_seed(1, "00001") != benchmarks.item_seed(0, "00001")
    assert all(0 <= benchmarks.item_seed(7, str(i)) < 2 ** 31 for i in range(100))


def test_readers_report_bad_rows_with_line_numbers(tmp_path):
    image = input_image(tmp_path / "a.png", 64, 64)
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok", "id": "a"}, "{not json", "", {"prompt": " "},
                                                 [1, 2], {"prompt": "x", "id": "a"}, {"prompt": "y", "id": "../up"},
                                                 {"prompt": "z", "width": 8}, {"prompt": "w", "seed": 5}])
    bench = benchmarks.read_prompts(prompts)
    assert bench.kind == "prompts" and [(i.id, i.line) for i in bench.items] == [("a", 1), ("00008", 9)]
    assert bench.items[1].seed == 5
    assert [row.split(": ")[0] for row in bench.bad_rows] == [f"{prompts}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    edits = write_lines(tmp_path / "e.jsonl", [{"image": "a.png", "instruction": "blue", "id": "1", "subdir": "t/en"},
                                               {"image": "missing.png", "instruction": "red", "id": "2"},
                                               {"image": "a.png", "prompt": "", "id": "3"},
                                               {"image": "a.png", "prompt": "green", "id": "4"}])
    bench = benchmarks.read_edits(edits)
    assert [(i.id, i.subdir, i.source_size) for i in bench.items] == [("1", "t/en", (64, 64)), ("4", "", (64, 64))]
    assert bench.bad_rows[0].startswith(f"{edits}:2: image") and "not found" in bench.bad_rows[0]
    assert bench.bad_rows[1].startswith(f"{edits}:3: no instruction")
    questions = write_lines(tmp_path / "q.jsonl", [{"id": "q1", "question": "what?", "images": [image.name]},
                                                   {"id": "q2", "question": "and?", "images": ["gone.png"]},
                                                   {"id": "q3", "question": "text only"}])
    bench = benchmarks.read_questions(questions)
    assert [i.id for i in bench.items] == ["q1", "q3"] and bench.items[0].images == [image]
    assert len(bench.bad_rows) == 1 and bench.bad_rows[0].startswith(f"{questions}:2:")


def test_set_kinds_are_recognised(tmp_path):
    assert benchmarks.read_prompts(geneval_file(tmp_path / "g.jsonl", ["a", "b"])).kind == "geneval"
    (tmp_path / "dpg").mkdir()
    for name, text in (("b", "second"), ("a", "first"), ("c", "")):
        (tmp_path / "dpg" / f"{name}.txt").write_text(text)
    bench = benchmarks.read_prompts(tmp_path / "dpg")
    assert bench.kind == "dpg" and [(i.id, i.text) for i in bench.items] == [("a", "first"), ("b", "second")]
    assert bench.bad_rows == [f"{tmp_path / 'dpg' / 'c.txt'}: empty prompt"]


def test_a_png_cut_short_is_not_complete(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    assert benchmarks.png_complete(path)
    path.write_bytes(path.read_bytes()[:-5])
    assert not benchmarks.png_complete(path) and not benchmarks.png_complete(tmp_path / "missing.png")


# -- batching in the pipeline ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ovis(weights):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Ovis.from_pretrained(weights, device="cpu", dtype=torch.float32, download=False)
    torch.set_num_threads(threads)


def test_different_prompts_in_one_batch_match_each_alone_within_the_golden_tolerance(ovis, monkeypatch):
    monkeypatch.setattr(pipeline, "to_pil", lambda pixels: list(pixels))  # the float pixels, before uint8
    kwargs = dict(width=64, height=48, steps=2)
    prompts, seeds = PROMPTS[:3], [11, 12, 13]
    batched = ovis.text_to_images(prompts, seeds, **kwargs)
    for prompt, seed, pixels in zip(prompts, seeds, batched):
        alone, = ovis.text_to_image(prompt, seed=seed, **kwargs)
        torch.testing.assert_close(pixels, alone, atol=1e-4, rtol=1e-4)


def test_different_edits_in_one_batch_match_each_alone_within_the_golden_tolerance(ovis, monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "to_pil", lambda pixels: list(pixels))
    images = [input_image(tmp_path / f"{i}.png", 80, 60, seed=i) for i in range(2)]
    instructions, seeds = ["make it blue", "add a small red hat on the left"], [3, 4]
    batched = ovis.edit_images(images, instructions, seeds, steps=2)
    for image, instruction, seed, pixels in zip(images, instructions, seeds, batched):
        alone, = ovis.edit(image, instruction, seed=seed, steps=2)
        torch.testing.assert_close(pixels, alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="different sizes"):
        ovis.edit_images([images[0], input_image(tmp_path / "big.png", 200, 100)], instructions, seeds, steps=2)


def test_questions_in_one_left_padded_batch_get_the_answers_they_get_alone(ovis, tmp_path):
    image = input_image(tmp_path / "a.png", 64, 64)
    questions = ["What is in the picture?", "Write a haiku about autumn.", "Describe both images in detail."]
    images = [[image], [], [image, image]]
    batched = [ovis.decode_answer(row) for row in ovis.answer_ids(questions, images, max_new_tokens=6)]
    alone = [ovis.decode_answer(ovis.answer_ids([q], [im], max_new_tokens=6)[0]) for q, im in zip(questions, images)]
    assert batched == alone


def test_a_batch_of_one_is_the_single_image_path_byte_for_byte(ovis):
    one, = ovis.text_to_images([PROMPTS[1]], [5], width=64, height=64, steps=2)
    alone, = ovis.text_to_image(PROMPTS[1], seed=5, width=64, height=64, steps=2)
    assert one.tobytes() == alone.tobytes()


# -- the layouts through sample.py ----------------------------------------------------------------------------------

def test_geneval_layout_and_from_png(sample, tmp_path, weights):
    metadata = geneval_file(tmp_path / "evaluation_metadata.jsonl", PROMPTS[:2])
    out = tmp_path / "geneval"
    result = sample("--prompts", metadata, "--out", out, *FAST, "--images-per-prompt", "2", "--batch-size", "3",
                    "--seed", "1")
    assert sorted(tree(out)) == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                                 "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png"]
    lines = metadata.read_text().splitlines()
    assert [(out / f"{i:05d}" / "metadata.jsonl").read_text() for i in range(2)] == [line + "\n" for line in lines]
    sample_png = out / "00001" / "samples" / "0001.png"
    info = png_text(sample_png)
    seed = benchmarks.item_seed(1, "00001") + 1
    assert info == {"task": "t2i", "prompt": PROMPTS[1], "seed": str(seed), "steps": "2", "txt_cfg": "5.0",
                    "width": "64", "height": "64", "model": str(weights.resolve()), "Software": "ovis-min sample.py"}
    assert "4/4 images" in result.stderr and "ETA" in result.stderr
    # made in a batch of 3 with other prompts, re-made alone: equal within rounding of the last uint8 level
    remade = tmp_path / "again.png"
    sample("--from-png", sample_png, "--out", remade)
    difference = np.abs(np.asarray(Image.open(remade), dtype=int) - np.asarray(Image.open(sample_png), dtype=int))
    assert difference.max() <= 1 and png_text(remade) == info
    # a run killed after a folder's last sample, before its metadata.jsonl: the next run only writes that
    before = tree(out)
    (out / "00001" / "metadata.jsonl").unlink()
    assert "1 already done, 0 images to make" in sample("--prompts", metadata, "--out", out, *FAST,
                                                        "--images-per-prompt", "2", "--seed", "1").stderr
    assert tree(out) == before


def test_dpg_bench_grid_and_prompt_file_layouts(sample, tmp_path):
    folder = tmp_path / "dpg-prompts"
    folder.mkdir()
    (folder / "item_7.txt").write_text(PROMPTS[2] + "\n")
    sample("--prompts", folder, "--out", tmp_path / "dpg", *FAST, "--batch-size", "4")
    assert sorted(tree(tmp_path / "dpg")) == ["item_7.png"]
    grid = tmp_path / "dpg" / "item_7.png"
    with Image.open(grid) as image:
        assert image.size == (128, 128)  # 4 tiles of 64x64 in 2x2
    assert png_text(grid)["seed"] == str(benchmarks.item_seed(0, "item_7"))  # the first tile's; seed + j for tile j
    # any JSON-lines prompt file: ids, a row's own seed and size
    rows = write_lines(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0], "id": "cat"},
                                              {"prompt": PROMPTS[3], "id": "birds", "seed": 99, "width": 96,
                                               "height": 48},
                                              {"prompt": PROMPTS[4]}])
    sample("--prompts", rows, "--out", tmp_path / "plain", *FAST, "--batch-size", "2")
    assert sorted(tree(tmp_path / "plain")) == ["00002.png", "birds.png", "cat.png"]
    birds = tmp_path / "plain" / "birds.png"
    assert Image.open(birds).size == (96, 48) and png_text(birds)["seed"] == "99"
    # the tile at the top left is the image --from-png makes from the grid's settings
    sample("--from-png", grid, "--out", tmp_path / "tile.png")
    tile = np.asarray(Image.open(tmp_path / "tile.png"), dtype=int)
    assert np.abs(tile - np.asarray(Image.open(grid), dtype=int)[:64, :64]).max() <= 1


def test_edit_layout_with_subdirs_at_the_official_edit_size(sample, tmp_path):
    input_image(tmp_path / "a.png", 80, 60)
    input_image(tmp_path / "b.png", 100, 40, seed=1)
    edits = write_lines(tmp_path / "edits.jsonl", [
        {"image": "a.png", "instruction": "make it blue", "id": "k1", "subdir": "fullset/color_alter/en"},
        {"image": "b.png", "instruction": "remove the cat", "id": "k2", "subdir": "fullset/subject-remove/en"},
        {"image": "a.png", "prompt": "add snow", "id": "k3"}])
    out = tmp_path / "edited"
    sample("--edits", edits, "--out", out, "--steps", "2", "--device", "cpu", "--batch-size", "2")
    assert sorted(tree(out)) == ["fullset/color_alter/en/k1.png", "fullset/subject-remove/en/k2.png", "k3.png"]
    assert Image.open(out / "k3.png").size == (64, 64)  # the official smart_resize of 80x60
    assert Image.open(out / "fullset/subject-remove/en/k2.png").size == edit_target_size(100, 40)
    info = png_text(out / "k3.png")
    assert (info["task"], info["prompt"], info["source"], info["img_cfg"]) == ("edit", "add snow",
                                                                               str(tmp_path / "a.png"), "1.5")
    sample("--from-png", out / "k3.png", "--out", tmp_path / "again.png")  # made in a batch with k1, now alone
    again = np.asarray(Image.open(tmp_path / "again.png"), dtype=int)
    assert np.abs(again - np.asarray(Image.open(out / "k3.png"), dtype=int)).max() <= 1


def test_questions_append_answers_and_resume(sample, tmp_path):
    input_image(tmp_path / "a.png", 64, 64)
    questions = write_lines(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "What is in the picture?", "images": ["a.png"]},
        {"id": "q2", "question": "Write a haiku about autumn.", "images": []},
        {"id": "q3", "question": "Describe both images in detail.", "images": ["a.png", "a.png"]}])
    answers = tmp_path / "answers.jsonl"
    sample("--questions", questions, "--out", answers, "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    assert all(set(r) == {"id", "answer", "tokens", "seconds"} and 1 <= r["tokens"] <= 6 for r in rows)
    # a crash's cut-short last line and a missing answer are redone, nothing answered twice
    answers.write_text(answers.read_text().splitlines()[0] + "\n" + '{"id": "q2", "ans')
    result = sample("--questions", questions, "--out", answers, "--max-new-tokens", "6", "--device", "cpu")
    assert "1 already answered, 2 to answer" in result.stderr
    assert [json.loads(line)["id"] for line in answers.read_text().splitlines()] == ["q1", "q2", "q3"]


def test_bad_rows_are_listed_counted_and_fail_the_run(sample, tmp_path):
    input_image(tmp_path / "a.png", 64, 64)
    edits = write_lines(tmp_path / "edits.jsonl", [{"image": "a.png", "instruction": "blue", "id": "ok"},
                                                   "{broken", {"image": "nope.png", "instruction": "red", "id": "x"},
                                                   {"image": "a.png", "instruction": "", "id": "y"}])
    result = sample("--edits", edits, "--out", tmp_path / "out", "--steps", "2", "--device", "cpu", check=False)
    assert one_line_error(result, "3 bad rows", "skipped")
    for line in (2, 3, 4):
        assert f"{edits}:{line}: " in result.stderr
    assert sorted(tree(tmp_path / "out")) == ["ok.png"]  # the good rows are done all the same
    sample("--from-png", tmp_path / "out" / "ok.png", "--out", tmp_path / "again.png")  # batch 1: the same bytes
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "out" / "ok.png").read_bytes()


def test_flag_mistakes_are_one_line(sample, tmp_path):
    prompts = geneval_file(tmp_path / "g.jsonl", ["a"])
    for args, names in ((["--prompts", prompts], ["--out"]),
                        (["--prompts", prompts, "--out", "o", "--ask", "why?"], ["--ask"]),
                        (["--questions", prompts, "--out", "a.jsonl", "--steps", "3"], ["--steps"]),
                        (["--prompts", prompts, "--out", "o", "--batch-size", "0"], ["--batch-size"]),
                        (["--prompts", tmp_path / "none.jsonl", "--out", "o"], ["none.jsonl"])):
        assert one_line_error(sample(*args, check=False), *names), args


# -- resuming and several processes ---------------------------------------------------------------------------------

def test_a_run_killed_midway_and_restarted_ends_with_the_uninterrupted_files(sample, tmp_path, weights):
    metadata = geneval_file(tmp_path / "meta.jsonl", PROMPTS)
    args = ["--prompts", metadata, *FAST[:4], "--steps", "4", "--device", "cpu", "--images-per-prompt", "2"]
    sample(*args, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    run = start_script("sample.py", *args, "--out", out, "--weights", weights, cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.png"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    assert run.wait().returncode != 0
    made = len(list(out.rglob("*.png")))
    assert 3 <= made < 2 * len(PROMPTS), "the run was not killed midway"
    # what a crash can leave besides: a PNG cut short (any writer), a temporary file of the dead process,
    # a GenEval folder with samples but no metadata.jsonl yet
    first = out / "00000" / "samples" / "0000.png"
    first.write_bytes(first.read_bytes()[:100])
    (out / "00000" / "samples" / f".tmp-{run.pid}-x.part").write_bytes(b"partial")
    (out / "00000" / "metadata.jsonl").unlink(missing_ok=True)
    sample(*args, "--out", out)
    assert tree(out) == tree(tmp_path / "whole")


def test_two_processes_under_torchrun_write_the_files_of_one(sample, tmp_path, weights):
    metadata = geneval_file(tmp_path / "meta.jsonl", PROMPTS[:5])
    args = ["--prompts", metadata, *FAST, "--images-per-prompt", "1", "--batch-size", "1", "--weights", weights]
    # the same number of CPU threads per process, as the README says a byte-for-byte comparison needs (script
    # runs have OMP_NUM_THREADS=1, as torchrun gives each of its processes)
    assert "on 1 process (1 CPU thread)" in sample(*args[:-2], "--out", tmp_path / "one").stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "sample.py"), *map(str, args), "--out", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=tmp_path, env=script_env({"HF_HUB_OFFLINE": "1"}), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert tree(tmp_path / "two") == tree(tmp_path / "one")
    assert "on 2 processes (1 CPU thread each)" in result.stderr and "5/5 images" in result.stderr


# -- the README's commands, and their outputs read as each scorer reads them ------------------------------------------
# The scorers need their detectors, VQA models and judges; these walks follow their published code instead, step by
# step (folders listed, names matched, JSON fields read, images opened and cut), and their flags are parsed as
# their argparse parsers declare them. The README's commands run as written, with the tiny checkpoint and a small
# size added; python -c snippets run in this process (GEdit-Bench's with a stand-in for the datasets package).

README = (ROOT / "README.md").read_text(encoding="utf-8")
TINY = ["--steps", "2", "--device", "cpu"]
TILE = 64  # the test's image size, where the README's runs make the default 1024


def readme_commands(heading: str) -> list[list[str]]:
    """The commands under `# heading` in the README's Benchmarks block, as a POSIX shell splits them."""
    block = README.split("## Benchmarks", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    paragraph = next(p for p in block.split("\n\n") if p.startswith(f"# {heading}"))
    commands, pending = [], ""
    for line in paragraph.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending.replace("\\\n", " "), comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        pending = ""
        if words:
            commands.append(words)
    return commands


def run_readme(commands: list[list[str]], weights: Path, extra: list[str], capsys) -> tuple[int, str]:
    """The python -c snippets and the sample.py command among `commands`, in the current folder; the sample.py
    status and stderr."""
    import sample as sample_cli

    status = None
    for words in commands:
        if words[:2] == ["python", "-c"]:
            scope = {}
            exec(compile(words[2], "<README>", "exec"), scope)
            for value in scope.values():  # what the interpreter's exit would flush and close
                if isinstance(value, io.IOBase):
                    value.close()
        elif words[:2] == ["python", "sample.py"]:
            capsys.readouterr()
            status = sample_cli.main([*words[2:], *extra, "--weights", str(weights)])
    return status, capsys.readouterr().err


def scorer_flags(commands: list[list[str]], script: str, declare) -> argparse.Namespace:
    """The README's flags for `script`, parsed by a parser declared as the scorer declares its own."""
    words = next(w for w in commands if any(word.endswith(script) for word in w))
    parser = argparse.ArgumentParser()
    declare(parser)
    return parser.parse_args(words[[i for i, word in enumerate(words) if word.endswith(script)][0] + 1:])


def scorer_checkout(tmp_path: Path, monkeypatch, heading: str, folder: str) -> tuple[list[list[str]], Path]:
    """The README's commands under `heading`, to run in tmp_path, and the scorer's input folder there, made."""
    monkeypatch.chdir(tmp_path)
    made = tmp_path / folder
    made.mkdir(parents=True)
    return readme_commands(heading), made


@pytest.mark.usefixtures("single_thread")  # one thread, as script runs have
def test_geneval_run_as_evaluate_images_reads_it(tmp_path, weights, monkeypatch, capsys):
    commands, _ = scorer_checkout(tmp_path, monkeypatch, "GenEval", "geneval/prompts")
    rows = [{"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
             "prompt": "a photo of a cat and a dog"},
            {"tag": "counting", "include": [{"class": "bird", "count": 2}], "prompt": "bird " * 5000}]  # too long
    write_lines(tmp_path / "geneval" / "prompts" / "evaluation_metadata.jsonl", rows)
    status, err = run_readme(commands, weights, ["--width", str(TILE), "--height", str(TILE), *TINY], capsys)
    assert status == 1 and "1 of 2 items unfinished" in err and "before scoring" in err, err
    # evaluation/evaluate_images.py, main(): numeric folders, json.load of metadata.jsonl, samples/ names \d+\.png
    imagedir = scorer_flags(commands, "evaluate_images.py", lambda p: (
        p.add_argument("imagedir"), p.add_argument("--outfile"), p.add_argument("--model-config"),
        p.add_argument("--model-path"), p.add_argument("--options", nargs="*", default=[]))).imagedir
    read = []
    for subfolder in sorted(os.listdir(imagedir)):
        folder = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folder) or not subfolder.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for name in sorted(os.listdir(os.path.join(folder, "samples"))):
            path = os.path.join(folder, "samples", name)
            if os.path.isfile(path) and re.match(r"\d+\.png", name):
                with Image.open(path) as image:
                    assert image.size == (TILE, TILE)
                read.append((subfolder, name, metadata["tag"], metadata["prompt"], metadata["include"]))
    assert read == [("00000", f"{j:04d}.png", rows[0]["tag"], rows[0]["prompt"], rows[0]["include"])
                    for j in range(4)]
    # the unfinished item, its prompt shortened: a run stopped by Ctrl-C says it is still unfinished, the next
    # one finishes it, and both folders are read
    write_lines(tmp_path / "geneval" / "prompts" / "evaluation_metadata.jsonl", [rows[0], {**rows[1], "prompt": "birds"}])

    def ctrl_c(*args):
        raise KeyboardInterrupt
        yield
    with monkeypatch.context() as patch:
        patch.setattr(benchmarks, "run_batch", ctrl_c)
        status, err = run_readme(commands, weights, ["--width", str(TILE), "--height", str(TILE), *TINY], capsys)
    assert status == 130 and "1 of 2 items unfinished" in err and "interrupted" in err, err
    status, err = run_readme(commands, weights, ["--width", str(TILE), "--height", str(TILE), *TINY], capsys)
    assert status == 0 and "all 2 items finished" in err, err
    assert sorted(os.listdir(imagedir)) == ["00000", "00001"]


@pytest.mark.usefixtures("single_thread")  # one thread, as script runs have
def test_dpg_bench_run_as_compute_dpg_bench_reads_it(tmp_path, weights, monkeypatch, capsys):
    commands, prompts = scorer_checkout(tmp_path, monkeypatch, "DPG-Bench", "ELLA/dpg_bench/prompts")
    (prompts / "partiprompts12.txt").write_text("a red cube on a wooden table\n")
    status, err = run_readme(commands, weights, ["--width", str(TILE), "--height", str(TILE), *TINY], capsys)
    assert status == 0, err
    flags = scorer_flags(commands, "compute_dpg_bench.py", lambda p: (
        p.add_argument("--image-root-path"), p.add_argument("--resolution", type=int), p.add_argument("--csv"),
        p.add_argument("--res-path"), p.add_argument("--pic-num", type=int, default=1),
        p.add_argument("--vqa-model", default="mplug")))
    import sample as sample_cli
    assert flags.resolution == sample_cli.DEFAULT_SIZE and flags.pic_num == benchmarks.DEFAULT_IMAGES_PER_PROMPT["dpg"]
    assert not Path(flags.res_path).resolve().is_relative_to(Path(flags.image_root_path).resolve())
    # compute_dpg_bench.py: every file of the folder, its key the name up to the first dot, cut into pic_num tiles
    # of resolution x resolution, left to right and top to bottom
    for name in os.listdir(flags.image_root_path):
        assert name.split(".")[0] == "partiprompts12", name  # a key of its csv (the prompt file's name)
        with Image.open(os.path.join(flags.image_root_path, name)) as image:
            assert image.size == (2 * TILE, 2 * TILE)
            corners = [(0, 0), (TILE, 0), (0, TILE), (TILE, TILE)][:flags.pic_num]
            tiles = [image.crop((x, y, x + TILE, y + TILE)).tobytes() for x, y in corners]
    assert len(set(tiles)) == 4  # four images of four seeds, none cut across two


@pytest.mark.usefixtures("single_thread")  # one thread, as script runs have
def test_imgedit_run_as_basic_bench_reads_it(tmp_path, weights, monkeypatch, capsys):
    commands, basic = scorer_checkout(tmp_path, monkeypatch, "ImgEdit", "ImgEdit/Benchmark/Basic")
    edits = {"1082": {"id": "animal/000342021.jpg", "prompt": "Change the shell to a smooth surface.",
                      "edit_type": "adjust"},
             "673": {"id": "style/000278574.jpg", "prompt": "Make it a woodblock print.", "edit_type": "style"}}
    (basic / "basic_edit.json").write_text(json.dumps(edits))
    (basic / "prompts.json").write_text(json.dumps({"adjust": "Rate: <edit_prompt>", "style": "Rate: <edit_prompt>"}))
    for i, row in enumerate(edits.values()):
        (tmp_path / "singleturn" / row["id"]).parent.mkdir(parents=True)
        Image.open(input_image(tmp_path / "source.png", 80, 60, seed=i)).save(tmp_path / "singleturn" / row["id"])
    status, err = run_readme(commands, weights, TINY, capsys)
    assert status == 0, err
    # Benchmark/Basic/basic_bench.py: its four flags are required; each key's result is <key>.png in the result
    # folder, its source origin_img_root/<id>, its judge prompt prompts_json[edit_type]
    flags = scorer_flags(commands, "basic_bench.py", lambda p: [
        p.add_argument(name, type=str, required=True)
        for name in ("--result_img_folder", "--edit_json", "--origin_img_root", "--prompts_json")]
        + [p.add_argument("--num_processes", type=int, default=32)])
    with open(flags.prompts_json) as f:
        judges = json.load(f)
    with open(flags.edit_json) as f:
        for key, item in json.load(f).items():
            for path in (os.path.join(flags.result_img_folder, f"{key}.png"),
                         os.path.join(flags.origin_img_root, item["id"])):
                with open(path, "rb") as image_file:  # it sends both files' bytes to the judge
                    Image.open(image_file).load()
            assert "<edit_prompt>" in judges[item["edit_type"]]


@pytest.mark.usefixtures("single_thread")  # one thread, as script runs have
def test_gedit_bench_run_as_test_gedit_score_reads_it(tmp_path, weights, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = readme_commands("GEdit-Bench")
    rows = [{"key": "8f3a", "task_type": "color_alter", "instruction": "make the car blue",
             "instruction_language": "en", "input_image": Image.open(input_image(tmp_path / "a.png", 80, 60))},
            {"key": "77c0", "task_type": "subject-remove", "instruction": "去掉猫", "instruction_language": "cn",
             "input_image": Image.open(input_image(tmp_path / "b.png", 64, 64, seed=1))}]

    def load_dataset(name, split=None):  # the rows of the published dataset's one split
        assert (name, split) == ("stepfun-ai/GEdit-Bench", "train")
        return rows
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    scorer_folder = tmp_path / "Step1X-Edit" / "GEdit-Bench"
    scorer_folder.mkdir(parents=True)
    status, err = run_readme(commands, weights, TINY, capsys)
    assert status == 0, err
    # GEdit-Bench/test_gedit_score.py: run in its folder (`cd` in the README); save_path/model_name/fullset/
    # <task_type>/<language>/<key>.png and <key>_SRCIMG.png, items without both skipped; the result resized to the
    # source's size for the judge
    cd = next(w for w in commands if w[0] == "cd")
    assert cd[2] == "&&" and cd[4] == "test_gedit_score.py"
    flags = scorer_flags(commands, "test_gedit_score.py", lambda p: (
        p.add_argument("--model_name", type=str, default="gpt4o"), p.add_argument("--save_path", default="/results/"),
        p.add_argument("--backbone", default="gpt4o", choices=["gpt4o", "qwen25vl"])))
    save_path = os.path.join(tmp_path / cd[1] / flags.save_path, flags.model_name)
    groups = ["background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
              "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer"]
    judged = 0
    for group in groups:
        for item in [row for row in rows if row["task_type"] == group]:
            folder = f"{save_path}/fullset/{group}/{item['instruction_language']}"
            source, result = f"{folder}/{item['key']}_SRCIMG.png", f"{folder}/{item['key']}.png"
            assert os.path.exists(source) and os.path.exists(result), (source, result)  # else skipped
            with Image.open(source) as raw, Image.open(result) as edited:
                assert raw.tobytes() == item["input_image"].convert("RGB").tobytes()  # the image that was edited
                edited.convert("RGB").resize(raw.size)
            judged += 1
    assert judged == len(rows)
