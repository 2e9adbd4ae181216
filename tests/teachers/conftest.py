"""Tiny real teacher checkpoints (random weights, written by the demo builders) shared by the teacher tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
DEMO_MANIFEST = REPO / "manifests" / "teachers" / "demo.yaml"
OLAVLM_MANIFEST = REPO / "manifests" / "teachers" / "olavlm.yaml"


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    yield


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A DEMO_DIR holding only the three tiny teachers, in the `pipeline demo-assets` layout:
    assets/teachers/depth, assets/teachers/seg, assets/teachers/gen/{image_encoder,feature_extractor}."""
    from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

    root = tmp_path_factory.mktemp("demo_teachers")
    assets = root / "assets" / "teachers"
    build_tiny_depth_anything(assets / "depth")
    build_tiny_oneformer(assets / "seg")
    build_tiny_unclip_image_encoder(assets / "gen")
    return root


@pytest.fixture(scope="session")
def teacher_dirs(demo_root) -> dict[str, Path]:
    return {name: demo_root / "assets" / "teachers" / name for name in ("depth", "seg", "gen")}


@pytest.fixture(scope="session")
def demo_manifest(demo_root):
    """manifests/teachers/demo.yaml with DEMO_DIR pointing at the session's tiny teachers."""
    import teachers

    return teachers.load_manifest(DEMO_MANIFEST, environ={"DEMO_DIR": str(demo_root)})


@pytest.fixture(scope="session")
def images():
    """Six RGB PIL images of different sizes and aspect ratios: four photographs and two noise images."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea()[:, :200], data.rocket()[100:260]]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((37, 91, 3), (120, 64, 3))]
    return [Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in photos + noise]


@pytest.fixture(scope="session")
def demo_teachers(demo_manifest):
    """name -> loaded teacher, built once (loading is cheap but the tests reuse them a lot)."""
    import teachers

    return {name: teachers.create(spec) for name, spec in demo_manifest.teachers.items()}


@pytest.fixture(scope="session")
def generic_models(tmp_path_factory):
    """name -> (folder, in-memory model) for the generic kinds: timm ViT with registers, timm ConvNeXt, timm
    MambaOut (channels-last map), and transformers CLIP vision, DINOv2 with registers and ResNet."""
    from tests.teachers import tiny_generic as tg

    root = tmp_path_factory.mktemp("generic_teachers")
    return {
        "timm_vit": tg.build_timm(root / "timm_vit", "test_vit", reg_tokens=2),
        "timm_convnext": tg.build_timm(root / "timm_convnext", "test_convnext"),
        "timm_mambaout": tg.build_timm(root / "timm_mambaout", "test_mambaout"),
        "hf_clip": tg.build_hf_clip_vision(root / "hf_clip"),
        "hf_dinov2_reg": tg.build_hf_dinov2_registers(root / "hf_dinov2_reg"),
        "hf_resnet": tg.build_hf_resnet(root / "hf_resnet"),
    }


@pytest.fixture(scope="session")
def images8(images):
    """Eight RGB images of different sizes: the six shared ones and two mirrored photographs."""
    from PIL import ImageOps

    return list(images) + [ImageOps.mirror(images[0]), ImageOps.mirror(images[2])]


@dataclass(frozen=True)
class TinyCheckpoint:
    """How the contract tests (test_registry.py) build one kind: `fixture` is the session fixture that writes its
    tiny random-init checkpoint, `spec` turns that fixture's value into the spec fields naming it, and `own_change`
    changes one of the kind's own output fields (so its fingerprint must change)."""

    fixture: str
    spec: Callable[[Any], dict[str, Any]]
    own_change: dict[str, Any] = field(default_factory=dict)


# Every registered kind needs an entry: the contract tests fail for a kind without one.
TINY_CHECKPOINTS: dict[str, TinyCheckpoint] = {
    "depth_anything_v2": TinyCheckpoint("teacher_dirs", lambda dirs: {"model": str(dirs["depth"]),
                                                                      "layers": [0, 1, 2, 3]}, {"layers": [1]}),
    "oneformer": TinyCheckpoint("teacher_dirs", lambda dirs: {"model": str(dirs["seg"]), "image_size": 256},
                                {"grid": 12}),
    "unclip_image_encoder": TinyCheckpoint("teacher_dirs", lambda dirs: {"model": str(dirs["gen"])},
                                           {"processor_backend": "torchvision"}),
    "timm": TinyCheckpoint("generic_models", lambda models: {"model": f"local-dir:{models['timm_vit'][0]}"},
                           {"prefix_tokens": "keep"}),
    "hf_vision": TinyCheckpoint("generic_models", lambda models: {"model": str(models["hf_clip"][0])},
                                {"layers": [1]}),
}


@pytest.fixture(scope="session")
def tiny_spec(request) -> Callable[[str], dict[str, Any]]:
    """kind -> the spec mapping of a tiny random-init checkpoint of that kind (written on first use)."""

    def make(kind: str) -> dict[str, Any]:
        if kind not in TINY_CHECKPOINTS:
            pytest.fail(f"teacher kind {kind!r} is registered but has no tiny checkpoint for the contract tests; "
                        f"add a TinyCheckpoint for it to TINY_CHECKPOINTS in tests/teachers/conftest.py")
        tiny = TINY_CHECKPOINTS[kind]
        return {"kind": kind, **tiny.spec(request.getfixturevalue(tiny.fixture))}

    return make
