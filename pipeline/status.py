"""`pipeline status`: what a store holds, read from its index, records and attributes (no torch, no Ray).

The store's samples and what its rows by image content save: distinct images (one target row each), duplicates
(image samples whose image an earlier sample already has, under the same path or a copy) and samples without a
target row; per teacher, the target rows done of those in use and how many were copied from other stores
(`--reuse`) instead of computed.

Damage it meets is named in one line each (a block record that is not sound, a damaged index, errors.parquet or
run summary) and the rest is still shown; `pipeline verify` checks everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.data.errors import UsageError
from pipeline.data.index import ImageCounts
from pipeline.data.store import TargetStore


@dataclass
class TeacherStatus:
    name: str
    rows_done: int
    rows_total: int  # the target rows in use (`row_ranges`), not the arrays' length, which counts the gaps
    blocks_done: int
    blocks_total: int
    rows_reused: int  # copied from other stores by `--reuse` (BlockRecord.reused), not computed
    failures: int
    bytes: int
    target_shape: list[int]
    dtype: str
    fingerprint: str
    complete: bool
    seconds: float
    problems: list[str] = field(default_factory=list)  # its damaged block records, one line each


@dataclass
class StoreStatus:
    store: TargetStore
    counts: ImageCounts | None  # None where index.parquet cannot be read (`problems` says why)
    teachers: list[TeacherStatus]
    errors: int | None  # rows of errors.parquet; None where it is damaged
    last_run: dict | None
    problems: list[str] = field(default_factory=list)  # damaged store files, one line each

    def to_json(self) -> dict:
        store = self.store
        return {"store": store.path, "num_samples": store.num_samples, "num_rows": store.num_rows,
                "row_ranges": store.row_ranges, "rows_per_block": store.rows_per_block,
                **(asdict(self.counts) if self.counts else {}), "teachers": [asdict(t) for t in self.teachers],
                "errors": self.errors, "last_run": self.last_run, "problems": self.problems}


def store_status(path: str) -> StoreStatus:
    store = TargetStore(path)
    blocks = store.blocks()
    problems: list[str] = []
    index = _read(store.read_index, problems)
    errors = _read(store.read_errors, problems)
    last_run = _read(store.last_run, problems)
    teachers = []
    for name in store.teacher_names():
        attrs = store.teacher_attrs(name)
        records = store.read_records(name)
        teachers.append(
            TeacherStatus(
                name=name,
                rows_done=sum(r.rows for r in records),
                rows_total=sum(b.rows for b in blocks),
                blocks_done=len(records),
                blocks_total=len(blocks),
                rows_reused=sum(r.reused for r in records),
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
    return StoreStatus(store=store, counts=None if index is None else ImageCounts.of(index), teachers=teachers,
                       errors=None if errors is None else errors.num_rows, last_run=last_run, problems=problems)


def _read(read, problems: list[str]):
    """`read()`, or None with the one line saying why it could not be read appended to `problems`."""
    try:
        return read()
    except UsageError as exc:
        problems.append(str(exc))
        return None


def format_status(status: StoreStatus) -> str:
    store, counts = status.store, status.counts
    samples = (f"{counts.samples} samples: {counts.images} distinct images, {counts.duplicates} duplicates (image "
               f"samples whose image an earlier sample has), {counts.text_only} without a target row (no image, "
               "or a repeated key)") if counts else f"{store.num_samples} samples"
    rows = sum(stop - start for start, stop in store.row_ranges)
    lines = [f"store {store.path}: {samples}",
             f"  {rows} target rows in blocks of {store.rows_per_block} rows, "
             f"dataset {store.dataset_fingerprint[:12]}.."]
    if not status.teachers:
        lines.append("  no teachers yet")
    for t in status.teachers:
        state = "complete" if t.complete else "incomplete"
        lines.append(
            f"  {t.name:<8} {t.rows_done}/{t.rows_total} rows ({t.blocks_done}/{t.blocks_total} blocks, {state}), "
            f"{t.rows_reused} reused, {t.failures} failed, target {t.target_shape} {t.dtype}, "
            f"{t.bytes / 1e6:.1f} MB, fingerprint {t.fingerprint[:12]}.."
        )
        lines.extend(f"    problem: {problem}" for problem in t.problems)
    if status.errors is not None:
        lines.append(f"  errors.parquet: {status.errors} row(s)")
    lines.extend(f"  problem: {problem}" for problem in status.problems)
    run = status.last_run
    if run:
        lines.append(f"  last run: {run['rows_computed']} teacher-rows computed, {run['rows_reused']} reused, "
                     f"in {run['seconds']:.1f}s ({run['rows_per_second']:.1f} rows/s) on {run['workers']} worker(s), "
                     f"{run['failures']} failed")
    return "\n".join(lines)
