"""Fit time, fitted-state size, throughput and latency of the image models, and k-center greedy at scale.

    python benchmarks/models_speed.py                       # every image model, anomalib defaults
    python benchmarks/models_speed.py --models patchcore,padim --fit-images 64 --backbone resnet18
    python benchmarks/models_speed.py --bench-configs --synth   # configs/bench/*.yaml, data synth images
    python benchmarks/models_speed.py --skip-models          # only the coreset scaling check

(This script replaces the former ``throughput.py``.) By default backbones have random
weights (speed does not depend on them) and inputs are random 256×256 images;
``--bench-configs`` builds each model from ``configs/bench/<model>.yaml`` instead (offline
ImageNet weights) and ``--synth`` fits on a ``data synth`` category rendered in memory.
Rows: fit seconds on N images, the size of the fitted state outside the backbone (memory
bank, Gaussians, PCA ...) in MB, frames/s and p50/p99 batch latency at each batch size, on
the CPU and on CUDA when available — once as loaded ("plain") and once after
``prepare_for_inference`` ("prepared": channels_last, autocast where it wins), so each
row pair is measured on the same machine minutes apart. The coreset check runs k-center greedy on 10^5 and 10^6
random 1536-d features (PatchCore's wide_resnet50_2 width), each in a fresh process, and
reports projection and selection time and the peak memory above the input itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from oddeye.models.base import AnomalyModel, FitError, create_model

log = logging.getLogger("models_speed")
ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODELS = ("patchcore", "padim", "dfm", "dfkde", "cfa")
# Everything else stays at the anomalib defaults; CFA's adaptor trains for few epochs here.
BENCH_PARAMS: dict[str, dict[str, Any]] = {"cfa": {"epochs": 1}}


def _fitted_state_mb(model: AnomalyModel) -> float:
    state = model.state_dict()
    nbytes = sum(v.numel() * v.element_size() for k, v in state.items() if not k.startswith("feature_extractor."))
    return nbytes / 1e6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _frames_per_second(model: AnomalyModel, batch: int, size: int, device: torch.device, min_time: float) -> float:
    return _timing(model, batch, size, device, min_time)[0]


def _timing(
    model: AnomalyModel, batch: int, size: int, device: torch.device, min_time: float
) -> tuple[float, float, float]:
    """frames/s, p50 and p99 batch latency (ms) over at least ``min_time`` seconds of one repeated batch."""
    images = torch.rand(batch, 3, size, size, device=device)
    model(images)  # warm-up
    _sync(device)
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(latencies) < 3:
        t0 = time.perf_counter()
        model(images)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    ms = torch.tensor(latencies) * 1e3
    return batch * len(latencies) / sum(latencies), float(ms.quantile(0.5)), float(ms.quantile(0.99))


def _bench_config_params(name: str) -> dict[str, Any]:
    """``model.params`` of configs/bench/<name>.yaml (offline weights), or {} when there is none."""
    from oddeye.config import load_config

    path = ROOT / "configs" / "bench" / f"{name}.yaml"
    return dict(load_config(path).model.params) if path.is_file() else {}


def _synth_images(n: int, size: int) -> torch.Tensor:
    """``n`` normal images [n, 3, size, size] in [0, 1] of data synth's "brick" category, rendered in memory."""
    import numpy as np

    from oddeye.data.synth import SynthImageSpec, render_category

    train, _, _ = render_category("brick", SynthImageSpec(size=size, train=n, test_good=0, test_per_defect=0), seed=0)
    return torch.from_numpy(np.stack(train)).permute(0, 3, 1, 2).float().div(255)


def bench_model(
    name: str, params: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> list[dict[str, Any]]:
    """One row per ``--inference`` mode (plain, prepared) of one fitted model."""
    torch.manual_seed(0)
    size = args.size
    if not args.bench_configs:
        params = {"pre_trained": False, **params}
    model = create_model(name, image_size=(size, size), **params).to(device)
    n_val = max(4, args.fit_images // 4)
    if args.synth:
        images = _synth_images(args.fit_images + n_val, size)
        train, val = images[n_val:], images[:n_val]
    else:
        train = torch.rand(args.fit_images, 3, size, size)
        val = torch.rand(n_val, 3, size, size)
    _sync(device)
    start = time.perf_counter()
    model.fit(train.split(args.fit_batch), val.split(args.fit_batch), progress=False)
    _sync(device)
    fit_s = time.perf_counter() - start
    row = {
        "model": name,
        "device": device.type,
        "fit_images": args.fit_images,
        "fit_s": fit_s,
        "state_mb": _fitted_state_mb(model),
    }
    rows = []
    for mode in args.inference.split(","):
        if mode == "prepared":
            from oddeye.models.inference import prepare_for_inference

            prepare_for_inference(model, device)
        elif mode != "plain":
            raise ValueError(f"--inference takes plain and/or prepared, got {mode!r}")
        timed = {**row, "inference": mode}
        for batch in args.batches:
            fps, p50, p99 = _timing(model, batch, size, device, args.min_time)
            timed[f"fps_b{batch}"] = fps
            timed[f"p50/p99_ms_b{batch}"] = f"{p50:.0f}/{p99:.0f}"
        rows.append(timed)
    return rows


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _coreset_worker(n_rows: int, dim: int, n_select: int, device: str, queue: Any) -> None:
    """Runs in a fresh process: peak memory is this run's alone."""
    from oddeye.models.components import KCenterGreedy

    torch.manual_seed(0)
    # 10^6 × 1536 floats would be 6 GB: the rows are 10^5 distinct random ones, repeated in chunks
    # (the greedy step costs the same whatever the values), so the input stays at 0.6 GB.
    base = torch.randn(min(n_rows, 100_000), dim)
    chunks = [base[: min(base.shape[0], n_rows - start)] for start in range(0, n_rows, base.shape[0])]
    baseline = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = KCenterGreedy(chunks, sampling_ratio=n_select / n_rows, device=device)
    start = time.perf_counter()
    sampler._project()
    if device == "cuda":
        torch.cuda.synchronize()
    project_s = time.perf_counter() - start
    start = time.perf_counter()
    idx = sampler.select_coreset_idxs()
    if device == "cuda":
        torch.cuda.synchronize()
    select_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "rows": n_rows,
            "device": device,
            "projected_dim": int(sampler.features.shape[1]),
            "selected": int(idx.numel()),
            "project_s": project_s,
            "select_s": select_s,
            "ms_per_selected": 1000 * select_s / idx.numel(),
            "extrapolated_ratio_0.1_s": select_s / idx.numel() * int(0.1 * n_rows),
            "peak_above_input_mb": peak - baseline,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 1e6 if device == "cuda" else 0.0,
        }
    )


def bench_coreset(n_rows: int, dim: int, n_select: int, device: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_coreset_worker, args=(n_rows, dim, n_select, device, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"rows": n_rows, "device": device, "error": f"worker exited with {proc.exitcode}"}
    return queue.get()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--backbone", default=None, help="override every model's backbone (e.g. resnet18)")
    parser.add_argument("--params", default="{}", help='JSON per model, e.g. {"patchcore": {"num_neighbors": 1}}')
    parser.add_argument("--fit-images", type=int, default=32)
    parser.add_argument("--fit-batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds of scoring per frames/s figure")
    parser.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, and cuda when available)")
    parser.add_argument("--bench-configs", action="store_true", help="params from configs/bench/<model>.yaml")
    parser.add_argument("--synth", action="store_true", help="fit on data synth images instead of random ones")
    parser.add_argument("--inference", default="plain,prepared", help="plain and/or prepared (prepare_for_inference)")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-coreset", action="store_true")
    parser.add_argument("--coreset-rows", default="100000,1000000")
    parser.add_argument("--coreset-dim", type=int, default=1536)
    parser.add_argument(
        "--coreset-select",
        type=int,
        default=None,
        help="points to select (default: 1000 on CPU; 10%% of the rows on CUDA, as PatchCore does)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("oddeye").setLevel(logging.WARNING)

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    extra = json.loads(args.params)
    results: dict[str, list[dict[str, Any]]] = {"models": [], "coreset": []}
    log.info("torch %s, %d CPU threads, devices %s", torch.__version__, torch.get_num_threads(), devices)

    if not args.skip_models:
        for device in devices:
            for name in args.models.split(","):
                base = _bench_config_params(name) if args.bench_configs else {}
                params = {**base, **BENCH_PARAMS.get(name, {}), **extra.get(name, {})}
                if args.backbone:
                    params["backbone"] = args.backbone
                try:
                    rows = bench_model(name, params, args, torch.device(device))
                except (FitError, RuntimeError) as e:  # e.g. DFKDE needs more images than PCA components
                    log.warning("%s on %s failed: %s", name, device, e)
                    rows = [{"model": name, "device": device, "fit_images": args.fit_images, "fit_s": f"failed: {e}"}]
                else:
                    log.info("%s on %s: fit %.1f s, state %.1f MB", name, device, rows[0]["fit_s"], rows[0]["state_mb"])
                for row in rows:
                    row["params"] = json.dumps(params, separators=(",", ":"))
                results["models"].extend(rows)
        columns = ["model", "device", "inference", "fit_images", "fit_s", "state_mb"]
        columns += [f"fps_b{b}" for b in args.batches] + [f"p50/p99_ms_b{b}" for b in args.batches]
        print(_table(results["models"], [*columns, "params"]))

    if not args.skip_coreset:
        for device in devices:
            for n_rows in (int(x) for x in args.coreset_rows.split(",")):
                n_select = args.coreset_select or (1000 if device == "cpu" else int(0.1 * n_rows))
                row = bench_coreset(n_rows, args.coreset_dim, min(n_select, n_rows), device)
                results["coreset"].append(row)
                log.info("k-center greedy %s", row)
        columns = [
            "rows",
            "device",
            "projected_dim",
            "selected",
            "project_s",
            "select_s",
            "ms_per_selected",
            "extrapolated_ratio_0.1_s",
            "peak_above_input_mb",
            "cuda_peak_mb",
        ]
        print()
        print(_table(results["coreset"], columns))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
