"""Image decoding: every bad payload is a DecodeError, and a pixel budget is checked from the header first."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from oddeye.config import parse_config
from oddeye.frames import DEFAULT_MAX_PIXELS, DecodeError, decode_image, encode_jpeg, image_header_size


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid-looking PNG header declaring width×height RGB pixels, with an empty image stream: 57 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b"")


def _jpeg(h: int = 48, w: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    return encode_jpeg((rng.random((h, w, 3)) * 255).astype(np.uint8))


def test_png_bomb_is_refused_from_its_header() -> None:
    data = png_bomb()
    assert len(data) == 57
    assert image_header_size(data) == (40_000, 40_000)
    with pytest.raises(DecodeError, match=r"declares 40000x40000 = 1600000000 pixels, over max_pixels = 50000000"):
        decode_image(data)


def test_decoder_exceptions_become_decode_errors() -> None:
    # Without the budget, OpenCV itself raises cv2.error for this header: it must not escape.
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(png_bomb(), np.uint8), cv2.IMREAD_COLOR)
    with pytest.raises(DecodeError, match="cannot decode 57 bytes"):
        decode_image(png_bomb(), max_pixels=None)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty image payload"),
        (b"not an image at all" * 4, "cannot decode"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "cannot decode PNG: its header is truncated"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "cannot decode JPEG: header truncated"),
    ],
)
def test_garbage_empty_and_truncated_headers(payload: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_image(payload)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(keep: float) -> None:
    data = _jpeg()
    with pytest.raises(DecodeError):
        decode_image(data[: int(len(data) * keep)])


def test_budget_is_configurable_and_exact() -> None:
    data = _jpeg(48, 64)
    assert image_header_size(data) == (64, 48)
    assert decode_image(data, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(DecodeError, match="declares 64x48 = 3072 pixels, over max_pixels = 3071"):
        decode_image(data, max_pixels=64 * 48 - 1)
    # Formats without a parsed header (BMP here) are checked after decoding.
    ok, bmp = cv2.imencode(".bmp", np.zeros((10, 20, 3), np.uint8))
    assert ok and image_header_size(bmp.tobytes()) is None
    with pytest.raises(DecodeError, match="decodes to 20x10 = 200 pixels"):
        decode_image(bmp.tobytes(), max_pixels=199)


def test_jpeg_header_after_large_app_segment_and_reduced_decode() -> None:
    data = _jpeg(64, 96)
    app = b"\xff\xe1" + struct.pack(">H", 60_002) + b"\x00" * 60_000  # a big EXIF-like segment before SOF
    padded = data[:2] + app + data[2:]
    assert image_header_size(padded) == (96, 64)
    assert decode_image(padded, size_hint=(32, 48)).shape == (32, 48, 3)


def test_source_config_has_max_pixels() -> None:
    cfg = parse_config({"sources": [{"type": "images", "path": "x"}]})
    assert cfg.sources[0].max_pixels == DEFAULT_MAX_PIXELS == 50_000_000
    cfg = parse_config({"sources": [{"type": "kafka", "max_pixels": 1000}]})
    assert cfg.sources[0].max_pixels == 1000
