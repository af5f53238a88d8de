"""ViT patch tokens: prefix tokens dropped, grids at any patch multiple, class attention, local weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from oddeye.models.components.vit_features import ViTFeatureExtractor, is_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

SMALL = {"depth": 2}  # two blocks: the tests check mechanics, not features


@pytest.fixture(scope="module")
def dinov2_reg() -> ViTFeatureExtractor:
    torch.manual_seed(0)
    return ViTFeatureExtractor("vit_small_patch14_reg4_dinov2", [1, 2], (56, 84), pre_trained=False, model_kwargs=SMALL)


def test_grid_is_the_patch_tokens_without_class_and_register_tokens(dinov2_reg: ViTFeatureExtractor) -> None:
    assert dinov2_reg.num_prefix_tokens == 5  # class token + 4 registers
    images = torch.rand(2, 3, 56, 84)
    grids = dinov2_reg(images)
    assert list(grids) == [1, 2]
    assert grids[2].shape == (2, 384, 4, 6) and dinov2_reg.grid_size == (4, 6)
    # The same tokens computed by hand: run the blocks, drop the 5 prefix tokens, reshape row-major.
    m = dinov2_reg.model
    x = (images - dinov2_reg.mean) / dinov2_reg.std
    with torch.no_grad():
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        tokens = m.blocks[1](m.blocks[0](tokens))
    expected = tokens[:, 5:].reshape(2, 4, 6, 384).permute(0, 3, 1, 2)
    torch.testing.assert_close(grids[2], expected, rtol=1e-4, atol=1e-5)


def test_other_sizes_that_are_patch_multiples(dinov2_reg: ViTFeatureExtractor) -> None:
    assert dinov2_reg(torch.rand(1, 3, 28, 14))[1].shape == (1, 384, 2, 1)


def test_size_not_a_patch_multiple_is_a_clear_error(dinov2_reg: ViTFeatureExtractor) -> None:
    with pytest.raises(ValueError, match=r"not a multiple of .*patch size \(14, 14\).*\(56, 56\)"):
        ViTFeatureExtractor("vit_small_patch14_dinov2", [1], (50, 56), pre_trained=False, model_kwargs=SMALL)
    with pytest.raises(ValueError, match="not a multiple"):
        dinov2_reg(torch.rand(1, 3, 30, 28))


def test_class_attention_matches_timm_attention(dinov2_reg: ViTFeatureExtractor) -> None:
    images = torch.rand(2, 3, 56, 84)
    _, cls_attn = dinov2_reg.forward_with_attention(images)
    assert cls_attn.shape == (2, 6, 24)  # heads x patches
    # Ground truth: timm's unfused attention path, whose attention matrix goes through attn_drop.
    attn = dinov2_reg.model.blocks[1].attn
    seen: list[torch.Tensor] = []
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        dinov2_reg(images)
    finally:
        handle.remove()
        attn.fused_attn = True
    torch.testing.assert_close(cls_attn, seen[0][:, :, 0, 5:], rtol=1e-4, atol=1e-6)


def test_bad_layers_and_non_vit_backbones() -> None:
    assert is_vit("vit_tiny_patch16_224") and not is_vit("resnet18")
    with pytest.raises(ValueError, match=r"blocks 1\.\.2"):
        ViTFeatureExtractor("vit_tiny_patch16_224", [3], (32, 32), pre_trained=False, model_kwargs=SMALL)
    with pytest.raises(ValueError, match="not a vision transformer"):
        ViTFeatureExtractor("resnet18", [1], (32, 32), pre_trained=False)
    with pytest.raises(ValueError, match="unknown backbone"):
        ViTFeatureExtractor("no_such_vit", [1], (32, 32), pre_trained=False)


def test_local_weights_file_with_other_resolution_and_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)  # 224 px, with its classifier
    path = tmp_path / "vit.pth"
    torch.save(full.state_dict(), path)
    ext = ViTFeatureExtractor("vit_tiny_patch16_224", [2], (64, 48), weights=str(path), model_kwargs=SMALL)
    assert torch.equal(ext.model.blocks[1].mlp.fc1.weight, full.blocks[1].mlp.fc1.weight)
    assert ext.model.pos_embed.shape[1] in (1 + 4 * 3, 1 + 14 * 14)  # resampled, or kept for dynamic sizes
    assert ext(torch.rand(1, 3, 64, 48))[2].shape == (1, 192, 4, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViTFeatureExtractor(
            "vit_tiny_patch16_224", [1], (32, 32), weights=str(tmp_path / "none.pth"), model_kwargs=SMALL
        )
    other = dict(full.state_dict())
    other["blocks.0.mlp.fc1.weight"] = other["blocks.0.mlp.fc1.weight"][:, :100]  # another network's shape
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit"):
        ViTFeatureExtractor(
            "vit_tiny_patch16_224", [1], (32, 32), weights=str(tmp_path / "other.pth"), model_kwargs=SMALL
        )
