"""AI-VAD on the synthetic camera: frames/s per backend combination, and frame-level AUROC.

    python benchmarks/ai_vad.py                  # speed table (CPU, and CUDA when present) + accuracy
    python benchmarks/ai_vad.py --skip-heavy     # only the weight-free backends
    python benchmarks/ai_vad.py --threads 2 --size 240 320 --seeds 0 1 2 3 4
    python benchmarks/ai_vad.py --no-speed --seeds 0 1 2 --sigma 3   # accuracy only

Accuracy: for each seed, fit on normal clips spread over frames 0-800 of the scene
(every 4th), normalise on frames 800-1000, and score frames 1000-1400 of the same scene
with anomalies (15 of every 50 frames: a figure running backwards 5x fast, or a foreign
object). Frame AUROC is reported per seed, per anomaly kind and as the mean over seeds, on
the unsaturated frame scores (``logits``), and again with the frame scores smoothed over time
(``smoothing_sigma``, the authors' evaluation; ``--sigma``).

Speed: the torchvision/timm backends run with random weights (this machine may have no
internet); their cost does not depend on the weights, except that a trained detector
finds more regions for the pose and deep stages than a random one does.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from oddeye.models.video.ai_vad import AiVad
from oddeye.sources.synthetic import SyntheticCamera

log = logging.getLogger("benchmarks.ai_vad")

WEIGHT_FREE = {"region_backend": "background", "flow_backend": "farneback", "pose_backend": "none",
               "deep_backend": "color_histogram"}  # fmt: skip
COMBOS: list[tuple[str, dict[str, str], bool]] = [
    ("foreground+farneback", {"region_backend": "foreground", "flow_backend": "farneback"}, False),
    ("foreground+dis", {"region_backend": "foreground", "flow_backend": "dis"}, False),
    ("background+farneback+color_histogram", WEIGHT_FREE, False),
    ("background+dis+color_histogram", {**WEIGHT_FREE, "flow_backend": "dis"}, False),
    ("foreground+raft_small", {"region_backend": "foreground", "flow_backend": "raft_small"}, True),
    ("maskrcnn+raft+keypointrcnn+clip (anomalib)",
     {"region_backend": "maskrcnn", "flow_backend": "raft", "pose_backend": "keypointrcnn",
      "deep_backend": "clip"}, True),
]  # fmt: skip
KINDS = ["wrong_motion", "foreign_object"]


def clips(cam: SyntheticCamera, starts: range, t: int = 2) -> tuple[torch.Tensor, list[dict]]:
    rendered = {s: cam.render(s) for st in starts for s in range(st, st + t)}
    out = np.stack([np.stack([rendered[s][0] for s in range(st, st + t)]) for st in starts])
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).float() / 255, [rendered[st + t - 1][1] for st in starts]


def build(size: tuple[int, int], params: dict[str, str], device: str) -> AiVad:
    full = {"pose_backend": "none", "deep_backend": "none", **params}
    return AiVad(image_size=size, pre_trained=False, **full).to(device)


def accuracy(size: tuple[int, int], seeds: list[int], params: dict[str, str], sigma: float) -> None:
    h, w = size
    rows = []
    for seed in seeds:
        normal = SyntheticCamera(width=w, height=h, anomaly_every=0, seed=seed)
        train, _ = clips(normal, range(0, 800, 4))
        val, _ = clips(normal, range(800, 1000, 2))
        model = build(size, {**params, "smoothing_sigma": sigma}, "cpu")
        model.fit([train[i : i + 25] for i in range(0, len(train), 25)], [val], progress=False)
        cam = SyntheticCamera(width=w, height=h, seed=seed, anomaly_every=50, anomaly_duration=15, anomaly_kinds=KINDS)
        test, truth = clips(cam, range(1000, 1400))
        s = torch.cat([model.logits(test[i : i + 50])[0] for i in range(0, len(test), 50)]).numpy()
        unit = 1 / (1 + np.exp(-s))
        y = np.array([t["anomaly"] for t in truth])
        kind = np.array([t["kind"] or "" for t in truth])
        per = [roc_auc_score(y[(kind == k) | ~y], s[(kind == k) | ~y]) for k in KINDS]
        smooth = roc_auc_score(y, model.smooth_frame_scores(s))
        rows.append(
            (seed, roc_auc_score(y, s), smooth, *per, float((unit[y] > 0.5).mean()), float((unit[~y] > 0.5).mean()))
        )
    name = "+".join(params[k] for k in ("region_backend", "flow_backend", "deep_backend"))
    print(f"\nFrame AUROC, {name}, {h}x{w}, clip_length 2 (anomalies: {', '.join(KINDS)}), smoothing sigma {sigma}")
    print(
        f"{'seed':>6} {'AUROC':>7} {'smoothed':>9} {'wrong_motion':>13} {'foreign_object':>15} "
        f"{'recall@0.5':>11} {'FPR@0.5':>8}"
    )
    for r in rows:
        print(f"{r[0]:>6} {r[1]:>7.3f} {r[2]:>9.3f} {r[3]:>13.3f} {r[4]:>15.3f} {r[5]:>11.2f} {r[6]:>8.2f}")
    m = np.mean([r[1:] for r in rows], axis=0)
    print(f"{'mean':>6} {m[0]:>7.3f} {m[1]:>9.3f} {m[2]:>13.3f} {m[3]:>15.3f} {m[4]:>11.2f} {m[5]:>8.2f}")


def speed(size: tuple[int, int], devices: list[str], n_frames: int, skip_heavy: bool, batch: int) -> None:
    h, w = size
    normal = SyntheticCamera(width=w, height=h, anomaly_every=0, seed=0)
    train, _ = clips(normal, range(0, 400, 8))
    cam = SyntheticCamera(width=w, height=h, seed=0, anomaly_every=50, anomaly_duration=15, anomaly_kinds=KINDS)
    test, _ = clips(cam, range(1000, 1000 + n_frames))
    print(f"\nFrames/s, {h}x{w}, batch {batch}, torch threads {torch.get_num_threads()}", flush=True)
    print(f"{'backends':<44} {'device':<6} {'frames/s':>9} {'ms/frame':>9} {'regions/frame':>14}")
    for name, params, heavy in COMBOS:
        if heavy and skip_heavy:
            continue
        for device in devices:
            try:
                model = build(size, params, device)
                # The heavy CPU rows fit on a few clips and time a few frames: speed does not depend on it.
                slow = heavy and device == "cpu"
                fit_clips = train[:8] if slow else train
                model.fit([fit_clips[i : i + 25].to(device) for i in range(0, len(fit_clips), 25)], progress=False)
                frames = test[:batch] if slow else test
                model(frames[:batch].to(device))  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                regions = 0
                for i in range(0, len(frames), batch):
                    pred = model(frames[i : i + batch].to(device))
                    regions += sum(len(b) for b in pred.boxes)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                n = len(frames)
                print(f"{name:<44} {device:<6} {n / dt:>9.1f} {1000 * dt / n:>9.1f} {regions / n:>14.1f}", flush=True)
            except Exception as e:  # one failing backend should not hide the rest of the table
                print(f"{name:<44} {device:<6} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frames", type=int, default=200, help="frames timed per combination")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-heavy", action="store_true", help="only the weight-free backends")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--sigma", type=float, default=3.0, help="temporal smoothing of frame scores (frames; 0: off)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if not args.no_speed:
        speed(size, devices, args.frames, args.skip_heavy, args.batch)
    if not args.no_accuracy:
        accuracy(size, args.seeds, WEIGHT_FREE, args.sigma)


if __name__ == "__main__":
    main()
