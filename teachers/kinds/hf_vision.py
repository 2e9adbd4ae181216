"""Generic transformers teacher (kind `hf_vision`): chosen hidden states of any vision model, from a manifest entry.

Target per image: `model(pixel_values, output_hidden_states=True).hidden_states[i]` for each i in `spec.layers`,
each as tokens [N, C] (a [C, H, W] map of a convnet becomes [H*W, C], row-major), optionally through the model's
own final norm, then averaged or concatenated along channels, then prefix tokens and `grid` handled by
`teachers.tokens`. Pixels come from the checkpoint's own `AutoImageProcessor`, split into uint8 pixels on the CPU
and rescale + mean/std on the device where that split is exact (`teachers.pixels.ImageProcessorPreprocessor`);
otherwise the processor runs whole on the CPU and gives float32 pixel_values.

Loaded with `AutoModel.from_pretrained(..., use_safetensors=True)` and never with remote code; a model with a text
tower (CLIP, SigLIP) keeps its `vision_model` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator
from torch import nn

from teachers.base import Teacher
from teachers.pixels import ImageProcessorPreprocessor
from teachers.registry import register
from teachers.spec import PrefixTokens, ProcessorBackend, TeacherSpecBase
from teachers.tokens import infer_num_prefix, patch_grid, sequence_to_tokens


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


# Attribute names transformers vision models give their final norm (Dinov2/ViT/ConvNext, CLIP/SigLIP, others).
FINAL_NORM_NAMES = ("layernorm", "post_layernorm", "final_layernorm", "final_layer_norm", "norm", "ln_post")


def find_final_norm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute name, module) of `model`'s own final norm, or None. Only direct attributes count: a norm deeper
    in the model belongs to a block or a head."""
    for name in FINAL_NORM_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and "norm" in type(module).__name__.lower():
            return name, module
    return None


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


@register("hf_vision")
class HfVisionTeacher(Teacher):
    spec_cls = HfVisionSpec
    spec: HfVisionSpec

    def load(self) -> None:
        from transformers import AutoModel

        spec = self.spec
        root = self.resolve_weights()
        # Loaded straight into the compute dtype: no second, converted copy of a large checkpoint in memory.
        model = AutoModel.from_pretrained(root, use_safetensors=True, dtype=self.compute_dtype)
        self.backbone = getattr(model, "vision_model", model).eval()
        del model
        self.final_norm: nn.Module | None = None
        if spec.final_norm:
            found = find_final_norm(self.backbone)
            if found is None:
                raise ValueError(f"spec.final_norm: {type(self.backbone).__name__} has no final norm (looked for "
                                 f"{', '.join(FINAL_NORM_NAMES)}); set final_norm: false")
            self.final_norm = found[1]

        # Layer count, token layout and patch grid are read off one real forward pass.
        probe = self.normalize(self.preprocess([Image.new("RGB", (224, 224), (127, 127, 127))]))
        with torch.inference_mode():
            hidden_states = self._hidden_states(probe)
        num_states = len(hidden_states)
        bad = [i for i in spec.layers if not -num_states <= i < num_states]
        if bad:
            raise ValueError(f"spec.layers={list(spec.layers)}: {type(self.backbone).__name__} returns "
                             f"{num_states} hidden states, valid indices are 0..{num_states - 1} (or negative)")
        shapes = {i: tuple(hidden_states[i].shape[1:]) for i in spec.layers}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"spec.layers: hidden states of different shapes cannot be combined: "
                             f"{', '.join(f'{i}: {list(s)}' for i, s in shapes.items())}")
        self._set_layout(hidden_states[spec.layers[0]], tuple(probe.shape[-2:]))
        with torch.inference_mode():
            self._target_shape = tuple(self._combine(hidden_states).shape[1:])

    def _set_layout(self, sample: torch.Tensor, image_hw: tuple[int, int]) -> None:
        spec = self.spec
        self.grid_hw: tuple[int, int] | None = None
        if sample.ndim == 4:  # a convnet's [B, C, H, W]: no prefix tokens, the map is the grid
            if spec.prefix_tokens == "cls":
                raise ValueError(f"spec.prefix_tokens: cls, but {type(self.backbone).__name__} gives feature "
                                 f"maps without a [CLS] token")
            self.num_prefix = 0
            self.grid_hw = tuple(sample.shape[-2:])
            return
        if sample.ndim != 3:
            raise ValueError(f"spec.layers: hidden states of shape {list(sample.shape)} are neither tokens "
                             f"[B, N, C] nor feature maps [B, C, H, W]")
        patch_hw = _pair(getattr(self.backbone.config, "patch_size", None))
        num_tokens = sample.shape[1]
        if spec.num_prefix_tokens is not None:
            if spec.num_prefix_tokens >= num_tokens:
                raise ValueError(f"spec.num_prefix_tokens={spec.num_prefix_tokens} leaves no patch tokens of "
                                 f"{num_tokens}")
            self.num_prefix = spec.num_prefix_tokens
        else:
            self.num_prefix = infer_num_prefix(num_tokens, image_hw, patch_hw)
        if spec.grid is not None:
            try:
                self.grid_hw = patch_grid(num_tokens - self.num_prefix, image_hw, patch_hw)
            except ValueError as exc:
                raise ValueError(f"spec.grid: {exc}") from None

    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = self.backbone(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        if not hidden_states:
            raise ValueError(f"spec.model: {type(self.backbone).__name__} returns no hidden_states")
        return hidden_states

    def _combine(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        layers = []
        for i in spec.layers:
            x = hidden_states[i]
            if x.ndim == 4:
                x = x.flatten(2).transpose(1, 2)
            layers.append(self.final_norm(x) if self.final_norm is not None else x)
        combined = torch.stack(layers).mean(0) if spec.combine == "mean" else torch.cat(layers, dim=-1)
        return sequence_to_tokens(combined, self.num_prefix, spec.prefix_tokens, spec.grid, self.grid_hw)

    @classmethod
    def build_preprocessor(cls, spec: HfVisionSpec) -> ImageProcessorPreprocessor:
        """The checkpoint's own image processor (its preprocessor_config.json), split where that is exact."""
        from transformers import AutoImageProcessor

        root = cls.locate(spec).root
        return ImageProcessorPreprocessor(AutoImageProcessor.from_pretrained(root, backend=spec.processor_backend))

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, T, C] in compute dtype."""
        return self._combine(self._hidden_states(batch))
