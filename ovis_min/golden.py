"""Golden cases from any checkpoint: the reference a port (NumPy, JAX, MLX, ...) is checked against.

`python weights.py golden --weights DIR --out OUT` runs ovis-min on inputs made here (drawn test images, the
prompts of the official test scripts, the checkpoint's own preprocessing sizes) and writes every case of
tests/golden/ in its format: `X.json` + `X.safetensors` with `in.<name>` inputs and `out.<name>` outputs, plus
the weights (`model.safetensors`, official names, the lm_head stored too), `config.json` and `tokenizer/`. So
`OVIS_GOLDEN_DIR=OUT python -m pytest tests/test_golden.py` checks ovis-min against it, and a port checks itself
the same way, at full size and in bf16 when the official checkpoint is exported on a GPU.

Beyond the shared set, the cases hold what a porter checks one block at a time with: the adapter's input
(`visual_tokenizer` in.adapter_input), the timestep embedding and every block's output (`mmdit_*`), the latent
entering each Euler step and its guided velocity (`sampler_*` step{i}.*), and the VAE decoder's input (`e2e_*`).
Noise and VAE samples are drawn by CPU generators, so an export on a GPU starts from the same numbers.
"""
import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from . import flow
from .checkpoint import CONFIG_FILE, PREPROCESSOR_FILE, load_model
from .config import PreprocessConfig
from .files import default_mode, temp_prefix, write_atomic
from .decode import generate
from .mmdit import timestep_embedding
from .model import decode_image_tokens, encode_posterior
from .pipeline import Condition, Ovis, guided_velocity
from .preprocess import (blank_image, condition_images, edit_target_size, load_image, preprocess_image,
                         preprocess_images, resize_for_edit, smart_resize)
from .prompt import (SLOW_TOKENIZER_EXTRAS, SLOW_TOKENIZER_FILES, TOKENIZER_FILE, UNCONDITIONAL_PROMPT,
                     build_input_ids, edit_prompt, preprocess_inputs, t2i_prompt, turn_texts, understanding_prompt)
from .vae import AutoencoderKL, to_uint8
from .vit import VisionEncoder, rope_angles, window_table

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
SEED = 42  # the official scripts' seed
TIMESTEPS = (0.83, 0.25)  # the two times of the single-call decoder cases
MAX_NEW_TOKENS = 8
T2I_CAPTION = "a red fox sitting in the snow"
EDIT_INSTRUCTION = "add a hat to the fox"
QUESTION = "What is it?"


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with the golden checks
# ---------------------------------------------------------------------------------------------------------------

@contextmanager
def recording(modules: dict[str, nn.Module], inputs: bool = False):
    """Record what each named module returns (or, with `inputs`, the positional arguments it is called with)
    during the `with` body: yields the dict that fills with name -> output (or argument tuple)."""
    seen, handles = {}, []
    for name, module in modules.items():
        def record(module, args, output=None, name=name):
            seen[name] = args if inputs else output
        handles.append(module.register_forward_pre_hook(record) if inputs else module.register_forward_hook(record))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def window_partition(grid_thws: torch.Tensor, window_units: int,
                     hidden_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official window order of the merged units and its cumulative window lengths in patches, from the
    encoder's own `window_table`.

    Returns `window_index` (N/s^2,), the unit at each window-ordered position, and `cu_seqlens` with one entry
    per window including the empty padding windows (so boundaries repeat). The encoder itself uses the same
    windows but sorts them by size within each frame (see `vit.vision_layout`).
    """
    units = hidden_stride * hidden_stride
    window_index, cu_seqlens, offset = [], [0], 0
    for t, h, w in grid_thws.tolist():
        table = window_table(t, h // hidden_stride, w // hidden_stride, window_units)
        window_index.append(table[table >= 0] + offset)
        for length in ((table >= 0).sum(-1).flatten() * units).tolist():
            cu_seqlens.append(cu_seqlens[-1] + length)
        offset += t * (h // hidden_stride) * (w // hidden_stride)
    return torch.cat(window_index), torch.tensor(cu_seqlens, dtype=torch.long)


def sample_with_steps(decoder: nn.Module, noise: torch.Tensor, timesteps: list[float], branches: list, combine
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`pipeline.sample_latents`, also returning (latent entering step i, its guided velocity) for every step."""
    batch, _, h, w = noise.shape
    velocity = guided_velocity(decoder, branches, combine, batch, h // 2, w // 2)
    steps = []

    def recorded(x: torch.Tensor, t: float) -> torch.Tensor:
        v = velocity(x, t)
        steps.append((x, v))
        return v
    return flow.denoise(recorded, flow.pack_latents(noise), timesteps), steps


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The MMDiT's (cos, sin) tables (B, 1, S, D) -> the official `pe` form (B, 1, S, D/2, 2, 2), one rotation
    matrix [[cos, -sin], [sin, cos]] per adjacent channel pair."""
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([c, -s, s, c], dim=-1).unflatten(-1, (2, 2))


def drawn_image(width: int, height: int, variant: int) -> Image.Image:
    """A deterministic RGB picture (gradients, a disc, stripes) drawn with integer arithmetic, so it is the same
    on every machine: realistic enough that every preprocessing step (resizing, cropping) changes it."""
    y, x = np.mgrid[0:height, 0:width]
    red = x * 255 // max(width - 1, 1)
    green = y * 255 // max(height - 1, 1)
    blue = ((x // (4 + variant) + y // 6) % 2) * 180 + 40
    disc = (2 * x - width) ** 2 + (2 * y - height) ** 2 < (min(width, height) * (3 + variant) // 6) ** 2
    pixels = np.stack([np.where(disc, 250 - variant * 60, red), np.where(disc, 40 + variant * 50, green),
                       np.where(disc, 30, blue)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------

class CaseWriter:
    """Writes `name.json` + `name.safetensors`; float tensors are stored as float32 (a bf16 value is exact in it)."""

    def __init__(self, out: Path, common: dict):
        self.out = out
        self.common = common
        self.written: list[str] = []

    @staticmethod
    def cpu(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to("cpu")
        # a copy of its own: one output can be a view of another (or a tied weight the same tensor), and
        # safetensors refuses shared storage
        return (tensor.float() if tensor.is_floating_point() else tensor).clone(memory_format=torch.contiguous_format)

    def write(self, name: str, kind: str, meta: dict, inputs: dict, outputs: dict) -> None:
        inputs = {k: self.cpu(v) for k, v in inputs.items()}
        outputs = {k: self.cpu(v) for k, v in outputs.items()}
        describe = lambda tensors: {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                                    for k, v in tensors.items()}
        meta = {**self.common, **meta, "case": kind, "inputs": describe(inputs), "outputs": describe(outputs),
                "files": {"tensors": f"{name}.safetensors"}}
        save_tensors({**{f"in.{k}": v for k, v in inputs.items()}, **{f"out.{k}": v for k, v in outputs.items()}},
                     self.out / f"{name}.safetensors")
        write_atomic(self.out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
        self.written.append(name)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temp = path.with_name(f"{temp_prefix()}{path.name}.part")
    try:
        save_file(tensors, str(temp), metadata={"format": "pt"})
        os.chmod(temp, default_mode())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_reference_files(model: nn.Module, checkpoint: Path, out: Path) -> None:
    """The weights the outputs were computed with in one float32 file (official names, tied tensors under each
    name; a bf16 value is exact in float32, and NumPy has no bf16), the checkpoint's config.json, and its
    tokenizer with preprocessor_config.json in tokenizer/."""
    state = {name: CaseWriter.cpu(tensor) for name, tensor in model.state_dict().items()}
    save_tensors(state, out / WEIGHTS_FILE)
    shutil.copyfile(checkpoint / CONFIG_FILE, out / CONFIG_FILE)
    (out / TOKENIZER_DIR).mkdir(exist_ok=True)
    for file in (TOKENIZER_FILE, *SLOW_TOKENIZER_FILES, *SLOW_TOKENIZER_EXTRAS, PREPROCESSOR_FILE):
        if (checkpoint / file).is_file():
            shutil.copyfile(checkpoint / file, out / TOKENIZER_DIR / file)


# ---------------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------------

class Exporter:
    def __init__(self, ovis: Ovis, writer: CaseWriter, images: dict[str, Image.Image], height: int, width: int,
                 steps: int):
        self.ovis, self.model, self.config = ovis, ovis.model, ovis.config
        self.writer, self.images = writer, images
        self.height, self.width, self.steps = height, width, steps
        self.device, self.dtype = ovis.device, ovis.model.dtype

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)

    def two_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        return preprocess_images([self.images["image0.png"], self.images["image1.png"]], self.config.preprocess)

    # -- encoder side ----------------------------------------------------------------------------------------
    def vit(self):
        cfg = self.config.vit
        pixel_values, grid_thws = self.two_images()
        outputs = {}
        for method in ("one_dim", "two_dim"):
            encoder = VisionEncoder(dataclasses.replace(cfg, interpolate_pe_method=method)).eval()
            encoder.load_state_dict(self.model.visual_tokenizer.backbone.state_dict())
            encoder = encoder.to(self.device, self.dtype)
            pixels = self.on_device(pixel_values)
            outputs[f"{method}.preprocessor_out"] = encoder.preprocessor(pixels, encoder.layout(grid_thws))
            result = encoder(pixels, grid_thws, all_hidden_states=True)
            for i, hidden in enumerate(result.hidden_states):
                outputs[f"{method}.hidden_states.{i}"] = hidden
            outputs[f"{method}.last_hidden_state"] = result.last_hidden_state
        outputs["rot_pos_emb"] = rope_angles(grid_thws, cfg.hidden_size // cfg.num_heads, cfg.hidden_stride)
        outputs["window_index"], outputs["cu_window_seqlens_raw"] = window_partition(
            grid_thws, cfg.window_size // cfg.hidden_stride // cfg.patch_size, cfg.hidden_stride)
        self.writer.write("vit", "vit", {
            "description": "The visual encoder (vit.py) on image0.png and image1.png packed: every block's output "
                           "(hidden_states.i, input order, no post norm) and last_hidden_state, for both position "
                           "table interpolations; RoPE angles and the window partition.",
            "weight_keys_prefix": "visual_tokenizer.backbone."},
            {"pixel_values": pixel_values, "grid_thws": grid_thws}, outputs)

    def visual_tokenizer(self):
        pixel_values, grid_thws = self.two_images()
        features = self.model.visual_tokenizer.backbone(self.on_device(pixel_values), grid_thws).last_block
        tokens = self.model.visual_tokenizer.head.tokenize(features)
        self.writer.write("visual_tokenizer", "visual_tokenizer", {
            "description": "The adapter (adapter.py) on the encoder's last block output (in.adapter_input, before "
                           "the post norm): 2x2 merged features, head logits, probabilities with the indicator "
                           "columns, their visual embeddings, and the indicator embeddings.",
            "weight_keys_prefix": "visual_tokenizer., vte."},
            {"pixel_values": pixel_values, "grid_thws": grid_thws, "adapter_input": features},
            {"features": tokens.features, "logits": tokens.logits, "tokens": tokens.probs,
             "vte_embeds": self.model.vte(tokens.probs), "indicator_embeds": self.model.vte.indicator_embeds()})

    def preprocess(self):
        cfg, tokenizer = self.config.preprocess, self.ovis.tokenizer
        factor = cfg.patch_size * cfg.hidden_stride
        names = ["image0.png", "image1.png", "image2.png"]
        outputs, images = {}, []
        for k, name in enumerate(names):
            image = self.images[name]
            images.append({"file": name, "size_wh": [image.width, image.height], "placeholders": [-301, -300, -302],
                           "smart_resize_hw": list(smart_resize(image.height, image.width, factor, cfg.min_pixels,
                                                                cfg.max_pixels))})
            outputs[f"img{k}.pixel_values"], outputs[f"img{k}.grid_thws"] = preprocess_image(image, cfg)
        conversation = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "It is a fox."}]
        prompts = {"und_single": ("<image>\n" + QUESTION, [names[0]], ""),
                   "und_multi": ("<image>\n<image>\nCompare the two images.", names[1:], ""),
                   "gen_t2i": (UNCONDITIONAL_PROMPT, [names[0]], None),
                   "text_only": ("Hello there.", [], ""),
                   "conv_answer": (conversation, [names[0]], None)}
        specs = {}
        for name, (text, files, preface) in prompts.items():
            input_ids, labels = build_input_ids(tokenizer, text, preface)
            specs[name] = {"conversations" if isinstance(text, list) else "text": text, "images": files,
                           "generation_preface": preface,
                           "formatted_prompt": "".join(t for _, t in turn_texts(text, preface, enable_thinking=False)),
                           "input_ids": input_ids.tolist(), "labels": labels.tolist()}
            outputs[f"{name}.input_ids"], outputs[f"{name}.labels"] = input_ids, labels
            if files:
                outputs[f"{name}.pixel_values"], outputs[f"{name}.grid_thws"] = preprocess_images(
                    [self.images[f] for f in files], cfg)
        full = PreprocessConfig()
        outputs["fullconst.pixel_values"], outputs["fullconst.grid_thws"] = preprocess_image(self.images[names[1]],
                                                                                            full)
        source = self.images[names[2]]
        width, height = edit_target_size(source.width, source.height)
        und_image, vae_pixels = condition_images(resize_for_edit(source), height, width, cfg)
        outputs["genprep.vae_pixel_values"] = vae_pixels
        outputs["genprep.cond_img_ids_before_time"] = flow.latent_position_ids(height // 16, width // 16)[0]
        self.writer.write("preprocess", "preprocess", {
            "description": "Image preprocessing (preprocess.py) and prompt ids/labels (prompt.py) with the "
                           "checkpoint's tokenizer and preprocessor_config.json (in tokenizer/). 'fullconst.*' = "
                           f"the same preprocessing with the full-size constants (patch {full.patch_size}, stride "
                           f"{full.hidden_stride}, min_pixels {full.min_pixels}, max_pixels {full.max_pixels}) on "
                           f"{names[1]}. 'genprep.*' = the generation-side image prep of the official edit script.",
            "images": images, "prompts": specs,
            "genprep": {"source": names[2], "edit_target_hw(smart_resize factor=32, default min/max)": [height, width],
                        "understanding_resize_hw(smart_resize factor=28, max_pixels=min_pixels)":
                            [und_image.height, und_image.width]},
            "tokenizer_len": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id}, {}, outputs)

    def llm(self):
        tokenizer, llm = self.ovis.tokenizer, self.model.llm
        rows = [build_input_ids(tokenizer, text, "")[0] for text in ("Hello there, how are you?", "Hi.")]
        longest = max(len(r) for r in rows)
        input_ids = torch.stack([torch.cat([r.new_full((longest - len(r),), tokenizer.pad_token_id), r]) for r in rows])
        attention_mask = input_ids != tokenizer.pad_token_id  # row 1 is left-padded
        inputs_embeds = llm.model.embed_tokens(input_ids.to(self.device))
        outputs = {}
        for source, given in {"ids": dict(input_ids=input_ids.to(self.device)),
                              "embeds": dict(inputs_embeds=inputs_embeds)}.items():
            mask = attention_mask.to(self.device)
            outputs[f"{source}_logits"] = llm(**given, attention_mask=mask)
            for i, state in enumerate(llm.hidden_states(**given, attention_mask=mask)):
                outputs[f"{source}_hidden_states.{i}"] = state
        self.writer.write("llm", "llm", {
            "description": "The Qwen3 decoder (llm.py) from input_ids and from inputs_embeds (the token embeddings), "
                           "row 1 left-padded, positions 0..L-1 for every row: logits and all hidden states "
                           "(hidden_states.0 = embeddings, the last one after the final norm). Compare only where "
                           "attention_mask is True.",
            "weight_keys_prefix": "llm.", "compare_mask_input": "attention_mask"},
            {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}, outputs)

    def merge(self):
        cfg, tokenizer = self.config.preprocess, self.ovis.tokenizer
        rows = [("<image>\n" + QUESTION, ["image0.png"]), ("<image>\n<image>\nCompare.", ["image1.png", "image2.png"])]
        ids, pixels, grids = [], [], []
        for text, files in rows:
            row_ids, _, pixel_values, grid_thws = preprocess_inputs(tokenizer, text, [self.images[f] for f in files],
                                                                    cfg)
            ids.append(row_ids)
            pixels.append(pixel_values)
            grids.append(grid_thws)
        longest = max(len(r) for r in ids)
        input_ids = torch.stack([torch.cat([r, r.new_full((longest - len(r),), tokenizer.pad_token_id)]) for r in ids])
        attention_mask = input_ids != tokenizer.pad_token_id
        pixel_values, grid_thws = torch.cat(pixels), torch.cat(grids)
        outputs = {}
        for side, left in (("left", True), ("right", False)):
            merged = self.model.merge_inputs(input_ids, attention_mask, pixel_values, grid_thws, left_padding=left)
            outputs.update({f"{side}.inputs_embeds": merged.embeds, f"{side}.attention_mask": merged.attention_mask,
                            f"{side}.labels": merged.labels, f"{side}.input_img_labels": merged.image_mask})
        self.writer.write("merge", "merge", {
            "description": "merge_inputs (model.py) on a 2-row batch (1 image, then 2), left and right padding.",
            "weight_keys_prefix": "llm.model.embed_tokens., visual_tokenizer., vte."},
            {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
             "grid_thws": grid_thws}, outputs)

    def understanding(self):
        tokenizer = self.ovis.tokenizer
        prompt = understanding_prompt(QUESTION)
        ids, _, pixel_values, grid_thws = preprocess_inputs(tokenizer, prompt, [self.images["image0.png"]],
                                                            self.config.preprocess)
        input_ids, attention_mask = ids[None], torch.ones(1, len(ids), dtype=torch.bool)
        merged = self.model.merge_inputs(input_ids, attention_mask, pixel_values, grid_thws)
        outputs = {"merged_inputs_embeds": merged.embeds, "merged_attention_mask": merged.attention_mask,
                   "prompt_logits": self.model.llm(inputs_embeds=merged.embeds, attention_mask=merged.attention_mask)}
        for name, eos in (("generated_ids", tokenizer.eos_token_id), ("generated_ids_noeos", None)):
            outputs[name] = generate(self.model.llm, merged.embeds, merged.attention_mask,
                                     max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id)
        self.writer.write("understanding", "understanding", {
            "description": "Answering as the official test_img_to_txt.py: merged prompt, its logits, greedy new "
                           "tokens (with and without stopping at the end-of-turn token).",
            "image": "image0.png", "prompt_text": "".join(t for _, t in turn_texts(prompt, "", False)),
            "max_new_tokens": MAX_NEW_TOKENS},
            {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
             "grid_thws": grid_thws}, outputs)

    # -- decoder side ----------------------------------------------------------------------------------------
    def conditions(self, image: Image.Image, prompt: str) -> torch.Tensor:
        return self.ovis.condition(prompt, image, self.height, self.width)[0]

    def text_pair(self) -> torch.Tensor:
        """(2, L, context) LLM conditions of two prompts, cut to the shorter: realistic refiner/decoder input."""
        blank = blank_image(self.width, self.height)
        a = self.conditions(blank, t2i_prompt(T2I_CAPTION))
        b = self.conditions(blank, t2i_prompt("a lighthouse at dusk"))
        length = min(a.shape[1], b.shape[1])
        return torch.cat([a[:, :length], b[:, :length]])

    def refiner(self, txt: torch.Tensor):
        refiner = self.model.visual_generator.backbone.txt_in
        first = refiner.individual_token_refiner.blocks[0]
        with recording({"c": refiner.c_embedder, "block0": first}) as outputs, \
                recording({"block0": first}, inputs=True) as inputs:
            tokens, cls = refiner(txt)
        self.writer.write("refiner", "refiner", {
            "description": "The text refiner (refiner.py) on two LLM conditions, without a mask as the official "
                           "decoder calls it: txt_fea, txt_fea_avg (the CLS output) and its internals.",
            "weight_keys_prefix": "visual_generator.backbone.txt_in."},
            {"x": txt}, {"txt_fea": tokens, "txt_fea_avg": cls, "c": outputs["c"], "x_in_with_cls": inputs["block0"][0],
                         "block0_out": outputs["block0"]})

    def edit_tokens(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """VAE tokens of pixels (B, 3, H, W), the posterior sampled with eps from a CPU generator."""
        vae = self.model.visual_generator.vae
        mean, logvar = encode_posterior(vae, pixels)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)).to(mean.device, mean.dtype)
        return flow.pack_latents(vae.to_latent_space(vae.sample_latent(mean, logvar, noise=eps)))

    def mmdit(self, txt: torch.Tensor, edit_pixels: torch.Tensor, edit: bool):
        decoder = self.model.visual_generator.backbone
        rows, cols = self.height // 16, self.width // 16
        B = txt.shape[0]
        noise = flow.initial_noise(B, self.height, self.width, seed=SEED, dtype=self.dtype)
        img, img_ids = flow.pack_latents(noise).to(self.device), flow.latent_position_ids(rows, cols, batch=B)
        txt_ids = torch.zeros(B, txt.shape[1], 3)
        t = torch.tensor(TIMESTEPS, dtype=self.dtype, device=self.device)
        inputs = {"img": img, "img_ids": img_ids, "txt": txt, "txt_ids": txt_ids, "timesteps": t}
        cond_img = cond_ids = None
        if edit:
            cond_img = self.edit_tokens(edit_pixels.expand(B, -1, -1, -1), SEED + 1)
            cond_ids = flow.latent_position_ids(rows, cols, time_index=1, batch=B)
            inputs.update(cond_img=cond_img, cond_img_ids=cond_ids)
        ids = torch.cat([txt_ids, img_ids] + ([cond_ids] if edit else []), dim=1).to(self.device)
        blocks = {f"double{i}": b for i, b in enumerate(decoder.double_blocks)}
        blocks.update({f"single{i}": b for i, b in enumerate(decoder.single_blocks)}, final=decoder.final_layer)
        tokens, cls = decoder.encode_text(txt)
        rope = decoder.rope(ids)
        with recording(blocks) as seen, recording({"final": decoder.final_layer}, inputs=True) as final_in:
            pred = decoder.predict_velocity(img, tokens, decoder.text_vector(cls), rope, t, cond_img=cond_img)
        outputs = {"pred": pred, "vec": final_in["final"][1], "intermediate.txt_fea": tokens,
                   "intermediate.txt_fea_avg": cls, "intermediate.pe": rotation_matrices(*rope),
                   "intermediate.timestep_embedding": timestep_embedding(t)}
        for i in range(len(decoder.double_blocks)):
            outputs[f"intermediate.double{i}_img"], outputs[f"intermediate.double{i}_txt"] = seen[f"double{i}"]
        for i in range(len(decoder.single_blocks)):
            outputs[f"intermediate.single{i}_out"] = seen[f"single{i}"]
        outputs["intermediate.final_layer_out"] = seen["final"]
        variant = "edit" if edit else "t2i"
        self.writer.write(f"mmdit_{variant}", "mmdit", {
            "description": "One decoder forward (mmdit.py) at two times: pred plus the modulation vector, the "
                           "refined text, the RoPE matrices (pe), the timestep embedding (before time_in), every "
                           "double block's (img, txt) and single block's output, and the final layer's output "
                           "(edit: over noise and edit-image tokens) before the split.",
            "weight_keys_prefix": "visual_generator.backbone.", "variant": variant}, inputs, outputs)

    def vae(self, pixels: torch.Tensor):
        # the plain form of the block on its own copy: the model's VAE is channels_last by now, and on small
        # random weights oneDNN's channels_last encoder is several times further from float64 (a 1e-5 there
        # grows past 1e-4 through the decoder)
        vae = AutoencoderKL(self.config.vae).eval()
        vae.load_state_dict(self.model.visual_generator.vae.state_dict())
        vae = vae.to(self.device, self.dtype)
        mean, logvar = vae.encode(pixels.to(self.dtype))
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(SEED + 2))
        sample = vae.sample_latent(mean, logvar, noise=eps.to(mean.device, mean.dtype))
        mean_tokens = flow.pack_latents(vae.to_latent_space(mean))
        decoded = decode_image_tokens(vae, mean_tokens, self.height, self.width)
        rows, cols = mean.shape[-2] // 2, mean.shape[-1] // 2
        self.writer.write("vae", "vae", {
            "description": "The VAE (vae.py): posterior of edit_input.png's pixels, a sample with the stored eps "
                           "as packed scaled tokens, the edit-image position ids, the mean's tokens, their decode "
                           "(float32 compute) and its uint8 image.",
            "weight_keys_prefix": "visual_generator.vae."},
            {"pixel_values": pixels, "eps": eps},
            {"posterior_mean": mean, "posterior_logvar": logvar,
             "sample_tokens": flow.pack_latents(vae.to_latent_space(sample)),
             "cond_ids": flow.latent_position_ids(rows, cols, time_index=1, batch=mean.shape[0]),
             "mean_tokens": mean_tokens, "decoded": decoded, "decoded_uint8_hwc": to_uint8(decoded)})

    def sample(self, branches: list[Condition], combine) -> tuple[torch.Tensor, torch.Tensor, dict, list[float]]:
        """Sampling from the seed's noise: (final tokens, noise, the per-step outputs, timesteps)."""
        noise = flow.initial_noise(1, self.height, self.width, seed=SEED, dtype=self.dtype).to(self.device)
        timesteps = self.ovis.schedule(self.steps, self.height, self.width)
        final, steps = sample_with_steps(self.model.visual_generator.backbone, noise, timesteps, branches, combine)
        outputs = {}
        for i, (x, v) in enumerate(steps):
            outputs[f"step{i}.latent_in"], outputs[f"step{i}.velocity"] = x, v
        return final, noise, outputs, timesteps

    def sampler(self, cond_txt, no_both_txt, no_txt_txt, edit_pixels, edit: bool, shift: bool):
        mm = self.config.mmdit
        decoder = self.model.visual_generator.backbone
        saved_shift, mm.timestep_shift = mm.timestep_shift, shift
        try:
            def branch(txt, cond_img=None):
                return Condition(*decoder.encode_text(txt), cond_img)
            inputs = {"cond_txt": cond_txt, "no_both_txt": no_both_txt}
            meta = {"variant": "edit" if edit else "t2i", "txt_cfg": 5.0}
            if edit:
                image_tokens = self.edit_tokens(edit_pixels, SEED + 3)
                rows, cols = self.height // 16, self.width // 16
                inputs.update(no_txt_txt=no_txt_txt, vae_pixel_values=edit_pixels, vae_cond_tokens=image_tokens,
                              vae_cond_ids=flow.latent_position_ids(rows, cols, time_index=1))
                branches = [branch(cond_txt, image_tokens), branch(no_txt_txt, image_tokens), branch(no_both_txt)]
                meta["img_cfg"] = 1.5
                combine = lambda v: flow.edit_guidance(v[0], v[1], v[2], 1.5, 5.0)  # noqa: E731
            else:
                branches = [branch(cond_txt), branch(no_both_txt)]
                combine = lambda v: flow.text_guidance(v[0], v[1], 5.0)  # noqa: E731
            final, noise, outputs, timesteps = self.sample(branches, combine)
        finally:
            mm.timestep_shift = saved_shift
        vae = self.model.visual_generator.vae
        decoded = decode_image_tokens(vae, final, self.height, self.width)
        inputs["noise"] = noise
        outputs.update(img_tokens_init=flow.pack_latents(noise),
                       img_ids=flow.latent_position_ids(self.height // 16, self.width // 16),
                       final_latent_tokens=final,
                       vae_decode_in=vae.from_latent_space(flow.unpack_latents(final.float(), self.height, self.width)),
                       decoded=decoded, image_uint8_hwc=to_uint8(decoded))
        name = f"sampler_{meta['variant']}_{'shift' if shift else 'noshift'}"
        self.writer.write(name, "sampler", {
            "description": "The Euler sampler (flow.py, pipeline.sample_latents) with guidance from given LLM "
                           "conditions: the latent entering each step (step{i}.latent_in) and its guided velocity "
                           "(step{i}.velocity), the final tokens, the VAE decoder's input (vae_decode_in = "
                           "unpacked final / scaling_factor), the decoded image and its uint8 form.",
            **meta, "timestep_shift": shift, "base_shift": mm.base_shift, "max_shift": mm.max_shift,
            "height": self.height, "width": self.width, "num_steps": self.steps, "seed": SEED,
            "timesteps": timesteps}, inputs, outputs)

    def branch_inputs(self, prompt: str, image: Image.Image, with_vae: bool) -> dict:
        """The ids and pixels of one guidance branch, as the official build_inputs makes them."""
        encoder_image, vae_pixels = condition_images(image, self.height, self.width, self.config.preprocess)
        ids, _, pixels, grids = preprocess_inputs(self.ovis.tokenizer, prompt, [encoder_image], self.config.preprocess,
                                                  generation_preface=None)
        given = {"input_ids": ids[None], "attention_mask": (ids != self.ovis.tokenizer.pad_token_id)[None],
                 "pixel_values": pixels, "grid_thws": grids}
        if with_vae:
            given["vae_pixel_values"] = vae_pixels[None]
        return given

    def finish(self, name: str, meta: dict, inputs: dict, outputs: dict, branches, combine):
        final, noise, _, timesteps = self.sample(branches, combine)
        vae = self.model.visual_generator.vae
        decoded = decode_image_tokens(vae, final, self.height, self.width)
        outputs.update(noise=noise, final_latent_tokens=final,
                       vae_decode_in=vae.from_latent_space(flow.unpack_latents(final.float(), self.height, self.width)),
                       decoded=decoded, image_uint8_hwc=to_uint8(decoded)[0])
        self.writer.write(name, name, {**meta, "uncond_prompt": UNCONDITIONAL_PROMPT, "height": self.height,
                                       "width": self.width, "num_steps": self.steps, "seed": SEED,
                                       "timestep_shift": self.config.mmdit.timestep_shift, "timesteps": timesteps},
                          inputs, outputs)

    def e2e_t2i(self):
        prompt, blank = t2i_prompt(T2I_CAPTION), blank_image(self.width, self.height)
        inputs = {f"uncond.{k}": v for k, v in self.branch_inputs(UNCONDITIONAL_PROMPT, blank, False).items()}
        inputs.update({f"cond.{k}": v for k, v in self.branch_inputs(prompt, blank, True).items()})
        cond_txt, uncond_txt = self.conditions(blank, prompt), self.conditions(blank, UNCONDITIONAL_PROMPT)
        branches = [self.ovis.refine(cond_txt), self.ovis.refine(uncond_txt)]
        self.finish("e2e_t2i", {
            "description": "Text-to-image as the official test_txt_to_img.py (blank white condition image): the "
                           "ids and pixels of both branches, their LLM conditions, the seed's noise, final tokens, "
                           "the VAE decoder's input, the decoded image and its uint8 form.",
            "prompt": prompt, "txt_cfg": 5.0, "img_cfg": 0},
            inputs, {"cond_txt": cond_txt, "no_both_cond_txt": uncond_txt}, branches,
            lambda v: flow.text_guidance(v[0], v[1], 5.0))

    def e2e_edit(self, source: Image.Image):
        prompt = edit_prompt(EDIT_INSTRUCTION)
        image, blank = resize_for_edit(source), blank_image(self.width, self.height)
        inputs = {f"no_both.{k}": v for k, v in self.branch_inputs(UNCONDITIONAL_PROMPT, blank, False).items()}
        inputs.update({f"no_txt.{k}": v for k, v in self.branch_inputs(UNCONDITIONAL_PROMPT, image, False).items()})
        inputs.update({f"cond.{k}": v for k, v in self.branch_inputs(prompt, image, True).items()})
        cond_txt, vae_pixels = self.ovis.condition(prompt, image, self.height, self.width)
        no_txt_txt = self.conditions(image, UNCONDITIONAL_PROMPT)
        no_both_txt = self.conditions(blank, UNCONDITIONAL_PROMPT)
        image_tokens = self.edit_tokens(vae_pixels.to(self.device), SEED + 4)
        inputs["vae_cond_tokens(sampled)"] = image_tokens
        branches = [self.ovis.refine(cond_txt, image_tokens), self.ovis.refine(no_txt_txt, image_tokens),
                    self.ovis.refine(no_both_txt)]
        outputs = {"cond_txt": cond_txt, "no_txt_cond_txt": no_txt_txt, "no_both_cond_txt": no_both_txt,
                   "vae_cond_ids": flow.latent_position_ids(self.height // 16, self.width // 16, time_index=1)}
        self.finish("e2e_edit", {
            "description": "Editing as the official test_img_edit.py on edit_input.png: the ids and pixels of the "
                           "three branches, their LLM conditions, the sampled VAE tokens of the input image, the "
                           "seed's noise, final tokens, the VAE decoder's input, the decoded image, uint8.",
            "prompt": prompt, "txt_cfg": 6.0, "img_cfg": 1.5, "input_image": "edit_input.png"},
            inputs, outputs, branches, lambda v: flow.edit_guidance(v[0], v[1], v[2], 1.5, 6.0))


def compare_golden(reference: Path | str, other: Path | str) -> dict[str, dict[str, float]]:
    """How far the outputs of one golden directory are from another's (e.g. a bf16 export on a GPU against the
    same export on the CPU): case -> output -> error. Float outputs give their max abs difference divided by the
    reference's max abs value, uint8 images the mean difference in levels, other integer and boolean outputs 0.0
    when equal and 1.0 when not."""
    reference, other = Path(reference), Path(other)
    report = {}
    for json_file in sorted(reference.glob("*.json")):
        meta = json.loads(json_file.read_text())
        if not isinstance(meta, dict) or "case" not in meta:
            continue
        tensors_file = meta.get("files", {}).get("tensors", f"{json_file.stem}.safetensors")
        if not (other / tensors_file).is_file():
            raise FileNotFoundError(f"{other / tensors_file}: the other directory lacks case {json_file.stem}")
        want, got = load_file(str(reference / tensors_file)), load_file(str(other / tensors_file))
        errors = {}
        for key in sorted(k for k in want if k.startswith("out.")):
            a, b = want[key], got.get(key)
            if b is None or a.shape != b.shape:
                errors[key[4:]] = float("inf")
            elif a.is_floating_point():
                scale = a.double().abs().max().item() if a.numel() else 0.0
                diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
                errors[key[4:]] = diff / scale if scale else diff
            elif a.dtype == torch.uint8:
                errors[key[4:]] = (a.double() - b.double()).abs().mean().item() if a.numel() else 0.0
            else:
                errors[key[4:]] = 0.0 if torch.equal(a, b) else 1.0
        report[json_file.stem] = errors
    return report


@torch.no_grad()
def export_golden(checkpoint: Path | str, out: Path | str, dtype: torch.dtype = torch.float32,
                  device: str = "cpu", height: int = 256, width: int = 256, steps: int = 3) -> list[str]:
    """Write every golden case of `checkpoint` (a directory in the official layout) into `out`; returns the case
    names. `height` x `width` is the generated image size (multiples of 32: also the size an edit of the drawn
    input image of that size keeps), `steps` the Euler steps."""
    if height % 32 or width % 32 or edit_target_size(width, height) != (width, height):
        raise ValueError(f"golden image size {height}x{width}: use multiples of 32 of at most about a megapixel")
    checkpoint, out = Path(checkpoint), Path(out)
    loaded = load_model(checkpoint, dtype=dtype, device=device)
    ovis = Ovis(loaded.model, loaded.tokenizer, device=device)
    out.mkdir(parents=True, exist_ok=True)
    write_reference_files(ovis.model, checkpoint, out)
    images = {"image0.png": drawn_image(90, 50, 0), "image1.png": drawn_image(40, 70, 1),
              "image2.png": drawn_image(200, 120, 2), "edit_input.png": drawn_image(width, height, 3)}
    for name, image in images.items():
        image.save(out / name)
        images[name] = load_image(out / name)
    common = {"weights_file": WEIGHTS_FILE, "config_file": CONFIG_FILE, "tokenizer_dir": TOKENIZER_DIR,
              "dtype": str(dtype).removeprefix("torch."), "device": str(device), "checkpoint": str(checkpoint)}
    writer = CaseWriter(out, common)
    export = Exporter(ovis, writer, images, height, width, steps)
    export.vit()
    export.visual_tokenizer()
    export.preprocess()
    export.llm()
    export.merge()
    export.understanding()
    txt = export.text_pair()
    export.refiner(txt)
    edit_image = resize_for_edit(images["edit_input.png"])
    edit_pixels = condition_images(edit_image, height, width, ovis.config.preprocess)[1][None].to(device)
    export.mmdit(txt, edit_pixels, edit=False)
    export.mmdit(txt, edit_pixels, edit=True)
    export.vae(edit_pixels)
    prompt = edit_prompt(EDIT_INSTRUCTION)
    cond_txt = export.conditions(edit_image, prompt)
    no_txt_txt = export.conditions(edit_image, UNCONDITIONAL_PROMPT)
    no_both_txt = export.conditions(blank_image(width, height), UNCONDITIONAL_PROMPT)
    t2i_txt = export.conditions(blank_image(width, height), t2i_prompt(T2I_CAPTION))
    for shift in (True, False):
        export.sampler(t2i_txt, no_both_txt, None, None, edit=False, shift=shift)
        export.sampler(cond_txt, no_both_txt, no_txt_txt, edit_pixels, edit=True, shift=shift)
    export.e2e_t2i()
    export.e2e_edit(images["edit_input.png"])
    return writer.written
