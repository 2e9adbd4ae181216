"""Teacher specs: everything that decides a teacher's output, validated strictly.

A spec is a frozen pydantic model. Every field except the scheduling ones (`batch_size`, `num_gpus`) goes into the
teacher fingerprint, so two specs that could produce different targets never share one. Adding a teacher family
means adding its spec class here, listing it in `TeacherSpec`, and registering its `Teacher` class with
`@teachers.register("<kind>")`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields that only decide how the work is scheduled; the targets do not depend on them.
SCHEDULING_FIELDS: frozenset[str] = frozenset({"batch_size", "num_gpus"})

StorageDType = Literal["float16", "bfloat16"]
ComputeDType = Literal["float32", "float16", "bfloat16"]
ProcessorBackend = Literal["pil", "torchvision"]


class TeacherSpecBase(BaseModel):
    """Fields shared by every teacher family.

    `model` is a hub repo id (`org/name`) or a local directory written by `save_pretrained`; `revision` pins a hub
    commit, branch or tag and must stay unset for local directories.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    kind: str
    model: str = Field(min_length=1)
    revision: str | None = None
    storage_dtype: StorageDType = "float16"
    compute_dtype: ComputeDType = "float32"
    batch_size: int = Field(default=8, gt=0)
    num_gpus: float = Field(default=0.0, ge=0.0)

    def fingerprint_payload(self) -> dict[str, Any]:
        """The spec as JSON-able data, without the scheduling fields."""
        return self.model_dump(mode="json", exclude=set(SCHEDULING_FIELDS))

    def canonical_json(self) -> str:
        """Key-sorted, whitespace-free JSON of `fingerprint_payload()`, stable across runs and machines."""
        return json.dumps(self.fingerprint_payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class DepthAnythingSpec(TeacherSpecBase):
    """Depth Anything V2 backbone tokens: mean over `layers` of LayerNorm(block output), prefix tokens dropped.

    `layers` are 0-indexed transformer blocks (block i is hidden_states[i + 1]); they are stored sorted since the
    mean does not depend on their order. `channel_order: bgr` reproduces the reference's swapped colour channels.
    """

    kind: Literal["depth_anything_v2"] = "depth_anything_v2"
    model: str = Field(default="depth-anything/Depth-Anything-V2-Large-hf", min_length=1)
    image_size: int = Field(default=336, gt=0)
    layers: tuple[int, ...] = (4, 11, 17, 23)
    channel_order: Literal["rgb", "bgr"] = "rgb"

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("needs at least one block index, e.g. [4, 11, 17, 23]")
        if any(i < 0 for i in layers):
            raise ValueError(f"block indices are 0-indexed and must be >= 0, got {list(layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"block indices must be unique, got {list(layers)}")
        return tuple(sorted(layers))


class OneFormerSpec(TeacherSpecBase):
    """OneFormer Swin backbone: last feature map, bilinearly resized to `grid` x `grid`, flattened row-major.

    Images are first resized to `image_size` x `image_size` (PIL bicubic), then go through the repo's own OneFormer
    image processor. `processor_backend: pil` is the numpy/PIL processor the reference used; `torchvision` is the
    transformers 5 default and differs from it in the last bits.
    """

    kind: Literal["oneformer"] = "oneformer"
    model: str = Field(default="shi-labs/oneformer_coco_swin_large", min_length=1)
    image_size: int = Field(default=768, gt=0)
    grid: int = Field(default=24, gt=0)
    processor_backend: ProcessorBackend = "pil"


class UnclipImageEncoderSpec(TeacherSpecBase):
    """The CLIP image encoder of a diffusers unCLIP pipeline: `image_embeds`, one token of `projection_dim`.

    Only the `image_encoder` and `feature_extractor` subfolders of the pipeline are read.
    """

    kind: Literal["unclip_image_encoder"] = "unclip_image_encoder"
    model: str = Field(default="stabilityai/stable-diffusion-2-1-unclip", min_length=1)
    image_encoder_subfolder: str = "image_encoder"
    feature_extractor_subfolder: str = "feature_extractor"
    processor_backend: ProcessorBackend = "pil"


TeacherSpec = Annotated[
    Union[DepthAnythingSpec, OneFormerSpec, UnclipImageEncoderSpec],
    Field(discriminator="kind"),
]
"""Any teacher spec; pydantic picks the class from `kind`."""

SPEC_CLASSES: tuple[type[TeacherSpecBase], ...] = (DepthAnythingSpec, OneFormerSpec, UnclipImageEncoderSpec)
