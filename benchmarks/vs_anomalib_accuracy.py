"""oddeye vs anomalib 2.7.0, six models side by side: image AUROC, pixel AUROC and fit seconds.

    bash benchmarks/anomalib_env.sh          # once: anomalib in .venv-anomalib (torch pinned to oddeye's)
    python benchmarks/vs_anomalib_accuracy.py --data D [--models stfpm,reverse_distillation,fastflow,cflow,glass,draem]
        [--categories brick,chelsea] [--max-epochs N] [--train N] [--image-size N] [--json R.json]
        [--backbone resnet18 --layers layer1,layer2,layer3] [--param NAME=VALUE ...] [--anomaly-source DIR]

``D`` is an ``oddeye data synth`` output (``D/images/<category>`` in the MVTec layout). Both
systems get the settings of ``configs/bench/<model>.yaml``: its backbone with oddeye's offline
ImageNet weights (saved once and loaded into anomalib's timm backbone, built with
``pre_trained=False``), the same layers, the config's input size and batch size, its
``max_epochs`` (``--max-epochs``, ``--image-size N`` and ``--train N`` shrink a run on both sides,
for a quick check) and every one of
its model parameters, passed to anomalib's constructor under the same name (DRAEM's
``anomaly_source_path`` is anomalib's ``dtd_dir``). Settings anomalib hard-codes instead of
taking them (``ANOMALIB_FIXED``: the optimisers of STFPM, Reverse Distillation and FastFlow,
FastFlow's layers, DRAEM's widths and learning rate) must equal the config's, or anomalib's row
says which differ and runs nothing; ``--param NAME=VALUE`` (repeatable) sets a model parameter
on both sides, ``--backbone``/``--layers`` the backbone.

Which mode each model needs for a comparable row (run each mode on its own: ``--backbone`` and
``--param`` apply to every model of a run; without its mode, anomalib's row of reverse_distillation,
fastflow or draem is an error that says why):

- ``stfpm``, ``cflow``, ``glass``: the bench configs as they are (``efficientnet_lite0``, offline
  ImageNet weights).
- ``reverse_distillation``: ``--backbone resnet18 --layers layer1,layer2,layer3``; anomalib
  2.7.0's Reverse Distillation only has decoders for ResNet backbones and refuses
  ``efficientnet_lite0``.
- ``fastflow``: ``--backbone resnet18 --layers layer1,layer2,layer3``; anomalib's FastflowModel
  only accepts resnet18 and wide_resnet50_2 (always their layer1-3, it takes no ``layers``) and
  two ViTs (cait_m48_448, deit_base_distilled_patch16_384).
- ``draem``: ``--param base_width=128 --param disc_base_width=64 --param learning_rate=0.0001``;
  anomalib's Draem hard-codes the paper's widths (128 and 64) and Adam lr 1e-4, where the bench
  config trains narrower networks (32, 16) at lr 1e-3 to fit the 2-core budget. The paper's widths
  make a training step about 5 times slower (measured at 128², batch 8): some 20-25 min per side
  and category on the 2-core VM at the config's 13 epochs. DRAEM has no pretrained backbone, so
  ``--backbone`` does not apply to it.

``--backbone resnet18``: no ImageNet weights for it are stored offline, so both sides get the
same seeded random initialisation (timm's, seed 0), saved once, and both keep it frozen.

Anomaly source (DRAEM and GLASS paste textures through Perlin masks): with no texture folder
anomalib's ``PerlinAnomalyGenerator`` pastes the Perlin noise itself (grey, augmented), oddeye its
built-in procedural textures (noise fields, stripes, checkers, speckle), and anomalib's Draem would
try to download DTD. So both sides get the same folder: 128 of oddeye's procedural textures (seeded,
256², written once into ``$TMPDIR/oddeye-vs-anomalib-textures-128`` and kept; ``--anomaly-source
DIR``, e.g. DTD's ``images/``, replaces it). oddeye then samples that fixed set instead of fresh
textures, its only change from ``configs/bench/{draem,glass}.yaml``'s ``anomaly_source_path: null``.
anomalib's GLASS takes no foreground mask (the paper's optional one) and needs no datamodule of its
own: its Perlin masks may fall anywhere in the image, as oddeye's.

What stays each system's own: how a texture is augmented and blended (DRAEM: both paste the
texture at opacity ``beta``, drawn from the same range; GLASS: anomalib draws the opacity from
U(0.2, 1), oddeye from N(0.5, 0.1) clipped to [0.2, 0.8]), DRAEM's learning-rate
steps (oddeye: ÷10 at 80% and 90% of ``max_epochs``; anomalib: at epochs 400 and 600, never reached
in a short run), DRAEM's image score (oddeye: the maximum of the map's 21×21 local mean, as in the
paper; anomalib: the map's maximum), and GLASS's optimisers (anomalib: AdamW, weight decay 1e-2, for
the discriminator, Adam with weight decay 1e-5 for the adaptor, and the mean feature recomputed
every epoch; oddeye: one Adam with the same two learning rates, the mean computed once).

anomalib's GLASS reads ``pre_trained=False`` as "train the backbone too" (an extra AdamW on it):
it is built with ``pre_trained=True`` and, as for STFPM, whose teacher is always built with
``pre_trained=True``, its ``TimmFeatureExtractor`` is redirected to ``pre_trained=False`` (no
download) before the same weights are loaded, so its backbone stays frozen as oddeye's does.

Training images: oddeye learns from the first 64 of a category's 80 training images and
normalises its scores on the last 16 (``fit.val_fraction`` 0.2). anomalib learns from the same
64 images, so both train on identical data; it gets no validation set (its post-processor
normalisation is not needed: ranking metrics are computed on its raw outputs). ``--train N``
uses only the first N training images (oddeye still holds out the last fifth).

Each side reads the same decoded uint8 images (oddeye's loader, at the config's input size, so
anomalib's pre-processor resize, built for that size, has nothing left to do). oddeye:
``fit_images`` (what ``oddeye fit``/``eval`` run) and the model prepared as ``oddeye eval``
prepares it, scored by ``score_images``. anomalib (a subprocess in ``.venv-anomalib``): its
Lightning model trained by ``Engine.fit`` on the CPU (``max_epochs``, no early stopping, no
validation, shuffled batches as its datamodules give), then its torch model in eval mode on the
pre-processor's transform of the test images (ImageNet normalisation; DRAEM: none): its raw
``pred_score`` and ``anomaly_map``. Image AUROC and pixel AUROC of both come from the same
functions, ``oddeye.evaluation.auroc``/``pixel_auroc``, with the masks read once. Fit seconds:
oddeye's whole fit (training and the scores of the 16 held-out images for its normaliser);
anomalib's ``Engine.fit`` call. Sides run one after the other, oddeye first.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from anomalib_common import ANOMALIB_PYTHON, ROOT, anomalib_missing, load_backbone, subprocess_env

MODELS = ("stfpm", "reverse_distillation", "fastflow", "cflow", "glass", "draem")
# anomalib's Lightning class of each model.
ANOMALIB_CLASSES = {
    "stfpm": "Stfpm",
    "reverse_distillation": "ReverseDistillation",
    "fastflow": "Fastflow",
    "cflow": "Cflow",
    "glass": "Glass",
    "draem": "Draem",
}
# Settings anomalib 2.7.0 hard-codes (in its optimisers and torch models) instead of taking them: the config's must
# be these values. Any other model parameter its constructor does not take is an error too.
ANOMALIB_FIXED: dict[str, dict[str, Any]] = {
    "stfpm": {"lr": 0.4, "momentum": 0.9, "weight_decay": 1e-3},
    "reverse_distillation": {"lr": 0.005},
    "fastflow": {"lr": 1e-3, "weight_decay": 1e-5, "layers": ["layer1", "layer2", "layer3"]},
    "draem": {"learning_rate": 1e-4, "base_width": 128, "disc_base_width": 64},
}
# oddeye's parameter name → anomalib's, where they differ.
ANOMALIB_RENAMED = {"draem": {"anomaly_source_path": "dtd_dir"}}
# Handled by this script, not passed on as they are: the backbone weights (loaded after building), the epochs
# (Engine's), the batch (the loader's), the input size (the pre-processor's) and the seed (seed_everything(0)).
SCRIPT_PARAMS = {"weights", "pre_trained", "max_epochs", "max_steps", "batch_size", "image_size", "seed"}
# Models whose anomalib torch model builds its TimmFeatureExtractor with pre_trained=True (STFPM always; GLASS because
# its pre_trained=False also trains the backbone): that extractor is redirected to pre_trained=False.
BUILT_PRETRAINED = ("stfpm", "glass")
# DRAEM's and GLASS's anomaly source on both sides: this many of oddeye's procedural textures, kept between runs.
N_TEXTURES = 128
TEXTURES = Path(tempfile.gettempdir()) / f"oddeye-vs-anomalib-textures-{N_TEXTURES}"
# Where each anomalib model keeps its backbone (an object with a ``feature_extractor``).
ANOMALIB_BACKBONE = {
    "stfpm": lambda m: m.teacher_model,
    "reverse_distillation": lambda m: m.encoder,
    "fastflow": lambda m: m,
    "cflow": lambda m: m.encoder,
    "glass": lambda m: m.forward_modules["feature_aggregator"],
}


# ----------------------------------------------------------------------------- anomalib side (in its venv)
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def anomalib_kwargs(name: str, cls: Any, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config's model parameters under anomalib's names, and those anomalib fixes to another value
    (``name=anomalib's (the config's)``) or does not have."""
    import inspect

    accepted = inspect.signature(cls).parameters
    renamed, fixed = ANOMALIB_RENAMED.get(name, {}), ANOMALIB_FIXED.get(name, {})
    kwargs: dict[str, Any] = {}
    differ: list[str] = []
    for key, value in params.items():
        if key in SCRIPT_PARAMS:
            continue
        theirs = renamed.get(key, key)
        if theirs in accepted:
            # Number ranges (DRAEM's beta) must be tuples: anomalib's blend reads a list as its fallback 0.5.
            numbers = isinstance(value, list) and all(isinstance(x, int | float) for x in value)
            kwargs[theirs] = tuple(value) if numbers else value
        elif key in fixed:
            if not _same(fixed[key], value):
                differ.append(f"{key}={fixed[key]} ({value})")
        else:
            differ.append(f"{key}=– ({value})")
    return kwargs, differ


def run_anomalib(name: str, params: dict[str, Any], data_path: str, weights: str, max_epochs: int, out: str) -> None:
    """Train anomalib's Lightning model with ``Engine`` and write its raw test scores and maps to ``out``."""
    import importlib
    import inspect

    import anomalib.models
    import numpy as np
    import torch
    from anomalib.data import ImageBatch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    data = np.load(data_path)
    chw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    train, test = chw(data["train"]), chw(data["test"])
    batch = int(params["batch_size"])
    size = tuple(int(s) for s in params["image_size"])
    seed_everything(0)
    cls = getattr(anomalib.models, ANOMALIB_CLASSES[name])
    kwargs, differ = anomalib_kwargs(name, cls, params)
    kwargs.update(pre_processor=cls.configure_pre_processor(size), post_processor=False, evaluator=False)
    kwargs["visualizer"] = False
    if name == "glass":
        kwargs["input_shape"] = size
    if name in BUILT_PRETRAINED:
        # Built offline instead (no download); the weights are loaded below.
        torch_model = importlib.import_module(f"anomalib.models.image.{name}.torch_model")
        timm_extractor = torch_model.TimmFeatureExtractor
        torch_model.TimmFeatureExtractor = lambda *a, **k: timm_extractor(*a, **{**k, "pre_trained": False})
    elif "pre_trained" in inspect.signature(cls).parameters:
        kwargs["pre_trained"] = False
    model = cls(**kwargs)  # anomalib's own refusals (a backbone it has no decoder for) raise here
    if differ:
        raise RuntimeError(
            f"anomalib's {cls.__name__} hard-codes or lacks {', '.join(differ)} (the config's in brackets): "
            "set them with --param"
        )
    if name in ANOMALIB_BACKBONE:
        load_backbone(ANOMALIB_BACKBONE[name](model.model), weights, name)
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
            amap = pred.anomaly_map
            maps.append((amap.squeeze(1) if amap.dim() == 4 else amap).float().numpy())
    np.savez(out, scores=np.concatenate(scores), maps=np.concatenate(maps), fit_s=fit_s)


# ----------------------------------------------------------------------------- oddeye side
def write_textures(folder: Path, n: int = N_TEXTURES, size: tuple[int, int] = (256, 256)) -> None:
    """``n`` of oddeye's procedural textures as PNGs (seed 0): the anomaly source both sides' DRAEM and GLASS get.

    A folder that already holds them all is kept (they take about a minute on the 2-core VM).
    """
    import numpy as np
    import torch
    from PIL import Image

    from oddeye.models.components.synthesis import procedural_texture

    if folder.is_dir() and all((folder / f"{i:03d}.png").is_file() for i in range(n)):
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        texture = procedural_texture(size, generator).permute(1, 2, 0).mul(255).round().byte().numpy()
        Image.fromarray(np.ascontiguousarray(texture)).save(folder / f"{i:03d}.png.part", format="PNG")
        (folder / f"{i:03d}.png.part").replace(folder / f"{i:03d}.png")


def bench_config(name: str, args: argparse.Namespace, weights: Path, textures: Path) -> Any:
    """``configs/bench/<name>.yaml`` with the command line's overrides.

    With ``--backbone`` (models that have one), that backbone and ``--layers``, initialised from ``weights`` (a
    seeded random init); models with an ``anomaly_source_path`` get ``textures`` (``TEXTURES`` written if missing).
    """
    from oddeye.config import load_config

    path = ROOT / "configs" / "bench" / f"{name}.yaml"
    own = load_config(path).model.params
    params: dict[str, Any] = {}
    if args.max_epochs:
        params["max_epochs"] = args.max_epochs
    if args.backbone and "backbone" in own:
        params.update(backbone=args.backbone, layers=f"[{args.layers}]", weights=weights)
    if "anomaly_source_path" in own:
        if textures == TEXTURES:
            write_textures(textures)
        params["anomaly_source_path"] = textures
    overrides = [f"model.params.{k}={v}" for k, v in params.items()] + [f"model.params.{p}" for p in args.param]
    if args.image_size:
        overrides.append(f"model.image_size=[{args.image_size},{args.image_size}]")
    return load_config(path, overrides)


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

    params = {**cfg.model.params, "batch_size": cfg.fit.batch_size, "image_size": list(cfg.model.image_size)}
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
    ap.add_argument("--image-size", type=int, help="override the configs' N×N input size on both sides (quick)")
    ap.add_argument("--backbone", help="this backbone on both sides, from a seeded random init (e.g. resnet18)")
    ap.add_argument("--layers", default="layer1,layer2,layer3", help="with --backbone: its layers")
    ap.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a model parameter for both sides"
    )
    ap.add_argument("--anomaly-source", help="DRAEM/GLASS texture folder for both sides (default: procedural ones)")
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
    if unknown := set(args.models.split(",")) - set(MODELS):
        ap.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    import torch

    images = Path(args.data) / "images"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        textures = Path(args.anomaly_source).resolve() if args.anomaly_source else TEXTURES
        for name in args.models.split(","):
            weights = tmp / f"{name}-backbone.pt"
            cfg = bench_config(name, args, weights, textures)
            params = cfg.model.params
            random_init = bool(args.backbone) and "backbone" in params
            if "backbone" in params:
                save_weights(params, weights, random_init=random_init)
            init = "seeded random init" if random_init else "offline ImageNet weights" if "backbone" in params else ""
            for category in args.categories.split(","):
                data, npz = _category(images / category, cfg, args.train, tmp)
                common = {"model": name, "category": category, "n_learnt": data["n_learnt"]}
                common.update(backbone=params.get("backbone", "none"), init=init, max_epochs=params["max_epochs"])
                common.update(image_size=list(cfg.model.image_size), batch_size=cfg.fit.batch_size)
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
    print(
        f"# oddeye vs anomalib 2.7.0 on {args.data}, settings of configs/bench (--max-epochs, --image-size, "
        f"--backbone, --param: {args.max_epochs or '–'}, {args.image_size or '–'}, {args.backbone or '–'}, "
        f"{' '.join(args.param) or '–'}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    for name in dict.fromkeys(row["model"] for row in rows):
        row = next(r for r in rows if r["model"] == name)
        h, w = row["image_size"]
        backbone = f"{row['backbone']} ({row['init']})" if row["init"] else "no backbone"
        print(
            f"# {name}: {backbone}, {h}×{w}, batch {row['batch_size']}, max_epochs {row['max_epochs']}, "
            f"{row['n_learnt']} training images"
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
