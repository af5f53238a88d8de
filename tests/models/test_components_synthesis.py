"""Anomaly synthesis (Perlin masks, textures, augmentations) and SSPCAB, each on its own."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oddeye.models.components.sspcab import SSPCAB
from oddeye.models.components.synthesis import (
    AnomalySynthesizer,
    TextureSource,
    augment,
    perlin_mask,
    perlin_noise,
    procedural_texture,
    resize_mask,
)


def test_perlin_noise_is_smooth_bounded_and_any_size() -> None:
    g = torch.Generator().manual_seed(0)
    noise = perlin_noise((50, 70), (4, 8), g)
    assert noise.shape == (50, 70)
    assert float(noise.abs().max()) <= 1.5 and float(noise.std()) > 0.05
    # Smooth: neighbouring pixels differ far less than the noise's range.
    assert float((noise[:, 1:] - noise[:, :-1]).abs().mean()) < 0.1 * float(noise.max() - noise.min())


def test_perlin_mask_threshold_and_rotation() -> None:
    g = torch.Generator().manual_seed(1)
    low = perlin_mask((64, 64), torch.Generator().manual_seed(1), threshold=0.1, rotation=(0, 0))
    high = perlin_mask((64, 64), torch.Generator().manual_seed(1), threshold=0.6, rotation=(0, 0))
    assert set(torch.unique(low).tolist()) <= {0.0, 1.0}
    assert float(low.sum()) > float(high.sum())  # same noise, higher threshold: smaller defect
    assert bool((high <= low).all())
    rotated = perlin_mask((64, 64), torch.Generator().manual_seed(1), threshold=0.1, rotation=(90, 90))
    assert not torch.equal(rotated, low)  # the same noise, turned
    mask = perlin_mask((32, 32), g, min_area=0.02)
    assert float(mask.mean()) >= 0.02
    with pytest.raises(ValueError, match="min_scale"):
        perlin_mask((32, 32), g, min_scale=3, max_scale=3)


def test_procedural_textures_vary_and_stay_in_range() -> None:
    g = torch.Generator().manual_seed(2)
    textures = [procedural_texture((32, 48), g) for _ in range(8)]
    for t in textures:
        assert t.shape == (3, 32, 48) and float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(torch.stack(textures).std(dim=0).mean()) > 0.05  # not one pattern repeated


@pytest.mark.parametrize("style", ["draem", "glass"])
def test_augmentations_keep_shape_and_range(style: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 24, 24)
    for _ in range(10):
        y = augment(x, g, style)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(ValueError, match="'draem' or 'glass'"):
        augment(x, g, "other")


def test_synthesis_is_reproducible_with_a_seed() -> None:
    images = torch.rand(6, 3, 32, 32)
    a_img, a_mask = AnomalySynthesizer(seed=7, p_anomalous=0.5)(images)
    b_img, b_mask = AnomalySynthesizer(seed=7, p_anomalous=0.5)(images)
    c_img, _ = AnomalySynthesizer(seed=8, p_anomalous=0.5)(images)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert not torch.equal(a_img, c_img)


def test_synthesis_pastes_only_inside_the_mask() -> None:
    images = torch.full((4, 3, 32, 32), 0.5)
    out, masks = AnomalySynthesizer(style="glass", seed=0)(images)
    assert masks.shape == (4, 1, 32, 32)
    assert bool((masks.flatten(1).sum(1) > 0).all())  # GLASS: every image gets a defect
    outside = (masks == 0).expand_as(out)
    assert torch.equal(out[outside], images[outside])
    assert float((out - images).abs()[~outside].mean()) > 0.01
    # DRAEM style with p_anomalous=0 leaves every image untouched.
    same, none = AnomalySynthesizer(style="draem", p_anomalous=0.0, seed=0)(images)
    assert torch.equal(same, images) and float(none.sum()) == 0


def test_draem_beta_is_the_textures_opacity() -> None:
    """anomalib's convention: inside the mask, texture × beta + image × (1 − beta); beta=(0.1, 1.0) never hides it."""
    images = torch.full((4, 3, 32, 32), 0.5)
    full, masks = AnomalySynthesizer(style="draem", beta=1.0, p_anomalous=1.0, seed=3)(images)
    faint, masks_faint = AnomalySynthesizer(style="draem", beta=0.1, p_anomalous=1.0, seed=3)(images)
    assert torch.equal(masks, masks_faint)  # the same draws: only the opacity differs
    inside = (masks == 1).expand_as(images)
    assert float((full - images).abs()[inside].mean()) > 0.05
    assert torch.allclose((faint - images)[inside], 0.1 * (full - images)[inside], atol=1e-5)


def test_texture_folder_is_used(tmp_path: Path) -> None:
    red = np.zeros((20, 20, 3), np.uint8)
    red[..., 0] = 255
    (tmp_path / "sub").mkdir()
    Image.fromarray(red).save(tmp_path / "sub" / "red.png")
    source = TextureSource(tmp_path)
    assert not source.procedural
    tex = source.sample((16, 16), torch.Generator().manual_seed(0))
    assert tex.shape == (3, 16, 16) and float(tex[0].mean()) > 0.99 and float(tex[1:].max()) < 0.01


def test_empty_anomaly_source_path_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"holds no images.*\.png"):
        AnomalySynthesizer(anomaly_source_path=str(tmp_path))
    with pytest.raises(ValueError, match="is not a folder"):
        TextureSource(tmp_path / "missing")


def test_procedural_textures_are_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        source = TextureSource(None, owner="draem")
    assert source.procedural
    assert "built-in procedural textures" in caplog.text


def test_bad_synthesis_parameters() -> None:
    with pytest.raises(ValueError, match="beta"):
        AnomalySynthesizer(beta=(0.9, 0.1))
    with pytest.raises(ValueError, match="p_anomalous"):
        AnomalySynthesizer(p_anomalous=1.5)


def test_resize_mask_keeps_binary() -> None:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    small = resize_mask(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8) and set(torch.unique(small).tolist()) == {0.0, 1.0}


def test_sspcab_shape_and_blind_centre() -> None:
    torch.manual_seed(0)
    for kernel_dim, dilation in [(1, 1), (3, 2)]:
        block = SSPCAB(8, kernel_dim=kernel_dim, dilation=dilation)
        x = torch.rand(2, 8, 11, 11)
        assert block(x).shape == x.shape
        changed = x.clone()
        changed[:, :, 5, 5] += 10
        with torch.no_grad():
            diff = (block.masked_conv(changed) - block.masked_conv(x)).abs()
        assert float(diff[:, :, 5, 5].max()) == 0.0  # the centre is never seen
        assert float(diff.sum()) > 0  # but its neighbours' context is
    with pytest.raises(ValueError, match="kernel_dim"):
        SSPCAB(8, kernel_dim=0)


def test_sspcab_learns_to_reconstruct_smooth_input() -> None:
    torch.manual_seed(0)
    block = SSPCAB(4)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    yy = torch.linspace(0, 1, 16)
    x = (yy[:, None] + yy[None, :]).expand(8, 4, 16, 16).contiguous() / 2
    first = None
    for _ in range(60):
        loss = ((block(x) - x) ** 2).mean()
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first
