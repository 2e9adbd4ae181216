"""Precompute on a real two-node Ray cluster with Ray's token authentication, losing a node mid-run, and the ways a
driver can fail to join one: real `ray` processes, real SIGKILL of a raylet, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, REPO, small_block_flags
from tests.pipeline.test_precompute_faults import wait_for_records
from tests.pipeline.test_store_promises import store_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


class TwoNodeCluster:
    """tests/pipeline/two_node_cluster.py in a child process: a head node and a second node, one CPU each."""

    def __init__(self):
        self.token = secrets.token_hex(16)
        self.process = subprocess.Popen([sys.executable, "-m", "tests.pipeline.two_node_cluster", self.token],
                                        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line, f"the cluster did not start (exit code {self.process.poll()})"
        started = json.loads(line)
        self.address, self.second_raylet_pid = started["address"], started["second_raylet_pid"]

    def driver_env(self, **auth) -> dict[str, str]:
        """The environment of a driver that sends the cluster's token, or `auth` instead."""
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **auth}
        return {k: v for k, v in env.items() if v is not None}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster():
    started = TwoNodeCluster()
    yield started
    started.close()


def wait_for_work_under(raylet_pid: int, timeout: float = 120) -> None:
    """Until a worker started by this raylet (its node's) is computing a block: Ray titles the process
    `ray::BlockWorker.process` while it runs that method."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(raylet_pid).children(recursive=True):
            try:
                if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::BlockWorker.process"):
                    return
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no worker of raylet {raylet_pid} computed a block within {timeout}s")


def precompute(demo_dir: Path, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "precompute", "--shards", str(demo_dir / "shards"),
            "--teachers", str(DEMO_TEACHERS), "--store", str(store), "--quiet", *small_block_flags(one_worker=False),
            *extra]


def last_run(store: Path) -> dict:
    return json.loads(sorted((store / "_runs").glob("*.json"))[-1].read_text())


def test_a_job_joined_to_a_two_node_cluster_uses_both_nodes_and_writes_the_local_runs_bytes(
        cluster, demo_dir, small_block_store, tmp_path):
    store = tmp_path / "store"
    done = subprocess.run(precompute(demo_dir, store, "--address", cluster.address), cwd=REPO,
                          env=cluster.driver_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_run(store)["nodes"] == 2, "the workers did not land on both nodes"
    assert store_files(store) == store_files(small_block_store)


def test_losing_a_node_mid_run_finishes_on_the_nodes_left_with_the_local_runs_bytes(
        demo_dir, small_block_store, tmp_path):
    store = tmp_path / "store"
    doomed = TwoNodeCluster()
    try:
        command = precompute(demo_dir, store, "--address", doomed.address)
        job = subprocess.Popen(command, cwd=REPO, env=doomed.driver_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        wait_for_records(store, at_least=1)
        wait_for_work_under(doomed.second_raylet_pid)
        os.kill(doomed.second_raylet_pid, signal.SIGKILL)
        _, stderr = job.communicate(timeout=300)
        # The lost worker's blocks went to the worker left on the head node, within the same run.
        assert job.returncode == 0, stderr[-2000:]
        assert last_run(store)["nodes"] == 2, "the second node had no worker to lose"
        assert verify_store(str(store), shards=str(demo_dir / "shards"), manifest=str(DEMO_TEACHERS)).problems == []
        assert store_files(store) == store_files(small_block_store)
    finally:
        doomed.close()


def test_a_run_started_just_after_a_node_died_never_waits_for_its_resources(demo_dir, small_block_store, tmp_path):
    # The head still counts the dead node's CPU for a while; a worker planned for it can never start.
    store = tmp_path / "store"
    doomed = TwoNodeCluster()
    try:
        os.kill(doomed.second_raylet_pid, signal.SIGKILL)
        done = subprocess.run(precompute(demo_dir, store, "--address", doomed.address), cwd=REPO,
                              env=doomed.driver_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert store_files(store) == store_files(small_block_store)
    finally:
        doomed.close()


def test_a_cluster_that_wants_a_token_refuses_a_driver_without_one_in_one_line_before_the_store_exists(
        cluster, demo_dir, tmp_path):
    store = tmp_path / "store"
    refused = subprocess.run(precompute(demo_dir, store, "--address", cluster.address), cwd=REPO,
                             env=cluster.driver_env(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=None),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "authentication" in error[0] and "RAY_AUTH_MODE=token" in error[0], refused.stderr
    assert not store.exists()


def test_an_unreachable_address_is_exit_2_within_seconds_before_the_store_exists(demo_dir, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "store"
    started = time.monotonic()
    refused = subprocess.run(precompute(demo_dir, store, "--address", f"127.0.0.1:{port}"), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not store.exists()


def test_without_an_address_a_job_starts_its_own_ray_whatever_ray_start_recorded(demo_dir, tmp_path):
    # What `ray start` leaves behind after its cluster is gone: Ray's own ray.init() would try to join it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    (ray_tmp / "ray").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{probe.getsockname()[1]}")
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    one_shard = str(sorted((demo_dir / "shards").glob("*.tar"))[0])
    done = subprocess.run([sys.executable, "-m", "pipeline", "precompute", "--shards", one_shard, "--teachers",
                           str(DEMO_TEACHERS), "--store", str(store), "--quiet", *small_block_flags()],
                          cwd=REPO, env={**env, "RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_run(store)["nodes"] == 1
