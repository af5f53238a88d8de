"""Image dataset layouts (MVTec AD, VisA, folder), the synthetic benchmark, and clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from oddeye.data import DatasetError, find_categories, load_images, load_masks, open_category
from oddeye.data.synth import CATEGORIES, SynthImageSpec, render_category, write_image_benchmark

SMALL = SynthImageSpec(size=64, train=4, test_good=2, test_per_defect=1)


def _img(path: Path, value: int = 128, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))


def _mask(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[4:8, 4:8] = 255
    cv2.imwrite(str(path), m)


def test_synth_writes_mvtec_layout_deterministically(tmp_path: Path) -> None:
    folders = write_image_benchmark(tmp_path / "a", seed=3, spec=SMALL, categories=["brick", "coffee"])
    assert [f.name for f in folders] == ["brick", "coffee"]
    cat = open_category(folders[0])
    assert cat.layout == "mvtec" and len(cat.train) == 4 and cat.has_masks
    defects = {s.defect for s in cat.test if s.label}
    assert defects == set(CATEGORIES["brick"].defects)
    masks = load_masks(cat.test, (64, 64))
    labels = np.array([s.label for s in cat.test], bool)
    assert masks[labels].reshape(labels.sum(), -1).any(axis=1).all()  # every defect has mask pixels
    assert not masks[~labels].any()
    a = render_category("grass", SMALL, seed=3)
    b = render_category("grass", SMALL, seed=3)
    c = render_category("grass", SMALL, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert not np.array_equal(a[0][0], c[0][0])


def test_defects_change_the_image_where_the_mask_is() -> None:
    _, _good, bad = render_category("coffee", SynthImageSpec(size=96, train=1, test_good=1, test_per_defect=2), 0)
    for defect, image, mask in bad:
        assert mask.dtype == bool and 0 < mask.mean() < 0.3, defect
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8


def test_find_categories_folder_of_categories_and_single(tmp_path: Path) -> None:
    write_image_benchmark(tmp_path, spec=SMALL, categories=["gravel", "chelsea"])
    assert [c.name for c in find_categories(tmp_path)] == ["chelsea", "gravel"]
    assert [c.name for c in find_categories(tmp_path / "gravel")] == ["gravel"]
    imgs = load_images(open_category(tmp_path / "gravel").train, (32, 48))
    assert imgs.shape == (4, 32, 48, 3) and imgs.dtype == np.uint8


def test_mvtec_missing_parts_are_named(tmp_path: Path) -> None:
    root = tmp_path / "bottle"
    _img(root / "train" / "good" / "000.png")
    _img(root / "test" / "good" / "000.png")
    _img(root / "test" / "broken" / "000.png")
    (root / "ground_truth" / "broken").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"ground_truth/broken/000_mask.png"):
        open_category(root)
    _mask(root / "ground_truth" / "broken" / "000_mask.png")
    cat = open_category(root)
    assert [s.label for s in cat.test] == [1, 0] and cat.test[0].mask is not None
    with pytest.raises(DatasetError, match="train/good"):
        (root / "train" / "good" / "000.png").unlink()
        (root / "train" / "good").rmdir()
        open_category(root)
    with pytest.raises(DatasetError, match="not a dataset category"):
        open_category(tmp_path)
    with pytest.raises(DatasetError, match="neither a dataset category nor a folder of categories"):
        find_categories(root / "test")
    with pytest.raises(DatasetError, match="does not exist"):
        find_categories(tmp_path / "nope")


def test_folder_layout_with_and_without_train(tmp_path: Path) -> None:
    root = tmp_path / "widget"
    for i in range(10):
        _img(root / "normal" / f"n{i}.png")
    for i in range(3):
        _img(root / "abnormal" / f"a{i}.png", value=250)
        _mask(root / "masks" / f"a{i}.png")
    cat = open_category(root)
    assert cat.layout == "folder" and len(cat.train) == 8 and len(cat.test) == 5 and cat.has_masks
    assert not set(cat.train) & {s.path for s in cat.test}
    _img(root / "abnormal" / "a9.png")
    with pytest.raises(DatasetError, match=r"masks/a9\.png"):
        open_category(root)


def test_visa_split_csv(tmp_path: Path) -> None:
    root = tmp_path / "VisA"
    for i in range(3):
        _img(root / "candle" / "Data" / "Images" / "Normal" / f"{i:03d}.JPG")
    _img(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
    _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png")
    (root / "split_csv").mkdir()
    rows = ["object,split,label,image,mask"]
    rows += [f"candle,train,normal,candle/Data/Images/Normal/{i:03d}.JPG," for i in range(2)]
    rows += ["candle,test,normal,candle/Data/Images/Normal/002.JPG,"]
    rows += ["candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png"]
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    cats = find_categories(root)
    assert [c.name for c in cats] == ["candle"]
    cat = cats[0]
    assert cat.layout == "visa" and len(cat.train) == 2 and [s.label for s in cat.test] == [0, 1] and cat.has_masks
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match="split CSV"):
        open_category(root / "candle")
