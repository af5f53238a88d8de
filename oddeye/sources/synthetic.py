"""A synthetic camera with ground truth: a textured scene, walking figures, scheduled anomalies.

The demo, the tests and the benchmarks need a camera that runs anywhere, is reproducible
frame by frame, and says which frames are anomalous and where. Every frame is a pure
function of ``(seed, seq)``: the background depends only on ``seed``, the figures follow
smooth looping paths, and anomalies follow a fixed schedule, so a fit source
(``anomaly_every=0``) and a stream source can be built independently and still agree.

Speed (one core, cv2.setNumThreads(1)): about 6,600 frames/s at 320×240 as arrays, 2,600
with ``encode=True``; measure with ``sum(1 for _ in SyntheticCamera(num_frames=3000))``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from oddeye.frames import Frame, encode_jpeg
from oddeye.sources.base import Source

__all__ = ["ANOMALY_KINDS", "SyntheticCamera"]

log = logging.getLogger(__name__)

ANOMALY_KINDS = ("foreign_object", "texture_defect", "wrong_motion")

# Muted, mutually distinct figure colours (RGB); never the saturated magenta/yellow of foreign objects.
_PALETTE = (
    (40, 80, 200),
    (40, 150, 60),
    (190, 50, 40),
    (30, 140, 150),
    (220, 130, 30),
    (120, 50, 160),
    (200, 70, 130),
    (30, 40, 100),
)
_FOREIGN_COLOURS = ((255, 0, 255), (255, 255, 0))
_NOISE_VARIANTS = 8  # backgrounds with baked-in sensor noise, picked by seq
_SHIFT = 4  # cv2 fixed-point bits: figures move smoothly at sub-pixel steps
_ONE = 1 << _SHIFT
_WRONG_SPEED = 5.0  # a wrong-motion figure runs backwards along its path this many times too fast


@dataclass(frozen=True)
class _Figure:
    """A person-like figure: colour, size and a Lissajous path over the floor."""

    colour: tuple[int, int, int]
    height: float
    cx: float
    ax: float
    tx: float
    px: float
    cy: float
    ay: float
    ty: float
    py: float

    def feet(self, t: float) -> tuple[float, float]:
        x = self.cx + self.ax * math.sin(2 * math.pi * t / self.tx + self.px)
        y = self.cy + self.ay * math.sin(2 * math.pi * t / self.ty + self.py)
        return x, y


class SyntheticCamera(Source):
    """A reproducible camera: frame ``seq`` is identical whenever it is generated.

    Frames with ``(seq % anomaly_every) >= anomaly_every - anomaly_duration`` are
    anomalous; the kind cycles through ``anomaly_kinds`` by period. ``meta`` carries the
    ground truth: ``anomaly`` (bool), ``kind`` and ``box`` ([x1, y1, x2, y2] pixels).
    Timestamps follow a simulated clock, ``start_time + (seq - start_seq) / fps``, unless
    ``realtime``, which paces iteration to ``fps`` and stamps frames with the wall clock.
    """

    def __init__(
        self,
        camera_id: str = "synthetic-0",
        width: int = 320,
        height: int = 240,
        fps: float = 10.0,
        num_frames: int | None = 600,
        seed: int = 0,
        realtime: bool = False,
        anomaly_every: int = 100,
        anomaly_duration: int = 20,
        anomaly_kinds: Sequence[str] = ANOMALY_KINDS,
        num_objects: int = 3,
        start_time: float | None = None,
        encode: bool = False,
        start_seq: int = 0,
    ) -> None:
        super().__init__()
        if width < 32 or height < 32:
            raise ValueError(f"width and height must be at least 32 pixels, got {width}x{height}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if num_frames is not None and num_frames < 0:
            raise ValueError(f"num_frames must be >= 0 or None (endless), got {num_frames}")
        if anomaly_every < 0:
            raise ValueError(f"anomaly_every must be >= 0 (0 = no anomalies), got {anomaly_every}")
        if anomaly_every > 0 and not 0 <= anomaly_duration <= anomaly_every:
            raise ValueError(f"anomaly_duration must be in [0, anomaly_every={anomaly_every}], got {anomaly_duration}")
        if num_objects < 0:
            raise ValueError(f"num_objects must be >= 0, got {num_objects}")
        kinds = tuple(anomaly_kinds)
        unknown = [k for k in kinds if k not in ANOMALY_KINDS]
        if unknown:
            raise ValueError(f"unknown anomaly kind(s) {unknown}; allowed: {list(ANOMALY_KINDS)}")
        scheduled = anomaly_every > 0 and anomaly_duration > 0
        if scheduled and not kinds:
            raise ValueError(f"anomaly_kinds is empty; allowed: {list(ANOMALY_KINDS)} (or set anomaly_every=0)")
        if scheduled and "wrong_motion" in kinds and num_objects == 0:
            raise ValueError("anomaly kind 'wrong_motion' needs num_objects >= 1")

        self.camera_id = camera_id
        self.width = int(width)
        self.height = int(height)
        self.fps = float(fps)
        self.num_frames = num_frames
        self.seed = int(seed)
        self.realtime = realtime
        self.live = realtime
        self.anomaly_every = int(anomaly_every)
        self.anomaly_duration = int(anomaly_duration)
        self.anomaly_kinds = kinds
        self.num_objects = int(num_objects)
        self.start_time = time.time() if start_time is None else float(start_time)
        self.encode = encode
        self.start_seq = int(start_seq)

        self._horizon, self._backgrounds = self._make_backgrounds()
        self._figures = self._make_figures()

    # ------------------------------------------------------------------ public

    def __iter__(self) -> Iterator[Frame]:
        seq = self.start_seq
        end = None if self.num_frames is None else self.start_seq + self.num_frames
        t0 = time.monotonic()
        while end is None or seq < end:
            if self.realtime:
                delay = t0 + (seq - self.start_seq) / self.fps - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield self.frame_at(seq, timestamp=time.time() if self.realtime else None)
            seq += 1

    def frame_at(self, seq: int, timestamp: float | None = None) -> Frame:
        """Frame ``seq``, stamped on the simulated clock unless ``timestamp`` is given."""
        image, meta = self.render(seq)
        if timestamp is None:
            timestamp = self.start_time + (seq - self.start_seq) / self.fps
        payload: np.ndarray | bytes = encode_jpeg(image) if self.encode else image
        return Frame(
            camera_id=self.camera_id,
            seq=seq,
            timestamp=timestamp,
            image=payload,
            origin={"source": "synthetic", "seq": seq},
            meta=meta,
        )

    def anomaly_kind(self, seq: int) -> str | None:
        """The scheduled anomaly kind at ``seq``, or None for a normal frame."""
        every, duration = self.anomaly_every, self.anomaly_duration
        if every <= 0 or duration <= 0 or seq % every < every - duration:
            return None
        return self.anomaly_kinds[(seq // every) % len(self.anomaly_kinds)]

    def render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        """The RGB image and ground truth (``anomaly``, ``kind``, ``box``) of frame ``seq``."""
        image = self._backgrounds[seq % _NOISE_VARIANTS].copy()
        kind = self.anomaly_kind(seq)
        box: list[int] | None = None
        period = seq // self.anomaly_every if kind else 0
        step = seq % self.anomaly_every - (self.anomaly_every - self.anomaly_duration) if kind else 0
        if kind == "texture_defect":
            box = self._draw_texture_defect(image, period)
        wrong = period % self.num_objects if kind == "wrong_motion" else -1
        for i, fig in enumerate(self._figures):
            if i != wrong:
                self._draw_figure(image, fig, float(seq))
        if wrong >= 0:  # drawn last so that it is never hidden
            # Teleported half a loop away, then running backwards along its path, fast.
            fig = self._figures[wrong]
            box = self._draw_figure(image, fig, period * self.anomaly_every + fig.tx / 2 - _WRONG_SPEED * step)
        if kind == "foreign_object":
            box = self._draw_foreign_object(image, period, step)
        return image, {"anomaly": kind is not None, "kind": kind, "box": box}

    def describe(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "camera_id": self.camera_id,
            "size": [self.width, self.height],
            "fps": self.fps,
            "num_frames": self.num_frames,
            "seed": self.seed,
            "realtime": self.realtime,
            "anomaly_every": self.anomaly_every,
            "anomaly_duration": self.anomaly_duration,
            "anomaly_kinds": list(self.anomaly_kinds),
        }

    # ------------------------------------------------------------------ scene

    def _make_backgrounds(self) -> tuple[int, list[np.ndarray]]:
        """The horizon row and noisy variants of one scene: a striped, panelled wall over a tiled floor."""
        h, w = self.height, self.width
        rng = np.random.default_rng([self.seed, 0])
        horizon = int(h * rng.uniform(0.35, 0.45))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)

        wall = rng.uniform(130, 200, 3).astype(np.float32)
        period = rng.uniform(0.06, 0.12) * w
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * xx[:horizon] / period + rng.uniform(0, 2 * np.pi))
        shade = 0.85 + 0.12 * stripes + 0.08 * (yy[:horizon] / max(horizon, 1))
        img[:horizon] = wall * shade[..., None]

        floor = rng.uniform(80, 140, 3).astype(np.float32)
        depth = (yy[horizon:] - horizon + 1) / (h - horizon)  # 0 far .. 1 near
        u = (xx[horizon:] - w / 2) / (w * 0.12) / (0.25 + depth)
        v = 1.5 / (0.25 + depth)
        tile_tint = rng.uniform(0.85, 1.1, (64, 64)).astype(np.float32)
        tint = tile_tint[np.floor(u).astype(int) % 64, np.floor(v * 2).astype(int) % 64]
        grout = np.exp(-(((u - np.round(u)) / 0.04) ** 2)) + np.exp(-(((v * 2 - np.round(v * 2)) / 0.05) ** 2))
        light = 0.7 + 0.45 * depth
        img[horizon:] = floor * (tint * light * (1 - 0.35 * np.clip(grout, 0, 1)))[..., None]

        for _ in range(int(rng.integers(2, 4))):  # doors / shelves on the wall
            pw, ph = int(w * rng.uniform(0.08, 0.18)), int(horizon * rng.uniform(0.4, 0.8))
            x1 = int(rng.integers(0, max(1, w - pw)))
            y1 = horizon - ph
            colour = tuple(float(c) for c in rng.uniform(60, 170, 3))
            cv2.rectangle(img, (x1, y1), (x1 + pw, horizon - 1), colour, -1)
            cv2.rectangle(img, (x1, y1), (x1 + pw, horizon - 1), tuple(c * 0.6 for c in colour), max(1, w // 160))
        img[horizon - 1 : horizon + 1] *= 0.6  # skirting line

        for cells, amp in ((16, 18.0), (4, 8.0)):  # blotchy low- and mid-frequency dirt
            noise = rng.normal(0, 1, (h // cells + 2, w // cells + 2, 1)).astype(np.float32)
            img += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
        grain = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 0.8)
        img += 10.0 * grain[..., None]
        base = np.clip(img, 0, 255)

        variants = []
        for k in range(_NOISE_VARIANTS):
            sensor = np.random.default_rng([self.seed, 1, k]).normal(0, 2.5, (h, w, 3)).astype(np.float32)
            variants.append(np.clip(base + sensor, 0, 255).astype(np.uint8))
        return horizon, variants

    def _make_figures(self) -> list[_Figure]:
        h, w = self.height, self.width
        rng = np.random.default_rng([self.seed, 2])
        order = rng.permutation(len(_PALETTE))
        figures = []
        for i in range(self.num_objects):
            colour = _PALETTE[order[i % len(_PALETTE)]]
            if i >= len(_PALETTE):
                colour = tuple(int(np.clip(c + rng.integers(-40, 41), 20, 220)) for c in colour)
            height = h * rng.uniform(0.17, 0.23)
            top, bottom = self._horizon + 0.08 * h, h - 0.04 * h
            margin = 0.1 * w
            figures.append(
                _Figure(
                    colour=colour,
                    height=height,
                    cx=w / 2 + rng.uniform(-0.1, 0.1) * w,
                    ax=rng.uniform(0.5, 1.0) * (w / 2 - margin),
                    tx=rng.uniform(120, 260),
                    px=rng.uniform(0, 2 * math.pi),
                    cy=(top + bottom) / 2,
                    ay=rng.uniform(0.6, 1.0) * (bottom - top) / 2,
                    ty=rng.uniform(150, 320),
                    py=rng.uniform(0, 2 * math.pi),
                )
            )
        return figures

    def _draw_figure(self, image: np.ndarray, fig: _Figure, t: float) -> list[int]:
        """A body ellipse and a head, bigger nearer the camera; returns the figure's box."""
        x, y = fig.feet(t)
        depth = (y - self._horizon) / max(self.height - self._horizon, 1)
        size = fig.height * (0.65 + 0.5 * depth)
        body_w, body_h, head_r = 0.2 * size, 0.38 * size, 0.12 * size
        body_cy = y - body_h
        head_cy = body_cy - body_h - head_r * 0.9
        outline = tuple(int(c * 0.55) for c in fig.colour)
        head = tuple(min(255, int(c * 1.25) + 25) for c in fig.colour)

        def fx(v: float) -> int:
            return round(v * _ONE)

        centre, axes = (fx(x), fx(body_cy)), (fx(body_w), fx(body_h))
        cv2.ellipse(image, centre, axes, 0, 0, 360, fig.colour, -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(image, centre, axes, 0, 0, 360, outline, 1, cv2.LINE_AA, _SHIFT)
        cv2.circle(image, (fx(x), fx(head_cy)), fx(head_r), head, -1, cv2.LINE_AA, _SHIFT)
        return self._clip_box(x - body_w - 1, head_cy - head_r - 1, x + body_w + 1, y + 1)

    def _draw_foreign_object(self, image: np.ndarray, period: int, step: int) -> list[int]:
        """A saturated magenta or yellow cross/triangle, ~1/8 of the frame height, drifting slowly."""
        h, w = self.height, self.width
        rng = np.random.default_rng([self.seed, 3, period])
        s = h / 8
        angle = rng.uniform(0, 2 * math.pi)
        x = rng.uniform(s, w - s) + 0.3 * step * math.cos(angle)
        y = rng.uniform(s, h - s) + 0.3 * step * math.sin(angle)
        x, y = float(np.clip(x, s, w - s)), float(np.clip(y, s, h - s))
        colour = _FOREIGN_COLOURS[int(rng.integers(len(_FOREIGN_COLOURS)))]
        r = s / 2
        if rng.random() < 0.5:  # cross
            arm = r / 3
            pts = [(-arm, -r), (arm, -r), (arm, -arm), (r, -arm), (r, arm), (arm, arm)]
            pts += [(arm, r), (-arm, r), (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm)]
        else:  # triangle
            pts = [(0.0, -r), (r, r * 0.8), (-r, r * 0.8)]
        poly = np.array([[round((x + px) * _ONE), round((y + py) * _ONE)] for px, py in pts], np.int32)
        cv2.fillPoly(image, [poly], colour, cv2.LINE_AA, _SHIFT)
        cv2.polylines(image, [poly], True, (20, 20, 20), 1, cv2.LINE_AA, _SHIFT)
        return self._clip_box(x - r - 2, y - r - 2, x + r + 2, y + r + 2)

    def _draw_texture_defect(self, image: np.ndarray, period: int) -> list[int]:
        """Damage a ~1/6-frame patch of the background: dark cracks or a rust-like blotch."""
        h, w = self.height, self.width
        rng = np.random.default_rng([self.seed, 4, period])
        s = max(8, h // 6)
        x1 = int(rng.integers(0, w - s))
        y1 = int(rng.integers(0, h - s))
        if rng.random() < 0.5:  # cracks: jagged lines in a discoloured area
            cracks = np.zeros((s, s), np.float32)
            for _ in range(int(rng.integers(3, 6))):
                n = 8
                px = np.cumsum(rng.uniform(0, s / n * 1.4, n)) + rng.uniform(0, s * 0.2)
                py = s / 2 + np.cumsum(rng.normal(0, s / 8, n)) + rng.uniform(-s / 3, s / 3)
                pts = np.stack([np.clip(px, 0, s - 1), np.clip(py, 0, s - 1)], 1).astype(np.int32)
                if rng.random() < 0.5:
                    pts = pts[:, ::-1].copy()  # vertical crack
                cv2.polylines(cracks, [pts], False, 1.0, max(2, s // 14), cv2.LINE_AA)
            halo = cv2.GaussianBlur(cracks, (0, 0), s / 12)
            alpha = np.maximum(0.9 * cracks, 0.45 * halo / max(float(halo.max()), 1e-6))
            dark_ground = image[y1 : y1 + s, x1 : x1 + s].mean() < 110  # cracks must stand out either way
            texture = np.full((s, s, 3), (215, 205, 185) if dark_ground else (20, 16, 14), np.float32)
        else:  # blotch: a stain with its own coarse, high-contrast grain
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            c = (s - 1) / 2
            rx, ry = rng.uniform(0.35, 0.5, 2) * s
            alpha = np.clip(1.3 - ((xx - c) / rx) ** 2 - ((yy - c) / ry) ** 2, 0, 1)
            coarse = cv2.resize(rng.uniform(0, 1, (s // 3, s // 3)).astype(np.float32), (s, s), cv2.INTER_NEAREST)
            texture = np.array([120, 60, 25], np.float32) * (0.5 + coarse[..., None])
        alpha[alpha < 0.1] = 0  # leave the rest of the background exactly as it was
        patch = image[y1 : y1 + s, x1 : x1 + s]
        a = alpha[..., None]
        patch[:] = (patch * (1 - a) + texture * a).clip(0, 255).astype(np.uint8)
        ys, xs = np.nonzero(alpha)
        return [x1 + int(xs.min()), y1 + int(ys.min()), x1 + int(xs.max()) + 1, y1 + int(ys.max()) + 1]

    def _clip_box(self, x1: float, y1: float, x2: float, y2: float) -> list[int]:
        w, h = self.width, self.height
        return [
            int(np.clip(math.floor(x1), 0, w)),
            int(np.clip(math.floor(y1), 0, h)),
            int(np.clip(math.ceil(x2), 0, w)),
            int(np.clip(math.ceil(y2), 0, h)),
        ]
