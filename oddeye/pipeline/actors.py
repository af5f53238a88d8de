"""Ray actor wrappers: the only place where the pipeline's workers meet Ray.

Frames move by reference: an ingest actor stacks the pixels it hands out into one uint8 array
in the object store and returns metadata plus that reference; a model actor fetches the arrays
of its batch itself. The driver never holds pixels, except the few frames it snapshots.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import numpy as np
import ray

from oddeye.config import ModelConfig, RayConfig
from oddeye.frames import Frame
from oddeye.pipeline.camera_scoring import CameraHeadsWorker
from oddeye.pipeline.ingest_actor import ACTOR_ENV, NICENESS_ENV, _node_id, warn_if_niced
from oddeye.pipeline.scoring import BatchResult, ModelWorker

log = logging.getLogger(__name__)


class RayStartError(RuntimeError):
    """Ray could not be started or joined in time."""


@ray.remote(num_cpus=0)
class CheckpointStore:
    """Holds the checkpoint bytes so that model actors fetch them at (re)start by name.

    Passing them as a constructor argument would tie every restart to that argument's object
    (Ray warns about it with ``max_restarts``); a named holder is fetched afresh each time.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get(self) -> bytes:
        return self.data


@ray.remote
class ModelActor(ModelWorker):
    """A ``ModelWorker`` that loads its checkpoint from a ``CheckpointStore`` and fetches frames by reference."""

    def __init__(self, store_name: str, namespace: str | None, device: str, num_threads: int | None, **kw: Any) -> None:
        warn_if_niced("model")
        store = ray.get_actor(store_name, namespace=namespace)
        checkpoint = ray.get(store.get.remote())
        if num_threads is None:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
            num_threads = max(1, round(cpus)) if cpus else 1
        super().__init__(checkpoint, device, num_threads, **kw)
        self.node_id = _node_id()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "node_id": self.node_id}

    def score_refs(self, frames: list[Frame], parts: list[tuple[Any, list[int]]], want_maps: str) -> BatchResult:
        """Score frames whose pixels are rows of object-store arrays: ``parts`` = [(ref, rows)]."""
        return self.score(frames, fetch_images(parts), want_maps)


@ray.remote
class CameraHeadsActor(CameraHeadsWorker):
    """A ``CameraHeadsWorker`` (model.scope camera): heads from the model directory, the default model's
    checkpoint (if any) from a ``CheckpointStore``, frames by reference."""

    def __init__(self, store_name: str, namespace: str | None, device: str, num_threads: int | None, **kw: Any) -> None:
        warn_if_niced("model")
        default = ray.get(ray.get_actor(store_name, namespace=namespace).get.remote())
        if num_threads is None:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
            num_threads = max(1, round(cpus)) if cpus else 1
        super().__init__(default_checkpoint=default, device=device, num_threads=num_threads, **kw)
        self.node_id = _node_id()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "node_id": self.node_id}

    def score_refs(self, frames: list[Frame], parts: list[tuple[Any, list[int]]], want_maps: str) -> BatchResult:
        """Score frames whose pixels are rows of object-store arrays: ``parts`` = [(ref, rows)]."""
        return self.score(frames, fetch_images(parts), want_maps)


def fetch_images(parts: list[tuple[Any, list[int]]]) -> np.ndarray:
    """The rows of object-store frame lists a batch names (``parts`` = [(ref, rows)]), stacked in order.

    One copy per frame: the lists come back as zero-copy views of the object store."""
    arrays = ray.get([ref for ref, _ in parts])
    return np.stack([a[r] for a, (_, rows) in zip(arrays, parts, strict=True) for r in rows])


def ensure_ray(cfg: RayConfig) -> bool:
    """Start an embedded Ray (no address) or join a named cluster in bounded time.

    Returns True if this call started or joined Ray. With no address this always starts a new
    local Ray (``address="local"``), never silently joining a cluster that happens to run here.
    """
    if ray.is_initialized():
        return False
    local = cfg.address is None
    if local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[NICENESS_ENV] = str(cfg.worker_niceness)  # local workers inherit it; see warn_if_niced
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not sys.stderr.isatty():  # actor log lines reach files and log collectors without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    kwargs = {
        "address": "local" if local else cfg.address,
        "num_cpus": cfg.num_cpus if local else None,
        "namespace": cfg.namespace,
        "include_dashboard": cfg.include_dashboard if local else None,
        "logging_level": logging.WARNING,
        "configure_logging": False,
    }
    if local:
        # Ray starts workers at nice 15 unless told otherwise: any other busy process would starve them.
        kwargs["_system_config"] = {"worker_niceness": cfg.worker_niceness}
        # A new local Ray: nothing to wait for on the network (and ray.init must run on the main thread).
        try:
            ray.init(**kwargs)
        except Exception as e:
            raise RayStartError(f"could not start a local Ray: {type(e).__name__}: {_first_line(e)}") from None
    else:
        _join_bounded(kwargs, cfg)
    log.info("ray %s (%s)", "started locally" if local else f"joined {cfg.address}", ray.__version__)
    return True


def _join_bounded(kwargs: dict[str, Any], cfg: RayConfig) -> None:
    """``ray.init`` to a named cluster on a helper thread, so that an unreachable address fails in time."""
    errors: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as e:  # reported to the caller below
            errors.append(e)

    t = threading.Thread(target=init, name="ray-init", daemon=True)
    t.start()
    t.join(cfg.connect_timeout_s)
    if t.is_alive():
        raise RayStartError(
            f"could not join the Ray cluster at {cfg.address!r} within {cfg.connect_timeout_s:.0f} s "
            "(ray.connect_timeout_s); is it running and reachable?"
        )
    if errors:
        e = errors[0]
        raise RayStartError(f"could not join the Ray cluster at {cfg.address!r}: {type(e).__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def model_actor_options(cfg: ModelConfig, cuda: bool) -> dict[str, Any]:
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cuda else 0)
    threads = str(cfg.num_threads or max(1, round(cfg.num_cpus)))
    return {
        "num_cpus": cfg.num_cpus,
        "num_gpus": num_gpus,
        "resources": dict(cfg.resources) or None,
        "max_restarts": cfg.max_restarts,
        "max_concurrency": 1,
        "runtime_env": {"env_vars": {**ACTOR_ENV, "OMP_NUM_THREADS": threads}},
    }


def ingest_actor_options(resources: dict[str, float]) -> dict[str, Any]:
    return {"resources": dict(resources) or None, "runtime_env": {"env_vars": dict(ACTOR_ENV)}}
