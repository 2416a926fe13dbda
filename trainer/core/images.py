"""The one image decoder: bytes from outside (uploads, folders, shards) to a uint8 (C, size, size) tensor.

Every path that decodes images (the image folder, the streaming shards, predict and serve) comes here,
so all of them treat hostile bytes alike. Pillow decodes, not torchvision.io: torchvision 0.29's PNG
decoder kills the process (SIGSEGV) on short or corrupt pixel data, where Pillow raises. Only the
formats below are tried (Pillow knows dozens, some of which hand the bytes to other programs), the
pixel count is read from the header and checked before anything is decoded, and a multi-frame image
(an animated GIF or WebP) gives its first frame, so every image is one (C, H, W) picture.
"""

import io
import re
import warnings
import zlib

import numpy as np
import torch
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo: 120 MB as RGB while it is resized


class ImageError(ValueError):
    """Bytes that are not an image this framework decodes; the message says why, without the bytes."""


class ImageTooLarge(ImageError):
    pass


def open_image(
    data: bytes, max_pixels: int, limit_key: str = "max_image_pixels", expect: str | None = None
) -> Image.Image:
    """The image's header, read and checked: one of FORMATS (`expect`, when the sender named one), at
    most `max_pixels` pixels. Nothing is decoded yet (Pillow opens lazily)."""
    if not data:
        raise ImageError("empty: no image bytes")
    try:
        with warnings.catch_warnings():  # Pillow warns of "decompression bombs" above 89 MP; we check below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # over Pillow's own limit (179 MP), which it checks first
        declared = re.search(r"\((\d+) pixels\)", str(e))
        size = f" of {int(declared.group(1)):,} pixels" if declared else ""
        raise ImageTooLarge(f"an image{size} is over {limit_key}={max_pixels:,}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a PNG, JPEG, WebP or GIF image") from None
    except Exception as e:  # a known format's header, damaged: SyntaxError, struct.error, OSError...
        raise ImageError(f"not a PNG, JPEG, WebP or GIF image ({_reason(e)})") from None
    if expect is not None and image.format != expect:
        raise ImageError(
            f"the bytes are a {image.format} image, not {expect} as declared; declare "
            f"image/{image.format.lower()} or application/octet-stream"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{image.format} image of {width}x{height} pixels: nothing to decode")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{image.format} image of {width}x{height} = {width * height:,} pixels is over "
            f"{limit_key}={max_pixels:,}"
        )
    return image


def decode_image(
    data: bytes,
    size: int,
    channels: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limit_key: str = "max_image_pixels",
    expect: str | None = None,
) -> torch.Tensor:
    """Encoded bytes to a uint8 (channels, size, size) image: shorter side resized to `size`,
    centre-cropped. Raises ImageError (a ValueError) for anything it cannot decode, and nothing else."""
    image = open_image(data, max_pixels, limit_key, expect)
    try:
        if image.format == "PNG":
            check_png_rows(data)
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))  # the first frame; decodes
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt pixel data, a palette out of range...
        raise ImageError(f"{image.format} image with damaged data ({_reason(e)})") from None
    finally:
        image.close()
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor.unsqueeze(0)
    return resize_and_crop(tensor, size)


def decode_mask(
    data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, limit_key: str = "max_image_pixels"
) -> torch.Tensor:
    """A segmentation mask (a PNG of class indices: greyscale, or a palette image whose indices are the
    classes, as VOC's) to a uint8 (size, size) tensor, with the same resize-and-crop geometry as its
    image but nearest-neighbour, so no new values appear. ImageError for anything else."""
    image = open_image(data, max_pixels, limit_key)
    try:
        if image.format != "PNG" or image.mode not in ("L", "P"):
            raise ImageError(
                f"a mask must be a greyscale or palette PNG of class indices, got {image.format} "
                f"mode {image.mode}"
            )
        check_png_rows(data)
        try:
            pixels = np.asarray(image)  # palette images give their indices
        except Exception as e:
            raise ImageError(f"PNG mask with damaged data ({_reason(e)})") from None
    finally:
        image.close()
    return resize_and_crop(torch.from_numpy(pixels.copy()).unsqueeze(0), size, nearest=True)[0]


PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png_rows(data: bytes) -> None:
    """ImageError when a PNG's pixel data (its IDAT chunks, inflated) is shorter than its header's size
    needs: Pillow ends a zlib stream that closes early without a word and fills the missing rows with
    zeros. The data is inflated in pieces and counted, never held whole."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return  # Pillow has read the header; a shape this check does not know is left to it
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlaced = data[24], data[25], data[28]
    bits = depth * PNG_CHANNELS.get(colour, 1)
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + -(-columns * bits // 8))  # each row: a filter byte, then its pixels
    inflate, found, position = zlib.decompressobj(), 0, 8
    while position + 8 <= len(data) and found < expected:
        length, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
        if kind == b"IDAT":
            pending = data[position + 8 : position + 8 + length]
            while pending and found < expected:
                try:
                    found += len(inflate.decompress(pending, 1 << 20))
                except zlib.error as e:
                    raise ImageError(f"PNG image with damaged data ({_reason(e)})") from None
                pending = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        position += 12 + length
    if found < expected:
        raise ImageError(
            f"PNG image with damaged data (its pixel data holds {found:,} of the {expected:,} bytes "
            f"its {width}x{height} header needs)"
        )


def resize_and_crop(image: torch.Tensor, size: int, nearest: bool = False) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    how = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
    return TF.center_crop(TF.resize(image, size, interpolation=how, antialias=not nearest), [size, size])


def _reason(error: Exception) -> str:
    """The decoder's reason, short, on one line, and never the bytes themselves."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:100]
