"""The rest of the demo gen teacher's unCLIP pipeline: what turns a CLIP image embedding back into an image.

The gen teacher reads only `image_encoder/` and `feature_extractor/` (pipeline/demo/teachers.py); decoding a
prediction (`UnclipImageEncoderTeacher.decoder()`) needs the whole diffusers `StableUnCLIPImg2ImgPipeline`, laid out
as `stabilityai/stable-diffusion-2-1-unclip` is. This adds its other parts around the encoder, random-initialised.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.demo.common import quiet_and_seeded
from pipeline.demo.teachers import build_clip_task_tokenizer

# The gen teacher's own files: its fingerprint hashes them, so the pipeline build must leave them as they are.
ENCODER_PARTS = ("image_encoder", "feature_extractor")
PROMPT_TOKENS = 77  # CLIP's text length, as in the SD 2.1 text encoder
LATENT_SIZE = 16  # the VAE's three blocks upsample 4x: 64x64 images


def build_tiny_unclip_pipeline(gen_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Complete `gen_dir` (holding `image_encoder/` and `feature_extractor/`) into a `StableUnCLIPImg2ImgPipeline`.

    Writes `model_index.json` and `image_normalizer/`, `image_noising_scheduler/`, `tokenizer/`, `text_encoder/`,
    `unet/`, `scheduler/`, `vae/` with `save_pretrained` (safetensors); the two encoder folders are left
    byte-identical. Components as in SD 2.1 unCLIP, shrunk: a CLIP text encoder (hidden 32, 2 layers) with the demo's
    small CLIP tokenizer, a UNet whose class embedding projects [image_embeds, noise-level embedding] (2 x the
    encoder's projection dim), a 3-block VAE (4 latent channels, 16x16 latents -> 64x64 RGB images), a v-prediction
    DDIM scheduler and a squared-cosine DDPM image-noising scheduler. About 1.3 MB; 25 guided steps take about a
    second on one CPU core. Returns `gen_dir`.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection

    gen = Path(gen_dir)
    with quiet_and_seeded(seed):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(gen, subfolder="image_encoder",
                                                                      use_safetensors=True)
    feature_extractor = CLIPImageProcessor.from_pretrained(gen, subfolder="feature_extractor")
    embedding_dim = int(image_encoder.config.projection_dim)
    tokenizer = build_clip_task_tokenizer()
    tokenizer.model_max_length = PROMPT_TOKENS  # the pipeline pads every prompt to this length
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=PROMPT_TOKENS,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with quiet_and_seeded(seed):
        text_encoder = CLIPTextModel(text_config).eval()
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
            cross_attention_dim=text_config.hidden_size,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            # unCLIP conditions on the noised image embedding concatenated with its noise level's embedding.
            class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * embedding_dim,
        ).eval()
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=4 * LATENT_SIZE,
        ).eval()
    pipeline = StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embedding_dim),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        vae=vae,
    )
    # save_pretrained writes every component; staged beside gen/ so the encoder folders are never rewritten.
    with tempfile.TemporaryDirectory(dir=gen, prefix=".unclip-") as staging, quiet_and_seeded(seed):
        pipeline.save_pretrained(staging, safe_serialization=True)
        for entry in sorted(Path(staging).iterdir()):
            if entry.name in ENCODER_PARTS:
                continue
            target = gen / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            entry.rename(target)
    return gen
