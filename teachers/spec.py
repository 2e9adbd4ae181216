"""Teacher specs: everything that decides a teacher's output, validated strictly.

A spec is a frozen pydantic model. Every field except the non-output ones (`batch_size`, `num_gpus`,
`target_shape`) goes into the teacher fingerprint, so two specs that could produce different targets never share
one. A family's spec class subclasses `TeacherSpecBase` with a `kind: Literal[...]` field and is the `spec_cls` of
its `Teacher`, registered with `@teachers.register("<kind>")`; the registry finds it from there.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Fields the targets do not depend on: how the work is scheduled, and `target_shape`, which only declares what the
# model must produce (a check, so that adding or removing it never changes a fingerprint or strands a store).
NON_OUTPUT_FIELDS: frozenset[str] = frozenset({"batch_size", "num_gpus", "target_shape"})
# The older name, kept because pipeline/precompute.py uses it to list the spec fields two stored teachers differ in.
SCHEDULING_FIELDS = NON_OUTPUT_FIELDS

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
    # Opt-in compact storage (see pipeline/store.py): int8 codes with per-token scales, and/or p x p pooling of a
    # square token grid. Like storage_dtype they change the stored targets, so they are part of the fingerprint.
    quantize: Literal["none", "int8"] = "none"
    pool: int = Field(default=1, ge=1)
    compute_dtype: ComputeDType = "float32"
    # TF32 (10-bit mantissa) for float32 matmuls and convolutions: faster on CUDA GPUs from Ampere on, and it changes
    # the targets there, so it is part of the fingerprint (left out of the payload while False, so that adding the
    # field moved no existing fingerprint). It has an effect on CUDA devices only: elsewhere there is no TF32.
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

    def fingerprint_payload(self) -> dict[str, Any]:
        """The spec as JSON-able data, without the non-output fields (and without `tf32` while it is False)."""
        payload = self.model_dump(mode="json", exclude=set(NON_OUTPUT_FIELDS))
        if not payload.get("tf32"):
            payload.pop("tf32", None)
        return payload

    def canonical_json(self) -> str:
        """Key-sorted, whitespace-free JSON of `fingerprint_payload()`, stable across runs and machines."""
        return json.dumps(self.fingerprint_payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class DepthAnythingSpec(TeacherSpecBase):
    """Depth Anything V2 backbone tokens: mean over `layers` of LayerNorm(block output), prefix tokens dropped.

    `layers` are 0-indexed transformer blocks (block i is hidden_states[i + 1]); they are stored sorted since the
    mean does not depend on their order. `channel_order: bgr` reproduces the reference's swapped colour channels.
    `pos_embed_interpolation` says how the backbone's position-embedding grid (37 x 37 for the hub models) is
    resized to the `image_size / 14` patch grid: `transformers` resizes to that size (bicubic); `reference`, as the
    DINOv2 code vendored by Depth-Anything and OLA-VLM, resizes by the scale factor (grid + 0.1) / 37 (bicubic, no
    antialias), which samples the grid up to about 0.15 of a cell apart. Both leave a grid of the native size as is.
    """

    kind: Literal["depth_anything_v2"] = "depth_anything_v2"
    model: str = Field(default="depth-anything/Depth-Anything-V2-Large-hf", min_length=1)
    image_size: int = Field(default=336, gt=0)
    layers: tuple[int, ...] = (4, 11, 17, 23)
    channel_order: Literal["rgb", "bgr"] = "rgb"
    pos_embed_interpolation: Literal["transformers", "reference"] = "transformers"

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

    def fingerprint_payload(self) -> dict[str, Any]:
        payload = super().fingerprint_payload()
        # Left out at its default, so that adding the field moved no existing fingerprint (as `tf32`).
        if payload.get("pos_embed_interpolation") == "transformers":
            payload.pop("pos_embed_interpolation")
        return payload


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


class TimmSpec(TeacherSpecBase):
    """Any timm model: `forward_features` tokens, preprocessed by the model's own timm data config.

    `model` is `local-dir:PATH` (a folder in timm's hub layout: config.json + model.safetensors), `hf-hub:org/name`
    (pin it with `revision`), or a timm model name whose pretrained weights are on the hub
    (`vit_base_patch14_dinov2.lvd142m`).
    Token outputs [N, C] keep the patch tokens (`prefix_tokens: drop`), prefix ([CLS], registers) and patch tokens
    (`keep`), or the [CLS] token alone (`cls` -> [1, C]); feature maps [C, H, W] become [H*W, C], row-major.
    `grid: G` bilinearly resizes the patch-token grid or feature map to G x G first (align_corners=False).
    """

    kind: Literal["timm"] = "timm"
    model: str = Field(min_length=1)
    prefix_tokens: PrefixTokens = "drop"
    grid: int | None = Field(default=None, gt=0)

    @field_validator("model")
    @classmethod
    def _check_model(cls, model: str) -> str:
        source, sep, ident = model.partition(":")
        if sep and source in ("local-dir", "hf-hub"):
            if not ident:
                raise ValueError(f"{model!r} names no folder or repo after '{source}:'")
            if source == "hf-hub" and "@" in ident:
                raise ValueError(f"{model!r}: put the revision in the `revision` field, not after '@'")
            return model
        if sep or "/" in model or "\\" in model:
            raise ValueError(f"{model!r} is not a timm model name; write 'hf-hub:{ident or model}' for a hub repo "
                             f"or 'local-dir:{ident or model}' for a folder")
        return model

    @model_validator(mode="after")
    def _check_combination(self) -> TimmSpec:
        if self.prefix_tokens == "cls" and self.grid is not None:
            raise ValueError("grid resizes patch tokens, but prefix_tokens: cls keeps none; drop one of them")
        return self


class HfVisionSpec(TeacherSpecBase):
    """Any transformers vision model (`AutoModel` + `AutoImageProcessor`): chosen hidden states, mean or concat.

    `layers` index `hidden_states` as the model returns them with `output_hidden_states=True`: 0 is the embedding
    output, i the output of block i, negative counts from the end (-1 = last block, before any final norm).
    `combine: mean` averages them, `concat` joins them along channels in the order given. `final_norm` applies the
    model's own final LayerNorm (`layernorm`, `post_layernorm`, ...) to each chosen layer first. Prefix tokens and
    `grid` work as in the `timm` kind; `num_prefix_tokens` overrides the count inferred from the patch size.
    A CLIP- or SigLIP-style model with a text tower contributes its `vision_model` only. No remote code is run.
    """

    kind: Literal["hf_vision"] = "hf_vision"
    model: str = Field(min_length=1)
    layers: tuple[int, ...] = (-1,)
    combine: Literal["mean", "concat"] = "mean"
    final_norm: bool = False
    prefix_tokens: PrefixTokens = "drop"
    num_prefix_tokens: int | None = Field(default=None, ge=0)
    grid: int | None = Field(default=None, gt=0)
    processor_backend: ProcessorBackend = "pil"

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if not layers:
            raise ValueError("needs at least one hidden_states index, e.g. [-1] or [4, 11, 17, 23]")
        if len(set(layers)) != len(layers):
            raise ValueError(f"hidden_states indices must be unique, got {list(layers)}")
        return layers

    @model_validator(mode="after")
    def _check_combination(self) -> HfVisionSpec:
        if self.prefix_tokens == "cls" and self.grid is not None:
            raise ValueError("grid resizes patch tokens, but prefix_tokens: cls keeps none; drop one of them")
        if self.combine == "mean" and list(self.layers) != sorted(self.layers):
            # The mean does not depend on the order, so equal targets get one spelling (and one fingerprint).
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        return self
