"""
images.py: images as the model sees them: decoding any mode to RGB, embedded bytes kept undecoded, the size
from a header, and a cache of decoded and fitted images.

A row's image is a path, or an undecoded PIL image holding its embedded bytes (info["medfact_bytes"]):
rows never hold pixels. load_image() decodes a fresh copy each time; ImageCache keeps the fitted ones of a
run, least recently used out first; image_size() reads a header only.
"""

import collections
import hashlib
import io
import math
import os

import numpy as np
from PIL import Image

from files import DataError



def load_image(row_or_image):
    """An RGB PIL image from a row, a path or a PIL image, as the model sees it (_rgb); DataError names the
    file if it is missing or corrupt. A multi-frame image (GIF, TIFF) gives its first frame."""
    where = ""
    if isinstance(row_or_image, dict):
        where = f" (row {row_or_image.get('id')})"
        row_or_image = row_or_image.get("image")
    if isinstance(row_or_image, Image.Image):
        info = row_or_image.info
        name = info.get("medfact_source", "in-memory image")
        try:
            if "medfact_bytes" in info:  # embedded: decode a fresh copy, so rows never hold decoded pixels
                with Image.open(io.BytesIO(info["medfact_bytes"])) as im:
                    return _rgb(im)
            return _rgb(row_or_image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{name}{where}: cannot decode image ({type(e).__name__}: {e})") from None
    if not isinstance(row_or_image, (str, os.PathLike)):
        raise DataError(f"<{type(row_or_image).__name__}>{where}: an image must be a path or a PIL image")
    path = os.fspath(row_or_image)
    if not os.path.exists(path):
        raise DataError(f"{path}{where}: image file does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{path}{where}: image is not a regular file")
    try:
        with Image.open(path) as im:
            return _rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}{where}: cannot decode image ({type(e).__name__}: {e})") from None


def _rgb(im):
    """RGB pixels, whatever the mode. PIL's convert("RGB") alone would clip every value of a 16-bit, 32-bit
    or float image over 255 to white (a 16-bit radiograph: 99% white), so those are scaled to 8 bits first,
    by their bit depth: values within 0..255 stay; non-negative values of N bits (10, 12, 16, ...) are
    multiplied by 255 / (2^N - 1); a float image within 0..1 by 255; one with negative values (CT units)
    is stretched from its lowest value to its highest; NaN and inf become 0. Transparency is laid over
    white, as transformers' convert_rgb does."""
    if im.mode.startswith("I") or im.mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        a = np.asarray(im, dtype=np.float32)
        a = np.where(np.isfinite(a), a, 0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0:
            a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
        elif im.mode == "F" and hi <= 1:
            a = a * 255
        else:
            a = a * (255 / (2 ** max(8, math.ceil(math.log2(hi + 1))) - 1))
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def image_from_bytes(data, source):
    """(an undecoded PIL image, None) from embedded bytes, or (None, the problem).

    Only the header is read here (cheap, and it catches non-images). load_image() decodes the bytes afresh
    each time: decoding in place would keep every image's pixels alive (PathVQA: 33k images).
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for garbage bytes
        return None, f"cannot read embedded image ({type(e).__name__}: {e})"
    im.info.update(medfact_source=source, medfact_bytes=data)  # load_image() names the source on failure
    return im, None


def image_size(image):
    """(width, height) from an image's header, without decoding its pixels: a path, or a PIL image (embedded
    bytes or pixels). DataError names the file when it is missing or not an image."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(image) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"{image}: image file does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{image}: cannot read image ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# a run's decoded images, each once

class ImageCache:
    """load_image(row), then fit (e.g. model.VLM.fit_image), kept per distinct image (image_key), the least
    recently used dropped beyond max_bytes of pixels: a run decodes and resizes each image once, not at every
    use (SFT on SLAKE uses each of its 450 images ~140 times). Rows must keep their in-memory images alive
    while the cache is used (an image without a path or bytes is known by its id)."""

    def __init__(self, fit=None, max_bytes=2 * 2 ** 30):
        self.fit, self.max_bytes, self.items, self.bytes = fit, max_bytes, collections.OrderedDict(), 0

    def __call__(self, row):
        key = image_key(row.get("image") if isinstance(row, dict) else row)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        image = load_image(row)
        image = self.fit(image) if self.fit else image
        self.items[key] = image
        self.bytes += image.width * image.height * len(image.getbands())
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.width * old.height * len(old.getbands())
        return image


def image_key(image):
    """What tells images apart, to decode each once: a path, the hash of embedded bytes, or the object."""
    if isinstance(image, Image.Image):
        data = image.info.get("medfact_bytes")
        return hashlib.sha1(data).hexdigest() if data is not None else id(image)
    return image
