"""Frames/s of the pipeline on a real multi-node Ray cluster: one node vs ingest and model on two nodes.

Starts a cluster on this machine (tests/servers/ray_cluster.py: a head that only hosts the
driver, and worker nodes ``a`` and ``b``, each with its own custom resource) and runs the same
stream three ways, each in its own driver process:

- embedded: a private local Ray (no cluster), the default ``oddeye run``;
- 1 node: ingest and model actors both on node ``a`` (``resources: {a: 1}`` for both);
- 2 nodes: ingest on ``a``, model on ``b`` (``sources.0.resources: {a: 1}``, ``model.resources: {b: 1}``),
  so every batch crosses from one node's object store to the other's.

frames/s counts from the first frame the driver receives to the last result written (start-up
excluded). On one machine the nodes share the same cores: the two-node row shows what the
split costs (object transfer between nodes), not what a second machine adds.

    python benchmarks/cluster.py [--frames 600] [--models null,padim] [--image-size 256] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.servers.ray_cluster import NodeSpec, RayCluster, ray_env, start_cluster  # noqa: E402

# One driver process per run, so that no run reuses another's Ray connection or warm state.
_RUN = r"""
import json, sys
from oddeye.config import parse_config
from oddeye.pipeline.runner import Pipeline
raw = json.loads(open(sys.argv[1]).read())
p = Pipeline(parse_config(raw), out_dir=sys.argv[2])
s = p.run()
p.close()
print("@@" + json.dumps({"scored": s.scored, "stream_seconds": s.stream_seconds, "seconds": s.seconds,
                         "stop_reason": s.stop_reason, "placement": s.placement}))
"""

MODEL_PARAMS = {
    "null": {},
    "padim": {"backbone": "resnet18", "layers": ["layer1", "layer2"], "pre_trained": False, "n_features": 100},
}


def base_config(model: str, frames: int, size: int, checkpoint: Path) -> dict:
    return {
        "sources": [
            {
                "type": "synthetic",
                "camera_id": "bench",
                "width": 320,
                "height": 240,
                "num_frames": frames,
                "anomaly_every": 100,
                "anomaly_duration": 10,
                "encode": True,  # JPEG, as from a camera or a topic: ingest decodes
                "drop_policy": "block",
                "queue_size": 64,
            }
        ],
        "fit": {"max_frames": 120, "stride": 1, "batch_size": 16},  # > n_features: a well-posed Gaussian
        "model": {
            "name": model,
            "device": "cpu",
            "image_size": [size, size],
            "checkpoint": str(checkpoint),
            "num_cpus": 1,
            "params": MODEL_PARAMS[model],
        },
        "batching": {"max_batch_size": 16, "max_wait_ms": 20, "max_inflight_batches": 2},
        "sinks": [{"type": "jsonl"}],
        "metrics": {"enabled": False},
    }


def run_once(raw: dict, work: Path, env: dict[str, str]) -> dict:
    cfg_path = work / f"cfg-{time.monotonic_ns()}.json"
    cfg_path.write_text(json.dumps(raw))
    res = subprocess.run(
        [sys.executable, "-c", _RUN, str(cfg_path), str(work / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    for line in res.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"run failed ({res.returncode}):\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--models", default="null,padim", help="comma-separated: null, padim")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="runs per row (the best is reported)")
    args = ap.parse_args()

    from oddeye.config import parse_config
    from oddeye.pipeline.fit import fit_from_config

    work = Path(tempfile.mkdtemp(prefix="oddeye-bench-cluster-"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    checkpoints = {}
    for m in models:
        checkpoints[m] = work / f"{m}.pt"
        fit_from_config(parse_config(base_config(m, 120, args.image_size, checkpoints[m])), progress=False)

    load_before = os.getloadavg()[0]
    cluster: RayCluster = start_cluster(
        [NodeSpec("a", num_cpus=2, resources={"a": 100}), NodeSpec("b", num_cpus=2, resources={"b": 100})],
        head=NodeSpec("head", num_cpus=0),
        timeout_s=300,
    )
    rows = []
    try:
        names = {nid: name for name, nid in cluster.node_ids().items()}
        setups = [
            ("embedded local Ray", None, {}, {}),
            ("cluster, 1 node (ingest + model on a)", cluster.address, {"a": 1}, {"a": 1}),
            ("cluster, 2 nodes (ingest a → model b)", cluster.address, {"a": 1}, {"b": 1}),
        ]
        for m in models:
            for label, address, ingest_res, model_res in setups:
                best = None
                for _ in range(args.repeats):
                    raw = base_config(m, args.frames, args.image_size, checkpoints[m])
                    raw["ray"] = {"address": address} if address else {"num_cpus": 2}
                    raw["sources"][0]["resources"] = ingest_res
                    raw["model"]["resources"] = model_res
                    r = run_once(raw, work, ray_env())
                    fps = r["scored"] / r["stream_seconds"] if r["stream_seconds"] else 0.0
                    if best is None or fps > best[0]:
                        best = (fps, r)
                fps, r = best
                placed = r.get("placement") or {}
                where = "local"
                if address:
                    ingest_nodes = {names.get(n, "?") for n in (placed.get("ingest") or {}).values()}
                    model_nodes = {names.get(n, "?") for n in placed.get("model") or []}
                    where = (
                        f"ingest {','.join(sorted(ingest_nodes)) or '?'} · model {','.join(sorted(model_nodes)) or '?'}"
                    )
                rows.append((m, label, where, r["scored"], r["stream_seconds"], fps))
                print(f"  {m:6} {label:40} {where:24} {r['scored']:5d} frames {fps:7.1f} frames/s", flush=True)
    finally:
        cluster.stop()
    load_after = os.getloadavg()[0]

    import ray
    import torch

    print(
        f"\nmachine: {platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · ray {ray.__version__}"
        f" · load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(f"{args.frames} synthetic 320×240 JPEG frames · model input {args.image_size}² · batch 16 · CPU\n")
    print("| model | setup | placement | frames | seconds | frames/s | vs 1 node |")
    print("|---|---|---|---:|---:|---:|---:|")
    for m, label, where, n, secs, fps in rows:
        one = next((r[5] for r in rows if r[0] == m and r[1].startswith("cluster, 1 node")), None)
        ratio = f"{fps / one:.2f}×" if one else "-"
        print(f"| {m} | {label} | {where} | {n} | {secs:.2f} | {fps:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
