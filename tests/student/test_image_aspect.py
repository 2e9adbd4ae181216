"""The student's pixels as the reference makes them: the numpy/PIL CLIP processor, and `pad` for VPT and IFT."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.data.loader import Sample
from student.data import SampleEncoder, expand_to_square
from student.loading import load_image_processor


def _vision_dir(demo_dir):
    return str(demo_dir / "assets" / "student" / "vision")


def test_the_student_image_processor_is_the_numpy_pil_one(demo_dir):
    processor = load_image_processor(_vision_dir(demo_dir))
    assert type(processor).__name__ == "CLIPImageProcessorPil"


def test_pad_centres_the_whole_image_on_the_processors_mean_colour(demo_dir, tokenizer):
    processor = load_image_processor(_vision_dir(demo_dir))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    square = expand_to_square(wide, processor.image_mean)
    assert square.size == (300, 300)
    fill = tuple(int(x * 255) for x in processor.image_mean)
    assert square.getpixel((0, 0)) == fill and square.getpixel((299, 299)) == fill
    assert np.array_equal(np.asarray(square)[100:200], np.asarray(wide))

    sample = Sample(row=0, key="wide", image=wide, caption="a wide picture", conversations=None, targets={}, valid={},
                    decoded_bytes=0)
    padded = SampleEncoder(processor, tokenizer, 64, image_aspect_ratio="pad")(sample).pixel_values
    cropped = SampleEncoder(processor, tokenizer, 64)(sample).pixel_values
    assert torch.equal(padded, processor(images=square, return_tensors="pt")["pixel_values"][0])
    # The mean colour normalises to (almost) zero: the top band is padding, and a centre crop would have no band.
    assert padded[:, :20].abs().max() < 0.02
    assert cropped[:, :20].abs().max() > 0.5


def test_a_text_only_sample_gets_zero_pixels_of_the_processors_size(demo_dir, tokenizer):
    processor = load_image_processor(_vision_dir(demo_dir))
    sample = Sample(row=3, key="chat", image=None, caption=None, targets={}, valid={}, decoded_bytes=0,
                    conversations=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a cat"}])
    encoded = SampleEncoder(processor, tokenizer, 64, image_aspect_ratio="pad")(sample)
    assert encoded.has_image is False
    assert encoded.pixel_values.shape == (3, 336, 336) and not encoded.pixel_values.any()
