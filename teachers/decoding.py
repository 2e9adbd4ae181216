"""Turning embeddings in a teacher's target space back into what the teacher means by them, with its own modules.

A target, or a student's prediction of one, is a `[T, C]` array nobody can judge by eye. The teachers of the paper
each end in modules that make a picture from their features: Depth-Anything-V2's DPT neck and head make a depth map,
OneFormer's pixel decoder and transformer decoder make panoptic masks, and the SD-2.1 unCLIP pipeline makes an image
from a CLIP image embedding. A `TargetDecoder` feeds an embedding of the stored target's shape to those modules, as
the reference's demo does, and returns plain data (`Decoded`); `pipeline visualize` draws it.

A kind offers a decoder by overriding `Teacher.decoder()`; generic kinds (`timm`, `hf_vision`) have none.
Decoders load the rest of the teacher's checkpoint from the spec's `model` (safetensors only), so they cost memory
and time the precompute never pays: only `pipeline visualize` builds them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class DepthMap:
    """Relative depth at the image's size, `[H, W]` float32: the teacher's head output, resized (Depth-Anything:
    larger = nearer; the scale is arbitrary, so normalise per image to show it)."""

    depth: np.ndarray


@dataclass(frozen=True)
class Segment:
    id: int  # the value of this segment's pixels in `PanopticMasks.segmentation`
    label: str  # the class name from the teacher's config (`LABEL_<n>` where it has none)
    score: float


@dataclass(frozen=True)
class PanopticMasks:
    """`segmentation`: `[H, W]` int32 segment id per pixel at the image's size (-1 or 0 = no segment, as the
    teacher's post-processing gives it); `segments`: what each id is."""

    segmentation: np.ndarray
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class GeneratedImage:
    """The image a generative decoder made from the embedding, with what decides it besides the embedding."""

    image: Image.Image
    settings: dict[str, Any] = field(default_factory=dict)  # seed, steps, scheduler, ...


Decoded = DepthMap | PanopticMasks | GeneratedImage


class TargetDecoder(ABC):
    """Decodes embeddings of a teacher's target shape through that teacher's own modules."""

    # What the decoded picture is, for titles and records ("depth map", "panoptic masks", "unCLIP image").
    what: str = ""

    @abstractmethod
    def decode(self, image: Image.Image, embedding: torch.Tensor, *, seed: int = 0) -> Decoded:
        """`embedding`: `[T, C]` float32, the stored target's shape (a target or a prediction of it). `image`: the
        RGB image it belongs to (a decoder may read the parts of the teacher the embedding does not replace from it,
        and sizes its output to it). `seed` fixes any sampling (generative decoders); others ignore it."""

    def settings(self) -> dict[str, Any]:
        """What besides the embedding decides the output (steps, scheduler, ...): recorded beside every picture."""
        return {}
