"""Turning a backbone's output into target tokens: shared by the generic `timm` and `hf_vision` teachers.

A vision backbone hands back either a token sequence [B, N, C] (ViTs: a few prefix tokens such as [CLS] and
registers, then the patch tokens in row-major grid order) or a feature map [B, C, H, W] (convnets, hierarchical
models). Both become [B, T, C] here, one documented way:

- feature map: optional bilinear resize to G x G (align_corners=False), then row-major flattening: token
  r * W + c is grid cell (r, c);
- token sequence: prefix tokens ([CLS], registers) dropped or kept in front, or [CLS] alone (`prefix_tokens`); the
  patch tokens may be laid back onto their h x w grid, resized to G x G like a feature map and flattened again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def feature_map_to_tokens(features: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] (or [B, G*G, C] after a bilinear resize to `grid` x `grid`), row-major."""
    if grid is not None and tuple(features.shape[-2:]) != (grid, grid):
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", align_corners=False)
    return features.flatten(2).transpose(1, 2)


def patch_grid(num_patches: int, image_hw: tuple[int, int], patch_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the patch-token grid: from the input size and patch size when they account for every patch token,
    else the square root of a square count. ValueError when neither applies."""
    if patch_hw is not None:
        h, w = image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1]
        if h * w == num_patches:
            return h, w
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise ValueError(f"cannot lay {num_patches} patch tokens out on a grid (input {image_hw[0]}x{image_hw[1]}, "
                     f"patch {patch_hw}); leave grid unset")


def infer_num_prefix(num_tokens: int, image_hw: tuple[int, int], patch_hw: tuple[int, int] | None) -> int:
    """Prefix tokens in a sequence of `num_tokens`: what the patch grid of the input leaves over, else 0 when the
    count is square (a model without [CLS], or a stage of a hierarchical model). ValueError otherwise."""
    if patch_hw is not None:
        patches = (image_hw[0] // patch_hw[0]) * (image_hw[1] // patch_hw[1])
        if 0 < patches <= num_tokens:
            return num_tokens - patches
    if math.isqrt(num_tokens) ** 2 == num_tokens:
        return 0
    raise ValueError(f"cannot tell prefix tokens from patch tokens in a sequence of {num_tokens} "
                     f"(input {image_hw[0]}x{image_hw[1]}, patch {patch_hw}); set num_prefix_tokens")


def sequence_to_tokens(tokens: torch.Tensor, num_prefix: int, prefix_tokens: str, grid: int | None,
                       grid_hw: tuple[int, int] | None) -> torch.Tensor:
    """[B, N, C] -> [B, T, C]: patch tokens only (`drop`), prefix then patch tokens (`keep`) or the first prefix
    token, [CLS], alone (`cls`, T = 1). The patch tokens, laid out on their `grid_hw` grid, may be resized to `grid`
    x `grid` first (bilinear, align_corners=False)."""
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    if prefix_tokens == "cls":
        if num_prefix == 0:
            raise ValueError("spec.prefix_tokens: cls, but this model puts no [CLS] token before its patch tokens")
        return prefix[:, :1]
    if grid is not None:
        if grid_hw is None:
            raise ValueError("grid needs the patch-token grid size")
        h, w = grid_hw
        as_map = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)
        patches = feature_map_to_tokens(as_map, grid)
    if prefix_tokens == "keep":
        return torch.cat([prefix, patches], dim=1)
    return patches
