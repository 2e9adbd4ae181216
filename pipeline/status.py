"""`pipeline status`: what a store holds, read from its records and attributes (no torch, no Ray).

Damage it meets is named in one line each (a block record that is not sound, a damaged errors.parquet or run
summary) and the rest is still shown; `pipeline verify` checks everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.errors import UsageError
from pipeline.data.store import TargetStore


@dataclass
class TeacherStatus:
    name: str
    rows_done: int
    rows_total: int
    blocks_done: int
    blocks_total: int
    failures: int
    bytes: int
    target_shape: list[int]
    dtype: str
    fingerprint: str
    complete: bool
    seconds: float
    problems: list[str] = field(default_factory=list)  # its damaged block records, one line each


def store_status(path: str) -> tuple[TargetStore, list[TeacherStatus]]:
    store = TargetStore(path)
    blocks = store.blocks()
    result = []
    for name in store.teacher_names():
        attrs = store.teacher_attrs(name)
        records = store.read_records(name)
        rows = sum(r.rows for r in records)
        result.append(
            TeacherStatus(
                name=name,
                rows_done=rows,
                rows_total=store.num_rows,
                blocks_done=len(records),
                blocks_total=len(blocks),
                failures=sum(len(r.failures) for r in records),
                bytes=store.nbytes(name),
                target_shape=list(attrs.get("target_shape", [])),
                dtype=attrs.get("dtype", "?"),
                fingerprint=attrs.get("teacher_fingerprint", ""),
                complete=bool(attrs.get("complete")),
                seconds=round(sum(r.seconds for r in records), 3),
                problems=store.damaged_records(name),
            )
        )
    return store, result


def format_status(store: TargetStore, teachers: list[TeacherStatus]) -> str:
    lines = [
        f"store {store.path}: {store.num_rows} rows, blocks of {store.rows_per_block} rows, "
        f"dataset {store.dataset_fingerprint[:12]}..",
    ]
    if not teachers:
        lines.append("  no teachers yet")
    for t in teachers:
        state = "complete" if t.complete else "incomplete"
        lines.append(
            f"  {t.name:<8} {t.rows_done}/{t.rows_total} rows ({t.blocks_done}/{t.blocks_total} blocks, {state}), "
            f"{t.failures} failed, target {t.target_shape} {t.dtype}, {t.bytes / 1e6:.1f} MB, "
            f"fingerprint {t.fingerprint[:12]}.."
        )
        lines.extend(f"    problem: {problem}" for problem in t.problems)
    try:
        lines.append(f"  errors.parquet: {store.read_errors().num_rows} row(s)")
    except UsageError as exc:
        lines.append(f"  problem: {exc}")
    try:
        run = store.last_run()
    except UsageError as exc:
        lines.append(f"  problem: {exc}")
        run = None
    if run:
        lines.append(f"  last run: {run['rows_computed']} teacher-rows in {run['seconds']:.1f}s "
                     f"({run['rows_per_second']:.1f} rows/s) on {run['workers']} worker(s), {run['failures']} failed")
    return "\n".join(lines)
