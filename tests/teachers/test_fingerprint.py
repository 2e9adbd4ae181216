"""Fingerprints: change with anything that changes the targets, not with scheduling or where the files live."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import teachers
from teachers.kinds.oneformer import OneFormerSpec


def _depth(path, **overrides):
    return teachers.create({"kind": "depth_anything_v2", "model": str(path), "layers": [0, 1, 2, 3], **overrides})


def test_fingerprint_is_stable_sha256(teacher_dirs):
    first, second = _depth(teacher_dirs["depth"]), _depth(teacher_dirs["depth"])
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0
    assert "model.safetensors" in first.weight_files and "config.json" in first.weight_files


def test_scheduling_fields_do_not_change_it(teacher_dirs):
    base = _depth(teacher_dirs["depth"]).fingerprint
    assert _depth(teacher_dirs["depth"], batch_size=1).fingerprint == base
    assert _depth(teacher_dirs["depth"], num_gpus=0.25).fingerprint == base


@pytest.mark.parametrize(
    "overrides",
    [{"layers": [0, 1, 2]}, {"channel_order": "bgr"}, {"image_size": 280}, {"storage_dtype": "bfloat16"},
     {"compute_dtype": "bfloat16"}],
)
def test_output_fields_change_it(teacher_dirs, overrides):
    assert _depth(teacher_dirs["depth"], **overrides).fingerprint != _depth(teacher_dirs["depth"]).fingerprint


def test_weights_change_it_but_the_directory_name_does_not(teacher_dirs, images, tmp_path):
    teacher = _depth(teacher_dirs["depth"])
    original = teacher.fingerprint
    copy = shutil.copytree(teacher_dirs["depth"], tmp_path / "elsewhere")
    assert _depth(copy).fingerprint == original

    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    # Not a key bias: softmax ignores those, and the check below needs a change that reaches the output. Scaled,
    # not shifted: fc1 reads a LayerNorm output that sums to ~0 over channels, which cancels a uniform shift.
    name = next(k for k in sorted(tensors) if k.startswith("backbone.encoder") and k.endswith("fc1.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = _depth(copy)
    assert changed.fingerprint != original
    # The changed file is the one the teacher really loads.
    batch = teacher.preprocess(images[:1])
    assert not torch.allclose(changed(batch), teacher(batch))


@pytest.mark.parametrize("name", ["seg", "gen"])
def test_other_families_fingerprint_their_weights(demo_teachers, teacher_dirs, tmp_path, name):
    teacher = demo_teachers[name]
    copy = shutil.copytree(teacher_dirs[name], tmp_path / name)
    spec = teacher.spec.model_copy(update={"model": str(copy)})
    assert teachers.create(spec).fingerprint == teacher.fingerprint
    weights = copy / next(f for f in teacher.weight_files if f.endswith(".safetensors"))
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert teachers.create(spec).fingerprint != teacher.fingerprint


def test_spec_json_excludes_scheduling_fields():
    spec = OneFormerSpec(batch_size=3, num_gpus=0.5)
    assert "batch_size" not in spec.canonical_json() and "num_gpus" not in spec.canonical_json()
    assert spec.canonical_json() == OneFormerSpec().canonical_json()


@pytest.mark.parametrize("name", ["depth", "seg", "gen"])
def test_spec_fingerprint_matches_the_loaded_teacher_without_loading(demo_manifest, demo_teachers, name):
    spec = demo_manifest.teachers[name]
    assert teachers.spec_fingerprint(spec) == demo_teachers[name].fingerprint
    assert teachers.spec_fingerprint(spec.model_dump()) == demo_teachers[name].fingerprint
