"""WinCLIP: zero-/few-shot anomaly classification and segmentation with CLIP (Jeong et al., CVPR 2023).

https://arxiv.org/abs/2303.14814 — parameter names follow anomalib's ``WinClip`` (``class_name``, ``k_shot``,
``scales``, ``few_shot_source``). CLIP is open_clip's (``pip install 'oddeye[clip]'``), ViT-B/16+ at 240 px with
the LAION-400M weights by default, as in the paper.

- Zero-shot: the image embedding is compared with two text embeddings, "normal" and "anomalous", each the
  mean of a compositional prompt ensemble (state words × photo templates) for ``class_name``. Windows of
  ``scales`` × ``scales`` patches are embedded on their own (the class token and the window's tokens through
  the transformer) and scored the same way; a patch's score is the harmonic mean of its windows' scores.
- Few-shot (``k_shot`` > 0): windows and patches are also compared with the same windows and patches of
  ``k_shot`` normal reference images (``few_shot_source``, or the first fit images); the distance to the
  nearest reference is averaged with the zero-shot map.

With ``k_shot: 0`` nothing is learnt from normal images (``needs_fit`` is False): ``prepare()`` makes a
ready model from its parameters alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from oddeye.models.base import AnomalyModel, FitError, _CheckedBatches, register
from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.feature_extractor import WeightsUnavailableError

__all__ = ["ANOMALOUS_STATES", "NORMAL_STATES", "TEMPLATES", "WinClip", "harmonic_aggregation", "window_indices"]

log = logging.getLogger(__name__)

# The compositional prompt ensemble of the paper (state words and photo templates).
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
GENERIC_CLASS = "object"
# CLIP's logit scale for the two-way softmax (the value CLIP learns, 100).
_TEMPERATURE = 100.0


def window_indices(grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Token indices [num_windows, scale²] of every scale × scale window (stride 1) of a row-major grid."""
    h, w = grid
    if scale > min(h, w):
        raise ValueError(f"window scale {scale} is larger than the {h} x {w} patch grid")
    ids = torch.arange(h * w).view(h, w)
    windows = ids.unfold(0, scale, 1).unfold(1, scale, 1)  # [h-s+1, w-s+1, s, s]
    return windows.reshape(-1, scale * scale)


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Patch scores [B, N]: the harmonic mean of the scores [B, W] of the windows holding each patch."""
    b = window_scores.shape[0]
    inverse = torch.zeros(b, num_patches, dtype=window_scores.dtype, device=window_scores.device)
    count = torch.zeros(num_patches, dtype=window_scores.dtype, device=window_scores.device)
    idx = windows.to(window_scores.device)
    per_token = (1.0 / window_scores.clamp_min(1e-12)).unsqueeze(-1).expand(-1, -1, idx.shape[1])
    inverse.index_add_(1, idx.flatten(), per_token.reshape(b, -1))
    count.index_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=count.dtype, device=count.device))
    return count.clamp_min(1) / inverse.clamp_min(1e-12)


def build_clip(backbone: str, pretrained: str | None, pre_trained: bool, weights: str | None) -> tuple[nn.Module, Any]:
    """An open_clip model (frozen, eval) and its tokenizer: from a local ``weights`` file, the hub, or random."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("WinCLIP needs open_clip: pip install 'oddeye[clip]' (or open_clip_torch)") from e
    if backbone not in open_clip.list_models():
        raise ValueError(f"unknown CLIP backbone {backbone!r}; open_clip has: {open_clip.list_models()}")
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailableError(f"WinCLIP `weights` file {weights} does not exist")
        model = open_clip.create_model(backbone, pretrained=str(weights))
        log.info("loaded CLIP %s weights from %s", backbone, weights)
    elif pre_trained:
        try:
            model = open_clip.create_model(backbone, pretrained=pretrained, require_pretrained=True)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsUnavailableError(
                f"CLIP weights {backbone!r}/{pretrained!r} could not be fetched ({reason}). On a machine without "
                "internet set `weights: <local open_clip checkpoint>` (e.g. the open_clip_pytorch_model.bin of "
                f"the {pretrained} release), or `pre_trained: false` for random weights (tests only)."
            ) from e
    else:
        model = open_clip.create_model(backbone, pretrained=None)
    if getattr(model.visual, "attn_pool", None) is not None or not hasattr(model.visual, "transformer"):
        raise ValueError(f"CLIP backbone {backbone!r} is not a plain ViT image tower (WinCLIP embeds windows)")
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(backbone)


@register("winclip")
class WinClip(AnomalyModel, DynamicBufferMixin):
    """WinCLIP: CLIP text prompts and multi-scale windows; zero-shot, or few-shot with reference images."""

    text_embeddings: torch.Tensor
    ref_patches: torch.Tensor

    def __init__(
        self,
        class_name: str | None = None,
        k_shot: int = 0,
        scales: Sequence[int] = (2, 3),
        few_shot_source: str | None = None,
        backbone: str = "ViT-B-16-plus-240",
        pretrained: str = "laion400m_e31",
        pre_trained: bool = True,
        weights: str | None = None,
        image_size: tuple[int, int] | list[int] = (240, 240),
    ) -> None:
        """``backbone``/``pretrained``: an open_clip model name and weight tag; ``weights``: a local checkpoint."""
        super().__init__(image_size=image_size)
        if k_shot < 0:
            raise ValueError(f"k_shot must be 0 (zero-shot) or a positive number of reference images, got {k_shot}")
        if k_shot > 0 and few_shot_source is not None and not str(few_shot_source).strip():
            raise ValueError(
                f"k_shot={k_shot} with an empty few_shot_source: set it to a folder of at least {k_shot} normal "
                "images, or leave it unset to take the references from the fit data"
            )
        self.scales = [int(s) for s in ([scales] if isinstance(scales, int) else scales)]
        if not self.scales or any(s < 1 for s in self.scales):
            raise ValueError(f"scales must be window sizes in patches (positive integers), got {list(scales)}")
        self.k_shot = int(k_shot)
        self.few_shot_source = few_shot_source
        if not class_name:
            log.warning(
                "winclip: no class_name given; the prompts use the generic %r (set model.params.class_name to "
                "what the camera looks at, e.g. 'bottle', for better zero-shot scores)",
                GENERIC_CLASS,
            )
        self.class_name = class_name or GENERIC_CLASS
        self.clip, self.tokenizer = build_clip(backbone, pretrained, pre_trained, weights)
        visual = self.clip.visual
        size = tuple(int(v) for v in _pair(visual.image_size))
        if tuple(self.image_size) != size:
            raise ValueError(f"image_size {list(self.image_size)} must be CLIP {backbone!r}'s input size {list(size)}")
        self.grid = tuple(int(v) for v in _pair(visual.grid_size))
        self.num_patches = self.grid[0] * self.grid[1]
        self.windows = [window_indices(self.grid, s) for s in self.scales]
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("text_embeddings", self._text_embeddings(self.class_name))
        # Few-shot references: patch embeddings [K * N, D] and window embeddings per scale [K * W, D].
        self.register_buffer("ref_patches", torch.empty(0))
        for i in range(len(self.scales)):
            self.register_buffer(f"ref_windows_{i}", torch.empty(0))

    # -- setup
    @property
    def needs_fit(self) -> bool:
        """Does the model need normal images? Only few-shot without a ``few_shot_source`` (it takes its references
        from the fit data); zero-shot, or few-shot with a reference folder, is made ready by ``prepare()``."""
        return self.k_shot > 0 and self.few_shot_source is None

    def prepare(self) -> WinClip:
        """Make the model ready without normal images: references from ``few_shot_source`` and a fixed
        normalisation (a raw probability of 0.5 is a score of 0.5)."""
        if self.k_shot > 0:
            self.set_references(self._load_references())
        for normalizer in (self.normalizer, self.map_normalizer):
            normalizer.threshold.fill_(0.5)
            normalizer.scale.fill_(0.1)
        self.fitted = True
        return self.eval()

    @torch.no_grad()
    def set_references(self, images: torch.Tensor) -> None:
        """Embed ``k_shot`` normal reference images [K, 3, H, W] for few-shot association."""
        _, windows, patches = self.encode_image(images.to(self.text_embeddings.device))
        self.ref_patches = patches.flatten(0, 1)
        for i, w in enumerate(windows):
            setattr(self, f"ref_windows_{i}", w.flatten(0, 1))

    def _load_references(self) -> torch.Tensor:
        from oddeye.data.images import list_images, load_images

        if self.few_shot_source is None:
            raise FitError(
                f"k_shot={self.k_shot} needs reference images: set few_shot_source to a folder of at least "
                f"{self.k_shot} normal images, or fit the model (oddeye fit) to take them from the fit data"
            )
        folder = Path(self.few_shot_source)
        paths = list_images(folder) if folder.is_dir() else []
        if len(paths) < self.k_shot:
            raise FitError(
                f"few_shot_source {folder} holds {len(paths)} image(s); k_shot={self.k_shot} needs at least "
                f"{self.k_shot} normal reference images there"
            )
        array = load_images(paths[: self.k_shot], self.image_size)
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255.0)

    def _fit_normal(self, batches: Iterable[torch.Tensor], progress: bool) -> None:
        """Nothing to learn zero-shot; few-shot takes its references from ``few_shot_source`` or the first images."""
        if self.k_shot == 0:
            for _ in batches:  # counted by the caller: an empty loader is still an error
                pass
            return
        if self.few_shot_source is not None:
            self.set_references(self._load_references())
            for _ in batches:
                pass
            return
        taken: list[torch.Tensor] = []
        for batch in batches:
            taken.extend(batch[: self.k_shot - len(taken)])
        if len(taken) < self.k_shot:
            raise FitError(f"k_shot={self.k_shot} needs that many reference images; the fit data has {len(taken)}")
        log.info("winclip: %d reference image(s) from the fit data", len(taken))
        self.set_references(torch.stack(taken))

    def heldout_scores(
        self,
        train_loader: Iterable[Any],
        folds: int,
        n: int,
        videos: torch.Tensor | None,
        template: AnomalyModel | None,
        progress: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """WinCLIP learns nothing from the images it scores (beyond ``k_shot`` references): score them all."""
        return self._score_raw(_CheckedBatches(train_loader, self._check_input))

    # -- encoders
    @torch.no_grad()
    def _text_embeddings(self, class_name: str) -> torch.Tensor:
        """[2, D]: the normal and the anomalous prompt ensembles, each averaged and normalised."""
        out = []
        for states in (NORMAL_STATES, ANOMALOUS_STATES):
            prompts = [t.format(s.format(class_name)) for s in states for t in TEMPLATES]
            emb = F.normalize(self.clip.encode_text(self.tokenizer(prompts)), dim=-1)
            out.append(F.normalize(emb.mean(0), dim=-1))
        return torch.stack(out)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Image embeddings [B, D], window embeddings per scale [B, W, D], patch embeddings [B, N, D] (normalised)."""
        visual = self.clip.visual
        x = visual._embeds((images - self.mean) / self.std)  # [B, 1 + N, width], class token first
        pooled, tokens = visual._pool(visual.transformer(x))
        image = pooled @ visual.proj
        patches = tokens @ visual.proj
        windows = []
        for idx in self.windows:
            idx = idx.to(x.device)
            b, w, s = x.shape[0], idx.shape[0], idx.shape[1]
            picked = x[:, 1:][:, idx.flatten()].view(b * w, s, -1)  # each window's tokens
            cls = x[:, :1].repeat_interleave(w, dim=0)
            win_pooled, _ = visual._pool(visual.transformer(torch.cat([cls, picked], 1)))
            windows.append(F.normalize(win_pooled @ visual.proj, dim=-1).view(b, w, -1))
        return F.normalize(image, dim=-1), windows, F.normalize(patches, dim=-1)

    def _anomalous_probability(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = _TEMPERATURE * embeddings @ self.text_embeddings.T
        return logits.softmax(-1)[..., 1]

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly probability [B] and map [B, H, W] (zero-shot, averaged with few-shot when references exist)."""
        image, windows, patches = self.encode_image(images.to(self.text_embeddings.device))
        score = self._anomalous_probability(image)
        maps = [score[:, None].expand(-1, self.num_patches)]
        for idx, emb in zip(self.windows, windows, strict=True):
            maps.append(harmonic_aggregation(self._anomalous_probability(emb), idx, self.num_patches))
        amap = torch.stack(maps).mean(0)
        if self.ref_patches.numel():
            few = [_nearest_distance(patches, self.ref_patches)]
            for i, (idx, emb) in enumerate(zip(self.windows, windows, strict=True)):
                dist = _nearest_distance(emb, getattr(self, f"ref_windows_{i}"))
                few.append(harmonic_aggregation(dist, idx, self.num_patches))
            few_map = torch.stack(few).mean(0)
            amap = (amap + few_map) / 2
            score = (score + few_map.amax(1)) / 2
        amap = amap.view(-1, 1, *self.grid)
        amap = F.interpolate(amap, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        return score, amap


def _nearest_distance(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(1 - cosine similarity to the nearest reference) / 2 for embeddings [B, M, D]: in [0, 1]."""
    return (1.0 - (embeddings @ references.T).amax(-1)) / 2


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
