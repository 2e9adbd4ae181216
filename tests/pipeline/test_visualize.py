"""`pipeline visualize` on the demo student and the tiny demo teachers: a picture a researcher can read, and the record
of what made it, in the PNG and beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

import teachers
from pipeline.cli import main as cli
from pipeline.visualize import METADATA_KEY
from tests.conftest import DEMO_TEACHERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def demo_image(demo_dir: Path) -> Path:
    return sorted((demo_dir / "llava" / "images").rglob("*.jpg"))[0]


def test_every_demo_task_is_decoded_per_layer_and_the_record_is_in_the_png(demo_checkpoint, demo_dir, tmp_path):
    out = tmp_path / "visualize.png"
    code = cli(["visualize", "--checkpoint", str(demo_checkpoint), "--teachers", str(DEMO_TEACHERS),
                "--image", str(demo_image(demo_dir)), "--seed", "3", "--out", str(out)])

    assert code == 0
    png = Image.open(out)
    record = json.loads(png.text[METADATA_KEY])
    assert record == json.loads(out.with_suffix(".json").read_text())
    assert record["seed"] == 3 and record["checkpoint"] == str(demo_checkpoint.resolve())
    manifest = teachers.load_manifest(DEMO_TEACHERS)
    decoded = {task: info["decoder"]["what"] for task, info in record["tasks"].items()}
    assert decoded == {"depth": "depth map", "seg": "panoptic masks", "gen": "unCLIP image"}
    for task, info in record["tasks"].items():
        # The teachers that decoded are the ones the student was trained against.
        assert info["teacher_fingerprint"] == teachers.spec_fingerprint(manifest.teachers[task])
        assert info["trained_on_fingerprint"] == info["teacher_fingerprint"] and "warning" not in info
        assert info["layers"] and all(isinstance(layer, int) for layer in info["layers"])
    # What decides the generated image besides the prediction and the seed is recorded with it.
    assert {"steps", "scheduler", "guidance_scale", "noise_level"} <= set(record["tasks"]["gen"]["decoder"])
    # One row per task, one column for the image, the teacher's target and each tapped layer.
    columns = 2 + max(len(info["layers"]) for info in record["tasks"].values())
    assert png.width > 200 * columns and png.height > 200 * len(record["tasks"])


def test_a_kind_without_decoder_and_a_missing_teacher_get_rows_that_say_so(demo_checkpoint, demo_dir, tmp_path,
                                                                            capsys):
    from tests.teachers.tiny_generic import build_hf_clip_vision

    clip_dir, _ = build_hf_clip_vision(tmp_path / "clip")
    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    manifest["teachers"]["gen"] = {"kind": "hf_vision", "model": str(clip_dir)}
    del manifest["teachers"]["seg"]
    path = tmp_path / "teachers.yaml"
    path.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "visualize.png"

    assert cli(["visualize", "--checkpoint", str(demo_checkpoint), "--teachers", str(path),
                "--image", str(demo_image(demo_dir)), "--out", str(out)]) == 0

    record = json.loads(out.with_suffix(".json").read_text())
    assert record["tasks"]["gen"]["note"] == "kind hf_vision has no decoder"
    assert record["tasks"]["seg"]["note"] == f"no teacher 'seg' in {path}"
    assert record["tasks"]["depth"]["decoder"]["what"] == "depth map"
    assert "trained on targets of another teacher" in record["tasks"]["gen"]["warning"]
    printed = capsys.readouterr().out
    assert "kind hf_vision has no decoder" in printed and f"wrote {out}" in printed


def test_an_unreadable_image_is_a_usage_error_naming_it(demo_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")

    code = cli(["visualize", "--checkpoint", str(demo_checkpoint), "--teachers", str(DEMO_TEACHERS),
                "--image", str(broken), "--out", str(tmp_path / "v.png")])

    assert code == 2
    assert f"cannot read image {broken}" in capsys.readouterr().err
    assert not (tmp_path / "v.png").exists()
