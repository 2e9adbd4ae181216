"""One store, many experiments: a teacher added later by manifest alone, and trainings that compute nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.precompute import PrecomputeConfig, run_precompute
from tests.conftest import DEMO_BLOCKS, DEMO_EXPERIMENT, DEMO_TEACHERS, REPO
from tests.teachers.tiny_generic import build_timm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRAIN_AND_REPORT = """
import json, sys
from student.config import load_experiment
from student.trainer import train
result = train(load_experiment(sys.argv[1], sys.argv[2:]), progress=False)
print(json.dumps({"teacher_modules": sorted(m for m in sys.modules if m.split(".")[0] == "teachers"),
                  "final": result.final_loss}))
"""


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train(demo_dir: Path, out: Path, *overrides: str) -> dict:
    args = [f"output_dir={out}", "train.max_steps=2", "data.num_workers=0", "data.batch_size=2", *overrides]
    result = subprocess.run([sys.executable, "-c", TRAIN_AND_REPORT, str(DEMO_EXPERIMENT), *args], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "DEMO_DIR": str(demo_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_timm_teacher_added_by_manifest_then_two_experiments_from_one_store(demo_dir, store_copy, tmp_path):
    vit, _ = build_timm(tmp_path / "vit", "test_vit")
    manifest = yaml.safe_load(DEMO_TEACHERS.read_text())
    manifest["teachers"]["vit"] = {"kind": "timm", "model": f"local-dir:{vit}", "grid": 4}
    manifest_path = tmp_path / "teachers.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest))
    before = {name: files_of(store_copy / name) for name in ("depth", "seg", "gen")}

    summary = run_precompute(str(demo_dir / "shards"), str(manifest_path), str(store_copy),
                             PrecomputeConfig(**DEMO_BLOCKS),
                             progress=False)
    assert summary.rows_computed == 40  # the new teacher's rows, nothing else
    assert {name: files_of(store_copy / name) for name in ("depth", "seg", "gen")} == before
    assert summary.teachers["vit"]["target_shape"] == [16, 64]

    store_files = files_of(store_copy)
    # Experiment 1 distils the new teacher next to depth; experiment 2 uses seg and gen only.
    first = train(demo_dir, tmp_path / "exp1", f"data.store={store_copy}", "model.tasks={depth: {layers: [3, 4]}, "
                  "vit: {layers: [2, 4]}}", "model.task_order=[depth, vit]")
    second = train(demo_dir, tmp_path / "exp2", f"data.store={store_copy}", "model.tasks={seg: {layers: [2, 3]}, "
                   "gen: {layers: [2, 4]}}", "model.task_order=[gen, seg]")
    assert first["teacher_modules"] == [] and second["teacher_modules"] == []
    assert "vit" in first["final"] and "seg" in second["final"]
    assert files_of(store_copy) == store_files  # training reads, never writes

    provenance = json.loads((tmp_path / "exp1" / "training_provenance.json").read_text())
    vit_attrs = json.loads((store_copy / "vit" / "zarr.json").read_text())["attributes"]
    assert provenance["store"]["store"] == str(store_copy)
    assert provenance["store"]["teachers"]["vit"]["teacher_fingerprint"] == vit_attrs["teacher_fingerprint"]
