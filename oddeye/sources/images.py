"""Frames from a folder of image files, in path order, as raw encoded bytes.

A folder is not live time: reading 50 files takes a fraction of a second, so the read time
says nothing about when a picture was taken. A frame's ``timestamp`` is therefore the file's
own modification time (``st_mtime``, Unix seconds), and with ``alert_per_image`` (the
default) each image is its own event (``meta["still"]``): the alert logic opens and closes
an alert for every image at or above the threshold, without ``min_frames`` or ``cooldown_s``,
which describe streams in time. Set ``alert_per_image: false`` for a folder of frames that
form a stream (e.g. extracted from a video); runs and cooldowns then count in file time.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from oddeye.frames import Frame
from oddeye.sources.base import Source, SourceError

__all__ = ["ImageFolderSource"]

log = logging.getLogger(__name__)


class ImageFolderSource(Source):
    """Each image file in a folder becomes one frame whose ``image`` is the file's bytes.

    ``timestamp`` is the file's modification time; ``meta["still"]`` (with ``alert_per_image``)
    makes each image its own alert event.

    Decoding is left to the ingest stage, which decodes at the size the model needs and
    counts undecodable files there. The folder is listed once, when the source is built:
    files with other extensions are counted as ``not_an_image``, files that vanish or
    cannot be read afterwards as ``read_error``.
    """

    def __init__(
        self,
        path: str,
        camera_id: str | None = None,
        recursive: bool = False,
        loop: bool = False,
        extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp"),
        alert_per_image: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"image folder not found: {self.path}")
        if not self.path.is_dir():
            raise SourceError(f"image folder path is not a directory: {self.path}")
        self.camera_id = camera_id or self.path.resolve().name
        self.recursive = recursive
        self.loop = loop
        self.alert_per_image = alert_per_image
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)

        candidates = sorted(p for p in (self.path.rglob("*") if recursive else self.path.iterdir()) if p.is_file())
        self.files = [p for p in candidates if p.suffix.lower() in self.extensions]
        others = Counter(p.suffix.lower() or "(none)" for p in candidates if p.suffix.lower() not in self.extensions)
        for _ in range(sum(others.values())):
            self.count_skip("not_an_image")
        if others:
            summary = ", ".join(f"{ext} x{n}" for ext, n in sorted(others.items()))
            log.info("%s: skipping %d non-image file(s) (%s)", self.path, sum(others.values()), summary)
        if not self.files:
            raise SourceError(f"no image files ({', '.join(self.extensions)}) in folder {self.path}")

    def __iter__(self) -> Iterator[Frame]:
        seq = 0
        while True:
            yielded = 0
            for file in self.files:
                try:
                    mtime = file.stat().st_mtime
                    data = file.read_bytes()
                except OSError as exc:
                    log.warning("cannot read %s: %s", file, exc)
                    self.count_skip("read_error")
                    continue
                yield Frame(
                    camera_id=self.camera_id,
                    seq=seq,
                    timestamp=mtime,
                    image=data,
                    origin={"source": "images", "path": str(file)},
                    meta={"still": True} if self.alert_per_image else {},
                )
                seq += 1
                yielded += 1
            if not self.loop:
                return
            if yielded == 0:
                log.warning("%s: no image file could be read in a whole pass; stopping the loop", self.path)
                return

    def describe(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "camera_id": self.camera_id,
            "path": str(self.path),
            "files": len(self.files),
            "recursive": self.recursive,
            "loop": self.loop,
            "alert_per_image": self.alert_per_image,
        }
