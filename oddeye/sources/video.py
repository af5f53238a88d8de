"""Frames from a video file, read with OpenCV, optionally looped and paced in real time."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2

from oddeye.frames import Frame
from oddeye.sources.base import Source, SourceError

__all__ = ["VideoFileSource"]

log = logging.getLogger(__name__)

_DEFAULT_FPS = 25.0  # used when the container does not say


class VideoFileSource(Source):
    """Decoded RGB frames of one video file, in order.

    ``seq`` counts from 0 across loops; ``timestamp`` is the wall clock when the file was
    opened plus the frame's position in the played stream (``seq / fps``), so looped
    playback keeps increasing timestamps. With ``realtime`` the frames are paced at the
    file's fps and the source is ``live`` (a stand-in for a camera).
    """

    def __init__(
        self,
        path: str,
        camera_id: str | None = None,
        loop: bool = False,
        realtime: bool = False,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"video file not found: {self.path}")
        if not self.path.is_file():
            raise SourceError(f"video path is not a file: {self.path}")
        self.camera_id = camera_id or self.path.stem
        self.loop = loop
        self.realtime = realtime
        self.live = realtime

        # Probe now so that a bad file fails when the pipeline is built, not mid-run.
        cap = self._open()
        try:
            fps = cap.get(cv2.CAP_PROP_FPS)
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            ok, _ = cap.read()
        finally:
            cap.release()
        if not ok:
            raise SourceError(f"video file yields no frames (empty, or not a video OpenCV can decode): {self.path}")
        if not (fps and math.isfinite(fps) and fps > 0):
            log.warning("%s does not report its fps; assuming %.0f", self.path, _DEFAULT_FPS)
            fps = _DEFAULT_FPS
        self.fps = float(fps)
        self.frame_count = int(count) if count and math.isfinite(count) and count > 0 else None

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"OpenCV cannot open video file (unknown format or corrupt): {self.path}")
        return cap

    def __iter__(self) -> Iterator[Frame]:
        seq = 0
        start = time.time()
        t0 = time.monotonic()
        while True:
            cap = self._open()
            index = 0
            try:
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    if self.realtime:
                        delay = t0 + seq / self.fps - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    yield Frame(
                        camera_id=self.camera_id,
                        seq=seq,
                        timestamp=start + seq / self.fps,
                        image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
                        origin={"source": "video", "path": str(self.path), "frame_index": index},
                    )
                    seq += 1
                    index += 1
            finally:
                cap.release()
            if self.frame_count is not None and index < self.frame_count:
                missing = self.frame_count - index
                log.warning(
                    "%s: read failed at frame %d of %d; ending the stream (%d frame(s) unread)",
                    self.path,
                    index,
                    self.frame_count,
                    missing,
                )
                self.count_skip("read_error", missing)
                return
            if not self.loop or index == 0:
                return

    def describe(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "camera_id": self.camera_id,
            "path": str(self.path),
            "fps": self.fps,
            "frame_count": self.frame_count,
            "loop": self.loop,
            "realtime": self.realtime,
        }
