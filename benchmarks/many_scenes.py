"""Many cameras, many scenes: one model for every camera vs per-camera heads on one backbone vs N pipelines.

Each synthetic camera watches its own scene (its seed: background texture, layout, figures). Every
camera is fitted on its first normal frames, then scored on a later stretch of its stream, twice:
with injected anomalies (foreign objects, texture defects: abnormal in every scene), and with
"another scene's content" (a rectangle of what another camera sees there at that moment: normal
elsewhere, abnormal only for this camera's scene). Printed, per setting:

- mean image/frame AUROC over the cameras (each camera's frames ranked on their own), per test;
- frames/s scoring the test frames, batches mixing every camera (per camera for separate pipelines):
  the best of ``--repeats`` passes over the same stream, and their median;
- peak memory (max RSS of a fresh process doing only that setting's fit and scoring).

"N separate pipelines" is measured as one process holding one camera's model; its memory is
N times that process's peak (estimated, not N processes run at once), its frames/s the per-camera
scoring with one model per camera, one camera per batch. A second table gives the head size per
model (PaDiM, PatchCore, DFM, DFKDE, CFA) and the AUROC cost of storing heads in float16.

Models score as the pipeline's model actors do: after fitting, ``prepare_for_inference`` (channels_last,
folded batch norms, ``--precision``) of the whole model, or of the heads' shared backbone
(``--no-prepare`` scores them as fitted). Per-camera heads score a mixed batch in one batched pass
where the model has one (``AnomalyModel.score_embedding_heads``).

    python benchmarks/many_scenes.py [--cameras 16] [--size 96] [--fit-frames 60] [--test-frames 100]
        [--repeats 5] [--no-prepare] [--no-separate] [--heads] [--backend onnxruntime]
        (--heads alone: no head-size table)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import queue
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as oddeye's CLI and actors: no spinning OpenMP threads

import numpy as np

BACKBONE = {"backbone": "efficientnet_lite0", "weights": "offline:efficientnet_lite0"}
PARAMS: dict[str, dict[str, Any]] = {
    "padim": {**BACKBONE, "layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 50},
    "patchcore": {**BACKBONE, "layers": ["blocks.2", "blocks.4"], "coreset_sampling_ratio": 0.1},
    "dfm": {**BACKBONE, "layer": "blocks.4", "pooling_kernel_size": 2},
    "dfkde": {**BACKBONE, "layers": ["blocks.6"], "n_pca_components": 16},
    "cfa": {**BACKBONE, "layers": ["blocks.1", "blocks.2", "blocks.4"], "epochs": 5},
}
ROWS = ("one model fitted on every camera", "per-camera heads, shared backbone")
BATCH = 16


def camera_data(cam: int, size: int, fit_frames: int, test_frames: int) -> dict[str, np.ndarray]:
    """A camera's fit frames (normal, every 3rd of its first stretch) and test frames with labels."""
    import cv2

    from oddeye.sources.synthetic import SyntheticCamera

    def frames(**kw: Any) -> list:
        src = SyntheticCamera(f"cam-{cam:02d}", 160, 120, seed=100 + cam, num_objects=2 + cam % 3, **kw)
        return list(src)

    def resize(fs: list) -> np.ndarray:
        return np.stack([cv2.resize(f.image, (size, size), interpolation=cv2.INTER_AREA) for f in fs])

    fit = frames(num_frames=fit_frames * 3, anomaly_every=0)[::3]
    start = fit_frames * 3
    test = frames(
        num_frames=test_frames * 2,
        start_seq=start,
        anomaly_every=50,
        anomaly_duration=10,
        anomaly_kinds=["foreign_object", "texture_defect"],
    )[::2]
    normal = frames(num_frames=test_frames * 2, start_seq=start, anomaly_every=0)[::2]
    return {
        "fit": resize(fit),
        "test": resize(test),
        "labels": np.array([bool(f.meta.get("anomaly")) for f in test]),
        "normal_test": resize(normal),  # the same stretch without anomalies: the base of the context test
    }


def context_anomalies(data: dict[int, dict[str, np.ndarray]], seed: int = 0) -> None:
    """Each camera's ``context`` test: its normal test frames where 1 in 5 shows, in a random rectangle
    (30-50 % of each side), what another camera sees there at that moment. That content is normal
    for the other scene, so only a model of this camera's own scene can call it anomalous."""
    rng = np.random.default_rng(seed)
    cams = sorted(data)
    for k, c in enumerate(cams):
        images = data[c]["normal_test"].copy()
        n, h, w = images.shape[:3]
        labels = np.zeros(n, bool)
        for i in range(n):
            if i % 25 < 20:
                continue
            other = data[cams[(k + 1 + int(rng.integers(len(cams) - 1))) % len(cams)]]["normal_test"]
            rh, rw = int(rng.integers(3 * h // 10, h // 2 + 1)), int(rng.integers(3 * w // 10, w // 2 + 1))
            y, x = int(rng.integers(h - rh + 1)), int(rng.integers(w - rw + 1))
            images[i, y : y + rh, x : x + rw] = other[i % len(other), y : y + rh, x : x + rw]
            labels[i] = True
        data[c]["context"], data[c]["context_labels"] = images, labels


def tensors(images: np.ndarray, batch: int = BATCH) -> list:
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return list(x.split(batch))


def run_setting(setting: str, model: str, args: argparse.Namespace, out: Any) -> None:
    """One setting in a fresh process: fit, score, report AUROC, frames/s and peak RSS."""
    import torch

    from oddeye.evaluation.metrics import auroc
    from oddeye.models.base import create_model
    from oddeye.models.camera_heads import CameraHeads
    from oddeye.models.inference import prepare_for_inference

    def prepare(model: Any) -> None:  # what ModelWorker / CameraHeadsWorker do before scoring
        if args.prepare:
            prepare_for_inference(model, "cpu", precision=args.precision)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    backend = args.backend
    batch = args.batch  # scoring batches (fits use BATCH)
    size = (args.size, args.size)
    cams = list(range(args.cameras if setting != "single" else 1))
    data = {c: camera_data(c, args.size, args.fit_frames, args.test_frames) for c in cams}
    tests = ["test"]
    if len(cams) > 1:
        context_anomalies(data)
        tests.append("context")
    # The test stream: every camera's frames interleaved, as a live pipeline's batches mix them.
    order = [(c, i) for i in range(args.test_frames) for c in cams if i < len(data[c]["test"])]
    scores = {t: {c: np.zeros(len(data[c][t])) for c in cams} for t in tests}
    t_fit = time.perf_counter()
    score_batch: Any  # (images [B, 3, H, W], the cameras of its rows) -> scores [B]
    if setting == "one model fitted on every camera":
        m = create_model(model, image_size=size, **PARAMS[model])
        m.fit_embedded(tensors(np.concatenate([data[c]["fit"] for c in cams])), folds=args.folds, progress=False)
        fit_s = time.perf_counter() - t_fit
        prepare(m)
        if backend == "onnxruntime":  # model.backend: onnxruntime (scores normalised: same ranking)
            from oddeye.models.onnx_backend import OnnxRuntimeModel

            ort_model = OnnxRuntimeModel(m, batch_size=batch, num_threads=args.threads)

            def score_batch(x: Any, _cams: list[int]) -> np.ndarray:
                return ort_model(x).score.numpy()

        else:

            def score_batch(x: Any, _cams: list[int]) -> np.ndarray:
                return m.logits(x)[0].numpy()

    elif setting == "per-camera heads, shared backbone":
        heads = CameraHeads.open(Path(tempfile.mkdtemp()) / "models", model, PARAMS[model], size)
        for c in cams:
            # Kept in memory as a live replica keeps the heads it fitted (loading one lazily costs ~1 s once).
            heads.install(heads.save_head(f"cam-{c:02d}", heads.fit_head(tensors(data[c]["fit"]), folds=args.folds)))
        fit_s = time.perf_counter() - t_fit
        prepare(heads.template)  # the backbone every head shares
        if backend == "onnxruntime":  # the shared backbone through ONNX Runtime, the heads in torch
            from oddeye.models.onnx_backend import OnnxRuntimeEmbedder

            heads.embed = OnnxRuntimeEmbedder(heads.template, batch_size=batch, num_threads=args.threads)

        def score_batch(x: Any, batch_cams: list[int]) -> np.ndarray:
            return heads.predict(x, [f"cam-{c:02d}" for c in batch_cams])[0].score.numpy()

    else:  # separate pipelines ("single": one of them, for its memory), each camera its own model
        models = {}
        for c in cams:
            models[c] = create_model(model, image_size=size, **PARAMS[model])
            models[c].fit_embedded(tensors(data[c]["fit"]), folds=args.folds, progress=False)
            prepare(models[c])
        fit_s = time.perf_counter() - t_fit

        def score_batch(x: Any, batch_cams: list[int]) -> np.ndarray:
            return models[batch_cams[0]].logits(x)[0].numpy()

    def score_pass(which: str = "test") -> None:
        if setting in ROWS:  # one pipeline: batches mix the cameras
            for k in range(0, len(order), batch):
                chunk = order[k : k + batch]
                x = tensors(np.stack([data[c][which][i] for c, i in chunk]), batch)[0]
                for (c, i), got in zip(chunk, score_batch(x, [c for c, _ in chunk]), strict=True):
                    scores[which][c][i] = got
        else:  # a pipeline per camera: each scores its own camera's frames
            for c in cams:
                for k, x in enumerate(tensors(data[c][which], batch)):
                    scores[which][c][k * batch : k * batch + len(x)] = score_batch(x, [c] * len(x))

    # The same stream scored --repeats times: on a shared machine a burst of other work slows some
    # passes by 10x; the best pass is what the code costs, the median what this run got.
    passes = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        score_pass()
        passes.append(time.perf_counter() - t0)
    per_cam = [auroc(scores["test"][c], data[c]["labels"]) for c in cams]
    context: list[float] = []
    if "context" in tests:
        score_pass("context")
        context = [auroc(scores["context"][c], data[c]["context_labels"]) for c in cams]
    out.put(
        {
            "setting": setting,
            "auroc": float(np.mean(per_cam)),
            "auroc_min": float(np.min(per_cam)),
            "auroc_context": float(np.mean(context)) if context else None,
            "auroc_context_min": float(np.min(context)) if context else None,
            "frames_per_s": len(order) / min(passes),
            "frames_per_s_median": len(order) / float(np.median(passes)),
            "frames_per_s_passes": [len(order) / t for t in passes],
            "fit_s": fit_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def head_sizes(model: str, args: argparse.Namespace, out: Any) -> None:
    """Head bytes (in memory, float32) and file bytes in float32/float16, and float16's AUROC cost."""
    import torch

    from oddeye.evaluation.metrics import auroc
    from oddeye.models.camera_heads import CameraHeads

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    size = (args.size, args.size)
    root = Path(tempfile.mkdtemp())
    full = CameraHeads.open(root / "models", model, PARAMS[model], size)
    half = CameraHeads(full.directory, full.template, full.description, head_dtype="float16")
    a32, a16, mem, f32, f16 = [], [], [], [], []
    for c in range(args.size_cameras):
        data = camera_data(c, args.size, args.fit_frames, args.test_frames)
        head = full.fit_head(tensors(data["fit"]), folds=args.folds)
        h32, h16 = full.save_head(f"c{c}", head), half.save_head(f"c{c}-half", head)
        x = torch.from_numpy(data["test"]).permute(0, 3, 1, 2).float().div_(255.0)
        s32 = torch.cat([h32.model.logits(b)[0] for b in x.split(BATCH)]).numpy()
        s16 = torch.cat([h16.model.logits(b)[0] for b in x.split(BATCH)]).numpy()
        a32.append(auroc(s32, data["labels"]))
        a16.append(auroc(s16, data["labels"]))
        mem.append(h32.nbytes)
        f32.append((full.head_dir(f"c{c}") / "v1.pt").stat().st_size)
        f16.append((full.head_dir(f"c{c}-half") / "v1.pt").stat().st_size)
    backbone = sum(t.numel() * t.element_size() for t in full.template.backbone_module().state_dict().values())
    out.put(
        {
            "model": model,
            "head_bytes": int(np.mean(mem)),
            "file_f32": int(np.mean(f32)),
            "file_f16": int(np.mean(f16)),
            "backbone_bytes": backbone,
            "auroc_f32": float(np.mean(a32)),
            "auroc_f16": float(np.mean(a16)),
        }
    )


def in_process(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn`` in a fresh (spawned) process, so that its peak memory is its own."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    while True:  # a child that dies without a result (an exception, the OOM killer) ends the wait
        try:
            result = q.get(timeout=1.0)
            break
        except queue.Empty:
            if p.is_alive():
                continue
            try:  # it may have exited just after putting its result
                result = q.get(timeout=1.0)
                break
            except queue.Empty:
                p.join()
                raise RuntimeError(
                    f"{fn.__name__}: the child process exited {p.exitcode} without a result (its traceback is above)"
                ) from None
    p.join()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--model", default="padim", choices=list(PARAMS))
    ap.add_argument("--size", type=int, default=96, help="model input size (square)")
    ap.add_argument("--fit-frames", type=int, default=60)
    ap.add_argument("--test-frames", type=int, default=100)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--prepare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prepare_for_inference before scoring, as the model actors do (default: on)",
    )
    ap.add_argument("--precision", default="auto", help="the backbone's precision when prepared (model.precision)")
    ap.add_argument("--batch", type=int, default=BATCH, help="frames per scoring batch (mixing the cameras)")
    ap.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="model.backend of the first two rows: onnxruntime runs the single model, or the heads' shared "
        "backbone, with ONNX Runtime",
    )
    ap.add_argument("--repeats", type=int, default=5, help="scoring passes over the test stream (best and median)")
    ap.add_argument(
        "--separate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure N separate pipelines (--no-separate: the first two rows only, half the time)",
    )
    ap.add_argument("--heads", nargs="*", default=list(PARAMS), help="models for the head-size table ([] to skip)")
    ap.add_argument("--size-cameras", type=int, default=2, help="cameras averaged for the head-size table")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    n = args.cameras
    results = [in_process(run_setting, s, args.model, args) for s in ROWS]
    separate: dict[str, Any] | None = None
    single: dict[str, Any] | None = None
    if args.separate:
        separate = in_process(run_setting, "separate", args.model, args)
        single = in_process(run_setting, "single", args.model, args)
        separate["setting"] = f"{n} separate pipelines"
        separate["peak_rss_mb"] = n * single["peak_rss_mb"]
        results.append(separate)
    print(
        f"# many scenes: {n} synthetic cameras, {args.model} ({PARAMS[args.model]['backbone']}, offline ImageNet "
        f"weights), {args.size}x{args.size}, {args.fit_frames} fit frames and {args.test_frames} test frames per "
        f"camera, batches of {args.batch}, {args.threads} torch threads, best (median) of {args.repeats} "
        "scoring passes, "
        f"{f'prepared for inference (precision {args.precision})' if args.prepare else 'not prepared'}, "
        f"backend {args.backend}; "
        f"{platform.node()}, {os.cpu_count()} CPUs"
    )
    print(
        "| | mean AUROC (worst camera): synthetic defects | another scene's content | frames/s best (median) "
        "| peak memory | fit s |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        note = f" (est. {n} x {single['peak_rss_mb']:.0f} MB)" if r is separate and single else ""
        ctx = f"{r['auroc_context']:.3f} ({r['auroc_context_min']:.3f})" if r["auroc_context"] is not None else "—"
        print(
            f"| {r['setting']} | {r['auroc']:.3f} ({r['auroc_min']:.3f}) | {ctx} | {r['frames_per_s']:.1f} "
            f"({r['frames_per_s_median']:.1f}) | "
            f"{r['peak_rss_mb']:.0f} MB{note} | {r['fit_s']:.1f} |"
        )
    ratio = results[1]["frames_per_s"] / results[0]["frames_per_s"]
    print(f"\nper-camera heads: {100 * ratio:.0f} % of the single model's best frames/s (issue 19's goal: >= 90 %)")
    sizes = [in_process(head_sizes, m, args) for m in args.heads]
    if sizes:
        print(f"\n# head size per model ({args.size}x{args.size}, mean of {args.size_cameras} cameras)")
        print("| model | head in memory | head file fp32 | head file fp16 | backbone | AUROC fp32 | AUROC fp16 |")
        print("|---|---|---|---|---|---|---|")
        for s in sizes:
            print(
                f"| {s['model']} | {s['head_bytes'] / 1e6:.2f} MB | {s['file_f32'] / 1e6:.2f} MB | "
                f"{s['file_f16'] / 1e6:.2f} MB | {s['backbone_bytes'] / 1e6:.1f} MB | {s['auroc_f32']:.3f} | "
                f"{s['auroc_f16']:.3f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": results, "single": single, "heads": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
