"""The registry: dispatch on kind, helpful errors, duplicate warnings, and the contract every registered kind keeps.

The contract tests run over `teachers.known_kinds()`, each kind built from the tiny random-init checkpoint that
tests/teachers/conftest.py (TINY_CHECKPOINTS) writes for it: a kind registered without one fails here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pytest
import torch

import teachers
from pipeline.data.errors import UsageError
from pipeline.data.store import TargetStore
from teachers import registry
from teachers.describe import describe_teacher
from teachers.kinds.depth_anything import DepthAnythingSpec
from tests.teachers.conftest import TINY_CHECKPOINTS

KINDS = teachers.known_kinds()
# Fields every kind has that change the targets, and so the fingerprint; and fields that must not.
COMMON_OUTPUT_CHANGES = [{"storage_dtype": "bfloat16"}, {"quantize": "int8"}, {"pool": 2},
                         {"compute_dtype": "bfloat16"}, {"tf32": True}]
SCHEDULING_CHANGES = [{"batch_size": 3}, {"num_gpus": 0.5}]
STORAGES = [{}, {"storage_dtype": "bfloat16"}, {"quantize": "int8"}, {"pool": 2}, {"quantize": "int8", "pool": 2}]


def test_known_kinds_are_sorted_and_cover_the_families():
    assert teachers.known_kinds() == ["depth_anything_v2", "hf_vision", "oneformer", "timm", "unclip_image_encoder"]
    # Every registered kind can be named in a manifest: the registry validates specs with the kind's spec_cls.
    for kind in teachers.known_kinds():
        model = "hf-hub:org/name" if kind == "timm" else "org/name"
        manifest = teachers.TeacherManifest.model_validate({"teachers": {"t": {"kind": kind, "model": model}}})
        spec = manifest.teachers["t"]
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
    spec = DepthAnythingSpec(model=str(teacher_dirs["depth"]), layers=[0])
    with pytest.raises(TypeError, match="OneFormerSpec"):
        teachers.get_teacher_class("oneformer").from_spec(spec)


# ---- the contract of every registered kind ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(tiny_spec):
    """kind -> its teacher built from the tiny checkpoint, once per kind."""
    built = {}

    def get(kind: str) -> teachers.Teacher:
        if kind not in built:
            built[kind] = teachers.create(tiny_spec(kind))
        return built[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_from_its_tiny_checkpoint_to_its_declared_shape(tiny_spec, tiny_teacher, images, kind):
    teacher = tiny_teacher(kind)
    assert isinstance(teacher, teachers.Teacher) and teacher.kind == kind == teacher.spec.kind
    out = teacher(teacher.preprocess(images[:2]))
    assert out.shape == (2, *teacher.target_shape) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # A declared target_shape is checked against the model: its own builds, any other is refused.
    tokens, channels = teacher.target_shape
    declared = teachers.create({**tiny_spec(kind), "target_shape": [tokens, channels]})
    assert declared.target_shape == teacher.target_shape
    with pytest.raises(teachers.TargetShapeMismatch):
        teachers.create({**tiny_spec(kind), "target_shape": [tokens, channels + 1]})


@pytest.mark.parametrize("kind", KINDS)
def test_teachers_are_frozen(tiny_teacher, images, kind):
    teacher = tiny_teacher(kind)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a no-op: teachers have no training mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    with pytest.raises(Exception):
        teacher.spec.batch_size = 1  # specs are frozen
    out = teacher(teacher.preprocess(images[:2]))
    assert out.shape == (2, *teacher.target_shape) and out.dtype == torch.float32
    assert not out.requires_grad and not out.is_inference()


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_is_stable_and_follows_the_output_fields(tiny_spec, tiny_teacher, kind):
    teacher, spec = tiny_teacher(kind), tiny_spec(kind)
    assert len(teacher.fingerprint) == 64
    assert teachers.create(spec).fingerprint == teacher.fingerprint == teachers.spec_fingerprint(spec)
    for change in [*SCHEDULING_CHANGES, {"target_shape": list(teacher.target_shape)}]:
        assert teachers.spec_fingerprint({**spec, **change}) == teacher.fingerprint, change
    own = TINY_CHECKPOINTS[kind].own_change
    assert own and not set(own) & set(teachers.TeacherSpecBase.model_fields), (
        f"TINY_CHECKPOINTS[{kind!r}].own_change must change a field {kind} adds to TeacherSpecBase")
    for change in [own, *COMMON_OUTPUT_CHANGES]:
        assert teachers.spec_fingerprint({**spec, **change}) != teacher.fingerprint, change


@pytest.mark.parametrize("kind", KINDS)
def test_describe_reports_the_bytes_per_row_the_store_writes(tiny_spec, tiny_teacher, images, tmp_path, kind):
    teacher = tiny_teacher(kind)
    targets = teacher(teacher.preprocess(images[:2])).numpy()
    store = TargetStore(str(tmp_path / "store"))
    store.create(pa.table({"row": [0, 1], "target_row": [0, 1]}), "0" * 64, rows_per_block=2)
    for number, storage_fields in enumerate(STORAGES):
        # Loaded once (the shape from the model); the other storages are described from the declared shape.
        spec = teachers.to_spec({**tiny_spec(kind), **storage_fields, "target_shape": list(teacher.target_shape)})
        report = describe_teacher("t", spec, load=not storage_fields)
        assert report.target_shape == list(teacher.target_shape) and not report.problems[1:]
        try:
            spec.storage().stored_shape(*teacher.target_shape)
        except UsageError:  # pooling a shape that has no square grid: reported, not raised
            assert report.bytes_per_row is None and report.problems[0].startswith("teachers.t.pool: pool 2 needs")
            continue
        assert not report.problems
        name = f"t{number}"
        store.add_teacher(name, spec=report.spec, fingerprint=report.fingerprint, target_shape=teacher.target_shape,
                          storage=spec.storage())
        store.write_block(name, store.blocks()[0], targets, np.ones(2, dtype=np.uint8))
        group = store.group[name]
        written = sum(group[array][:].nbytes for array in ("target", "scale") if array in group)
        assert report.bytes_per_row * len(targets) == written, storage_fields


@pytest.mark.parametrize("kind", KINDS)
def test_preprocess_rejects_non_rgb_and_empty_input(tiny_teacher, images, kind):
    teacher = tiny_teacher(kind)
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
