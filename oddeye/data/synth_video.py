"""Synthetic video scenes for the offline benchmark: walking figures, and what does not belong.

Normal clips show figures walking left to right across the synthetic camera's floor (one
way, at walking pace, legs swinging). Test clips hold one event each: a figure running,
a figure walking the wrong way, or an unusual object (a cart) crossing. Frame labels mark
the frames where any pixel of the event's figure or cart is in the frame. Scenes are
written in the ShanghaiTech layout (``training/frames/<clip>/``, ``testing/frames/<clip>/``,
``testing/test_frame_mask/<clip>.npy``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from oddeye.sources.synthetic import SyntheticCamera

__all__ = ["VIDEO_EVENTS", "SynthVideoSpec", "render_clip", "write_video_benchmark"]

log = logging.getLogger(__name__)

VIDEO_EVENTS = ("running", "wrong_direction", "object")
_COLOURS = ((40, 80, 200), (40, 150, 60), (190, 50, 40), (30, 140, 150), (220, 130, 30), (120, 50, 160))
_WALK = 1.6  # pixels per frame at 256 wide
_RUN = 5.5


@dataclass(frozen=True)
class SynthVideoSpec:
    """Sizes of the synthetic video benchmark."""

    width: int = 256
    height: int = 192
    scenes: int = 2
    train_clips: int = 3
    test_clips: int = 3
    frames: int = 60
    walkers: int = 4


@dataclass
class _Walker:
    colour: tuple[int, int, int]
    x: float
    y: float
    speed: float
    phase: float
    height: float


def _draw_walker(img: np.ndarray, w: _Walker, t: int) -> None:
    size = w.height
    direction = 1 if w.speed >= 0 else -1
    swing = math.sin(w.phase + t * abs(w.speed) * 0.35) * (0.45 if abs(w.speed) > 3 else 0.25)
    hip = (w.x, w.y - 0.45 * size)
    for s in (swing, -swing):
        foot = (w.x + s * size * 0.5, w.y)
        cv2.line(img, _pt(hip), _pt(foot), tuple(int(c * 0.6) for c in w.colour), max(2, int(size * 0.07)), cv2.LINE_AA)
    body_c = (w.x + direction * (0.08 if abs(w.speed) > 3 else 0.0) * size, w.y - 0.65 * size)
    axes = (max(2, int(0.13 * size)), max(3, int(0.22 * size)))
    cv2.ellipse(img, _pt(body_c), axes, 0, 0, 360, w.colour, -1, cv2.LINE_AA)
    head = (body_c[0] + direction * 0.03 * size, w.y - 0.97 * size)
    cv2.circle(img, _pt(head), max(2, int(0.1 * size)), (225, 190, 160), -1, cv2.LINE_AA)
    # A bag carried on the leading side, so the walking direction shows in a single frame.
    cv2.rectangle(
        img,
        _pt((body_c[0] + direction * 0.12 * size, body_c[1])),
        _pt((body_c[0] + direction * 0.24 * size, body_c[1] + 0.15 * size)),
        (60, 40, 30),
        -1,
    )


def _draw_cart(img: np.ndarray, x: float, y: float, size: float) -> None:
    cv2.rectangle(img, _pt((x - size, y - 0.8 * size)), _pt((x + size, y - 0.25 * size)), (230, 210, 30), -1)
    for wx in (x - 0.6 * size, x + 0.6 * size):
        cv2.circle(img, _pt((wx, y - 0.15 * size)), max(2, int(0.18 * size)), (20, 20, 20), -1, cv2.LINE_AA)


def _draw_event(img: np.ndarray, event: str | None, special: _Walker, x: float, t: int) -> bool:
    """Draw the event's figure or cart at ``x`` on ``img``; is any of its pixels in the frame?"""
    canvas = np.zeros_like(img)
    for target in (img, canvas):
        if event == "object":
            _draw_cart(target, x, special.y, special.height * 2.0)
        else:
            _draw_walker(target, _Walker(special.colour, x, special.y, special.speed, 0.0, special.height), t)
    return bool(canvas.any())


def _pt(p: tuple[float, float]) -> tuple[int, int]:
    return round(p[0]), round(p[1])


def render_clip(
    camera: SyntheticCamera, spec: SynthVideoSpec, rng: np.random.Generator, event: str | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (RGB uint8) and frame labels [T] bool of one clip; ``event`` None for a normal clip."""
    w, h = spec.width, spec.height
    scale = w / 256
    floor_top = h * 0.5
    walkers = [
        _Walker(
            colour=_COLOURS[i % len(_COLOURS)],
            x=rng.uniform(-0.2, 1.0) * w,
            y=rng.uniform(floor_top + 0.15 * h, 0.95 * h),
            speed=_WALK * scale * rng.uniform(0.85, 1.15),
            phase=rng.uniform(0, 2 * math.pi),
            height=h * rng.uniform(0.2, 0.26),
        )
        for i in range(spec.walkers)
    ]
    start = int(rng.integers(spec.frames // 4, spec.frames // 2))
    special: _Walker | None = None
    if event is not None:
        y = rng.uniform(floor_top + 0.15 * h, 0.95 * h)
        colour = _COLOURS[int(rng.integers(len(_COLOURS)))]  # looks like anyone: only its motion is wrong
        if event == "running":
            special = _Walker(colour, -0.1 * w, y, _RUN * scale, 0.0, h * 0.23)
        elif event == "wrong_direction":
            special = _Walker(colour, 1.1 * w, y, -_WALK * scale, 0.0, h * 0.23)
        elif event == "object":
            special = _Walker((0, 0, 0), -0.1 * w, y, 2.5 * scale, 0.0, h * 0.1)
        else:
            raise ValueError(f"unknown video event {event!r}; available: {list(VIDEO_EVENTS)}")
    frames, labels = [], np.zeros(spec.frames, bool)
    t0 = int(rng.integers(0, 10_000))
    for t in range(spec.frames):
        img = camera.render(t0 + t)[0]
        for wk in sorted(walkers, key=lambda k: k.y):
            x = (wk.x + wk.speed * t) % (1.4 * w) - 0.2 * w
            _draw_walker(img, _Walker(wk.colour, x, wk.y, wk.speed, wk.phase, wk.height), t)
        if special is not None and t >= start:
            x = special.x + special.speed * (t - start)
            # Labelled where any pixel of it is in the frame (drawn once more on a blank canvas): not
            # by its centre, which would mark frames where it is still (or already) out of sight.
            labels[t] = _draw_event(img, event, special, x, t)
        frames.append(img)
    return frames, labels


def write_video_benchmark(out: str | Path, seed: int = 0, spec: SynthVideoSpec | None = None) -> list[Path]:
    """Write ``out/<scene>/`` (ShanghaiTech layout) for each synthetic scene; returns the folders."""
    spec = spec or SynthVideoSpec()
    folders = []
    for s in range(spec.scenes):
        root = Path(out) / f"scene{s + 1:02d}"
        camera = SyntheticCamera(
            width=spec.width, height=spec.height, seed=seed * 1000 + s, num_objects=0, anomaly_every=0
        )
        rng = np.random.default_rng([seed, s])
        clips: list[tuple[str, str | None]] = [
            (f"training/frames/{s + 1:02d}_{i + 1:03d}", None) for i in range(spec.train_clips)
        ]
        clips += [
            (f"testing/frames/{s + 1:02d}_{i + 1:04d}", VIDEO_EVENTS[i % len(VIDEO_EVENTS)])
            for i in range(spec.test_clips)
        ]
        (root / "testing" / "test_frame_mask").mkdir(parents=True, exist_ok=True)
        for rel, event in clips:
            frames, labels = render_clip(camera, spec, rng, event)
            folder = root / rel
            folder.mkdir(parents=True, exist_ok=True)
            for t, img in enumerate(frames):
                cv2.imwrite(
                    str(folder / f"{t:03d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
                )
            if event is not None:
                np.save(root / "testing" / "test_frame_mask" / f"{folder.name}.npy", labels.astype(np.int8))
        log.info("synth: wrote video scene %s", root)
        folders.append(root)
    return folders
