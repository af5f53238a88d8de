"""DFM: maps normalised on their own statistics; held-out scores from per-fold PCA refits."""

from __future__ import annotations

import copy

import torch

from oddeye.models.base import AnomalyModel
from oddeye.models.image.dfm import Dfm
from tests.models.helpers import SIZE, defect_data

PARAMS = {"backbone": "resnet18", "pre_trained": False, "pooling_kernel_size": 2, "image_size": (SIZE, SIZE)}


def test_maps_are_hot_on_defects_and_folds_match_refits() -> None:
    data = defect_data(n_train=40, n_test=10)
    torch.manual_seed(0)  # the random backbone's weights
    model = Dfm(**PARAMS)
    template = copy.deepcopy(model)
    model.fit(data["train"].split(10), progress=False, folds=4)

    # A map cell holds a small share of the image's error: on the score's statistics maps were ~0.
    assert float(model.map_normalizer.threshold) < float(model.normalizer.threshold) / 2
    defects = model(data["defects"]).anomaly_map
    normal = model(data["normal"]).anomaly_map
    assert float((defects.amax(dim=(1, 2)) > 0.5).float().mean()) >= 0.6
    assert float((normal.amax(dim=(1, 2)) < 0.5).float().mean()) >= 0.8

    # The cached-feature shortcut gives what refitting the whole model per fold gives.
    loader = data["train"].split(10)
    model._fit_normal(loader, progress=False)
    fast_scores, fast_peaks = model.heldout_scores(loader, 4, 40, None, None, progress=False)
    slow_scores, slow_peaks = AnomalyModel.heldout_scores(model, loader, 4, 40, None, template, progress=False)
    assert torch.allclose(fast_scores, slow_scores, rtol=1e-3)
    assert torch.allclose(fast_peaks, slow_peaks, rtol=1e-3)
