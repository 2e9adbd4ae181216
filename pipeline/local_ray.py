"""A local Ray whose processes die with the process that started it, even when that process is SIGKILLed.

`ray.init` starts gcs_server, raylet, the dashboard head, the log monitor and the autoscaler monitor as children
of the caller; raylet then starts DashboardAgent, RuntimeEnvAgent and the workers. After a kill -9 of the caller
Ray's own fate sharing takes those direct children down at once and the workers notice within a few seconds, but
the two agents live on for about a minute (62 s measured with Ray 2.60). `ray_session` therefore starts a
watchdog process that remembers every process of the local Ray and kills the ones still alive once the caller is
gone.

    from pipeline.local_ray import ray_session

    with ray_session(address, include_dashboard=False) as ray:
        ray.get(...)

The watchdog learns that the caller is gone from its stdin: a pipe whose only write end the caller holds, which
the kernel closes however the caller ends. It is run as `python -m pipeline.local_ray PID:CREATE_TIME ...`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

POLL_SECONDS = 0.5
# Long enough for the watchdog's last scan and kill; it never waits on the processes it kills.
WATCHDOG_EXIT_SECONDS = 10.0
# psutil derives create times from clock ticks (0.01 s), so two readings of one process agree far closer than this.
CREATE_TIME_TOLERANCE = 1e-3


@contextmanager
def ray_session(address: str | None = None, **init_kwargs) -> Iterator:
    """Connect to `address` (or $RAY_ADDRESS) or start a local Ray, and yield the `ray` module.

    A Ray already initialised in this process (a test's session fixture, a caller's own `ray.init`) is used as it
    is: `address` and `init_kwargs` are ignored, and it is neither shut down nor watched. Otherwise
    `ray.init(address=address, **init_kwargs)` runs; the processes it started, if any (there are none when it
    joins a running cluster), are shut down with `ray.shutdown()` on exit and killed, with everything they
    started, if this process dies first, even by SIGKILL. Processes forked (not exec'd) from this process inherit
    the watchdog's pipe, so the watchdog acts only once they are gone too.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    try:
        ray.init(address=address, **init_kwargs)
    except BaseException:
        # A half-started local Ray has no driver to shut it down: its processes would linger like after a kill.
        _kill(_tree(child for child in me.children() if child.pid not in before))
        raise
    started = [child for child in me.children() if child.pid not in before]
    watchdog = _start_watchdog(_tree(started)) if started else None
    try:
        yield ray
    finally:
        try:
            ray.shutdown()
        finally:
            if watchdog is not None:
                _stop_watchdog(watchdog)


def _start_watchdog(processes: set[psutil.Process]) -> subprocess.Popen:
    # The caller's snapshot goes on the command line so that a kill right after this call still finds the
    # processes raylet started before it, which the watchdog could no longer reach from their dead parent.
    idents = [f"{p.pid}:{p.create_time()!r}" for p in processes if _alive(p)]
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "pipeline.local_ray", *idents],
        # The package's parent first on sys.path, so the watchdog imports this very file from any working directory.
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # Its own session, so a Ctrl-C or a kill of the caller's process group does not take it down before it acts.
        start_new_session=True)
    # Any process that inherited the write end (an exec'd child holding it open) would keep the watchdog from ever
    # seeing EOF; Python creates the pipe close-on-exec and Popen's close_fds keeps it out of later children.
    assert not os.get_inheritable(watchdog.stdin.fileno()), "the watchdog's pipe must not be inherited"
    return watchdog


def _stop_watchdog(watchdog: subprocess.Popen) -> None:
    watchdog.stdin.close()
    try:
        watchdog.wait(timeout=WATCHDOG_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        pass  # Still mopping up on its own; nothing here depends on it having finished.


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(roots: Iterable[psutil.Process]) -> set[psutil.Process]:
    """The roots and all their living descendants; psutil.Process compares by pid and create time."""
    found = set()
    for root in roots:
        found.add(root)
        try:
            found.update(root.children(recursive=True))
        except psutil.Error:
            pass
    return found


def _descendants(known: set[psutil.Process]) -> set[psutil.Process]:
    """Every living process whose parent chain reaches a process in `known`, from one scan of the process table."""
    children: dict[int, list[psutil.Process]] = {}
    for process in psutil.process_iter(["ppid"]):
        children.setdefault(process.info["ppid"], []).append(process)
    found: set[psutil.Process] = set()
    stack = [p for p in known if _alive(p)]
    while stack:
        for child in children.get(stack.pop().pid, []):
            if child not in found and child not in known:
                found.add(child)
                stack.append(child)
    return found


def _kill(processes: Iterable[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()  # psutil refuses if the pid now belongs to another process
        except psutil.Error:
            pass


def _watch(idents: list[str], stdin_fd: int) -> None:
    """Record the given processes and, every POLL_SECONDS, their descendants; kill all recorded ones at stdin EOF.

    Nothing recorded is forgotten: once raylet dies its children are re-parented away from every recorded process,
    and only the record still names them.
    """
    known: set[psutil.Process] = set()
    for ident in idents:
        pid, create_time = ident.split(":", 1)
        try:
            process = psutil.Process(int(pid))
            if abs(process.create_time() - float(create_time)) < CREATE_TIME_TOLERANCE:
                known.add(process)
        except psutil.Error:
            pass
    while True:
        known |= _descendants(known)
        readable, _, _ = select.select([stdin_fd], [], [], POLL_SECONDS)
        if readable and not os.read(stdin_fd, 4096):
            break
    known |= _descendants(known)
    _kill(known)


if __name__ == "__main__":
    _watch(sys.argv[1:], sys.stdin.fileno())
