"""Named points where a fault-injection test can kill this process, to prove that a rerun recovers from there.

`PIPELINE_KILL_AT=<name>` in the environment makes the process SIGKILL itself when it reaches `failpoint(name)`:
no cleanup, no `finally`, exactly what a `kill -9`, an out-of-memory kill or a lost node does at that moment.
`PIPELINE_KILL_AT=<name>:TERM` (or `:INT`) sends that signal instead, as a scheduler's stop or a Ctrl-C would
arrive at that moment, and the process goes on to handle it. Unset (always, outside such tests), a failpoint is
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PIPELINE_KILL_AT"


def failpoint(name: str) -> None:
    point, _, signame = os.environ.get(ENV, "").partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{signame or 'KILL'}"))
