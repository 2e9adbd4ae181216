"""Training refuses a store that does not belong to its shards or tasks, and never trains on a misaligned sample."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEMO_EXPERIMENT, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHARD = "demo-00001.tar"


def train_cli(demo_dir, tmp_path, *settings: str) -> subprocess.CompletedProcess:
    base = [f"output_dir={tmp_path / 'out'}", "train.max_steps=3", "data.batch_size=4", "data.num_workers=1",
            "data.shuffle=false", "train.trackers=[]"]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", str(DEMO_EXPERIMENT), "--quiet",
         *(f"--set={s}" for s in [*base, *settings])],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "DEMO_DIR": str(demo_dir)}, timeout=240,
    )


def swap_image(shard, key: str, donor: str) -> None:
    """Rewrite `shard` in place with `key`'s image bytes replaced by `donor`'s: same names, same order."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    payloads = {m.name: data for m, data in members}
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{key}.jpg":
                data = payloads[f"{donor}.jpg"]
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_a_sample_whose_image_changed_is_reported_and_not_trained_on(demo_store, demo_dir, tmp_path):
    shard = tmp_path / SHARD
    shutil.copy(demo_dir / "shards" / SHARD, shard)
    # Fifth of ten samples: the 12 samples of 3 steps x 4 meet it in the first pass over the shard only.
    key, donor = "000010004", "000010007"
    swap_image(shard, key, donor)
    result = train_cli(demo_dir, tmp_path, f"data.shards={shard}", "train.record_rows=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{SHARD}/{key}" in result.stderr and "sha1 mismatch" in result.stderr
    assert "skipped samples: 1 x image differs" in result.stdout

    index = pq.read_table(demo_store / "index.parquet").to_pylist()
    row = next(r["row"] for r in index if (r["shard"], r["key"]) == (SHARD, key))
    shard_rows = {r["row"] for r in index if r["shard"] == SHARD}
    trained = json.loads((tmp_path / "out" / "rows-rank0.json").read_text())
    assert len(trained) == 12
    assert row not in trained
    assert set(trained) == shard_rows - {row}


def test_shards_rewritten_under_the_same_names_are_refused_in_one_line(demo_store, demo_dir, tmp_path):
    from pipeline.demo.llava import write_demo_shards

    other = write_demo_shards(tmp_path / "other", num_samples=8, num_shards=2, seed=1, progress=False)
    result = train_cli(demo_dir, tmp_path, f"data.shards={other[1]}")
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 0 of the samples in"), error
    assert "sha1 mismatch" in error and "rewritten" in error
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["renamed shards", "teacher not in store"])
def test_a_store_for_other_shards_or_other_teachers_is_refused(demo_store, demo_dir, tmp_path, case):
    if case == "renamed shards":
        renamed = tmp_path / "shards"
        renamed.mkdir()
        shutil.copy(demo_dir / "shards" / SHARD, renamed / "laion-00001.tar")
        settings, expected = [f"data.shards={renamed}"], "was not built for shard laion-00001.tar"
    else:
        settings = ["model.tasks={depth: {layers: [3, 4]}, normals: {layers: [2, 4]}}", "model.task_order=null"]
        expected = "has no teacher 'normals'"
    result = train_cli(demo_dir, tmp_path, *settings)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: store ") and expected in error, error
    assert "Traceback" not in result.stderr
