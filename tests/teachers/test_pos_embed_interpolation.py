"""Depth teacher `pos_embed_interpolation`: the reference's DINOv2 resize of the position grid, checked against a
bicubic resampling written out here (PyTorch's kernel, A = -0.75, taps clamped at the border), not F.interpolate.

The tiny demo backbone has a 24 x 24 position grid, so at its own image_size (336) nothing is resized; at 280 the
grid goes to 20 x 20, as the hub models' 37 x 37 grid goes to 24 x 24 at 336.
"""

from __future__ import annotations

import math

import pytest
import torch

import teachers
from teachers.kinds.depth_anything import reference_position_embeddings
from tests.teachers.conftest import OLAVLM_MANIFEST

LAYERS = [0, 1, 2, 3]


def _depth(path, **overrides):
    return teachers.create({"kind": "depth_anything_v2", "model": str(path), "layers": LAYERS, **overrides})


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """[n_out, n_in] float64 weights of a 1-D bicubic resize whose output pixel i samples the input at
    (i + 0.5) / scale - 0.5 (half-pixel centres, align_corners=False); taps beyond the border repeat the edge."""
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        source = (i + 0.5) / scale - 0.5
        left = math.floor(source)
        for tap in range(-1, 3):
            weights[i, min(max(left + tap, 0), n_in - 1)] += _cubic(source - left - tap)
    return weights


def resize_grid(position_embeddings: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """[1, 1 + N*N, C] -> [1, 1 + grid*grid, C] float32: the patch grid resampled by `bicubic_matrix` along rows and
    columns, [CLS] kept."""
    native = math.isqrt(position_embeddings.shape[1] - 1)
    patch = position_embeddings[0, 1:].double().reshape(native, native, -1)
    weights = bicubic_matrix(native, grid, scale)
    resized = torch.einsum("ij,jkc,lk->ilc", weights, patch, weights).reshape(1, grid * grid, -1)
    return torch.cat([position_embeddings[:, :1].double(), resized], dim=1).float()


def targets_by_hand(teacher, images, position_embeddings: torch.Tensor) -> torch.Tensor:
    """The depth target of the definition, step by step on the teacher's own modules: patch embedding, [CLS], the
    given position embeddings, every block, the final LayerNorm on each chosen block, patch tokens, mean."""
    backbone = teacher.backbone
    pixels = teacher.normalize(teacher.preprocess(images))
    with torch.no_grad():
        patches = backbone.embeddings.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        cls = backbone.embeddings.cls_token.expand(len(images), -1, -1)
        hidden = torch.cat([cls, patches], dim=1) + position_embeddings
        outputs = []
        for block in backbone.encoder.layer:
            hidden = block(hidden)
            outputs.append(backbone.layernorm(hidden)[:, 1:])
        return torch.stack([outputs[i] for i in LAYERS]).mean(dim=0)


def test_reference_resize_of_the_hub_grid_is_the_offset_scale_factor():
    torch.manual_seed(0)
    hub_grid = torch.randn(1, 1 + 37 * 37, 8)
    resized = reference_position_embeddings(hub_grid, 24)
    assert resized.shape == (1, 1 + 24 * 24, 8)
    torch.testing.assert_close(resized, resize_grid(hub_grid, 24, (24 + 0.1) / 37), rtol=1e-5, atol=1e-5)
    # transformers' size=(24, 24) samples at 37/24 per cell instead of 37/24.1: up to 0.15 of a cell apart.
    assert not torch.allclose(resized, resize_grid(hub_grid, 24, 24 / 37), rtol=1e-3, atol=1e-3)
    assert reference_position_embeddings(hub_grid, 37) is hub_grid


def test_reference_mode_equals_the_definition_and_differs_from_transformers(teacher_dirs, images):
    reference = _depth(teacher_dirs["depth"], image_size=280, pos_embed_interpolation="reference")
    plain = _depth(teacher_dirs["depth"], image_size=280)
    native = _depth(teacher_dirs["depth"]).backbone.embeddings.position_embeddings.detach()
    assert native.shape[1] == 1 + 24 * 24

    got = {name: teacher(teacher.preprocess(images[:3])) for name, teacher in
           (("reference", reference), ("transformers", plain))}
    for name, scale in (("reference", (20 + 0.1) / 24), ("transformers", 20 / 24)):
        expected = targets_by_hand(plain, images[:3], resize_grid(native, 20, scale))
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    difference = torch.linalg.vector_norm(got["reference"] - got["transformers"])
    assert difference / torch.linalg.vector_norm(got["transformers"]) > 1e-3


def test_at_the_native_grid_both_modes_give_the_same_targets(teacher_dirs, images):
    batch = _depth(teacher_dirs["depth"]).preprocess(images[:2])
    assert torch.equal(_depth(teacher_dirs["depth"], pos_embed_interpolation="reference")(batch),
                       _depth(teacher_dirs["depth"])(batch))


def test_it_is_fingerprinted(teacher_dirs):
    default = _depth(teacher_dirs["depth"])
    assert '"pos_embed_interpolation":"transformers"' in default.spec.canonical_json()
    assert _depth(teacher_dirs["depth"], pos_embed_interpolation="transformers").fingerprint == default.fingerprint
    assert _depth(teacher_dirs["depth"], pos_embed_interpolation="reference").fingerprint != default.fingerprint
    with pytest.raises(Exception, match="pos_embed_interpolation"):
        teachers.to_spec({"kind": "depth_anything_v2", "model": "x", "pos_embed_interpolation": "nearest"})


def test_the_paper_manifest_uses_the_reference_resize():
    spec = teachers.load_manifest(OLAVLM_MANIFEST, environ={}).teachers["depth"]
    assert spec.pos_embed_interpolation == "reference"
