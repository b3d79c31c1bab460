"""Decoding: an undecoded image (bytes or a path) to uint8 pixels, any mode to RGB, and JPEGs decoded only as far as the
train crop needs.

A JPEG goes straight through libjpeg-turbo — the optional C extension ``hf_vit._jpeg_crop`` decodes only the crop's
rows and columns, else ``simplejpeg`` decodes it whole — with the same pixels as PIL (the same library and settings);
anything else, and any JPEG libjpeg-turbo reports a problem with, goes through PIL, which then decides what is corrupt
exactly as for every other image.

Orientation: :func:`open_image` applies an image's EXIF orientation as ``datasets`` and ``pipeline()`` do, so the model
trains and evaluates on the upright image it is served. A JPEG with an orientation other than 1 is decoded whole by PIL
and transposed (no partial decode: the crop box is drawn on the upright image, as for the PIL reference).
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import PIL.ImageOps
import simplejpeg
import torch

try:  # optional C extension: partial JPEG decoding (see decode_box); absent where libjpeg's headers were missing
    from .. import _jpeg_crop
except ImportError:
    _jpeg_crop = None


def has_partial_jpeg_decoder() -> bool:
    """Whether the optional C extension (decode only the crop of a JPEG) was built."""
    return _jpeg_crop is not None


# Where PIL finds an orientation (Image.getexif): EXIF (a JPEG's APP1, a PNG's eXIf chunk or text profile) or XMP.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp")
_TURNED = range(2, 9)  # the orientations exif_transpose turns or flips; 1 (and anything else) it leaves as it is


def open_image(image: dict) -> PIL.Image.Image:
    """An undecoded datasets image (``{"bytes", "path"}``) opened by PIL, upright: an EXIF orientation other than 1
    is applied exactly as ``datasets``' ``Image`` feature and ``pipeline()`` apply it (``PIL.ImageOps.exif_transpose``,
    which decodes the whole image). Otherwise only the header is read (a JPEG stays undecoded, so the partial and
    device decoders can take it)."""
    return upright(open_as_stored(image))


def open_as_stored(image: dict) -> PIL.Image.Image:
    """An undecoded datasets image opened by PIL as its bytes store it (no orientation applied; only the header
    read). For code that must know whether the image is turned (:func:`is_turned`) before deciding how to decode it."""
    data = image.get("bytes")
    return PIL.Image.open(io.BytesIO(data) if data is not None else image["path"])


def is_turned(img: PIL.Image.Image) -> bool:
    """Whether ``img``'s EXIF orientation turns or flips it (2..8: what ``exif_transpose`` acts on). A JPEG's EXIF and
    XMP are read with its header, so a JPEG stays undecoded; any other format is loaded first, as ``datasets`` does,
    since its EXIF may follow the pixels."""
    if img.format == "JPEG":
        if not any(k in img.info for k in _ORIENTATION_SOURCES):
            return False  # the common case, and the fast path's: no EXIF or XMP in the header, no orientation
    else:
        img.load()
    return img.getexif().get(PIL.Image.ExifTags.Base.Orientation) in _TURNED


def upright(img: PIL.Image.Image) -> PIL.Image.Image:
    """``img`` with its EXIF orientation applied (``datasets``' rule), or ``img`` itself, still undecoded, when the
    orientation leaves it as it is."""
    # exif_transpose decodes the whole image; the result has no undecoded bytes left, so every later step treats it
    # as pixels (no partial or device decode of bytes that are no longer upright).
    return PIL.ImageOps.exif_transpose(img) if is_turned(img) else img


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode (L, LA, P, RGBA, CMYK, I;16, ...) -> RGB; alpha is composited on white rather than dropped to black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = PIL.Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (PIL opens 16-bit PNGs as I;16 or I): map 0..65535 onto 0..255 rather than clipping at 255.
        grey = np.asarray(img, dtype=np.float32) / 257.0
        img = PIL.Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def to_uint8_tensor(img: PIL.Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (C, H, W) tensor, a channels-last view of one copy of the pixels (C = 1 for grey, else 3).

    Grey stays one channel here so that geometric ops touch a third of the bytes; :func:`as_rgb_tensor` expands it.
    """
    if img.mode not in ("RGB", "L"):
        img = to_rgb(img)
    # bytearray(tobytes()) is faster than numpy's copy through __array_interface__ (pil_to_tensor), same pixels.
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(img.height, img.width, len(img.getbands())).permute(2, 0, 1)


def as_rgb_tensor(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


class ToRGBTensor(torch.nn.Module):
    """PIL image of any mode -> uint8 (3, H, W) tensor (channels-last memory, one copy)."""

    def forward(self, img: PIL.Image.Image) -> torch.Tensor:
        return as_rgb_tensor(to_uint8_tensor(img))


def encoded_jpeg(img: PIL.Image.Image) -> bytes | None:
    """The undecoded bytes of a JPEG that PIL has opened but not loaded, when libjpeg-turbo can hand its pixels to
    us directly (RGB or grey: a CMYK/YCCK JPEG needs PIL's conversion); else None."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or not getattr(img, "tile", None):  # tile: not loaded yet
        return None
    if isinstance(img.fp, io.BytesIO):
        return img.fp.getvalue()  # the bytes object it was made from: no copy
    img.fp.seek(0)  # an image file PIL holds open until it loads the pixels
    return img.fp.read()


def decode_reduced(img: PIL.Image.Image, reduce: int) -> torch.Tensor:
    """Decode ``img`` (opened, not loaded) at 1/``reduce`` of its size -> uint8 (H, W, C) tensor, C = 1 for grey.

    A JPEG goes straight through libjpeg-turbo (simplejpeg): the same pixels as PIL (the same library and settings),
    without PIL's chunked Python decode loop and its copy out of PIL's image memory. Anything else, and any JPEG
    libjpeg-turbo reports a problem with (simplejpeg is strict about its warnings), goes through PIL, which decides
    what is corrupt exactly as for every other image.
    """
    data = encoded_jpeg(img)
    if data is not None:
        width, height = img.size
        try:
            array = simplejpeg.decode_jpeg(data, "GRAY" if img.mode == "L" else "RGB", min_factor=reduce,
                                           min_height=-(-height // reduce), min_width=-(-width // reduce))
            return torch.from_numpy(array)
        except ValueError:
            pass
    if reduce > 1:
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (img.width // reduce, img.height // reduce))
    return to_uint8_tensor(img).permute(1, 2, 0)


def scale_box(box: tuple[int, int, int, int], full: tuple[int, int], decoded: tuple[int, int]):
    """A (top, left, height, width) box of the full-size image mapped into the grid of the image decoded at
    ``decoded`` (height, width)."""
    if decoded == full:
        return box
    top, left, h, w = box
    sy, sx = decoded[0] / full[0], decoded[1] / full[1]
    top, left = min(decoded[0] - 1, round(top * sy)), min(decoded[1] - 1, round(left * sx))
    return top, left, min(decoded[0] - top, max(1, round(h * sy))), min(decoded[1] - left, max(1, round(w * sx)))


def decode_box(img: PIL.Image.Image, reduce: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``box`` (top, left, height, width, in full-size pixels) of ``img`` (opened, not loaded), decoded at
    1/``reduce`` of its size -> uint8 (h, w, C) tensor, C = 1 for grey.

    With the optional C extension (``hf_vit/_jpeg_crop.c``, built where libjpeg-turbo's headers are present), a JPEG
    is decoded only as far as the box needs: rows above it and columns beside it skip the IDCT and colour conversion,
    rows below it are not decoded at all (docs/data.md has the speed-up), with the same pixels as decoding everything
    and cropping. Because it stops at the box, it would miss a truncated file's missing end: a JPEG that does not end
    with the end-of-image marker is decoded in full instead (and refused, as before, when it is truncated).
    Everything the extension does not take, or reports a problem with (it treats libjpeg's warnings as errors), is
    decoded in full by :func:`decode_reduced` and cropped.
    """
    full = (img.height, img.width)
    data = encoded_jpeg(img) if _jpeg_crop is not None else None
    if data is not None and data.endswith(b"\xff\xd9"):
        reduced = (-(-full[0] // reduce), -(-full[1] // reduce))  # libjpeg's size at 1/reduce
        top, left, h, w = scale_box(box, full, reduced)
        try:
            pixels = _jpeg_crop.decode_crop(data, reduce, top, left, h, w, img.mode == "L")
            return torch.frombuffer(pixels, dtype=torch.uint8).view(h, w, -1)
        except ValueError:
            pass
    hwc = decode_reduced(img, reduce)
    top, left, h, w = scale_box(box, full, tuple(hwc.shape[:2]))
    return hwc[top:top + h, left:left + w]

