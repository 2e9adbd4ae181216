"""`pipeline verify` says yes to a good store and names what is wrong with a damaged one."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.store import TargetStore
from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, MORE_SHARD, REPO

pytestmark = pytest.mark.timeout(300)


def verify(store, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline", "verify", str(store), "--quiet", *extra],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ})


def test_a_good_store_verifies_against_its_shards_and_manifest(demo_store, demo_dir):
    result = verify(demo_store, "--shards", str(demo_dir / "shards"), "--teachers", str(DEMO_TEACHERS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "complete, intact and aligned" in result.stdout


def test_an_edited_shard_file_is_caught(store_copy):
    shard = sorted((store_copy / "seg" / "target" / "c").rglob("*"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify(store_copy)
    assert result.returncode == 1
    assert "seg block" in result.stdout


def test_a_missing_block_record_is_reported_as_incomplete(store_copy):
    (store_copy / "_blocks" / "gen" / "000001.json").unlink()
    result = verify(store_copy)
    assert result.returncode == 1
    assert "gen: 1 of 3 blocks have no completion record" in result.stdout


def test_other_shards_are_reported(store_copy, demo_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in sorted((demo_dir / "shards").glob("*.tar"))[:3]:
        shutil.copy(tar, shards)
    result = verify(store_copy, "--shards", str(shards))
    assert result.returncode == 1
    assert "the shards differ" in result.stdout


# ---- the map from samples to target rows --------------------------------------------------------------------------

def grown_copy(grown_dir, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(grown_dir / "store", copy)
    return copy


def rewrite_target_rows(store_path: Path, rows: dict[int, int]) -> None:
    """Give samples other target rows, as an edit that also re-digests the index would: only the map is wrong."""
    store = TargetStore(str(store_path))
    index = store.read_index()
    target_rows = index.column("target_row").to_numpy().copy()
    for sample, row in rows.items():
        target_rows[sample] = row
    index = index.set_column(index.schema.get_field_index("target_row"), "target_row", pa.array(target_rows))
    pq.write_table(index, store_path / "index.parquet")
    store.group.attrs.update({"index_sha256": hashlib.sha256((store_path / "index.parquet").read_bytes()).hexdigest()})


def test_a_grown_store_verifies_against_its_shards_in_the_order_it_grew(grown_dir):
    # The new shard's name sorts first, but the store holds its samples last.
    result = verify(grown_dir / "store", "--shards", str(grown_dir / "shards"), "--teachers", str(DEMO_TEACHERS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "complete, intact and aligned" in result.stdout


def test_a_grown_store_whose_new_shard_changed_is_reported(grown_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(grown_dir / "shards", shards)
    data = bytearray((shards / MORE_SHARD).read_bytes())
    data[2048] ^= 0xFF  # inside the first image's bytes
    (shards / MORE_SHARD).write_bytes(bytes(data))
    result = verify(grown_dir / "store", "--shards", str(shards))
    assert result.returncode == 1
    assert f"row 40 ({MORE_SHARD}/again): the image bytes differ" in result.stdout


def test_samples_of_other_images_sharing_a_target_row_are_caught(grown_dir, tmp_path):
    store = grown_copy(grown_dir, tmp_path)
    rewrite_target_rows(store, {40: 3})  # `again`, a copy of sample 0's image, given sample 3's row
    problems = verify_store(str(store)).problems
    assert any("samples 3 and 40 share target row 3 but hold other images" in p for p in problems), problems
    assert any("samples 0 and 40 hold the same image" in p and "target rows 0 and 3" in p for p in problems), problems


@pytest.mark.parametrize("sample, row, problem", [
    (5, -1, "1 sample(s) with an image have no target row (first: sample 5, demo-00000.tar/000000005)"),
    (5, 99, "1 sample(s) have a target row in no block of the store (first: sample 5, demo-00000.tar/000000005, "
            "row 99)"),
    (41, 48, "1 sample(s) without an image or with a repeated key have a target row (first: sample 41, "
             "0-more.tar/words, row 48)"),
    (43, 0, "1 sample(s) without an image or with a repeated key have a target row (first: sample 43, "
            "0-more.tar/again, row 0)"),
])
def test_a_target_row_that_does_not_exist_or_should_not_is_caught(grown_dir, tmp_path, sample, row, problem):
    store = grown_copy(grown_dir, tmp_path)
    rewrite_target_rows(store, {sample: row})
    problems = verify_store(str(store)).problems
    assert any(problem in p for p in problems), problems


def test_row_ranges_that_disagree_with_the_index_are_caught(grown_dir, tmp_path):
    store = grown_copy(grown_dir, tmp_path)
    TargetStore(str(store)).group.attrs.update({"row_ranges": [[0, 40]], "num_rows": 40})
    problems = verify_store(str(store)).problems
    assert any("zarr.json says num_samples 44, num_rows 40, row_ranges [[0, 40]] but index.parquet gives "
               "num_samples 44, num_rows 49, row_ranges [[0, 40], [48, 49]]" in p for p in problems), problems


def test_an_invalid_row_without_a_recorded_failure_is_caught(store_copy):
    store = TargetStore(str(store_copy))
    (record,) = [r for r in store.read_records("gen") if r.block == 0]
    block = store.blocks()[0]
    target, valid = store.read_rows("gen", block.start, block.stop)
    target[3], valid[3] = 0, 0  # row 3 unwritten, as a failed one is, but nothing says why
    digest = store.write_block("gen", block, target, valid)
    store.write_record(dataclasses.replace(record, digest=digest, written=record.written - 1))
    problems = verify_store(str(store_copy)).problems
    assert problems == [f"gen block 0: 1 row(s) in use are not valid and no failure is recorded for them (first: "
                        f"target row 3); delete the block's record (in {store_copy}/_blocks/gen/) and rerun "
                        "`pipeline precompute` to compute the block again"], problems
