"""The one comparison of a teacher fingerprint with the one something expects, and its one message.

A teacher fingerprint (`teachers.spec_fingerprint`: sha256 of the spec fields that shape the output and of the
weights) names the teacher that made a store's targets. It is compared by precompute (the store's teacher against
the manifest's, each worker's against the driver's), training (the store's against the experiment's
`data.expected_fingerprints`), online targets (a rebuilt teacher against the store's), verify (the store's against
a manifest, each block record against its teacher group) and visualize (the manifest's against the one a checkpoint
was trained on). Every one says the same sentence, with its own place, expecter and remedy:

    teacher 'depth' in store runs/x has fingerprint 1a2b3c4d5e6f.. but the manifest expects 7a8b9c0d1e2f..; REMEDY
"""

from __future__ import annotations

from pipeline.data.errors import PipelineError, UsageError


def fingerprint_mismatch(name: str, found: str | None, expected: str, *, where: str, expected_by: str,
                         remedy: str) -> str:
    """The message for teacher `name` found `where` ("in store runs/x", "on worker node-2") with fingerprint `found`
    (None: none recorded) when `expected_by` ("the manifest") expects `expected`; `remedy` says what differs, when
    the caller knows, and what to do. For callers that report the mismatch rather than raise it."""
    return (f"teacher {name!r} {where} has fingerprint {_short(found)} but {expected_by} expects {_short(expected)}; "
            f"{remedy}")


def check_fingerprint(name: str, found: str | None, expected: str, *, where: str, expected_by: str, remedy: str,
                      error: type[PipelineError] = UsageError) -> None:
    """Raise `error` (bad input by default; `JobError` where the job's own parts disagree) with
    `fingerprint_mismatch`'s message unless `found` is `expected`."""
    if found != expected:
        raise error(fingerprint_mismatch(name, found, expected, where=where, expected_by=expected_by, remedy=remedy))


def _short(fingerprint: str | None) -> str:
    return f"{fingerprint[:12]}.." if fingerprint else "(none)"
