"""Random natural images for EfficientAd's ImageNet penalty and for distilling its teacher.

``NaturalImages.from_folder`` takes any folder of photos (ImageNet, Imagenette, or the
``oddeye data synth`` output), searched recursively; ``NaturalImages.bundled`` uses the photos
that ship with scikit-image (no download), leaving out those the synthetic benchmark's
categories are made of. Decoded pictures are kept in memory up to ``max_images``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

__all__ = ["BUNDLED_PHOTOS", "IMAGE_SUFFIXES", "NaturalImages"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# scikit-image's bundled pictures that the synthetic benchmark does not use as categories or donors.
BUNDLED_PHOTOS = (
    "astronaut",
    "camera",
    "clock",
    "coins",
    "colorwheel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)


class NaturalImages:
    """A pool of RGB pictures; ``sample`` draws random, resized crops as [B, 3, H, W] floats in [0, 1]."""

    def __init__(self, pictures: list[np.ndarray], source: str) -> None:
        if not pictures:
            raise ValueError(f"{source}: no images")
        self.pictures = pictures
        self.source = source

    def __len__(self) -> int:
        return len(self.pictures)

    @classmethod
    def from_folder(cls, folder: str | Path, max_images: int = 2000, seed: int = 0) -> NaturalImages:
        """Every image under ``folder`` (recursively; a random ``max_images`` of them when there are more)."""
        import cv2

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths = [p for p in paths if "ground_truth" not in p.parts]  # MVTec masks are not photos
        if not paths:
            raise ValueError(
                f"image folder {folder} holds no images (looked recursively for {', '.join(IMAGE_SUFFIXES)})"
            )
        if len(paths) > max_images:
            pick = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
            paths = [paths[i] for i in sorted(pick)]
        pictures = []
        for p in paths:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                log.warning("skipping unreadable image %s", p)
                continue
            pictures.append(np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)))
        return cls(pictures, str(folder))

    @classmethod
    def bundled(cls) -> NaturalImages:
        """scikit-image's bundled photos (``BUNDLED_PHOTOS``), always available offline."""
        from skimage import data

        pictures = []
        for name in BUNDLED_PHOTOS:
            img = np.asarray(getattr(data, name)())
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            pictures.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
        return cls(pictures, "scikit-image's bundled photos")

    def sample(
        self,
        n: int,
        size: tuple[int, int],
        generator: np.random.Generator,
        grayscale_p: float = 0.3,
        scale: tuple[float, float] = (0.5, 1.0),
    ) -> torch.Tensor:
        """``n`` random crops (a ``scale`` share of each side), resized to ``size``, some made grey."""
        out = torch.empty(n, 3, size[0], size[1])
        for i in range(n):
            pic = self.pictures[int(generator.integers(len(self.pictures)))]
            h, w = pic.shape[:2]
            s = generator.uniform(*scale)
            ch, cw = max(1, int(h * s)), max(1, int(w * s))
            y, x = int(generator.integers(h - ch + 1)), int(generator.integers(w - cw + 1))
            crop = torch.from_numpy(pic[y : y + ch, x : x + cw]).permute(2, 0, 1).float().div_(255.0)
            crop = F.interpolate(crop[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            if generator.random() < grayscale_p:
                crop = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2]).expand(3, -1, -1)
            out[i] = crop.clamp(0, 1)
        return out
