"""Stores and shards on S3: a real S3-compatible server (moto) on 127.0.0.1, a real precompute job."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from tests.conftest import DEMO_TEACHERS, REPO, ROWS_PER_BLOCK, ROWS_PER_CHUNK

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def s3_env(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env
    server.stop()


def test_precompute_reads_shards_from_and_writes_the_store_to_s3(s3_env, demo_dir, demo_store):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("data")
    fs.put(str(demo_dir / "shards") + "/", "data/shards/", recursive=True)
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", "s3://data/shards",
               "--teachers", str(DEMO_TEACHERS), "--store", "s3://data/store", "--quiet",
               "--rows-per-block", str(ROWS_PER_BLOCK), "--rows-per-chunk", str(ROWS_PER_CHUNK)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]

    remote = zarr.open_group("s3://data/store", mode="r")
    local = zarr.open_group(str(demo_store), mode="r")
    assert remote.attrs["dataset_fingerprint"] == local.attrs["dataset_fingerprint"]
    for name in ("depth", "seg", "gen"):
        np.testing.assert_array_equal(remote[name]["target"][:], local[name]["target"][:])
        assert remote[name].attrs["complete"] is True
    assert fs.exists("data/store/index.parquet") and fs.exists("data/store/errors.parquet")
    assert not fs.exists("data/store/_lock")

    status = subprocess.run([sys.executable, "-m", "pipeline", "status", "s3://data/store"], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ})
    assert status.returncode == 0 and "40/40 rows" in status.stdout
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout
