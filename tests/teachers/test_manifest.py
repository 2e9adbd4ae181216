"""Manifest loading: env expansion, strict validation, and error messages that name the file and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import teachers
from teachers.kinds.depth_anything import DepthAnythingSpec
from pipeline.data.config import expand_env

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "teachers"
DEMO_MANIFEST = MANIFESTS / "demo.yaml"
OLAVLM_MANIFEST = MANIFESTS / "olavlm.yaml"


def test_demo_manifest_expands_demo_dir(demo_root):
    manifest = teachers.load_manifest(DEMO_MANIFEST, environ={"DEMO_DIR": str(demo_root)})
    assert list(manifest.teachers) == ["depth", "seg", "gen"]  # file order is kept
    depth, seg, gen = manifest.teachers.values()
    assert depth.model == f"{demo_root}/assets/teachers/depth" and depth.layers == (0, 1, 2, 3)
    assert (seg.kind, seg.image_size, seg.grid) == ("oneformer", 256, 24)
    assert gen.kind == "unclip_image_encoder" and gen.model.endswith("/assets/teachers/gen")
    assert {s.storage_dtype for s in manifest.teachers.values()} == {"float16"}


def test_demo_manifest_default_dir():
    manifest = teachers.load_manifest(DEMO_MANIFEST, environ={})
    assert manifest.teachers["depth"].model == "runs/demo/assets/teachers/depth"


def test_olavlm_manifest_has_the_paper_settings():
    manifest = teachers.load_manifest(OLAVLM_MANIFEST, environ={})
    depth, seg, gen = (manifest.teachers[n] for n in ("depth", "seg", "gen"))
    assert depth.model == "depth-anything/Depth-Anything-V2-Large-hf"
    assert depth.layers == (4, 11, 17, 23) and depth.image_size == 336 and depth.channel_order == "rgb"
    assert seg.model == "shi-labs/oneformer_coco_swin_large" and (seg.image_size, seg.grid) == (768, 24)
    assert gen.model == "stabilityai/stable-diffusion-2-1-unclip"
    assert (gen.image_encoder_subfolder, gen.feature_extractor_subfolder) == ("image_encoder", "feature_extractor")


def _write(tmp_path, body: str):
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    "body, expected",
    [
        ("teachers:\n  depth:\n    kind: depth_anything_v2\n    model: a/b\n    layers: [4, -1]\n",
         "x.yaml: teachers.depth.layers: "),
        ("teachers:\n  depth:\n    kind: depth_anything_v2\n    model: a/b\n    layers: []\n",
         "x.yaml: teachers.depth.layers: "),
        ("teachers:\n  seg:\n    kind: oneformer\n    model: a/b\n    gird: 24\n",
         "x.yaml: teachers.seg.gird: unknown field"),
        ("teachers:\n  seg:\n    kind: oneformer\n    grid: zero\n",
         "x.yaml: teachers.seg.grid: "),
        ("teachers:\n  gen:\n    kind: unclip_image_encoder\n    storage_dtype: float32\n",
         "x.yaml: teachers.gen.storage_dtype: "),
        ("teachers:\n  gen:\n    kind: unclip_image_encoder\n    num_gpus: -0.5\n",
         "x.yaml: teachers.gen.num_gpus: "),
        ("teachers:\n  depth:\n    kind: dino_v3\n",
         "x.yaml: teachers.depth.kind: unknown kind 'dino_v3'; known kinds: depth_anything_v2, hf_vision, oneformer, "
         "timm, unclip_image_encoder"),
        ("teachers:\n  depth:\n    model: a/b\n", "x.yaml: teachers.depth.kind: missing"),
        ("teachers:\n  depth:\n    kind: depth_anything_v2\n    model: ${NOT_SET_ANYWHERE}/depth\n",
         "x.yaml: teachers.depth.model: environment variable NOT_SET_ANYWHERE is not set"),
        ("teachers: {}\n", "x.yaml: teachers: "),
        ("teacher:\n  depth:\n    kind: oneformer\n", "; teacher: unknown field"),
        ("teachers:\n  'my depth':\n    kind: oneformer\n", "x.yaml: teachers: "),
        ("- just a list\n", "x.yaml: expected a mapping"),
        ("teachers: [\n", "x.yaml: not valid YAML"),
    ],
)
def test_manifest_errors_name_file_and_field(tmp_path, body, expected):
    path = _write(tmp_path, body)
    with pytest.raises(teachers.ManifestError) as info:
        teachers.load_manifest(path, environ={})
    message = str(info.value)
    assert message.startswith(str(path.parent)) and expected in message, message
    assert "\n" not in message


def test_missing_manifest_file(tmp_path):
    with pytest.raises(teachers.ManifestError, match="cannot read"):
        teachers.load_manifest(tmp_path / "nope.yaml")


def test_expand_env_rules():
    env = {"A": "alpha", "EMPTY": ""}
    data = {"x": "${A}/${B:-beta}", "y": ["${EMPTY:-fallback}", "$${A}", 3], "${A}": "${EMPTY}"}
    assert expand_env(data, env) == {"x": "alpha/beta", "y": ["fallback", "${A}", 3], "${A}": ""}


def test_layers_are_stored_sorted_and_specs_are_frozen():
    spec = DepthAnythingSpec(layers=[23, 4, 17, 11])
    assert spec.layers == (4, 11, 17, 23)
    with pytest.raises(Exception):
        spec.layers = (1,)
