"""The paper's three teachers at full size: real architectures and hyperparameters, random weights, no download.

Each test writes the hub checkpoint's architecture with random bfloat16 weights (`tests/teachers/full_size.py`),
loads it through the real teacher code path with the olavlm.yaml spec (only `model` points elsewhere), runs one
photo through the uint8 + device-normalisation path, checks the paper's target shape, and checks the targets
equal those of the old CPU float32 pixel_values path (`legacy_preprocess.py`) on the same weights.

Measured alone on 2 CPU cores (AMD EPYC, another test suite running beside it), wall time / peak RSS of the
whole pytest process, before the old-path comparison was added: depth 19 s / 2.9 GB, seg 30 s / 2.5 GB, gen 23 s /
4.6 GB (of which about 1.3 GB is the memory-mapped bfloat16 checkpoint being read into float32). Every test
deletes its checkpoint and its teacher when done.
"""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

import teachers
from tests.teachers.full_size import (
    olavlm_spec,
    write_depth_anything_v2_large,
    write_oneformer_coco_swin_large,
    write_unclip_image_encoder_vit_h,
)
from tests.teachers.legacy_preprocess import legacy_targets, relative_l2

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A folder for one full-size checkpoint, removed (with its GBs) as soon as the test ends."""
    path = tmp_path / "checkpoint"
    yield path
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()


def _run_one(spec, image) -> tuple[teachers.Teacher, torch.Tensor]:
    """The teacher built from `spec`, and its targets for `image` through the uint8 + device-normalisation path,
    checked against the old float32 pixel_values path on the same weights (relative L2 <= 1e-3; identical
    pixel_values make them equal in practice). One photo: every forward of these models costs seconds, and the
    pixel equality over aspect ratios is the tiny teachers' test (tests/teachers/test_split_preprocess.py)."""
    teacher = teachers.create(spec)  # checks the manifest's declared target_shape against the model
    batch = teacher.preprocess([image])
    assert batch.dtype == torch.uint8
    out = teacher(batch)
    assert relative_l2(out, legacy_targets(teacher, [image])) <= 1e-3
    return teacher, out


def test_depth_anything_v2_large(checkpoint_dir, images):
    """Depth-Anything-V2-Large: DINOv2-L/14 backbone (hidden 1024, 24 layers, 16 heads) and its DPT head."""
    write_depth_anything_v2_large(checkpoint_dir)

    teacher, out = _run_one(olavlm_spec("depth", checkpoint_dir), images[1])
    assert teacher.target_shape == (576, 1024) and out.shape == (1, 576, 1024)
    assert torch.isfinite(out).all()
    assert len(teacher.backbone.encoder.layer) == 24
    # DINOv2 ViT-L/14 with its 518 px (37x37) position table: 304.4M parameters, the DPT head discarded.
    assert 300e6 < sum(p.numel() for p in teacher.parameters()) < 310e6


def test_oneformer_coco_swin_large(checkpoint_dir, images):
    """OneFormer COCO Swin-L, the full model (pixel decoder, transformer decoder, text encoder included). The
    768 px input becomes 800x800 in the processor, so Swin-L's last stage is 25x25 before the 24x24 resize."""
    write_oneformer_coco_swin_large(checkpoint_dir)

    teacher, out = _run_one(olavlm_spec("seg", checkpoint_dir), images[1])
    assert teacher.target_shape == (576, 1536) and out.shape == (1, 576, 1536)
    assert torch.isfinite(out).all()
    assert list(teacher.encoder.channels) == [192, 384, 768, 1536]
    # Swin-L: 195-197M parameters in the kept backbone.
    assert 190e6 < sum(p.numel() for p in teacher.parameters()) < 200e6
    # The CPU half gives 768 px; the processor's 768 -> 800 resize runs where the teacher computes.
    pixels = teacher.preprocess([images[1]])
    assert pixels.shape == (1, 3, 768, 768) and teacher.normalize(pixels).shape == (1, 3, 800, 800)


def test_unclip_image_encoder_vit_h(checkpoint_dir, images):
    """SD 2.1 unCLIP's image encoder: CLIP ViT-H/14 with projection (hidden 1280, 32 layers, 632M parameters)."""
    write_unclip_image_encoder_vit_h(checkpoint_dir)
    # What the real repo also holds; the teacher must neither read nor fingerprint it.
    (checkpoint_dir / "unet").mkdir()
    (checkpoint_dir / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")

    teacher, out = _run_one(olavlm_spec("gen", checkpoint_dir), images[1])
    assert teacher.target_shape == (1, 1024) and out.shape == (1, 1, 1024)
    assert torch.isfinite(out).all()
    assert 630e6 < sum(p.numel() for p in teacher.parameters()) < 635e6
    assert not any(f.startswith("unet/") for f in teacher.weight_files)
