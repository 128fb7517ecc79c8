"""Ovis-U1 from the command line: image understanding, text-to-image and image editing with one model.

The flags say which task to run:

    python sample.py --prompt "a red cube on a wooden table"                 # text-to-image
    python sample.py --image photo.jpg --prompt "make the sky purple"        # edit an image
    python sample.py --image photo.jpg --ask "What is in this picture?"      # understanding (answer streamed)
    python sample.py --image a.jpg b.jpg --ask "What differs between them?"  # ... about several images
    python sample.py --ask "Write a haiku about autumn."                     # text chat
    python sample.py --from-png outputs/t2i-0001.png                         # re-make an image from its metadata
    python sample.py --prompts evaluation_metadata.jsonl --out geneval-images  # a benchmark set (README: Benchmarks)

--weights is a checkpoint directory or a hub id. The default, AIDC-AI/Ovis-U1-3B, is read from the Hugging Face
cache, or downloaded into it on first use (about 7.3 GB; `python weights.py download` does the same up front).
--lora FILE merges LoRA adapters trained on those weights (train.py --lora, then export --lora-only) into them.
Images are PNGs that carry their settings (prompt, seed, steps, guidance, size, model) in their text metadata;
files are never replaced, new ones get the next free number. The same flags and seed on the same device give
the same image, byte for byte.
"""
import sys

from ovis_min.cli import ProgressBar, ctrl_c_quits_quietly, ctrl_c_raises

ctrl_c_quits_quietly("sample.py")  # covers the seconds the imports below take

import argparse  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from PIL import Image, PngImagePlugin, UnidentifiedImageError  # noqa: E402

from ovis_min import benchmarks, perf  # noqa: E402
from ovis_min.checkpoint import DEFAULT_REPO, CheckpointError, build_model, read_config  # noqa: E402
from ovis_min.hub import resolve_source  # noqa: E402
from ovis_min.config import LLMConfig  # noqa: E402
from ovis_min.files import disk_full, remove_leftovers, temp_prefix, write_atomic  # noqa: E402
from ovis_min.decode import NonFiniteError  # noqa: E402
from ovis_min.pipeline import MAX_SIZE, MIN_SIZE, Ovis, round_to_16  # noqa: E402
from ovis_min.preprocess import SMART_RESIZE_MAX_PIXELS, ImageError, edit_target_size, load_image  # noqa: E402
from ovis_min.lora import AdapterError, check_fits, merge_adapter_file, read_adapter_file  # noqa: E402

ctrl_c_raises()

DEFAULT_SIZE = 1024
DEFAULT_STEPS = 50
DEFAULT_TXT_CFG = {"t2i": 5.0, "edit": 6.0}  # the official test_txt_to_img.py and test_img_edit.py
DEFAULT_IMG_CFG = 1.5
DEFAULT_MAX_NEW_TOKENS = 4096  # the official test_img_to_txt.py
DEFAULT_OUT = "outputs"
MAX_STEPS = 1000  # the official scripts use 50; beyond this a typo is likelier than a wish
MAX_NEW_TOKENS = LLMConfig().max_position_embeddings  # the LLM's context: nothing longer can be answered
MAX_BATCH_SIZE = 256  # images per decoder call or questions per LLM pass: far past what one GPU holds at 1024x1024
MAX_IMAGES_PER_PROMPT = 64  # GenEval and DPG-Bench use 4
# Guidance multiplies the difference of two velocity predictions in float32: past this the product overflows or
# leaves the unguided prediction below its rounding. The official scales are 5, 6 and 1.5.
MAX_GUIDANCE = 1000.0
TASK_NAMES = {"t2i": "text-to-image", "edit": "editing", "understanding": "understanding", "chat": "text chat"}

# Flags that belong to one kind of task: giving them to the other kind is a mistake worth reporting.
GENERATION_FLAGS = ("width", "height", "steps", "txt_cfg", "img_cfg", "num_images", "out")
ANSWER_FLAGS = ("max_new_tokens", "temperature", "top_p")
# The settings an image's PNG metadata records, and --from-png restores unless the command line sets them.
RECORDED = ("task", "prompt", "seed", "steps", "txt_cfg", "img_cfg", "width", "height", "model", "source", "lora",
            "lora_scale")


class UsageError(Exception):
    """Flags that cannot work together, or a value out of range. Exit status 2, like argparse."""


class RunError(Exception):
    """Something outside the flags stops the run: a missing file, an unwritable folder. Exit status 1."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # Every default is None here and filled in by `settle`: the right default depends on the task (--txt-cfg,
    # the edit size), and --from-png must know which flags the command line really set.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_argument_group("what to do")
    task.add_argument("--prompt", metavar="TEXT",
                      help="make an image from this text; with --image, edit that image as it says")
    task.add_argument("--ask", metavar="TEXT",
                      help="answer this question (about the --image files, if given); streamed to stdout")
    task.add_argument("--image", nargs="+", action="extend", metavar="FILE",
                      help="input image: the image to edit (--prompt), or one or more images to ask about (--ask)")
    task.add_argument("--from-png", type=Path, metavar="FILE",
                      help="re-make an image made by this script from the settings in its PNG metadata; flags "
                           "given as well override them")

    gen = parser.add_argument_group("image generation (--prompt)")
    gen.add_argument("--width", type=int, metavar="PX",
                     help=f"image width, rounded down to a multiple of 16 (default {DEFAULT_SIZE}; editing: the "
                          "input's width rounded to 32 within about one megapixel, as the official edit script does)")
    gen.add_argument("--height", type=int, metavar="PX", help="image height, as --width")
    gen.add_argument("--steps", type=int, metavar="N", help=f"denoising steps (default {DEFAULT_STEPS})")
    gen.add_argument("--txt-cfg", type=float, metavar="SCALE",
                     help=f"text guidance scale (default {DEFAULT_TXT_CFG['t2i']:g} for text-to-image, "
                          f"{DEFAULT_TXT_CFG['edit']:g} for editing)")
    gen.add_argument("--img-cfg", type=float, metavar="SCALE",
                     help=f"image guidance scale of editing (default {DEFAULT_IMG_CFG:g})")
    gen.add_argument("--seed", type=int, metavar="N",
                     help="random seed (default: a random one, always printed); image i of --num-images uses "
                          "seed + i. With --ask and --temperature > 0 it seeds the sampling")
    gen.add_argument("--num-images", type=int, metavar="N", help="how many images to make (default 1)")
    gen.add_argument("--out", metavar="PATH",
                     help=f"a folder, or a .png file name (default {DEFAULT_OUT}/); existing files are never "
                          "replaced: new names get the next free number")

    ans = parser.add_argument_group("answers (--ask)")
    ans.add_argument("--max-new-tokens", type=int, metavar="N",
                     help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS}, as the official script)")
    ans.add_argument("--temperature", type=float, metavar="T",
                     help="sampling temperature; 0 = greedy, as the official script (default 0)")
    ans.add_argument("--top-p", type=float, metavar="P",
                     help="nucleus sampling: keep the most likely tokens up to this total probability (default 1; "
                          "needs --temperature > 0)")

    sets = parser.add_argument_group(
        "benchmark sets (resumable; under torchrun --nproc_per_node N each process takes every N-th item)")
    sets.add_argument("--prompts", type=Path, metavar="FILE_OR_DIR",
                      help="make the images of a prompt set into --out DIR: a GenEval metadata file (DIR/00000/"
                           "metadata.jsonl, DIR/00000/samples/0000.png ...), a DPG-Bench prompts folder of <id>.txt "
                           "(DIR/<id>.png, the images of a prompt as a 2x2 grid), or JSON lines with prompt and "
                           "optional id, seed, width, height (DIR/<id>.png)")
    sets.add_argument("--edits", type=Path, metavar="FILE",
                      help="JSON lines with image (relative to FILE), instruction and id, optional subdir: writes "
                           "--out DIR/[subdir/]<id>.png at the official edit size")
    sets.add_argument("--questions", type=Path, metavar="FILE",
                      help="JSON lines with id, question, images (paths relative to FILE): appends "
                           '{"id", "answer", "tokens", "seconds"} lines to --out FILE.jsonl')
    sets.add_argument("--images-per-prompt", type=int, metavar="N",
                      help="images per prompt of --prompts (default 4 for GenEval and DPG-Bench, else 1); image j "
                           "of an item uses its seed + j")
    sets.add_argument("--batch-size", type=int, metavar="N",
                      help="images per decoder call (prompts of one size batch together), or questions per LLM "
                           "pass (default 1). Each item's seed comes from --seed (default 0) and its id, so batch "
                           "size, process count and order do not change which image an item gets")

    run = parser.add_argument_group("model and runtime")
    run.add_argument("--weights", metavar="DIR_OR_ID",
                     help=f"checkpoint directory or hub id (default {DEFAULT_REPO}: from the Hugging Face cache, "
                          "or downloaded on first use)")
    run.add_argument("--revision", default="main",
                     help="for a hub id: branch, tag, commit or refs/pr/N (default main)")
    run.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: cuda if available, then mps, then cpu)")
    run.add_argument("--dtype", choices=("bf16", "fp32"),
                     help="weights and compute (default bf16 on a GPU, fp32 on the CPU)")
    run.add_argument("--offload", action="store_true",
                     help="keep the model in CPU memory and move only the part in use to the GPU (condition: "
                          "LLM + visual encoder, then the image decoder, then the VAE): slower, and the GPU holds "
                          "the largest part instead of the whole model")
    run.add_argument("--lora", metavar="FILE",
                     help="LoRA adapters (train.py export RUN --lora-only) merged into the weights as they load, so "
                          "sampling costs nothing extra; the file must be made for these --weights")
    run.add_argument("--lora-scale", type=float, metavar="S",
                     help="how much of the adapters' trained effect to merge (default 1; 0: none, 2: twice)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the image decoder blocks and the LLM decode step (the first run compiles)")
    return parser


def choose_task(args: argparse.Namespace) -> str:
    """t2i, edit, understanding or chat, from which flags are present; mistakes are reported, not guessed."""
    if args.prompt is not None and args.ask is not None:
        raise UsageError("--prompt (make or edit an image) and --ask (answer a question) are different tasks; "
                         "give one of them")
    if args.prompt is not None:
        task = "edit" if args.image else "t2i"
    elif args.ask is not None:
        task = "understanding" if args.image else "chat"
    else:
        raise UsageError("nothing to do: give --prompt TEXT to make an image (with --image FILE: edit it), "
                         "or --ask TEXT to ask a question; see python sample.py --help")
    if task in ("t2i", "edit"):
        wrong, right = [flag(n) for n in ANSWER_FLAGS if getattr(args, n) is not None], "answers (--ask)"
    else:
        wrong, right = [flag(n) for n in GENERATION_FLAGS if getattr(args, n) is not None], "images (--prompt)"
    if wrong:
        raise UsageError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for {right}, not for "
                         f"{TASK_NAMES[task]}")
    if task == "t2i" and args.img_cfg is not None:
        raise UsageError("--img-cfg is the image guidance of editing: it needs --image FILE (the image to edit)")
    if task == "edit" and len(args.image) > 1:
        raise UsageError(f"editing takes one --image, got {len(args.image)}: {' '.join(args.image)}")
    return task


def read_png_settings(path: Path) -> dict[str, str]:
    """The settings an image of this script carries in its PNG text metadata."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}))
    except FileNotFoundError:
        raise RunError(f"--from-png {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise RunError(f"--from-png {path}: not a readable PNG ({error})") from None
    if text.get("task") not in ("t2i", "edit"):
        raise RunError(f"--from-png {path}: no ovis-min settings in its metadata (was it made by sample.py?)")
    return {key: text[key] for key in RECORDED if key in text}


def apply_png_settings(args: argparse.Namespace, settings: dict[str, str]) -> None:
    """Fill every flag the command line left unset from the PNG's settings."""
    if args.ask is not None:
        raise UsageError("--from-png re-makes an image; it cannot be combined with --ask")
    convert = {"seed": int, "steps": int, "width": int, "height": int, "txt_cfg": float, "img_cfg": float,
               "lora_scale": float}
    for key, value in settings.items():
        name = {"model": "weights", "source": "image"}.get(key, key)
        if key == "task" or getattr(args, name) is not None:
            continue
        try:
            setattr(args, name, [value] if name == "image" else convert.get(key, str)(value))
        except ValueError:
            raise RunError(f"--from-png {args.from_png}: its {key} {value!r} is not a number") from None
    if settings["task"] == "edit" and not args.image:
        raise RunError(f"--from-png {args.from_png}: an edit without its source image in the metadata")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda or 'none: a CPU-only build'})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cuda", "mps", "cpu"):
        raise UsageError(f"--device {name}: sample.py runs on cuda, mps or cpu")
    return device


def check_range(args: argparse.Namespace) -> None:
    for name, low, high in (("steps", 1, MAX_STEPS), ("num_images", 1, None), ("max_new_tokens", 1, MAX_NEW_TOKENS),
                            ("seed", 0, 2 ** 63 - 1), ("batch_size", 1, MAX_BATCH_SIZE),
                            ("images_per_prompt", 1, MAX_IMAGES_PER_PROMPT)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UsageError(f"{flag(name)} {value}: must be at least {low}")
        if value is not None and high is not None and value > high:
            raise UsageError(f"{flag(name)} {value}: must be at most {high}")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value < MIN_SIZE:
            raise UsageError(f"{flag(name)} {value}: too small; width and height must be at least {MIN_SIZE} pixels")
        if value is not None and value > MAX_SIZE:
            raise UsageError(f"{flag(name)} {value}: too large; width and height must be at most {MAX_SIZE} pixels")
    if args.seed is not None and args.num_images is not None and args.seed + args.num_images - 1 >= 2 ** 63:
        raise UsageError(f"--seed {args.seed} with --num-images {args.num_images}: image i uses seed + i, which must "
                         "stay below 2**63; give a smaller --seed")
    for name in ("txt_cfg", "img_cfg", "temperature", "top_p"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag(name)} {value}: must be a finite number")
    for name in ("txt_cfg", "img_cfg"):
        value = getattr(args, name)
        if value is not None and not -MAX_GUIDANCE <= value <= MAX_GUIDANCE:
            raise UsageError(f"{flag(name)} {value:g}: guidance must be in [{-MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}], "
                             "which float32 can combine (the official scales are 5 and 6 for text, 1.5 for the "
                             "image)")
    if args.lora_scale is not None and (args.lora is None or not math.isfinite(args.lora_scale)):
        raise UsageError(f"--lora-scale {args.lora_scale:g}: " + ("give the adapters with --lora FILE" if
                                                                 args.lora is None else "must be a finite number"))
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature:g}: must be 0 (greedy) or more")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p:g}: must be in (0, 1]")
    for name in ("prompt", "ask"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes the terminal could not decode arrive as lone surrogates
            raise UsageError(f"{flag(name)}: the text is not valid UTF-8; check the terminal's encoding") from None
        if not text.strip():
            raise UsageError(f"{flag(name)}: the text is empty")


def image_size(args: argparse.Namespace, task: str, source: Image.Image | None) -> tuple[int, int]:
    """(width, height) of the images to make, with a note for every value that was changed."""
    width, height = args.width, args.height
    if task == "edit":
        edit_width, edit_height = edit_target_size(source.width, source.height)
        if width is None and height is None:
            log(f"note: editing at {edit_width}x{edit_height}: the input's {source.width}x{source.height} fitted as "
                f"the official edit script does (multiples of 32, at most {SMART_RESIZE_MAX_PIXELS:,} pixels; "
                "--width/--height to change)")
            return edit_width, edit_height
        if width is None:  # one side given: keep the input's aspect ratio
            width = max(MIN_SIZE, round(height * source.width / source.height))
        elif height is None:
            height = max(MIN_SIZE, round(width * source.height / source.width))
    width = DEFAULT_SIZE if width is None else width
    height = DEFAULT_SIZE if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value % 16:
            log(f"note: {name} {value} rounded down to {round_to_16(value)}: the model works in 16x16-pixel "
                "latent tokens")
    return round_to_16(width), round_to_16(height)


# ---------------------------------------------------------------------------------------------------------------
# Output files
# ---------------------------------------------------------------------------------------------------------------

class Outputs:
    """Where the images of --out go: a folder, or a .png file name. Names are picked when an image is written.

    A free file name is used as it is; otherwise names are numbered on from the highest number already there
    (outputs/t2i-0003.png, cat-0001.png), so earlier images are never replaced. A name is only taken by writing
    the whole file under a temporary name and linking it in exclusively: two runs writing into one folder both
    keep every image, and a crash never leaves a partial PNG under an output name.
    """

    def __init__(self, out: str, task: str):
        path = Path(out).expanduser()
        self.named_file = bool(path.suffix) and not path.is_dir()
        if self.named_file and path.suffix.lower() != ".png":
            raise UsageError(f"--out {out}: images are saved as PNG (their settings travel in the metadata); give "
                             "a .png file name or a folder")
        self.path = path
        self.folder, self.stem = (path.parent, path.stem) if self.named_file else (path, task)
        writable_folder(self.folder)
        for leftover in remove_leftovers(self.folder):
            log(f"note: removed {leftover.name}, a partial image of a run that was killed")

    def next_free(self) -> Path:
        if self.named_file and not self.path.exists():
            return self.path
        numbered = re.compile(re.escape(self.stem) + r"-(\d+)\.png")
        taken = [int(m.group(1)) for p in self.folder.iterdir() if (m := numbered.fullmatch(p.name))]
        return self.folder / f"{self.stem}-{max(taken, default=0) + 1:04d}.png"

    def write(self, png: bytes) -> Path:
        while True:
            path = self.next_free()
            try:
                write_new(path, png, "free some space or choose another --out")
            except FileExistsError:  # another run took this name a moment ago: take the next one
                continue
            if self.named_file and path != self.path:
                log(f"note: {self.path} exists: wrote {path.name}")
            return path


def writable_folder(folder: Path) -> None:
    """Create `folder` if needed and make sure a file can be created in it, before any time is spent."""
    if folder.exists() and not folder.is_dir():
        raise RunError(f"cannot write images into {folder}: it is a file, not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=temp_prefix(), dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise RunError(f"cannot write images into {folder} ({error.strerror or error}); choose another --out") from None


def write_new(path: Path, data: bytes, if_full: str) -> None:
    """Write a new file whole (temporary name, then linked in; FileExistsError if the name is taken); a failure is
    one line, `if_full` saying what to do when the disk is full."""
    try:
        write_atomic(path, data, replace=False)
    except FileExistsError:
        raise
    except OSError as error:
        if disk_full(error):
            raise RunError(f"the disk is full: cannot write {path}; {if_full} (nothing was left half-written)") \
                from None
        raise RunError(f"cannot write {path} ({error.strerror or error})") from None


def png_bytes(image: Image.Image, settings: dict) -> bytes:
    """`image` as a PNG with `settings` as its text chunks."""
    info = PngImagePlugin.PngInfo()
    for key in RECORDED:
        if settings.get(key) is not None:
            info.add_text(key, str(settings[key]))  # non-Latin-1 text (most prompts' scripts) becomes iTXt
    info.add_text("Software", "ovis-min sample.py")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> str:
    peak = perf.peak_memory(device)
    if peak is None:
        return "peak memory unknown"
    what = {"cuda": "peak GPU memory", "mps": "MPS memory"}.get(device.type, "peak process memory")
    return f"{what} {peak / 2 ** 30:.2f} GiB"


def find_weights(source: str, revision: str = "main") -> Path:
    """The checkpoint directory of --weights: a directory, or a hub id from the cache, downloaded (or an
    incomplete snapshot completed) when online; the loader says on stderr when it downloads."""
    return resolve_source(source, revision=revision, download=True)


def load(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Ovis:
    start = time.perf_counter()
    try:  # the adapter file is checked against the weights' shapes before minutes of downloading and loading
        adapters = read_adapter_file(Path(args.lora).expanduser()) if args.lora is not None else None
        directory = find_weights(args.weights, args.revision)
        if adapters is not None:
            check_fits(adapters, build_model(read_config(directory)))
    except AdapterError as error:
        raise RunError(str(error)) from None
    log(f"loading {directory} ({str(dtype).removeprefix('torch.')} on {device}"
        f"{', offloaded to CPU between parts' if args.offload else ''})")
    ovis = Ovis.from_pretrained(directory, device=device, dtype=dtype, offload=args.offload, download=False)
    # The metadata names the model as the user did: a hub id stays a hub id, a directory becomes absolute.
    ovis.model_id = args.weights if not Path(args.weights).expanduser().is_dir() else str(directory.resolve())
    if adapters is not None:
        scale = 1.0 if args.lora_scale is None else args.lora_scale
        merge_adapter_file(ovis.model, adapters, scale)
        log(f"merged {len(adapters.shapes) // 2} LoRA adapters of rank {adapters.rank} from {adapters.path}"
            + (f" at scale {scale:g}" if scale != 1 else ""))
    if args.compile:
        ovis.compile()
    log(f"loaded in {time.perf_counter() - start:.1f} s")
    return ovis


def generate(ovis: Ovis, args: argparse.Namespace, task: str, source: Image.Image | None,
             size: tuple[int, int], outputs: Outputs, device: torch.device) -> None:
    width, height = size
    # At the edit script's own size the official path first resizes the input to exactly that size; passing no
    # size keeps that path (and keeps a --from-png re-run identical).
    default_edit_size = task == "edit" and size == edit_target_size(source.width, source.height)
    settings = {"task": task, "prompt": args.prompt, "steps": args.steps, "txt_cfg": args.txt_cfg,
                "img_cfg": args.img_cfg if task == "edit" else None, "width": width, "height": height,
                "source": str(Path(args.image[0]).resolve()) if task == "edit" else None, **made_with(ovis, args)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    count = args.num_images
    for i in range(count):
        seed = args.seed + i
        label = f"image {i + 1}/{count} " if count > 1 else ""
        if task == "t2i":
            image, = ovis.text_to_image(args.prompt, width=width, height=height, steps=args.steps,
                                        txt_cfg=args.txt_cfg, seed=seed, progress=ProgressBar("steps", label=label))
        else:
            image, = ovis.edit(source, args.prompt, steps=args.steps, txt_cfg=args.txt_cfg, img_cfg=args.img_cfg,
                               seed=seed, width=None if default_edit_size else width,
                               height=None if default_edit_size else height, progress=ProgressBar("steps", label=label))
        print(outputs.write(png_bytes(image, {**settings, "seed": seed})), flush=True)
    seconds = time.perf_counter() - start
    steps = args.steps * count
    counted = f"{args.steps} step{'s' if args.steps > 1 else ''}"
    if count > 1:
        counted = f"{count} x {counted}"
    log(f"{count} image{'s' if count > 1 else ''} of {width}x{height}, {counted} in {seconds:.1f} s "
        f"({steps / seconds:.2f} steps/s, condition and VAE included), {peak_memory(device)}")


def answer(ovis: Ovis, args: argparse.Namespace, images: list[Image.Image], device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = []
    start = time.perf_counter()
    ovis.answer(args.ask, images, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed if args.temperature > 0 else None,
                on_text=lambda piece: print(piece, end="", flush=True), on_token=tokens.append)
    print(flush=True)
    seconds = time.perf_counter() - start
    log(f"{len(tokens)} tokens in {seconds:.1f} s ({len(tokens) / seconds:.1f} tokens/s, prompt included), "
        f"{peak_memory(device)}")


def set_up_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of --device and --dtype, with the settings every run on them needs."""
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if device.type == "cpu":
        # softmax tails underflow to denormal floats, which slow the CPU attention kernel down up to 2.5x
        torch.set_flush_denormal(True)
    if args.offload and device.type == "cpu":
        log("note: --offload has no effect on the CPU: the model is in CPU memory anyway")
        args.offload = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # its timing-based choice of kernels would change the bytes
        torch.backends.cudnn.deterministic = True
    args.weights = args.weights or DEFAULT_REPO
    return device, dtype


def settle(args: argparse.Namespace) -> tuple[str, torch.device, torch.dtype]:
    """Check the flags, fill in the defaults of the chosen task; returns (task, device, dtype)."""
    if args.from_png is not None:
        apply_png_settings(args, read_png_settings(args.from_png))
    task = choose_task(args)
    check_range(args)
    device, dtype = set_up_device(args)
    if task in ("t2i", "edit"):
        args.steps = args.steps or DEFAULT_STEPS
        args.txt_cfg = DEFAULT_TXT_CFG[task] if args.txt_cfg is None else args.txt_cfg
        args.img_cfg = DEFAULT_IMG_CFG if args.img_cfg is None else args.img_cfg
        args.num_images = args.num_images or 1
        args.out = args.out or DEFAULT_OUT
    else:
        args.max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        args.temperature = 0.0 if args.temperature is None else args.temperature
        args.top_p = 1.0 if args.top_p is None else args.top_p
        if args.top_p < 1 and args.temperature == 0:
            log("note: --top-p has no effect with greedy decoding (--temperature 0)")
    if args.seed is None and (task in ("t2i", "edit") or args.temperature > 0):
        args.seed = random.SystemRandom().randrange(2 ** 31)
    return task, device, dtype


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(getattr(args, name) is not None for name in BENCHMARK_SETS):
        return run_benchmark(args)
    task, device, dtype = settle(args)
    # Everything that can fail without the model fails here, before minutes of loading.
    images = [load_image(path) for path in args.image or []]
    if task in ("t2i", "edit"):
        try:
            size = image_size(args, task, images[0] if images else None)
        except ValueError as error:  # an input image whose aspect ratio no edit size can hold
            raise RunError(str(error)) from None
        outputs = Outputs(args.out, task)
        seeds = f"{args.seed}" if args.num_images == 1 else f"{args.seed}..{args.seed + args.num_images - 1}"
        log(f"{TASK_NAMES[task]}, seed {seeds}, {size[0]}x{size[1]}, {args.steps} steps, txt_cfg {args.txt_cfg:g}"
            + (f", img_cfg {args.img_cfg:g}" if task == "edit" else ""))
    elif args.temperature > 0:
        log(f"seed {args.seed}")
    ovis = load(args, device, dtype)
    try:
        if task in ("t2i", "edit"):
            generate(ovis, args, task, images[0] if images else None, size, outputs, device)
        else:
            answer(ovis, args, images, device)
    except ValueError as error:  # the model's own checks: a prompt too long, <image> markers that do not add up
        raise RunError(str(error)) from None
    except NonFiniteError as error:
        raise RunError(damaged_weights(error, ovis)) from None
    return 0


def damaged_weights(error: NonFiniteError, ovis: Ovis) -> str:
    return (f"{error}: the weights of {ovis.model_id} hold NaN or infinite values (a damaged checkpoint, or a "
            "training run that diverged); use another checkpoint or download it again")


# ---------------------------------------------------------------------------------------------------------------
# Benchmark sets: --prompts, --edits, --questions (the readers and layouts are ovis_min/benchmarks.py)
# ---------------------------------------------------------------------------------------------------------------

BENCHMARK_SETS = ("prompts", "edits", "questions")
ONE_RUN_FLAGS = ("prompt", "ask", "image", "from_png", "num_images")


def choose_benchmark(args: argparse.Namespace) -> str:
    """prompts, edits or questions; the flags of one image or answer, or of the other kind of set, are refused."""
    given = [name for name in BENCHMARK_SETS if getattr(args, name) is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(map(flag, given))} are different runs; give one of them")
    kind = given[0]
    single = [flag(name) for name in ONE_RUN_FLAGS if getattr(args, name) is not None]
    if single:
        raise UsageError(f"{', '.join(single)}: a {flag(kind)} run takes its inputs from the file; leave "
                         f"{'it' if len(single) == 1 else 'them'} out")
    if kind == "questions":
        wrong = [name for name in (*GENERATION_FLAGS, "images_per_prompt") if name != "out"]
    else:
        wrong = [*ANSWER_FLAGS, *(("img_cfg",) if kind == "prompts" else ("images_per_prompt",))]
    wrong = [flag(name) for name in wrong if getattr(args, name) is not None]
    if wrong:
        raise UsageError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not for {flag(kind)}")
    if args.out is None:
        raise UsageError(f"{flag(kind)} needs --out: " + ("the answers file, e.g. --out answers.jsonl" if
                         kind == "questions" else "the folder its scorer reads, e.g. --out bench-images"))
    if kind == "edits" and (args.width is None) != (args.height is None):
        raise UsageError("--edits: give both --width and --height, or neither (each edit at its official size)")
    return kind


def made_with(ovis: Ovis, args: argparse.Namespace) -> dict:
    """What a PNG records of the model its image came from: the weights, and the LoRA merged into them."""
    return {"model": ovis.model_id, "lora": str(Path(args.lora).expanduser().resolve()) if args.lora else None,
            "lora_scale": args.lora_scale}


def write_png(image: Image.Image, path: Path, settings: dict) -> None:
    """A benchmark image with this script's metadata (so --from-png re-makes it), written whole, never over a file."""
    try:
        write_new(path, png_bytes(image, settings), "free some space and run the same command again (finished "
                  "images are kept)")
    except FileExistsError:
        raise RunError(f"{path} appeared while this ran (another run writing into the same --out?); not "
                       "replacing it") from None


def run_benchmark(args: argparse.Namespace) -> int:
    """A whole benchmark set: read, shared out round-robin over torchrun's processes, resumed where it stopped."""
    kind = choose_benchmark(args)
    check_range(args)
    device, dtype = set_up_device(args)
    seed = 0 if args.seed is None else args.seed  # never random: a resumed or sharded run must make the same images
    read = {"prompts": benchmarks.read_prompts, "edits": benchmarks.read_edits,
            "questions": benchmarks.read_questions}[kind]
    try:
        bench = read(getattr(args, kind).expanduser())
    except benchmarks.InputError as error:
        raise RunError(f"{flag(kind)} {error}") from None
    out = Path(args.out).expanduser()
    if kind == "questions" and out.is_dir():
        raise RunError(f"--out {out} is a folder; --questions appends its answers to a file, e.g. answers.jsonl")
    writable_folder(out.parent if kind == "questions" else out)
    ranks = benchmarks.join_ranks(device)
    if ranks.rank == 0:
        for bad_row in bench.bad_rows:
            log(f"{bad_row}; skipped")
    if not bench.items:
        raise RunError(f"{flag(kind)} {getattr(args, kind)}: no usable rows")
    if kind == "prompts":
        width, height = image_size(args, "t2i", None)  # rows with their own width and height keep them
    else:
        width, height = (None, None) if args.width is None else image_size(args, "t2i", None)  # rounded, with a note
    ovis = load(args, ranks.device, dtype)
    try:
        if kind == "questions":
            failed = benchmarks.answer_set(
                ovis, bench, out, args.batch_size or 1, args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                args.temperature or 0.0, 1.0 if args.top_p is None else args.top_p, seed, ranks, log)
        else:
            task = "t2i" if kind == "prompts" else "edit"
            settings = benchmarks.GenerationSettings(
                steps=args.steps or DEFAULT_STEPS,
                txt_cfg=DEFAULT_TXT_CFG[task] if args.txt_cfg is None else args.txt_cfg,
                img_cfg=DEFAULT_IMG_CFG if args.img_cfg is None else args.img_cfg, width=width, height=height,
                base_seed=seed, batch_size=args.batch_size or 1,
                images_per_prompt=args.images_per_prompt or benchmarks.DEFAULT_IMAGES_PER_PROMPT.get(bench.kind, 1))
            if ranks.rank == 0:
                size = f"{width}x{height}" if width else "the official edit size"
                log(f"{TASK_NAMES[task]}, {bench.kind} set, base seed {seed}, {size}, {settings.steps} steps, "
                    f"txt_cfg {settings.txt_cfg:g}" + (f", img_cfg {settings.img_cfg:g}" if task == "edit" else ""))
            try:
                model = made_with(ovis, args)
                failed = benchmarks.generate_set(
                    ovis, bench, out, settings, lambda image, path, made: write_png(image, path, {**made, **model}),
                    ranks, log)
            except KeyboardInterrupt:
                if ranks.rank == 0:
                    log(benchmarks.finished_note(bench, out, settings.images_per_prompt))
                raise
    except NonFiniteError as error:
        raise RunError(damaged_weights(error, ovis)) from None
    except OSError as error:  # the answers file: images go through write_png
        if disk_full(error):
            raise RunError(f"the disk is full: cannot write {out}; free some space and run the same command again "
                           "(finished items are kept)") from None
        raise RunError(f"cannot write {out} ({error.strerror or error})") from None
    ranks.close()
    skipped = len(bench.bad_rows) + failed
    if skipped and ranks.rank == 0:
        raise RunError(f"{skipped} bad row{'s were' if skipped > 1 else ' was'} skipped (listed above), the rest is "
                       "done; fix them and run the same command again: finished outputs are kept")
    return 1 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    """Run, turning the errors a user can cause into one line on stderr and a non-zero exit status."""
    # A model's answer may hold characters the console's encoding lacks: print a stand-in rather than crash.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    try:
        return run(argv)
    except UsageError as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        hint = "" if "weights.py download" in str(error) else \
            "; get the official weights with: python weights.py download (or pass --weights DIR)"
        print(f"sample.py: error: {error}{hint}", file=sys.stderr)
        return 1
    except (RunError, ImageError) as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print("sample.py: error: out of GPU memory; try --offload, a smaller --width/--height, or fewer "
              "--max-new-tokens", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nsample.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
