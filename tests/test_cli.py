"""The command line as a user meets it: help, one-line errors, exit codes, status output."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


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
    assert table.column_names[:5] == ["row", "shard", "key", "image_sha1", "caption_present"]
