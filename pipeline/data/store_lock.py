"""One precompute job per store: the lock file `STORE/_lock`, and the fence that keeps a dead job's workers out.

The lock file holds its holder as JSON: host, pid, start time, heartbeat and a random `token` that names this
run. How it is taken depends on what the store lives on:

- A local or network filesystem (POSIX): the file is opened and `flock`ed. The kernel gives the lock to one
  process only and releases it when that process dies, even by `kill -9`, so there is no staleness to judge
  and no race between two starting runs. NFSv4 and most cluster filesystems honour `flock` across hosts
  (Lustre only when mounted with `-o flock`); a filesystem that refuses `flock` falls back to the next way.
- An object store (`s3://`, ...): the file is created only if absent (S3's `If-None-Match: *`; other fsspec
  filesystems may only check-then-write). Its holder refreshes the heartbeat; a lock whose holder is dead on
  this host, or whose heartbeat is older than `STALE_SECONDS`, is taken over. Two runs that both take over
  the same stale lock can overlap until the loser's next heartbeat finds another token and stops it.

Fencing: workers of a run check that the lock still carries their run's token before they write a block's data
and again before its completion record (`check_fence`). A worker of a dead run therefore stops writing as soon
as another run holds the store, instead of interleaving its writes with the new run's.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import secrets
import socket
import time

from pipeline.data.errors import JobError, UsageError

LOCK_FILE = "_lock"
STALE_SECONDS = 120.0


class FencedOut(JobError):
    """This run no longer holds the store's lock: another run took it over, or the run has ended."""


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def read_holder(fs, root: str) -> dict:
    """The lock file's holder ({} when there is no lock file, it is being written, or it is damaged)."""
    try:
        with fs.open(posixpath.join(root, LOCK_FILE), "rb") as f:
            holder = json.loads(f.read() or b"{}")
    except (FileNotFoundError, ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def check_fence(fs, root: str, token: str) -> None:
    """Raise FencedOut unless the store's lock is held by the run named `token`."""
    holder = read_holder(fs, root)
    if holder.get("token") != token:
        now = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "no run"
        raise FencedOut(f"this run no longer holds the store lock ({now} does); stopping before writing")


def _busy(path: str, holder: dict) -> UsageError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    if holder.get("pid"):
        return UsageError(f"store {path} is being written by another precompute (host {holder.get('host')}, "
                          f"pid {holder.get('pid')}, since {since}); wait for it to finish")
    return UsageError(f"store {path} is being written by another precompute that is starting; wait for it, or "
                      f"remove {path}/{LOCK_FILE} if no precompute is running (an empty lock file is never taken over)")


class StoreLock:
    """Context manager: hold `STORE/_lock` for one precompute run (see the module docstring).

    `token` names the run; pass it to the workers for `check_fence`. `heartbeat()` refreshes an object-store
    lock and raises FencedOut if another run has taken it over; on exit the lock file is removed only if it
    is still this run's.
    """

    def __init__(self, fs, root: str, display: str | None = None):
        self.fs, self.root = fs, root.rstrip("/")
        self.path = posixpath.join(self.root, LOCK_FILE)
        self.display = display or self.root
        self.token = secrets.token_hex(16)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token}
        self._fd: int | None = None

    # ---- taking and giving back ------------------------------------------------------------------------

    def __enter__(self) -> StoreLock:
        self.fs.makedirs(self.root, exist_ok=True)
        if not (_is_local(self.fs) and self._take_kernel_lock()):
            self._take_created_lock()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # Unlink while still holding the flock: a run that opened the old file then sees a different inode
            # and opens the path again (see _take_kernel_lock), so it never holds a lock on a deleted file.
            try:
                if read_holder(self.fs, self.root).get("token") == self.token:
                    os.unlink(self.path)
            finally:
                os.close(self._fd)
                self._fd = None
        elif read_holder(self.fs, self.root).get("token") == self.token:
            self.fs.rm(self.path)

    def _take_kernel_lock(self) -> bool:
        """flock the lock file; False if this filesystem does not support flock."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _busy(self.display, read_holder(self.fs, self.root)) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # its holder released it (and unlinked it) between our open and flock: open it anew
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._payload(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def _take_created_lock(self) -> None:
        """Create the lock file only if absent; take over a stale one once."""
        for attempt in range(2):
            try:
                self._create_exclusive()
                return
            except FileExistsError:
                holder = read_holder(self.fs, self.root)
                if attempt or not self._stale(holder):
                    raise _busy(self.display, holder) from None
                self.fs.rm(self.path)

    def _create_exclusive(self) -> None:
        """Write the lock file if and only if it does not exist (FileExistsError otherwise)."""
        if not _is_local(self.fs):
            self.fs.pipe_file(self.path, self._payload(), mode="create")
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, self._payload())
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- while running ---------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Refresh the heartbeat; FencedOut if the lock is no longer this run's."""
        if self._fd is not None:
            return  # the kernel lock lives as long as this process: nothing can go stale
        check_fence(self.fs, self.root, self.token)
        self.fs.pipe_file(self.path, self._payload())

    def _payload(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}).encode()

    @staticmethod
    def _stale(holder: dict) -> bool:
        if not holder:
            return False  # being written by a run that is starting; an empty file is never taken over
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, TypeError):
                return False
            return False
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS
