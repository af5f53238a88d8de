"""EfficientAd's networks: the patch description network (PDN, sizes S and M) and the autoencoder.

Shapes follow the paper (Batzner et al., 2024) and anomalib: a 256×256 image gives a 56×56 map
(64×64 with ``padding``). The autoencoder's bottleneck kernel and first upsampling sizes scale with
the image (``size // 32`` and ``size // 64 - 1``), which reproduces the paper's layers at 256 px and
lets smaller images (tests, fast benchmarks) work too.

A *teacher file* holds a distilled PDN teacher (``oddeye distill-teacher``): plain data and tensors,
readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import FitError

__all__ = [
    "PDN",
    "TEACHER_FILE_FORMAT",
    "EfficientAdModelSize",
    "PDNAutoencoder",
    "TeacherFileError",
    "pdn_out_size",
    "read_teacher_file",
    "write_teacher_file",
]

TEACHER_FILE_FORMAT = "oddeye-pdn-teacher/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherFileError(FitError):
    """A teacher file is missing, unreadable, or made for another model size or channel count."""


class EfficientAdModelSize(str, enum.Enum):
    """PDN sizes: S (4 conv layers, 128/256 wide) and M (6 layers, 256/512 wide)."""

    S = "small"
    M = "medium"

    @classmethod
    def parse(cls, value: Any) -> EfficientAdModelSize:
        text = str(getattr(value, "value", value)).strip().lower()
        aliases = {"s": cls.S, "small": cls.S, "m": cls.M, "medium": cls.M}
        if text not in aliases:
            raise ValueError(f"model_size must be one of ['small', 'medium'] (or 'S'/'M'), got {value!r}")
        return aliases[text]


def pdn_out_size(size: int, padding: bool) -> int:
    """Side of the PDN's output map for an input side ``size`` (S and M give the same)."""
    p = int(padding)
    s = size + 6 * p - 3  # conv 4x4
    s = (s + 2 * p - 2) // 2 + 1  # avg pool 2
    s = s + 6 * p - 3  # conv 4x4
    s = (s + 2 * p - 2) // 2 + 1  # avg pool 2
    s = s + 2 * p - 2  # conv 3x3
    return s - 3  # conv 4x4, no padding


class _ImageNetNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PDN(nn.Module):
    """Patch description network: each output vector describes one 33×33 input patch."""

    def __init__(self, out_channels: int, model_size: str = "small", padding: bool = False) -> None:
        super().__init__()
        self.model_size = EfficientAdModelSize.parse(model_size)
        self.out_channels = int(out_channels)
        p = int(padding)
        self.norm = _ImageNetNorm()
        if self.model_size == EfficientAdModelSize.S:
            self.layers = nn.Sequential(
                nn.Conv2d(3, 128, 4, padding=3 * p),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(128, 256, 4, padding=3 * p),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 256, 3, padding=p),
                nn.ReLU(inplace=True),
                nn.Conv2d(256, out_channels, 4),
            )
        else:
            self.layers = nn.Sequential(
                nn.Conv2d(3, 256, 4, padding=3 * p),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 512, 4, padding=3 * p),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(512, 512, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(512, 512, 3, padding=p),
                nn.ReLU(inplace=True),
                nn.Conv2d(512, out_channels, 4),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 1),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] → descriptors [B, out_channels, h, w]."""
        return self.layers(self.norm(images))


class PDNAutoencoder(nn.Module):
    """The autoencoder that learns the logical constraints of normal images (global context)."""

    def __init__(self, out_channels: int, image_size: tuple[int, int], padding: bool = False) -> None:
        super().__init__()
        h, w = int(image_size[0]), int(image_size[1])
        if min(h, w) < 32:
            raise ValueError(f"EfficientAd's autoencoder needs images of at least 32×32 pixels, got {h}×{w}")
        self.norm = _ImageNetNorm()
        enc: list[nn.Module] = []
        for cin, cout in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            enc += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, 64, (max(1, h // 32), max(1, w // 32))))  # 8×8 at 256 px: a 1×1 code
        self.encoder = nn.Sequential(*enc)
        self.sizes = [(max(1, h // d - 1), max(1, w // d - 1)) for d in (64, 32, 16, 8, 4, 2)]
        self.sizes.append((pdn_out_size(h, padding), pdn_out_size(w, padding)))
        self.deconvs = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in range(6))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.norm(images))
        for size, conv in zip(self.sizes, self.deconvs, strict=False):
            x = self.dropout(F.relu(conv(F.interpolate(x, size=size, mode="bilinear"))))
        return self.head(F.interpolate(x, size=self.sizes[-1], mode="bilinear"))


def write_teacher_file(path: str | Path, teacher: PDN, meta: dict[str, Any] | None = None) -> Path:
    """Write a distilled teacher (weights and what it was made from) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": TEACHER_FILE_FORMAT,
        "model_size": teacher.model_size.value,
        "teacher_out_channels": teacher.out_channels,
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def read_teacher_file(path: str | Path, model_size: str, teacher_out_channels: int) -> dict[str, torch.Tensor]:
    """The teacher's state_dict from ``path``, checked against the model's size and channel count."""
    path = Path(path)
    if not path.is_file():
        raise TeacherFileError(f"teacher_weights {path} does not exist (write one with `oddeye distill-teacher`)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherFileError(f"teacher_weights {path}: not a loadable teacher file ({type(e).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != TEACHER_FILE_FORMAT:
        raise TeacherFileError(
            f"teacher_weights {path}: not an oddeye teacher file (format {TEACHER_FILE_FORMAT} expected; "
            "write one with `oddeye distill-teacher`)"
        )
    size = EfficientAdModelSize.parse(model_size).value
    if record.get("model_size") != size or int(record.get("teacher_out_channels", -1)) != int(teacher_out_channels):
        raise TeacherFileError(
            f"teacher_weights {path} holds a model_size={record.get('model_size')!r} teacher with "
            f"teacher_out_channels={record.get('teacher_out_channels')}, but the model has model_size={size!r}, "
            f"teacher_out_channels={teacher_out_channels}: distil a matching teacher "
            f"(oddeye distill-teacher --model-size {size} --teacher-out-channels {teacher_out_channels}) "
            "or change the model's parameters"
        )
    return record["state_dict"]
