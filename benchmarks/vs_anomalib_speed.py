"""oddeye vs anomalib 2.7.0, side by side in one run: images/s, image AUROC and PatchCore fit seconds.

    bash benchmarks/anomalib_env.sh          # once: anomalib in .venv-anomalib (torch pinned to oddeye's)
    python benchmarks/vs_anomalib_speed.py [--models padim,patchcore,dfm,dfkde] [--category brick]
        [--train 80] [--batch 32] [--rounds 3] [--json R.json]

Both systems get the same EfficientNet-Lite0 ImageNet weights (oddeye's offline copy,
saved once and loaded into anomalib's timm backbone built with ``pre_trained=False``),
the same layers and parameters as ``configs/bench/*.yaml``, the same 256² images of one
``oddeye data synth`` category (rendered in memory), batch 32, the same machine and the
same torch threads. anomalib runs in ``.venv-anomalib`` as a subprocess of this script
(``--side anomalib``), one model at a time, alternating with oddeye so that a noisy
machine hurts both alike. images/s is the full forward of a batch (anomalib: its torch
model in eval mode, after the ImageNet normalisation its pre-processor would apply;
oddeye: ``model(images)`` after ``prepare_for_inference``, normalisation included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ANOMALIB_PYTHON = ROOT / ".venv-anomalib" / "bin" / "python"
MODELS = ("padim", "patchcore", "dfm", "dfkde")
# configs/bench/*.yaml, in each library's parameter names.
PARAMS: dict[str, dict[str, Any]] = {
    "padim": {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    "patchcore": {"layers": ["blocks.2", "blocks.4"], "coreset_sampling_ratio": 0.1, "num_neighbors": 9},
    "dfm": {"layer": "blocks.4", "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
    "dfkde": {"layers": ["blocks.6"], "n_pca_components": 16, "feature_scaling_method": "scale"},
}
BACKBONE = "efficientnet_lite0"
HEADER = (
    "| model | oddeye img/s | anomalib img/s | ratio | oddeye AUROC | anomalib AUROC | oddeye fit s | anomalib fit s |"
)


def auroc(normal: list[float], anomalous: list[float]) -> float:
    """Probability that an anomalous score beats a normal one (ties count half)."""
    import numpy as np

    n, a = np.asarray(normal)[None, :], np.asarray(anomalous)[:, None]
    return float(((a > n) + 0.5 * (a == n)).mean())


def _time_forward(forward: Any, images: Any, batch: int, rounds: int) -> float:
    """Best images/s over ``rounds`` passes of the test images in batches (one warm-up batch first)."""
    import torch

    forward(images[:batch])
    best = 0.0
    for _ in range(rounds):
        start, n = time.perf_counter(), 0
        for i in range(0, images.shape[0], batch):
            forward(images[i : i + batch])
            n += images[i : i + batch].shape[0]
        best = max(best, n / (time.perf_counter() - start))
    del torch
    return best


# ----------------------------------------------------------------------------- anomalib side (in its venv)
def run_anomalib(name: str, data_path: str, weights_path: str, batch: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch

    data = np.load(data_path)
    train = torch.from_numpy(data["train"]).float().div(255)
    test = torch.from_numpy(data["test"]).float().div(255)
    labels = data["labels"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    p = PARAMS[name]
    if name == "padim":
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(backbone=BACKBONE, layers=p["layers"], pre_trained=False, n_features=p["n_features"])
    elif name == "patchcore":
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        model = PatchcoreModel(
            layers=p["layers"], backbone=BACKBONE, pre_trained=False, num_neighbors=p["num_neighbors"]
        )
    elif name == "dfm":
        from anomalib.models.image.dfm.torch_model import DFMModel

        model = DFMModel(
            backbone=BACKBONE,
            layer=p["layer"],
            pre_trained=False,
            pooling_kernel_size=p["pooling_kernel_size"],
            n_comps=p["pca_level"],
            score_type=p["score_type"],
        )
    else:
        from anomalib.models.components.classification import FeatureScalingMethod
        from anomalib.models.image.dfkde.torch_model import DfkdeModel

        model = DfkdeModel(
            backbone=BACKBONE,
            layers=p["layers"],
            pre_trained=False,
            n_pca_components=p["n_pca_components"],
            feature_scaling_method=FeatureScalingMethod(p["feature_scaling_method"]),
        )
    state = torch.load(weights_path, weights_only=True)
    missing, _unexpected = model.feature_extractor.feature_extractor.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"anomalib {name}: backbone weights missing {missing[:5]}")
    model.feature_extractor.eval()

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    start = time.perf_counter()
    model.train()
    model.feature_extractor.eval()
    with torch.no_grad():
        for i in range(0, train.shape[0], batch):
            model(norm(train[i : i + batch]))
        if name == "patchcore":
            model.subsample_embedding(p["coreset_sampling_ratio"])
        else:
            model.fit()
    fit_s = time.perf_counter() - start
    model.eval()

    def forward(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(norm(x))

    scores = np.concatenate(
        [forward(test[i : i + batch]).pred_score.flatten().numpy() for i in range(0, len(test), batch)]
    )
    ips = _time_forward(forward, test, batch, rounds)
    return {
        "fit_s": fit_s,
        "images_per_s": ips,
        "image_auroc": auroc(scores[labels == 0].tolist(), scores[labels == 1].tolist()),
    }


# ----------------------------------------------------------------------------- oddeye side
def run_oddeye(name: str, data_path: str, batch: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from oddeye.models.base import create_model
    from oddeye.models.inference import inference_settings, prepare_for_inference

    data = np.load(data_path)
    train = torch.from_numpy(data["train"]).float().div(255)
    test = torch.from_numpy(data["test"]).float().div(255)
    labels = data["labels"]
    model = create_model(name, backbone=BACKBONE, weights=f"offline:{BACKBONE}", image_size=(256, 256), **PARAMS[name])
    start = time.perf_counter()
    model._fit_normal(list(train.split(batch)), progress=False)  # the same work as anomalib's fit: no normaliser
    fit_s = time.perf_counter() - start
    model.normalizer.fit(torch.cat([model.raw_forward(b)[0] for b in train[:32].split(batch)]))
    model.fitted = True
    prepare_for_inference(model, "cpu")
    scores = torch.cat([model.raw_forward(b)[0] for b in test.split(batch)]).numpy()
    ips = _time_forward(lambda x: model(x), test, batch, rounds)
    return {
        "fit_s": fit_s,
        "images_per_s": ips,
        "image_auroc": auroc(scores[labels == 0].tolist(), scores[labels == 1].tolist()),
        "settings": dict(inference_settings(model) or {}),
    }


def make_data(category: str, n_train: int, path: Path) -> None:
    import numpy as np

    from oddeye.data.synth import SynthImageSpec, render_category

    train, good, bad = render_category(category, SynthImageSpec(size=256, train=n_train), seed=0)
    test = good + [image for _, image, _ in bad]
    labels = np.array([0] * len(good) + [1] * len(bad))
    chw = lambda images: np.stack(images).transpose(0, 3, 1, 2).copy()  # noqa: E731
    np.savez(path, train=chw(train), test=chw(test), labels=labels)


def save_backbone(name: str, path: Path) -> None:
    """oddeye's offline EfficientNet-Lite0 weights for this model's layers, as a timm features_only state_dict."""
    import torch

    from oddeye.models.base import create_model

    model = create_model(name, backbone=BACKBONE, weights=f"offline:{BACKBONE}", **PARAMS[name])
    torch.save(model.feature_extractor.feature_extractor.state_dict(), path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--category", default="brick")
    ap.add_argument("--train", type=int, default=80, help="normal training images (data synth's default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the test images (best counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--side", choices=["anomalib", "oddeye"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side == "anomalib":
        print(json.dumps(run_anomalib(args.model, args.data, args.weights, args.batch, args.rounds)))
        return 0
    if args.side == "oddeye":
        print(json.dumps(run_oddeye(args.model, args.data, args.batch, args.rounds)))
        return 0
    if not ANOMALIB_PYTHON.is_file():
        print(f"{ANOMALIB_PYTHON} is missing: run `bash benchmarks/anomalib_env.sh` first", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npz"
        make_data(args.category, args.train, data)
        for name in args.models.split(","):
            weights = Path(tmp) / f"{name}.pt"
            save_backbone(name, weights)
            row: dict[str, Any] = {"model": name}
            common = [f"--model={name}", f"--data={data}", f"--batch={args.batch}", f"--rounds={args.rounds}"]
            common.append(f"--threads={args.threads}")
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            for side, python in (("oddeye", sys.executable), ("anomalib", str(ANOMALIB_PYTHON))):
                cmd = [python, __file__, f"--side={side}", *common, f"--weights={weights}"]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if done.returncode != 0:
                    print(f"{name} on {side} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    row[side] = {"error": done.stderr.strip().splitlines()[-1:]}
                    continue
                row[side] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{name} {side}: {row[side]}", file=sys.stderr, flush=True)
            rows.append(row)
    print(f"# oddeye vs anomalib 2.7.0, {args.category}, 256², batch {args.batch}, torch {torch.__version__}")
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        o, a = row.get("oddeye", {}), row.get("anomalib", {})
        if "error" in o or "error" in a:
            print(f"| {row['model']} | failed: {o.get('error') or a.get('error')} |")
            continue
        print(
            f"| {row['model']} | {o['images_per_s']:.1f} | {a['images_per_s']:.1f} | "
            f"{o['images_per_s'] / a['images_per_s']:.2f}× | {o['image_auroc']:.3f} | {a['image_auroc']:.3f} | "
            f"{o['fit_s']:.1f} | {a['fit_s']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
