"""Decoding image files: every file either becomes an RGB array or an ImageError saying why."""

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Formats Pillow may find inside those files; MPO is the multi-picture JPEG some cameras write.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
MAX_IMAGE_PIXELS = 64_000_000  # a larger declared size is rejected before anything is decoded


class ImageError(ValueError):
    """A file that cannot be used as an image; str() is the reason."""


def open_rgb(path):
    """Fully decode an image file into an 8-bit RGB PIL image, or raise ImageError.

    EXIF orientation is applied; transparency is composited on white; an animation gives its
    first frame; grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB.
    """
    path = Path(path)
    try:
        with _open_regular(path) as handle, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                if image.format not in SUPPORTED_FORMATS:
                    raise ImageError(f"unsupported format: {image.format} "
                                     f"(supported: {', '.join(SUPPORTED_FORMATS)})")
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"too large: {width}x{height} pixels "
                                     f"(limit {MAX_IMAGE_PIXELS:,})")
                image.seek(0)
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"too large: {error}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
            MemoryError) as error:  # Pillow's decoders raise all of these on damaged data
        message = str(error) or type(error).__name__
        reason = "truncated" if "truncated" in message.lower() else "cannot decode"
        raise ImageError(f"{reason}: {message}") from None


def _open_regular(path):
    """A binary file object for path, or ImageError. Only a regular file is opened: a FIFO
    would wait for a writer, /dev/zero never ends and opening some devices acts on them."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
        if kind is not None:
            raise ImageError(f"not a regular file: {kind}")
        # O_NONBLOCK, and the opened file's status checked again, in case it was replaced.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError("missing: a broken link or a deleted file") from None
    except PermissionError:
        raise ImageError("not readable: permission denied") from None
    except OSError as error:  # a link that loops, a name too long
        raise ImageError(f"not readable: {error.strerror or error}") from None
    try:
        status = os.fstat(descriptor)
        kind = _file_kind(status.st_mode)
        if kind is not None:
            raise ImageError(f"not a regular file: {kind}")
        if status.st_size == 0:
            raise ImageError("zero bytes")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _file_kind(mode):
    """What a file that is not a regular file is (None for a regular file)."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "an unknown kind of file"


def decode_workers():
    """Threads for decoding: two per core, as Pillow releases the GIL while it decodes, but
    at most 8: on 16 cores, more decoded no faster (Python's own work holds the GIL)."""
    return min(8, 2 * (os.cpu_count() or 1))


def load_image(path, size):
    """A (size, size, 3) uint8 RGB array: the decoded image resized (bilinear, no crop)."""
    image = open_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit is scaled, as TensorFlow's decoders do; 32-bit "I" holding 8-bit values is not.
        array = array / 257.0 if image.mode != "I" or array.max() > 255 else array
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L")
    if "transparency" in image.info:  # a palette entry or one colour marked transparent
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")
