"""The shared vocabulary of the data path: frames in, predictions and alerts out.

Everything that crosses a module boundary is one of these small dataclasses, so that
sources, models, sinks and the Ray pipeline agree on names without importing each other.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

if TYPE_CHECKING:  # torch is not imported at run time: ingest processes never need it
    import torch

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_PIXELS",
    "Alert",
    "DecodeError",
    "Frame",
    "Prediction",
    "ScoredFrame",
    "as_rgb_uint8",
    "decode_image",
    "encode_frame",
    "encode_jpeg",
    "frame_from_record",
    "image_header_size",
    "resize_image",
    "sniff_content_type",
    "to_json",
]


class DecodeError(ValueError):
    """A frame's bytes are not an image we can decode."""


@dataclass
class Frame:
    """One camera frame.

    ``image`` is an H×W×3 uint8 RGB array, or the encoded bytes (JPEG/PNG) until the
    ingest stage decodes it. ``origin`` says where the frame came from (file path and
    index, or Kafka topic/partition/offset) so it can be acknowledged; ``meta`` carries
    extras such as the synthetic camera's ground truth (``anomaly``, ``kind``).
    """

    camera_id: str
    seq: int
    timestamp: float
    image: np.ndarray | bytes
    origin: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_decoded(self) -> bool:
        return isinstance(self.image, np.ndarray)


@dataclass
class Prediction:
    """What a model returns for a batch of B images.

    ``score`` is normalised to [0, 1] (0.5 is the default alert threshold for every
    model); ``anomaly_map`` is [B, H, W] in the same scale, or None for models without
    localisation; ``boxes`` holds per-item [N, 5] arrays (x1, y1, x2, y2, score) for
    region-based video models.
    """

    score: torch.Tensor
    anomaly_map: torch.Tensor | None = None
    label: torch.Tensor | None = None
    boxes: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.label is None:
            self.label = self.score >= 0.5

    def to(self, device: str | torch.device) -> Prediction:
        return Prediction(
            score=self.score.to(device),
            anomaly_map=None if self.anomaly_map is None else self.anomaly_map.to(device),
            label=None if self.label is None else self.label.to(device),
            boxes=None if self.boxes is None else [b.to(device) for b in self.boxes],
        )


@dataclass
class ScoredFrame:
    """A frame after scoring: what the sinks and the alert logic see.

    ``image`` (the model-sized RGB frame) and ``anomaly_map`` (uint8, 0–255 for scores
    0–1) are kept so that a snapshot can be drawn when an alert opens; sinks that write
    score records use only the scalar fields.
    """

    camera_id: str
    seq: int
    timestamp: float
    score: float
    label: bool
    model: str
    latency_ms: float
    origin: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None
    boxes: list[list[float]] | None = None

    def record(self) -> dict[str, Any]:
        """The scores wire format: ``{camera_id, seq, ts, score, label, model, latency_ms, origin}``."""
        return {
            "camera_id": self.camera_id,
            "seq": self.seq,
            "ts": self.timestamp,
            "score": round(float(self.score), 6),
            "label": bool(self.label),
            "model": self.model,
            "latency_ms": round(float(self.latency_ms), 3),
            "origin": self.origin,
        }


AlertState = Literal["open", "update", "close"]


@dataclass
class Alert:
    """An alert event for one camera: opened, updated while it lasts, closed.

    ``alert_id`` is globally unique (a UUIDv7), the same on every event of one alert;
    ``seq`` is the frame that caused the event, ``start_seq`` the first frame of the alert.
    """

    alert_id: str
    camera_id: str
    state: AlertState
    started_at: float
    ended_at: float | None
    peak_score: float
    frames: int
    model: str = ""
    snapshot: str | None = None
    seq: int = -1
    boxes: list[list[float]] | None = None
    start_seq: int = -1
    model_version: int | None = None
    """model.scope camera: the version of the camera's head that scored the frame of this event."""

    def record(self) -> dict[str, Any]:
        """The alerts wire format."""
        out = dataclasses.asdict(self)
        out["peak_score"] = round(float(self.peak_score), 6)
        return out


# --------------------------------------------------------------------------- wire JSON


def _json_default(value: Any) -> Any:
    """Make numpy values, bytes and paths (which may turn up in ``origin``) serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    return repr(value)


def to_json(record: dict[str, Any]) -> str:
    """One record of the wire formats as compact JSON (the JSONL lines and the Kafka values)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=_json_default)


# --------------------------------------------------------------------------- codecs

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))

DEFAULT_MAX_PIXELS = 50_000_000
"""The default pixel budget of one frame (50 MP, about 150 MB decoded): larger declared sizes are refused."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless, hierarchical, arithmetic);
# C4 (DHT), C8 (JPG) and CC (DAC) share the range but carry no size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def image_header_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """The (width, height) a PNG or JPEG declares in its header, read without decoding.

    Returns None for other formats (the decoder then decides). Raises ``DecodeError`` for a
    PNG or JPEG whose header is truncated or malformed before it gets to the size.
    """
    head = bytes(data[:8])
    if head == _PNG_SIGNATURE:
        chunk = bytes(data[8:24])
        if len(chunk) < 16 or chunk[4:8] != b"IHDR":
            raise DecodeError("cannot decode PNG: its header is truncated or does not start with IHDR")
        return int.from_bytes(chunk[8:12], "big"), int.from_bytes(chunk[12:16], "big")
    if head[:2] == b"\xff\xd8":
        shape = _jpeg_shape(data)
        if shape is None:
            raise DecodeError("cannot decode JPEG: header truncated or malformed (no frame header before the data)")
        h, w = shape
        return w, h
    return None


def decode_image(
    data: bytes | bytearray | memoryview,
    size_hint: tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode JPEG/PNG (or anything OpenCV reads) bytes to an H×W×3 uint8 RGB array.

    Every failure is a ``DecodeError``, whatever the decoder raised, so that one bad payload is a
    dead letter and never ends a reader. ``max_pixels`` is checked against the size a PNG or JPEG
    declares in its header *before* decoding (a 57-byte PNG can declare 40000×40000), and against
    the decoded size for other formats; None disables it.

    With ``size_hint`` (H, W) the JPEG decoder downsizes inside the DCT by the largest
    power of two that keeps the image at least that big, which is several times faster
    than decoding at full size and resizing afterwards.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise DecodeError("cannot decode an empty image payload (0 bytes)")
    declared = image_header_size(data)
    if declared is not None:
        w, h = declared
        if w == 0 or h == 0:
            raise DecodeError(f"cannot decode: the image header declares an empty image ({w}x{h})")
        _check_pixels(w, h, max_pixels, "declares")
    flag = cv2.IMREAD_COLOR
    if size_hint is not None and declared is not None and bytes(buf[:2]) == b"\xff\xd8":
        flag = _reduced_flag(declared[1], declared[0], size_hint)
    try:
        img = cv2.imdecode(buf, flag)
    except Exception as e:  # cv2.error, MemoryError, ...: a bad payload, never a crash
        raise DecodeError(f"cannot decode {buf.size} bytes as an image: {type(e).__name__}: {_first_line(e)}") from e
    if img is None:
        raise DecodeError(f"cannot decode {buf.size} bytes as an image (not JPEG/PNG, or truncated)")
    if declared is None:
        _check_pixels(img.shape[1], img.shape[0], max_pixels, "decodes to")
    try:
        if img.ndim == 2:
            return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except Exception as e:
        raise DecodeError(f"cannot convert the decoded image of shape {img.shape}: {_first_line(e)}") from e


def _check_pixels(w: int, h: int, max_pixels: int | None, verb: str) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError(
            f"image {verb} {w}x{h} = {w * h} pixels, over max_pixels = {max_pixels} "
            "(raise the source's max_pixels to accept it)"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else "(no message)"


def _reduced_flag(h: int, w: int, size_hint: tuple[int, int]) -> int:
    for factor, flag in _REDUCED:
        if h // factor >= size_hint[0] and w // factor >= size_hint[1]:
            return flag
    return cv2.IMREAD_COLOR


def _jpeg_shape(data: bytes | bytearray | memoryview | np.ndarray) -> tuple[int, int] | None:
    """Read (H, W) from a JPEG's SOF marker without decoding it; None when there is none before the scan.

    Walks the marker segments by their lengths (APPn segments such as EXIF can be large), so
    only the segment headers are read.
    """
    mv = memoryview(data.tobytes() if isinstance(data, np.ndarray) else data).cast("B")
    n = len(mv)
    i = 2
    while i + 1 < n:
        if mv[i] != 0xFF:
            return None
        marker = mv[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        if i + 4 > n:
            return None
        length = int.from_bytes(mv[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(mv[i + 5 : i + 7], "big"), int.from_bytes(mv[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 RGB array as JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB array to (H, W); area interpolation when shrinking."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = image.shape[0] > h or image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check (and where unambiguous, coerce) an array to H×W×3 uint8 RGB."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DecodeError(f"expected an H×W×3 image, got shape {tuple(image.shape)}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise DecodeError(f"expected uint8 pixels, got {image.dtype}")
    return np.ascontiguousarray(image)


# ----------------------------------------------------------------------------- Kafka wire format
# One message per frame: value = JPEG or PNG bytes; key = camera_id; headers ``camera_id``,
# ``ts`` (capture time, epoch ms), ``seq``, ``content-type`` (see oddeye.sources.kafka).

CONTENT_TYPES = {"image/jpeg": "image/jpeg", "image/jpg": "image/jpeg", "image/png": "image/png"}
UNKNOWN_CAMERA = "unknown"


def sniff_content_type(data: bytes | bytearray | memoryview) -> str | None:
    """``image/jpeg`` or ``image/png`` from the magic bytes, else None."""
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if head == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return None


def encode_frame(frame: Frame, quality: int = 90) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A frame as a message: ``(key, value, headers)``.

    Arrays are encoded as JPEG; JPEG/PNG bytes pass through unchanged (other encoded bytes,
    e.g. BMP, are decoded and re-encoded as JPEG).
    """
    image = frame.image
    if isinstance(image, np.ndarray):
        value, ctype = encode_jpeg(image, quality), "image/jpeg"
    else:
        value = bytes(image)
        ctype = sniff_content_type(value)
        if ctype is None:
            value, ctype = encode_jpeg(decode_image(value), quality), "image/jpeg"
    key = frame.camera_id.encode()
    headers = [
        ("camera_id", key),
        ("ts", str(round(frame.timestamp * 1000)).encode()),
        ("seq", str(int(frame.seq)).encode()),
        ("content-type", ctype.encode()),
    ]
    return key, value, headers


def _header_map(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Headers as a dict (the first of duplicated names wins); None values are dropped."""
    out: dict[str, bytes] = {}
    for name, value in headers or ():
        if value is not None and name not in out:
            out[name] = bytes(value)
    return out


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def frame_from_record(record: Any, max_message_bytes: int = 20_000_000) -> Frame:
    """A ``Frame`` from a consumer record (``topic, partition, offset, key, value, headers, timestamp``).

    Never raises: a message that cannot be scored comes back with ``meta["error"]`` (what is
    wrong) and ``meta["error_reason"]`` (a short label: ``missing_camera_id``, ``bad_header``,
    ``content_type``, ``empty``, ``oversized``). ``meta["_kafka_key"]`` and
    ``meta["_kafka_headers"]`` keep the original key and headers for the dead-letter topic.

    - camera_id: the ``camera_id`` header, else the key (UTF-8); neither is an error.
    - seq: the ``seq`` header; missing → the message offset (unique and increasing within
      a partition, and producers key by camera so a camera stays in one partition); present
      but not an integer → error (a producer bug must not silently reorder a camera).
    - ts: the ``ts`` header (epoch ms); missing → the message timestamp; garbled → error.
    - content-type: JPEG or PNG (``image/jpg`` accepted, parameters after ``;`` ignored);
      missing → accepted, the decoder decides; anything else → error.
    - value: empty (or a tombstone) → error; larger than ``max_message_bytes`` → error, and
      the payload is not kept (the dead letter carries the headers and the size only).
    """
    headers = list(record.headers or ())
    hmap = _header_map(headers)
    value = record.value
    origin = {"topic": record.topic, "partition": int(record.partition), "offset": int(record.offset)}
    meta: dict[str, Any] = {"_kafka_key": record.key, "_kafka_headers": headers}
    errors: list[tuple[str, str]] = []

    camera_id = _text(hmap.get("camera_id")) or _text(record.key)
    if camera_id is None:
        errors.append(("missing_camera_id", "no camera_id header and no message key"))

    seq = int(record.offset)
    if "seq" in hmap:
        try:
            seq = int(_text(hmap["seq"]) or "")
        except ValueError:
            errors.append(("bad_header", f"seq header {hmap['seq'][:32]!r} is not an integer"))

    ts_ms = getattr(record, "timestamp", None)
    if "ts" in hmap:
        try:
            ts_ms = float(_text(hmap["ts"]) or "")
            if not np.isfinite(ts_ms):
                raise ValueError
        except ValueError:
            errors.append(("bad_header", f"ts header {hmap['ts'][:32]!r} is not epoch milliseconds"))
            ts_ms = None
    timestamp = float(ts_ms) / 1000.0 if ts_ms is not None and ts_ms >= 0 else time.time()

    ctype_raw = hmap.get("content-type")
    if ctype_raw is not None:
        ctype = (_text(ctype_raw) or "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            errors.append(("content_type", f"unsupported content-type {ctype_raw[:64]!r} (JPEG or PNG only)"))

    image: bytes = b""
    if value is None or len(value) == 0:
        errors.append(("empty", "message has no value"))
    elif len(value) > max_message_bytes:
        errors.append(("oversized", f"value of {len(value)} bytes exceeds max_message_bytes={max_message_bytes}"))
        meta["value_bytes"] = len(value)
    else:
        image = bytes(value)

    if errors:
        meta["error"] = "; ".join(text for _, text in errors)
        meta["error_reason"] = errors[0][0]
    return Frame(camera_id=camera_id or UNKNOWN_CAMERA, seq=seq, timestamp=timestamp, image=image,
                 origin=origin, meta=meta)  # fmt: skip
