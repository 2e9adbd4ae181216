"""Teacher specs: everything that decides a teacher's output, validated strictly.

A spec is a frozen pydantic model. Every field except the non-output ones (`batch_size`, `num_gpus`,
`target_shape`) goes into the teacher fingerprint, so two specs that could produce different targets never share
one. This module holds what every family shares: `TeacherSpecBase` and the field types several families use. A
family's own spec class lives in its module (teachers/kinds/<family>.py, or a plugin's module), subclasses
`TeacherSpecBase` with a `kind: Literal[...]` field and is the `spec_cls` of its `Teacher`, registered with
`@teachers.register("<kind>")`; the registry finds it from there.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.store import Storage

# Fields the targets do not depend on: how the work is scheduled, and `target_shape`, which only declares what the
# model must produce (a check, so that adding or removing it never changes a fingerprint or strands a store).
NON_OUTPUT_FIELDS: frozenset[str] = frozenset({"batch_size", "num_gpus", "target_shape"})

StorageDType = Literal["float16", "bfloat16"]
ComputeDType = Literal["float32", "float16", "bfloat16"]
ProcessorBackend = Literal["pil", "torchvision"]
# What to do with the tokens a ViT puts before its patch tokens ([CLS], registers, distillation token).
PrefixTokens = Literal["drop", "keep", "cls"]


class TeacherSpecBase(BaseModel):
    """Fields shared by every teacher family.

    `model` is a hub repo id (`org/name`) or a local directory written by `save_pretrained`; `revision` pins a hub
    commit, branch or tag and must stay unset for local directories. `target_shape: [T, C]` optionally declares
    the per-image target shape: `teachers.create` refuses a model that gives another one, and `pipeline teachers
    show` can print it without the weights. It is not part of the fingerprint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    kind: str
    model: str = Field(min_length=1)
    revision: str | None = None
    storage_dtype: StorageDType = "float16"
    # Opt-in compact storage (see pipeline/data/store.py): int8 codes with per-token scales, and/or p x p pooling of a
    # square token grid. Like storage_dtype they change the stored targets, so they are part of the fingerprint.
    quantize: Literal["none", "int8"] = "none"
    pool: int = Field(default=1, ge=1)
    compute_dtype: ComputeDType = "float32"
    # TF32 (10-bit mantissa) for float32 matmuls and convolutions: faster on CUDA GPUs from Ampere on, and it changes
    # the targets there, so it is part of the fingerprint. It has an effect on CUDA devices only: elsewhere there is
    # no TF32.
    tf32: bool = False
    batch_size: int = Field(default=8, gt=0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    target_shape: tuple[int, int] | None = None

    @field_validator("target_shape")
    @classmethod
    def _check_target_shape(cls, shape: tuple[int, int] | None) -> tuple[int, int] | None:
        if shape is not None and min(shape) <= 0:
            raise ValueError(f"must be two positive sizes [tokens, channels], got {list(shape)}")
        return shape

    @model_validator(mode="after")
    def _check_tf32(self) -> TeacherSpecBase:
        if self.tf32 and self.compute_dtype != "float32":
            raise ValueError(f"tf32: true only changes float32 compute, but compute_dtype is {self.compute_dtype}; "
                             f"set compute_dtype: float32 or drop tf32")
        return self

    def storage(self) -> Storage:
        """How the store keeps this teacher's targets (dtype, int8, pooling)."""
        return Storage(dtype=self.storage_dtype, quantize=self.quantize, pool=self.pool)

    def fingerprint_payload(self) -> dict[str, Any]:
        """The spec as JSON-able data, without the non-output fields."""
        return self.model_dump(mode="json", exclude=set(NON_OUTPUT_FIELDS))

    def canonical_json(self) -> str:
        """Key-sorted, whitespace-free JSON of `fingerprint_payload()`, stable across runs and machines."""
        return json.dumps(self.fingerprint_payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
