"""Samples during training (--sample-every, --sample-prompts): a few fixed-seed images and answers, made with the
inference pipeline from the model being trained, so that a run can be looked at as it goes.

The prompts file is JSON lines, one sample a line, its keys telling the task (image paths relative to the file):

    {"caption": "a red square on a white background"}              text-to-image
    {"source": "a.jpg", "instruction": "make the square blue"}      editing
    {"question": "What is in the image?", "images": ["a.jpg"]}      an answer ("image": "a.jpg" for one image;
                                                                    none for a text-only question)

and optionally "seed" (default: the line number), "steps" (sampling steps of an image, default 30) and
"max_new_tokens" (of an answer, default 64). Only the tasks the run trains are sampled. Images are
--resolution pixels square. Everything goes to RUN/samples/step-NNNNNNNN/: NN-t2i.png, NN-edit.png and
samples.json (each prompt with its image's file name or its answer), every file written atomically.
"""
import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import write_atomic
from ..model import OvisU1
from ..pipeline import Ovis
from ..preprocess import ImageError, load_image
from ..prompt import Tokenizer

DEFAULT_STEPS = 30
DEFAULT_NEW_TOKENS = 64
KEYS = {"understanding": "question", "t2i": "caption", "edit": "instruction"}


@dataclass
class SamplePrompt:
    task: str
    text: str  # the caption, instruction or question
    images: list = field(default_factory=list)  # PIL images: the source of an edit, a question's images
    seed: int = 0
    steps: int = DEFAULT_STEPS
    max_new_tokens: int = DEFAULT_NEW_TOKENS


def read_sample_prompts(path: Path, tasks: list[str]) -> list[SamplePrompt]:
    """The prompts of `tasks` in the file; ValueError naming the line for anything wrong."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--sample-prompts {path}, line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{where}: not JSON") from None
        kinds = [task for task, key in KEYS.items() if isinstance(row, dict) and key in row]
        if len(kinds) != 1 or not isinstance(row[KEYS[kinds[0]]], str):
            raise ValueError(f"{where}: give one of {', '.join(map(repr, KEYS.values()))} as a string")
        task = kinds[0]
        if task == "edit":
            if "source" not in row:
                raise ValueError(f"{where}: an edit needs its 'source' image")
            names = [row["source"]]
        else:
            names = row.get("images", [row["image"]] if "image" in row else [])
        try:
            images = [load_image(Path(path).parent / name) for name in names]
        except (ImageError, OSError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from None
        numbers = {key: row.get(key, default) for key, default in (("seed", number - 1), ("steps", DEFAULT_STEPS),
                                                                    ("max_new_tokens", DEFAULT_NEW_TOKENS))}
        if not all(isinstance(v, int) and v >= (0 if k == "seed" else 1) for k, v in numbers.items()):
            raise ValueError(f"{where}: seed must be a whole number >= 0, steps and max_new_tokens >= 1")
        if task in tasks:
            prompts.append(SamplePrompt(task, row[KEYS[task]], images, **numbers))
    if not prompts:
        raise ValueError(f"--sample-prompts {path}: no prompt of the tasks this run trains ({', '.join(tasks)}); "
                         f"add lines with {' or '.join(repr(KEYS[t]) for t in tasks)}")
    return prompts


@contextlib.contextmanager
def weights_in_use(model: nn.Module, weights: dict[str, torch.Tensor] | None):
    """Inside the block, the parameters named in `weights` (model.named_parameters() names) hold those values,
    e.g. an EMA; after it, their own again. Costs one copy of those parameters meanwhile."""
    if not weights:
        yield
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        own = {name: params[name].detach().clone() for name in weights}
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)


def sample(pipe: Ovis, prompt: SamplePrompt, resolution: int):
    """An image (t2i, edit) or an answer (understanding)."""
    if prompt.task == "understanding":
        return pipe.answer(prompt.text, prompt.images, max_new_tokens=prompt.max_new_tokens)
    if prompt.task == "t2i":
        return pipe.text_to_image(prompt.text, width=resolution, height=resolution, steps=prompt.steps,
                                  seed=prompt.seed)[0]
    return pipe.edit(prompt.images[0], prompt.text, steps=prompt.steps, seed=prompt.seed, width=resolution,
                     height=resolution)[0]


def write_samples(model: OvisU1, tokenizer: Tokenizer, prompts: list[SamplePrompt], directory: Path | None,
                  resolution: int, device: torch.device, autocast, weights: dict[str, torch.Tensor] | None = None,
                  fsdp_root: nn.Module | None = None) -> None:
    """Sample every prompt with `weights` in the model (None: its own) under `autocast`, and write the results to
    `directory` (None: sample only, as the other processes do).

    Every process calls this: under FSDP (`fsdp_root`, the fully_shard'ed module above `model`) each block's
    forward gathers its weights from all of them, so they must run the same prompts in step. Global RNG states,
    train/eval mode and the weights are given back afterwards."""
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), weights_in_use(model, weights), autocast:
        if fsdp_root is not None:
            fsdp_root.unshard()  # the weights outside the sharded blocks: embeddings, adapter, lm_head...
        pipe = Ovis(model, tokenizer, device=device)  # puts the model in eval mode
        results = [sample(pipe, prompt, resolution) for prompt in prompts]
        model.llm.free_cache()
        if fsdp_root is not None:
            fsdp_root.reshard()
    model.train(was_training)
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    listing = []
    for index, (prompt, result) in enumerate(zip(prompts, results)):
        entry = {"task": prompt.task, KEYS[prompt.task]: prompt.text, "seed": prompt.seed}
        if prompt.task == "understanding":
            entry["answer"] = result
        else:
            name = f"{index:02d}-{prompt.task}.png"
            png = io.BytesIO()
            result.save(png, format="PNG")
            write_atomic(directory / name, png.getvalue())
            entry["image"] = name
        listing.append(entry)
    write_atomic(directory / "samples.json", json.dumps(listing, indent=1, ensure_ascii=False) + "\n")

