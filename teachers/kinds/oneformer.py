"""OneFormer teacher (kind `oneformer`): the Swin backbone's last feature map, as OLA-VLM's segmentation target.

Target per image: `pixel_level_module.encoder(pixel_values).feature_maps[-1]` ([C, h, w]), bilinearly resized to
`grid` x `grid` (align_corners=False) and flattened row-major -> [grid * grid, C] (576 x 1536 for Swin-L).
Only the backbone is kept; the pixel decoder, transformer decoder and text encoder are discarded after loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from teachers.base import Teacher
from teachers.pixels import ImageProcessorPreprocessor, Preprocessor, hf_processor_lut, stack_pixels
from teachers.registry import register
from teachers.spec import ProcessorBackend, TeacherSpecBase


class OneFormerSpec(TeacherSpecBase):
    """OneFormer Swin backbone: last feature map, bilinearly resized to `grid` x `grid`, flattened row-major.

    Images are first resized to `image_size` x `image_size` (PIL bicubic), then go through the repo's own OneFormer
    image processor. `processor_backend: pil` is the numpy/PIL processor the reference used; `torchvision` is the
    transformers 5 default and differs from it in the last bits.
    """

    kind: Literal["oneformer"] = "oneformer"
    model: str = Field(default="shi-labs/oneformer_coco_swin_large", min_length=1)
    image_size: int = Field(default=768, gt=0)
    grid: int = Field(default=24, gt=0)
    processor_backend: ProcessorBackend = "pil"


def load_oneformer_image_processor(path: str, backend: str = "pil"):
    """The OneFormer image processor saved in `path`, built without touching the hub.

    The hub configs name a class-info file in the `shi-labs/oneformer_demo` dataset repo, which the processor
    downloads in its constructor. Class names only matter for training labels, never for `pixel_values`, so the
    file is not loaded at all.
    """
    from transformers import OneFormerImageProcessor, OneFormerImageProcessorPil

    cls = OneFormerImageProcessorPil if backend == "pil" else OneFormerImageProcessor
    return cls.from_pretrained(path, class_info_file=None)


class SquareResize:
    """PIL bicubic resize to size x size (picklable, unlike a lambda)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)


class OneFormerPreprocessor(Preprocessor):
    """The `pil` backend's pixels without its numpy float work: CPU: PIL bicubic resize to S x S, then the
    processor's own PIL resize (bilinear, 768 -> 800 for the COCO checkpoints) -> uint8 [B, 3, H, W]. Device: the
    processor's rescale and mean/std as a table computed by the processor itself.

    The processor would convert each image to numpy and back to PIL around that same `Image.resize` call, and pads
    nothing (every image is S x S), so the pixels are the processor's bit for bit.
    """

    def __init__(self, processor, image_size: int) -> None:
        self.image_size = image_size
        self.resample = int(processor.resample) if processor.resample is not None else int(Image.Resampling.BILINEAR)
        self.out_hw: tuple[int, int] | None = None
        if processor.do_resize:
            # The processor's output size for an S x S input, found by its own resize (on a blank image, once).
            blank = np.zeros((3, image_size, image_size), dtype=np.uint8)
            out = processor.resize(image=blank, size=processor.size, resample=processor.resample)
            self.out_hw = tuple(int(n) for n in out.shape[-2:])
        self.lut = hf_processor_lut(processor)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = []
        for image in images:
            image = image.resize(size, Image.Resampling.BICUBIC)
            if self.out_hw is not None:
                image = image.resize((self.out_hw[1], self.out_hw[0]), self.resample)
            arrays.append(np.asarray(image))
        return stack_pixels(arrays)


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
        self._target_shape = (self.spec.grid * self.spec.grid, int(self.encoder.channels[-1]))

    @classmethod
    def build_preprocessor(cls, spec: OneFormerSpec) -> Preprocessor:
        """`pil` backend: `OneFormerPreprocessor` (uint8 out, the processor's pixels exactly). `torchvision`: the
        processor after the S x S resize, split into uint8 + table where that is exact (see
        `ImageProcessorPreprocessor`), float32 pixel_values otherwise."""
        processor = load_oneformer_image_processor(str(cls.locate(spec).root), spec.processor_backend)
        if spec.processor_backend == "pil":
            return OneFormerPreprocessor(processor, spec.image_size)
        return ImageProcessorPreprocessor(processor, before=SquareResize(spec.image_size))

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, grid * grid, C] in compute dtype."""
        features = self.encoder(batch).feature_maps[-1]
        grid = self.spec.grid
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2)
