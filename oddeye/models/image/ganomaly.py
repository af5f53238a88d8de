"""GANomaly: encoder-decoder-encoder generator with an adversarial discriminator (Akcay et al., 2018).

https://arxiv.org/abs/1805.06725 — parameter names and defaults follow anomalib's ``Ganomaly``.
The generator encodes an image to a latent vector, decodes it, and encodes the reconstruction
again; trained on normal images only, the two latent vectors agree for normal images and drift
apart for anomalous ones. The score is their mean squared difference. GANomaly gives an image
score only (no anomaly map), as in anomalib.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.functional import l1_loss, mse_loss

from oddeye.models.base import register
from oddeye.models.components.losses import binary_cross_entropy
from oddeye.models.training import TrainedAnomalyModel

__all__ = ["Ganomaly"]

log = logging.getLogger(__name__)

# The encoders halve the image until it is this many pixels wide, then a 4×4 conv makes a vector.
BOTTOM_SIZE = 4


def _dcgan_init(module: nn.Module) -> None:
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """DCGAN encoder: image [B, C, S, S] → [B, latent_vec_size, 1, 1] (and the features before the last conv)."""

    def __init__(
        self, size: int, latent_vec_size: int, channels: int, n_features: int, extra_layers: int, final_conv: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, n_features, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(extra_layers):
            layers += [nn.Conv2d(n_features, n_features, 3, 1, 1, bias=False), nn.BatchNorm2d(n_features)]
            layers.append(nn.LeakyReLU(0.2, True))
        size, width = size // 2, n_features
        while size > BOTTOM_SIZE:
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width)]
            layers.append(nn.LeakyReLU(0.2, True))
            size, width = size // 2, 2 * width
        self.features = nn.Sequential(*layers)
        self.out_width = width
        self.final = nn.Conv2d(width, latent_vec_size, 4, 1, 0, bias=False) if final_conv else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return (feats if self.final is None else self.final(feats)), feats


class Decoder(nn.Module):
    """DCGAN decoder: [B, latent_vec_size, 1, 1] → image [B, C, S, S] in [-1, 1]."""

    def __init__(self, size: int, latent_vec_size: int, channels: int, n_features: int, extra_layers: int) -> None:
        super().__init__()
        width, s = n_features // 2, BOTTOM_SIZE
        while s != size:
            width, s = width * 2, s * 2
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_vec_size, width, 4, 1, 0, bias=False)]
        layers += [nn.BatchNorm2d(width), nn.ReLU(True)]
        s = BOTTOM_SIZE
        while s < size // 2:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2)]
            layers.append(nn.ReLU(True))
            width, s = width // 2, s * 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@register("ganomaly")
class Ganomaly(TrainedAnomalyModel):
    """GANomaly: the distance between an image's latent vector and its reconstruction's is the score."""

    automatic_optimization = False

    def __init__(
        self,
        n_features: int = 64,
        latent_vec_size: int = 100,
        extra_layers: int = 0,
        add_final_conv_layer: bool = True,
        wadv: float = 1,
        wcon: float = 50,
        wenc: float = 1,
        lr: float = 0.0002,
        beta1: float = 0.5,
        beta2: float = 0.999,
        max_epochs: int | None = 100,
        max_steps: int | None = None,
        seed: int | None = 0,
        image_size: tuple[int, int] | list[int] = (256, 256),
    ) -> None:
        """``max_epochs``: anomalib's GANomaly examples train 100 epochs."""
        super().__init__(image_size=image_size)
        h, w = self.image_size
        if h != w or h < 4 * BOTTOM_SIZE or h & (h - 1):
            raise ValueError(
                f"ganomaly: image_size {list(self.image_size)} must be square with a power-of-two side >= "
                f"{4 * BOTTOM_SIZE} (the encoder halves it down to {BOTTOM_SIZE}×{BOTTOM_SIZE}), e.g. [64, 64] or "
                "[256, 256]"
            )
        if n_features < 2 or latent_vec_size < 1 or extra_layers < 0:
            raise ValueError("ganomaly: n_features must be >= 2, latent_vec_size >= 1, extra_layers >= 0")
        self.n_features, self.latent_vec_size = int(n_features), int(latent_vec_size)
        self.wadv, self.wcon, self.wenc = float(wadv), float(wcon), float(wenc)
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.max_epochs, self.max_steps, self.seed = max_epochs, max_steps, seed
        args = (h, latent_vec_size, 3, n_features, extra_layers)
        self.encoder1 = Encoder(*args, final_conv=add_final_conv_layer)
        latent = latent_vec_size if add_final_conv_layer else self.encoder1.out_width
        self.decoder = Decoder(h, latent, 3, n_features, extra_layers) if add_final_conv_layer else None
        if self.decoder is None:
            # Without the final conv the latent is the [width, 4, 4] feature map: decode from there.
            self.decoder = _MapDecoder(h, self.encoder1.out_width, n_features, extra_layers)
        self.encoder2 = Encoder(*args, final_conv=add_final_conv_layer)
        self.discriminator = Encoder(h, 1, 3, n_features, extra_layers, final_conv=True)
        self.apply(_dcgan_init)

    def _generate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images * 2 - 1  # the decoder's tanh output range
        latent_i, _ = self.encoder1(x)
        fake = self.decoder(latent_i)
        latent_o, _ = self.encoder2(fake)
        return fake, latent_i, latent_o

    def _discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, feats = self.discriminator(x)
        return torch.sigmoid(logit).flatten(), feats

    # -- training
    def configure_optimizers(self) -> Any:
        betas = (self.beta1, self.beta2)
        gen = [*self.encoder1.parameters(), *self.decoder.parameters(), *self.encoder2.parameters()]
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas)
        opt_g = torch.optim.Adam(gen, lr=self.lr, betas=betas)
        return [opt_d, opt_g], []

    def training_step(self, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        opt_d, opt_g = self.optimizers
        real = batch * 2 - 1
        fake, latent_i, latent_o = self._generate(batch)

        # Generator: fool the discriminator's features, reconstruct the image, agree in latent space.
        _, feats_real = self._discriminate(real)
        _, feats_fake = self._discriminate(fake)
        adv = mse_loss(feats_fake, feats_real.detach())
        con = l1_loss(fake, real)
        enc = mse_loss(latent_o, latent_i)
        g_loss = self.wadv * adv + self.wcon * con + self.wenc * enc
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        # Discriminator: real vs the (now fixed) reconstruction.
        pred_real, _ = self._discriminate(real)
        pred_fake, _ = self._discriminate(fake.detach())
        d_loss = 0.5 * (
            binary_cross_entropy(pred_real, torch.ones_like(pred_real))
            + binary_cross_entropy(pred_fake, torch.zeros_like(pred_fake))
        )
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if float(d_loss.detach()) < 1e-5:
            # A discriminator that wins outright gives no gradient: start it again (as GANomaly does).
            self.discriminator.apply(_dcgan_init)
            log.info("ganomaly: discriminator loss collapsed at step %d; re-initialised it", step)
        return {
            "loss": g_loss.detach() + d_loss.detach(),
            "generator": g_loss.detach(),
            "discriminator": d_loss.detach(),
        }

    # -- scoring
    @torch.no_grad()
    def raw_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Raw score [B]: mean squared distance of the two latent vectors; no anomaly map."""
        images = images.to(next(self.parameters()).device)
        _, latent_i, latent_o = self._generate(images)
        return (latent_i - latent_o).pow(2).flatten(1).mean(dim=1), None


class _MapDecoder(nn.Module):
    """Decoder from a [width, 4, 4] feature map (``add_final_conv_layer=False``)."""

    def __init__(self, size: int, width: int, n_features: int, extra_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        s = BOTTOM_SIZE
        while s < size // 2:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2)]
            layers.append(nn.ReLU(True))
            width, s = width // 2, s * 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
