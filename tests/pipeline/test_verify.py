"""`pipeline verify` says yes to a good store and names what is wrong with a damaged one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import DEMO_TEACHERS, REPO

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
    import shutil

    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in sorted((demo_dir / "shards").glob("*.tar"))[:3]:
        shutil.copy(tar, shards)
    result = verify(store_copy, "--shards", str(shards))
    assert result.returncode == 1
    assert "the shards differ" in result.stdout
