"""unCLIP image-encoder teacher (kind `unclip_image_encoder`): OLA-VLM's generation target.

Target per image: `CLIPVisionModelWithProjection(...).image_embeds` -> [1, projection_dim] (1 x 1024 for SD 2.1
unCLIP). Only the pipeline's `image_encoder` and `feature_extractor` subfolders are read, with transformers
classes: diffusers is never imported, so no UNet, VAE or scheduler is ever built or downloaded.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from teachers.base import Teacher
from teachers.pixels import ImageProcessorPreprocessor
from teachers.registry import register
from teachers.spec import ProcessorBackend, TeacherSpecBase


class UnclipImageEncoderSpec(TeacherSpecBase):
    """The CLIP image encoder of a diffusers unCLIP pipeline: `image_embeds`, one token of `projection_dim`.

    Only the `image_encoder` and `feature_extractor` subfolders of the pipeline are read.
    """

    kind: Literal["unclip_image_encoder"] = "unclip_image_encoder"
    model: str = Field(default="stabilityai/stable-diffusion-2-1-unclip", min_length=1)
    image_encoder_subfolder: str = "image_encoder"
    feature_extractor_subfolder: str = "feature_extractor"
    processor_backend: ProcessorBackend = "pil"


@register("unclip_image_encoder")
class UnclipImageEncoderTeacher(Teacher):
    spec_cls = UnclipImageEncoderSpec
    spec: UnclipImageEncoderSpec

    @classmethod
    def weight_layout(cls, spec: UnclipImageEncoderSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # The rest of the pipeline repo (unet/, vae/, text encoders) is neither downloaded nor fingerprinted.
        return (spec.image_encoder_subfolder,), (spec.feature_extractor_subfolder,)

    def load(self) -> None:
        from transformers import CLIPVisionModelWithProjection

        spec = self.spec
        root = self.resolve_weights()
        # Loaded straight into the compute dtype: no second, converted copy of a large checkpoint in memory.
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            root, subfolder=spec.image_encoder_subfolder, use_safetensors=True, dtype=self.compute_dtype
        )
        self._target_shape = (1, int(self.image_encoder.config.projection_dim))

    @classmethod
    def build_preprocessor(cls, spec: UnclipImageEncoderSpec) -> ImageProcessorPreprocessor:
        """The pipeline's CLIP feature extractor, split: its PIL resize (shortest edge, bicubic) and centre crop on
        the CPU -> uint8 [B, 3, crop, crop]; its rescale and CLIP mean/std on the device (exact: checked when
        built, float32 pixel_values otherwise)."""
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        processor_cls = CLIPImageProcessorPil if spec.processor_backend == "pil" else CLIPImageProcessor
        processor = processor_cls.from_pretrained(cls.locate(spec).root, subfolder=spec.feature_extractor_subfolder)
        return ImageProcessorPreprocessor(processor)

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, crop, crop] -> [B, 1, projection_dim] in compute dtype."""
        return self.image_encoder(pixel_values=batch).image_embeds.unsqueeze(1)
