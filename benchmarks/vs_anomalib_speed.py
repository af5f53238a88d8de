"""oddeye vs anomalib 2.7.0, side by side in one run: images/s, image AUROC and fit seconds.

    bash benchmarks/anomalib_env.sh          # once: anomalib in .venv-anomalib (torch pinned to oddeye's)
    python benchmarks/vs_anomalib_speed.py [--models padim,patchcore,dfm,dfkde] [--category brick]
        [--train 80] [--batch 32] [--repeats 5] [--batches 2] [--json R.json]

Both systems get the same EfficientNet-Lite0 ImageNet weights (oddeye's offline copy,
saved once and loaded into anomalib's timm backbone built with ``pre_trained=False``),
the same layers and parameters as ``configs/bench/*.yaml``, the same 256² images of one
``oddeye data synth`` category (rendered in memory), batch 32, the same machine and the
same torch threads. Each side runs in its own process (anomalib in ``.venv-anomalib``),
one model at a time: oddeye fits and scores the test images, then anomalib does, and both
processes stay alive. The timed passes then alternate, oddeye, anomalib, oddeye, ...
(``--repeats`` each), so a noisy machine hurts both alike; the table gives each side's
median images/s with the min–max of its repeats, and the median of the per-pair ratios.
A timed pass is ``--batches`` full batches (the test images, cycled), after one warm-up
batch. images/s is the full forward of a batch (anomalib: its torch model in eval mode,
after the ImageNet normalisation its pre-processor would apply; oddeye: ``model(images)``
after ``prepare_for_inference``, normalisation included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from anomalib_common import ANOMALIB_PYTHON, BACKBONE, ROOT, anomalib_missing, load_backbone, subprocess_env

MODELS = ("padim", "patchcore", "dfm", "dfkde")
# configs/bench/*.yaml, in each library's parameter names.
PARAMS: dict[str, dict[str, Any]] = {
    "padim": {"layers": ["blocks.1", "blocks.2", "blocks.4"], "n_features": 100},
    "patchcore": {"layers": ["blocks.2", "blocks.4"], "coreset_sampling_ratio": 0.1, "num_neighbors": 9},
    "dfm": {"layer": "blocks.4", "pooling_kernel_size": 4, "pca_level": 0.97, "score_type": "fre"},
    "dfkde": {"layers": ["blocks.6"], "n_pca_components": 16, "feature_scaling_method": "scale"},
}
HEADER = (
    "| model | oddeye img/s | anomalib img/s | ratio (median of pairs) "
    "| oddeye AUROC | anomalib AUROC | oddeye fit s | anomalib fit s |"
)


def auroc(normal: list[float], anomalous: list[float]) -> float:
    """Probability that an anomalous score beats a normal one (ties count half)."""
    import numpy as np

    n, a = np.asarray(normal)[None, :], np.asarray(anomalous)[:, None]
    return float(((a > n) + 0.5 * (a == n)).mean())


def _timed_batches(images: Any, batch: int, batches: int) -> list[Any]:
    """``batches`` full batches of ``batch`` images, cycling through ``images``."""
    import torch

    reps = -(-batch * batches // images.shape[0])
    tiled = torch.cat([images] * reps)[: batch * batches]
    return [b.contiguous() for b in tiled.split(batch)]


def _serve(forward: Any, images: Any, batch: int, batches: int, result: dict[str, Any]) -> None:
    """Print ``result`` (one JSON line), then answer each ``time`` line on stdin with one timed pass.

    A pass is ``batches`` full batches; the reply is ``{"images_per_s": ...}``. Ends on ``quit`` or EOF.
    """
    timed = _timed_batches(images, batch, batches)
    forward(timed[0])  # warm-up
    print(json.dumps(result), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        start = time.perf_counter()
        for b in timed:
            forward(b)
        elapsed = time.perf_counter() - start
        print(json.dumps({"images_per_s": batch * batches / elapsed}), flush=True)


# ----------------------------------------------------------------------------- anomalib side (in its venv)
def run_anomalib(name: str, data_path: str, weights_path: str, batch: int, batches: int) -> None:
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
    extra = load_backbone(model.feature_extractor, weights_path, name)
    if name == "padim":  # oddeye's random channel subset, so both fit the same Gaussians
        model.idx = extra["padim_idx"].to(model.idx)
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
    result = {"fit_s": fit_s, "image_auroc": auroc(scores[labels == 0].tolist(), scores[labels == 1].tolist())}
    _serve(forward, test, batch, batches, result)


# ----------------------------------------------------------------------------- oddeye side
def run_oddeye(name: str, data_path: str, batch: int, batches: int) -> None:
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
    result = {
        "fit_s": fit_s,
        "image_auroc": auroc(scores[labels == 0].tolist(), scores[labels == 1].tolist()),
        "settings": dict(inference_settings(model) or {}),
    }
    _serve(model, test, batch, batches, result)


def make_data(category: str, n_train: int, path: Path) -> None:
    import numpy as np

    from oddeye.data.synth import SynthImageSpec, render_category

    train, good, bad = render_category(category, SynthImageSpec(size=256, train=n_train), seed=0)
    test = good + [image for _, image, _ in bad]
    labels = np.array([0] * len(good) + [1] * len(bad))
    chw = lambda images: np.stack(images).transpose(0, 3, 1, 2).copy()  # noqa: E731
    np.savez(path, train=chw(train), test=chw(test), labels=labels)


def save_backbone(name: str, path: Path) -> None:
    """oddeye's offline EfficientNet-Lite0 weights for this model's layers, as a timm features_only state_dict
    (plus PaDiM's channel subset)."""
    from anomalib_common import save_backbone as save

    from oddeye.models.base import create_model

    model = create_model(name, backbone=BACKBONE, weights=f"offline:{BACKBONE}", **PARAMS[name])
    # PaDiM: oddeye's seeded channel subset, for anomalib's PaDiM too
    save(model.feature_extractor, path, **({"padim_idx": model.idx} if name == "padim" else {}))


class _Worker:
    """One side's benchmark process: fits and scores on start, then one timed pass per ``time()``."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        # stderr to a file: a pipe nobody reads fills up with warnings and stalls the worker
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT
        )

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        self.log.seek(0)
        err = self.log.read().strip()
        raise RuntimeError(err.splitlines()[-1] if err else f"exit {self.proc.returncode}")

    def ready(self) -> dict[str, Any]:
        return self._reply()

    def time(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return float(self._reply()["images_per_s"])

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _spread(values: list[float]) -> str:
    import statistics

    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def _bench_model(name: str, args: argparse.Namespace, data: Path, weights: Path) -> dict[str, Any]:
    """Fit both sides (oddeye first), then alternate ``args.repeats`` timed passes."""
    import statistics

    common = [f"--model={name}", f"--data={data}", f"--batch={args.batch}", f"--batches={args.batches}"]
    common += [f"--threads={args.threads}", f"--weights={weights}"]
    env = subprocess_env()
    row: dict[str, Any] = {"model": name}
    workers: dict[str, _Worker] = {}
    try:
        for side, python in (("oddeye", sys.executable), ("anomalib", str(ANOMALIB_PYTHON))):
            workers[side] = _Worker([python, __file__, f"--side={side}", *common], env)
            row[side] = workers[side].ready()
            print(f"{name} {side}: {row[side]}", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for side, worker in workers.items():
                row[side].setdefault("repeats", []).append(worker.time())
        o, a = row["oddeye"]["repeats"], row["anomalib"]["repeats"]
        row["ratio"] = statistics.median(x / y for x, y in zip(o, a, strict=True))
        print(f"{name}: oddeye {_spread(o)}, anomalib {_spread(a)} img/s", file=sys.stderr, flush=True)
    except RuntimeError as e:
        row["error"] = str(e)
        print(f"{name} failed: {e}", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--category", default="brick")
    ap.add_argument("--train", type=int, default=80, help="normal training images (data synth's default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2, help="full batches per timed pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per side, alternating oddeye/anomalib")
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
        run_anomalib(args.model, args.data, args.weights, args.batch, args.batches)
        return 0
    if args.side == "oddeye":
        run_oddeye(args.model, args.data, args.batch, args.batches)
        return 0
    if missing := anomalib_missing():
        print(missing, file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.npz"
        make_data(args.category, args.train, data)
        for name in args.models.split(","):
            weights = Path(tmp) / f"{name}.pt"
            save_backbone(name, weights)
            rows.append(_bench_model(name, args, data, weights))
    print(
        f"# oddeye vs anomalib 2.7.0, {args.category}, {args.train} train images, 256², batch {args.batch}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; img/s: median (min–max) of "
        f"{args.repeats} alternating passes of {args.batches} batches"
    )
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | failed: {row['error']} |")
            continue
        o, a = row["oddeye"], row["anomalib"]
        print(
            f"| {row['model']} | {_spread(o['repeats'])} | {_spread(a['repeats'])} | {row['ratio']:.2f}× | "
            f"{o['image_auroc']:.3f} | {a['image_auroc']:.3f} | {o['fit_s']:.1f} | {a['fit_s']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
