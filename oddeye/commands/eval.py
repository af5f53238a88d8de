"""``oddeye eval CONFIG --data DIR [--json FILE] [--save-images]``: accuracy on a labelled dataset.

DIR is one image category (MVTec AD, VisA or folder layout), a folder of categories, or
video datasets (UCSD Ped2, CUHK Avenue, ShanghaiTech layouts, or ``data synth``'s scenes).
Each category uses its own checkpoint (``model.checkpoint`` with ``{category}`` replaced,
or ``-<category>`` added when DIR holds several) and is fitted first when that checkpoint is
missing: on every training image, normalised on held-out folds (``AnomalyModel.fit``).
AUROC and the other rankings use the unsaturated scores (see ``oddeye.evaluation.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

COMMAND = "eval"
HELP = "image/pixel AUROC, AUPRO, F1-max per category (frame AUROC for video) on a labelled dataset"

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "normal_over_half")
VIDEO_COLUMNS = ("frame_auroc_micro", "frame_auroc_macro")
WORST_K = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config")
    parser.add_argument("--data", required=True, help="a category folder, a folder of categories, or video datasets")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--save-images", action="store_true", help="write heat maps of the worst misses under --out")
    parser.add_argument("--out", default="oddeye-out/eval", help="where --save-images writes (default oddeye-out/eval)")
    parser.add_argument("--refit", action="store_true", help="fit again even where a checkpoint exists")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override one config field")


def run(args: argparse.Namespace) -> int:
    from oddeye.config import ConfigError, load_config
    from oddeye.data.images import DatasetError
    from oddeye.data.video import is_video_dataset
    from oddeye.evaluation.metrics import MetricError
    from oddeye.models.base import CheckpointError, FitError

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"oddeye: config error: {e}", file=sys.stderr)
        return 2
    try:
        if is_video_dataset(args.data):
            results, columns = _eval_video(cfg, args), VIDEO_COLUMNS
        else:
            results, columns = _eval_images(cfg, args), IMAGE_COLUMNS
    except (DatasetError, MetricError, FitError, CheckpointError, FileNotFoundError) as e:
        print(f"oddeye eval: {e}", file=sys.stderr)
        return 1
    report = {"model": cfg.model.name, "categories": results, "mean": _mean(results, columns)}
    print(format_table(report, columns))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"oddeye eval: results in {path}")
    return 0


# --------------------------------------------------------------------------- fitting / loading


def _model_for(cfg: Any, name: str, refit: bool, fit_images: Any, several: bool = True) -> tuple[Any, float | None]:
    """The category's fitted model: loaded from its checkpoint, or fitted (``fit_images()``) and saved."""
    from oddeye.models.base import load_model
    from oddeye.pipeline.fit import category_checkpoint

    ckpt = category_checkpoint(cfg.model.checkpoint, name, several)
    if ckpt.is_file() and not refit:
        log.info("eval: %s: loading %s", name, ckpt)
        model = load_model(ckpt, expect=cfg.model.name)
        return _prepared(model, cfg), None
    log.info("eval: %s: no checkpoint at %s, fitting", name, ckpt)
    t0 = time.perf_counter()
    model = fit_images(ckpt)
    fit_s = time.perf_counter() - t0
    return _prepared(model, cfg), fit_s


def _prepared(model: Any, cfg: Any) -> Any:
    """The model prepared as the live model actor prepares it (channels_last, batch-norm folding,
    ``model.precision``, ``model.compile``): eval measures what ``oddeye run`` scores with."""
    from oddeye.pipeline.scoring import prepare_model, resolve_device

    prepare_model(model, resolve_device(cfg.model.device), cfg.model.precision, cfg.model.compile)
    return model


def _eval_images(cfg: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from oddeye.data.images import find_categories, load_images
    from oddeye.evaluation.evaluate import evaluate_category
    from oddeye.pipeline.fit import fit_images
    from oddeye.pipeline.scoring import resolve_device

    size = tuple(cfg.model.image_size)
    device = resolve_device(cfg.model.device)
    results: dict[str, dict[str, Any]] = {}
    categories = find_categories(args.data)
    for cat in categories:
        log.info("eval: %s", cat.describe())
        for note in cat.notes:
            log.info("eval: %s: %s", cat.name, note)

        def fit(ckpt: Path, cat: Any = cat) -> Any:
            paths = cat.train
            if len(paths) > cfg.fit.max_frames:
                paths = paths[:: math.ceil(len(paths) / cfg.fit.max_frames)]
            return fit_images(cfg, load_images(paths, size), ckpt)[0]

        model, fit_s = _model_for(cfg, cat.name, args.refit, fit, len(categories) > 1)
        result, scored = evaluate_category(model, cat, size, cfg.fit.batch_size, device)
        result.fit_seconds = fit_s
        results[cat.name] = result.record()
        if args.save_images:
            n = save_worst(scored, Path(args.out) / cat.name, cat.name)
            log.info("eval: %s: %d heat maps under %s", cat.name, n, Path(args.out) / cat.name)
    return results


def _eval_video(cfg: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import numpy as np

    from oddeye.data.video import find_video_datasets
    from oddeye.evaluation.evaluate import evaluate_video, is_video_model, video_windows
    from oddeye.models.base import create_model, get_model_class
    from oddeye.pipeline.fit import fit_images, holdout_folds
    from oddeye.pipeline.scoring import resolve_device

    size = tuple(cfg.model.image_size)
    device = resolve_device(cfg.model.device)
    video_model = bool(getattr(get_model_class(cfg.model.name), "is_video", False))
    results: dict[str, dict[str, Any]] = {}
    datasets = find_video_datasets(args.data)
    for ds in datasets:
        log.info("eval: %s", ds.describe())

        def fit(ckpt: Path, ds: Any = ds) -> Any:
            # Every training frame (window) is learnt from; the normalisation comes from held-out
            # folds of whole training videos (AnomalyModel.fit), never from frames of the same video.
            clips = [c.load(size) for c in ds.train]
            if video_model:
                # Windows of clip_length frames, never across clips, each naming its video.
                model = create_model(cfg.model.name, image_size=size, **cfg.model.params).to(device)
                windows = video_windows(clips, int(getattr(model, "clip_length", 1)), cfg.fit.batch_size, device)
                starts = windows.starts
                if len(starts) > cfg.fit.max_frames:
                    starts = [starts[i] for i in np.linspace(0, len(starts) - 1, cfg.fit.max_frames).astype(int)]
                train = video_windows(clips, windows.length, cfg.fit.batch_size, device, starts, with_video=True)
                model.fit(train, folds=holdout_folds(cfg))
                model.save(ckpt)
                return model
            # An image model learns from the training clips' frames, evenly spread over all clips.
            frames = np.concatenate(clips)
            videos = np.concatenate([np.full(len(c), i) for i, c in enumerate(clips)])
            if len(frames) > cfg.fit.max_frames:
                keep = np.linspace(0, len(frames) - 1, cfg.fit.max_frames).round().astype(int)
                frames, videos = frames[keep], videos[keep]
            return fit_images(cfg, frames, ckpt, videos=videos)[0]

        model, fit_s = _model_for(cfg, ds.name, args.refit, fit, len(datasets) > 1)
        if not is_video_model(model):
            log.info("eval: %s is an image model: scoring every frame on its own", cfg.model.name)
        result = evaluate_video(model, ds, size, cfg.fit.batch_size, device)
        rec = result.record()
        rec["fit_seconds"] = fit_s
        results[ds.name] = rec
    return results


# --------------------------------------------------------------------------- output


def _mean(results: dict[str, dict[str, Any]], columns: tuple[str, ...]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for col in columns:
        values = [r[col] for r in results.values() if r.get(col) is not None]
        out[col] = sum(values) / len(values) if values else None
    return out


def format_table(report: dict[str, Any], columns: tuple[str, ...]) -> str:
    """The per-category table with a mean row, as printed by ``oddeye eval``."""
    rows = [(name, rec) for name, rec in report["categories"].items()]
    width = max([len("category"), len("mean"), *(len(n) for n, _ in rows)])
    head = f"{'category':<{width}}  " + "  ".join(f"{c:>{max(len(c), 8)}}" for c in columns)
    lines = [head, "-" * len(head)]

    def fmt(rec: dict[str, Any]) -> str:
        cells = []
        for c in columns:
            v = rec.get(c)
            cells.append(f"{'—' if v is None else f'{v:.4f}':>{max(len(c), 8)}}")
        return "  ".join(cells)

    lines += [f"{name:<{width}}  {fmt(rec)}" for name, rec in rows]
    lines += ["-" * len(head), f"{'mean':<{width}}  {fmt(report['mean'])}"]
    return "\n".join(lines)


def save_worst(scored: Any, out: Path, category: str, k: int = WORST_K) -> int:
    """Heat-map overlays of the ``k`` highest-scoring normal images (false positives) and the
    ``k`` lowest-scoring anomalous ones (false negatives), ground truth outlined in green."""
    import cv2
    import numpy as np

    from oddeye.frames import ScoredFrame, encode_jpeg
    from oddeye.sinks.snapshots import render_snapshot

    normal = np.flatnonzero(~scored.labels)
    anomalous = np.flatnonzero(scored.labels)
    picks = {
        "false_positives": normal[np.argsort(-scored.scores[normal])][:k],
        "false_negatives": anomalous[np.argsort(scored.scores[anomalous])][:k],
    }
    written = 0
    for kind, idx in picks.items():
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for rank, i in enumerate(idx):
            amap = None if scored.maps is None else (np.clip(scored.maps[i], 0, 1) * 255).astype(np.uint8)
            frame = ScoredFrame(
                camera_id=f"{category}/{scored.paths[i].parent.name}/{scored.paths[i].name}",
                seq=int(i),
                timestamp=time.time(),
                score=float(scored.scores[i]),
                label=bool(scored.scores[i] >= 0.5),
                model="",
                latency_ms=0.0,
                image=scored.images[i],
                anomaly_map=amap,
            )
            rgb = render_snapshot(frame)
            if scored.masks is not None and scored.masks[i].any():
                contours, _ = cv2.findContours(
                    scored.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
                )
                rgb = np.ascontiguousarray(rgb)
                cv2.drawContours(rgb, contours, -1, (0, 255, 0), 1)
            name = f"{rank:02d}_{scored.paths[i].parent.name}_{scored.paths[i].stem}.jpg"
            (folder / name).write_bytes(encode_jpeg(rgb))
            written += 1
    return written
