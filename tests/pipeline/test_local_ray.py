"""A local Ray started by `ray_session` never outlives its driver: real Ray in a child process, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipeline.local_ray import ray_session
from tests.conftest import REPO, kill_left_behind

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The driver under test: enters the session, makes a worker process exist, then waits for the test's next step.
DRIVER = """
import sys, time
from pipeline.local_ray import ray_session

with ray_session(None, num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False) as ray:
    @ray.remote
    class Pinger:
        def ping(self):
            return "pong"

    pinger = Pinger.remote()
    assert ray.get(pinger.ping.remote()) == "pong"
    print("ready", flush=True)
    sys.stdin.readline()
print("closed", flush=True)
sys.stdin.readline()
"""


def start_driver() -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=REPO, start_new_session=True)
    line = driver.stdout.readline().strip()
    assert line == "ready", f"the driver did not start Ray (said {line!r}, exit code {driver.poll()})"
    return driver


def pipe_holders(inode: str, processes: list[psutil.Process]) -> list[int]:
    holders = []
    for process in processes:
        fd_dir = Path(f"/proc/{process.pid}/fd")
        try:
            if any(os.readlink(fd) == inode for fd in fd_dir.iterdir()):
                holders.append(process.pid)
        except OSError:
            pass
    return holders


def describe(processes: list[psutil.Process]) -> str:
    names = []
    for process in processes:
        try:
            names.append(f"{process.pid} {process.name()}")
        except psutil.Error:
            names.append(f"{process.pid} (gone)")
    return ", ".join(names)


def test_a_killed_driver_leaves_no_ray_process_behind():
    driver = start_driver()
    descendants = psutil.Process(driver.pid).children(recursive=True)
    try:
        assert descendants, "the driver started no process: is Ray local?"
        names = {p.name() for p in descendants}
        assert "raylet" in names, f"no raylet among the driver's processes: {sorted(names)}"
        watchdogs = [p for p in descendants if "pipeline.local_ray" in p.cmdline()]
        assert len(watchdogs) == 1, f"expected one watchdog among {describe(descendants)}"
        # Only the driver may hold the write end, or the watchdog would never see EOF after the kill.
        inode = os.readlink(f"/proc/{watchdogs[0].pid}/fd/0")
        holders = pipe_holders(inode, [psutil.Process(driver.pid), *descendants])
        assert set(holders) == {driver.pid, watchdogs[0].pid}, f"{inode} is open in {holders}"

        os.kill(driver.pid, signal.SIGKILL)  # the driver alone: Ray's processes must go because it went
        driver.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"still alive 30 s after the driver was killed: {describe(alive)}"
    finally:
        driver.kill()
        kill_left_behind(descendants)


def test_a_clean_exit_shuts_ray_down_and_leaves_no_process_behind():
    driver = start_driver()
    descendants = psutil.Process(driver.pid).children(recursive=True)
    try:
        assert any(p.name() == "raylet" for p in descendants), describe(descendants)
        driver.stdin.write("\n")
        driver.stdin.flush()
        assert driver.stdout.readline().strip() == "closed"
        # The driver is still running: everything must be gone because the session ended, the watchdog included.
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"still alive 30 s after the session closed: {describe(alive)}"
        driver.stdin.write("\n")
        driver.stdin.flush()
        assert driver.wait(timeout=30) == 0
    finally:
        driver.kill()


def test_an_initialised_ray_is_used_and_left_running(ray_local):
    children_before = {p.pid for p in psutil.Process().children()}
    with ray_session("ray://ignored:1", num_cpus=99) as ray:
        assert ray is ray_local
        assert ray.get(ray.put(7)) == 7
        new = [p for p in psutil.Process().children() if p.pid not in children_before]
        assert not new, f"nothing should be started or watched for an initialised Ray: {describe(new)}"
    assert ray_local.is_initialized()
    assert ray_local.get(ray_local.put(8)) == 8
