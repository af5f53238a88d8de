"""ONNX Runtime or torch for scoring on the CPU? Same fitted model, both backends, alternating timed passes.

    python benchmarks/ort_vs_torch.py [--models padim,patchcore] [--train 16] [--batch 32] [--repeats 5]

Each model is built as in ``benchmarks/vs_anomalib_speed.py`` (EfficientNet-Lite0 with the
offline ImageNet weights, the bench layers, 256²), fitted on ``--train`` images of the
``brick`` data synth category, then scored two ways on the same batch of ``--batch``
images: torch after ``prepare_for_inference`` (what the model actor runs), and the graph
``oddeye export --format onnx`` writes, in an ONNX Runtime CPU session with as many
intra-op threads as torch uses (graph optimisations all on). The timed passes alternate
torch, ORT, torch, ... so a busy machine hurts both alike; the table gives each side's
median batch/s as images/s with the min–max of the repeats, the median of the per-pair
ratios, and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_anomalib_speed import BACKBONE, PARAMS

from oddeye.commands.export import export_model
from oddeye.data.synth import SynthImageSpec, render_category
from oddeye.models.base import create_model
from oddeye.models.inference import prepare_for_inference


def _images(n_train: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, good, bad = render_category("brick", SynthImageSpec(size=256, train=n_train), seed=0)
    chw = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    test = chw(good + [image for _, image, _ in bad])
    return chw(train), test.repeat(-(-batch // test.shape[0]), 1, 1, 1)[:batch].contiguous()


def _seconds(run: Any, images: torch.Tensor) -> float:
    start = time.perf_counter()
    run(images)
    return time.perf_counter() - start


def bench(name: str, train: torch.Tensor, batch: torch.Tensor, repeats: int, tmp: Path) -> dict[str, Any]:
    import onnxruntime as ort

    model = create_model(name, backbone=BACKBONE, weights=f"offline:{BACKBONE}", image_size=(256, 256), **PARAMS[name])
    model._fit_normal(list(train.split(16)), progress=False)
    # Normalised on the timed batch itself, so its scores spread over (0, 1) instead of saturating
    # and the two backends' difference is visible.
    raw, amap = model.raw_forward(batch)
    model.normalizer.fit(raw)
    model.map_normalizer.fit(amap.flatten(1).amax(1) if amap is not None else raw)
    model.fitted = True
    path = export_model(model, "onnx", tmp / f"{name}.onnx", batch_size=batch.shape[0])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    prepare_for_inference(model, "cpu")
    feed = batch.numpy()

    def run_torch(images: torch.Tensor) -> np.ndarray:
        return model(images).score.numpy()

    def run_ort(images: torch.Tensor) -> np.ndarray:
        return session.run(None, {"images": feed})[0]  # the timed batch, converted once

    diff = float(np.abs(run_torch(batch) - run_ort(batch)).max())  # also the warm-up
    torch_ips, ort_ips = [], []
    for _ in range(repeats):
        torch_ips.append(batch.shape[0] / _seconds(run_torch, batch))
        ort_ips.append(batch.shape[0] / _seconds(run_ort, batch))
    ratio = statistics.median(o / t for o, t in zip(ort_ips, torch_ips, strict=True))
    return {"model": name, "torch": torch_ips, "ort": ort_ips, "ratio": ratio, "max_score_diff": diff}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="padim,patchcore")
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    train, batch = _images(args.train, args.batch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench(name, train, batch, args.repeats, Path(tmp)))
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"# torch (prepare_for_inference) vs ONNX Runtime {__import__('onnxruntime').__version__}, 256², batch "
        f"{args.batch}, {torch.get_num_threads()} threads; img/s: median (min–max) of {args.repeats} alternating passes"
    )
    print("| model | torch img/s | ORT img/s | ORT / torch (median of pairs) | max score diff |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {_spread(r['torch'])} | {_spread(r['ort'])} | {r['ratio']:.2f}× "
            f"| {r['max_score_diff']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
