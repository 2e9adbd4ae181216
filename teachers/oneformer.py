"""OneFormer teacher (kind `oneformer`): the Swin backbone's last feature map, as OLA-VLM's segmentation target.

Target per image: `pixel_level_module.encoder(pixel_values).feature_maps[-1]` ([C, h, w]), bilinearly resized to
`grid` x `grid` (align_corners=False) and flattened row-major -> [grid * grid, C] (576 x 1536 for Swin-L).
Only the backbone is kept; the pixel decoder, transformer decoder and text encoder are discarded after loading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from teachers.base import Teacher
from teachers.registry import register
from teachers.spec import OneFormerSpec

# Only `pixel_values` is used; the task string just has to be a valid one for the processor.
_TASK = "panoptic"


def load_oneformer_image_processor(path: str, backend: str = "pil"):
    """The OneFormer image processor saved in `path`, built without touching the hub.

    The hub configs name a class-info file in the `shi-labs/oneformer_demo` dataset repo, which the processor
    downloads in its constructor. Class names only matter for training labels, never for `pixel_values`, so the
    file is not loaded at all.
    """
    from transformers import OneFormerImageProcessor, OneFormerImageProcessorPil

    cls = OneFormerImageProcessorPil if backend == "pil" else OneFormerImageProcessor
    return cls.from_pretrained(path, class_info_file=None)


@register("oneformer")
class OneFormerTeacher(Teacher):
    spec_cls = OneFormerSpec
    spec: OneFormerSpec

    def load(self) -> None:
        from transformers import OneFormerForUniversalSegmentation

        root = self.resolve_weights()
        # Loaded straight into the compute dtype: no second, converted copy of a large checkpoint in memory.
        model = OneFormerForUniversalSegmentation.from_pretrained(root, use_safetensors=True, dtype=self.compute_dtype)
        self.encoder = model.model.pixel_level_module.encoder
        del model
        self.image_processor = load_oneformer_image_processor(str(root), self.spec.processor_backend)
        self._target_shape = (self.spec.grid * self.spec.grid, int(self.encoder.channels[-1]))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> pixel_values [B, 3, H, W] float32: bicubic resize to S x S, then the OneFormer processor.

        Every image is S x S before the processor, so none is padded and `pixel_mask` is all ones (dropped).
        """
        self.check_images(images)
        size = self.spec.image_size
        resized = [image.resize((size, size), Image.Resampling.BICUBIC) for image in images]
        encoded = self.image_processor(resized, task_inputs=[_TASK] * len(resized), return_tensors="pt")
        return encoded["pixel_values"].to(torch.float32)

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, grid * grid, C] in compute dtype."""
        features = self.encoder(batch).feature_maps[-1]
        grid = self.spec.grid
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2)
