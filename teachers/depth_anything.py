"""Depth Anything V2 teacher (kind `depth_anything_v2`): DINOv2 backbone tokens, as OLA-VLM's depth target.

Target per image: mean over the blocks in `spec.layers` of the backbone's final LayerNorm applied to that block's
output, prefix tokens (CLS, registers) dropped -> [(S/14)^2, hidden] (576 x 1024 for ViT-L at S = 336).
Only the backbone is kept; the DPT neck and depth head are discarded after loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from teachers.base import Teacher
from teachers.pixels import BGR, RGB, Preprocessor, stack_pixels
from teachers.registry import register
from teachers.spec import DepthAnythingSpec

# The reference normalises with these in float64 (numpy) and casts to float32 at the very end; the table below
# holds exactly those float32 values, so the device lookup gives the reference's pixel_values bit for bit.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)


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
