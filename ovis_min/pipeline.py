"""The inference pipeline: understanding, text-to-image and editing end to end, as the official test scripts run them.

`Ovis` is the pipeline: the model (`model.OvisU1`, an nn.Module with the official checkpoint names) with its
tokenizer, run on prompts and images. Prompts, blank images, guidance branches and sizes follow the official
`test_img_to_txt.py`, `test_txt_to_img.py` and `test_img_edit.py`.

One image's guided denoising in its plainest form is `denoise_one_image`: one decoder call per guidance branch
and step, then the guidance. What the pipeline runs is the same loop with the branches batched (`guided_velocity`,
`sample_latents`), tested equal to it; it also does once what does not change with the step: the refiner output
and CLS vector of every condition and the RoPE tables of the grid.

A generation uses three groups of modules in turn, condition (LLM + visual encoder), image decoder, VAE; with
`offload` only the group in use sits on the accelerator, the others wait in CPU memory.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from . import flow
from .checkpoint import DEFAULT_REPO, load_model
from .hub import resolve_source
from .decode import NonFiniteError, compile_decode_step, generate
from .mmdit import MMDiT
from .layers import pad_rows
from .model import OvisU1, decode_image_tokens, encode_image_tokens
from .preprocess import blank_image, condition_images, edit_target_size, load_image, resize_for_edit
from .vae import to_uint8
from .prompt import UNCONDITIONAL_PROMPT, Tokenizer, edit_prompt, preprocess_inputs, question_prompt, t2i_prompt

Progress = Callable[[int, int], None] | None  # called as progress(step_done, total_steps)

# The submodules of OvisU1 that `offload` moves together, in the order a generation uses them.
OFFLOAD_GROUPS = {
    "condition": ("llm", "visual_tokenizer", "vte"),
    "decoder": ("visual_generator.backbone",),
    "vae": ("visual_generator.vae",),
}


@dataclass
class Condition:
    """The text condition of one guidance branch (of one prompt), refined once per generation."""
    tokens: torch.Tensor  # (1, L, H) refined text tokens
    cls: torch.Tensor  # (1, H) global text vector
    cond_img: torch.Tensor | None = None  # (1, N, 16) VAE tokens of the image being edited, if this branch sees it


def one_or_each(conditions: list[Condition]) -> "Condition | list[Condition]":
    """A guidance branch for `guided_velocity`: one Condition shared by every image, or one per image."""
    return conditions[0] if len(conditions) == 1 else conditions


def round_to_16(size: int) -> int:
    """The official sampler floors the image size to a multiple of 16 (8x VAE, then 2x2 packing)."""
    return 16 * (size // 16)


@torch.no_grad()
def denoise_one_image(decoder: MMDiT, noise: torch.Tensor, timesteps: list[float], branches: list[Condition],
                      txt_cfg: float, img_cfg: float | None = None) -> torch.Tensor:
    """The guided Euler loop of one image in its plainest form: the spec that `sample_latents` computes faster.

    noise (1, 4, h, w) -> (1, N, 16) latent tokens. `branches` are [cond, uncond] for text-to-image (text
    guidance; `img_cfg` None) or [cond, no text, no both] for editing (image + text guidance). Each step runs the
    decoder once per branch; nothing is batched, padded or shared between branches.
    """
    x = flow.pack_latents(noise)  # (1, N, 16)
    rows, cols = noise.shape[-2] // 2, noise.shape[-1] // 2  # the grid of packed tokens
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = []
        for branch in branches:
            ids = flow.sequence_position_ids(branch.tokens.shape[1], rows, cols,
                                             edit_image=branch.cond_img is not None, device=x.device)  # (1, S, 3)
            t = torch.full((1,), t_cur, dtype=x.dtype, device=x.device)
            v.append(decoder.predict_velocity(x, branch.tokens, decoder.text_vector(branch.cls),
                                              decoder.rope(ids), t, cond_img=branch.cond_img))
        if img_cfg is None:  # text-to-image
            velocity = flow.text_guidance(v[0], v[1], txt_cfg)
        else:  # editing
            velocity = flow.edit_guidance(v[0], v[1], v[2], img_cfg, txt_cfg)
        x = x + (t_next - t_cur) * velocity  # t goes down from 1 (noise) to 0 (image)
    return x


def guided_velocity(decoder: MMDiT, branches: list["Condition | list[Condition]"],
                    combine: Callable[[list[torch.Tensor]], torch.Tensor],
                    batch: int, rows: int, cols: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """velocity(x, t) for `flow.denoise`: the guided velocity of x (batch, rows*cols, 16) at time t.

    A branch is one Condition shared by all `batch` images (one prompt, several seeds), or a list of `batch`
    Conditions, one per image (different prompts or edit images in one call; see `Ovis.text_to_images`).
    Everything that does not change with the step is done here, once: the CLS vectors, the RoPE tables, and
    the batching of the branches. Branches that see the same image tokens run as ONE decoder call, their
    texts right-padded to the longest and masked as keys: the two T2I branches are one call. Editing makes
    two calls, (cond, no-text) with the edit image and no-both without it: putting no-both in the same batch
    would spend its compute on as many masked dummy image tokens as the image has.
    """
    def per_image(branch) -> list[Condition]:
        return branch if isinstance(branch, list) else [branch] * batch

    groups = []  # (branch indices, txt (G*B, L, H), txt_vec (G*B, H), cond_img, rope tables, key_mask)
    for has_cond in (True, False):
        members = [i for i, branch in enumerate(branches) if (per_image(branch)[0].cond_img is not None) == has_cond]
        if not members:
            continue
        # row g*batch + j of the decoder call is branch g, image j
        row_conditions = [c for i in members for c in per_image(branches[i])]
        lengths = [c.tokens.shape[1] for c in row_conditions]
        L = max(lengths)
        tokens = torch.cat([F.pad(c.tokens, (0, 0, 0, L - n)) for c, n in zip(row_conditions, lengths)])
        # vector_in once per distinct condition: a prompt shared by several images is embedded once
        distinct = list({id(c): c for c in row_conditions}.values())
        vectors = decoder.text_vector(torch.cat([c.cls for c in distinct]))  # (U, H)
        row_of = {id(c): k for k, c in enumerate(distinct)}
        txt_vec = vectors[[row_of[id(c)] for c in row_conditions]]  # (G*B, H)
        device = tokens.device
        ids = flow.sequence_position_ids(L, rows, cols, edit_image=has_cond, device=device)  # (1, S, 3)
        rope = decoder.rope(ids)  # (cos, sin) float32, (1, 1, S, hs)
        cond_img = torch.cat([c.cond_img for c in row_conditions]) if has_cond else None
        key_mask = None
        if min(lengths) < L:  # (G*B, S): the padded text positions are not keys
            key_mask = torch.ones(len(row_conditions), rope[0].shape[2], dtype=torch.bool, device=device)
            for row, n in enumerate(lengths):
                key_mask[row, n:L] = False
        groups.append((members, tokens, txt_vec, cond_img, rope, key_mask))

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        outputs = [None] * len(branches)
        for members, tokens, txt_vec, cond_img, rope, key_mask in groups:
            t_vec = torch.full((tokens.shape[0],), t, dtype=x.dtype, device=x.device)
            v = decoder.predict_velocity(x.repeat(len(members), 1, 1), tokens, txt_vec, rope, t_vec,
                                         cond_img=cond_img, key_mask=key_mask)  # (G*batch, N, 16)
            for i, branch_v in zip(members, v.split(batch)):
                outputs[i] = branch_v
        return combine(outputs)

    return velocity


@torch.no_grad()
def sample_latents(decoder: MMDiT, noise: torch.Tensor, timesteps: list[float], branches: list,
                   combine: Callable[[list[torch.Tensor]], torch.Tensor], progress: Progress = None) -> torch.Tensor:
    """Euler-integrate the guided velocity from `noise` (B, 4, h, w) over `timesteps`; returns (B, N, 16) tokens.

    Each step evaluates every guidance branch (batched, see `guided_velocity`) and `combine`s their velocities
    (text guidance for T2I, image + text guidance for editing). `denoise_one_image` is the same loop for one
    image, written plainly; the tests hold this one to it.
    """
    batch, _, h, w = noise.shape
    velocity = guided_velocity(decoder, branches, combine, batch, h // 2, w // 2)
    return flow.denoise(velocity, flow.pack_latents(noise), timesteps, progress=progress)


def compile_decoder_blocks(decoder: MMDiT) -> None:
    """torch.compile each double- and single-stream block of the image decoder in place: they run once per step
    and guidance branch, and compiling fuses the element-wise work (norms, modulation, RoPE, gates) around the
    matmuls."""
    # Every (batch, text padding or not, image size) a block sees is one compilation of its forward; past torch's
    # default of 8 per function it would quietly run uncompiled. This raises a process-wide dynamo setting, which
    # is why only a caller that asked for compilation (Ovis.compile, bench.py --compile) gets here.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in (*decoder.double_blocks, *decoder.single_blocks):
        block.compile()


class Ovis:
    """The pipeline: an OvisU1 model and its tokenizer, run as `answer`, `text_to_image` and `edit`."""

    def __init__(self, model: OvisU1, tokenizer: Tokenizer, model_id: str = "",
                 device: torch.device | str | None = None, offload: bool = False):
        """`device`: where the computation runs (default: where the model is). `offload`: the model stays in CPU
        memory and each of OFFLOAD_GROUPS is moved to `device` only while it runs."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device) if device is not None else model.device
        self.offload = offload
        self.decode_step = None  # the LLM's one-token step, replaced by a compiled one in compile()

    @classmethod
    def from_pretrained(cls, source: str | Path = DEFAULT_REPO, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16, offload: bool = False, download: bool = True,
                        revision: str = "main") -> "Ovis":
        """The official checkpoint from a directory or a hub id (Hugging Face cache, downloaded if missing)."""
        directory = resolve_source(source, revision=revision, download=download)
        loaded = load_model(directory, dtype=dtype, device="cpu" if offload else device)
        return cls(loaded.model, loaded.tokenizer, str(source), device=device, offload=offload)

    def use(self, group: str) -> None:
        """With offload, bring `group`'s modules (OFFLOAD_GROUPS) to the device and send the others to the CPU."""
        if not self.offload:
            return
        for name, modules in OFFLOAD_GROUPS.items():  # free the device first, so two groups never sit on it together
            if name != group:
                for module in modules:
                    self.model.get_submodule(module).to("cpu")
        for module in OFFLOAD_GROUPS[group]:
            self.model.get_submodule(module).to(self.device)

    def compile(self) -> None:
        """torch.compile what runs many times: each image decoder block (`compile_decoder_blocks`, once per step
        and guidance branch) and the LLM's one-token decode step (`decode.compile_decode_step`). The first call
        of each shape pays the compilation."""
        compile_decoder_blocks(self.model.visual_generator.backbone)
        self.decode_step = compile_decode_step(self.model.llm, self.device)

    @property
    def config(self):
        return self.model.config

    # -- understanding ------------------------------------------------------------------------------------------
    def prepare_prompts(self, prompts: list[str], images: list[list[Image.Image]], generation_preface: str | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Left-padded (B, L) ids and mask, and all images of the batch packed in one (N, D) tensor."""
        rows, pixels, grids = [], [], []
        for prompt, row_images in zip(prompts, images):
            ids, _, pixel_values, grid_thws = preprocess_inputs(
                self.tokenizer, prompt, [load_image(im) for im in row_images], self.config.preprocess,
                generation_preface=generation_preface, max_length=self.config.multimodal_max_length)
            rows.append(ids)
            if pixel_values is not None:
                pixels.append(pixel_values)
                grids.append(grid_thws)
        pad = self.tokenizer.pad_token_id
        input_ids = pad_rows(rows, pad, left_padding=True)
        attention_mask = input_ids != pad  # the negative image placeholders count as real tokens
        if not pixels:
            return input_ids, attention_mask, None, None
        return input_ids, attention_mask, torch.cat(pixels), torch.cat(grids)

    @torch.no_grad()
    def answer(self, questions: str | list[str], images=None, max_new_tokens: int = 512,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               on_text: Callable[[str], None] | None = None,
               on_token: Callable[[int], None] | None = None) -> str | list[str]:
        """Answer one question (str) or a batch (list). `images`: for one question a list of images (paths or
        PIL), for a batch a list of such lists. Without an `<image>` marker in the question, one is put in front
        of it per image, as the official scripts do. Greedy when temperature is 0.
        `on_text(piece)` streams the text of the first row as it is generated; `on_token(id)` gets each token id
        of the first row (its end-of-turn token included, e.g. to count tokens per second)."""
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        images = [images or []] if single else [row or [] for row in (images or [[]] * len(questions))]
        if len(images) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(images)} image lists")
        streamer = TextStreamer(self.tokenizer, on_text) if on_text else None

        def push(step_ids: torch.Tensor) -> None:  # (B,) the ids of one decoding step
            if streamer:
                streamer.push(step_ids)
            if on_token:
                on_token(int(step_ids[0]))
        new_ids = self.answer_ids(questions, images, max_new_tokens, temperature, top_p, seed,
                                  on_step=push if streamer or on_token else None)
        if streamer:
            streamer.flush()
        answers = [self.decode_answer(row)[0] for row in new_ids]
        return answers[0] if single else answers

    @torch.no_grad()
    def answer_ids(self, questions: list[str], images: list[list], max_new_tokens: int = 512,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   on_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """The new token ids (B, T) of a batch of questions, left-padded in one LLM pass; finished rows hold
        pad ids. `on_step(ids)` gets each step's (B,) ids."""
        prompts = [question_prompt(q, len(im)) for q, im in zip(questions, images)]
        input_ids, attention_mask, pixel_values, grid_thws = self.prepare_prompts(prompts, images, "")
        self.use("condition")
        merged = self.model.merge_inputs(input_ids, attention_mask, pixel_values, grid_thws, left_padding=True)
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        new_ids = generate(
            self.model.llm, merged.embeds, merged.attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            temperature=temperature, top_p=top_p, generator=generator, on_token=on_step, step=self.decode_step)
        if self.offload:  # the KV cache would otherwise travel with the LLM at every stage switch
            self.model.llm.free_cache()
        return new_ids

    def decode_answer(self, row_ids: torch.Tensor) -> tuple[str, int]:
        """(text, number of generated tokens, its end-of-turn token included) of one row of `answer_ids`."""
        ids = [t for t in row_ids.tolist() if t != self.tokenizer.pad_token_id]
        return self.tokenizer.decode(ids), len(ids)

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, prompt: str, image: Image.Image, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt (1, L, 2*D_llm), VAE pixels (1, 3, H, W)) of one guidance branch, as the official `build_inputs`."""
        encoder_image, vae_pixels = condition_images(image, height, width, self.config.preprocess)
        input_ids, _, pixel_values, grid_thws = preprocess_inputs(
            self.tokenizer, prompt, [encoder_image], self.config.preprocess, generation_preface=None,
            max_length=self.config.multimodal_max_length)
        input_ids = input_ids[None]
        txt, _ = self.model.generation_condition(input_ids, input_ids != self.tokenizer.pad_token_id,
                                                 pixel_values, grid_thws)
        return txt, vae_pixels[None]

    def refine(self, txt: torch.Tensor, cond_img: torch.Tensor | None = None) -> Condition:
        tokens, cls = self.model.visual_generator.backbone.encode_text(txt)
        return Condition(tokens, cls, cond_img)

    def initial_noise(self, num_images: int, height: int, width: int, seed: int) -> torch.Tensor:
        return flow.initial_noise(num_images, height, width, seed=seed, device=self.device,
                                  dtype=self.model.dtype)

    def seeded_noise(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """(B, 4, h, w): image i's noise from seeds[i], as a batch of one of that seed would start."""
        return torch.cat([self.initial_noise(1, height, width, seed) for seed in seeds])

    def schedule(self, steps: int, height: int, width: int) -> list[float]:
        mm = self.config.mmdit
        return flow.time_schedule(steps, (height // 16) * (width // 16), shift=mm.timestep_shift,
                                  base_shift=mm.base_shift, max_shift=mm.max_shift)

    @torch.no_grad()
    def text_to_image(self, prompt: str, width: int = 1024, height: int = 1024, steps: int = 50,
                      txt_cfg: float = 5.0, seed: int = 42, num_images: int = 1,
                      progress: Progress = None) -> list[Image.Image]:
        height, width = check_size(height, width)
        return self.generate_t2i([prompt], self.initial_noise(num_images, height, width, seed), height, width, steps,
                                 txt_cfg, progress)

    @torch.no_grad()
    def text_to_images(self, prompts: list[str], seeds: list[int], width: int = 1024, height: int = 1024,
                       steps: int = 50, txt_cfg: float = 5.0, progress: Progress = None) -> list[Image.Image]:
        """One image per prompt, all in one decoder call per step; image i starts from the noise of seeds[i].

        Each image is what `text_to_image(prompts[i], seed=seeds[i])` makes, up to float rounding (the texts
        are padded to the longest and masked); a batch of one is the same computation, byte for byte."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        height, width = check_size(height, width)
        return self.generate_t2i(prompts, self.seeded_noise(seeds, height, width), height, width, steps, txt_cfg,
                                 progress)

    def generate_t2i(self, prompts: list[str], noise: torch.Tensor, height: int, width: int, steps: int,
                     txt_cfg: float, progress: Progress) -> list[Image.Image]:
        """The images of `noise` (B, 4, h, w) with text guidance: one prompt per image, or one for all of them."""
        conds, uncond = self.t2i_branches(prompts, height, width)
        return self.sample_images([one_or_each(conds), uncond], lambda v: flow.text_guidance(v[0], v[1], txt_cfg),
                                  noise, height, width, steps, progress)

    def t2i_branches(self, prompts: list[str], height: int, width: int) -> tuple[list[Condition], Condition]:
        """The refined conditions of each prompt, and the unconditional one they all share."""
        blank = blank_image(width, height)
        self.use("condition")
        cond_txts = [self.condition(t2i_prompt(prompt), blank, height, width)[0] for prompt in prompts]
        uncond_txt, _ = self.condition(UNCONDITIONAL_PROMPT, blank, height, width)
        # The official script also VAE-encodes the blank image here and never uses the result: skipped.
        self.use("decoder")
        return [self.refine(txt) for txt in cond_txts], self.refine(uncond_txt)

    @torch.no_grad()
    def edit(self, image, instruction: str, steps: int = 50, txt_cfg: float = 6.0, img_cfg: float = 1.5,
             seed: int = 42, num_images: int = 1, width: int | None = None, height: int | None = None,
             progress: Progress = None) -> list[Image.Image]:
        """Edit `image` following `instruction`. The output size is the input size rounded to multiples of 32
        (the official edit script's smart_resize), unless width/height are given."""
        images, height, width = self.edit_inputs([image], width, height)
        return self.generate_edits(images, [instruction], [seed], self.initial_noise(num_images, height, width, seed),
                                   height, width, steps, txt_cfg, img_cfg, progress)

    @torch.no_grad()
    def edit_images(self, images: list, instructions: list[str], seeds: list[int], steps: int = 50,
                    txt_cfg: float = 6.0, img_cfg: float = 1.5, width: int | None = None, height: int | None = None,
                    progress: Progress = None) -> list[Image.Image]:
        """Several edits in one decoder call per branch group and step: image i follows instructions[i] from the
        noise (and VAE posterior sample) of seeds[i], as `edit(images[i], instructions[i], seed=seeds[i])` does up
        to float rounding. All images must come out at one size (the same edit size, or width/height given)."""
        if not len(images) == len(instructions) == len(seeds):
            raise ValueError(f"got {len(images)} images, {len(instructions)} instructions and {len(seeds)} seeds")
        images, height, width = self.edit_inputs(images, width, height)
        return self.generate_edits(images, instructions, seeds, self.seeded_noise(seeds, height, width), height,
                                   width, steps, txt_cfg, img_cfg, progress)

    def generate_edits(self, images: list[Image.Image], instructions: list[str], seeds: list[int],
                       noise: torch.Tensor, height: int, width: int, steps: int, txt_cfg: float, img_cfg: float,
                       progress: Progress) -> list[Image.Image]:
        """The edits of `noise` (B, 4, h, w) with image and text guidance: one (image, instruction, seed) per
        output image, or one for all of them."""
        conds, no_txts, no_both = self.edit_branches(images, instructions, seeds, height, width)
        return self.sample_images([one_or_each(conds), one_or_each(no_txts), no_both],
                                  lambda v: flow.edit_guidance(v[0], v[1], v[2], img_cfg, txt_cfg),
                                  noise, height, width, steps, progress)

    def edit_inputs(self, images: list, width: int | None, height: int | None
                    ) -> tuple[list[Image.Image], int, int]:
        """The loaded images and the one (height, width) they are edited at."""
        images = [load_image(image) for image in images]
        if width is None or height is None:
            sizes = {edit_target_size(image.width, image.height) for image in images}
            if len(sizes) > 1:
                raise ValueError(f"edits of different sizes cannot share a batch: {sorted(sizes)}")
            (width, height), = sizes
            images = [resize_for_edit(image) for image in images]
        height, width = check_size(height, width)
        return images, height, width

    def edit_branches(self, images: list[Image.Image], instructions: list[str], seeds: list[int], height: int,
                      width: int) -> tuple[list[Condition], list[Condition], Condition]:
        """Per image the cond and no-text conditions (both see its VAE tokens), and the shared no-both one."""
        self.use("condition")
        cond_txts, no_txt_txts, vae_pixels = [], [], []
        for image, instruction in zip(images, instructions):
            cond_txt, pixels = self.condition(edit_prompt(instruction), image, height, width)
            cond_txts.append(cond_txt)
            no_txt_txts.append(self.condition(UNCONDITIONAL_PROMPT, image, height, width)[0])
            vae_pixels.append(pixels)
        no_both_txt, _ = self.condition(UNCONDITIONAL_PROMPT, blank_image(width, height), height, width)
        self.use("vae")
        # each edit samples the VAE posterior from its own seed, as it does alone
        image_tokens = [encode_image_tokens(self.model.visual_generator.vae, pixels,
                                            generator=torch.Generator(self.device).manual_seed(seed))
                        for pixels, seed in zip(vae_pixels, seeds)]
        self.use("decoder")
        return ([self.refine(txt, tokens) for txt, tokens in zip(cond_txts, image_tokens)],
                [self.refine(txt, tokens) for txt, tokens in zip(no_txt_txts, image_tokens)],
                self.refine(no_both_txt))

    def sample_images(self, branches: list, combine: Callable[[list[torch.Tensor]], torch.Tensor],
                      noise: torch.Tensor, height: int, width: int, steps: int,
                      progress: Progress) -> list[Image.Image]:
        """The part T2I and editing share: the guided Euler loop from `noise` (image decoder), VAE decode."""
        tokens = sample_latents(self.model.visual_generator.backbone, noise, self.schedule(steps, height, width),
                                branches, combine, progress)
        self.use("vae")
        pixels = decode_image_tokens(self.model.visual_generator.vae, tokens, height, width)  # (B, 3, H, W)
        if not torch.isfinite(pixels).all():  # the uint8 conversion would turn them into a black image
            raise NonFiniteError("the generated image is NaN or infinite")
        return to_pil(pixels)


MIN_SIZE = 32  # pixels per side: at least 2x2 packed latent tokens (one token covers 16x16 pixels)
MAX_SIZE = 4096  # pixels per side: 16x the tokens of the 1024x1024 the model was trained for, already far off it


def check_size(height: int, width: int, minimum: int = MIN_SIZE) -> tuple[int, int]:
    if height < minimum or width < minimum:
        raise ValueError(f"image size {width}x{height} is too small: width and height must be at least {minimum}")
    if height > MAX_SIZE or width > MAX_SIZE:
        raise ValueError(f"image size {width}x{height} is too large: width and height must be at most {MAX_SIZE}")
    return round_to_16(height), round_to_16(width)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) pixels -> PIL images, with the official clamp and truncating uint8 conversion."""
    return [Image.fromarray(array) for array in to_uint8(pixels).cpu().numpy()]


class TextStreamer:
    """Turns generated token ids into text pieces as soon as they decode to whole characters."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.printed = 0

    def push(self, step_ids: torch.Tensor):
        token = int(step_ids[0])
        if token in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            self.on_text(text[self.printed:])
            self.printed = len(text)

    def flush(self):
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
        self.printed = len(text)
