"""Decode one uploaded image into the model's input tensor, or reject it with a precise reason.

Policy (docs/service.md "Input images"):
1. Formats: PNG, JPEG, WebP, BMP, TIFF, GIF; only those Pillow plugins may parse the bytes, anything else is
   refused as "not an image" (422).
2. Animated or multi-page files (animated GIF/PNG/WebP, multi-page TIFF) are refused (422): which frame the
   caller meant is ambiguous, and silently classifying one of them is how a robustness service gets fooled.
   A GIF therefore decodes from its first (only) frame.
3. The header is checked before any pixel is decoded: a side longer than `max_side` or more than `max_pixels`
   pixels (decompression bomb) is refused, so a 50 kB PNG cannot make the server allocate gigabytes. A JPEG is
   decoded at reduced scale (libjpeg's 1/2, 1/4, 1/8; Pillow's draft mode) when the model's input is small, and
   the pixel limit applies to what is decoded: a 6000x4000 phone photo for a 28x28 model decodes 750x500 pixels.
4. EXIF orientation is applied (a phone photo is classified the way it is displayed).
5. Transparent pixels are composited onto black; the image is converted to the model's channels (L or RGB;
   16-bit greyscale is rescaled, not clipped).
6. Resize policy: if the image is not already H x W, its centre is cropped to the model's aspect ratio (the
   shorter side is kept whole) and it is resized to H x W with Pillow's antialiased bilinear filter.
7. Pixels are scaled to [0, 1] as float32, shape [C, H, W].
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Camera JPEGs with an embedded preview are MPO files whose first frame is the photo itself.
_FIRST_FRAME_FORMATS = {"MPO"}
# Pillow plugins allowed to identify a file: the supported ones, so that nothing else is even parsed.
# (Pillow >= 13 has no separate MPO opener: its JPEG plugin opens MPO files; asking for an unregistered
# format raises KeyError for any non-image, so only registered plugins are listed.)
Image.init()
_PLUGINS = [f for f in (*SUPPORTED_FORMATS, "MPO") if f in Image.OPEN]


class ImageRejected(ValueError):
    """Why an upload cannot be used as an image; the HTTP layer answers it as 422 `bad_image` with `detail`."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 4096 * 4096
    max_side: int = 8192


# The service options that raise each limit, named in the refusal (service/config.py's max_image_pixels, ...).
_RAISE_PIXELS = "the server's --max-image-pixels (SOAP_MAX_IMAGE_PIXELS) raises the limit"
_RAISE_SIDE = "the server's --max-image-side (SOAP_MAX_IMAGE_SIDE) raises the limit"


def _bad(detail: str) -> ImageRejected:
    return ImageRejected(detail)


def _open(data: bytes, limits: DecodeLimits, input_shape: tuple[int, int, int] | list[int] | None) -> Image.Image:
    """Identify the file from its header only; refuse what the policy refuses before decoding pixels. With the
    model's `input_shape`, a JPEG is set to decode at the smallest libjpeg scale that still covers it."""
    if not data:
        raise _bad("the image is empty (0 bytes)")
    try:
        # Only the supported plugins may parse the bytes: less attack surface than every format Pillow knows.
        image = Image.open(io.BytesIO(data), formats=_PLUGINS)
    except Image.DecompressionBombError:
        raise _bad(
            f"decompression bomb: the image declares more than {limits.max_pixels} pixels; {_RAISE_PIXELS}"
        ) from None
    except UnidentifiedImageError:
        raise _bad(f"not an image in a supported format ({', '.join(SUPPORTED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _bad(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1 or width > limits.max_side or height > limits.max_side:
        raise _bad(
            f"absurd dimensions {width}x{height}: each side must be between 1 and {limits.max_side} pixels; "
            f"{_RAISE_SIDE}"
        )
    if input_shape is not None and image.format in ("JPEG", "MPO"):
        channels, height_in, width_in = input_shape
        side = max(height_in, width_in)
        image.draft("L" if channels == 1 else "RGB", (side, side))  # sets `size` to what will be decoded
        width, height = image.size
    if width * height > limits.max_pixels:
        raise _bad(
            f"decompression bomb: {width}x{height} = {width * height} pixels is more than {limits.max_pixels}; "
            f"{_RAISE_PIXELS}"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in _FIRST_FRAME_FORMATS:
        raise _bad(f"animated or multi-page {image.format} with {frames} frames; send a single still image")
    return image


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert to L (1 channel) or RGB (3 channels), compositing transparency onto black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 255.0 if array.max(initial=0) > 1.0 else 1.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the target aspect ratio, then resize (antialiased bilinear)."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    if w * height != h * width:
        if w * height > h * width:  # too wide: keep full height
            crop_w = max(1, round(h * width / height))
            left = (w - crop_w) // 2
            image = image.crop((left, 0, left + crop_w, h))
        else:  # too tall: keep full width
            crop_h = max(1, round(w * height / width))
            top = (h - crop_h) // 2
            image = image.crop((0, top, w, top + crop_h))
    return image.resize((width, height), Image.Resampling.BILINEAR)


def decode_image(
    data: bytes, input_shape: tuple[int, int, int] | list[int], limits: DecodeLimits = DecodeLimits()
) -> torch.Tensor:
    """Bytes of one uploaded file -> float32 tensor [C, H, W] in [0, 1]. Raises ImageRejected."""
    return decode_opened(open_image(data, limits, input_shape), input_shape)


def open_image(
    data: bytes, limits: DecodeLimits = DecodeLimits(), input_shape: tuple[int, int, int] | list[int] | None = None
) -> Image.Image:
    """Step 1, cheap: read and check the header only (format, size, frames). Raises ImageRejected.
    `image.size` then tells the caller how expensive `decode_opened` will be (for a JPEG opened with the model's
    `input_shape`: the reduced size its pixels will be decoded at)."""
    return _open(data, limits, input_shape)


def decode_opened(source: Image.Image, input_shape: tuple[int, int, int] | list[int]) -> torch.Tensor:
    """Step 2: decode the pixels of an `open_image` result and apply the policy; closes `source`."""
    channels, height, width = input_shape
    try:
        source.seek(0)
        if source.format in ("JPEG", "MPO"):  # let libjpeg downscale by 2/4/8 while decoding a large photo
            side = max(height, width)
            source.draft("L" if channels == 1 else "RGB", (side, side))  # (a no-op when open_image set it)
        source.load()  # decodes the pixels; raises on truncated data
        image = source
        # exif_transpose reads the same tag but copies every image, rotated or not (~30 µs of event loop per
        # 28x28 digit): only rotate images that say they need it.
        if source.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(source)
        image = _to_channels(image, channels)
        image = _resize(image, height, width)
        array = np.asarray(image, dtype=np.float32)  # one copy, straight to float (was: uint8, copy, float)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, MemoryError):
        raise _bad("decompression bomb: decoding the image needs too much memory") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error) as exc:
        raise _bad(f"truncated or corrupt image data: {exc}") from None
    finally:
        source.close()
    np.divide(array, np.float32(255.0), out=array)  # in numpy: a torch op per image costs more than its maths
    return torch.from_numpy(array[None]) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1).contiguous()


def encode_png(image: torch.Tensor) -> bytes:
    """[C, H, W] tensor in [0, 1] -> PNG bytes (rounded to 8 bits)."""
    pixels = image.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
