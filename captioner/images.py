"""Reading photos into upright 8-bit RGB, and the one path from any picture to the model's pixels."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import ImageReadError, printable, reason, shortened

# Refuse images above this many pixels (a decompression bomb guard; 10x a 24 MP photo).
MAX_PIXELS = 240_000_000
# Pillow's own guard (process-wide) refuses from 2x its limit, 179 million pixels by default, and
# would turn away a 100-megapixel camera's photos that ours allows: it is raised to ours, never lowered.
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def ignore_pillow_noise() -> None:
    """Ignore, process-wide, two kinds of Pillow warning that say nothing a caption needs.

    Its decompression-bomb warning: our own error names the file and its size. Its
    complaints about a photo's metadata (a corrupt EXIF block, a stray tag): the picture
    itself decodes. Done once, at import, like the pixel limit above, and narrowly (Pillow's
    modules, these categories). A ``catch_warnings()`` around each decode would not do: it
    swaps the process's whole filter list and puts back the one it found, so threads decoding
    at once (a server's) left "ignore every UserWarning" behind for good.
    """
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module=r"PIL\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin$")
    warnings.filterwarnings("ignore", message=r"Possibly corrupt EXIF|XMP data cannot be read", category=UserWarning,
                            module=r"PIL\.Image$")


ignore_pillow_noise()

# The formats a photo is decoded from where its bytes are judged, not its name (an upload; a file
# given as a video), and what those doors call a photo.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
)


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has a photo extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, *, min_side: int | None = None) -> Image.Image:
    """Open ``path`` as an upright RGB image.

    EXIF orientation is applied; grayscale, palette, RGBA/LA (composited on white), CMYK and
    16-bit images are converted to 8-bit RGB. With ``min_side``, a JPEG is decoded at the
    smallest of 1/1, 1/2, 1/4 or 1/8 scale whose sides are both at least that long (the
    DCT does the scaling): a 12-megapixel photo then costs about a tenth of a full decode.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, or too large.
    """
    path = check_image_file(path)
    return decode_image(path, path, min_side=min_side)


def check_image_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a non-empty regular file: what every reader checks before opening one.

    Raises:
        ImageReadError: ``PATH: reason`` for a missing, empty or special file (a FIFO or
            device would block or never end).
    """
    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:
        raise ImageReadError(f"{printable(path)}: {e.strerror or e}") from e
    except ValueError as e:  # a NUL in the name: no file can have it (as when a photo's bytes are passed as its path)
        raise ImageReadError(f"{printable(shortened(str(path), 60))}: not a file name: it holds a NUL character") from e
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(f"{printable(path)}: not a regular file")
    if info.st_size == 0:
        raise ImageReadError(f"{printable(path)}: empty file")
    return path


def decode_image(file: str | os.PathLike | BinaryIO, name: str | os.PathLike, *,
                 min_side: int | None = None, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Decode ``file`` (a path or an open binary file) as :func:`load_image` does; errors name ``name``.

    The one decode for files on disk and bytes read elsewhere (Ray tasks, HTTP uploads).
    ``formats`` limits the Pillow formats tried (by content, whatever the name says).

    Raises:
        ImageReadError: not an image, truncated, or too large.
    """
    limit = _pixel_limit()
    try:
        with Image.open(file, formats=formats) as image:
            if image.width * image.height > limit:
                raise ImageReadError(
                    f"{printable(name)}: {image.width}x{image.height} pixels exceeds the limit of {limit}"
                )
            if min_side is not None and image.format == "JPEG":
                image.draft(image.mode, (min_side, min_side))  # scale only; modes are converted below
            image.load()
            return upright_rgb(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError as e:
        accepted = f"one of {', '.join(formats)}" if formats else "one Pillow reads"
        raise ImageReadError(f"{printable(name)}: not an image in a format accepted here ({accepted})") from e
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its limit: before the size is known
        raise ImageReadError(f"{printable(name)}: the image exceeds the limit of {limit} pixels "
                             "(a decompression bomb guard)") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ImageReadError(f"{printable(name)}: {reason}") from e


def _pixel_limit() -> int:
    """Ours, or Pillow's where the program that imported us lowered it."""
    return min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)


# Large pictures are first reduced by whole factors to no less than this many times the
# model's input side, then resampled (bicubic) to it: as good as resampling all of it, and cheaper.
REDUCING_GAP = 3

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def model_pixels(image: ImageInput, size: int) -> np.ndarray:
    """A path, a PIL image or a video frame -> the (size, size, 3) uint8 pixels a model encodes.

    Every door into the model (files, PIL images from Python, video frames, training) comes
    through here, so one picture gets one caption whichever way it arrives: PIL images are
    turned upright by their EXIF tag like files are. Frames are (H, W, 3) uint8 RGB arrays.
    One exception, for speed: a JPEG *file* at least 1344 pixels on both sides is decoded at
    1/2 to 1/8 scale by its DCT (:func:`load_image`), so its pixels, and rarely its caption,
    differ slightly from the same photo passed as a PIL image or an array.
    Pictures are squashed, not cropped: a caption describes the whole picture, and the
    Flickr8k training images were squashed the same way.

    Raises:
        ImageReadError: a path cannot be read, or an array is not an RGB frame.
    """
    if isinstance(image, np.ndarray):
        rgb = _frame_image(image)
    elif isinstance(image, Image.Image):
        rgb = _given_image(image)
    elif isinstance(image, (str, bytes, os.PathLike)):
        rgb = load_image(os.fsdecode(image), min_side=REDUCING_GAP * size)
    else:  # a read error like a bad file's, so that a list with a None in it still captions the rest
        raise ImageReadError(f"{printable(shortened(repr(image), 60))}: not a path, a PIL image or an (H, W, 3) array "
                             f"({type(image).__name__})")
    return _squashed(rgb, size)


def _given_image(image: Image.Image) -> Image.Image:
    """A PIL image from the caller, upright RGB; a closed or empty one is a read error like a bad file's."""
    if 0 in image.size:
        raise ImageReadError(f"an empty PIL image ({image.width}x{image.height} pixels)")
    try:
        return upright_rgb(image)
    except (ValueError, OSError, AssertionError) as e:  # Pillow's ways of saying "closed" (an assert, once)
        raise ImageReadError(f"cannot read this PIL image: {reason(e) or type(e).__name__} (closed, or cut short?)"
                             ) from e


def bytes_pixels(data: bytes, name: str, size: int, *, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """An image file's bytes -> the pixels :func:`model_pixels` gives for that file; errors name ``name``.

    Raises:
        ImageReadError: empty, not an image (of ``formats``), truncated, or too large.
    """
    if not data:
        raise ImageReadError(f"{printable(name)}: empty file")
    return _squashed(decode_image(io.BytesIO(data), name, min_side=REDUCING_GAP * size, formats=formats), size)


def _squashed(rgb: Image.Image, size: int) -> np.ndarray:
    resized = rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
    return np.array(resized, dtype=np.uint8)  # a writable copy, cheap to send between DataLoader workers


def _frame_image(frame: np.ndarray) -> Image.Image:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
        raise ImageReadError(f"an array picture must be (H, W, 3) uint8 RGB, got {frame.dtype} {frame.shape}")
    return Image.fromarray(frame)


def upright_rgb(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation and converted to 8-bit RGB."""
    limit = _pixel_limit()
    if image.width * image.height > limit:
        raise ImageReadError(f"{image.width}x{image.height} pixels exceeds the limit of {limit}")
    return to_rgb(ImageOps.exif_transpose(image))  # a corrupt tag warns (silenced above) and turns nothing


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (transparent pixels become white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples span 0-65535, but a picture converted from 8 bits keeps values 0-255
        # (Pillow's own convert does not scale): scaled down, it would be black
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.size and values.max() > 255 else 1.0
        return Image.fromarray((values / scale).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:  # floats in [0, 1], as image libraries write them
            values = values * 255.0
        return Image.fromarray(values.clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
