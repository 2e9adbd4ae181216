"""Frozen teachers whose outputs become distillation targets, and the registry that builds them from specs.

    import teachers
    manifest = teachers.load_manifest("manifests/teachers/demo.yaml")
    t = teachers.create(manifest.teachers["depth"], device="cpu")
    out = t(t.preprocess(images))          # [B, *t.target_shape] float32 on CPU
"""

from teachers.base import TargetShapeMismatch, Teacher, WeightFiles, fingerprint_of, locate_weights
from teachers.manifest import ManifestError, TeacherManifest, load_manifest
from teachers.registry import (
    UnknownTeacherKind,
    create,
    get_teacher_class,
    known_kinds,
    register,
    spec_fingerprint,
    to_spec,
)
from teachers.spec import NON_OUTPUT_FIELDS, TeacherSpecBase

# Imports (and so registers) every family in teachers/kinds/; a family's spec class is reached through the
# registry (`get_teacher_class(kind).spec_cls`) or its own module, so nothing here lists the kinds.
from teachers import kinds  # noqa: F401  isort: skip

__all__ = [
    "NON_OUTPUT_FIELDS",
    "ManifestError",
    "TargetShapeMismatch",
    "Teacher",
    "TeacherManifest",
    "TeacherSpecBase",
    "UnknownTeacherKind",
    "WeightFiles",
    "create",
    "fingerprint_of",
    "get_teacher_class",
    "known_kinds",
    "load_manifest",
    "locate_weights",
    "register",
    "spec_fingerprint",
    "to_spec",
]
