"""`teachers list` / `teachers show`: offline descriptions of kinds and manifests, never a crash for missing weights."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

import teachers
from teachers.describe import describe_manifest, kind_table, list_kinds, show_manifest
from tests.teachers.conftest import DEMO_MANIFEST, OLAVLM_MANIFEST

FINGERPRINT = re.compile(r"fingerprint:  ([0-9a-f]{64})\n")


def test_list_kinds_covers_every_kind_with_fields_and_defaults():
    text = list_kinds()
    for kind in teachers.known_kinds():
        assert f"\n{kind}: " in f"\n{text}"
    assert re.search(r"\n    layers +list\[int\] = \[4, 11, 17, 23\]\n", text)
    assert re.search(r"\n    pos_embed_interpolation +transformers \| reference = \"transformers\"\n", text)
    assert "prefix_tokens  drop | keep | cls = \"drop\"" in text
    assert "model              str = (required)" in text
    assert re.search(r"target_shape +\[int, int\] \| null = null +\(not in the fingerprint\)", text)
    rows = {row["kind"]: row for row in kind_table()}
    assert set(rows) == set(teachers.known_kinds())
    assert all(row["description"] for row in rows.values())
    assert {f["name"] for f in rows["hf_vision"]["fields"]} >= {"layers", "combine", "final_norm", "grid"}


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """No hub cache at all, whatever this machine has cached: show must not find (or fetch) the real weights."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_show_olavlm_offline_prints_the_paper_shapes(empty_hub_cache):
    text = show_manifest(OLAVLM_MANIFEST, environ={})
    for name, shape in (("depth", "[576, 1024]"), ("seg", "[576, 1536]"), ("gen", "[1, 1024]")):
        block = text.split(f"\n{name} (")[1].split("\n\n")[0]
        assert f"target shape: {shape} (declared in the manifest; not checked against the model)" in block
        assert "NOT available locally; the fingerprint and the parameter count need them" in block
        assert "fingerprint:  unknown: needs the weights" in block
    assert "stored row:   1,179,648 bytes (576 x 1024 float16" in text
    assert "stored row:   1,769,472 bytes (576 x 1536 float16" in text
    assert "stored row:   2,048 bytes (1 x 1024 float16" in text
    assert "PROBLEM" not in text
    _, reports = describe_manifest(OLAVLM_MANIFEST, environ={})
    assert [r.target_shape for r in reports] == [[576, 1024], [576, 1536], [1, 1024]]
    assert not any(r.weights_available or r.fingerprint or r.problems for r in reports)


def test_show_demo_prints_fingerprints_and_parameter_counts(demo_root, demo_teachers):
    text = show_manifest(DEMO_MANIFEST, environ={"DEMO_DIR": str(demo_root)})
    found = FINGERPRINT.findall(text)
    assert found == [demo_teachers[name].fingerprint for name in ("depth", "seg", "gen")]
    assert text.count("(from the model; matches the declared target_shape)") == 3
    for name, teacher in demo_teachers.items():
        count = sum(p.numel() for p in teacher.parameters())
        assert f"parameters:   {count:,}\n" in text.split(f"\n{name} (")[1]
    assert "weights:      available locally" in text and "PROBLEM" not in text


def test_show_reports_problems_without_raising(generic_models, tmp_path):
    manifest = tmp_path / "mixed.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        teachers:
          wrong_shape:
            kind: timm
            model: local-dir:{generic_models['timm_vit'][0]}
            target_shape: [576, 64]
          no_shape:
            kind: hf_vision
            model: {generic_models['hf_clip'][0]}
            layers: [1, 99]
            combine: concat
          missing:
            kind: timm
            model: local-dir:{tmp_path}/not/built/yet
            target_shape: [100, 64]
        """))
    text = show_manifest(manifest, environ={})
    wrong, bad_layers, missing = (text.split(f"\n{n} (")[1].split("\n\n")[0]
                                  for n in ("wrong_shape", "no_shape", "missing"))
    assert "target shape: [100, 64] (from the model; the manifest declares [576, 64]: MISMATCH)" in wrong
    assert "PROBLEM:      teachers.wrong_shape.target_shape declares [576, 64] but the model gives [100, 64]" in wrong
    assert FINGERPRINT.search(wrong + "\n")
    assert "PROBLEM:      cannot load: spec.layers=[1, 99]" in bad_layers
    assert "target shape: unknown" in bad_layers
    assert "NOT available locally" in missing and "no such directory" in missing
    assert "target shape: [100, 64] (declared in the manifest" in missing


def test_show_without_loading_still_fingerprints(demo_root, demo_teachers):
    _, reports = describe_manifest(DEMO_MANIFEST, environ={"DEMO_DIR": str(demo_root)}, load=False)
    assert [r.fingerprint for r in reports] == [demo_teachers[n].fingerprint for n in ("depth", "seg", "gen")]
    assert all(r.num_parameters is None and not r.shape_checked for r in reports)
    assert reports[0].as_dict()["bytes_per_row"] == 576 * 32 * 2
    # The structured form is plain JSON for `--json` output.
    assert json.loads(json.dumps([r.as_dict() for r in reports]))[2]["spec"]["kind"] == "unclip_image_encoder"


def test_show_reports_compact_storage_as_the_store_keeps_it(empty_hub_cache, tmp_path):
    manifest = tmp_path / "compact.yaml"
    manifest.write_text(textwrap.dedent("""\
        teachers:
          depth:
            kind: depth_anything_v2
            target_shape: [576, 1024]
            quantize: int8
            pool: 2
          gen:
            kind: unclip_image_encoder
            target_shape: [1, 1024]
            pool: 2
        """))
    text = show_manifest(manifest, environ={})
    depth, gen = (text.split(f"\n{n} (")[1].split("\n\n")[0] for n in ("depth", "gen"))
    # 12 x 12 pooled tokens of 1024 int8 codes, and a float16 scale per token.
    assert ("stored row:   147,744 bytes (144 x 1024 int8 + 144 float16 scales, pooled 2 x 2 from 576 tokens, "
            "before compression)") in depth
    assert "stored row:   unknown (the storage does not fit the target shape; see the problem below)" in gen
    assert "PROBLEM:      teachers.gen.pool: pool 2 needs a square token grid divisible by it" in gen
    assert "bytes per image" not in text  # no total while one teacher's row is unknown
    _, reports = describe_manifest(manifest, environ={})
    assert [r.stored_shape for r in reports] == [[144, 1024], None]
    assert reports[0].storage == {"dtype": "float16", "quantize": "int8", "pool": 2}
