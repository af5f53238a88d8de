"""An offline image benchmark: MVTec-style categories from scikit-image's bundled pictures.

Normal images are random crops (textures) or small shifts (objects) of photographs that
ship inside scikit-image, with brightness jitter and sensor noise; anomalous images add
one synthetic defect with its pixel mask: a scratch, a hole, a stain, a foreign patch cut
from another texture, or a local deformation. Every image is a pure function of the seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CATEGORIES", "DEFECTS", "SynthImageSpec", "render_category", "write_image_benchmark"]

log = logging.getLogger(__name__)

Defect = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Category:
    source: str  # scikit-image data function
    kind: str  # "texture" (random crops) or "object" (whole picture, small shifts)
    defects: tuple[str, ...]
    donor: str  # the texture foreign patches are cut from


CATEGORIES: dict[str, _Category] = {
    "brick": _Category("brick", "texture", ("scratch", "hole", "stain", "foreign"), "grass"),
    "grass": _Category("grass", "texture", ("scratch", "hole", "stain", "foreign"), "gravel"),
    "gravel": _Category("gravel", "texture", ("scratch", "stain", "foreign", "deformation"), "brick"),
    "coffee": _Category("coffee", "object", ("scratch", "hole", "stain", "deformation"), "gravel"),
    "chelsea": _Category("chelsea", "object", ("scratch", "stain", "foreign", "deformation"), "grass"),
}


@dataclass(frozen=True)
class SynthImageSpec:
    """How many images of what size to write per category."""

    size: int = 256
    train: int = 80
    test_good: int = 20
    test_per_defect: int = 8


def _picture(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


# --------------------------------------------------------------------------- normal images


def _normal(picture: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = picture.shape[:2]
    if kind == "texture":
        c = int(rng.integers(int(0.5 * min(h, w)), int(0.6 * min(h, w)) + 1))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        img = cv2.resize(picture[y : y + c, x : x + c], (size, size), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            img = img[:, ::-1]
    else:
        side = min(h, w)
        base = cv2.resize(
            picture[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2],
            (size, size),
            interpolation=cv2.INTER_AREA,
        )
        m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-3, 3), rng.uniform(0.97, 1.03))
        m[:, 2] += rng.uniform(-0.03, 0.03, 2) * size
        img = cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT)
    gain = rng.uniform(0.93, 1.07)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img.astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- defects


def _blob(size: int, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """An irregular filled blob as float alpha [size, size], soft at the edge."""
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(*radius) * size
    angles = np.sort(rng.uniform(0, 2 * math.pi, 10))
    radii = r * rng.uniform(0.6, 1.3, angles.size)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
    alpha = np.zeros((size, size), np.float32)
    cv2.fillPoly(alpha, [cv2.convexHull(pts)], 1.0, cv2.LINE_AA)
    return cv2.GaussianBlur(alpha, (0, 0), 1.5)


def _scratch(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    n = 12
    start = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, 2 * math.pi)
    steps = rng.uniform(0.02, 0.04, n) * size
    turn = np.cumsum(rng.normal(0, 0.15, n)) + angle
    pts = start + np.cumsum(np.stack([np.cos(turn), np.sin(turn)], 1) * steps[:, None], 0)
    pts = np.clip(np.vstack([start, pts]), 0, size - 1).astype(np.int32)
    line = np.zeros((size, size), np.float32)
    cv2.polylines(line, [pts], False, 1.0, int(rng.integers(2, 4)), cv2.LINE_AA)
    colour = np.array((235, 235, 230) if img.mean() < 128 else (25, 22, 20), np.float32)
    out = _blend(img, colour, line)
    return out, line > 0.3


def _hole(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = _blob(img.shape[0], rng, (0.05, 0.1))
    dark = rng.normal(12, 4, img.shape).clip(0, 255).astype(np.float32)
    return _blend(img, dark, alpha), alpha > 0.5


def _stain(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha = _blob(img.shape[0], rng, (0.06, 0.12)) * rng.uniform(0.6, 0.8)
    tint = np.array(rng.choice([(140, 70, 20), (60, 90, 160), (150, 140, 30)]), np.float32)
    tinted = img.astype(np.float32) * 0.4 + tint * 0.6
    return _blend(img, tinted, alpha), alpha > 0.3


def _foreign(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    h, w = donor.shape[:2]
    c = min(h, w) // 4  # twice the zoom of a normal crop: a coarser, clearly foreign grain
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    patch = cv2.resize(donor[y : y + c, x : x + c], (size, size), interpolation=cv2.INTER_LINEAR)
    alpha = _blob(size, rng, (0.06, 0.12))
    return _blend(img, patch.astype(np.float32), alpha), alpha > 0.5


def _deformation(img: np.ndarray, rng: np.random.Generator, donor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(0.08, 0.13) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    d = np.sqrt(dx**2 + dy**2)
    fall = np.clip(1 - d / r, 0, 1) ** 2
    twist = rng.choice([-1, 1]) * rng.uniform(1.5, 2.5) * fall  # swirl angle, radians
    cos, sin = np.cos(twist), np.sin(twist)
    map_x = cx + dx * cos - dy * sin
    map_y = cy + dx * sin + dy * cos
    map_x, map_y = map_x.astype(np.float32), map_y.astype(np.float32)
    out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    shift = np.sqrt((map_x - xx) ** 2 + (map_y - yy) ** 2)
    return out, shift > 1.5


def _blend(img: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return (img.astype(np.float32) * (1 - a) + other * a).clip(0, 255).astype(np.uint8)


DEFECTS: dict[str, Defect] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "foreign": _foreign,
    "deformation": _deformation,
}


# --------------------------------------------------------------------------- writing


def render_category(
    name: str, spec: SynthImageSpec, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]:
    """(train, test_good, [(defect, image, mask)]) of one category, all in RGB uint8 / bool."""
    cat = CATEGORIES[name]
    key = sorted(CATEGORIES).index(name)
    picture, donor = _picture(cat.source), _picture(cat.donor)
    rng = np.random.default_rng([seed, key, 0])
    train = [_normal(picture, cat.kind, spec.size, rng) for _ in range(spec.train)]
    rng = np.random.default_rng([seed, key, 1])
    good = [_normal(picture, cat.kind, spec.size, rng) for _ in range(spec.test_good)]
    bad = []
    for d, defect in enumerate(cat.defects):
        rng = np.random.default_rng([seed, key, 2, d])
        for _ in range(spec.test_per_defect):
            image, mask = DEFECTS[defect](_normal(picture, cat.kind, spec.size, rng), rng, donor)
            bad.append((defect, image, mask))
    return train, good, bad


def _write(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_image_benchmark(
    out: str | Path, seed: int = 0, spec: SynthImageSpec | None = None, categories: list[str] | None = None
) -> list[Path]:
    """Write ``out/<category>/`` in MVTec AD layout for each category; returns the folders."""
    spec = spec or SynthImageSpec()
    names = categories or sorted(CATEGORIES)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; available: {sorted(CATEGORIES)}")
    folders = []
    for name in names:
        root = Path(out) / name
        train, good, bad = render_category(name, spec, seed)
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        (root / "test" / "good").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(train):
            _write(root / "train" / "good" / f"{i:03d}.png", img)
        for i, img in enumerate(good):
            _write(root / "test" / "good" / f"{i:03d}.png", img)
        counters: dict[str, int] = {}
        for defect, img, mask in bad:
            i = counters[defect] = counters.get(defect, -1) + 1
            for sub in ("test", "ground_truth"):
                (root / sub / defect).mkdir(parents=True, exist_ok=True)
            _write(root / "test" / defect / f"{i:03d}.png", img)
            if not cv2.imwrite(str(root / "ground_truth" / defect / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255):
                raise OSError(f"cannot write mask for {root / 'test' / defect / f'{i:03d}.png'}")
        log.info("synth: wrote %s (%d train, %d good, %d defective)", root, len(train), len(good), len(bad))
        folders.append(root)
    return folders
