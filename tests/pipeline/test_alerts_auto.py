"""``alerts.threshold: auto``: alerts follow the model's own per-frame label (U-Flow's NFA test)."""

from __future__ import annotations

import pytest
import yaml

from oddeye.config import ConfigError, parse_config
from oddeye.frames import ScoredFrame
from oddeye.pipeline.alerts import AlertPolicy, AlertTracker

T0 = 1_700_000_000.0


def _frame(seq: int, score: float, label: bool) -> ScoredFrame:
    return ScoredFrame(
        camera_id="cam", seq=seq, timestamp=T0 + seq, score=score, label=label, model="uflow", latency_ms=1.0
    )


def test_auto_opens_and_closes_on_labels_not_scores() -> None:
    tracker = AlertTracker(AlertPolicy(threshold="auto", min_frames=2, close_frames=2, cooldown_s=0))
    # high scores without the label never open; low scores with it do
    frames = [(0.9, False)] * 3 + [(0.2, True)] * 2 + [(0.95, True)] + [(0.99, False)] * 2
    events = [e for i, (s, lab) in enumerate(frames) for e in tracker.update(_frame(i, s, lab))]
    assert [e.state for e in events] == ["open", "close"]
    assert events[0].start_seq == 3 and events[1].peak_score == pytest.approx(0.99)


def test_policy_validation() -> None:
    AlertPolicy(threshold="auto", hysteresis=0.3)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\) or 'auto'"):
        AlertPolicy(threshold="manual")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\) or 'auto'"):
        AlertPolicy(threshold=1.5)


def _config(model: str, threshold: str) -> str:
    return f"""
sources: [{{type: synthetic, camera_id: c0}}]
model: {{name: {model}}}
alerts: {{threshold: {threshold}}}
"""


def test_config_accepts_auto_only_for_models_with_their_own_test() -> None:
    cfg = parse_config(yaml.safe_load(_config("uflow", "auto")))
    assert cfg.alerts.threshold == "auto"
    assert parse_config(yaml.safe_load(_config("padim", "0.7"))).alerts.threshold == 0.7
    with pytest.raises(ConfigError, match=r"auto needs a model .* 'padim' has none"):
        parse_config(yaml.safe_load(_config("padim", "auto")))
    with pytest.raises(ConfigError, match=r"threshold must be a number in \(0, 1\) or 'auto'"):
        parse_config(yaml.safe_load(_config("padim", "1.5")))
