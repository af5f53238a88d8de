"""The ingest actor: an ``IngestWorker`` hosted by Ray, one per source.

Kept apart from the model actors' module so that an ingest process imports neither torch nor
the model zoo: with one actor per camera, that import cost seconds of CPU and hundreds of MB of
memory per camera at start (see benchmarks/RESULTS.md, "actor start-up").
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from oddeye.pipeline.ingest import IngestWorker, TakeResult

# Waiting OpenMP threads sleep instead of spinning: spinning threads of one actor steal the
# cores the others (and the other processes of a busy camera server) need.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "OMP_NUM_THREADS": "1"}
NICENESS_ENV = "ODDEYE_WORKER_NICENESS"
"""The niceness the driver asked a local Ray to start workers at (``ray.worker_niceness``)."""

log = logging.getLogger(__name__)


def warn_if_niced(role: str) -> int:
    """Log a warning when this actor's process runs niced above ``ray.worker_niceness``; returns the niceness.

    Ray starts workers at nice 15 unless its node was started with ``RAY_worker_niceness``: on a
    node shared with other busy processes such an actor gets a few % of a core.
    """
    nice = os.nice(0)
    wanted = int(os.environ.get(NICENESS_ENV, "0") or 0)
    if nice > wanted:
        log.warning(
            "%s actor runs at nice %d (Ray's default for workers is 15): every other busy process on this node "
            "takes the CPU first. Start the node with RAY_worker_niceness=%d ray start ... (a local Ray does "
            "this itself: ray.worker_niceness)",
            role,
            nice,
            wanted,
        )
    return nice


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


@ray.remote(num_cpus=0, max_concurrency=4)
class IngestActor(IngestWorker):
    """An ``IngestWorker`` whose ``take`` puts the frames' pixels in the object store."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            import cv2

            cv2.setNumThreads(1)  # decode runs on this actor's reader thread; no pool per actor
        except Exception:
            pass
        warn_if_niced("ingest")
        super().__init__(*args, **kwargs)
        self.stats.node_id = _node_id()

    def take(self, max_n: int, timeout_s: float) -> TakeResult:
        res = super().take(max_n, timeout_s)
        if res.frames:
            # A list, not one stacked array: each frame is copied once, into the object store
            # (stacking first copied it twice); the model actor stacks the rows it scores.
            images = [f.image for f in res.frames]
            for f in res.frames:
                f.image = None  # type: ignore[assignment]
            res.images = ray.put(images)
        return res
