"""Snapshot sink: a JPEG of the frame that opened an alert, with the heat map and boxes drawn on it.

The runner calls ``save`` when an alert opens and puts the returned path into the alert
before the other sinks see it; ``write`` and ``write_alert`` do nothing. A snapshot that
cannot be written is logged and counted, never raised: losing a picture must not stop
the stream.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from oddeye.frames import Alert, ScoredFrame, as_rgb_uint8, encode_jpeg
from oddeye.sinks.base import Sink

__all__ = ["SnapshotSink", "render_snapshot", "safe_name"]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(name: str) -> str:
    """A file-name-safe form of a camera or alert id: no separators, no leading dot, never empty."""
    out = _UNSAFE.sub("_", name)
    if out.startswith("."):  # "." / ".." / hidden files
        out = "_" + out[1:]
    return out or "_"


def render_snapshot(frame: ScoredFrame, alpha: float = 0.45) -> np.ndarray:
    """The frame's RGB image with its anomaly map blended over it, boxes and a caption drawn (RGB)."""
    assert frame.image is not None
    bgr = cv2.cvtColor(as_rgb_uint8(frame.image), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    if frame.anomaly_map is not None:
        amap = np.asarray(frame.anomaly_map)
        if amap.ndim == 3:  # [1, H, W] or [H, W, 1]
            amap = amap.squeeze()
        if amap.dtype != np.uint8:
            amap = np.clip(amap, 0, 255).astype(np.uint8)
        if amap.shape[:2] != (h, w):
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        heat = cv2.applyColorMap(amap, cv2.COLORMAP_JET)
        bgr = cv2.addWeighted(heat, alpha, bgr, 1.0 - alpha, 0.0)
    thickness = max(1, round(min(h, w) / 200))
    for box in frame.boxes or []:
        x1, y1, x2, y2 = (round(float(v)) for v in box[:4])
        cv2.rectangle(bgr, (x1, y1), (x2, y2), (0, 0, 255), thickness)
    when = datetime.fromtimestamp(frame.timestamp).strftime("%Y-%m-%d %H:%M:%S")
    _caption(bgr, f"{frame.camera_id}  score={float(frame.score):.2f}  {when}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _caption(bgr: np.ndarray, text: str) -> None:
    """White text on a dark band across the top, scaled to the image width."""
    h, w = bgr.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.3, min(1.0, w / 800))
    thick = 1 if scale < 0.8 else 2
    (_, th), base = cv2.getTextSize(text, font, scale, thick)
    band = min(h, th + base + 6)
    bgr[:band] = (bgr[:band] * 0.35).astype(np.uint8)
    cv2.putText(bgr, text, (4, th + 3), font, scale, (255, 255, 255), thick, cv2.LINE_AA)


class SnapshotSink(Sink):
    """Write ``out_dir/snapshots/<camera_id>/<alert_id>.jpg``; keep the newest ``max_per_camera``.

    With ``max_age_s`` a camera's snapshots older than that are deleted too (checked
    whenever that camera gets a new one). ``failures`` counts snapshots that could not
    be written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        max_per_camera: int = 100,
        quality: int = 90,
        alpha: float = 0.45,
        max_age_s: float | None = None,
    ) -> None:
        if max_per_camera < 1:
            raise ValueError(f"max_per_camera must be ≥ 1, got {max_per_camera}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.root = Path(out_dir) / "snapshots"
        self.max_per_camera = max_per_camera
        self.max_age_s = max_age_s
        self.quality = quality
        self.alpha = alpha
        self.failures = 0
        self.saved = 0
        self._warned_no_image = False
        self._kept: dict[str, deque[tuple[float, Path]]] = {}

    def save(self, alert: Alert, frame: ScoredFrame) -> str | None:
        """Draw and write the snapshot for ``alert``; its path, or None if there is none."""
        if frame.image is None:
            if not self._warned_no_image:
                self._warned_no_image = True
                log.warning("no snapshot for alert %s: the scored frames carry no image", alert.alert_id)
            return None
        camera = safe_name(alert.camera_id)
        path = self.root / camera / f"{safe_name(alert.alert_id)}.jpg"
        try:
            data = encode_jpeg(render_snapshot(frame, self.alpha), self.quality)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except (OSError, ValueError, cv2.error) as exc:
            self.failures += 1
            log.warning("cannot write snapshot %s for alert %s: %s", path, alert.alert_id, exc)
            return None
        self.saved += 1
        self._retain(camera, path)
        return str(path)

    def _retain(self, camera: str, path: Path) -> None:
        """Record ``path`` as the newest of its camera; delete the oldest beyond the count and age limits."""
        now = time.time()
        kept = self._kept.get(camera)
        if kept is None:
            kept = self._kept[camera] = deque(self._existing(path.parent))
        for item in [k for k in kept if k[1] == path]:  # rewritten (a replayed stream): it is the newest now
            kept.remove(item)
        kept.append((now, path))
        too_old = now - self.max_age_s if self.max_age_s is not None else float("-inf")
        while len(kept) > self.max_per_camera or (len(kept) > 1 and kept[0][0] < too_old):
            _, old = kept.popleft()
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete old snapshot %s: %s", old, exc)

    @staticmethod
    def _existing(folder: Path) -> list[tuple[float, Path]]:
        """Snapshots already on disk from earlier runs with their modification times, oldest first."""
        try:
            found = [(p.stat().st_mtime_ns, p.name, p) for p in folder.glob("*.jpg") if p.is_file()]
        except OSError:
            return []
        return [(ns / 1e9, p) for ns, _, p in sorted(found)]
