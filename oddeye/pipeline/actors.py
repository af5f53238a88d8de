"""Ray actor wrappers: the only place where the pipeline's workers meet Ray."""

from __future__ import annotations

import logging
import os

import ray

from oddeye.config import ModelConfig, RayConfig
from oddeye.pipeline.ingest import IngestWorker
from oddeye.pipeline.scoring import ModelWorker

log = logging.getLogger(__name__)

# Ingest is I/O and decode on threads: many per node, reserved no CPU so they never block
# scheduling of the model actors; take/ack/stop run concurrently with a waiting take.
IngestActor = ray.remote(num_cpus=0, max_concurrency=4)(IngestWorker)
ModelActor = ray.remote(ModelWorker)


def ensure_ray(cfg: RayConfig) -> bool:
    """Start a local Ray (no address) or join a cluster; returns True if this call started it."""
    if ray.is_initialized():
        return False
    # Local embedded Ray: no dashboard, no token prompt, quiet logs.
    if cfg.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        namespace=cfg.namespace,
        include_dashboard=cfg.include_dashboard,
        logging_level=logging.WARNING,
        configure_logging=False,
    )
    log.info("ray %s (%s)", "started locally" if cfg.address is None else f"joined {cfg.address}", ray.__version__)
    return True


def model_actor_options(cfg: ModelConfig, cuda: bool) -> dict:
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if cuda else 0)
    return {"num_cpus": cfg.num_cpus, "num_gpus": num_gpus, "max_restarts": 3, "max_concurrency": 1}
