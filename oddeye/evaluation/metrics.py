"""Anomaly-detection metrics: AUROC, AUPRO, F1-max, frame-level AUROC for video.

Scores are "higher = more anomalous"; labels and masks are 1 for anomalous. Every metric
checks its input and raises ``MetricError`` (a ``ValueError``) for empty input, NaN or
infinite scores, a single class, or maps and masks of different shapes — a wrong AUROC
must never come out silently.

Curves are computed exactly (sort once, cumulative sums at every distinct score) when
the input is small enough to sort cheaply; pixel metrics over very many pixels switch to
``bins`` thresholds placed at quantiles of a subsample, which moves AUROC/AUPRO by well
under 1e-3 in practice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "EXACT_LIMIT",
    "FrameAUROC",
    "MetricError",
    "aupro",
    "auroc",
    "f1_max",
    "frame_auroc",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]

log = logging.getLogger(__name__)

# Up to this many values a curve is exact (one argsort); above it, binned thresholds.
EXACT_LIMIT = 1 << 24
DEFAULT_BINS = 1 << 16
_SUBSAMPLE = 1 << 20

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


class MetricError(ValueError):
    """The input cannot give a meaningful metric (empty, NaN, one class, shapes differ)."""


# --------------------------------------------------------------------------- input checks


def _as_numpy(x: ArrayLike | Sequence[ArrayLike], dtype: type | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], (np.ndarray, torch.Tensor)):
        x = np.stack([_as_numpy(v) for v in x])
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _check_scores(scores: ArrayLike, what: str) -> np.ndarray:
    s = _as_numpy(scores)
    if s.size == 0:
        raise MetricError(f"{what}: no scores (empty input)")
    if not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise MetricError(f"{what}: scores must be numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        raise MetricError(
            f"{what}: {int(bad.sum())} of {s.size} scores are NaN or infinite (the model returned invalid scores)"
        )
    return s


def _check_labels(labels: ArrayLike, what: str) -> np.ndarray:
    y = _as_numpy(labels)
    if y.size == 0:
        raise MetricError(f"{what}: no labels (empty input)")
    if y.dtype != bool:
        values = np.unique(y)
        if not np.isin(values, (0, 1)).all():
            raise MetricError(f"{what}: labels must be 0/1 or bool, got values {values[:5].tolist()}")
        y = y.astype(bool)
    return y


def _check_pair(scores: ArrayLike, labels: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    s, y = _check_scores(scores, what), _check_labels(labels, what)
    if s.shape != y.shape:
        raise MetricError(f"{what}: scores shaped {s.shape} but labels shaped {y.shape}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise MetricError(f"{what}: all {y.size} labels are {only}; the metric needs both normal and anomalous")
    return s.ravel(), y.ravel()


def _check_maps(anomaly_maps: ArrayLike, masks: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    m = _check_scores(anomaly_maps, what)
    g = _check_labels(masks, what)
    if m.ndim == 2:
        m = m[None]
    if g.ndim == 2:
        g = g[None]
    if m.ndim != 3 or g.ndim != 3:
        raise MetricError(f"{what}: expected maps and masks shaped [N, H, W], got {m.shape} and {g.shape}")
    if m.shape != g.shape:
        raise MetricError(
            f"{what}: anomaly maps shaped {m.shape} but masks shaped {g.shape}; "
            "resize the masks to the model's image size (nearest neighbour) first"
        )
    return m, g


# --------------------------------------------------------------------------- curves


def _trapz(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _cumulative(
    scores: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, bins: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weights above each threshold, thresholds descending: (thresholds, pos, neg).

    Exact when ``bins`` is None: one point per distinct score. Otherwise ``bins`` edges at
    quantiles of a subsample; each point counts every value at or above its edge.
    """
    if bins is None:
        order = np.argsort(-scores, kind="stable")
        s = scores[order]
        pos = np.cumsum(w_pos[order])
        neg = np.cumsum(w_neg[order])
        last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
        return s[last], pos[last], neg[last]
    rng = np.random.default_rng(0)
    sample = scores if scores.size <= _SUBSAMPLE else scores[rng.integers(0, scores.size, _SUBSAMPLE)]
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, bins)))
    edges[0] = min(edges[0], scores.min())
    # Value v falls in bin i where edges[i] <= v < edges[i+1]; the top bin holds the maximum.
    idx = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, edges.size - 1)
    pos = np.bincount(idx, weights=w_pos, minlength=edges.size)[::-1].cumsum()
    neg = np.bincount(idx, weights=w_neg, minlength=edges.size)[::-1].cumsum()
    return edges[::-1], pos, neg


def _pick_bins(n: int, bins: int | str | None) -> int | None:
    if bins == "auto":
        return None if n <= EXACT_LIMIT else DEFAULT_BINS
    return bins  # type: ignore[return-value]


def roc_curve(
    scores: ArrayLike, labels: ArrayLike, bins: int | str | None = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf, thresholds descending."""
    s, y = _check_pair(scores, labels, "roc_curve")
    return _roc(s, y, _pick_bins(s.size, bins))


def _roc(s: np.ndarray, y: np.ndarray, bins: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yf = y.astype(np.float64)
    thr, tp, fp = _cumulative(s, yf, 1.0 - yf, bins)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(scores: ArrayLike, labels: ArrayLike, bins: int | str | None = "auto") -> float:
    """Area under the ROC curve (ties count half, as in scikit-learn's ``roc_auc_score``)."""
    fpr, tpr, _ = roc_curve(scores, labels, bins)
    return float(_trapz(tpr, fpr))


def pixel_auroc(anomaly_maps: ArrayLike, masks: ArrayLike, bins: int | str | None = "auto") -> float:
    """AUROC over every pixel of ``anomaly_maps`` [N, H, W] against ``masks`` [N, H, W]."""
    m, g = _check_maps(anomaly_maps, masks, "pixel_auroc")
    s, y = _check_pair(m.ravel(), g.ravel(), "pixel_auroc")
    fpr, tpr, _ = _roc(s, y, _pick_bins(s.size, bins))
    return float(_trapz(tpr, fpr))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The best F1 over all thresholds and that threshold (predict anomalous when score >= it)."""
    s, y = _check_pair(scores, labels, "f1_max")
    yf = y.astype(np.float64)
    thr, tp, fp = _cumulative(s, yf, 1.0 - yf, None)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


# --------------------------------------------------------------------------- PRO


def _component_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1 / (K · size of its connected component) (8-connected, per mask); K."""
    weights = np.zeros(masks.shape, np.float64)
    sizes: list[np.ndarray] = []
    labelled: list[tuple[int, np.ndarray, np.ndarray]] = []
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        size = np.bincount(lab.ravel(), minlength=n)
        labelled.append((i, lab, size))
        sizes.append(size[1:])
    k = sum(s.size for s in sizes)
    for i, lab, size in labelled:
        per = np.zeros(size.size, np.float64)
        per[1:] = 1.0 / (k * size[1:])
        weights[i] = per[lab]
    return weights, k


def pro_curve(
    anomaly_maps: ArrayLike, masks: ArrayLike, bins: int | str | None = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, pro, thresholds): per-region overlap against the false-positive rate of normal pixels.

    PRO at a threshold is the mean, over all connected components of all masks, of the
    fraction of the component's pixels at or above it.
    """
    m, g = _check_maps(anomaly_maps, masks, "pro_curve")
    if not g.any():
        raise MetricError("pro_curve: no mask holds an anomalous pixel; AUPRO needs ground-truth regions")
    if g.all():
        raise MetricError("pro_curve: every pixel is anomalous; AUPRO needs normal pixels too")
    w_region, _ = _component_weights(g)
    neg = (~g).astype(np.float64)
    w_neg = neg / neg.sum()
    thr, pro, fpr = _cumulative(m.ravel(), w_region.ravel(), w_neg.ravel(), _pick_bins(m.size, bins))
    return np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, thr]


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3, bins: int | str | None = "auto") -> float:
    """Area under the PRO curve up to ``fpr_limit`` (0.3 by convention), divided by ``fpr_limit``."""
    if not 0 < fpr_limit <= 1:
        raise MetricError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro, _ = pro_curve(anomaly_maps, masks, bins)
    # Points at the limit: the PRO reached on the way there (interpolated across the step that crosses it).
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        j = int(np.argmax(fpr > fpr_limit))
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(_trapz(y, x) / fpr_limit)


# --------------------------------------------------------------------------- video


@dataclass(frozen=True)
class FrameAUROC:
    """Frame-level AUROC of video clips: ``micro`` over all frames, ``macro`` the mean over clips.

    Clips whose frames are all one class have no AUROC: they are left out of ``macro``
    and counted in ``clips_skipped``; ``macro`` is None when no clip has both classes.
    """

    micro: float
    macro: float | None
    clips_used: int
    clips_skipped: int


def frame_auroc(scores: Mapping[str, ArrayLike], labels: Mapping[str, ArrayLike]) -> FrameAUROC:
    """Micro and macro frame AUROC from per-clip frame scores and frame labels (dicts by clip name)."""
    if not scores:
        raise MetricError("frame_auroc: no clips")
    missing = sorted(set(scores) ^ set(labels))
    if missing:
        raise MetricError(f"frame_auroc: clips with scores but no labels or the reverse: {missing[:5]}")
    all_s, all_y, per_clip = [], [], []
    skipped = 0
    for name in scores:
        s = _check_scores(scores[name], f"frame_auroc clip {name!r}").ravel()
        y = _check_labels(labels[name], f"frame_auroc clip {name!r}").ravel()
        if s.shape != y.shape:
            raise MetricError(f"frame_auroc: clip {name!r} has {s.size} frame scores but {y.size} frame labels")
        all_s.append(s)
        all_y.append(y)
        if y.all() or not y.any():
            skipped += 1
        else:
            fpr, tpr, _ = _roc(s, y, None)
            per_clip.append(float(_trapz(tpr, fpr)))
    micro = auroc(np.concatenate(all_s), np.concatenate(all_y))
    if skipped:
        log.info(
            "frame_auroc: %d of %d clips hold one class only and are left out of the macro mean", skipped, len(scores)
        )
    return FrameAUROC(
        micro=micro,
        macro=float(np.mean(per_clip)) if per_clip else None,
        clips_used=len(per_clip),
        clips_skipped=skipped,
    )
