"""The registry: dispatch on kind, helpful errors, duplicate warnings, and the frozen-teacher contract per kind."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import teachers
from teachers import registry

KIND_TO_TEACHER = {"depth_anything_v2": "depth", "oneformer": "seg", "unclip_image_encoder": "gen"}


def test_known_kinds_are_sorted_and_cover_the_families():
    assert teachers.known_kinds() == ["depth_anything_v2", "hf_vision", "oneformer", "timm", "unclip_image_encoder"]
    # Every registered kind can be named in a manifest: the registry validates specs with the kind's spec_cls.
    for kind in teachers.known_kinds():
        model = "hf-hub:org/name" if kind == "timm" else "org/name"
        spec = teachers.parse_manifest({"teachers": {"t": {"kind": kind, "model": model}}}).teachers["t"]
        assert type(spec) is teachers.get_teacher_class(kind).spec_cls


@pytest.mark.parametrize("bad", [{"kind": "dino_v3", "model": "x/y"}, "dino_v3", {"model": "x/y"}])
def test_unknown_kind_lists_the_known_ones(bad):
    with pytest.raises(teachers.UnknownTeacherKind) as info:
        teachers.create(bad)
    for kind in teachers.known_kinds():
        assert kind in str(info.value)


def test_bare_kind_gives_the_paper_defaults():
    spec = teachers.to_spec("depth_anything_v2")
    assert spec.model == "depth-anything/Depth-Anything-V2-Large-hf"
    assert spec.layers == (4, 11, 17, 23) and spec.image_size == 336 and spec.channel_order == "rgb"
    seg = teachers.to_spec("oneformer")
    assert (seg.model, seg.image_size, seg.grid) == ("shi-labs/oneformer_coco_swin_large", 768, 24)
    assert teachers.to_spec("unclip_image_encoder").model == "stabilityai/stable-diffusion-2-1-unclip"


class _DummySpec(teachers.TeacherSpecBase):
    kind: Literal["_test_dummy"] = "_test_dummy"


def test_register_warns_on_duplicate_and_checks_the_spec_kind():
    class First(teachers.Teacher):
        spec_cls = _DummySpec

    class Second(teachers.Teacher):
        spec_cls = _DummySpec

    try:
        teachers.register("_test_dummy")(First)
        assert "_test_dummy" in teachers.known_kinds()
        with pytest.warns(UserWarning, match="_test_dummy"):
            teachers.register("_test_dummy")(Second)
        assert teachers.get_teacher_class("_test_dummy") is Second
        with pytest.raises(ValueError, match="spec_cls"):
            teachers.register("_other_kind")(First)
    finally:
        registry._TEACHERS.pop("_test_dummy", None)
    assert "_test_dummy" not in teachers.known_kinds()


def test_create_refuses_a_spec_of_the_wrong_class(teacher_dirs):
    spec = teachers.DepthAnythingSpec(model=str(teacher_dirs["depth"]), layers=[0])
    with pytest.raises(TypeError, match="OneFormerSpec"):
        teachers.get_teacher_class("oneformer").from_spec(spec)


@pytest.mark.parametrize("kind", sorted(KIND_TO_TEACHER))
def test_teachers_are_frozen(demo_teachers, images, kind):
    teacher = demo_teachers[KIND_TO_TEACHER[kind]]
    assert isinstance(teacher, teachers.Teacher) and teacher.kind == kind == teacher.spec.kind
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a no-op: teachers have no training mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    with pytest.raises(Exception):
        teacher.spec.batch_size = 1  # specs are frozen
    out = teacher(teacher.preprocess(images[:2]))
    assert out.shape == (2, *teacher.target_shape) and out.dtype == torch.float32
    assert not out.requires_grad and not out.is_inference()


@pytest.mark.parametrize("kind", sorted(KIND_TO_TEACHER))
def test_preprocess_rejects_non_rgb_and_empty_input(demo_teachers, images, kind):
    teacher = demo_teachers[KIND_TO_TEACHER[kind]]
    with pytest.raises(ValueError, match="RGB"):
        teacher.preprocess([images[0].convert("L")])
    with pytest.raises(ValueError, match="at least one"):
        teacher.preprocess([])


def test_layer_out_of_range_names_the_field(teacher_dirs):
    with pytest.raises(ValueError, match=r"spec\.layers.*0\.\.3"):
        teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [4, 11]})


def test_image_size_must_be_a_multiple_of_the_patch(teacher_dirs):
    with pytest.raises(ValueError, match=r"spec\.image_size"):
        teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0],
                         "image_size": 300})
