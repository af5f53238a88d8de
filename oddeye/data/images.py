"""Image anomaly datasets on disk: MVTec AD, VisA (split CSV) and a plain folder layout.

A category is one kind of object or surface: normal images to fit on (``train``) and
labelled test images, some with pixel masks (``test``). ``find_categories`` takes a
category folder or a folder of categories; the exact layouts are in docs/datasets.md.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "ImageCategory",
    "ImageSample",
    "find_categories",
    "list_images",
    "load_images",
    "load_masks",
    "open_category",
    "read_image",
    "read_mask",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Folder layout without train/: every k-th normal image goes to the test set (1 in 5 = 0.2).
NORMAL_TEST_EVERY = 5


class DatasetError(ValueError):
    """A folder does not hold a dataset in a known layout; the message names the missing part."""


@dataclass(frozen=True)
class ImageSample:
    """One test image: ``label`` 1 = anomalous; ``defect`` is ``good`` for normal images."""

    path: Path
    label: int
    defect: str = "good"
    mask: Path | None = None


@dataclass
class ImageCategory:
    """One category: normal training images and labelled test images."""

    name: str
    root: Path
    layout: str
    train: list[Path]
    test: list[ImageSample]
    notes: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test image has a pixel mask."""
        bad = [s for s in self.test if s.label]
        return bool(bad) and all(s.mask is not None for s in bad)

    def describe(self) -> str:
        n_bad = sum(s.label for s in self.test)
        return (
            f"{self.name} ({self.layout}): {len(self.train)} train, {len(self.test)} test "
            f"({n_bad} anomalous, masks {'yes' if self.has_masks else 'no'})"
        )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- layouts


def _is_mvtec(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def _is_visa(path: Path) -> bool:
    return (path / "Data" / "Images").is_dir()


def _is_folder(path: Path) -> bool:
    return (path / "normal").is_dir() and (path / "abnormal").is_dir()


def _mvtec(path: Path) -> ImageCategory:
    good = path / "train" / "good"
    if not good.is_dir():
        raise DatasetError(f"{path}: MVTec layout needs train/good/ (normal training images); it is missing")
    train = list_images(good)
    gt_root = path / "ground_truth"
    test: list[ImageSample] = []
    notes = []
    defects = sorted(d for d in (path / "test").iterdir() if d.is_dir())
    if not defects:
        raise DatasetError(f"{path}: test/ holds no defect folders (expected test/good/ and test/<defect>/)")
    for folder in defects:
        defect = folder.name
        for img in list_images(folder):
            if defect == "good":
                test.append(ImageSample(img, 0, defect))
                continue
            mask: Path | None = None
            if gt_root.is_dir():
                mask = _find_mask(gt_root / defect, img.stem)
                if mask is None:
                    raise DatasetError(
                        f"{path}: no mask for test/{defect}/{img.name} "
                        f"(expected ground_truth/{defect}/{img.stem}_mask.png)"
                    )
            test.append(ImageSample(img, 1, defect, mask))
    if not gt_root.is_dir():
        notes.append("no ground_truth/ folder: pixel metrics are skipped")
    return ImageCategory(path.name, path, "mvtec", train, test, notes)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _visa_csv(path: Path) -> Path:
    candidates = [path.parent / "split_csv" / "1cls.csv", *sorted(path.glob("*.csv"))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DatasetError(
            f"{path}: VisA layout (Data/Images/) needs a split CSV: {path.parent / 'split_csv' / '1cls.csv'} "
            f"or a *.csv in {path}; none found"
        )
    return found


def _visa(path: Path, csv_path: Path | None = None) -> ImageCategory:
    csv_path = csv_path or _visa_csv(path)
    base = csv_path.parent.parent if csv_path.parent.name == "split_csv" else path.parent
    train: list[Path] = []
    test: list[ImageSample] = []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"object", "split", "label", "image"}
        if not need <= set(reader.fieldnames or []):
            raise DatasetError(
                f"{csv_path}: split CSV needs columns {sorted(need)} (and mask), has {reader.fieldnames}"
            )
        for row in reader:
            if row["object"] != path.name:
                continue
            image = base / row["image"]
            anomalous = row["label"].strip().lower() not in ("normal", "good", "0")
            if row["split"].strip().lower() == "train":
                if not anomalous:
                    train.append(image)
            else:
                mask = base / row["mask"] if anomalous and row.get("mask") else None
                test.append(ImageSample(image, int(anomalous), "anomaly" if anomalous else "good", mask))
    if not train and not test:
        raise DatasetError(f"{csv_path}: no rows for object {path.name!r}")
    for p in [*train[:1], *(s.path for s in test[:1])]:
        if not p.is_file():
            raise DatasetError(f"{csv_path}: listed image {p} does not exist (paths are relative to {base})")
    return ImageCategory(path.name, path, "visa", train, test)


def _folder(path: Path) -> ImageCategory:
    normal = list_images(path / "normal")
    abnormal = list_images(path / "abnormal")
    mask_dir = path / "masks"
    notes = []
    if (path / "train").is_dir():
        train, normal_test = list_images(path / "train"), normal
    else:
        normal_test = normal[NORMAL_TEST_EVERY - 1 :: NORMAL_TEST_EVERY]
        held = set(normal_test)
        train = [p for p in normal if p not in held]
        notes.append(f"no train/ folder: 1 in {NORMAL_TEST_EVERY} normal images held out for testing")
    test = [ImageSample(p, 0) for p in normal_test]
    for img in abnormal:
        mask = _find_mask(mask_dir, img.stem) if mask_dir.is_dir() else None
        if mask_dir.is_dir() and mask is None:
            raise DatasetError(f"{path}: no mask for abnormal/{img.name} (expected masks/{img.stem}.png)")
        test.append(ImageSample(img, 1, "abnormal", mask))
    return ImageCategory(path.name, path, "folder", train, test, notes)


_LAYOUTS: tuple[tuple[str, Callable[[Path], bool], Callable[[Path], ImageCategory]], ...] = (
    ("mvtec", _is_mvtec, _mvtec),
    ("visa", _is_visa, _visa),
    ("folder", _is_folder, _folder),
)
_EXPECTED = (
    "train/good/ + test/<defect>/ [+ ground_truth/<defect>/] (MVTec AD), Data/Images/ + a split CSV (VisA), "
    "or normal/ + abnormal/ [+ masks/, train/] (folder)"
)


def open_category(path: str | Path) -> ImageCategory:
    """Read one category folder in any known layout; checks that it can be evaluated."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
    for _, match, build in _LAYOUTS:
        if match(path):
            cat = build(path)
            _check_category(cat)
            return cat
    raise DatasetError(f"{path} is not a dataset category: expected {_EXPECTED}")


def _check_category(cat: ImageCategory) -> None:
    if not cat.train:
        raise DatasetError(f"{cat.root}: category {cat.name!r} has no normal training images")
    if not cat.test:
        raise DatasetError(f"{cat.root}: category {cat.name!r} has no test images")


def find_categories(path: str | Path) -> list[ImageCategory]:
    """``path`` as one category, or every category folder directly inside it (sorted by name)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
    if any(match(path) for _, match, _ in _LAYOUTS):
        return [open_category(path)]
    visa_csv = path / "split_csv" / "1cls.csv"
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    found = [open_category(d) for d in subdirs if any(match(d) for _, match, _ in _LAYOUTS)]
    if visa_csv.is_file() and not found:
        raise DatasetError(f"{path}: split_csv/1cls.csv found but no <object>/Data/Images/ folders")
    if not found:
        raise DatasetError(
            f"{path} is neither a dataset category nor a folder of categories: expected {_EXPECTED} "
            f"in it or in its subfolders ({len(subdirs)} subfolders checked)"
        )
    return found


# --------------------------------------------------------------------------- reading


def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB, resized to ``size`` (H, W) when given."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if size is not None and img.shape[:2] != tuple(size):
        shrink = img.shape[0] > size[0] or img.shape[1] > size[1]
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return img


def read_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """A mask file as H×W bool (any non-zero pixel is anomalous), nearest-resized; all False for None."""
    if path is None:
        return np.zeros(size, bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DatasetError(f"cannot read mask {path}")
    if m.shape != tuple(size):
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return m > 0


def load_images(paths: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """Images as one uint8 array [N, H, W, 3] at ``size``."""
    if not paths:
        raise DatasetError("no images to load")
    out = np.empty((len(paths), size[0], size[1], 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size)
    return out


def load_masks(samples: Iterable[ImageSample], size: tuple[int, int]) -> np.ndarray:
    """Masks of test samples as bool [N, H, W] (normal images: all False)."""
    return np.stack([read_mask(s.mask, size) for s in samples])
