"""Decoding of image files: :func:`open_image` is the one reader every file-reading path uses.

Users point scott at folders of their own images (cells, parts, plants, scans), so a file may be
any mode PIL opens. :func:`open_image` returns an 8-bit "L" or "RGB" image by these rules (the
same rules :func:`convert_mode` applies to an image already in memory):

- Target mode: ``in_chans`` 1 -> "L", 3 -> "RGB", None -> "L" for a grey source ("1", "L", "LA",
  "I", "I;16*", "F", a palette whose colours are all grey), else "RGB". Grey in an RGB recipe is
  replicated to three channels; colour in a grey recipe becomes its luminance (ITU-R 601-2,
  PIL's "L": ``L = R*299/1000 + G*587/1000 + B*114/1000``).
- Transparency (RGBA, LA, PA, a palette or grey/RGB image with a tRNS transparent colour) is
  composited on a WHITE background (:data:`BACKGROUND`), then converted to the target mode.
- 1-bit: 0 / 255. Palette: its colours. CMYK (JPEG, Adobe-inverted or not, and TIFF): PIL's
  conversion ``R = 255 - min(255, C + K)`` etc., so pure cyan is (0, 255, 255); an embedded ICC
  profile is not applied. CIELAB (TIFF): to sRGB (D50) with LittleCMS (PIL's plain conversion
  would give wrong colours).
- High bit depth is scaled by the range of the format, never stretched per image:

  * 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N"): ``round(v / 65535 * 255)``. Data that use
    only part of the range (12-bit sensors in 16-bit files) stay dark: that is what the file says.
  * 32-bit integer ("I"): negative values clip to 0; if the image's maximum is <= 65535 it is read
    as 16-bit (``round(v / 65535 * 255)``, PIL opens some 16-bit files as "I"), otherwise scaled by
    its maximum (``round(v / max * 255)``).
  * 32-bit float ("F"): NaN / inf and negative values become 0; if the maximum is <= 1 the values
    are intensities in [0, 1] (``round(v * 255)``), otherwise scaled by the maximum
    (``round(v / max * 255)``). The minimum is never subtracted.
  * 16-bit colour PNG: PIL decodes it to 8-bit "RGB" itself, keeping the high byte (``v >> 8``,
    at most 1 below the 16-bit grey rule).

- EXIF orientation (tags 2-8) is applied, so the image is the way a viewer shows it.
- Multi-frame files (GIF, TIFF stacks): the first frame.
- Size: the width x height from the header is checked against ``max_pixels``
  (``data.max_image_pixels``) BEFORE any pixel is decoded; a larger file raises
  :class:`scott.data.datasets.BadImageError` naming the file, its size and the key. This limit
  governs, not PIL's global ``Image.MAX_IMAGE_PIXELS`` (which is left unchanged): PIL's
  DecompressionBombWarning is silenced here, and a file PIL refuses outright is opened again
  without PIL's check so that this limit decides.
- An unreadable, truncated or unsupported file raises ``BadImageError`` with the path:
  ``<path>: cannot read image (<Type>: <message>)``.

Mixed sizes are fine: the transforms resize later.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["BACKGROUND", "DEFAULT_MAX_PIXELS", "convert_mode", "open_image"]

#: Background that transparent pixels are composited on (white).
BACKGROUND = (255, 255, 255)

#: Default of ``data.max_image_pixels``: PIL's hard limit, 2 x its default MAX_IMAGE_PIXELS
#: (2 x 89,478,485 pixels, e.g. 13,377 x 13,377).
DEFAULT_MAX_PIXELS = 178_956_970

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_HIGH_DEPTH = _SIXTEEN_BIT + ("I", "F")
_GREY_MODES = ("1", "L", "LA", "La") + _HIGH_DEPTH
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_image(path, in_chans: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the image file ``path`` to an 8-bit "L" or "RGB" image (rules: module docstring).

    ``in_chans``: 1 -> "L", 3 -> "RGB", None -> "L" for grey sources else "RGB".
    ``max_pixels``: largest width x height accepted, checked from the header before decoding
    (None: no limit). Raises :class:`scott.data.datasets.BadImageError` (one line, naming the
    file) for a file over the limit or one that cannot be read; ValueError for bad arguments.
    """
    _target_mode(None, in_chans)  # argument check before touching the file
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit speaks, not PIL's
        try:
            img = _open_lazy(path)
        except Exception as exc:  # PIL raises many types for corrupt files
            raise _cannot_read(path, exc) from None
        with img:  # closes the file; the decoded pixels stay
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise _too_large(path, width, height, max_pixels)
            try:
                img.load()
                img = _apply_orientation(img)
                return convert_mode(img, in_chans)
            except Exception as exc:  # truncated data, unsupported modes, PIL's own checks in plugins
                raise _cannot_read(path, exc) from None


def convert_mode(img: Image.Image, in_chans: int | None) -> Image.Image:
    """Return ``img`` as 8-bit "L" (in_chans 1) or "RGB" (in_chans 3); None: "L" for grey sources,
    else "RGB". Transparency on white, high bit depth by the format's range (module docstring).
    An image already in the target mode without transparency is returned as is."""
    target = _target_mode(img, in_chans)
    if img.mode == target and "transparency" not in img.info:
        return img
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "LAB":
        img = _lab_to_rgb(img)
    elif img.mode in _HIGH_DEPTH:
        img = _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        img = _on_background(img)
    return img if img.mode == target else img.convert(target)


def _target_mode(img: Image.Image | None, in_chans: int | None) -> str:
    if in_chans == 1:
        return "L"
    if in_chans == 3:
        return "RGB"
    if in_chans is not None:
        raise ValueError(f"in_chans must be 1, 3 or None, got {in_chans}")
    return "L" if img is not None and _is_grey(img) else "RGB"


def _is_grey(img: Image.Image) -> bool:
    if img.mode in _GREY_MODES:
        return True
    if img.mode in ("P", "PA"):
        palette = img.getpalette()
        return bool(palette) and palette[0::3] == palette[1::3] == palette[2::3]
    return False


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth grey image ("I;16*", "I", "F") as "L", scaled by the format's range."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535  # round(v / 65535 * 255), exact
    elif img.mode == "I":
        arr = np.clip(arr.astype(np.int64), 0, None)
        peak = int(arr.max()) if arr.size else 0
        if peak <= 65535:
            out = (arr * 255 + 32767) // 65535
        else:
            out = np.rint(arr * (255.0 / peak))
    else:  # "F"
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        arr = np.clip(arr, 0.0, None)
        peak = float(arr.max()) if arr.size else 0.0
        out = np.rint(arr * np.float32(255.0 if peak <= 1.0 else 255.0 / peak))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


_LAB_TRANSFORM = []  # built once: [ImageCms transform]


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """A CIELAB image (PIL's "LAB": L 0..255 for 0..100, a and b offset by 128) as sRGB."""
    try:
        from PIL import ImageCms
    except ImportError as exc:  # pragma: no cover - PIL built without LittleCMS
        raise ValueError(f"CIELAB images need PIL with LittleCMS ({exc})") from None
    if not _LAB_TRANSFORM:
        _LAB_TRANSFORM.append(ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    return ImageCms.applyTransform(img, _LAB_TRANSFORM[0])


def _on_background(img: Image.Image) -> Image.Image:
    """Composite an image with alpha or a transparent colour on :data:`BACKGROUND` -> "RGB"."""
    if img.mode == "La":
        img = img.convert("LA")
    rgba = img.convert("RGBA")  # honours info["transparency"] of "P", "L" and "RGB"
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _apply_orientation(img: Image.Image) -> Image.Image:
    """The image turned the way its EXIF Orientation tag says (unchanged without one)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # damaged EXIF block: the pixels are fine, keep them as stored
        return img
    method = _TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def _open_lazy(path: Path) -> Image.Image:
    """``Image.open`` (header only); a file PIL refuses as a decompression bomb is opened
    again without PIL's check, so that ``max_pixels`` decides, not ``Image.MAX_IMAGE_PIXELS``."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        return _open_without_pil_limit(path)


def _open_without_pil_limit(path: Path) -> Image.Image:
    """What ``Image.open`` does (try each registered format on the file's first bytes), minus
    its decompression-bomb check."""
    Image.init()
    fp = open(path, "rb")
    try:
        prefix = fp.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            result = not accept or accept(prefix)
            if not result or isinstance(result, str):
                continue
            try:
                fp.seek(0)
                img = factory(fp, str(path))
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
            img._exclusive_fp = True  # closing the image closes the file
            return img
    except BaseException:
        fp.close()
        raise
    fp.close()
    raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _bad_image(message: str):
    from scott.data.datasets import BadImageError  # datasets imports this module

    return BadImageError(message)


def _cannot_read(path: Path, exc: BaseException):
    return _bad_image(f"{path}: cannot read image ({type(exc).__name__}: {_one_line(exc)})")


def _too_large(path: Path, width: int, height: int, limit: int):
    err = _bad_image(
        f"{path}: image is {width} x {height} = {width * height} pixels, over the limit of {limit} pixels; "
        "raise data.max_image_pixels (null: no limit) or downscale the file")
    err.too_large = True
    return err
