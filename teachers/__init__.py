"""Frozen teachers whose outputs become distillation targets, and the registry that builds them from specs.

    import teachers
    manifest = teachers.load_manifest("manifests/teachers/demo.yaml")
    t = teachers.create(manifest.teachers["depth"], device="cpu")
    out = t(t.preprocess(images))          # [B, *t.target_shape] float32 on CPU
"""

from teachers.base import TargetShapeMismatch, Teacher, WeightFiles, fingerprint_of, locate_weights
from teachers.manifest import ManifestError, TeacherManifest, expand_env, load_manifest, parse_manifest
from teachers.registry import (
    UnknownTeacherKind,
    create,
    get_teacher_class,
    known_kinds,
    register,
    spec_fingerprint,
    to_spec,
)
from teachers.spec import (
    NON_OUTPUT_FIELDS,
    SCHEDULING_FIELDS,
    DepthAnythingSpec,
    HfVisionSpec,
    OneFormerSpec,
    TeacherSpecBase,
    TimmSpec,
    UnclipImageEncoderSpec,
)

# Importing the family modules registers them.
from teachers import depth_anything, hf_vision, oneformer, timm_features, unclip  # noqa: E402,F401  isort: skip

__all__ = [
    "NON_OUTPUT_FIELDS",
    "SCHEDULING_FIELDS",
    "DepthAnythingSpec",
    "HfVisionSpec",
    "ManifestError",
    "OneFormerSpec",
    "TargetShapeMismatch",
    "Teacher",
    "TeacherManifest",
    "TeacherSpecBase",
    "TimmSpec",
    "UnclipImageEncoderSpec",
    "UnknownTeacherKind",
    "WeightFiles",
    "create",
    "expand_env",
    "fingerprint_of",
    "get_teacher_class",
    "known_kinds",
    "load_manifest",
    "locate_weights",
    "parse_manifest",
    "register",
    "spec_fingerprint",
    "to_spec",
]
