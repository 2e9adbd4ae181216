"""The depth and seg decoders are the teachers' own heads: fed the real intermediate features they reproduce the
full models' outputs, and an embedding of the stored target's shape decodes into a picture of the image's size.

The full models are loaded here independently of the decoders, from the same tiny demo checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import teachers
from teachers.decoding import DepthMap, PanopticMasks, TargetDecoder

# The tiny random heads give depths around 1e-7, so the depth tolerance is relative to the output's scale.
RTOL = 1e-5


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, "the full model's output is all zero: the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


@pytest.fixture(scope="module")
def depth_teacher(demo_teachers):
    return demo_teachers["depth"]


@pytest.fixture(scope="module")
def seg_teacher(demo_teachers):
    return demo_teachers["seg"]


@pytest.fixture(scope="module")
def depth_decoder(depth_teacher):
    return depth_teacher.decoder()


@pytest.fixture(scope="module")
def seg_decoder(seg_teacher):
    return seg_teacher.decoder()


@pytest.fixture(scope="module")
def full_depth(teacher_dirs):
    from transformers import DepthAnythingForDepthEstimation

    return DepthAnythingForDepthEstimation.from_pretrained(teacher_dirs["depth"], use_safetensors=True).eval()


@pytest.fixture(scope="module")
def full_seg(teacher_dirs):
    from transformers import OneFormerForUniversalSegmentation, OneFormerProcessor

    model = OneFormerForUniversalSegmentation.from_pretrained(teacher_dirs["seg"], use_safetensors=True).eval()
    return model, OneFormerProcessor.from_pretrained(teacher_dirs["seg"])


def _pixel_values(teacher, image) -> torch.Tensor:
    return teacher.normalize(teacher.preprocess([image]))


# ---- depth ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3])
def test_depth_decoder_fed_the_backbone_layers_gives_the_full_models_depth(depth_teacher, depth_decoder,
                                                                           full_depth, images, index):
    pixel_values = _pixel_values(depth_teacher, images[index])
    with torch.no_grad():
        expected = full_depth(pixel_values).predicted_depth
        feature_maps = full_depth.backbone(pixel_values).feature_maps
    assert len(feature_maps) == depth_decoder.num_inputs
    _assert_close_scaled(depth_decoder.predict(feature_maps), expected)


def test_depth_decoder_ignores_the_cls_token_it_supplies(depth_teacher, depth_decoder, full_depth, images):
    # decode() puts a zero [CLS] before the embedding's tokens; that is only sound if the neck never reads it.
    with torch.no_grad():
        feature_maps = full_depth.backbone(_pixel_values(depth_teacher, images[1])).feature_maps
    other_cls = [torch.cat([torch.randn_like(m[:, :1]) * 5, m[:, 1:]], dim=1) for m in feature_maps]
    torch.testing.assert_close(depth_decoder.predict(other_cls), depth_decoder.predict(feature_maps), rtol=0, atol=0)


@pytest.mark.parametrize("index", [0, 3, 4])
def test_depth_embeddings_of_the_target_shape_decode_to_a_depth_map_of_the_image(depth_teacher, depth_decoder,
                                                                                images, index):
    image = images[index]
    target = depth_teacher(depth_teacher.preprocess([image]))[0]
    random = torch.randn(depth_teacher.target_shape, generator=torch.Generator().manual_seed(index))
    for embedding in (target, random):
        decoded = depth_decoder.decode(image, embedding)
        assert isinstance(decoded, DepthMap)
        assert decoded.depth.shape == (image.height, image.width) and decoded.depth.dtype == np.float32
        assert np.isfinite(decoded.depth).all()
    assert isinstance(depth_decoder, TargetDecoder) and depth_decoder.what == "depth map"


def test_depth_decoder_refuses_another_shape(depth_decoder, images):
    with pytest.raises(ValueError, match=r"expected \[576, 32\]"):
        depth_decoder.decode(images[0], torch.zeros(577, 32))


# ---- seg --------------------------------------------------------------------------------------------------------


def _full_seg_outputs(full_seg, pixel_values):
    model, processor = full_seg
    task_inputs = processor(images=[np.zeros((16, 16, 3), np.uint8)], task_inputs=["panoptic"],
                            return_tensors="pt")["task_inputs"]
    with torch.no_grad():
        out = model(pixel_values=pixel_values, task_inputs=task_inputs)
        last_map = model.model.pixel_level_module.encoder(pixel_values).feature_maps[-1]
    return out, last_map


@pytest.mark.parametrize("index", [0, 3])
def test_seg_decoder_fed_the_real_last_map_gives_the_full_models_logits(seg_teacher, seg_decoder, full_seg,
                                                                        images, index):
    pixel_values = _pixel_values(seg_teacher, images[index])
    expected, last_map = _full_seg_outputs(full_seg, pixel_values)
    class_logits, mask_logits = seg_decoder.predict(pixel_values, last_map)
    torch.testing.assert_close(class_logits, expected.class_queries_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_logits, expected.masks_queries_logits, rtol=1e-5, atol=1e-5)
    # The map given really replaces the backbone's: another one changes the masks.
    _, other_masks = seg_decoder.predict(pixel_values, torch.zeros_like(last_map))
    assert not torch.allclose(other_masks, expected.masks_queries_logits, rtol=1e-3, atol=1e-3)


def test_seg_target_at_the_native_grid_decodes_to_the_full_models_logits(teacher_dirs, full_seg, images):
    # With `grid` equal to the backbone's own 8 x 8 map the target is that map, flattened: unflattening it through
    # the decoder must give the full model's logits, which pins down the row-major token layout.
    teacher = teachers.create({"kind": "oneformer", "model": str(teacher_dirs["seg"]), "image_size": 256, "grid": 8})
    decoder = teacher.decoder()
    image = images[3]
    pixel_values = _pixel_values(teacher, image)
    expected, last_map = _full_seg_outputs(full_seg, pixel_values)
    target = teacher(teacher.preprocess([image]))[0]
    grid_map = decoder.grid_map(target)
    torch.testing.assert_close(grid_map, last_map, rtol=1e-6, atol=1e-6)
    class_logits, mask_logits = decoder.predict(decoder.pixel_values(image), grid_map)
    torch.testing.assert_close(class_logits, expected.class_queries_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_logits, expected.masks_queries_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 3, 4])
def test_seg_embeddings_of_the_target_shape_decode_to_panoptic_masks_of_the_image(seg_teacher, seg_decoder,
                                                                                 images, index, monkeypatch):
    image = images[index]
    target = seg_teacher(seg_teacher.preprocess([image]))[0]
    random = torch.randn(seg_teacher.target_shape, generator=torch.Generator().manual_seed(index))
    for embedding in (target, random):
        decoded = seg_decoder.decode(image, embedding)
        assert isinstance(decoded, PanopticMasks)
        assert decoded.segmentation.shape == (image.height, image.width)
        assert decoded.segmentation.dtype == np.int32
    # The random tiny heads are never confident enough for the default thresholds; at zero they keep segments,
    # which shows ids and class names come through.
    for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
        monkeypatch.setattr(seg_decoder, name, 0.0)
    decoded = seg_decoder.decode(image, random)
    assert decoded.segments, "no segment even at zero thresholds"
    assert {s.id for s in decoded.segments} == set(np.unique(decoded.segmentation).tolist()) - {0, -1}
    assert {s.label for s in decoded.segments} <= {"person", "cat", "sky", "wall"}
    assert seg_decoder.settings()["task"] == "panoptic" and seg_decoder.what == "panoptic masks"


def test_seg_decoder_refuses_another_shape(seg_decoder, images):
    with pytest.raises(ValueError, match=r"expected \[576, 128\]"):
        seg_decoder.decode(images[0], torch.zeros(576, 64))


# ---- generic kinds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["timm", "hf_vision"])
def test_generic_kinds_have_no_decoder(tiny_spec, kind):
    assert teachers.create(tiny_spec(kind)).decoder() is None
