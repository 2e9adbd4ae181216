"""Depth Anything V2 teacher (kind `depth_anything_v2`): DINOv2 backbone tokens, as OLA-VLM's depth target.

Target per image: mean over the blocks in `spec.layers` of the backbone's final LayerNorm applied to that block's
output, prefix tokens (CLS, registers) dropped -> [(S/14)^2, hidden] (576 x 1024 for ViT-L at S = 336).
Only the backbone is kept; the DPT neck and depth head are discarded after loading. `decoder()` loads them again,
apart, to turn embeddings of the target's shape into depth maps (`DepthDecoder`).

With `pos_embed_interpolation: reference` the position embeddings are resized once, at load, to the fixed patch grid
of `image_size` as the DINOv2 code of the reference does it, and replace the checkpoint's grid; transformers then
adds them as they are, since their count matches the patches (its own resize only runs when it does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from teachers.base import Teacher
from teachers.decoding import DepthMap, TargetDecoder
from teachers.pixels import BGR, RGB, Preprocessor, stack_pixels
from teachers.registry import register
from teachers.spec import TeacherSpecBase


class DepthAnythingSpec(TeacherSpecBase):
    """Depth Anything V2 backbone tokens: mean over `layers` of LayerNorm(block output), prefix tokens dropped.

    `layers` are 0-indexed transformer blocks (block i is hidden_states[i + 1]); they are stored sorted since the
    mean does not depend on their order. `channel_order: bgr` reproduces the reference's swapped colour channels.
    `pos_embed_interpolation` says how the backbone's position-embedding grid (37 x 37 for the hub models) is
    resized to the `image_size / 14` patch grid: `transformers` resizes to that size (bicubic); `reference`, as the
    DINOv2 code vendored by Depth-Anything and OLA-VLM, resizes by the scale factor (grid + 0.1) / 37 (bicubic, no
    antialias), which samples the grid up to about 0.15 of a cell apart. Both leave a grid of the native size as is.
    """

    kind: Literal["depth_anything_v2"] = "depth_anything_v2"
    model: str = Field(default="depth-anything/Depth-Anything-V2-Large-hf", min_length=1)
    image_size: int = Field(default=336, gt=0)
    layers: tuple[int, ...] = (4, 11, 17, 23)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    pos_embed_interpolation: Literal["transformers", "reference"] = "transformers"

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("needs at least one block index, e.g. [4, 11, 17, 23]")
        if any(i < 0 for i in layers):
            raise ValueError(f"block indices are 0-indexed and must be >= 0, got {list(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"block indices must be unique, got {list(layers)}")
        return tuple(sorted(layers))


# The reference normalises with these in float64 (numpy) and casts to float32 at the very end; the table below
# holds exactly those float32 values, so the device lookup gives the reference's pixel_values bit for bit.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
# DINOv2's `interpolate_offset`, kept by Depth-Anything and the reference: added to the target grid before the scale
# factor is computed, so that floating-point error cannot floor the output size below the grid (DINO's work-around;
# DINOv2 with registers sets it to 0). It also shifts where the grid is sampled, which is why it matters here.
REFERENCE_INTERPOLATE_OFFSET = 0.1


def reference_position_embeddings(position_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + N*N, C] -> [1, 1 + grid*grid, C] (same dtype) as the reference's DINOv2 resizes them: the patch grid in
    float32, bicubic by the scale factor (grid + 0.1) / N (align_corners=False, no antialias), [CLS] kept. A grid of
    the native size N is returned as it is, as the reference does."""
    native = round((position_embeddings.shape[1] - 1) ** 0.5)
    if grid == native:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    patch = position_embeddings[:, 1:].float().reshape(1, native, native, dim).permute(0, 3, 1, 2)
    scale = (grid + REFERENCE_INTERPOLATE_OFFSET) / native
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False, antialias=False)
    if patch.shape[-2:] != (grid, grid):
        raise RuntimeError(f"resizing the {native}x{native} position grid by {scale} gave {tuple(patch.shape[-2:])}, "
                           f"not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(position_embeddings.dtype)
    return torch.cat([position_embeddings[:, :1], patch], dim=1)


class DepthPreprocessor(Preprocessor):
    """CPU: PIL bicubic resize to S x S (the aspect ratio is not kept, as in the reference) -> uint8 [B, 3, S, S].
    Device: /255 and ImageNet mean/std, the float64 reference's values by table lookup. With `channel_order: bgr`
    the channels are swapped before normalisation, reproducing the reference's colour mistake."""

    def __init__(self, image_size: int, channel_order: str = "rgb") -> None:
        self.image_size = image_size
        self.channels = BGR if channel_order == "bgr" else RGB
        values = np.arange(256, dtype=np.float64)[None, :] / 255.0
        self.lut = ((values - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None]).astype(np.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return stack_pixels([np.asarray(image.resize(size, Image.Resampling.BICUBIC)) for image in images])


@register("depth_anything_v2")
class DepthAnythingTeacher(Teacher):
    spec_cls = DepthAnythingSpec
    spec: DepthAnythingSpec

    def load(self) -> None:
        from transformers import DepthAnythingForDepthEstimation

        root = self.resolve_weights()
        # Loaded straight into the compute dtype: no second, converted copy of a large checkpoint in memory.
        model = DepthAnythingForDepthEstimation.from_pretrained(root, use_safetensors=True, dtype=self.compute_dtype)
        self.backbone = model.backbone
        del model

        config = self.backbone.config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        num_blocks = len(self.backbone.encoder.layer)
        spec = self.spec
        if spec.image_size % patch:
            raise ValueError(f"spec.image_size={spec.image_size} must be a multiple of the patch size {patch} "
                             f"(e.g. {spec.image_size // patch * patch or patch})")
        if max(spec.layers) >= num_blocks:
            raise ValueError(f"spec.layers={list(spec.layers)}: this backbone has {num_blocks} blocks, valid "
                             f"indices are 0..{num_blocks - 1}")
        self.num_patches = (spec.image_size // patch) ** 2
        self._target_shape = (self.num_patches, config.hidden_size)
        if spec.pos_embed_interpolation == "reference":
            embeddings = self.backbone.embeddings
            with torch.no_grad():
                resized = reference_position_embeddings(embeddings.position_embeddings, spec.image_size // patch)
            embeddings.position_embeddings = nn.Parameter(resized, requires_grad=False)

    def decoder(self) -> DepthDecoder:
        """The checkpoint's DPT neck and depth head on this teacher's device and compute dtype (see `DepthDecoder`)."""
        return DepthDecoder(self.resolve_weights(), round(self.num_patches ** 0.5), self.device, self.compute_dtype)

    @classmethod
    def build_preprocessor(cls, spec: DepthAnythingSpec) -> DepthPreprocessor:
        # Everything it needs is in the spec: no file is read.
        return DepthPreprocessor(spec.image_size, spec.channel_order)

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> [B, (S/14)^2, hidden] in compute dtype."""
        hidden_states = self.backbone(batch, output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output, so block i is hidden_states[i + 1]; patch tokens come last.
        per_layer = [self.backbone.layernorm(hidden_states[i + 1])[:, -self.num_patches:] for i in self.spec.layers]
        return torch.stack(per_layer, dim=0).mean(dim=0)


class DepthDecoder(TargetDecoder):
    """Depth-Anything's own DPT neck and depth head, fed an embedding of the depth target's shape as all four of the
    backbone layers they read, as the reference's demo does (`da_v2_head([pred] * 4)`).

    `root` is the teacher's checkpoint directory; the model is loaded whole (safetensors) and its backbone dropped.
    `grid` is the patch grid side (24 at 336 px), so embeddings are `[grid * grid, hidden]`.
    """

    what = "depth map"

    def __init__(self, root: Path, grid: int, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import DepthAnythingForDepthEstimation

        model = DepthAnythingForDepthEstimation.from_pretrained(root, use_safetensors=True, dtype=dtype)
        self.neck = model.neck.to(device).eval().requires_grad_(False)
        self.head = model.head.to(device).eval().requires_grad_(False)
        self.num_inputs = len(model.config.neck_hidden_sizes)
        self.hidden_size = model.config.backbone_config.hidden_size
        del model
        self.grid = grid
        self.device = device
        self.dtype = dtype

    def predict(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The neck and head on backbone feature maps, as `DepthAnythingForDepthEstimation.forward` runs them.

        `feature_maps`: one `[B, 1 + grid * grid, hidden]` tensor per neck input (the backbone's `feature_maps`:
        LayerNorm'd block outputs, [CLS] first). Returns `predicted_depth`, `[B, grid * 14, grid * 14]` float32.
        """
        with torch.inference_mode():
            maps = [m.to(device=self.device, dtype=self.dtype) for m in feature_maps]
            fused = self.neck(maps, self.grid, self.grid)
            return self.head(fused, self.grid, self.grid).float()

    def decode(self, image: Image.Image, embedding: torch.Tensor, *, seed: int = 0) -> DepthMap:
        """`embedding`: `[grid * grid, hidden]`. Returns the head's depth resized to the image's size (bilinear,
        align_corners=True, as Depth-Anything-V2's `infer_image` resizes its output). `seed` is unused."""
        expected = (self.grid * self.grid, self.hidden_size)
        if tuple(embedding.shape) != expected:
            raise ValueError(f"depth embedding has shape {list(embedding.shape)}, expected {list(expected)}")
        tokens = embedding.reshape(1, *expected)
        # The neck's reassemble stage drops each input's first token as [CLS] (Depth-Anything reads no CLS), so a
        # zero token takes that place and every token of the embedding reaches the neck.
        tokens = torch.cat([tokens.new_zeros(1, 1, expected[1]), tokens], dim=1)
        depth = self.predict([tokens] * self.num_inputs)
        with torch.inference_mode():
            depth = F.interpolate(depth[:, None], size=(image.height, image.width), mode="bilinear",
                                  align_corners=True)
        return DepthMap(depth=depth[0, 0].cpu().numpy())
