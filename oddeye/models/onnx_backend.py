"""ONNX Runtime as an inference backend: the loaded checkpoint is exported on start and scored by ORT.

The checkpoint stays the source of truth: ``OnnxRuntimeModel(model, batch_size)`` exports the
fitted torch model (``oddeye export``'s graph, normalisation inside) to a temporary file,
opens a CPU session on it, checks it against the torch model on a random batch, and is then
called like the model: ``backend(images)`` returns a ``Prediction``. The graph has a fixed
batch size (the models' chunked loops are unrolled for it), so smaller batches are padded and
larger ones split. On the 2-vCPU dev VM it scored PaDiM and PatchCore faster than torch with
``prepare_for_inference`` (``benchmarks/ort_vs_torch.py``, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oddeye.frames import Prediction
from oddeye.models.base import AnomalyModel

__all__ = ["BACKENDS", "OnnxRuntimeEmbedder", "OnnxRuntimeModel"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
# Largest normalised difference to the torch model accepted on the check batch.
_CHECK_TOLERANCE = 1e-3


def _session(onnx: bytes, num_threads: int | None) -> Any:
    """A CPU ONNX Runtime session on a graph, with every graph optimisation and ``num_threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


class _FixedBatchGraph:
    """An ONNX Runtime session on a graph of a fixed batch size: smaller batches padded, larger ones split."""

    session: Any

    def __init__(self, model: AnomalyModel, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.name = model.name
        self.batch_size = int(batch_size)
        self.image_size = model.image_size

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        n = images.shape[0]
        if n < self.batch_size:  # the graph's batch is fixed: pad with copies of the last image
            images = np.concatenate([images, np.repeat(images[-1:], self.batch_size - n, axis=0)])
        return [out[:n] for out in self.session.run(None, {self.input_name: images})]

    def _run_all(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph for images [B, 3, H, W] (float in [0, 1], or uint8), any B."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        if tuple(images.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"expected images of {tuple(self.image_size)}, got {tuple(images.shape[-2:])}")
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        parts = [self._run(array[i : i + self.batch_size]) for i in range(0, array.shape[0], self.batch_size)]
        return [torch.from_numpy(np.concatenate(column)) for column in zip(*parts, strict=True)]

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name


class OnnxRuntimeModel(_FixedBatchGraph):
    """``model(images)`` through ONNX Runtime on the CPU, for a fitted image model."""

    def __init__(self, model: AnomalyModel, batch_size: int = 8, num_threads: int | None = None) -> None:
        from oddeye.commands.export import check_export, export_model

        if model.is_video:
            raise ValueError(f"{model.name} is a video model; the onnxruntime backend scores image models only")
        super().__init__(model, batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(model, "onnx", Path(tmp) / "model.onnx", batch_size=self.batch_size)
            error = check_export(model, path, "onnx", batch_size=self.batch_size)
            if error > _CHECK_TOLERANCE:
                raise RuntimeError(f"the ONNX graph of {model.name} differs from the checkpoint by {error:.2e}")
            self.session = _session(path.read_bytes(), num_threads)
        self.has_map = len(self.session.get_outputs()) > 1
        log.info("%s: onnxruntime backend, batch %d (export checked: max diff %.1e)", self.name, batch_size, error)

    def __call__(self, images: torch.Tensor) -> Prediction:
        """Normalised scores [B] (and maps [B, H, W]) of images [B, 3, H, W] float in [0, 1] (or uint8)."""
        outputs = self._run_all(images)
        return Prediction(score=outputs[0], anomaly_map=outputs[1] if self.has_map else None)


class OnnxRuntimeEmbedder(_FixedBatchGraph):
    """A split model's backbone half (``embed``) through ONNX Runtime on the CPU: the per-camera heads'
    shared feature pass (``model.scope: camera``), the heads staying in torch."""

    def __init__(self, model: AnomalyModel, batch_size: int = 8, num_threads: int | None = None) -> None:
        from oddeye.commands.export import onnx_export

        if not model.splits_backbone():
            raise ValueError(f"{model.name} does not split into a shared backbone and heads")
        super().__init__(model, batch_size)
        example = torch.rand(self.batch_size, 3, *model.image_size, generator=torch.Generator().manual_seed(0))
        wrapper = _Embed(model).cpu().eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = onnx_export(wrapper, example, Path(tmp) / "embed.onnx", ["embedding"])
            self.session = _session(path.read_bytes(), num_threads)
        with torch.no_grad():
            expected = wrapper(example)
        got = self(example)
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
        if error > _CHECK_TOLERANCE:
            raise RuntimeError(
                f"the ONNX graph of {model.name}'s backbone differs from torch by {error:.2e} (relative)"
            )
        log.info(
            "%s: onnxruntime backbone, batch %d (export checked: max relative diff %.1e)", self.name, batch_size, error
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``model.embed(images)`` for checked images [B, 3, H, W]."""
        return self._run_all(images)[0]


class _Embed(torch.nn.Module):
    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)
