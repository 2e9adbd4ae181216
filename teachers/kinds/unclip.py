"""unCLIP image-encoder teacher (kind `unclip_image_encoder`): OLA-VLM's generation target.

Target per image: `CLIPVisionModelWithProjection(...).image_embeds` -> [1, projection_dim] (1 x 1024 for SD 2.1
unCLIP). Only the pipeline's `image_encoder` and `feature_extractor` subfolders are read, with transformers
classes: the teacher never imports diffusers, so no UNet, VAE or scheduler is ever built or downloaded.

`decoder()` is the exception, for `pipeline visualize` only: it loads the whole diffusers
`StableUnCLIPImg2ImgPipeline` of the same `model` (UNet, VAE, text encoder, image normaliser and noising
scheduler; safetensors only, no remote code) and generates an image from an embedding given as the pipeline's
`image_embeds`, as the reference's demo does. Where `model` holds no pipeline it raises OSError, whose message is
the reason to show in place of the picture.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from PIL import Image
from pydantic import Field

from teachers.base import Teacher
from teachers.decoding import GeneratedImage, TargetDecoder
from teachers.pixels import ImageProcessorPreprocessor
from teachers.registry import register
from teachers.spec import ProcessorBackend, TeacherSpecBase


# The reference's demo: 25 steps of DPMSolverMultistepScheduler built from the pipeline's own scheduler config.
REFERENCE_STEPS = 25
# `scheduler="pipeline"` keeps the scheduler the repository ships (DDIM for SD 2.1 unCLIP).
DecodeScheduler = Literal["dpm_solver_multistep", "pipeline"]
# StableUnCLIPImg2ImgPipeline's own default; above 1 it runs classifier-free guidance against a zero embedding.
PIPELINE_GUIDANCE_SCALE = 10.0


class UnclipImageEncoderSpec(TeacherSpecBase):
    """The CLIP image encoder of a diffusers unCLIP pipeline: `image_embeds`, one token of `projection_dim`.

    Only the `image_encoder` and `feature_extractor` subfolders of the pipeline are read.
    """

    kind: Literal["unclip_image_encoder"] = "unclip_image_encoder"
    model: str = Field(default="stabilityai/stable-diffusion-2-1-unclip", min_length=1)
    image_encoder_subfolder: str = "image_encoder"
    feature_extractor_subfolder: str = "feature_extractor"
    processor_backend: ProcessorBackend = "pil"


@register("unclip_image_encoder")
class UnclipImageEncoderTeacher(Teacher):
    spec_cls = UnclipImageEncoderSpec
    spec: UnclipImageEncoderSpec

    @classmethod
    def weight_layout(cls, spec: UnclipImageEncoderSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
        # The rest of the pipeline repo (unet/, vae/, text encoders) is neither downloaded nor fingerprinted.
        return (spec.image_encoder_subfolder,), (spec.feature_extractor_subfolder,)

    def load(self) -> None:
        from transformers import CLIPVisionModelWithProjection

        spec = self.spec
        root = self.resolve_weights()
        # Loaded straight into the compute dtype: no second, converted copy of a large checkpoint in memory.
        self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            root, subfolder=spec.image_encoder_subfolder, use_safetensors=True, dtype=self.compute_dtype
        )
        self._target_shape = (1, int(self.image_encoder.config.projection_dim))

    @classmethod
    def build_preprocessor(cls, spec: UnclipImageEncoderSpec) -> ImageProcessorPreprocessor:
        """The pipeline's CLIP feature extractor, split: its PIL resize (shortest edge, bicubic) and centre crop on
        the CPU -> uint8 [B, 3, crop, crop]; its rescale and CLIP mean/std on the device (exact: checked when
        built, float32 pixel_values otherwise)."""
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        processor_cls = CLIPImageProcessorPil if spec.processor_backend == "pil" else CLIPImageProcessor
        processor = processor_cls.from_pretrained(cls.locate(spec).root, subfolder=spec.feature_extractor_subfolder)
        return ImageProcessorPreprocessor(processor)

    def compute(self, batch: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, crop, crop] -> [B, 1, projection_dim] in compute dtype."""
        return self.image_encoder(pixel_values=batch).image_embeds.unsqueeze(1)

    def decoder(self, *, steps: int = REFERENCE_STEPS, scheduler: DecodeScheduler = "dpm_solver_multistep",
                guidance_scale: float = PIPELINE_GUIDANCE_SCALE, noise_level: int = 0,
                prompt: str = "") -> UnclipDecoder:
        """The unCLIP pipeline of `spec.model` on this teacher's device and compute dtype, sharing this teacher's
        image encoder (loaded once). Steps and scheduler default to the reference demo's, guidance and noise level
        to the pipeline's own; `UnclipDecoder.settings()` records them.

        A local `model` without `model_index.json` (only the encoder folders, as the precompute needs) raises
        FileNotFoundError; a hub id loads with `from_pretrained` like any diffusers pipeline (downloaded unless
        cached, refused with HF_HUB_OFFLINE); any failure to load raises OSError naming the model and the cause.
        """
        if scheduler not in get_args(DecodeScheduler):
            raise ValueError(f"scheduler={scheduler!r}: expected one of {get_args(DecodeScheduler)}")
        weights = self._weights
        if weights is None:
            raise RuntimeError(f"{type(self).__name__} is not loaded; build it with teachers.create(spec)")
        from diffusers import DPMSolverMultistepScheduler, StableUnCLIPImg2ImgPipeline

        spec = self.spec
        if weights.local:
            source, revision = str(weights.root), None
            if not (weights.root / "model_index.json").is_file():
                raise FileNotFoundError(f"{weights.root} holds the unCLIP image encoder only (no model_index.json), "
                                        f"not the diffusers pipeline that decodes it")
        else:
            source, revision = spec.model, spec.revision
        try:
            pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(
                source, revision=revision, use_safetensors=True, dtype=self.compute_dtype,
                image_encoder=self.image_encoder,
            )
        except Exception as exc:  # diffusers and the hub client raise many types; the caller shows one line
            where = f"{source}@{revision}" if revision else source
            raise OSError(f"cannot load the unCLIP pipeline of {where}: {' '.join(str(exc).split())}") from exc
        if scheduler == "dpm_solver_multistep":
            pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        return UnclipDecoder(pipeline, steps=steps, guidance_scale=guidance_scale, noise_level=noise_level,
                             prompt=prompt)


class UnclipDecoder(TargetDecoder):
    """A `StableUnCLIPImg2ImgPipeline` generating from a gen embedding given as its `image_embeds`.

    Sampling is fixed by `decode`'s seed: one `torch.Generator` on the CPU (the same noise on any device) seeded
    with it draws, in the pipeline's order, the noise of the embedding's noising (`noise_level`) and the initial
    latents. The image has the pipeline's native size (`unet.config.sample_size * vae_scale_factor`: 768 px for
    SD 2.1 unCLIP, 64 px for the demo's), whatever the size of the image the embedding came from.
    """

    what = "unCLIP image"

    def __init__(self, pipeline: Any, *, steps: int, guidance_scale: float, noise_level: int, prompt: str) -> None:
        self.pipeline = pipeline
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.noise_level = noise_level
        self.prompt = prompt
        self.embedding_dim = int(pipeline.image_normalizer.config.embedding_dim)

    def settings(self) -> dict[str, Any]:
        size = self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor
        return {
            "pipeline": type(self.pipeline).__name__,
            "steps": self.steps,
            "scheduler": type(self.pipeline.scheduler).__name__,
            "guidance_scale": self.guidance_scale,
            "noise_level": self.noise_level,
            "prompt": self.prompt,
            "size": [size, size],
            "dtype": str(self.pipeline.unet.dtype).removeprefix("torch."),
            "generator": "torch.Generator('cpu').manual_seed(seed)",
        }

    def decode(self, image: Image.Image, embedding: torch.Tensor, *, seed: int = 0) -> GeneratedImage:
        """`embedding`: `[1, D]` (the gen target's shape, D = the encoder's projection dim). `image` is not read:
        the pipeline sees the embedding only."""
        if tuple(embedding.shape) != (1, self.embedding_dim):
            raise ValueError(f"unCLIP decoder: embedding of shape {tuple(embedding.shape)}, expected "
                             f"(1, {self.embedding_dim}) (the gen target's shape)")
        unet = self.pipeline.unet
        generated = self.pipeline(
            image_embeds=embedding.to(device=unet.device, dtype=unet.dtype),
            prompt=self.prompt,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            noise_level=self.noise_level,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        ).images[0]
        return GeneratedImage(generated, {"seed": seed, **self.settings()})
