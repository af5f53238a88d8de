"""How often U-Flow's a-contrario (NFA) test alerts on normal and on defective test images.

    oddeye eval configs/bench/uflow.yaml --data D/images --json R.json   # fits bench-out/uflow/*.pt
    python benchmarks/uflow_nfa.py --data D/images --checkpoints 'bench-out/uflow/{category}.pt'

For every category with a checkpoint: the share of normal test images with ``log10 NFA < 0``
(false alarms of the unsupervised threshold) and of defective ones (detections), next to the
same rates for the normalised score at 0.5. No labels or thresholds are tuned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from oddeye.data.images import find_categories, load_images
from oddeye.models.base import load_model


def rates(checkpoint: Path, category: object, batch: int) -> dict[str, float]:
    model = load_model(checkpoint)
    paths = [s.path for s in category.test]
    labels = torch.tensor([s.label for s in category.test], dtype=torch.bool)
    nfa, score = [], []
    for i in range(0, len(paths), batch):
        images = torch.from_numpy(load_images(paths[i : i + batch], model.image_size)).permute(0, 3, 1, 2)
        pred = model(images)
        nfa.append(pred.label.cpu())
        score.append(pred.score.cpu() >= 0.5)
    nfa_t, score_t = torch.cat(nfa), torch.cat(score)
    return {
        "category": category.name,
        "normal": int((~labels).sum()),
        "defective": int(labels.sum()),
        "nfa_alerts_normal": float(nfa_t[~labels].float().mean()),
        "nfa_alerts_defective": float(nfa_t[labels].float().mean()),
        "score_alerts_normal": float(score_t[~labels].float().mean()),
        "score_alerts_defective": float(score_t[labels].float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoints", default="bench-out/uflow/{category}.pt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for category in find_categories(args.data):
        ckpt = Path(args.checkpoints.format(category=category.name))
        if ckpt.is_file():
            rows.append(rates(ckpt, category, args.batch))
    head = ["category", "normal", "defective", "NFA alerts on normal", "NFA alerts on defective"]
    print("| " + " | ".join([*head, "score≥0.5 normal", "score≥0.5 defective"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['category']} | {r['normal']} | {r['defective']} | {r['nfa_alerts_normal']:.3f} | "
            f"{r['nfa_alerts_defective']:.3f} | {r['score_alerts_normal']:.3f} | {r['score_alerts_defective']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
