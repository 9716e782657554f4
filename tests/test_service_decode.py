"""Image decoding policy (service/decode.py) on real MNIST digits: formats, EXIF, channels, resize, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support import bad_images, encode, mnist_image, mnist_png

from service.decode import DecodeLimits, ImageRejected, decode_image, encode_png

MNIST_SHAPE = (1, 28, 28)


def reference(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0).unsqueeze(0)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("PNG", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("GIF", {}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_lossless_formats_decode_to_the_exact_pixels(fmt, kwargs):
    digit = mnist_image(5)
    decoded = decode_image(encode(digit, fmt, **kwargs), MNIST_SHAPE)
    assert decoded.shape == MNIST_SHAPE
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, reference(digit))


def test_jpeg_and_lossy_webp_decode_close_to_the_original():
    digit = mnist_image(2)
    for fmt, kwargs in (("JPEG", {"quality": 95}), ("WEBP", {"quality": 95})):
        decoded = decode_image(encode(digit, fmt, **kwargs), MNIST_SHAPE)
        assert (decoded - reference(digit)).abs().mean() < 0.02, fmt
        assert decoded.min() >= 0.0
        assert decoded.max() <= 1.0


def test_gif_decodes_its_first_and_only_frame():
    digit = mnist_image(8)
    assert torch.equal(decode_image(encode(digit, "GIF"), MNIST_SHAPE), reference(digit))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    digit = mnist_image(7)
    stored = digit.transpose(Image.Transpose.ROTATE_90)  # what a camera would store for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    kwargs = {"quality": 100} if fmt == "JPEG" else {}
    decoded = decode_image(encode(stored, fmt, exif=exif, **kwargs), MNIST_SHAPE)
    untagged = decode_image(encode(stored, fmt, **kwargs), MNIST_SHAPE)
    assert (decoded - reference(digit)).abs().mean() < 0.01
    assert (untagged - reference(digit)).abs().mean() > 0.05  # the tag made the difference


def test_colour_input_is_converted_to_the_models_channels():
    digit = mnist_image(4)
    rgb = Image.merge("RGB", (digit, digit, digit))
    assert torch.equal(decode_image(encode(rgb, "PNG"), MNIST_SHAPE), reference(digit))
    # A 3-channel model gets the greyscale digit replicated into R, G and B.
    as_rgb = decode_image(encode(digit, "PNG"), (3, 28, 28))
    assert as_rgb.shape == (3, 28, 28)
    assert torch.equal(as_rgb[0], as_rgb[2])
    assert torch.equal(as_rgb[:1], reference(digit))


def test_transparency_is_composited_onto_black():
    digit = mnist_image(9)
    white = Image.new("L", digit.size, 255)
    rgba = Image.merge("RGBA", (white, white, white, digit))  # white ink, alpha = the digit
    decoded = decode_image(encode(rgba, "PNG"), MNIST_SHAPE)
    assert (decoded - reference(digit)).abs().max() <= 1 / 255 + 1e-6


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    digit = mnist_image(6)
    wide = Image.fromarray((np.asarray(digit, dtype=np.uint16) * 257).astype("<u2"))
    assert wide.mode.startswith("I;16")
    decoded = decode_image(encode(wide, "PNG"), MNIST_SHAPE)
    assert (decoded - reference(digit)).abs().max() <= 1 / 255 + 1e-6


def test_resize_policy_scales_a_larger_square_image_down():
    digit = mnist_image(0)
    big = digit.resize((112, 112), Image.Resampling.NEAREST)
    decoded = decode_image(encode(big, "PNG"), MNIST_SHAPE)
    assert decoded.shape == MNIST_SHAPE
    assert (decoded - reference(digit)).abs().mean() < 0.03


def test_resize_policy_centre_crops_to_the_models_aspect_ratio():
    digit = mnist_image(3)
    for size, box in (((84, 28), (28, 0)), ((28, 84), (0, 28))):  # wide, tall: digit in the middle third
        canvas = Image.new("L", size, 255)  # white margins the crop must remove
        canvas.paste(digit, box)
        assert torch.equal(decode_image(encode(canvas, "PNG"), MNIST_SHAPE), reference(digit))


@pytest.mark.parametrize("name", list(bad_images()))
def test_bad_images_are_refused_with_a_reason(name):
    payload, word = bad_images()[name]
    with pytest.raises(ImageRejected) as info:
        decode_image(payload, MNIST_SHAPE)
    assert word in info.value.detail


def test_pixel_and_side_limits_are_configurable():
    big = encode(Image.new("L", (300, 300)), "PNG")
    assert decode_image(big, MNIST_SHAPE).shape == MNIST_SHAPE
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(big, MNIST_SHAPE, DecodeLimits(max_pixels=200 * 200, max_side=8192))
    with pytest.raises(ImageRejected, match="dimensions"):
        decode_image(big, MNIST_SHAPE, DecodeLimits(max_pixels=10**8, max_side=299))


def test_encode_png_round_trips():
    x = decode_image(mnist_png(1), MNIST_SHAPE)
    assert torch.equal(decode_image(encode_png(x), MNIST_SHAPE), x)
