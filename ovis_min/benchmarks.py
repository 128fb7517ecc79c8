"""Benchmark sets in, the layouts their scorers read out: GenEval, DPG-Bench, editing pairs and question files.

The scorers (object detectors, VQA models, GPT judges) are other projects; this module reads their inputs, makes
every image or answer, and writes each where its scorer looks:

    GenEval metadata (JSON lines with prompt, tag, include)  ->  OUT/00000/metadata.jsonl, OUT/00000/samples/0000.png
    DPG-Bench prompts folder (<id>.txt)                       ->  OUT/<id>.png, its N images tiled in a grid (2x2)
    JSON lines with prompt (id, seed, width, height)          ->  OUT/<id>.png (OUT/<id>-<j>.png for N > 1)
    JSON lines with image, instruction, id (subdir)           ->  OUT/<subdir>/<id>.png at the official edit size
    JSON lines with id, question, images                      ->  answers.jsonl: {"id", "answer", "tokens", "seconds"}

Work is split by item, round-robin over torchrun's ranks, so no file is written by two ranks. Every image's seed
comes from the base seed and its item's id (`item_seed`), so it does not depend on batch size, rank or order.
Answers are greedy by default and then independent of all three too; sampled ones (--temperature > 0) draw from
one generator per batch, seeded by its first item, so they change with --batch-size.
A finished output is skipped on the next run; outputs are written whole under a temporary name and renamed, and
a PNG is only taken as finished if it ends with PNG's end chunk, so a crash never leaves a file that passes.
Rows that cannot be used are reported with their line number and skipped; the caller counts them.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from .cli import ProgressBar
from .files import remove_leftovers, write_atomic
from .pipeline import MAX_SIZE, MIN_SIZE, Ovis, round_to_16
from .preprocess import ImageError, edit_target_size

GENEVAL_KEYS = ("tag", "include")  # what tells a GenEval metadata line from any prompt line
DEFAULT_IMAGES_PER_PROMPT = {"geneval": 4, "dpg": 4, "prompts": 1}  # GenEval and DPG-Bench score 4 per prompt
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG


class InputError(Exception):
    """A benchmark file or folder that cannot be read at all (as opposed to one bad row in it)."""


@dataclass
class Item:
    """One row of a benchmark set: a prompt, an edit or a question."""
    line: int  # line number in the input file (1-based), 0 for a DPG-Bench prompt file
    id: str  # names its output files; unique in the set
    text: str  # the prompt, the edit instruction or the question
    seed: int | None = None  # the row's own seed; else derived from the base seed and the id
    width: int | None = None  # the row's own image size (prompt files)
    height: int | None = None
    images: list[Path] = field(default_factory=list)  # the image to edit, or the images a question is about
    subdir: str = ""  # editing: the folder under OUT (GEdit-Bench's <task_type>/<language>)
    raw: str = ""  # GenEval: the input line, copied to metadata.jsonl
    source_size: tuple[int, int] | None = None  # editing: the input's (width, height)


@dataclass
class BenchmarkSet:
    kind: str  # geneval, dpg, prompts, edits or questions
    source: Path
    items: list[Item]
    bad_rows: list[str]  # "FILE:LINE: what is wrong"


def item_seed(base_seed: int, item_id: str) -> int:
    """The seed of an item, from the run's base seed and the item's id alone (below 2**31)."""
    digest = hashlib.sha256(f"{base_seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Reading the sets
# ---------------------------------------------------------------------------------------------------------------

def read_json_lines(path: Path) -> tuple[list[tuple[int, str, dict]], list[tuple[int, str]]]:
    """(line number, raw line, row) of every JSON object line, and (line number, "FILE:LINE: reason") for the
    others."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; a folder of <id>.txt prompts (DPG-Bench) goes to --prompts") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {path} ({error})") from None
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            bad.append((number, f"{path}:{number}: not a JSON line ({error.msg})"))
            continue
        if not isinstance(row, dict):
            bad.append((number, f"{path}:{number}: a JSON {type(row).__name__}, not an object"))
            continue
        rows.append((number, line.strip(), row))
    return rows, bad


def in_line_order(bad: list[tuple[int, str]]) -> list[str]:
    return [message for _, message in sorted(bad, key=lambda entry: entry[0])]


def usable_id(value) -> str | None:
    """The id as a file name, or None if it cannot be one (empty, a path, a dot name)."""
    text = str(value).strip()
    if not text or "/" in text or "\\" in text or text.startswith(".") or "\0" in text:
        return None
    return text


def text_field(row: dict, *names: str) -> str:
    for name in names:
        if isinstance(row.get(name), str) and row[name].strip():
            return row[name].strip()
    return ""


def read_prompts(path: Path) -> BenchmarkSet:
    """A GenEval metadata file, a DPG-Bench prompts folder or any JSON-lines file of prompts."""
    if path.is_dir():
        return read_dpg_folder(path)
    rows, bad = read_json_lines(path)
    geneval = bool(rows) and all(key in rows[0][2] for key in GENEVAL_KEYS)
    items, taken = [], set()
    for number, raw, row in rows:
        prompt = text_field(row, "prompt")
        if not prompt:
            bad.append((number, f"{path}:{number}: no prompt (or an empty one)"))
            continue
        # GenEval folders are numbered by line, as its own generation script numbers them
        item_id = f"{number - 1:05d}" if geneval else usable_id(row.get("id", f"{number - 1:05d}"))
        if item_id is None:
            bad.append((number, f"{path}:{number}: id {row.get('id')!r} cannot name a file"))
            continue
        if item_id in taken:
            bad.append((number, f"{path}:{number}: id {item_id!r} again (its output would overwrite an earlier "
                                "one)"))
            continue
        item = Item(number, item_id, prompt, raw=raw)
        try:
            item.seed = None if row.get("seed") is None else int(row["seed"])
            for side in ("width", "height"):
                if row.get(side) is not None:
                    setattr(item, side, round_to_16(int(row[side])))
        except (TypeError, ValueError):
            bad.append((number, f"{path}:{number}: seed, width and height must be whole numbers"))
            continue
        sides = [side for side in (item.width, item.height) if side is not None]
        if not all(MIN_SIZE <= side <= MAX_SIZE for side in sides) or not 0 <= (item.seed or 0) < 2 ** 62:
            bad.append((number, f"{path}:{number}: width and height must be in [{MIN_SIZE}, {MAX_SIZE}], the "
                                f"seed in [0, 2**62)"))
            continue
        taken.add(item_id)
        items.append(item)
    return BenchmarkSet("geneval" if geneval else "prompts", path, items, in_line_order(bad))


def read_dpg_folder(folder: Path) -> BenchmarkSet:
    """DPG-Bench's prompts folder: one <id>.txt per prompt, in name order."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise InputError(f"{folder}: no .txt prompt files in it (DPG-Bench's prompts folder holds <id>.txt files)")
    items, bad = [], []
    for file in files:
        try:
            prompt = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            bad.append(f"{file}: unreadable ({error})")
            continue
        if not prompt:
            bad.append(f"{file}: empty prompt")
            continue
        items.append(Item(0, file.stem, prompt))
    return BenchmarkSet("dpg", folder, items, bad)


def image_size_or_reason(path: Path) -> tuple[tuple[int, int] | None, str]:
    """The (width, height) in an image file's header, or why it cannot be read (the pixels are decoded later)."""
    try:
        with Image.open(path) as image:
            return image.size, ""
    except FileNotFoundError:
        return None, f"image {path} not found"
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return None, f"image {path} unreadable ({error})"


def read_edits(path: Path) -> BenchmarkSet:
    """JSON lines with `image` (relative to the file), `instruction` (or `prompt`), `id` and optional `subdir`."""
    rows, bad = read_json_lines(path)
    items, taken = [], set()
    for number, _, row in rows:
        instruction = text_field(row, "instruction", "prompt")
        item_id = usable_id(row.get("id", f"{number - 1:05d}"))
        subdir = str(row.get("subdir") or "").strip("/")
        if not instruction:
            bad.append((number, f"{path}:{number}: no instruction (or an empty one)"))
            continue
        if item_id is None or ".." in Path(subdir).parts or Path(subdir).is_absolute():
            bad.append((number, f"{path}:{number}: id {row.get('id')!r} / subdir {subdir!r} cannot name a file "
                                "under --out"))
            continue
        if not isinstance(row.get("image"), str):
            bad.append((number, f"{path}:{number}: no image"))
            continue
        image = path.parent / row["image"]
        size, reason = image_size_or_reason(image)
        if size is None:
            bad.append((number, f"{path}:{number}: {reason}"))
            continue
        key = (subdir, item_id)
        if key in taken:
            bad.append((number, f"{path}:{number}: id {item_id!r} again in {subdir or 'the top folder'!r}"))
            continue
        taken.add(key)
        seed = row.get("seed")
        items.append(Item(number, item_id, instruction, seed=int(seed) if isinstance(seed, int) else None,
                          images=[image], subdir=subdir, source_size=size))
    return BenchmarkSet("edits", path, items, in_line_order(bad))


def read_questions(path: Path) -> BenchmarkSet:
    """JSON lines with `id`, `question` and `images` (a list of paths relative to the file, may be empty)."""
    rows, bad = read_json_lines(path)
    items, taken = [], set()
    for number, _, row in rows:
        question = text_field(row, "question")
        item_id = str(row.get("id", f"{number - 1:05d}"))
        names = row.get("images", [])
        if not question:
            bad.append((number, f"{path}:{number}: no question (or an empty one)"))
            continue
        if item_id in taken:
            bad.append((number, f"{path}:{number}: id {item_id!r} again"))
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            bad.append((number, f"{path}:{number}: images must be a list of paths"))
            continue
        images = [path.parent / name for name in names]
        reasons = [reason for image in images for size, reason in [image_size_or_reason(image)] if size is None]
        if reasons:
            bad.append((number, f"{path}:{number}: {reasons[0]}"))
            continue
        taken.add(item_id)
        items.append(Item(number, item_id, question, images=images))
    return BenchmarkSet("questions", path, items, in_line_order(bad))


# ---------------------------------------------------------------------------------------------------------------
# Output layouts
# ---------------------------------------------------------------------------------------------------------------

def image_file(kind: str, item: Item, index: int, images_per_prompt: int) -> Path | None:
    """Where image `index` of `item` goes, relative to OUT; None for DPG-Bench, whose images share one grid."""
    if kind == "geneval":
        return Path(item.id, "samples", f"{index:04d}.png")
    if kind == "dpg":
        return None
    if kind == "edits":
        return Path(item.subdir, f"{item.id}.png")
    return Path(f"{item.id}.png" if images_per_prompt == 1 else f"{item.id}-{index}.png")


def png_complete(path: Path) -> bool:
    """A PNG that was written to its end (a file cut short by a crash, from any writer, is not)."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(PNG_END), os.SEEK_END)
            return f.read() == PNG_END
    except OSError:  # missing, or shorter than the end chunk
        return False


def item_complete(kind: str, item: Item, out: Path, images_per_prompt: int) -> bool:
    if kind == "dpg":
        return png_complete(out / f"{item.id}.png")
    files = [image_file(kind, item, j, images_per_prompt) for j in range(images_per_prompt)]
    done = all(png_complete(out / f) for f in files)
    return done and (kind != "geneval" or (out / item.id / "metadata.jsonl").is_file())


def grid(tiles: list[Image.Image]) -> Image.Image:
    """The tiles in rows of ceil(sqrt(n)), left to right (2x2 for DPG-Bench's 4), as its scorer splits them."""
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    width, height = tiles[0].size
    canvas = Image.new("RGB", (cols * width, rows * height))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % cols) * width, (i // cols) * height))
    return canvas


def remove_leftovers_under(out: Path) -> int:
    """The temporary files a killed run left anywhere under `out` (never read as outputs, but clutter for a
    scorer's folder walk); those of running writers are left to them."""
    return sum(len(remove_leftovers(folder)) for folder, _, _ in os.walk(out))


def remove_cut_short(path: Path) -> None:
    """A PNG that exists but was never finished is redone: out of the way, so an exclusive create succeeds."""
    if path.exists() and not png_complete(path):
        path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device

    def sum(self, value: int, op=None) -> int:
        """`value` summed over the ranks (or reduced with `op`); every rank must call it the same number of times."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return int(tensor.item())

    def most(self, value: int) -> int:
        return self.sum(value, dist.ReduceOp.MAX) if self.world > 1 else value

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            self.sum(0)  # leave together: a rank tearing down gloo while its peer still talks aborts the peer
            dist.destroy_process_group()


def cpu_threads(ranks: Ranks) -> str:
    """On the CPU, the threads of each process: their number sets the order of the kernels' sums, so runs are the
    same byte for byte only at the same number (torchrun gives each process OMP_NUM_THREADS=1 unless it is set)."""
    if ranks.device.type != "cpu":
        return ""
    threads = torch.get_num_threads()
    return f" ({threads} CPU thread{'s' if threads > 1 else ''}{' each' if ranks.world > 1 else ''})"


def join_ranks(device: torch.device) -> Ranks:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): join the group, each rank on its own GPU (NCCL), or
    on the CPU (gloo). Alone: rank 0 of 1 on `device`."""
    if "RANK" not in os.environ:
        return Ranks(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


# ---------------------------------------------------------------------------------------------------------------
# Generating images
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class GenerationSettings:
    steps: int
    txt_cfg: float
    img_cfg: float
    width: int | None  # prompts: the size of rows without their own; edits: None = the official edit size
    height: int | None
    base_seed: int
    images_per_prompt: int
    batch_size: int


@dataclass
class Job:
    """One image to make."""
    item: Item
    index: int  # which of the item's images
    seed: int
    size: tuple[int, int]  # (width, height)


SavePng = Callable[[Image.Image, Path, dict], None]  # (image, path, settings): writes the PNG with its metadata,
# atomically and never over an existing file (sample.py: png_bytes + write_atomic(replace=False))


def pending_jobs(bench: BenchmarkSet, items: list[Item], out: Path, settings: GenerationSettings) -> list[Job]:
    """The images of `items` still to make, in item order; finished outputs are skipped."""
    jobs = []
    n = settings.images_per_prompt
    for item in items:
        if item_complete(bench.kind, item, out, n):
            continue
        seed = item_seed(settings.base_seed, item.id) if item.seed is None else item.seed
        if bench.kind == "edits":
            size = (settings.width, settings.height) if settings.width else edit_target_size(*item.source_size)
        else:
            size = (item.width or settings.width, item.height or settings.height)  # the row's own size first
        for j in range(n):
            file = image_file(bench.kind, item, j, n)
            if file is not None and png_complete(out / file):  # a half-done GenEval folder keeps its samples
                continue
            jobs.append(Job(item, j, seed + j, size))  # image j of an item: seed + j, as sample.py --num-images
    return jobs


def batches_of(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Jobs of one size together (one decoder call holds one image size), up to batch_size, in order."""
    by_size: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        by_size.setdefault(job.size, []).append(job)
    return [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)]


def png_settings(bench: BenchmarkSet, job: Job, settings: GenerationSettings) -> dict:
    """What a PNG records of how its image was made, so `sample.py --from-png FILE` re-makes it alone (`save_png`
    adds what it was made with: the weights and any LoRA)."""
    edit = bench.kind == "edits"
    return {"task": "edit" if edit else "t2i", "prompt": job.item.text, "seed": job.seed, "steps": settings.steps,
            "txt_cfg": settings.txt_cfg, "img_cfg": settings.img_cfg if edit else None, "width": job.size[0],
            "height": job.size[1], "source": str(job.item.images[0].resolve()) if edit else None}


def make_images(ovis: Ovis, bench: BenchmarkSet, batch: list[Job], settings: GenerationSettings) -> list[Image.Image]:
    width, height = batch[0].size
    texts, seeds = [job.item.text for job in batch], [job.seed for job in batch]
    if bench.kind == "edits":
        # at the official edit size the input is resized to it exactly, as `edit` does without a size
        return ovis.edit_images([job.item.images[0] for job in batch], texts, seeds, steps=settings.steps,
                                txt_cfg=settings.txt_cfg, img_cfg=settings.img_cfg, width=settings.width,
                                height=settings.height)
    return ovis.text_to_images(texts, seeds, width=width, height=height, steps=settings.steps,
                               txt_cfg=settings.txt_cfg)


def generate_set(ovis: Ovis, bench: BenchmarkSet, out: Path, settings: GenerationSettings, save_png: SavePng,
                 ranks: Ranks, log: Callable[[str], None]) -> int:
    """Make this rank's share of the set's images; returns the number of items that failed (all ranks)."""
    n = settings.images_per_prompt
    if ranks.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers_under(out)
    ranks.sum(0)  # the clean-up is done before any rank writes
    mine = bench.items[ranks.rank::ranks.world]  # round-robin by item: no file is written by two ranks
    jobs = pending_jobs(bench, mine, out, settings)
    batches = batches_of(jobs, settings.batch_size)
    total = ranks.sum(len(jobs))
    skipped = ranks.sum(sum(item_complete(bench.kind, item, out, n) for item in mine))
    if ranks.rank == 0:
        log(f"{len(bench.items)} items, {skipped} already done, {total} images to make on {ranks.world} "
            f"process{'es' if ranks.world > 1 else ''}{cpu_threads(ranks)}, {settings.batch_size} per decoder call")
    progress = ProgressBar("images", total, with_rate=True, log_every=30, show=ranks.rank == 0)
    tiles: dict[str, dict[int, Image.Image]] = {}  # DPG-Bench: the images of an item until its grid is written
    failed: set[str] = set()

    def finish(job: Job, image: Image.Image) -> None:
        item = job.item
        file = image_file(bench.kind, item, job.index, n)
        if file is not None:
            (out / file).parent.mkdir(parents=True, exist_ok=True)
            remove_cut_short(out / file)
            save_png(image, out / file, png_settings(bench, job, settings))
        if bench.kind == "geneval" and samples_complete(item, out, n):
            # written last: a folder with its metadata.jsonl holds all its samples
            write_atomic(out / item.id / "metadata.jsonl", item.raw + "\n")
        if bench.kind == "dpg":
            tiles.setdefault(item.id, {})[job.index] = image
            if len(tiles[item.id]) == n:
                first = Job(item, 0, job.seed - job.index, job.size)  # a grid records its first tile's settings
                remove_cut_short(out / f"{item.id}.png")
                images = tiles.pop(item.id)
                save_png(grid([images[j] for j in range(n)]), out / f"{item.id}.png",
                         png_settings(bench, first, settings))

    if bench.kind == "geneval":  # killed between a folder's last sample and its metadata: nothing left to make
        for item in mine:
            if not (out / item.id / "metadata.jsonl").is_file() and samples_complete(item, out, n):
                write_atomic(out / item.id / "metadata.jsonl", item.raw + "\n")
    rounds = ranks.most(len(batches))  # every rank takes part in each round's count, idle or not
    for round_ in range(rounds):
        made = 0
        if round_ < len(batches):
            for jobs_done, images in run_batch(ovis, bench, batches[round_], settings, failed, log):
                for job, image in zip(jobs_done, images):
                    finish(job, image)
                made += len(jobs_done)
            made += sum(job.item.id in failed for job in batches[round_])
        progress.add(ranks.sum(made))
    failed_items = ranks.sum(len(failed))  # every rank is done writing once it returns
    if ranks.rank == 0:
        log(finished_note(bench, out, n))
    return failed_items


def finished_note(bench: BenchmarkSet, out: Path, images_per_prompt: int) -> str:
    """How many of the set's items have all their outputs in `out`: a scorer reads an unfinished item as missing,
    or stops at it (GenEval's evaluate_images.py at a folder without its metadata.jsonl)."""
    unfinished = sum(not item_complete(bench.kind, item, out, images_per_prompt) for item in bench.items)
    if not unfinished:
        return f"all {len(bench.items)} items finished in {out}"
    return (f"{unfinished} of {len(bench.items)} items unfinished in {out}: run the same command again to finish "
            "them before scoring (a scorer reads them as missing, or stops at them)")


def samples_complete(item: Item, out: Path, n: int) -> bool:
    """All the samples of a GenEval folder are written (its metadata.jsonl comes after them)."""
    return all(png_complete(out / image_file("geneval", item, j, n)) for j in range(n))


def run_batch(ovis: Ovis, bench: BenchmarkSet, batch: list[Job], settings: GenerationSettings, failed: set[str],
              log: Callable[[str], None]):
    """Yields (jobs, images) of the batch; if the batch fails on its inputs (an image that will not decode, a
    prompt too long), each job is tried alone so that only the bad rows are lost, and those are reported."""
    try:
        yield batch, make_images(ovis, bench, batch, settings)
        return
    except (ImageError, ValueError) as error:
        if len(batch) == 1:
            item = batch[0].item
            log(f"{bench.source}:{item.line or item.id}: {error}; skipped")
            failed.add(item.id)
            return
    for job in batch:
        if job.item.id not in failed:
            yield from run_batch(ovis, bench, [job], settings, failed, log)


# ---------------------------------------------------------------------------------------------------------------
# Answering questions
# ---------------------------------------------------------------------------------------------------------------

def answered_ids(path: Path) -> dict[str, dict]:
    """The whole answer lines already in `path`, by id (a line cut short by a crash is not one)."""
    answers = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return answers
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row and "answer" in row:
            answers[str(row["id"])] = row
    return answers


def write_answers_in_order(path: Path, bench: BenchmarkSet, answers: dict[str, dict]) -> None:
    """The answers file rewritten whole: one line per answered id, in the question file's order."""
    lines = [json.dumps(answers[item.id], ensure_ascii=False) + "\n" for item in bench.items if item.id in answers]
    write_atomic(path, "".join(lines))


def answer_set(ovis: Ovis, bench: BenchmarkSet, out: Path, batch_size: int, max_new_tokens: int,
               temperature: float, top_p: float, base_seed: int, ranks: Ranks, log: Callable[[str], None]) -> int:
    """Answer this rank's share of the questions, appending to `out`; returns the failures (all ranks).

    Ranks append whole lines (one write each, O_APPEND), and rank 0 rewrites the file in question order at the
    start (dropping a line cut short by a crash) and at the end (one line per id)."""
    if ranks.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            write_answers_in_order(out, bench, answered_ids(out))
    ranks.sum(0)
    done = answered_ids(out)
    mine = [item for item in bench.items[ranks.rank::ranks.world] if item.id not in done]
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    total = ranks.sum(len(mine))
    if ranks.rank == 0:
        log(f"{len(bench.items)} questions, {len(bench.items) - total} already answered, {total} to answer on "
            f"{ranks.world} process{'es' if ranks.world > 1 else ''}{cpu_threads(ranks)}, {batch_size} per batch")
    progress = ProgressBar("answers", total, with_rate=True, log_every=30, show=ranks.rank == 0)
    failed = 0
    rounds = ranks.most(len(batches))
    for round_ in range(rounds):
        count = 0
        if round_ < len(batches):
            batch = batches[round_]
            try:
                rows = answer_batch(ovis, batch, max_new_tokens, temperature, top_p, base_seed)
            except (ImageError, ValueError) as error:
                rows = []
                for item in batch:
                    log(f"{bench.source}:{item.line}: {error}; skipped")
                failed += len(batch)
            payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
            if payload:
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            count = len(batch)
        progress.add(ranks.sum(count))
    failed = ranks.sum(failed)
    if ranks.rank == 0 and out.exists():
        write_answers_in_order(out, bench, answered_ids(out))
    return failed


def answer_batch(ovis: Ovis, batch: list[Item], max_new_tokens: int, temperature: float, top_p: float,
                 base_seed: int) -> list[dict]:
    """One left-padded LLM pass over the batch; `seconds` is the batch's time shared out equally by its rows."""
    start = time.perf_counter()
    seed = item_seed(base_seed, batch[0].id) if temperature > 0 else None
    new_ids = ovis.answer_ids([item.text for item in batch], [item.images for item in batch],
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    seconds = (time.perf_counter() - start) / len(batch)
    rows = []
    for item, row_ids in zip(batch, new_ids):
        text, tokens = ovis.decode_answer(row_ids)
        rows.append({"id": item.id, "answer": text, "tokens": tokens, "seconds": round(seconds, 3)})
    return rows
