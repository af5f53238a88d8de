"""oddeye vs anomalib 2.7.0, STFPM and Reverse Distillation: image AUROC, pixel AUROC and fit seconds.

    bash benchmarks/anomalib_env.sh          # once: anomalib in .venv-anomalib (torch pinned to oddeye's)
    python benchmarks/vs_anomalib_accuracy.py --data D [--models stfpm,reverse_distillation]
        [--categories brick,chelsea] [--max-epochs N] [--train N] [--json R.json]
        [--backbone resnet18 --layers layer1,layer2,layer3]

``D`` is an ``oddeye data synth`` output (``D/images/<category>`` in the MVTec layout). Both
systems get the settings of ``configs/bench/<model>.yaml``: backbone ``efficientnet_lite0`` with
oddeye's offline ImageNet weights (saved once and loaded into anomalib's timm backbone, built
with ``pre_trained=False``), the same layers, 256² input, batch 16, the config's ``max_epochs``
(``--max-epochs`` overrides it on both sides, for a quick check), and the optimisers of
anomalib's defaults (STFPM: SGD lr 0.4, momentum 0.9, weight decay 1e-3; Reverse Distillation:
Adam lr 0.005, betas (0.5, 0.99), oddeye's defaults too).

Training images: oddeye learns from the first 64 of a category's 80 training images and
normalises its scores on the last 16 (``fit.val_fraction`` 0.2). anomalib learns from the same
64 images, so both train on identical data; it gets no validation set (its post-processor
normalisation is not needed: ranking metrics are computed on its raw outputs). ``--train N``
uses only the first N training images (oddeye still holds out the last fifth).

Each side reads the same decoded uint8 images (oddeye's loader; no resizing is left for either
side at 256²). oddeye: ``fit_images`` (what ``oddeye fit``/``eval`` run) and the model prepared
as ``oddeye eval`` prepares it, scored by ``score_images``. anomalib (a subprocess in
``.venv-anomalib``): its Lightning ``Stfpm``/``ReverseDistillation`` trained by ``Engine.fit``
on the CPU (``max_epochs``, no early stopping, no validation, shuffled batches as its
datamodules give), then its torch model in eval mode on the pre-processor's normalisation of the
test images: its raw ``pred_score`` and ``anomaly_map``. Image AUROC and pixel AUROC of both
come from the same functions, ``oddeye.evaluation.auroc``/``pixel_auroc``, with the masks read
once. Fit seconds: oddeye's whole fit (training and the scores of the 16 held-out images for
its normaliser); anomalib's ``Engine.fit`` call. Sides run one after the other, oddeye first.

anomalib 2.7.0's Reverse Distillation only has decoders for ResNet backbones; with
``efficientnet_lite0`` it refuses to build, and its row says so. ``--backbone resnet18``
(with ``--layers``) compares both on a ResNet instead: no ImageNet weights for it are stored
offline, so both sides get the same seeded random initialisation (timm's, seed 0), saved once.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from anomalib_common import ANOMALIB_PYTHON, ROOT, anomalib_missing, load_backbone, subprocess_env

MODELS = ("stfpm", "reverse_distillation")


# ----------------------------------------------------------------------------- anomalib side (in its venv)
def run_anomalib(name: str, params: dict[str, Any], data_path: str, weights: str, max_epochs: int, out: str) -> None:
    """Train anomalib's Lightning model with ``Engine`` and write its raw test scores and maps to ``out``."""
    import numpy as np
    import torch
    from anomalib.data import ImageBatch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    backbone = params["backbone"]
    data = np.load(data_path)
    chw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    train, test = chw(data["train"]), chw(data["test"])
    batch = int(params["batch_size"])
    seed_everything(0)
    off = {"post_processor": False, "evaluator": False, "visualizer": False}
    if name == "stfpm":
        from anomalib.models import Stfpm
        from anomalib.models.image.stfpm import torch_model

        # STFPMModel always builds its teacher with pre_trained=True (a download): build it offline instead.
        timm_extractor = torch_model.TimmFeatureExtractor
        torch_model.TimmFeatureExtractor = lambda *a, **k: timm_extractor(*a, **{**k, "pre_trained": False})
        model = Stfpm(backbone=backbone, layers=params["layers"], **off)
        load_backbone(model.model.teacher_model, weights, name)
    else:
        from anomalib.models import ReverseDistillation

        model = ReverseDistillation(
            backbone=backbone,
            layers=params["layers"],
            anomaly_map_mode=params["anomaly_map_mode"],
            pre_trained=False,
            **off,
        )
        load_backbone(model.model.encoder, weights, name)
    loader = torch.utils.data.DataLoader(
        list(train), batch_size=batch, shuffle=True, collate_fn=lambda xs: ImageBatch(image=torch.stack(xs))
    )
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            max_epochs=max_epochs,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        engine.fit(model, train_dataloaders=loader)
        fit_s = time.perf_counter() - start
    model.model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for b in test.split(batch):
            pred = model.model(model.pre_processor.transform(b))
            scores.append(pred.pred_score.flatten().double().numpy())
            maps.append(pred.anomaly_map.squeeze(1).float().numpy())
    np.savez(out, scores=np.concatenate(scores), maps=np.concatenate(maps), fit_s=fit_s)


# ----------------------------------------------------------------------------- oddeye side
def bench_config(name: str, args: argparse.Namespace, weights: Path) -> Any:
    """``configs/bench/<name>.yaml`` with anomalib's optimiser settings, and the command line's overrides.

    With ``--backbone``, that backbone and ``--layers``, initialised from ``weights`` (a seeded random init).
    """
    from oddeye.config import load_config

    params: dict[str, Any] = {}
    if args.max_epochs:
        params["max_epochs"] = args.max_epochs
    if args.backbone:
        params.update(backbone=args.backbone, layers=f"[{args.layers}]", weights=weights)
    overrides = [f"model.params.{k}={v}" for k, v in params.items()]
    return load_config(ROOT / "configs" / "bench" / f"{name}.yaml", overrides)


def save_weights(params: dict[str, Any], path: Path, random_init: bool) -> None:
    """The backbone weights both sides start from: the config's (oddeye's offline ImageNet copy), or a
    seeded random initialisation."""
    import torch
    from anomalib_common import save_backbone

    from oddeye.models.components import TimmFeatureExtractor

    if random_init:
        torch.manual_seed(0)
        extractor = TimmFeatureExtractor(params["backbone"], params["layers"], pre_trained=False)
    else:
        extractor = TimmFeatureExtractor(params["backbone"], params["layers"], weights=params["weights"])
    save_backbone(extractor, path)


def run_oddeye(cfg: Any, train: Any, test: Any, checkpoint: Path) -> tuple[Any, Any, float]:
    """Fit as ``oddeye fit`` does and score the test images as ``oddeye eval`` does: (scores, maps, fit s)."""
    from oddeye.evaluation.evaluate import score_images
    from oddeye.pipeline.fit import fit_images
    from oddeye.pipeline.scoring import prepare_model, resolve_device

    start = time.perf_counter()
    model, _ = fit_images(cfg, train, checkpoint, progress=False)
    fit_s = time.perf_counter() - start
    device = resolve_device(cfg.model.device)
    prepare_model(model, device, cfg.model.precision, cfg.model.compile)
    scores, maps, _fps = score_images(model, test, cfg.fit.batch_size, device)
    return scores, maps, fit_s


def metrics(scores: Any, maps: Any, labels: Any, masks: Any) -> dict[str, float]:
    """One metric code for both systems."""
    from oddeye.evaluation import auroc, pixel_auroc

    return {"image_auroc": auroc(scores, labels), "pixel_auroc": pixel_auroc(maps, masks)}


# ----------------------------------------------------------------------------- driver
def _category(path: Path, cfg: Any, n_train: int | None, tmp: Path) -> tuple[dict[str, Any], Path]:
    """The category's images (oddeye's loader), and an npz of what anomalib gets: the images oddeye learns from
    and the test images."""
    import numpy as np

    from oddeye.data.images import load_images, load_masks, open_category
    from oddeye.models.base import fold_assignment
    from oddeye.pipeline.fit import collect_folder_images, holdout_folds

    size = tuple(cfg.model.image_size)
    cat = open_category(path)
    train, _ = collect_folder_images(path, size, cfg.fit.max_frames)
    train = train[:n_train] if n_train else train
    assign = fold_assignment(len(train), holdout_folds(cfg)).numpy()
    learnt = train[assign != assign.max()] if assign.max() > 0 else train
    test = load_images([s.path for s in cat.test], size)
    data = {
        "train": train,
        "test": test,
        "labels": np.array([s.label for s in cat.test], bool),
        "masks": load_masks(cat.test, size),
        "n_learnt": len(learnt),
    }
    npz = tmp / f"{path.name}.npz"
    np.savez(npz, train=learnt, test=test)
    return data, npz


def _anomalib_row(name: str, cfg: Any, npz: Path, weights: Path, tmp: Path) -> dict[str, Any]:
    import numpy as np

    params = {**cfg.model.params, "batch_size": cfg.fit.batch_size}
    out = tmp / f"anomalib-{name}.npz"
    out.unlink(missing_ok=True)
    cmd = [str(ANOMALIB_PYTHON), __file__, "--side=anomalib", f"--model={name}", f"--npz={npz}"]
    cmd += [f"--weights={weights}", f"--params={json.dumps(params)}", f"--out={out}"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    res = np.load(out)
    return {"scores": res["scores"], "maps": res["maps"], "fit_s": float(res["fit_s"])}


def _fmt(row: dict[str, Any]) -> str:
    head = f"| {row['model']} | {row['category']} | {row['system']} |"
    if "error" in row:
        return f"{head} – | – | – | {row['error']} |"
    return f"{head} {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} | {row['fit_s']:.1f} | |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an `oddeye data synth` output folder (holding images/<category>)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--categories", default="brick,chelsea")
    ap.add_argument("--max-epochs", type=int, help="override the configs' max_epochs on both sides (quick checks)")
    ap.add_argument("--train", type=int, help="only the first N training images (quick checks)")
    ap.add_argument("--backbone", help="this backbone on both sides, from a seeded random init (e.g. resnet18)")
    ap.add_argument("--layers", default="layer1,layer2,layer3", help="with --backbone: its layers")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--side", choices=["anomalib"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "anomalib":
        params = json.loads(args.params)
        run_anomalib(args.model, params, args.npz, args.weights, int(params["max_epochs"]), args.out)
        return 0
    if missing := anomalib_missing():
        print(missing, file=sys.stderr)
        return 2
    if not args.data:
        ap.error("--data is required")
    import torch

    images = Path(args.data) / "images"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.models.split(","):
            weights = tmp / f"{name}-backbone.pt"
            cfg = bench_config(name, args, weights)
            params = cfg.model.params
            save_weights(params, weights, random_init=bool(args.backbone))
            for category in args.categories.split(","):
                data, npz = _category(images / category, cfg, args.train, tmp)
                common = {"model": name, "category": category, "n_learnt": data["n_learnt"]}
                common.update(backbone=params["backbone"], max_epochs=params["max_epochs"])
                scores, maps, fit_s = run_oddeye(cfg, data["train"], data["test"], tmp / f"{name}-{category}.pt")
                ours = {**common, "system": "oddeye", "fit_s": fit_s}
                ours.update(metrics(scores, maps, data["labels"], data["masks"]))
                print(_fmt(ours), file=sys.stderr, flush=True)
                theirs = {**common, "system": "anomalib 2.7.0"}
                res = _anomalib_row(name, cfg, npz, weights, tmp)
                if "error" not in res:
                    theirs["fit_s"] = res["fit_s"]
                    theirs.update(metrics(res["scores"], res["maps"], data["labels"], data["masks"]))
                else:
                    theirs["error"] = res["error"]
                print(_fmt(theirs), file=sys.stderr, flush=True)
                rows += [ours, theirs]
    weights = "seeded random init" if args.backbone else "offline ImageNet weights"
    print(
        f"# oddeye vs anomalib 2.7.0 on {args.data}: {rows[0]['backbone'] if rows else '?'} ({weights}), "
        "256², batch 16, "
        f"max_epochs as configs/bench (or --max-epochs), {rows[0]['n_learnt'] if rows else '?'} training images; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| model | category | system | image AUROC | pixel AUROC | fit s | note |")
    print("|---|---|---|---:|---:|---:|---|")
    for row in rows:
        print(_fmt(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
