"""Synthetic anomalies for models trained on normal images only (DRAEM, GLASS, DSR).

A defect is a texture pasted through a Perlin-noise mask (Zavrtanik et al., DRAEM, 2021):

- ``perlin_noise`` / ``perlin_mask``: smooth noise at a random lattice scale, thresholded into
  blob-shaped masks, rotated by a random angle;
- ``TextureSource``: texture images from ``anomaly_source_path`` (a folder such as DTD), or,
  with no folder, a built-in procedural generator (noise fields, stripes, checkers, speckle)
  that needs no download;
- ``augment``: the colour/geometry augmentations DRAEM and GLASS apply to a texture before
  pasting it (three picked at random);
- ``AnomalySynthesizer``: images → (images with pasted defects, masks), in DRAEM's style
  (half the batch left normal, opacity ``beta``) or GLASS's (every image gets a defect,
  opacity around 0.5).

Every random draw goes through one seeded ``torch.Generator``, so a fit is reproducible.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import affine_grid, avg_pool2d, grid_sample, interpolate

__all__ = [
    "IMAGE_EXTENSIONS",
    "AnomalySynthesizer",
    "TextureSource",
    "augment",
    "perlin_mask",
    "perlin_noise",
    "procedural_texture",
    "resize_mask",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def perlin_noise(
    size: tuple[int, int], res: tuple[int, int], generator: torch.Generator, cell_px: int = 16
) -> torch.Tensor:
    """2-D Perlin gradient noise of shape ``size`` with ``res`` lattice cells per axis, values about [-1, 1].

    The noise is evaluated with at most ``cell_px`` samples per lattice cell and resized
    bilinearly: it is smooth within a cell, so this looks the same and costs far less at low scales.
    """
    h, w = size
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    ch, cw = min(cell_px, math.ceil(h / ry)), min(cell_px, math.ceil(w / rx))
    gh, gw = ch * ry, cw * rx
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    ys = (torch.arange(gh, dtype=torch.float32) / ch).view(-1, 1).expand(gh, gw)
    xs = (torch.arange(gw, dtype=torch.float32) / cw).view(1, -1).expand(gh, gw)
    y0, x0 = ys.floor().long(), xs.floor().long()
    fy, fx = ys - y0, xs - x0

    def dot(dy: int, dx: int) -> torch.Tensor:
        g = grads[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    noise = (top * (1 - uy) + bottom * uy) * math.sqrt(2)
    # The lattice spans the image: resize the sampled grid to the image (cropping is not needed).
    if (gh, gw) != (h, w):
        noise = interpolate(noise[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return noise


def _rotate(x: torch.Tensor, degrees: float, mode: str = "bilinear") -> torch.Tensor:
    """Rotate [C, H, W] about its centre (reflected borders), keeping the size."""
    theta = math.radians(degrees)
    mat = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = affine_grid(mat[None], [1, *x.shape], align_corners=False)
    return grid_sample(x[None], grid, mode=mode, padding_mode="reflection", align_corners=False)[0]


def perlin_mask(
    size: tuple[int, int],
    generator: torch.Generator,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    rotation: tuple[float, float] = (-90.0, 90.0),
    min_area: float = 0.0,
    max_tries: int = 10,
) -> torch.Tensor:
    """A {0, 1} mask [H, W]: Perlin noise at lattice 2**[min_scale, max_scale) per axis, rotated, > ``threshold``.

    ``min_area``: redraw (up to ``max_tries``) until at least this fraction of pixels is set,
    so a synthesised defect is never empty when the caller needs one.
    """
    if not 0 <= min_scale < max_scale:
        raise ValueError(f"need 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    mask = torch.zeros(size)
    for _ in range(max(1, max_tries)):
        res = (2 ** _randint(generator, min_scale, max_scale), 2 ** _randint(generator, min_scale, max_scale))
        noise = perlin_noise(size, res, generator)
        angle = _uniform(generator, *rotation)
        noise = _rotate(noise[None], angle)[0]
        mask = (noise > threshold).float()
        if float(mask.mean()) >= min_area:
            break
    return mask


# -- textures


def procedural_texture(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A random texture [3, H, W] in [0, 1] with no download: noise fields, stripes, checkers or speckle.

    A stand-in for the DTD textures of the DRAEM/GLASS papers: varied colour, frequency and
    orientation, so the model learns "unlike the normal surface" rather than one pattern.
    """
    h, w = size
    kind = _randint(generator, 0, 4)
    ys = torch.linspace(0, 1, h).view(-1, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, -1).expand(h, w)
    if kind == 0:  # multi-octave noise per channel
        out = torch.zeros(3, h, w)
        for c in range(3):
            amp = 1.0
            for octave in range(_randint(generator, 1, 4), 6):
                r = 2**octave
                out[c] += amp * perlin_noise(size, (r, r), generator)
                amp *= 0.5
    elif kind == 1:  # stripes at a random angle and frequency
        angle = _uniform(generator, 0, math.pi)
        freq = _uniform(generator, 3, 30)
        phase = ys * math.sin(angle) + xs * math.cos(angle)
        base = torch.sin(2 * math.pi * freq * phase)
        out = base[None] * torch.rand(3, 1, 1, generator=generator) + perlin_noise(size, (4, 4), generator)[None] * 0.3
    elif kind == 2:  # checkers / grid
        n = _randint(generator, 3, 24)
        board = ((ys * n).floor() + (xs * n).floor()) % 2
        out = board[None] * torch.rand(3, 1, 1, generator=generator) + torch.rand(3, 1, 1, generator=generator)
    else:  # speckle: blurred white noise
        k = 2 * _randint(generator, 0, 4) + 1
        noise = torch.rand(3, h, w, generator=generator)
        out = avg_pool2d(noise[None], k, stride=1, padding=k // 2, count_include_pad=False)[0]
    lo = out.amin(dim=(1, 2), keepdim=True)
    hi = out.amax(dim=(1, 2), keepdim=True)
    return ((out - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


class TextureSource:
    """Textures [3, H, W] in [0, 1] to paste as defects: from a folder, or generated.

    ``anomaly_source_path``: a folder of texture images (searched recursively, e.g. DTD's
    ``images/``); it must hold at least one image. None: the built-in procedural textures
    (logged once, so a user knows no texture set was used).
    """

    def __init__(self, anomaly_source_path: str | Path | None = None, owner: str = "anomaly synthesis") -> None:
        self.paths: list[Path] = []
        self.anomaly_source_path = None if anomaly_source_path in (None, "") else Path(anomaly_source_path)
        if self.anomaly_source_path is not None:
            root = self.anomaly_source_path
            if not root.is_dir():
                raise ValueError(f"{owner}: anomaly_source_path {str(root)!r} is not a folder")
            self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not self.paths:
                raise ValueError(
                    f"{owner}: anomaly_source_path {str(root)!r} holds no images "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)} files, recursively); "
                    "point it at a texture folder such as DTD's images/, or leave it empty for the built-in textures"
                )
            log.info("%s: %d anomaly source textures from %s", owner, len(self.paths), root)
        else:
            log.info("%s: no anomaly_source_path given; using the built-in procedural textures", owner)

    @property
    def procedural(self) -> bool:
        return not self.paths

    def sample(self, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        if self.procedural:
            return procedural_texture(size, generator)
        from PIL import Image

        path = self.paths[_randint(generator, 0, len(self.paths))]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
        return torch.from_numpy(arr / 255.0).permute(2, 0, 1).contiguous()


# -- augmentations (tensor versions of the imgaug / torchvision ops DRAEM and GLASS use)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def _gamma(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.clamp_min(0) ** _uniform(g, 0.5, 2.0)


def _brightness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x * _uniform(g, 0.8, 1.2) + _uniform(g, -30, 30) / 255.0


def _sharpness(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    blurred = avg_pool2d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    factor = _uniform(g, 0.1, 3.0)  # <1 blurs, >1 sharpens (PIL's ImageEnhance.Sharpness)
    return blurred + factor * (x - blurred)


def _hue_saturation(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Rotate chroma in YIQ space (hue) and scale it (saturation).
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    theta = math.radians(_uniform(g, -50, 50) * 180 / 255)
    sat = 1 + _uniform(g, -50, 50) / 100
    c, s = math.cos(theta) * sat, math.sin(theta) * sat
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    mat = torch.linalg.inv(yiq) @ rot @ yiq
    return torch.einsum("ij,jhw->ihw", mat, x)


def _solarize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    t = _uniform(g, 32, 128) / 255.0
    return torch.where(x >= t, 1 - x, x)


def _posterize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    levels = 2 ** _randint(g, 4, 9)
    return (x * (levels - 1)).round() / (levels - 1)


def _invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1 - x


def _autocontrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _equalize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Histogram equalisation per channel over 256 levels (PIL's ImageOps.equalize).
    levels = (x.clamp(0, 1) * 255).round().long().flatten(1)
    out = torch.empty_like(x).flatten(1)
    for c in range(x.shape[0]):
        cdf = torch.bincount(levels[c], minlength=256).cumsum(0).float()
        cdf = (cdf - cdf[cdf > 0][0]) / (cdf[-1] - cdf[cdf > 0][0]).clamp_min(1)
        out[c] = cdf[levels[c]]
    return out.view_as(x)


def _rotate_aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _rotate(x, _uniform(g, -45, 45))


def _hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.flip(-1)


def _vflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x.flip(-2)


def _grayscale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _gray(x).expand_as(x)


def _color_jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x * _uniform(g, 0.5, 1.5)  # brightness
    mean = _gray(x).mean()
    x = mean + (x - mean) * _uniform(g, 0.5, 1.5)  # contrast
    gray = _gray(x)
    return gray + (x - gray) * _uniform(g, 0.5, 1.5)  # saturation


Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# DRAEM's list (imgaug): gamma contrast, brightness, sharpness, hue/saturation, solarize,
# posterize, invert, autocontrast, equalize, rotation.
DRAEM_AUGMENTATIONS: tuple[Augmentation, ...] = (
    _gamma,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate_aug,
)
# GLASS's list (torchvision): colour jitter, flips, grayscale, autocontrast, equalize, affine.
GLASS_AUGMENTATIONS: tuple[Augmentation, ...] = (
    _color_jitter,
    _hflip,
    _vflip,
    _grayscale,
    _autocontrast,
    _equalize,
    _rotate_aug,
)


def augment(texture: torch.Tensor, generator: torch.Generator, style: str = "draem", n_ops: int = 3) -> torch.Tensor:
    """Apply ``n_ops`` distinct augmentations of DRAEM's or GLASS's list, in random order; result in [0, 1]."""
    ops = _augmentations(style)
    order = torch.randperm(len(ops), generator=generator)[:n_ops].tolist()
    for i in order:
        texture = ops[i](texture, generator).clamp(0, 1)
    return texture


def _augmentations(style: str) -> Sequence[Augmentation]:
    if style == "draem":
        return DRAEM_AUGMENTATIONS
    if style == "glass":
        return GLASS_AUGMENTATIONS
    raise ValueError(f"unknown augmentation style {style!r}; choose 'draem' or 'glass'")


class AnomalySynthesizer:
    """Pastes augmented textures into images through Perlin masks: (images, masks) for training.

    ``style="draem"``: each image gets a defect with probability ``p_anomalous``; the texture's
    opacity is ``beta``, uniform in the ``beta`` range (anomalib's name, range and blend:
    ``beta=(0.1, 1.0)``, texture × beta + image × (1 − beta) inside the mask). DRAEM's own code
    writes the blend the other way round with beta in [0, 0.8]; either way the texture shows at
    opacity 0.1–1, never near 0, so that no masked "defect" is invisible.
    ``style="glass"``: every image gets a defect; the image keeps weight ``beta`` drawn from
    N(0.5, 0.1) clipped to [0.2, 0.8] and the texture ``1 − beta``, as in GLASS's Local Anomaly
    Synthesis.
    ``seed``: the generator behind every draw; the same seed gives the same defects.
    """

    def __init__(
        self,
        anomaly_source_path: str | Path | None = None,
        style: str = "draem",
        beta: float | Sequence[float] = (0.1, 1.0),
        p_anomalous: float = 0.5,
        threshold: float = 0.5,
        min_scale: int = 0,
        max_scale: int = 6,
        seed: int | None = 0,
        owner: str = "anomaly synthesis",
    ) -> None:
        _augmentations(style)
        if isinstance(beta, (int, float)):
            beta = (float(beta), float(beta))
        beta = tuple(float(b) for b in beta)
        if len(beta) != 2 or not 0 <= beta[0] <= beta[1] <= 1:
            raise ValueError(f"beta must be a number or a (low, high) range inside [0, 1], got {beta}")
        if not 0 <= p_anomalous <= 1:
            raise ValueError(f"p_anomalous must be in [0, 1], got {p_anomalous}")
        self.style = style
        self.beta = beta
        self.p_anomalous = float(p_anomalous) if style == "draem" else 1.0
        self.threshold = float(threshold)
        self.min_scale, self.max_scale = int(min_scale), int(max_scale)
        self.textures = TextureSource(anomaly_source_path, owner=owner)
        self.generator = torch.Generator()
        self.generator.manual_seed(0 if seed is None else int(seed))

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def mask(self, size: tuple[int, int]) -> torch.Tensor:
        """One non-empty Perlin mask [H, W]."""
        return perlin_mask(
            size,
            self.generator,
            self.min_scale,
            self.max_scale,
            self.threshold,
            min_area=1.0 / (size[0] * size[1]),
        )

    def _opacity(self) -> float:
        """The texture's weight inside the mask."""
        if self.style == "glass":
            return 1.0 - float(torch.normal(0.5, 0.1, (), generator=self.generator).clamp(0.2, 0.8))
        return _uniform(self.generator, *self.beta)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] → (augmented images, masks [B, 1, H, W] in {0, 1}), on the input's device."""
        b, _, h, w = images.shape
        out = images.detach().float().cpu().clone()
        masks = torch.zeros(b, 1, h, w)
        for i in range(b):
            if _uniform(self.generator) >= self.p_anomalous:
                continue
            mask = self.mask((h, w))
            texture = augment(self.textures.sample((h, w), self.generator), self.generator, self.style)
            opacity = self._opacity()
            m = mask[None]
            out[i] = out[i] * (1 - m) + opacity * texture * m + (1 - opacity) * out[i] * m
            masks[i, 0] = mask
        return out.to(images.device, images.dtype), masks.to(images.device, images.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A {0, 1} mask [B, 1, H, W] at another resolution (a cell is set when any of its pixels mostly is)."""
    return (interpolate(mask.float(), size=size, mode="bilinear", align_corners=False) > 0.5).float()
