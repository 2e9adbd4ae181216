"""Turning loader samples into student batches: pixels, chat tokens with assistant-only labels, targets.

The hand-offs are typed: the loader's `Sample` -> `SampleEncoder` (in DataLoader workers) -> `EncodedSample` ->
`BatchCollator` -> `Batch` -> the training step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.loader import Sample, Skipped
from student.conversation import messages_from_sample, tokenize_messages

IMAGE_ASPECT_RATIOS = ("processor", "pad")


@dataclass(frozen=True)
class EncodedSample:
    """One sample ready to stack: what `SampleEncoder` makes of a `Sample`."""

    row: int  # the sample's store row
    has_image: bool
    pixel_values: torch.Tensor  # [3, H, W] float32; zeros for a text-only sample
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, -100 where the loss does not look (everything but the assistant's turns)
    targets: dict[str, np.ndarray]  # teacher -> float32 [T, C]
    valid: dict[str, bool]
    decoded_bytes: int
    image: Image.Image | None = None  # the decoded image, kept only with `SampleEncoder(keep_image=True)`


@dataclass(frozen=True)
class Batch:
    """What `BatchCollator` hands the training step: B usable samples stacked, and what the loader left out.

    B may be 0 (every item drawn was skipped): the sample fields are then None, and the trainer draws again.
    """

    drawn: int  # items taken from the sampler for this batch, usable or not: the data position moves by this
    skipped_items: list[Skipped]
    rows: torch.Tensor | None = None  # [B] int64 store rows
    has_image: torch.Tensor | None = None  # [B] bool
    pixel_values: torch.Tensor | None = None  # [B, 3, H, W] float32
    input_ids: torch.Tensor | None = None  # [B, L] int64, right-padded
    attention_mask: torch.Tensor | None = None  # [B, L] int64, 0 on padding
    labels: torch.Tensor | None = None  # [B, L] int64, -100 on padding and wherever the loss does not look
    targets: dict[str, torch.Tensor] | None = None  # teacher -> [B, T, C] float32
    valid: dict[str, torch.Tensor] | None = None  # teacher -> [B] bool
    # The decoded RGB images (None for a text-only sample), when `SampleEncoder(keep_image=True)` kept them.
    images: list[Image.Image | None] | None = None
    decoded_bytes: int = 0  # image span bytes read plus target bytes decoded for these B samples

    @property
    def size(self) -> int:
        """B, the usable samples in the batch."""
        return 0 if self.rows is None else len(self.rows)

    @property
    def skipped(self) -> Counter:
        """{reason: n} of the items left out."""
        return Counter(item.reason for item in self.skipped_items)


def expand_to_square(image: Image.Image, image_mean) -> Image.Image:
    """The image centred on a square canvas filled with the processor's mean colour (LLaVA's `pad`): the whole image
    reaches the vision encoder instead of a centre crop, and the padding normalises to zero."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    fill = tuple(int(x * 255) for x in image_mean)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class SampleEncoder:
    """Per-sample work done in DataLoader workers: image processor and chat template.

    `image_aspect_ratio`: "processor" hands the image to the processor as it is (its own resize and centre crop;
    the reference's PT), "pad" expands it to a square first (`expand_to_square`; the reference's VPT and IFT).
    A text-only sample gets zero pixels of the processor's output size, which the student never looks at (LLaVA
    does the same), so every batch stacks into one tensor.
    """

    def __init__(self, image_processor, tokenizer, max_length: int, *, keep_image: bool = False,
                 image_aspect_ratio: str = "processor"):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_aspect_ratio = image_aspect_ratio
        # Online teachers take the decoded image itself, not the student's pixels (other size and normalisation).
        self.keep_image = keep_image
        self._blank: torch.Tensor | None = None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, self.image_processor.image_mean)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def blank(self) -> torch.Tensor:
        if self._blank is None:  # the output size, whatever the processor's size/crop settings
            self._blank = torch.zeros_like(self.pixels(Image.new("RGB", (32, 32))))
        return self._blank

    def __call__(self, sample: Sample) -> EncodedSample:
        image = sample.image
        messages = messages_from_sample(sample.caption, sample.conversations, image=image is not None)
        input_ids, labels = tokenize_messages(self.tokenizer, messages, self.max_length, images=int(image is not None))
        return EncodedSample(
            row=sample.row,
            has_image=image is not None,
            pixel_values=self.pixels(image) if image is not None else self.blank(),
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            targets=sample.targets,
            valid=sample.valid,
            decoded_bytes=sample.decoded_bytes,
            image=image if self.keep_image else None,
        )


class BatchCollator:
    """Right-pads token sequences and stacks pixels and targets into one batch.

    `Skipped` items (samples the loader could not use) are left out of the batch and kept in `skipped_items`; a
    batch may therefore hold fewer samples than asked, or none (`size` 0). With `SampleEncoder(keep_image=True)`
    the batch also carries `images`, the decoded RGB PIL images.
    """

    def __init__(self, pad_token_id: int, teachers: list[str]):
        self.pad_token_id = pad_token_id
        self.teachers = list(teachers)

    def __call__(self, items: list[EncodedSample | Skipped]) -> Batch:
        samples = [s for s in items if not isinstance(s, Skipped)]
        skipped = [s for s in items if isinstance(s, Skipped)]
        if not samples:
            return Batch(drawn=len(items), skipped_items=skipped)
        length = max(len(s.input_ids) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[i, :n] = s.input_ids
            labels[i, :n] = s.labels
            attention_mask[i, :n] = 1
        targets, valid = _stack_targets(samples, self.teachers)
        images = [s.image for s in samples]
        return Batch(
            drawn=len(items),
            skipped_items=skipped,
            rows=torch.tensor([s.row for s in samples], dtype=torch.long),
            has_image=torch.tensor([s.has_image for s in samples], dtype=torch.bool),
            pixel_values=torch.stack([s.pixel_values for s in samples]),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            targets=targets,
            valid=valid,
            images=images if any(image is not None for image in images) else None,
            decoded_bytes=sum(s.decoded_bytes for s in samples),
        )


def _stack_targets(samples: list[EncodedSample],
                   teachers: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Batch the per-sample targets: {teacher: [B, T, C] float32}, {teacher: [B] bool}."""
    targets = {n: torch.from_numpy(np.stack([s.targets[n] for s in samples])) for n in teachers}
    valid = {n: torch.tensor([s.valid[n] for s in samples], dtype=torch.bool) for n in teachers}
    return targets, valid
