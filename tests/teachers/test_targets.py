"""Each teacher's target equals an independent computation from the underlying transformers model's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import teachers

ATOL = 1e-5
RTOL = 1e-5


def _reference_depth_pixels(image: Image.Image, size: int, bgr: bool = False) -> torch.Tensor:
    """METHOD.md's order: PIL bicubic resize to size x size, /255, (channel swap), ImageNet mean/std, in float64."""
    pixels = torch.from_numpy(np.array(image.resize((size, size), Image.Resampling.BICUBIC))).double() / 255.0
    if bgr:
        pixels = pixels.flip(-1)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    return ((pixels - mean) / std).permute(2, 0, 1).float()


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 3), (2,)])
def test_depth_target_matches_backbone_feature_maps(teacher_dirs, images, layers):
    from transformers import DepthAnythingForDepthEstimation

    teacher = teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": layers})
    batch = teacher.preprocess(images)
    assert batch.dtype == torch.uint8 and batch.shape == (len(images), 3, 336, 336)
    # The CPU half ships uint8; the linear steps (run on the CPU here) give the reference's float32 bit for bit.
    pixels = teacher.preprocessor.normalize(batch)
    expected_pixels = torch.stack([_reference_depth_pixels(im, 336) for im in images])
    assert pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected_pixels, atol=0, rtol=0)

    # Independent route: the Dinov2 backbone's own feature maps are the final LayerNorm applied to each stage
    # (apply_layernorm=True, reshape_hidden_states=False in the checkpoint), stage k+1 being block k.
    model = DepthAnythingForDepthEstimation.from_pretrained(teacher_dirs["depth"]).eval()
    with torch.no_grad():
        feature_maps = model.backbone(expected_pixels).feature_maps
    expected = torch.stack([feature_maps[k][:, 1:] for k in layers]).mean(0)

    out = teacher(batch)
    assert out.shape == (len(images), 576, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert teacher.target_shape == (576, 32)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_depth_bgr_swaps_channels_before_normalising(teacher_dirs, images):
    teacher = teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]),
                               "layers": [0, 1, 2, 3], "channel_order": "bgr"})
    expected = torch.stack([_reference_depth_pixels(im, 336, bgr=True) for im in images[:2]])
    pixels = teacher.preprocessor.normalize(teacher.preprocess(images[:2]))
    torch.testing.assert_close(pixels, expected, atol=0, rtol=0)


def test_oneformer_target_matches_full_model_encoder_states(teacher_dirs, images):
    from transformers import OneFormerForUniversalSegmentation, OneFormerImageProcessorPil, OneFormerProcessor

    seg = teacher_dirs["seg"]
    teacher = teachers.create({"kind": "oneformer", "model": str(seg), "image_size": 256, "grid": 24})
    resized = [im.resize((256, 256), Image.Resampling.BICUBIC) for im in images]
    processor = OneFormerImageProcessorPil.from_pretrained(seg)
    expected_pixels = processor(resized, task_inputs=["panoptic"] * len(images), return_tensors="pt")["pixel_values"]
    batch = teacher.preprocess(images)
    assert batch.dtype == torch.uint8 and batch.shape == expected_pixels.shape
    torch.testing.assert_close(teacher.preprocessor.normalize(batch), expected_pixels, atol=0, rtol=0)

    # Independent route: the whole OneFormer model (text/task inputs included) returns the backbone's stages as
    # encoder_hidden_states; resize the last one and lay it out token-major by hand.
    model = OneFormerForUniversalSegmentation.from_pretrained(seg).eval()
    task_inputs = OneFormerProcessor.from_pretrained(seg)(
        images=resized, task_inputs=["panoptic"] * len(images), return_tensors="pt")["task_inputs"]
    with torch.no_grad():
        last = model(pixel_values=expected_pixels, task_inputs=task_inputs,
                     output_hidden_states=True).encoder_hidden_states[-1]
    resized_map = F.interpolate(last, size=(24, 24), mode="bilinear", align_corners=False)
    expected = resized_map.permute(0, 2, 3, 1).reshape(len(images), 24 * 24, -1)

    out = teacher(batch)
    assert out.shape == (len(images), 576, 128) and out.dtype == torch.float32
    assert teacher.target_shape == (576, 128)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    # Row-major: token r * 24 + c is grid cell (r, c).
    torch.testing.assert_close(out[:, 5 * 24 + 7], resized_map[:, :, 5, 7], atol=0, rtol=0)


def test_unclip_target_is_image_embeds(teacher_dirs, images):
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    gen = teacher_dirs["gen"]
    teacher = teachers.create({"kind": "unclip_image_encoder", "model": str(gen)})
    expected_pixels = CLIPImageProcessorPil.from_pretrained(gen / "feature_extractor")(
        images, return_tensors="pt")["pixel_values"]
    batch = teacher.preprocess(images)
    assert batch.dtype == torch.uint8 and batch.shape == expected_pixels.shape
    torch.testing.assert_close(teacher.preprocessor.normalize(batch), expected_pixels, atol=0, rtol=0)

    model = CLIPVisionModelWithProjection.from_pretrained(gen / "image_encoder").eval()
    with torch.no_grad():
        expected = model(pixel_values=expected_pixels).image_embeds[:, None, :]
    out = teacher(batch)
    assert out.shape == (len(images), 1, model.config.projection_dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["depth", "seg", "gen"])
def test_batch_equals_single_images(demo_teachers, images, name):
    teacher = demo_teachers[name]
    batch = teacher(teacher.preprocess(images))
    singles = torch.cat([teacher(teacher.preprocess([image])) for image in images])
    assert batch.shape == (len(images), *teacher.target_shape)
    torch.testing.assert_close(batch, singles, atol=ATOL, rtol=RTOL)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("name", ["depth", "seg", "gen"])
def test_repeated_calls_are_identical(demo_teachers, images, name):
    teacher = demo_teachers[name]
    batch = teacher.preprocess(images[:3])
    torch.testing.assert_close(teacher(batch), teacher(batch), atol=0, rtol=0)


def test_reduced_compute_dtype_still_returns_float32(teacher_dirs, images):
    spec = {"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0, 1, 2, 3]}
    full = teachers.create(spec)
    half = teachers.create({**spec, "compute_dtype": "bfloat16"})
    assert next(half.parameters()).dtype == torch.bfloat16
    out = half(half.preprocess(images[:2]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, full(full.preprocess(images[:2])), atol=0.1, rtol=0.1)
