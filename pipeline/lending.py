"""Rows lent between stores: `pipeline precompute ... --reuse OTHER_STORE` copies a target row instead of computing
it when OTHER_STORE holds the same image (sha1 of its bytes) for a teacher with the same fingerprint.

    open_lenders       the driver reads each lending store's index, records and valid flags once
    lent_rows          which rows of the blocks to compute each lender gives, per teacher (the first lender that
                       has a row wins, in --reuse order)
    copy_lent_rows     the write stage copies them: each lending block is read whole, its digest checked against
                       its completion record, and only then are its rows copied, byte for byte

A row is lent only where it is valid in the lender and its block has a record, so a damaged lender is refused,
never copied from. The teacher is matched by fingerprint, not by name. The copied rows' statistics (the teacher's
mean/std) are taken from their stored values, where computed rows take them from the teacher's float32 output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from pipeline.data.errors import JobError, UsageError
from pipeline.data.store import BlockRange, BlockRecord, Storage, TargetStore, block_digest


@dataclass(frozen=True)
class LentRow:
    """Where a row's targets are copied from."""

    store: str  # the lending store's path
    teacher: str  # the teacher's name there
    row: int  # its target row there
    block: BlockRange  # the lending store's block holding that row
    digest: str  # that block's digest, from its completion record


@dataclass
class Lender:
    """One `--reuse` store, as the driver reads it once."""

    store: TargetStore
    rows_per_block: int
    rows: dict[str, int]  # image sha1 -> target row
    teachers: dict[str, tuple[str, dict[int, BlockRecord], np.ndarray]]  # fingerprint -> (name, records, valid)

    def lends(self, sha1: str, fingerprint: str) -> LentRow | None:
        row = self.rows.get(sha1)
        teacher = self.teachers.get(fingerprint)
        if row is None or teacher is None:
            return None
        name, records, valid = teacher
        record = records.get(row // self.rows_per_block)
        if record is None or not valid[row]:
            return None
        return LentRow(self.store.path, name, row, BlockRange(record.block, record.start, record.stop), record.digest)


def open_lenders(paths: tuple[str, ...], fingerprints: dict[str, str], store_path: str) -> list[Lender]:
    """Read each `--reuse` store: UsageError naming it if it is not a target store or is this store."""
    lenders = []
    for path in paths:
        store = TargetStore(path)
        if store.path == TargetStore(store_path).path:
            raise UsageError(f"--reuse {path} is the store being computed; name another store")
        if not store.exists():
            raise UsageError(f"--reuse {path} is not a target store (no zarr.json)")
        index = store.read_index()
        rows = {}
        for sha1, row in zip(index.column("image_sha1").to_pylist(), index.column("target_row").to_pylist()):
            if row >= 0:
                rows.setdefault(sha1, row)
        wanted = set(fingerprints.values())
        teachers = {}
        for name in store.teacher_names():
            fingerprint = store.teacher_attrs(name).get("teacher_fingerprint")
            if fingerprint in wanted and fingerprint not in teachers:
                records = {r.block: r for r in store.read_records(name)}
                teachers[fingerprint] = (name, records, store.group[name]["valid"][:].astype(bool))
        lenders.append(Lender(store, store.rows_per_block, rows, teachers))
    return lenders


def lending_order(lenders: list[Lender]):
    """The order new images get their rows in (`pipeline.data.index.assign_target_rows`): those a lender has first,
    as they lie there, so that each block copies from few of the lender's blocks."""
    def key(sha1: str) -> tuple[int, int]:
        for i, lender in enumerate(lenders):
            if sha1 in lender.rows:
                return i, lender.rows[sha1]
        return len(lenders), 0

    return key


def lent_rows(lenders: list[Lender], firsts: pa.Table, blocks: dict[str, list[BlockRange]],
              fingerprints: dict[str, str]) -> dict[int, dict[str, dict[int, LentRow]]]:
    """{block: {teacher: {target row: LentRow}}} for the rows of `blocks` (per teacher, those to compute) that a
    lender has. `firsts`: pipeline.block_stages.first_samples of this store's index."""
    if not lenders:
        return {}
    sha1s = firsts.column("image_sha1").to_pylist()  # firsts is in target row order, one entry per row in use
    positions = {row: i for i, row in enumerate(firsts.column("target_row").to_pylist())}
    lent: dict[int, dict[str, dict[int, LentRow]]] = {}
    for name, todo in blocks.items():
        for block in todo:
            for row in range(block.start, block.stop):
                sha1 = sha1s[positions[row]]
                found = next((r for lender in lenders if (r := lender.lends(sha1, fingerprints[name]))), None)
                if found is not None:
                    lent.setdefault(block.block, {}).setdefault(name, {})[row] = found
    return lent


def copy_lent_rows(outputs, block: BlockRange, lent: dict[int, LentRow]):
    """`outputs` (a block's `TeacherOutputs`, lent rows unset) with the lent rows copied in and counted in its
    statistics. JobError if a lending block's stored values do not match its record."""
    stored, valid = np.array(outputs.stored), np.array(outputs.valid)  # Ray hands over read-only arrays
    scale = None if outputs.scale is None else np.array(outputs.scale)
    by_block: dict[tuple[str, str, BlockRange], list[int]] = {}
    for row, source in lent.items():
        by_block.setdefault((source.store, source.teacher, source.block), []).append(row)
    sums = np.asarray(outputs.stats["sum"], dtype=np.float64)
    squares = np.asarray(outputs.stats["sumsq"], dtype=np.float64)
    count = outputs.stats["count"]
    for (path, teacher, source_block), rows in by_block.items():
        theirs = _checked_block(path, teacher, source_block, lent[rows[0]].digest)
        here = [r - block.start for r in rows]
        there = [lent[r].row - source_block.start for r in rows]
        stored[here] = theirs["target"][there]
        if scale is not None:
            scale[here] = theirs["scale"][there]
        valid[here] = 1
        storage, tokens = _layout(path, teacher)  # the lender's: the same fingerprint is the same storage
        values = storage.decode(stored[here], None if scale is None else scale[here], tokens).astype(np.float64)
        sums = sums + values.sum(axis=(0, 1))
        squares = squares + np.square(values).sum(axis=(0, 1))
        count += values.shape[0] * values.shape[1]
    stats = {"count": int(count), "sum": sums.tolist(), "sumsq": squares.tolist()}
    return replace(outputs, stored=stored, scale=scale, valid=valid, stats=stats)


@functools.lru_cache(maxsize=8)
def _store(path: str) -> TargetStore:
    return TargetStore(path)


@functools.lru_cache(maxsize=32)
def _layout(path: str, teacher: str) -> tuple[Storage, int]:
    """A lending teacher's storage and tokens per target, read once per process."""
    store = _store(path)
    return store.storage(teacher), int(store.teacher_attrs(teacher)["target_shape"][0])


def _checked_block(path: str, teacher: str, block: BlockRange, digest: str) -> dict[str, np.ndarray]:
    """The lending block's stored arrays, once their digest is the one its record holds."""
    group = _store(path).group[teacher]
    arrays = {name: group[name][block.start : block.stop] for name in ("target", "scale", "valid") if name in group}
    found = block_digest(arrays["target"], arrays.get("scale"), arrays["valid"])
    if found != digest:
        raise JobError(f"--reuse {path}: block {block.block} of teacher {teacher} does not hold what its record says "
                       f"(digest {found}, recorded {digest}): that store is damaged; run `pipeline verify {path}`, or "
                       "rerun without --reuse of it")
    return arrays
