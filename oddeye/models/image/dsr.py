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

The paper's VQ model is pretrained on ImageNet, so that its codebook and general decoder render any
appearance (a latent anomaly must look different from the code it replaced). Those weights cannot be
fetched here, so the VQ stage is trained first, for the first ``vq_train_ratio`` of the training
steps, on general images: half of each batch is random crops (resized to the input size) of natural
photos — the folder ``vq_source_path`` names, else scikit-image's bundled photos, the shared
``NaturalImages`` pool EfficientAd's ImageNet penalty falls back on — and the other half is the
batch's own training images, so that the normal surface is still reconstructed well. (Measured on
the test's 32-px stripes after 100 VQ steps: the general decoder's response to a defect grew from
0.03 to 0.08 with the photos, while its error on normal images went from 0.05 to 0.07.) The source
is logged. Half of the VQ images also get textures pasted in (the shared synthesiser); the codebook
learns by EMA, as the paper's VQ-VAE-2, and codes left unused are restarted on current features.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate, max_pool2d, mse_loss

from oddeye.models.base import FitError, register
from oddeye.models.components.losses import focal_loss
from oddeye.models.components.natural_images import NaturalImages
from oddeye.models.components.scoring import local_mean_max
from oddeye.models.components.synthesis import AnomalySynthesizer, perlin_mask
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Dsr"]

log = logging.getLogger(__name__)

# Encoders reduce 8×, and the subspace restriction U-Nets pool the 1/8 features twice more.
DOWNSAMPLING = 32
COMMITMENT = 0.25
# Codebook EMA decay of the VQ-VAE-2 model DSR pretrains.
EMA_DECAY = 0.99
# During the VQ stage, unused codes are moved onto current features every this many steps.
RESTART_EVERY = 5
# Latent anomalies never take a code among a feature's nearest 5 % (anomalib, as the paper's code).
NEAR_CODES_KEPT = 0.05
# Share of each VQ-stage batch drawn from the general images (natural photos); the rest are the batch's own.
NATURAL_SHARE = 0.5
# The object-specific decoder's image loss weighs 10× the feature and focal losses (anomalib's DSR loss).
IMAGE_LOSS_WEIGHT = 10.0


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
    """Nearest-codebook quantisation with a straight-through gradient and the commitment loss.

    The codebook is not learnt by gradient but by exponential moving averages of the features
    assigned to each code (``update``), as in the VQ-VAE-2 model DSR's authors pretrain.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.requires_grad_(False)
        self.register_buffer("ema_count", torch.ones(num_embeddings))
        self.register_buffer("ema_sum", self.embedding.weight.detach().clone())

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distances [B*H*W, K] of feature vectors (x: [B, D, H, W]) to every code."""
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        w = self.embedding.weight
        return flat.pow(2).sum(1, keepdim=True) - 2 * flat @ w.t() + w.pow(2).sum(1)[None]

    def lookup(self, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, d, h, w = shape
        return self.embedding(indices).view(b, h, w, d).permute(0, 3, 1, 2)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """One EMA step of the codebook towards the mean of the features ``x`` [B, D, H, W] nearest each code."""
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
        onehot = torch.zeros(flat.shape[0], self.ema_count.numel(), device=x.device)
        onehot.scatter_(1, self.distances(x).argmin(dim=1, keepdim=True), 1.0)
        self.ema_count.mul_(EMA_DECAY).add_(onehot.sum(0), alpha=1 - EMA_DECAY)
        self.ema_sum.mul_(EMA_DECAY).add_(onehot.t() @ flat, alpha=1 - EMA_DECAY)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + self.ema_count.numel() * 1e-5) * n  # Laplace smoothing
        self.embedding.weight.copy_(self.ema_sum / count[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, generator: torch.Generator) -> int:
        """Move the codes that (by their EMA count) fewer than one feature per batch uses onto random
        features of ``x``; returns how many moved.

        Without this a codebook trained from scratch on a few images collapses onto a handful of
        codes (the paper starts from an ImageNet-trained codebook instead). The EMA count, not one
        batch, decides, so the codes of rarer appearance are kept.
        """
        flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        dead = (self.ema_count < 1.0).nonzero().flatten()
        if dead.numel():
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(x.device)
            self.embedding.weight[dead] = flat[pick]
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = flat[pick]
        return int(dead.numel())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantised features (straight-through) and the commitment loss."""
        q = self.lookup(self.distances(x).argmin(dim=1), x.shape)
        return x + (q - x).detach(), COMMITMENT * mse_loss(x, q.detach())


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
        enc_b = self.encoder_bot(images - 0.5)
        top = self.pre_vq_top(self.encoder_top(enc_b))
        q_top, loss_t = self.vq_top(top)
        bot = self.bot_features(enc_b, q_top)
        q_bot, loss_b = self.vq_bot(bot)
        return {"enc_b": enc_b, "top": top, "bot": bot, "q_top": q_top, "q_bot": q_bot, "vq_loss": loss_t + loss_b}

    def bot_features(self, enc_b: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
        """The 1/4 features to quantise: the bottom encoder's output conditioned on the quantised top."""
        return self.pre_vq_bot(torch.cat([enc_b, self.upsample_top(q_top)], dim=1))

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
        return self.net(torch.cat([self.upsample_top(q_top), q_bot], dim=1)) + 0.5


def _conv_block(cin: int, cout: int, instance_norm: bool) -> nn.Sequential:
    def norm() -> nn.Module:
        # Instance norm in the detection and upsampling modules (anomalib's); group norm in the subspace
        # restriction U-Nets, whose deepest maps may be 1×1. Neither keeps running statistics, so the
        # stages trained at different times stay consistent in eval mode.
        return nn.InstanceNorm2d(cout) if instance_norm else nn.GroupNorm(max(1, cout // 4), cout)

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        norm(),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        norm(),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net: ``depth`` poolings, widths doubling (capped at 4× ``width``), skip connections."""

    def __init__(self, cin: int, cout: int, width: int, depth: int, instance_norm: bool = False) -> None:
        super().__init__()
        widths = [width * min(2**i, 4) for i in range(depth + 1)]
        pairs = [(cin, widths[0]), *itertools.pairwise(widths)]
        self.down = nn.ModuleList(_conv_block(a, b, instance_norm) for a, b in pairs)
        self.up = nn.ModuleList(
            _conv_block(widths[i] + widths[i - 1], widths[i - 1], instance_norm) for i in range(depth, 0, -1)
        )
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
        self.detection = UNet(6, 2, base_width, depth=3, instance_norm=True)
        # The upsampling module refines the detection logits: it adds a correction, starting from none.
        self.upsampling = UNet(8, 2, base_width, depth=3, instance_norm=True)
        nn.init.zeros_(self.upsampling.out.weight)
        nn.init.zeros_(self.upsampling.out.bias)
        self._phase_steps = (0, 0)
        self._vq_images: NaturalImages | None = None
        self._vq_rng = np.random.default_rng(0)
        self._generator = torch.Generator()
        self.synthesizer: AnomalySynthesizer | None = None

    @property
    def device(self) -> torch.device:
        return self.detection.out.weight.device

    # -- the forward passes of the stages
    def _latent_anomalies(self, quantizer: VectorQuantizer, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Quantised ``features`` with the codes inside ``mask`` [B, 1, h, w] swapped for more distant ones.

        Per image a strength s is drawn from [``latent_anomaly_strength``, 1]; each masked feature takes a
        random code among its ``s * K`` nearest, skipping the nearest 5 % (those would look normal).
        """
        b, _, h, w = features.shape
        n_codes = quantizer.embedding.num_embeddings
        skip = max(1, int(n_codes * NEAR_CODES_KEPT))
        order = quantizer.distances(features).view(b, h * w, n_codes).argsort(dim=2)
        normal = quantizer.lookup(order[..., 0].flatten(), features.shape)
        low = self.latent_anomaly_strength
        strength = low + (1 - low) * torch.rand(b, generator=self._generator)
        top_k = (strength * n_codes).long().add(1).clamp(skip + 1, n_codes)
        rank = skip + (torch.rand(b, h * w, generator=self._generator) * (top_k - skip)[:, None]).long()
        codes = order.gather(2, rank.to(order.device)[..., None]).flatten()
        return normal * (1 - mask) + quantizer.lookup(codes, features.shape) * mask

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
        self._vq_rng = np.random.default_rng(self.seed or 0)
        self._vq_images = self._general_images()
        if self._vq_images is None:
            source = "the training images only"
        else:
            n = len(self._vq_images)
            source = f"random crops of {n} images from {self._vq_images.source} and the training images"
        log.info(
            "dsr: no ImageNet-pretrained VQ model can be fetched here; training the VQ stage on %s for %d of %d "
            "steps, then the main stage to step %d, then the upsampling module",
            source,
            vq,
            total,
            self._phase_steps[1],
        )

    def _general_images(self) -> NaturalImages | None:
        """The VQ stage's general images: ``vq_source_path``, else scikit-image's bundled photos, else none."""
        if self.vq_source_path is not None:
            try:
                return NaturalImages.from_folder(self.vq_source_path)
            except (ValueError, FileNotFoundError) as e:
                raise FitError(f"dsr: vq_source_path: {e}") from e
        try:
            return NaturalImages.bundled()
        except Exception as e:  # scikit-image missing or broken: the training images alone
            log.warning("dsr: scikit-image's photos are unavailable (%s): VQ stage on the training images only", e)
            return None

    def on_train_end(self, batches: Iterable[torch.Tensor]) -> None:
        self.synthesizer, self._vq_images = None, None

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
            return self._vq_step(batch, step)
        if phase == 2:
            return self._main_step(batch)
        return self._upsampling_step(batch)

    def _vq_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """The VQ autoencoder (encoders, codebooks, general decoder) on the images, half of them with pasted
        textures: the paper's VQ model has seen ImageNet and renders any appearance, defects included, and
        one that has seen only the normal surface would quantise a defect back to normal codes."""
        assert self.synthesizer is not None, "training_step runs inside Trainer.fit"
        images = batch
        if self._vq_images is not None:
            n = max(1, round(batch.shape[0] * NATURAL_SHARE))
            general = self._vq_images.sample(n, self.image_size, self._vq_rng).to(batch.device)
            images = torch.cat([general, batch[: batch.shape[0] - n]])
        images, _ = self.synthesizer(images)
        enc = self.discrete.encode(images)
        if step % RESTART_EVERY == 0:
            self.discrete.vq_top.restart_dead_codes(enc["top"].detach(), self._generator)
            self.discrete.vq_bot.restart_dead_codes(enc["bot"].detach(), self._generator)
            enc = self.discrete.encode(images)
        self.discrete.vq_top.update(enc["top"].detach())
        self.discrete.vq_bot.update(enc["bot"].detach())
        recon = self.discrete.decode(enc["q_top"], enc["q_bot"])
        recon_loss = mse_loss(recon, images)
        loss = recon_loss + enc["vq_loss"]
        self._optimise(0, loss)
        return {"loss": loss.detach(), "vq_recon": recon_loss.detach()}

    def _perlin_masks(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        """[n, 1, H, W]: a non-empty Perlin mask for about half the images, none for the others."""
        masks = torch.zeros(n, 1, *size)
        for i in range(n):
            if float(torch.rand((), generator=self._generator)) < 0.5:
                masks[i, 0] = perlin_mask(size, self._generator, min_area=1 / (size[0] * size[1]))
        return masks

    def _main_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = batch.shape
        with torch.no_grad():
            enc = self.discrete.encode(batch)
            # Perlin masks at image resolution; a feature cell is anomalous when any of its pixels is.
            mask = self._perlin_masks(b, (h, w)).to(batch.device)
            m_top = max_pool2d(mask, h // enc["q_top"].shape[-2])
            m_bot = max_pool2d(mask, h // enc["q_bot"].shape[-2])
            a_top = self._latent_anomalies(self.discrete.vq_top, enc["top"], m_top)
            # Anomalies in the top codes, the bottom codes, or both (then the bottom features are
            # recomputed from the anomalous top first), as in the paper's code.
            a_bot_both = self._latent_anomalies(
                self.discrete.vq_bot, self.discrete.bot_features(enc["enc_b"], a_top), m_bot
            )
            a_bot = self._latent_anomalies(self.discrete.vq_bot, enc["bot"], m_bot)
            mode = torch.randint(0, 4, (b, 1, 1, 1), generator=self._generator).to(batch.device)
            both, top_only, bot_only = mode < 2, mode == 2, mode == 3
            q_top = torch.where(bot_only, enc["q_top"], a_top)
            q_bot = torch.where(both, a_bot_both, torch.where(top_only, enc["q_bot"], a_bot))
            target = torch.where(bot_only, interpolate(m_bot, size=(h, w)), interpolate(m_top, size=(h, w)))
        general, specific, nq_top, nq_bot = self._decode_both(q_top, q_bot)
        # The detection module learns from the two decodings; its loss does not reach the decoders.
        seg = torch.softmax(self.detection(torch.cat([specific.detach(), general], dim=1)), dim=1)[:, 1:]
        feat_loss = mse_loss(nq_top, enc["q_top"]) + mse_loss(nq_bot, enc["q_bot"])
        image_loss = mse_loss(specific, batch)
        seg_loss = focal_loss(seg, target)
        loss = feat_loss + IMAGE_LOSS_WEIGHT * image_loss + seg_loss
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
