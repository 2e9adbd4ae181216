"""The paper teachers' preprocessing as it was before the CPU/device split: float32 pixel_values made on the CPU.

Kept verbatim (per teacher kind, from the spec and the teacher's files) as the reference the split path must
reproduce, and as the "old" side of `benchmarks/precision.py`'s preprocessing costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)


class LegacyPreprocess:
    """`LegacyPreprocess(spec, root)(images)` -> float32 pixel_values [B, 3, H, W] exactly as the teachers made them
    before the split; `root` is the model directory (`teacher.locate(spec).root`)."""

    def __init__(self, spec, root: str | Path) -> None:
        self.spec = spec
        root = Path(root)
        if spec.kind == "oneformer":
            from teachers.kinds.oneformer import load_oneformer_image_processor

            self.processor = load_oneformer_image_processor(str(root), spec.processor_backend)
        elif spec.kind == "unclip_image_encoder":
            from transformers import CLIPImageProcessor, CLIPImageProcessorPil

            cls = CLIPImageProcessorPil if spec.processor_backend == "pil" else CLIPImageProcessor
            self.processor = cls.from_pretrained(root, subfolder=spec.feature_extractor_subfolder)
        elif spec.kind != "depth_anything_v2":
            raise ValueError(f"no legacy path for kind {spec.kind!r}")

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        spec = self.spec
        if spec.kind == "depth_anything_v2":
            size = spec.image_size
            out = []
            for image in images:
                pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
                if spec.channel_order == "bgr":
                    pixels = pixels[..., ::-1]
                pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
                out.append(np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32))
            return torch.from_numpy(np.stack(out))
        if spec.kind == "oneformer":
            size = spec.image_size
            resized = [image.resize((size, size), Image.Resampling.BICUBIC) for image in images]
            encoded = self.processor(resized, task_inputs=["panoptic"] * len(resized), return_tensors="pt")
            return encoded["pixel_values"].to(torch.float32)
        return self.processor(list(images), return_tensors="pt")["pixel_values"].to(torch.float32)


def legacy_targets(teacher, images: Sequence[Image.Image]) -> torch.Tensor:
    """The teacher's targets [B, T, C] float32 through the old path: legacy pixel_values, cast to the compute dtype
    on the teacher's device, then the same loaded model's `compute`."""
    pixels = LegacyPreprocess(teacher.spec, teacher.locate(teacher.spec).root)(images)
    with torch.inference_mode():
        out = teacher.compute(pixels.to(device=teacher.device, dtype=teacher.compute_dtype))
        return out.to(device="cpu", dtype=torch.float32).clone()


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensors, in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
