"""Joining a Ray cluster, or starting a local Ray whose processes die with the process that started it, even when
that process is SIGKILLed.

Which Ray a job uses is decided here and nowhere else: the address it is given (`--address`), else $RAY_ADDRESS,
else a fresh local Ray. Ray's own `ray.init()` without an address would join whatever cluster the last `ray start`
on this machine recorded (its `ray_current_cluster` file), which may be someone else's or long gone; a job never
does that. A named cluster must answer within CONNECT_TIMEOUT_SECONDS, and a refusal (an unreachable address, a
cluster that wants Ray's authentication token) is a UsageError naming the fix, raised before the caller touches
anything.

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
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from pipeline.data.errors import UsageError

POLL_SECONDS = 0.5
# Long enough for the watchdog's last scan and kill; it never waits on the processes it kills.
WATCHDOG_EXIT_SECONDS = 10.0
# psutil derives create times from clock ticks (0.01 s), so two readings of one process agree far closer than this.
CREATE_TIME_TOLERANCE = 1e-3
# A cluster's GCS accepts a TCP connection at once; Ray's own client would retry an unreachable one for minutes.
CONNECT_TIMEOUT_SECONDS = 10.0
AUTH_ADVICE = ("it uses Ray's token authentication: run with RAY_AUTH_MODE=token and the cluster's token "
               "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token copied from the head node), or start "
               "every node and this driver with "
               "RAY_AUTH_MODE=disabled on a private network")


@contextmanager
def ray_session(address: str | None = None, **init_kwargs) -> Iterator:
    """Join the cluster at `address` (or $RAY_ADDRESS) or start a fresh local Ray, and yield the `ray` module.

    A Ray already initialised in this process (a test's session fixture, a caller's own `ray.init`) is used as it
    is: `address` and `init_kwargs` are ignored, and it is neither shut down nor watched. Otherwise
    `ray.init(address=..., **init_kwargs)` runs (see `init_address`); a cluster that cannot be joined is a
    UsageError. The processes it started, if any (there are none when it joins a running cluster), are shut down
    with `ray.shutdown()` on exit and killed, with everything they started, if this process dies first, even by
    SIGKILL. Processes forked (not exec'd) from this process inherit the watchdog's pipe, so the watchdog acts only
    once they are gone too. The caller's SIGTERM handler is kept: `ray.init` replaces it with its own.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    target = init_address(address)
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    try:
        with _sigterm_handler_kept():
            ray.init(address=target, **init_kwargs)
    except BaseException as exc:
        # A half-started local Ray has no driver to shut it down: its processes would linger like after a kill.
        _kill(_tree(child for child in me.children() if child.pid not in before))
        # Ray says ConnectionError for a refused token and RuntimeError for a missing one or another Ray version.
        if isinstance(exc, (ConnectionError, RuntimeError)) and target != "local":
            raise UsageError(_join_failure(target, exc)) from None
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


def init_address(address: str | None) -> str:
    """What `ray.init` is given: the named cluster's host:port once it answers, or "local" when none is named.

    `address` wins over $RAY_ADDRESS. "auto" means the cluster that `ray start` last recorded on this machine, as
    in Ray, and it must be up. Raises UsageError, within CONNECT_TIMEOUT_SECONDS, for a cluster that cannot be
    reached.
    """
    named = address or os.environ.get("RAY_ADDRESS") or None
    if named is None or named == "local":
        return "local"
    where = named
    if named == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            where = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise UsageError("--address auto: no Ray cluster was started on this machine (`ray start --head`); "
                             "pass the head node's HOST:PORT, or leave --address unset for a local Ray") from None
    host, _, port = where.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {named}: expected HOST:PORT of a Ray head node (e.g. 10.0.0.1:6379), "
                         "ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {where} ({exc.strerror or exc}): check that `ray start "
                         "--head` runs there and that --address or $RAY_ADDRESS names it, or unset both for a "
                         "local Ray") from None
    return where


def _join_failure(address: str, exc: BaseException) -> str:
    """The one line for a cluster that answered but would not take this driver."""
    causes, cause = [], exc
    while cause is not None and len(causes) < 8:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(causes)
    if "Unauthenticated" in text or "InvalidAuthToken" in text or "token" in text.lower():
        return f"the Ray cluster at {address} refused this driver's authentication: {AUTH_ADVICE}"
    return f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}"


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """`ray.init` installs a SIGTERM handler that exits at once; the caller's own (the CLI's) must stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
