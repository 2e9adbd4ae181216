"""OneFormer teacher (kind `oneformer`): the Swin backbone's last feature map, as OLA-VLM's segmentation target.

Target per image: `pixel_level_module.encoder(pixel_values).feature_maps[-1]` ([C, h, w]), bilinearly resized to
`grid` x `grid` (align_corners=False) and flattened row-major -> [grid * grid, C] (576 x 1536 for Swin-L).
Only the backbone is kept; the pixel decoder, transformer decoder and text encoder are discarded after loading.
`decoder()` loads the whole model again, apart, to turn embeddings of the target's shape into panoptic masks
(`PanopticDecoder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image
from pydantic import Field

from teachers.base import Teacher
from teachers.decoding import PanopticMasks, Segment, TargetDecoder
from teachers.pixels import ImageProcessorPreprocessor, PilResize, Preprocessor, hf_processor_lut, stack_pixels
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


def load_oneformer_processor(spec: OneFormerSpec, root: Path):
    """The repo's `OneFormerProcessor` (image processor and the CLIP tokenizer of the task prompt), offline as
    `load_oneformer_image_processor`. The tokenizer's vocabulary files are not among the files the teacher reads, so
    a hub id is handed to transformers (which finds them in its cache or fetches them); a local directory is read."""
    from transformers import OneFormerProcessor

    source = str(root) if Path(spec.model).expanduser().is_dir() else spec.model
    return OneFormerProcessor.from_pretrained(source, revision=spec.revision, class_info_file=None)


class SquareResize:
    """PIL bicubic resize to size x size (picklable, unlike a lambda)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)


class OneFormerPreprocessor(Preprocessor):
    """The `pil` backend's pixels without its numpy float work. CPU: PIL bicubic resize to S x S -> uint8
    [B, 3, S, S]. Device: the processor's own resize of those S x S images (bilinear, 768 -> 800 for the COCO
    checkpoints: half the CPU time of the two; on an accelerator `PilResize`, Pillow's arithmetic bit for bit, on a
    CPU Pillow itself), then its rescale and mean/std as a table computed by the processor itself. Where `PilResize`
    cannot match the installed Pillow, the CPU half does that resize too.

    The processor would convert each image to numpy and back to PIL around that same `Image.resize` call, and pads
    nothing (every image is S x S), so the pixels are the processor's bit for bit.
    """

    def __init__(self, processor, image_size: int) -> None:
        self.image_size = image_size
        self.resample = int(processor.resample) if processor.resample is not None else int(Image.Resampling.BILINEAR)
        self.out_hw: tuple[int, int] | None = None
        self.device_resize: PilResize | None = None
        if processor.do_resize:
            # The processor's output size for an S x S input, found by its own resize (on a blank image, once).
            blank = np.zeros((3, image_size, image_size), dtype=np.uint8)
            out = processor.resize(image=blank, size=processor.size, resample=processor.resample)
            self.out_hw = tuple(int(n) for n in out.shape[-2:])
            with contextlib.suppress(ValueError):
                self.device_resize = PilResize((image_size, image_size), self.out_hw, self.resample)
        self.lut = hf_processor_lut(processor)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = []
        for image in images:
            image = image.resize(size, Image.Resampling.BICUBIC)
            if self.out_hw is not None and self.device_resize is None:
                image = self._processor_resize(image)
            arrays.append(np.asarray(image))
        return stack_pixels(arrays)

    def normalize(self, batch):
        if self.device_resize is not None and isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8:
            # On a CPU, Pillow itself is the quicker of the two exact resizes (6 ms an image against 100).
            batch = self.device_resize(batch) if batch.device.type != "cpu" else self._pil_resize(batch)
        return super().normalize(batch)

    def _pil_resize(self, batch: torch.Tensor) -> torch.Tensor:
        return stack_pixels([np.asarray(self._processor_resize(Image.fromarray(image.permute(1, 2, 0).numpy())))
                             for image in batch])

    def _processor_resize(self, image: Image.Image) -> Image.Image:
        """The processor's own resize of an S x S image (the call it makes, see the class docstring)."""
        return image.resize((self.out_hw[1], self.out_hw[0]), self.resample)


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

    def decoder(self) -> PanopticDecoder:
        """The checkpoint's whole OneFormer on this teacher's device and compute dtype (see `PanopticDecoder`)."""
        return PanopticDecoder(self.spec, self.resolve_weights(), self.preprocessor, self.encoder, self.compute_dtype)

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


class PanopticDecoder(TargetDecoder):
    """OneFormer's own pixel decoder and transformer decoder, with an embedding of the seg target's shape in place of
    the backbone's last feature map, as the reference's demo does; the earlier backbone maps come from the image.

    The rest of the model is loaded from the teacher's checkpoint (safetensors), around the teacher's own backbone
    (`encoder`), and run as it is, task "panoptic":
    a forward hook on its backbone swaps the last feature map, so everything after the backbone is the model's own
    forward. The image goes through the teacher's own preprocessing (`preprocessor`), so the earlier maps are those
    of the pixels its targets came from. Masks come from the processor's `post_process_panoptic_segmentation` at the
    image's size, names from `config.id2label`.

    The target is the native last map resized to `grid` x `grid`; the native size depends on the processor's input
    size (25 x 25 for Swin-L at 800 px, 8 x 8 for the 256 px demo teacher). An embedding's map is resized back to the
    native size (bilinear, align_corners=False) before it replaces the native map, as the reference does. The
    reference then also resizes the three earlier maps down to the last map's size before its pixel decoder; here
    they keep their sizes, so that fed the real last map the decoder gives exactly the full model's output.
    """

    what = "panoptic masks"
    task = "panoptic"
    # The post-processing defaults of transformers, which the reference's demo uses.
    threshold = 0.5
    mask_threshold = 0.5
    overlap_mask_area_threshold = 0.8

    def __init__(self, spec: OneFormerSpec, root: Path, preprocessor: Preprocessor, encoder: nn.Module,
                 dtype: torch.dtype) -> None:
        from transformers import OneFormerForUniversalSegmentation

        self.model = OneFormerForUniversalSegmentation.from_pretrained(root, use_safetensors=True, dtype=dtype)
        # The teacher's backbone is the checkpoint's own, already loaded on its device: the decoder shares it rather
        # than holding a second copy (a Swin-L is ~200 M parameters).
        self.model.model.pixel_level_module.encoder = encoder
        device = next(encoder.parameters()).device
        self.model.to(device).eval().requires_grad_(False)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.channels = int(self.model.model.pixel_level_module.encoder.channels[-1])
        processor = load_oneformer_processor(spec, root)
        self.image_processor = processor.image_processor
        # The task prompt's tokens do not depend on the image, but the processor makes them only beside pixels.
        blank = Image.new("RGB", (32, 32))
        self.task_inputs = processor(images=[blank], task_inputs=[self.task], return_tensors="pt")["task_inputs"]
        self.preprocessor = preprocessor
        self.grid = spec.grid
        self.device = device
        self.dtype = dtype

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """The teacher's pixel_values of one RGB image: `[1, 3, H, W]` in compute dtype on the device."""
        Teacher.check_images([image])
        return self.preprocessor.normalize(self.preprocessor([image])).to(device=self.device, dtype=self.dtype)

    def grid_map(self, embedding: torch.Tensor) -> torch.Tensor:
        """`[grid * grid, C]` -> `[1, C, grid, grid]`, the inverse of the teacher's row-major flattening."""
        expected = (self.grid * self.grid, self.channels)
        if tuple(embedding.shape) != expected:
            raise ValueError(f"seg embedding has shape {list(embedding.shape)}, expected {list(expected)}")
        return embedding.reshape(1, self.grid, self.grid, self.channels).permute(0, 3, 1, 2)

    def predict(self, pixel_values: torch.Tensor, last_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`OneFormerForUniversalSegmentation` on `pixel_values` (`[B, 3, H, W]`) with the panoptic task input and
        `last_map` (`[B, C, h, w]`) in place of its backbone's last feature map, resized to that map's native size
        first where it differs. Returns float32 `class_queries_logits` `[B, Q, K + 1]` and `masks_queries_logits`
        `[B, Q, H / 4, W / 4]`."""

        def swap(module: Any, args: Any, output: Any) -> Any:
            native = output.feature_maps[-1]
            new = last_map.to(device=native.device, dtype=torch.float32)
            if new.shape[-2:] != native.shape[-2:]:
                new = F.interpolate(new, size=native.shape[-2:], mode="bilinear", align_corners=False)
            if new.shape != native.shape:
                raise ValueError(f"last_map has shape {list(last_map.shape)}; the backbone's last map here is "
                                 f"{list(native.shape)} (batch and channels must match)")
            output.feature_maps = (*output.feature_maps[:-1], new.to(native.dtype))
            return output

        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        task_inputs = self.task_inputs.to(self.device).expand(pixel_values.shape[0], -1)
        handle = self.model.model.pixel_level_module.encoder.register_forward_hook(swap)
        try:
            with torch.inference_mode():
                out = self.model(pixel_values=pixel_values, task_inputs=task_inputs)
        finally:
            handle.remove()
        return out.class_queries_logits.float(), out.masks_queries_logits.float()

    def decode(self, image: Image.Image, embedding: torch.Tensor, *, seed: int = 0) -> PanopticMasks:
        """`embedding`: `[grid * grid, C]`. Returns the panoptic masks at the image's size. `seed` is unused."""
        from transformers.models.oneformer.modeling_oneformer import OneFormerForUniversalSegmentationOutput

        class_logits, mask_logits = self.predict(self.pixel_values(image), self.grid_map(embedding))
        outputs = OneFormerForUniversalSegmentationOutput(class_queries_logits=class_logits,
                                                          masks_queries_logits=mask_logits)
        # Nothing is fused, as in the reference; passing the empty set also keeps transformers from warning.
        result = self.image_processor.post_process_panoptic_segmentation(
            outputs, threshold=self.threshold, mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_mask_area_threshold, label_ids_to_fuse=set(),
            target_sizes=[(image.height, image.width)])[0]
        segments = tuple(Segment(id=int(info["id"]), label=self.id2label.get(int(info["label_id"]),
                                                                             f"LABEL_{int(info['label_id'])}"),
                                 score=float(info["score"]))
                         for info in result["segments_info"])
        return PanopticMasks(segmentation=result["segmentation"].to(torch.int32).cpu().numpy(), segments=segments)

    def settings(self) -> dict[str, Any]:
        return {"task": self.task, "threshold": self.threshold, "mask_threshold": self.mask_threshold,
                "overlap_mask_area_threshold": self.overlap_mask_area_threshold, "label_ids_to_fuse": []}
