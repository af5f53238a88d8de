"""Per-camera ring buffers that turn a frame stream into clips for video models.

Each camera has its own buffer of the last ``clip_length`` frames; a frame completes a
clip only when it directly follows the previous one (``seq + 1``) at the same
resolution. A gap, a reordering or a resolution change resets that camera's buffer
(counted by reason), so a clip never mixes cameras or skips frames. Memory is bounded:
at most ``max_cameras`` buffers, the least recently seen camera's evicted first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Buffer:
    frames: deque[np.ndarray]
    last_seq: int
    shape: tuple[int, ...]


@dataclass
class ClipBuffers:
    clip_length: int
    max_cameras: int = 1024
    resets: dict[str, int] = field(default_factory=dict)
    _buffers: OrderedDict[str, _Buffer] = field(default_factory=OrderedDict)

    def push(self, camera_id: str, seq: int, image: np.ndarray) -> np.ndarray | None:
        """Add a frame; returns the clip [T, H, W, 3] ending with it, or None while the buffer fills."""
        buf = self._buffers.get(camera_id)
        if buf is not None:
            reason = None
            if seq <= buf.last_seq:
                reason = "seq_reordered"
            elif seq != buf.last_seq + 1:
                reason = "seq_gap"
            elif image.shape != buf.shape:
                reason = "resolution_change"
            if reason is not None:
                self.resets[reason] = self.resets.get(reason, 0) + 1
                buf = None
        if buf is None:
            buf = _Buffer(deque(maxlen=self.clip_length), seq, image.shape)
            self._buffers[camera_id] = buf
            while len(self._buffers) > self.max_cameras:
                self._buffers.popitem(last=False)
                self.resets["evicted"] = self.resets.get("evicted", 0) + 1
        self._buffers.move_to_end(camera_id)
        buf.frames.append(image)
        buf.last_seq = seq
        if len(buf.frames) < self.clip_length:
            return None
        return np.stack(buf.frames)

    def __len__(self) -> int:
        return len(self._buffers)
