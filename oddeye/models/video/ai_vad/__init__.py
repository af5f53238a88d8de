"""AI-VAD: per-region velocity, pose and appearance attributes scored by density estimation."""

from oddeye.models.video.ai_vad.model import AiVad

__all__ = ["AiVad"]
