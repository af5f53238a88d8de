"""DSR: dual subspace re-projection over a discrete (VQ) latent space (Zavrtanik et al., ECCV 2022).

https://arxiv.org/abs/2208.01476 — parameter names and defaults follow anomalib's ``Dsr``/``DsrModel``.

- A VQ autoencoder quantises an image at two scales (1/4 "bot" and 1/8 "top") and its "general
  object decoder" turns the quantised features back into an image, defects included.
- Defects are synthesised in the latent space: inside Perlin masks, quantised features are swapped
  for other codebook entries (``latent_anomaly_strength``: how far down the nearest-codes list).
- Subspace restriction networks pull the (possibly anomalous) features back to the normal
  subspace; the "object-specific decoder" renders them; an anomaly detection module segments the
  difference between the two decoded images.
- Then (the last ``upsampling_train_ratio`` of training) an upsampling module refines the map,
  trained on Perlin-masked texture defects pasted in image space.

The paper's VQ model is pretrained on ImageNet; those weights cannot be fetched here, so the VQ
stage is trained first on the user's own images (``vq_source_path`` names another folder of
images to use instead) for the first ``vq_train_ratio`` of the training steps. This is logged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate, max_pool2d, mse_loss

from oddeye.models.base import FitError, register
from oddeye.models.components.losses import focal_loss
from oddeye.models.components.scoring import local_mean_max
from oddeye.models.components.synthesis import IMAGE_EXTENSIONS, AnomalySynthesizer, perlin_mask
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Dsr"]

log = logging.getLogger(__name__)

# Encoders reduce 8×, and the subspace restriction U-Nets pool the 1/8 features twice more.
DOWNSAMPLING = 32
COMMITMENT = 0.25
# During the VQ stage, unused codes are moved onto current features every this many steps.
RESTART_EVERY = 5


class _Residual(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, layers: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(*[_Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient and the VQ-VAE codebook/commitment loss."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1 / num_embeddings, 1 / num_embeddings)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances [B*H*W, K] of feature vectors (x: [B, D, H, W]) to every code."""
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        w = self.embedding.weight
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]

    def lookup(self, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, d, h, w = shape
        return self.embedding(indices).view(b, h, w, d).permute(0, 3, 1, 2)

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, generator: torch.Generator) -> int:
        """Move codes no feature of ``x`` uses onto random features of ``x``; returns how many moved.

        Without this a codebook trained from scratch on a few images collapses onto a handful of
        codes (the paper starts from an ImageNet-trained codebook instead).
        """
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        used = torch.zeros(self.embedding.num_embeddings, dtype=torch.bool, device=x.device)
        used[self.distances(x).argmin(dim=1)] = True
        dead = (~used).nonzero().flatten()
        if dead.numel():
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(x.device)
            noise = 0.01 * flat.std() * torch.randn(dead.numel(), flat.shape[1], generator=generator).to(x.device)
            self.embedding.weight[dead] = flat[pick] + noise
        return int(dead.numel())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised features (straight-through) and the VQ loss."""
        q = self.lookup(self.distances(x).argmin(dim=1), x.shape)
        loss = mse_loss(q, x.detach()) + COMMITMENT * mse_loss(x, q.detach())
        return x + (q - x).detach(), loss


class DiscreteLatentModel(nn.Module):
    """Two-scale VQ autoencoder; ``decode`` is the general object decoder."""

    def __init__(self, hiddens: int, res_layers: int, res_hiddens: int, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.encoder_bot = nn.Sequential(
            nn.Conv2d(3, hiddens // 2, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(hiddens // 2, hiddens, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(hiddens, hiddens, 3, padding=1),
            _residual_stack(hiddens, res_layers, res_hiddens),
        )
        self.encoder_top = nn.Sequential(
            nn.Conv2d(hiddens, hiddens, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(hiddens, hiddens, 3, padding=1),
            _residual_stack(hiddens, res_layers, res_hiddens),
        )
        self.pre_vq_top = nn.Conv2d(hiddens, dim, 1)
        self.vq_top = VectorQuantizer(num_embeddings, dim)
        self.upsample_top = nn.ConvTranspose2d(dim, dim, 4, 2, 1)
        self.pre_vq_bot = nn.Conv2d(hiddens + dim, dim, 1)
        self.vq_bot = VectorQuantizer(num_embeddings, dim)
        self.decoder = QuantizedDecoder(hiddens, res_layers, res_hiddens, dim)

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Non-quantised and quantised features: ``top`` [B, D, H/8, W/8], ``bot`` [B, D, H/4, W/4]."""
        enc_b = self.encoder_bot(images)
        enc_t = self.encoder_top(enc_b)
        top = self.pre_vq_top(enc_t)
        q_top, loss_t = self.vq_top(top)
        bot = self.pre_vq_bot(torch.cat([enc_b, self.upsample_top(q_top)], dim=1))
        q_bot, loss_b = self.vq_bot(bot)
        return {"top": top, "bot": bot, "q_top": q_top, "q_bot": q_bot, "vq_loss": loss_t + loss_b}

    def decode(self, q_top: torch.Tensor, q_bot: torch.Tensor) -> torch.Tensor:
        return self.decoder(q_top, q_bot)


class QuantizedDecoder(nn.Module):
    """Quantised (top, bot) features → image: the general decoder, and (own weights) the object-specific one."""

    def __init__(self, hiddens: int, res_layers: int, res_hiddens: int, dim: int) -> None:
        super().__init__()
        self.upsample_top = nn.ConvTranspose2d(dim, dim, 4, 2, 1)
        self.net = nn.Sequential(
            nn.Conv2d(2 * dim, hiddens, 3, padding=1),
            _residual_stack(hiddens, res_layers, res_hiddens),
            nn.ConvTranspose2d(hiddens, hiddens // 2, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(hiddens // 2, 3, 4, 2, 1),
        )

    def forward(self, q_top: torch.Tensor, q_bot: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.upsample_top(q_top), q_bot], dim=1))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # Group norm: no running statistics, so the stages trained at different times stay consistent in eval mode.
    groups = max(1, cout // 4)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net: ``depth`` poolings, widths doubling (capped at 4× ``width``), skip connections."""

    def __init__(self, cin: int, cout: int, width: int, depth: int) -> None:
        super().__init__()
        widths = [width * min(2**i, 4) for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [_conv_block(cin, widths[0])] + [_conv_block(a, b) for a, b in itertools.pairwise(widths)]
        )
        self.up = nn.ModuleList(_conv_block(widths[i] + widths[i - 1], widths[i - 1]) for i in range(depth, 0, -1))
        self.out = nn.Conv2d(widths[0], cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.out(x)


@register("dsr")
class Dsr(TrainedAnomalyModel):
    """DSR: latent-space defects, subspace restriction, and a segmentation of two decoders' disagreement."""

    automatic_optimization = False

    def __init__(
        self,
        latent_anomaly_strength: float = 0.2,
        upsampling_train_ratio: float = 0.7,
        embedding_dim: int = 128,
        num_embeddings: int = 4096,
        num_hiddens: int = 128,
        num_residual_layers: int = 2,
        num_residual_hiddens: int = 64,
        base_width: int = 64,
        vq_train_ratio: float = 0.3,
        vq_source_path: str | None = None,
        anomaly_source_path: str | None = None,
        learning_rate: float = 2e-4,
        max_epochs: int | None = 100,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``upsampling_train_ratio`` (anomalib's name): the main stage takes that fraction of the steps after
        the VQ stage, and the upsampling module the rest. ``vq_train_ratio``: the fraction of all steps that
        trains the VQ autoencoder on this data (or ``vq_source_path``) — anomalib loads ImageNet weights
        instead. ``base_width``: width of the U-Nets (restriction, detection, upsampling)."""
        super().__init__(image_size=image_size)
        if any(s % DOWNSAMPLING for s in self.image_size):
            fit = [max(DOWNSAMPLING, s // DOWNSAMPLING * DOWNSAMPLING) for s in self.image_size]
            raise ValueError(
                f"dsr: image_size {list(self.image_size)} must be divisible by {DOWNSAMPLING} (encoders reduce 8×, "
                f"the restriction U-Nets 4× more), e.g. {fit}"
            )
        if not 0 < latent_anomaly_strength <= 1:
            raise ValueError(f"dsr: latent_anomaly_strength must be in (0, 1], got {latent_anomaly_strength}")
        if not 0 < upsampling_train_ratio < 1 or not 0 < vq_train_ratio < 1:
            raise ValueError("dsr: upsampling_train_ratio and vq_train_ratio must be in (0, 1)")
        self.latent_anomaly_strength = float(latent_anomaly_strength)
        self.upsampling_train_ratio = float(upsampling_train_ratio)
        self.vq_train_ratio = float(vq_train_ratio)
        self.vq_source_path, self.anomaly_source_path = vq_source_path, anomaly_source_path
        self.learning_rate = float(learning_rate)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        self.num_embeddings = int(num_embeddings)
        dim = int(embedding_dim)
        self.discrete = DiscreteLatentModel(num_hiddens, num_residual_layers, num_residual_hiddens, num_embeddings, dim)
        self.restrict_top = UNet(dim, dim, base_width, depth=2)
        self.restrict_bot = UNet(dim, dim, base_width, depth=2)
        # The object-specific decoder: the general decoder's shape, its own weights.
        self.object_decoder = QuantizedDecoder(num_hiddens, num_residual_layers, num_residual_hiddens, dim)
        self.detection = UNet(6, 2, base_width, depth=3)
        # The upsampling module refines the detection logits: it adds a correction, starting from none.
        self.upsampling = UNet(8, 2, base_width, depth=3)
        nn.init.zeros_(self.upsampling.out.weight)
        nn.init.zeros_(self.upsampling.out.bias)
        self._phase_steps = (0, 0)
        self._vq_images: torch.Tensor | None = None
        self._generator = torch.Generator()
        self.synthesizer: AnomalySynthesizer | None = None

    @property
    def device(self) -> torch.device:
        return self.detection.out.weight.device

    # -- the forward passes of the stages
    def _latent_anomalies(self, quantizer: VectorQuantizer, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Swap the quantised features inside ``mask`` [B, 1, h, w] for codes further down the nearest list."""
        b, d, h, w = features.shape
        dist = quantizer.distances(features).view(b, h * w, -1)
        out = quantizer.lookup(dist.argmin(dim=2).flatten(), features.shape)
        n_codes = dist.shape[2]
        for i in range(b):
            where = mask[i, 0].flatten().bool()
            if not bool(where.any()):
                continue
            strength = float(torch.empty(()).uniform_(self.latent_anomaly_strength, 1.0, generator=self._generator))
            k = min(n_codes, max(2, int(strength * n_codes)))
            d_masked = dist[i][where]  # [m, K]
            # A random code among the k nearest, never the nearest itself (that is the normal code).
            kth = d_masked.kthvalue(k, dim=1, keepdim=True).values
            nearest = d_masked.argmin(dim=1, keepdim=True)
            noise = torch.rand(d_masked.shape, generator=self._generator).to(d_masked.device)
            noise = noise.masked_fill(d_masked > kth, -1.0).scatter(1, nearest, -1.0)
            codes = quantizer.embedding(noise.argmax(dim=1))  # [m, D]
            flat = out[i].permute(1, 2, 0).reshape(h * w, d).clone()
            flat[where] = codes
            out[i] = flat.view(h, w, d).permute(2, 0, 1)
        return out

    def _decode_both(self, q_top: torch.Tensor, q_bot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """General and object-specific decodings of (possibly anomalous) quantised features, plus restored features."""
        with torch.no_grad():
            general = self.discrete.decode(q_top, q_bot)
        nq_top = self.restrict_top(q_top)
        nq_bot = self.restrict_bot(q_bot)
        rq_top, _ = self.discrete.vq_top(nq_top)
        rq_bot, _ = self.discrete.vq_bot(nq_bot)
        specific = self.object_decoder(rq_top, rq_bot)
        return general, specific, nq_top, nq_bot

    def _segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.discrete.encode(images)
        general, specific, _, _ = self._decode_both(enc["q_top"], enc["q_bot"])
        return self.detection(torch.cat([specific, general], dim=1)), general, specific

    def _refine(self, seg: torch.Tensor, general: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, 2, H, W]: the detection logits plus the upsampling module's correction."""
        correction = self.upsampling(torch.cat([general, specific, seg.softmax(dim=1)], dim=1))
        return torch.softmax(seg + correction, dim=1)

    # -- training: three phases on the shared trainer
    def configure_optimizers(self) -> Any:
        main = [
            *self.restrict_top.parameters(),
            *self.restrict_bot.parameters(),
            *self.object_decoder.parameters(),
            *self.detection.parameters(),
        ]
        return [
            torch.optim.Adam(self.discrete.parameters(), lr=self.learning_rate),
            torch.optim.Adam(main, lr=self.learning_rate),
            torch.optim.Adam(self.upsampling.parameters(), lr=self.learning_rate),
        ], []

    def on_train_start(self, batches: Iterable[torch.Tensor]) -> None:
        total = self.max_steps
        if not total:
            total = (self.max_epochs or 1) * sum(1 for _ in batches)
        elif self.max_epochs:
            total = min(total, self.max_epochs * sum(1 for _ in batches))
        vq = max(1, round(total * self.vq_train_ratio))
        main = max(1, round((total - vq) * self.upsampling_train_ratio))
        self._phase_steps = (vq, vq + main)
        self._generator.manual_seed(self.seed or 0)
        self.synthesizer = AnomalySynthesizer(self.anomaly_source_path, style="draem", seed=self.seed or 0, owner="dsr")
        source = "the training images" if self.vq_source_path is None else self.vq_source_path
        log.info(
            "dsr: no ImageNet-pretrained VQ model can be fetched here; training the VQ stage on %s for %d of %d steps, "
            "then the main stage to step %d, then the upsampling module",
            source,
            vq,
            total,
            self._phase_steps[1],
        )
        self._vq_images = None if self.vq_source_path is None else self._load_folder(self.vq_source_path)

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        self.synthesizer, self._vq_images = None, None

    def _load_folder(self, folder: str) -> torch.Tensor:
        from PIL import Image

        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise FitError(f"dsr: vq_source_path {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        h, w = self.image_size
        arrays = []
        for p in paths:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32) / 255)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _phase(self, step: int) -> int:
        vq_end, main_end = self._phase_steps
        return 1 if step < vq_end else (2 if step < main_end else 3)

    def _optimise(self, index: int, loss: torch.Tensor) -> None:
        opt = self.optimizers[index]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        phase = self._phase(step)
        if phase == 1:
            images = batch
            if self._vq_images is not None:
                idx = torch.randint(0, len(self._vq_images), (batch.shape[0],), generator=self._generator)
                images = self._vq_images[idx].to(batch.device)
            enc = self.discrete.encode(images)
            if step % RESTART_EVERY == 0:
                self.discrete.vq_top.restart_dead_codes(enc["top"].detach(), self._generator)
                self.discrete.vq_bot.restart_dead_codes(enc["bot"].detach(), self._generator)
                enc = self.discrete.encode(images)
            recon = self.discrete.decode(enc["q_top"], enc["q_bot"])
            recon_loss = mse_loss(recon, images)
            loss = recon_loss + enc["vq_loss"]
            self._optimise(0, loss)
            return {"loss": loss.detach(), "vq_recon": recon_loss.detach()}
        if phase == 2:
            return self._main_step(batch)
        return self._upsampling_step(batch)

    def _main_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = batch.shape
        with torch.no_grad():
            enc = self.discrete.encode(batch)
            # Perlin masks drawn at the 1/4 feature grid (never empty for an anomalous image); a 1/8 cell is
            # anomalous when any of its 1/4 cells is, and the pixel mask covers both.
            hb, wb = enc["q_bot"].shape[-2:]
            m_bot = torch.zeros(b, 1, hb, wb)
            for i in range(b):
                if float(torch.rand((), generator=self._generator)) < 0.5:
                    m_bot[i, 0] = perlin_mask((hb, wb), self._generator, min_area=1 / (hb * wb))
            m_bot = m_bot.to(batch.device)
            m_top = max_pool2d(m_bot, 2)
            a_top = self._latent_anomalies(self.discrete.vq_top, enc["top"], m_top)
            a_bot = self._latent_anomalies(self.discrete.vq_bot, enc["bot"], m_bot)
            mask = interpolate(torch.maximum(m_bot, interpolate(m_top, size=(hb, wb))), size=(h, w))
        general, specific, nq_top, nq_bot = self._decode_both(a_top, a_bot)
        seg = torch.softmax(self.detection(torch.cat([specific, general.detach()], dim=1)), dim=1)[:, 1:]
        feat_loss = mse_loss(nq_top, enc["q_top"]) + mse_loss(nq_bot, enc["q_bot"])
        image_loss = mse_loss(specific, batch)
        seg_loss = focal_loss(seg, mask)
        loss = feat_loss + image_loss + seg_loss
        self._optimise(1, loss)
        return {
            "loss": loss.detach(),
            "features": feat_loss.detach(),
            "image": image_loss.detach(),
            "focal": seg_loss.detach(),
        }

    def _upsampling_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.synthesizer is not None, "training_step runs inside Trainer.fit"
        augmented, mask = self.synthesizer(batch)
        with torch.no_grad():
            seg, general, specific = self._segment(augmented)
        refined = self._refine(seg, general, specific)
        loss = focal_loss(refined[:, 1:], mask)
        self._optimise(2, loss)
        return {"loss": loss.detach(), "upsampling_focal": loss.detach()}

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw score [B] (maximum of the map's local mean, 21×21 at 256 px) and anomaly map [B, H, W]."""
        images = images.to(self.device)
        seg, general, specific = self._segment(images)
        amap = self._refine(seg, general, specific)[:, 1]
        return local_mean_max(amap), amap
