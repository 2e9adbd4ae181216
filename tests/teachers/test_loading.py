"""Loading rules: offline OneFormer, no UNet/VAE for unCLIP, safetensors only, clear errors for bad paths."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import teachers

# What the hub's OneFormer checkpoints ship: the processor would download coco_panoptic.json from the
# shi-labs/oneformer_demo dataset repo while it is constructed.
HUB_STYLE_ONEFORMER_PROCESSOR = {
    "image_processor_type": "OneFormerImageProcessor",
    "class_info_file": "coco_panoptic.json",
    "repo_path": "shi-labs/oneformer_demo",
    "do_resize": True,
    "size": {"shortest_edge": 256, "longest_edge": 426},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "ignore_index": 255,
    "num_text": 6,
    "num_labels": 133,
}


@pytest.fixture
def hub_style_seg(teacher_dirs, tmp_path):
    """The tiny OneFormer with a hub-style preprocessor config whose class-info file is nowhere on disk."""
    out = tmp_path / "seg_hub_style"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher_dirs["seg"] / name, out / name)
    (out / "preprocessor_config.json").write_text(json.dumps(HUB_STYLE_ONEFORMER_PROCESSOR))
    return out


def test_oneformer_constructs_offline_with_a_hub_style_processor(hub_style_seg, images, demo_teachers):
    from transformers import OneFormerImageProcessorPil

    # The trap this guards against: the stock constructor goes to the hub for the class-info file.
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        OneFormerImageProcessorPil.from_pretrained(hub_style_seg)

    for backend in ("pil", "torchvision"):
        teacher = teachers.create({"kind": "oneformer", "model": str(hub_style_seg), "image_size": 256,
                                   "processor_backend": backend})
        out = teacher(teacher.preprocess(images[:2]))
        assert out.shape == (2, 576, 128) and torch.isfinite(out).all()
    # Same weights and the same processor settings as the demo teacher give the same targets.
    demo = demo_teachers["seg"]
    torch.testing.assert_close(out, demo(demo.preprocess(images[:2])), atol=1e-3, rtol=1e-3)


@pytest.fixture
def full_unclip_pipeline(teacher_dirs, tmp_path):
    """A diffusers-style pipeline directory whose unet/ and vae/ would fail to load if anything touched them."""
    out = shutil.copytree(teacher_dirs["gen"], tmp_path / "unclip")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableUnCLIPImg2ImgPipeline",
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (out / part).mkdir()
        (out / part / "config.json").write_text(json.dumps({"_class_name": cls, "not": "a real config"}))
        (out / part / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    return out


def test_unclip_builds_only_the_image_encoder(full_unclip_pipeline, images, demo_teachers):
    diffusers_was_loaded = "diffusers" in sys.modules
    teacher = teachers.create({"kind": "unclip_image_encoder", "model": str(full_unclip_pipeline)})
    if not diffusers_was_loaded:
        assert "diffusers" not in sys.modules
    assert not [m for m in teacher.modules() if type(m).__module__.startswith("diffusers")]
    names = {type(m).__name__ for m in teacher.modules()}
    assert "CLIPVisionModelWithProjection" in names
    assert not names & {"UNet2DConditionModel", "AutoencoderKL"}
    assert all(f.startswith(("image_encoder/", "feature_extractor/")) for f in teacher.weight_files)
    # unet/ and vae/ are not part of the teacher, so they do not move its fingerprint.
    assert teacher.fingerprint == demo_teachers["gen"].fingerprint


def test_pickled_weights_are_refused(teacher_dirs, tmp_path):
    out = tmp_path / "pickled"
    out.mkdir()
    shutil.copy(teacher_dirs["depth"] / "config.json", out / "config.json")
    (out / "pytorch_model.bin").write_bytes(b"a pickle would run code on load")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        teachers.create({"kind": "depth_anything_v2", "model": str(out), "layers": [0]})


@pytest.mark.parametrize("model", ["runs/nowhere/assets/teachers/depth", "./depth", "/abs/missing/dir"])
def test_missing_local_directory_names_the_field(model):
    with pytest.raises(FileNotFoundError, match=r"spec\.model: no such directory"):
        teachers.create({"kind": "depth_anything_v2", "model": model})


def test_uncached_hub_id_fails_readably_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"spec\.model: cannot get nobody-here/no-such-model"):
        teachers.create({"kind": "depth_anything_v2", "model": "nobody-here/no-such-model"})


def test_revision_is_for_hub_ids_only(teacher_dirs):
    with pytest.raises(ValueError, match="revision"):
        teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0],
                         "revision": "main"})
