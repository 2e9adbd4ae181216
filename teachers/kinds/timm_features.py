"""Generic timm teacher (kind `timm`): any timm model's `forward_features`, from a manifest entry alone.

Target per image: `model.forward_features(pixels)` turned into tokens by `teachers.tokens`: a ViT's [N, C] keeps
its patch tokens (prefix tokens dropped or kept, or [CLS] alone), a convnet's [C, H, W] map (or a Swin's [H, W, C])
becomes [H*W, C] row-major; `grid: G` resizes either to G x G first. For a ViT, `forward_features` already ends
with the model's final norm. Pixels come from timm's own eval transform for the checkpoint's data config
(`resolve_data_config` + `create_transform(is_training=False)`: resize, centre crop, mean/std), read from the
checkpoint's config.json without building the model, and split: the PIL steps on the CPU (uint8 out), ToTensor and
Normalize on the device as a table (see `teachers.pixels`).

Weights are read from safetensors only, by this module, never through timm's loader, which would fall back to a
pickled `pytorch_model.bin` if one sat beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator

from teachers.base import Teacher, WeightFiles, locate_weights
from teachers.pixels import Preprocessor, split_is_exact, stack_pixels
from teachers.registry import register
from teachers.spec import PrefixTokens, TeacherSpecBase
from teachers.tokens import feature_map_to_tokens, patch_grid, sequence_to_tokens


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


def _hub_id_of_timm_name(name: str) -> str:
    """The hub repo holding the pretrained weights of a timm model name (`arch` or `arch.tag`)."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, _ = split_model_name_tag(name)
    if not timm.is_model(architecture):
        raise ValueError(f"spec.model: {name!r} is not a timm model name (see timm.list_models()); use "
                         f"'hf-hub:org/name' or 'local-dir:PATH' for other checkpoints")
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"spec.model: timm has no hub weights for {name!r}; save the checkpoint with "
                         f"timm.models.save_for_hf(..., safe_serialization=True) and use 'local-dir:PATH'")
    if cfg.hf_hub_filename:
        # e.g. open_clip checkpoints: another file layout than timm's config.json + model.safetensors.
        raise ValueError(f"spec.model: timm loads {name!r} from {cfg.hf_hub_id}/{cfg.hf_hub_filename}, not a timm "
                         f"model folder; export it with timm.models.save_for_hf and use 'local-dir:PATH'")
    return cfg.hf_hub_id


def weights_spec(spec: TimmSpec) -> TimmSpec:
    """`spec` with `model` replaced by what `locate_weights` understands: a directory or a hub repo id."""
    source, _, ident = spec.model.partition(":")
    if source == "local-dir":
        if not Path(ident).expanduser().is_dir():
            raise FileNotFoundError(f"spec.model: no such directory {ident} (from {spec.model!r}); build it first "
                                    f"or fix the path")
        return spec.model_copy(update={"model": ident})
    if source == "hf-hub":
        return spec.model_copy(update={"model": ident})
    return spec.model_copy(update={"model": _hub_id_of_timm_name(spec.model)})


def _weights_file(root: Path) -> Path:
    preferred = root / "model.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(root.glob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"spec.model: expected model.safetensors (or a single .safetensors file) in "
                                f"{root}, found {[p.name for p in found]}")
    return found[0]


def timm_data_config(root: Path) -> dict[str, Any]:
    """The eval data config (`input_size`, `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`) that a model
    created from the timm folder `root` would have, from its config.json alone: timm's own parsing and
    resolution of the pretrained config, as `create_model` does them. `TimmTeacher.load` checks it against the
    built model's."""
    import timm
    from timm.models import resolve_pretrained_cfg
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, architecture, _ = load_model_config_from_path(root)
    return timm.data.resolve_data_config(pretrained_cfg=resolve_pretrained_cfg(architecture, pretrained_cfg).to_dict())


def _comparable(data_config: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}


class TimmPreprocessor(Preprocessor):
    """timm's eval transform for `data_config`. Split when it is PIL steps (resize, crop) followed by ToTensor and
    Normalize, and the split reproduces it exactly on `probe_images()`: the PIL steps on the CPU -> uint8
    [B, 3, H, W], ToTensor + Normalize as a table made by those very transforms. Otherwise the whole transform
    runs on the CPU and gives float32 pixel_values.
    """

    def __init__(self, data_config: dict[str, Any]) -> None:
        import timm
        from torchvision import transforms as T

        self.data_config = dict(data_config)
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        self.pil_steps = None
        steps = list(getattr(self.transform, "transforms", []))
        to_tensor = [i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)]
        tail = steps[to_tensor[0] + 1:] if to_tensor else []
        if not to_tensor or not all(isinstance(step, T.Normalize) for step in tail):
            return
        self.pil_steps = T.Compose(steps[: to_tensor[0]])
        ramp = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, 3)))
        self.lut = T.Compose(steps[to_tensor[0]:])(Image.fromarray(ramp)).reshape(3, 256).numpy()
        if not split_is_exact(self, self._whole):
            self.pil_steps, self.lut = None, None

    def _whole(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images]).to(torch.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.pil_steps is None:
            return self._whole(images)
        arrays = []
        for image in images:
            out = self.pil_steps(image)
            if not isinstance(out, Image.Image) or out.mode != "RGB":
                raise TypeError(f"timm's transform gave {type(out).__name__} before ToTensor, expected an RGB image")
            arrays.append(np.asarray(out))
        return stack_pixels(arrays)


@register("timm")
class TimmTeacher(Teacher):
    spec_cls = TimmSpec
    spec: TimmSpec

    @classmethod
    def locate(cls, spec: TimmSpec, *, download: bool = True) -> WeightFiles:
        return locate_weights(weights_spec(spec), download=download)

    def load(self) -> None:
        import timm
        from safetensors.torch import load_file

        root = self.resolve_weights()
        # The random initialisation is overwritten at once; it must not move the caller's RNG either.
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(f"local-dir:{root}", pretrained=False)
        model.load_state_dict(load_file(_weights_file(root)), strict=True)
        self.backbone = model.eval()
        self.data_config = timm.data.resolve_data_config(model=model)
        if _comparable(self.data_config) != _comparable(self.preprocessor.data_config):
            # The preprocessor was built from config.json without the model; the two must agree on the pixels.
            raise ValueError(f"spec.model: timm's data config for the built model {self.data_config} differs from "
                             f"the one read from {root / 'config.json'} {self.preprocessor.data_config}")
        # The layout of the output (NCHW or NHWC map, prefix count, patch grid) is read off one real forward pass.
        self.channels_last = getattr(model, "output_fmt", None) == "NHWC"
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.grid_hw: tuple[int, int] | None = None
        _, height, width = self.data_config["input_size"]
        probe = self.preprocessor.normalize(self.preprocess([Image.new("RGB", (width, height), (127, 127, 127))]))
        with torch.inference_mode():
            raw = self.backbone.forward_features(probe)
        self._check_layout(raw, tuple(probe.shape[-2:]))
        self._target_shape = tuple(self._to_tokens(raw).shape[1:])

    def _check_layout(self, raw: object, image_hw: tuple[int, int]) -> None:
        spec = self.spec
        if not isinstance(raw, torch.Tensor) or raw.ndim not in (3, 4):
            what = f"a {raw.ndim}-d tensor" if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"spec.model: {type(self.backbone).__name__}.forward_features returns {what}; the timm "
                             f"teacher needs tokens [B, N, C] or a feature map [B, C, H, W]")
        if spec.prefix_tokens == "cls" and (raw.ndim == 4 or self.num_prefix == 0):
            raise ValueError(f"spec.prefix_tokens: cls, but {type(self.backbone).__name__} has no [CLS] token")
        if raw.ndim == 3 and spec.grid is not None:
            patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
            patch_hw = (patch, patch) if isinstance(patch, int) else (tuple(patch) if patch else None)
            try:
                self.grid_hw = patch_grid(raw.shape[1] - self.num_prefix, image_hw, patch_hw)
            except ValueError as exc:
                raise ValueError(f"spec.grid: {exc}") from None

    def _to_tokens(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.ndim == 4:
            if self.channels_last:
                raw = raw.permute(0, 3, 1, 2)
            return feature_map_to_tokens(raw, self.spec.grid)
        return sequence_to_tokens(raw, self.num_prefix, self.spec.prefix_tokens, self.spec.grid, self.grid_hw)

    @classmethod
    def build_preprocessor(cls, spec: TimmSpec) -> TimmPreprocessor:
        return TimmPreprocessor(timm_data_config(cls.locate(spec).root))

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> [B, T, C] in compute dtype."""
        return self._to_tokens(self.backbone.forward_features(batch))
