"""Image preprocessing: files -> RGB images -> encoder patches, and the image prep of the generation scripts.

Understanding side (official `Aimv2VisualTokenizer.preprocess_image` with its CLIPImageProcessor): the image is
resized so both sides are multiples of patch*stride (`smart_resize`, Qwen2-VL rounding), rescaled to [0, 1],
normalised with the CLIP mean/std and cut into patch rows in 2x2-merge-group order.

Generation side (official test_txt_to_img.py / test_img_edit.py `build_inputs`, and `process_image_aspectratio`
of modeling_yak.py): a conditioning image is resized to cover the target size and center-cropped, turned into
[-1, 1] VAE pixels, and a small copy of it (at most `min_pixels`) is what the encoder sees.
"""
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ovis_min.config import PreprocessConfig

# Defaults of the official `smart_resize` signature. The generation scripts rely on them: the edit target size
# and the condition image's lower bound are computed with these, not with the preprocessor's values.
SMART_RESIZE_FACTOR = 28
SMART_RESIZE_MIN_PIXELS = 56 * 56
SMART_RESIZE_MAX_PIXELS = 14 * 14 * 4 * 1280
MAX_ASPECT_RATIO = 200
EDIT_SIZE_FACTOR = 32  # the edit script rounds the input image's size to multiples of 32


class ImageError(ValueError):
    """An image that cannot be read or converted."""


def smart_resize(height: int, width: int, factor: int = SMART_RESIZE_FACTOR,
                 min_pixels: int = SMART_RESIZE_MIN_PIXELS,
                 max_pixels: int = SMART_RESIZE_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels, ratio kept roughly.

    Python's `round` sends halves to the even neighbour, as in the official code: 80x60 with factor 32 gives
    round(2.5)=2 and round(1.875)=2, so 64x64.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if height < factor or width < factor:
        # The official code scales a too-small image up so that its short side equals `factor`.
        if height < width:
            height, width = factor, round(factor / height * width)
        else:
            height, width = round(factor / width * height), factor
    elif max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        # The official code does not refuse such images: it squeezes the long side to 200x the short one,
        # which distorts the picture. Same here, but said out loud.
        warnings.warn(f"aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_ASPECT_RATIO}: "
                      f"the long side is squeezed to {MAX_ASPECT_RATIO}x the short one, as the official code does")
        if height > width:
            height = MAX_ASPECT_RATIO * width
        else:
            width = MAX_ASPECT_RATIO * height

    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        # The official code would go on with an empty image and fail inside the resize.
        raise ValueError(f"cannot fit a {height}x{width} image into at most {max_pixels} pixels with sides that "
                         f"are multiples of {factor}: the aspect ratio is too extreme; crop the image first")
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------------------------------
def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Gray 16-bit (or 32-bit integer) -> RGB, scaling 0..65535 to 0..255 instead of clipping at 255."""
    values = np.asarray(image, dtype=np.float64)
    # PIL opens some 16-bit files as 32-bit "I"; only treat it as 8-bit data when it fits in 8 bits.
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = np.clip(values, 0, 65535) / 257.0
    gray = np.round(np.clip(values, 0, 255)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, the way the official scripts do it (`image.convert('RGB')`), except for 16-bit gray.

    Alpha (RGBA, LA, palettes with transparency) is dropped, not composited on white: the official test scripts
    call `.convert('RGB')` on the opened file and `preprocess_image` converts again the same way, so transparent
    pixels show whatever colour they hold. PIL's own 16-bit conversion clips everything above 255 to white;
    that is no one's intent, so 16-bit gray is scaled to 8 bits instead (the only deliberate difference).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        # Same pixels as convert('RGB'); going through RGBA only avoids PIL's warning about byte transparency.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def load_image(source: "str | Path | Image.Image") -> Image.Image:
    """An RGB PIL image from a path or an already opened image (see `to_rgb` for mode conversions)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if path.is_dir():
            raise ImageError(f"expected an image file, got a directory: {path}")
        try:
            image = Image.open(path)
            image.load()  # decode now, so a truncated file fails here with its name
        except Image.DecompressionBombError:
            raise ImageError(f"{path} is too large to open safely (more than {2 * Image.MAX_IMAGE_PIXELS:,} "
                             "pixels, PIL's decompression-bomb limit): downscale it first") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"cannot read {path} as an image ({err})") from err
    try:
        return to_rgb(image)
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert an image of mode {image.mode} to RGB ({err})") from err


# ---------------------------------------------------------------------------------------------------------------
# Understanding: image -> encoder patches
# ---------------------------------------------------------------------------------------------------------------
def preprocess_image(image: Image.Image, cfg: PreprocessConfig, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values (N, C*T*p*p) float32, grid_thws (1, 3) long), N = grid_h * grid_w.

    Rows come in 2x2-merge-group order (the 4 patches of one visual token are adjacent, groups in raster order)
    and each row is flattened as (c, t, py, px), matching the official patchify.
    """
    p, s, t = cfg.patch_size, cfg.hidden_stride, cfg.temporal_patch_size
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    min_pixels = min(max_pixels, cfg.min_pixels if min_pixels is None else min_pixels)
    image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, p * s, min_pixels, max_pixels)

    # CLIPImageProcessor: PIL bicubic to the exact size, x * (1/255) in float64 stored as float32, then
    # (x - mean) / std in float32. Same order and dtypes here, so the values agree bit for bit.
    pixels = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float64)
    pixels = (pixels * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    pixels = torch.from_numpy((pixels - mean) / std).permute(2, 0, 1)  # (C, H, W)

    # One image is one frame; the official code repeats the last frame up to a whole temporal patch.
    frames = pixels.unsqueeze(0).expand(t, -1, -1, -1)  # (T, C, H, W)
    channels = frames.shape[1]
    grid_h, grid_w = height // p, width // p
    patches = frames.reshape(1, t, channels, grid_h // s, s, p, grid_w // s, s, p)
    # -> (1, H/s/p, W/s/p, s, s, C, T, p, p): merge groups outermost, then the 2x2 inside a group.
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(grid_h * grid_w, channels * t * p * p).contiguous()
    grid_thws = torch.tensor([[1, grid_h, grid_w]], dtype=torch.long)
    return pixel_values, grid_thws


def preprocess_images(images: list[Image.Image], cfg: PreprocessConfig, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Several images packed one after the other: (pixel_values (sum N, D), grid_thws (num_images, 3)), or Nones."""
    if not images:
        return None, None
    parts = [preprocess_image(image, cfg, min_pixels, max_pixels) for image in images]
    return torch.cat([pv for pv, _ in parts]), torch.cat([g for _, g in parts])


# ---------------------------------------------------------------------------------------------------------------
# Generation: condition images of the official T2I and editing scripts
# ---------------------------------------------------------------------------------------------------------------
def blank_image(width: int, height: int) -> Image.Image:
    """The white image that stands in for "no image" in the T2I prompts and the unconditional pass."""
    return Image.new("RGB", (width, height), (255, 255, 255))


def edit_target_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of an edited image: the input size rounded to multiples of 32 and brought within the
    default pixel bounds (at most 1,003,520 pixels: a 1024x1024 input is edited at 992x992)."""
    out_height, out_width = smart_resize(height, width, factor=EDIT_SIZE_FACTOR)
    return out_width, out_height


def resize_for_edit(image: Image.Image) -> Image.Image:
    """The edit script's first step: the input image bicubic-resized to `edit_target_size`."""
    image = to_rgb(image)
    return image.resize(edit_target_size(image.width, image.height), Image.BICUBIC)


def cover_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bicubic) so the image covers height x width, then take the center (official
    `process_image_aspectratio`, which calls torchvision's resize/center_crop on a PIL image, i.e. PIL underneath)."""
    image = to_rgb(image)
    scale = max(width / image.width, height / image.height)
    # int() truncates, so (height/h)*h can land one pixel short of the target...
    resized = image.resize((int(scale * image.width), int(scale * image.height)), Image.BICUBIC)
    if resized.width < width or resized.height < height:
        # ...and torchvision's center_crop then pads with black, the extra pixel going right/bottom.
        canvas = Image.new("RGB", (max(width, resized.width), max(height, resized.height)), (0, 0, 0))
        canvas.paste(resized, (max(width - resized.width, 0) // 2, max(height - resized.height, 0) // 2))
        resized = canvas
    # torchvision rounds the offsets with Python's round (halves to even).
    top = int(round((resized.height - height) / 2.0))
    left = int(round((resized.width - width) / 2.0))
    return resized.crop((left, top, left + width, top + height))


def to_vae_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1]: x/255 then (x - 0.5)/0.5, as torchvision's to_tensor+normalize."""
    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    return (pixels.float().div(255) - 0.5) / 0.5


def resize_center_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """VAE pixels (3, height, width) in [-1, 1] of an image resized to cover the size and center-cropped."""
    return to_vae_pixels(cover_and_crop(image, height, width))


def understanding_resize(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrink a condition image for the encoder: at most `max_pixels` (the scripts pass the processor's
    min_pixels), sides multiples of 28, with the other `smart_resize` defaults as the official scripts call it."""
    height, width = smart_resize(image.height, image.width, max_pixels=max_pixels)
    return to_rgb(image).resize((width, height), Image.BICUBIC)


def condition_images(image: Image.Image, height: int, width: int,
                     cfg: PreprocessConfig) -> tuple[Image.Image, torch.Tensor]:
    """The image half of the scripts' `build_inputs`: (small encoder image, VAE pixels (3, height, width)).

    The VAE sees the covered/cropped image at the target size; the encoder sees the same crop shrunk to at most
    `cfg.min_pixels` pixels. `preprocess_image` then applies its usual bounds to that small image, which can
    enlarge it again (a 28x56 image becomes 56x84 with min_pixels 3136): the official scripts do the same.
    """
    cropped = cover_and_crop(image, height, width)
    return understanding_resize(cropped, cfg.min_pixels), to_vae_pixels(cropped)
