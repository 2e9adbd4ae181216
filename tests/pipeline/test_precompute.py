"""`pipeline precompute` on real shards, a real local Ray and real tiny teachers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from pipeline.cli import main
from pipeline.data.errors import UsageError
from pipeline.precompute import PrecomputeConfig
from tests.conftest import (DEMO_BLOCKS, DEMO_TEACHERS, REPO, ROWS_PER_BLOCK, ROWS_PER_CHUNK,
                            precompute)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_rerun_on_a_finished_store_does_nothing_and_changes_nothing(demo_dir, store_copy):
    before = snapshot(store_copy)
    summary = precompute(demo_dir / "shards", store_copy)
    assert summary.nothing_to_do
    assert summary.rows_computed == 0
    assert snapshot(store_copy) == before


def test_lost_block_records_are_recomputed_bit_identically(demo_dir, demo_store, store_copy):
    """A crash after writing data but before the record: the block is redone and gives the same bytes."""
    for name in ("depth", "gen"):
        (store_copy / "_blocks" / name / "000001.json").unlink()
    summary = precompute(demo_dir / "shards", store_copy)
    assert summary.blocks_computed == 2
    assert summary.rows_computed == 2 * ROWS_PER_BLOCK
    for name in ("depth", "seg", "gen"):
        a = zarr.open_array(str(demo_store / name / "target"))[:]
        b = zarr.open_array(str(store_copy / name / "target"))[:]
        assert a.tobytes() == b.tobytes()


def test_each_run_summary_records_the_settings_it_was_given(demo_dir, store_copy, capsys):
    """`STORE/_runs/*.json` holds the run's whole PrecomputeConfig: the flags a user passed, the defaults of the rest."""
    (first,) = (store_copy / "_runs").glob("*.json")  # the demo store's own run, called from Python
    assert json.loads(first.read_text())["config"] == PrecomputeConfig(**DEMO_BLOCKS).model_dump(mode="json")
    (store_copy / "_blocks" / "depth" / "000001.json").unlink()  # one block left to do, so that the run does work
    code = main(["precompute", "--shards", str(demo_dir / "shards"), "--teachers", str(DEMO_TEACHERS),
                 "--store", str(store_copy), "--rows-per-block", str(ROWS_PER_BLOCK), "--rows-per-chunk",
                 str(ROWS_PER_CHUNK), "--max-pixels", "40000000", "--workers", "1", "--feed", "inline", "--quiet"])
    assert code == 0, capsys.readouterr().err
    (second,) = set((store_copy / "_runs").glob("*.json")) - {first}
    run = json.loads(second.read_text())
    assert run["rows_computed"] == ROWS_PER_BLOCK and run["teachers"] == ["depth", "gen", "seg"]
    assert run["config"] == {"address": None, "batch_size": None, "workers": 1, "rows_per_block": ROWS_PER_BLOCK,
                             "rows_per_chunk": ROWS_PER_CHUNK, "max_pixels": 40_000_000, "feed": "inline",
                             "reuse": []}
    assert PrecomputeConfig.model_validate(run["config"]).max_pixels == 40_000_000  # a summary rebuilds its config


def test_store_for_other_shards_is_refused_naming_the_difference(demo_dir, store_copy, tmp_path):
    other = tmp_path / "shards"
    shutil.copytree(demo_dir / "shards", other)
    first = sorted(other.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[0][0].name = "renamed." + members[0][0].name.split(".", 1)[1]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(UsageError, match=r"built for other shards.*renamed"):
        precompute(other, store_copy)


def test_cli_refuses_wrong_shards_with_exit_code_2(demo_dir, store_copy, tmp_path):
    other = tmp_path / "one"
    other.mkdir()
    shutil.copy(sorted((demo_dir / "shards").glob("*.tar"))[0], other)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "precompute", "--shards", str(other), "--teachers", str(DEMO_TEACHERS),
         "--store", str(store_copy), "--quiet"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ},
    )
    assert result.returncode == 2, result.stderr
    assert "error: store" in result.stderr and "Traceback" not in result.stderr


def test_broken_samples_are_recorded_and_the_job_goes_on(demo_dir, demo_store, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    source = sorted((demo_dir / "shards").glob("*.tar"))[0]
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg")]
    broken = {jpgs[0]: b"", jpgs[1]: b"\xff\xd8\xff not really a jpeg"}
    with tarfile.open(shards / source.name, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = broken.get(i, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    store = tmp_path / "store"
    summary = precompute(shards, store)
    assert summary.failures == 2 * 3  # two bad images, three teachers each
    errors = pq.read_table(store / "errors.parquet").to_pylist()
    assert sorted({e["row"] for e in errors}) == [0, 1]
    assert {e["teacher"] for e in errors} == {"depth", "seg", "gen"}
    assert any("empty image" in e["error"] for e in errors)
    valid = zarr.open_array(str(store / "depth" / "valid"))[:]
    assert valid[:2].tolist() == [0, 0] and valid[2:].all()
    # Good samples get exactly the targets of the clean run.
    clean = zarr.open_array(str(demo_store / "depth" / "target"))
    ours = zarr.open_array(str(store / "depth" / "target"))
    n = ours.shape[0]
    np.testing.assert_array_equal(ours[2:n], clean[2:n])
