"""The gen decoder is the teacher's own unCLIP pipeline: fed the teacher's target of an image it makes the image the
pipeline makes from that image, with the same seed; any embedding of the target's shape decodes.

On the tiny demo pipeline (pipeline/demo/unclip_pipeline.py) built in a temporary folder, offline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import teachers
from pipeline.demo.teachers import build_tiny_unclip_image_encoder
from pipeline.demo.unclip_pipeline import build_tiny_unclip_pipeline
from teachers.decoding import GeneratedImage
from tests.teachers.conftest import REPO

SEED = 7


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory):
    gen = build_tiny_unclip_image_encoder(tmp_path_factory.mktemp("unclip") / "gen", seed=2)
    return build_tiny_unclip_pipeline(gen, seed=5)


@pytest.fixture(scope="module")
def photo(images):
    return images[0]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipeline_image(unclip_dir, photo):
    """What `StableUnCLIPImg2ImgPipeline` makes from the photo itself (its own feature extractor and image encoder),
    with the decoder's documented settings, loaded and configured here independently of the decoder."""
    from diffusers import DPMSolverMultistepScheduler, StableUnCLIPImg2ImgPipeline

    pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(unclip_dir, use_safetensors=True)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(image=photo, prompt="", num_inference_steps=25, guidance_scale=10.0, noise_level=0,
                    generator=torch.Generator("cpu").manual_seed(SEED)).images[0]


def _teacher(unclip_dir, backend: str = "pil"):
    return teachers.create({"kind": "unclip_image_encoder", "model": str(unclip_dir), "processor_backend": backend})


def test_settings_are_the_reference_demos(unclip_dir):
    settings = _teacher(unclip_dir).decoder().settings()
    assert settings["steps"] == 25 and settings["scheduler"] == "DPMSolverMultistepScheduler"
    assert settings["guidance_scale"] == 10.0 and settings["noise_level"] == 0 and settings["prompt"] == ""
    assert settings["size"] == [64, 64] and settings["dtype"] == "float32"
    json.dumps(settings)  # recorded beside every picture


def test_the_target_of_an_image_decodes_to_the_pipelines_image_of_it(unclip_dir, photo, pipeline_image):
    # The pipeline's feature extractor is transformers 5's default CLIPImageProcessor, the torchvision backend: the
    # teacher with that backend computes the pipeline's own embedding, bit for bit, so the images are identical.
    teacher = _teacher(unclip_dir, "torchvision")
    target = teacher(teacher.preprocess([photo]))[0]
    decoded = teacher.decoder().decode(photo, target, seed=SEED)
    assert isinstance(decoded, GeneratedImage) and decoded.settings["seed"] == SEED
    assert decoded.image.size == pipeline_image.size == (64, 64)
    np.testing.assert_array_equal(_pixels(decoded.image), _pixels(pipeline_image))


def test_the_default_pil_targets_decode_within_a_grey_level(unclip_dir, photo, pipeline_image):
    # The default (PIL) preprocessing resizes with PIL instead of torchvision, so its embedding differs from the
    # pipeline's by float noise (~3e-4 here): the images may differ by a rounding step, never by more.
    teacher = _teacher(unclip_dir)
    target = teacher(teacher.preprocess([photo]))[0]
    difference = np.abs(_pixels(teacher.decoder().decode(photo, target, seed=SEED).image) - _pixels(pipeline_image))
    assert difference.max() <= 2 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_a_prediction_of_the_target_shape_decodes(unclip_dir, photo, pipeline_image):
    teacher = _teacher(unclip_dir)
    decoder = teacher.decoder()
    # float16, as the store keeps targets: the decoder casts to the pipeline's dtype.
    prediction = torch.randn(teacher.target_shape, generator=torch.Generator().manual_seed(0)).half()
    decoded = decoder.decode(photo, prediction, seed=SEED)
    assert decoded.image.mode == "RGB" and decoded.image.size == (64, 64)
    assert np.abs(_pixels(decoded.image) - _pixels(pipeline_image)).mean() > 1  # another embedding, another image
    again = decoder.decode(photo, prediction, seed=SEED)
    np.testing.assert_array_equal(_pixels(again.image), _pixels(decoded.image))
    with pytest.raises(ValueError, match=r"expected \(1, 32\)"):
        decoder.decode(photo, torch.zeros(2, 32))


def test_the_pipelines_own_scheduler_is_an_option(unclip_dir, photo):
    decoder = _teacher(unclip_dir).decoder(scheduler="pipeline", steps=3)
    assert decoder.settings()["scheduler"] == "DDIMScheduler" and decoder.settings()["steps"] == 3
    assert decoder.decode(photo, torch.zeros(1, 32)).image.size == (64, 64)
    with pytest.raises(ValueError, match="scheduler"):
        _teacher(unclip_dir).decoder(scheduler="ddim")


def test_an_encoder_only_folder_says_why_it_has_no_decoder(tmp_path):
    teacher = _teacher(build_tiny_unclip_image_encoder(tmp_path / "gen"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        teacher.decoder()


def test_a_hub_id_decodes_from_the_hub_cache_like_a_folder(unclip_dir, photo, tmp_path):
    """The default `model` (the SD 2.1 unCLIP hub id) goes through `from_pretrained` as any hub pipeline: here from a
    hub cache holding the tiny pipeline under that id, offline (huggingface_hub reads HF_HUB_CACHE at import, so in a
    fresh process)."""
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1-unclip"
    commit = "0" * 40
    shutil.copytree(unclip_dir, snapshot / "snapshots" / commit)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(commit)
    photo_path, out = tmp_path / "photo.png", tmp_path / "decoded.png"
    photo.save(photo_path)
    script = textwrap.dedent(f"""
        import teachers
        from PIL import Image
        teacher = teachers.create({{"kind": "unclip_image_encoder"}})
        photo = Image.open({str(photo_path)!r}).convert("RGB")
        target = teacher(teacher.preprocess([photo]))[0]
        teacher.decoder(steps=3).decode(photo, target, seed={SEED}).image.save({str(out)!r})
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = _teacher(unclip_dir)
    target = teacher(teacher.preprocess([Image.open(photo_path).convert("RGB")]))[0]
    local = teacher.decoder(steps=3).decode(photo, target, seed=SEED).image
    np.testing.assert_array_equal(_pixels(Image.open(out)), _pixels(local))
