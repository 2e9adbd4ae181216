"""The command line as a user meets it: help, one-line errors, exit codes, status output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DEMO_BLOCKS, DEMO_TEACHERS, MORE_SHARD, REPO


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo-assets", "index", "precompute", "status", "train"):
        assert command in result.stdout


def test_status_reports_rows_teachers_shapes_and_fingerprints(demo_store):
    result = run_cli("status", str(demo_store))
    assert result.returncode == 0, result.stderr
    for name in ("depth", "seg", "gen"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert "40/40 rows" in line and "complete" in line and "fingerprint" in line


@pytest.mark.timeout(300)
def test_status_of_a_grown_store_counts_its_samples_and_only_the_target_rows_in_use(grown_dir):
    result = run_cli("status", str(grown_dir / "store"))
    assert result.returncode == 0, result.stderr
    assert "44 samples: 41 distinct images, 1 duplicates" in result.stdout
    assert "2 without a target row" in result.stdout
    for name in ("depth", "seg", "gen"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert "41/41 rows (4/4 blocks, complete), 0 reused" in line  # rows 40..47 are a gap, not rows to do


@pytest.mark.timeout(300)
def test_status_counts_duplicates_and_rows_reused_from_another_store(grown_dir, ray_local, tmp_path):
    import shutil

    from pipeline.precompute import PrecomputeConfig, run_precompute

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in (MORE_SHARD, "demo-00000.tar"):  # the demo's first image comes twice: `again`, then its own
        shutil.copy(grown_dir / "shards" / name, shards)
    store = tmp_path / "store"
    run_precompute(str(shards), str(DEMO_TEACHERS), str(store),
                   PrecomputeConfig(**DEMO_BLOCKS, reuse=(str(grown_dir / "store"),)),
                   progress=False)

    result = run_cli("status", str(store))
    assert result.returncode == 0, result.stderr
    assert f"store {store}: 14 samples: 11 distinct images, 1 duplicates" in result.stdout
    for name in ("depth", "seg", "gen"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert "11/11 rows (1/1 blocks, complete), 11 reused" in line
    assert "last run: 0 teacher-rows computed, 33 reused" in result.stdout

    result = run_cli("status", str(store), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["samples"], status["images"], status["duplicates"], status["text_only"]) == (14, 11, 1, 2)
    assert {t["name"]: t["rows_reused"] for t in status["teachers"]} == {"depth": 11, "gen": 11, "seg": 11}
    assert status["last_run"]["rows_reused"] == 33 and status["problems"] == []


def test_status_of_a_directory_that_is_no_store_is_one_line_and_exit_2(tmp_path):
    result = run_cli("status", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a target store" in result.stderr


def test_unknown_manifest_key_is_named(tmp_path, demo_dir):
    bad = tmp_path / "exp.yaml"
    bad.write_text((REPO / "manifests/experiments/demo.yaml").read_text().replace("seed: 0", "seed: 0\nsede: 1"))
    result = run_cli("train", "--config", str(bad), env={"DEMO_DIR": str(demo_dir)})
    assert result.returncode == 2
    assert "sede" in result.stderr and "Traceback" not in result.stderr


def test_index_writes_one_row_per_sample(demo_dir, tmp_path):
    out = tmp_path / "index.parquet"
    result = run_cli("index", str(demo_dir / "shards"), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 40
    assert table.column_names[:5] == ["row", "shard", "key", "image_sha1", "target_row"]
    assert table.column("target_row").to_pylist() == list(range(40))  # the demo's photos are all distinct
    assert "40 samples (40 distinct images, 0 repeats, 0 without an image)" in result.stdout
