"""Buffers whose shape is only known after fitting (memory banks, PCA bases, ...)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DynamicBufferMixin"]


class DynamicBufferMixin(nn.Module):
    """Resizes this module's own buffers to the shapes held in a loaded state_dict.

    A fitted component keeps its state in buffers that start empty; loading a
    checkpoint into a fresh instance gives them the checkpoint's shape (an empty
    placeholder also takes the checkpoint's dtype) on the buffer's current device.
    """

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buffer in self._buffers.items():
            if buffer is None or name in self._non_persistent_buffers_set:
                continue
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape != buffer.shape:
                dtype = value.dtype if buffer.numel() == 0 else buffer.dtype
                self._buffers[name] = torch.empty(value.shape, dtype=dtype, device=buffer.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
