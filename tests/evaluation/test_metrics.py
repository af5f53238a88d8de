"""Metrics against scikit-learn and hand-worked cases; bad input raises, never a wrong number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from oddeye.evaluation import MetricError, aupro, auroc, f1_max, frame_auroc, pixel_auroc, pro_curve


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(500) < 0.3
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_hand_worked() -> None:
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts half
    assert auroc([0.1, 0.3, 0.2, 0.4], [0, 0, 1, 1]) == 0.75


def test_binned_auroc_is_close_to_exact() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200_000) < 0.05
    s = rng.normal(y * 1.5, 1.0)
    assert auroc(s, y, bins=4096) == pytest.approx(roc_auc_score(y, s), abs=1e-3)


def test_pixel_auroc_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 32, 32), bool)
    masks[1, 5:12, 5:15] = True
    masks[3, 20:30, 2:9] = True
    maps = rng.random((4, 32, 32)) + masks * 0.5
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(maps, masks, bins=1 << 14) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 5])
def test_f1_max_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    s = np.round(rng.normal(y * 1.0, 1.0), 2)
    p, r, t = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))[:-1]
    f, thr = f1_max(s, y)
    assert f == pytest.approx(f1.max(), abs=1e-12)
    assert thr == pytest.approx(t[np.argmax(f1)])
    pred = s >= thr  # the threshold reproduces the F1
    tp = (pred & y).sum()
    assert 2 * tp / (pred.sum() + y.sum()) == pytest.approx(f)


def test_aupro_perfect_and_known_step() -> None:
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:18, 10:12] = True
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    # Normal pixels get distinct scores uniform in [0, 1); every anomalous pixel scores c, so PRO
    # jumps from 0 to 1 where the FPR reaches 1 - c: AUPRO = (0.3 - (1 - c)) / 0.3.
    rng = np.random.default_rng(0)
    normal = ~masks
    maps = np.zeros(masks.shape)
    maps[normal] = (rng.permutation(normal.sum()) + 0.5) / normal.sum()
    c = 0.9
    maps[masks] = c
    assert aupro(maps, masks) == pytest.approx((0.3 - (1 - c)) / 0.3, abs=2e-3)


def test_aupro_weights_regions_not_pixels() -> None:
    # A big region found, a small one missed: PRO is 1/2 (the mean over regions), not the pixel share.
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 0:20, 0:20] = True  # 400 pixels, detected
    masks[0, 30:32, 30:32] = True  # 4 pixels, scored below the background
    maps = np.full(masks.shape, 0.5)
    maps[0, 0:20, 0:20] = 1.0
    maps[0, 30:32, 30:32] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-9)
    fpr, pro, _ = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0.0


def test_aupro_component_connectivity_is_per_mask() -> None:
    # The same region position in two images is two regions; half of each found gives PRO 1/2.
    masks = np.zeros((2, 10, 10), bool)
    masks[:, 2:4, 2:6] = True
    maps = np.full(masks.shape, 0.5)
    maps[:, 2:4, 2:4] = 1.0
    maps[:, 2:4, 4:6] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5)


def test_frame_auroc_micro_and_macro() -> None:
    scores = {"a": [0.1, 0.9, 0.2, 0.8], "b": [0.3, 0.4, 0.5], "c": [0.6, 0.2]}
    labels = {"a": [0, 1, 0, 1], "b": [1, 0, 0], "c": [0, 0]}
    fa = frame_auroc(scores, labels)
    assert fa.clips_used == 2 and fa.clips_skipped == 1
    assert fa.macro == pytest.approx((1.0 + 0.0) / 2)
    all_s = np.concatenate([np.asarray(v, float) for v in scores.values()])
    all_y = np.concatenate([np.asarray(v) for v in labels.values()])
    assert fa.micro == pytest.approx(roc_auc_score(all_y, all_s))
    assert frame_auroc({"x": [0.1, 0.2]}, {"x": [0, 1]}).macro == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([], [], "empty"),
        ([0.1, float("nan"), 0.3], [0, 1, 0], "NaN"),
        ([0.1, 0.2], [1, 1], "all 2 labels are anomalous"),
        ([0.1, 0.2], [0, 0], "normal"),
        ([0.1, 0.2, 0.3], [0, 1], "shaped"),
        ([0.1, 0.2], [0, 2], "0/1"),
    ],
)
def test_bad_input_raises(scores: list, labels: list, match: str) -> None:
    with pytest.raises(MetricError, match=match):
        auroc(scores, labels)


def test_bad_maps_raise() -> None:
    maps, masks = np.zeros((2, 8, 8)), np.zeros((2, 16, 16), bool)
    with pytest.raises(MetricError, match="resize the masks"):
        pixel_auroc(maps, masks)
    with pytest.raises(MetricError, match="no mask"):
        aupro(np.zeros((2, 8, 8)), np.zeros((2, 8, 8), bool))
    with pytest.raises(MetricError, match=r"no labels|no scores"):
        frame_auroc({"a": []}, {"a": []})
    with pytest.raises(MetricError, match="no clips"):
        frame_auroc({}, {})
    with pytest.raises(MetricError, match="4 frame scores but 3"):
        frame_auroc({"a": [0.1, 0.2, 0.3, 0.4]}, {"a": [0, 1, 0]})
