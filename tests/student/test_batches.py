"""What the collator hands the training step: the usable samples stacked and right-padded, and what was left out."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.data.loader import Skipped
from student.data import BatchCollator, EncodedSample

PAD = 0
SHAPE = (4, 3)


def _encoded(row: int, length: int, valid: bool, image: Image.Image | None = None) -> EncodedSample:
    return EncodedSample(row=row, has_image=True, pixel_values=torch.full((3, 8, 8), float(row)),
                         input_ids=torch.arange(1, length + 1), labels=torch.arange(1, length + 1),
                         targets={"depth": np.full(SHAPE, row, dtype=np.float32)}, valid={"depth": valid},
                         decoded_bytes=100 * row, image=image)


def test_a_batch_stacks_the_usable_samples_and_keeps_the_skipped_ones_aside():
    batch = BatchCollator(PAD, ["depth"])([_encoded(1, 3, True), Skipped(2, "no image"), _encoded(4, 5, False)])
    assert (batch.size, batch.drawn, batch.skipped) == (2, 3, {"no image": 1})
    assert batch.rows.tolist() == [1, 4] and batch.pixel_values.shape == (2, 3, 8, 8)
    assert batch.input_ids.tolist() == [[1, 2, 3, PAD, PAD], [1, 2, 3, 4, 5]]
    assert batch.attention_mask.sum(dim=1).tolist() == [3, 5] and batch.labels[0, 3:].tolist() == [-100, -100]
    assert batch.targets["depth"].shape == (2, *SHAPE) and batch.targets["depth"].dtype == torch.float32
    assert batch.valid["depth"].tolist() == [True, False]
    assert batch.decoded_bytes == 500 and batch.images is None


def test_a_batch_carries_the_decoded_images_only_when_the_encoder_kept_them():
    image = Image.new("RGB", (8, 8))
    batch = BatchCollator(PAD, [])([_encoded(1, 2, True, image), _encoded(2, 2, True, image)])
    assert batch.images == [image, image] and batch.targets == {} and batch.valid == {}


def test_a_batch_of_skipped_items_only_has_no_samples_but_moves_the_data_position():
    batch = BatchCollator(PAD, ["depth"])([Skipped(3, "no image"), Skipped(5, "no image")])
    assert (batch.size, batch.drawn, batch.skipped) == (0, 2, {"no image": 2})
    assert batch.rows is None and batch.targets is None
