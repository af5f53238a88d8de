"""``oddeye export CHECKPOINT --format onnx|torchscript --out FILE``: a self-contained scoring graph.

The exported graph takes images [B, 3, H, W] float in [0, 1] at the checkpoint's
``image_size`` and returns the *normalised* scores — ``score`` [B] and, for models with
maps, ``anomaly_map`` [B, H, W] — exactly what ``model(images)`` gives, with the backbone's
ImageNet normalisation and the [0, 1] score normalisation inside. The checkpoint stays the
source of truth: export again after every fit.

The graph is traced for one batch size (``--batch-size``, default 1): memory-bank search
is chunked by the number of patches, so other batch sizes need their own export.
ONNX needs the ``export`` extra (``pip install 'oddeye[export]'``: onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

COMMAND = "export"
HELP = "export a fitted checkpoint to ONNX or TorchScript (normalisation included; score and map out)"

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint written by `oddeye fit` (model.checkpoint)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size the graph is traced for (default 1)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the export's scores with the model's")


def run(args: argparse.Namespace) -> int:
    from oddeye.models.base import CheckpointError, load_model

    if args.batch_size < 1:
        print(f"oddeye export: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model = load_model(args.checkpoint)
    except CheckpointError as e:
        print(f"oddeye export: {e}", file=sys.stderr)
        return 1
    try:
        out = export_model(model, args.format, args.out, batch_size=args.batch_size)
        if not args.no_check:
            diff = check_export(model, out, args.format, batch_size=args.batch_size)
            print(f"checked: exported scores differ from the checkpoint's by at most {diff:.2e}")
    except ExportError as e:
        print(f"oddeye export: {e}", file=sys.stderr)
        return 1
    h, w = model.image_size
    print(f"wrote {out} ({args.format}, {model.name}, batch {args.batch_size}, {h}×{w})")
    return 0


class ExportError(RuntimeError):
    """The model cannot be exported in the asked format (missing package, unsupported model)."""


def scoring_module(model: Any) -> Any:
    """A module whose forward is ``model(images)`` as plain tensors: (score,) or (score, anomaly_map)."""
    from torch import nn

    class Scoring(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: Any) -> Any:
            pred = self.model(images)  # the model's own forward: the export follows its normalisation
            return (pred.score,) if pred.anomaly_map is None else (pred.score, pred.anomaly_map)

    return Scoring().eval()


def output_names(model: Any, example: Any) -> list[str]:
    """``["score"]`` or ``["score", "anomaly_map"]``, from one run of the model."""
    import torch

    with torch.no_grad():
        out = model.raw_forward(example)
    return ["score"] if out[1] is None else ["score", "anomaly_map"]


def export_model(model: Any, fmt: str, out: str | Path, batch_size: int = 1) -> Path:
    """Write ``model`` (fitted, eval mode, CPU) to ``out`` as ``fmt``; returns the path."""
    import torch

    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if getattr(model, "is_video", False):
        raise ExportError(f"{model.name} is a video model; export supports image models only")
    model = model.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(batch_size, 3, *model.image_size)
    wrapper = scoring_module(model)
    names = output_names(model, example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values baked into the graph: intended
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            traced.save(str(out))
        else:
            onnx_export(wrapper, example, out, names)
    log.info("exported %s to %s (%s)", model.name, out, fmt)
    return out


def onnx_export(module: Any, example: Any, out: str | Path, names: list[str]) -> Path:
    """Trace ``module`` on ``example`` images into an ONNX graph at ``out`` (input ``images``, outputs ``names``):
    oddeye's one way to write ONNX (the opset, the TorchScript exporter, one self-contained file)."""
    import torch

    _require("onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values baked into the graph: intended
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["images"],
            output_names=names,
            opset_version=ONNX_OPSET,
            dynamo=False,
            external_data=False,
        )
    return Path(out)


def load_exported(path: str | Path, fmt: str) -> Any:
    """A callable images [B, 3, H, W] float32 → tuple of numpy/tensor outputs, for the exported file."""
    import numpy as np
    import torch

    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the format users ask for
            module = torch.jit.load(str(path), map_location="cpu")

        def run_ts(images: torch.Tensor) -> tuple[np.ndarray, ...]:
            with torch.no_grad():
                return tuple(t.numpy() for t in module(images))

        return run_ts
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run_onnx(images: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(session.run(None, {input_name: images.numpy().astype(np.float32)}))

    return run_onnx


def check_export(model: Any, path: str | Path, fmt: str, batch_size: int = 1, seed: int = 0) -> float:
    """Largest absolute difference between the export's and the model's normalised outputs on random images."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, *model.image_size, generator=gen)
    with torch.no_grad():
        pred = model(images)
    expected = [pred.score.numpy()] + ([] if pred.anomaly_map is None else [pred.anomaly_map.numpy()])
    got = load_exported(path, fmt)(images)
    if len(got) != len(expected):
        raise ExportError(f"the export returns {len(got)} outputs, the model {len(expected)}")
    return max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected, strict=True))


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{module} is not installed: pip install 'oddeye[export]' (onnx and onnxruntime)")
