"""Frames through the object store: one stacked array per take vs a list of frames.

    python benchmarks/object_store_copies.py

An ingest take of 8 frames from each of 4 cameras is put in the object store, fetched and
stacked into one 32-frame batch, as the ingest and model actors do. "stacked" stacks each take
before ``ray.put`` and indexes and concatenates after ``ray.get`` (how oddeye did it before
session 4: three copies per frame); "list" puts the list of frames and stacks once after the
get (two copies; what ``IngestActor.take`` and ``fetch_images`` do now). Alternating, 6 × 20
batches; prints the median ms per 32-frame batch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray


def stacked(frames: list[np.ndarray]) -> np.ndarray:
    refs = [ray.put(np.stack(frames[i * 8 : (i + 1) * 8])) for i in range(4)]
    return np.concatenate([a[list(range(8))] for a in ray.get(refs)])


def as_list(frames: list[np.ndarray]) -> np.ndarray:
    refs = [ray.put(frames[i * 8 : (i + 1) * 8]) for i in range(4)]
    return np.stack([a[r] for a in ray.get(refs) for r in range(8)])


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(32)]
    assert (stacked(frames) == as_list(frames)).all()
    times: dict[str, list[float]] = {"stacked": [], "list": []}
    for _ in range(6):
        for name, fn in (("stacked", stacked), ("list", as_list)):
            t = time.perf_counter()
            for _ in range(20):
                fn(frames)
            times[name].append((time.perf_counter() - t) / 20 * 1e3)
    for name, v in times.items():
        print(f"{name:8s} median {np.median(v):6.2f} ms per 32-frame batch (put + get + stack); runs {np.round(v, 1)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
