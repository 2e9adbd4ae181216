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
    import s3fs

    # fsspec caches filesystem instances: one made for an earlier server would still talk to that server's port.
    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_precompute_reads_shards_from_and_writes_the_store_to_s3(s3_env, demo_dir, demo_store, capsys):
    import s3fs

    from pipeline.cli import main

    fs = s3fs.S3FileSystem()
    fs.mkdir("data")
    fs.put(str(demo_dir / "shards") + "/", "data/shards/", recursive=True)
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", "s3://data/shards",
               "--teachers", str(DEMO_TEACHERS), "--store", "s3://data/store", "--quiet",
               "--rows-per-block", str(ROWS_PER_BLOCK), "--rows-per-chunk", str(ROWS_PER_CHUNK), "--workers", "1"]
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

    # The CLI in this process: neither the status nor a rerun with nothing to do starts Ray.
    assert main(["status", "s3://data/store"]) == 0 and "40/40 rows" in capsys.readouterr().out
    assert main(command[3:]) == 0 and "nothing to do" in capsys.readouterr().out


# ---- the store lock on an object store: conditional create, stale takeover, fencing ------------------------------


def test_racing_runs_on_s3_get_the_lock_exactly_once(s3_env):
    import threading

    import s3fs

    from pipeline.data.errors import UsageError
    from pipeline.data.store import TargetStore

    s3fs.S3FileSystem().mkdir("locks")
    trials, racers = 15, 4
    winners: dict[int, list[int]] = {t: [] for t in range(trials)}
    held = []
    for trial in range(trials):
        barrier = threading.Barrier(racers)

        def race(racer: int, trial=trial, barrier=barrier) -> None:
            lock = TargetStore(f"s3://locks/trial-{trial}").lock()
            barrier.wait()
            try:
                lock.__enter__()
            except UsageError:
                return
            winners[trial].append(racer)
            held.append(lock)  # kept until every trial is over: a second winner would be a second holder

        threads = [threading.Thread(target=race, args=(r,)) for r in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(len(w) == 1 for w in winners.values()), winners
    for lock in held:
        lock.__exit__(None, None, None)


def test_an_s3_lock_is_taken_over_only_when_stale_and_a_lost_lock_stops_its_run(s3_env):
    import json
    import time

    import s3fs

    from pipeline.data.errors import UsageError
    from pipeline.data.store import TargetStore
    from pipeline.data.store_lock import STALE_SECONDS, FencedOut

    fs = s3fs.S3FileSystem()
    fs.mkdir("held")
    other = {"host": "another-host", "pid": 4242, "started": time.time(), "token": "theirs"}
    fs.pipe_file("held/store/_lock", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(UsageError, match="host another-host, pid 4242"):
        TargetStore("s3://held/store").lock().__enter__()

    fs.pipe_file("held/store/_lock", json.dumps({**other, "heartbeat": time.time() - STALE_SECONDS - 1}).encode())
    lock = TargetStore("s3://held/store").lock().__enter__()  # a stale heartbeat: taken over
    lock.heartbeat()
    # Another run takes the lock over (say this run stalled past STALE_SECONDS): the next heartbeat stops this one,
    # and leaving does not remove the other run's lock.
    fs.pipe_file("held/store/_lock", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(FencedOut):
        lock.heartbeat()
    lock.__exit__(None, None, None)
    assert json.loads(fs.cat("held/store/_lock"))["token"] == "theirs"
