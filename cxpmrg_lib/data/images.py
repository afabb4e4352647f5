"""Robust radiograph loading: any PNG/JPEG the datasets ship -> one float32 grey image in [0, 1].

Chest X-ray releases mix 8-bit grey PNG (CheXpert Plus), 16-bit PNG (some MIMIC
conversions), RGB JPEG (MIMIC-CXR-JPG viewers, IU X-Ray from Open-i) and the odd
palette or RGBA file. They all become the same grey image here, so a model never
sees a difference that only comes from the file format:

* colour -> grey with ITU-R 601 luma (a grey image stored as RGB stays the same grey);
* 16-bit images are divided by 65535 (their bit depth), not by their maximum, so
  that brightness means the same in every image;
* an alpha channel is dropped (not composited): radiographs carry no transparency,
  and alpha in these files is opaque padding; dropping it keeps the stored grey levels;
* palette images go through their palette.

Resizing (optional, square) averages whole pixel blocks first and filters the
rest bilinearly, both antialiased; see `_shrink`.

A missing, unreadable or truncated file raises ImageLoadError naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxpmrg_lib.util.errors import DataError

__all__ = ["ImageLoadError", "load_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_RESAMPLE = Image.Resampling.BILINEAR
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageLoadError(DataError):
    """An image that cannot be read; `path` is the file at fault."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {path}: {reason}")


def _shrink(img: Image.Image, size: int) -> Image.Image:
    """Resize to size x size, antialiased.

    First a box average over the largest whole factor per axis (Image.reduce: exact
    and several times faster than a resampling filter; 256 -> 128 needs nothing
    else), then bilinear for what is left (PIL widens the kernel when shrinking,
    so that is antialiased too; upscaling is plain bilinear).
    """
    w, h = img.size
    fx, fy = max(w // size, 1), max(h // size, 1)
    if fx > 1 or fy > 1:
        img = img.reduce((fx, fy))
    if img.size != (size, size):
        img = img.resize((size, size), _RESAMPLE)
    return img


def _to_float_grey(img: Image.Image, size: int | None) -> np.ndarray:
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if mode != "F":
            a = a * np.float32(1.0 / 65535.0)
        a = np.clip(a, 0.0, 1.0)
        if size is not None and a.shape != (size, size):
            a = np.asarray(_shrink(Image.fromarray(a), size), dtype=np.float32)  # float32 array -> mode "F"
        return np.ascontiguousarray(a, dtype=np.float32)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert(mode.replace("a", "").replace("A", "")) if mode in ("RGBA", "LA", "RGBa", "La") \
            else img.convert("RGB")
        mode = img.mode
    if mode != "L":
        img = img.convert("L")
    if size is not None and img.size != (size, size):
        img = _shrink(img, size)
    a = np.asarray(img, dtype=np.float32)
    a *= np.float32(1.0 / 255.0)
    return a


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read a PNG/JPEG as a float32 (H, W) array in [0, 1]; with `size`, resized to size x size.

    The square resize does not keep the aspect ratio, as in R2Gen-style pipelines.
    JPEGs are decoded at reduced scale (libjpeg DCT scaling) when that still gives
    at least `size` pixels, which is several times faster for full-size radiographs.
    """
    path = Path(path)
    if size is not None:
        size = int(size)
        if size < 1:
            raise ValueError(f"size must be a positive int, not {size}")
    try:
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft("L", (size, size))
            img.load()
            return _to_float_grey(img, size)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"), SyntaxError
        # ("broken PNG file") or ValueError depending on where decoding stops.
        raise ImageLoadError(path, f"corrupt or truncated ({type(e).__name__}: {e})") from None
