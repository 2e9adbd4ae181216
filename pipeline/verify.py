"""`pipeline verify`: prove a store is complete, intact and aligned, or say what is wrong with it.

Checks, per teacher: every block has a completion record made by the same teacher fingerprint; the
stored values on disk hash to the digest the record kept (so a damaged or edited shard file is caught); the
valid flags agree with the record, and every target row in use is valid or has a failure recorded; valid rows
hold finite numbers and invalid rows hold zeros. Store wide: index.parquet is, byte for byte, the index the store
was made with (every column: the offsets and sizes that workers seek by as much as the keys), it matches the
dataset fingerprint, shards.parquet agrees with it, and, when given, the shards and a teacher manifest. The map
from samples to target rows keeps the format's rules: a sample with an image (and a key new to its shard) has a
target row inside a block of the store, every other sample has none (-1), samples share a row exactly when they
share an image (sha1), and the root attributes num_samples, num_rows and row_ranges are what the index gives.
Every parquet file is read (a damaged one is a problem naming it), and every file that is not part of the store's
format is named: the partial files a killed write leaves (a precompute rerun removes them) and anything else.
`--shards` is the deep check: every shard is read and every image re-hashed, whatever identities (size, mtime,
ETag) the store recorded, and compared in the store's order (a grown store holds its shards in the order they
were added, not in listing order); precompute reruns trust those identities and re-read only the shards whose
identity changed.

Besides problems, verify reports notes that do not make a store wrong: blocks computed with different batch
sizes hold the same values to float16 rounding, but not the same bytes as a run with one batch size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.data.errors import UsageError
from pipeline.data.fingerprints import fingerprint_mismatch
from pipeline.data.index import (PreviousIndex, build_index, dataset_fingerprint, duplicate_rows, first_difference,
                                 index_layout)
from pipeline.data.store import BlockRecord, TargetStore, is_partial_write


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # any of these makes `pipeline verify` exit 1
    notes: list[str] = field(default_factory=list)


def verify_store(path: str, *, shards: str | None = None, manifest: str | None = None,
                 progress: bool = False) -> VerifyReport:
    """Every problem found, one readable line each; no problems means the store is good."""
    from tqdm.auto import tqdm

    store = TargetStore(path)
    store.attrs  # a directory that is not a store is bad input (UsageError), not a problem list
    report = VerifyReport()
    problems = report.problems
    try:
        index = store.read_index()
    except UsageError as exc:
        problems.append(str(exc))
        index = None
    if index is not None:
        if index.column("row").to_pylist() != list(range(index.num_rows)):
            problems.append(f"index.parquet's row column is not 0..{index.num_rows - 1} in order")
        if dataset_fingerprint(index) != store.dataset_fingerprint:
            problems.append("index.parquet does not hash to the store's dataset_fingerprint (edited index?)")
        problems.extend(_map_problems(store, index))
        records = _shard_records(store, index, report)
        if shards is not None:
            # Every shard read and re-hashed (no reuse here), then laid out as the store holds them.
            recorded = (records.column("shard").to_pylist() if records is not None
                        else list(dict.fromkeys(index.column("shard").to_pylist())))
            current = build_index(shards, order=recorded, progress=progress)
            columns = [c for c in index.column_names if c != "target_row"]  # the store's, not the shards'
            if current.fingerprint != store.dataset_fingerprint or not index.select(columns).equals(
                    current.table.select(columns)):
                problems.append("the shards differ from the store's: "
                                f"{first_difference(index.select(columns), current.table.select(columns))}")
            elif records is not None:
                _compare_shard_records(records, current.shards, report)
    try:
        store.read_errors()
    except UsageError as exc:
        problems.append(str(exc))
    problems.extend(_stray_file_problem(store, stray) for stray in store.stray_files())
    expected = _manifest_fingerprints(manifest) if manifest else {}
    if not store.teacher_names():
        problems.append("the store holds no teacher yet; run `pipeline precompute` to compute its targets")
    for name in sorted(set(expected) - set(store.teacher_names())):
        problems.append(f"{name}: in the manifest but not in the store")
    blocks = store.blocks()
    in_use = _rows_in_use(index) if index is not None else None
    for name in store.teacher_names():
        teacher = store.teacher_attrs(name)
        fingerprint = teacher.get("teacher_fingerprint")
        if name in expected and expected[name] != fingerprint:
            problems.append(fingerprint_mismatch(
                name, fingerprint, expected[name], where="in the store", expected_by=f"manifest {manifest}",
                remedy="precompute with this manifest into a new --store, or verify with the manifest the store was "
                "made with"))
        problems.extend(store.damaged_records(name))
        records = {r.block: r for r in store.read_records(name)}
        missing = [b.block for b in blocks if b.block not in records]
        if missing:
            problems.append(f"{name}: {len(missing)} of {len(blocks)} blocks have no completion record "
                            f"(first: block {missing[0]}); rerun `pipeline precompute` to finish it")
        if not missing and not teacher.get("complete"):
            problems.append(f"{name}: every block is recorded but the teacher is not marked complete; rerun "
                            "`pipeline precompute` to finish it")
        batch_sizes = Counter(r.batch_size for r in records.values())
        if len(batch_sizes) > 1:
            mixed = ", ".join(f"{size}: {count} block(s)" for size, count in sorted(batch_sizes.items()))
            report.notes.append(f"{name}: blocks were computed with different batch sizes ({mixed}); their values "
                                "agree to float16 rounding, but a rerun is byte-identical only with equal batch sizes")
        for block in tqdm(blocks, desc=f"verify {name}", unit="block", disable=not progress):
            record = records.get(block.block)
            if record is None:
                continue
            problems.extend(f"{name} block {block.block}: {p}" for p in _check_block(store, name, block, record,
                                                                                      fingerprint, in_use))
    return report


def _rows_in_use(index: pa.Table) -> np.ndarray:
    """The target rows the index maps samples to, sorted, each once."""
    rows = index.column("target_row").to_numpy()
    return np.unique(rows[rows >= 0])


def _map_problems(store: TargetStore, index: pa.Table) -> list[str]:
    """Where index.parquet's map from samples to target rows, or the root attributes made from it, break the
    format's rules (the module docstring); one line per rule broken, naming its first offender."""
    found = []
    gives = index_layout(index)
    attrs = store.attrs
    says = {key: attrs.get(key) for key in gives}
    if says != gives:
        found.append(f"{store.path}/zarr.json says " + ", ".join(f"{k} {v}" for k, v in says.items())
                     + " but index.parquet gives " + ", ".join(f"{k} {v}" for k, v in gives.items())
                     + " (edited or damaged); precompute into a new --store")
    rows = index.column("target_row").to_pylist()
    sha1s = index.column("image_sha1").to_pylist()
    names = [f"{shard}/{key}" for shard, key in zip(index.column("shard").to_pylist(), index.column("key").to_pylist())]
    blocks = store.blocks()
    in_blocks = np.zeros(max((b.stop for b in blocks), default=0), dtype=bool)
    for block in blocks:
        in_blocks[block.start : block.stop] = True
    duplicates = duplicate_rows(index)
    broken: dict[str, list[str]] = {}
    first_of_row: dict[int, int] = {}  # target row -> the first sample mapped to it
    first_of_image: dict[str, int] = {}  # sha1 -> the first sample showing it
    for sample, (row, sha1) in enumerate(zip(rows, sha1s)):
        if not sha1 or sample in duplicates:
            if row != -1:
                broken.setdefault("without an image or with a repeated key have a target row", []).append(
                    f"sample {sample}, {names[sample]}, row {row}")
            continue
        if row == -1:
            broken.setdefault("with an image have no target row", []).append(f"sample {sample}, {names[sample]}")
            continue
        if not 0 <= row < len(in_blocks) or not in_blocks[row]:
            broken.setdefault("have a target row in no block of the store", []).append(
                f"sample {sample}, {names[sample]}, row {row}")
            continue
        other = first_of_row.setdefault(row, sample)
        if sha1s[other] != sha1:
            broken.setdefault("share a target row with a sample of another image", []).append(
                f"samples {other} and {sample} share target row {row} but hold other images")
        other = first_of_image.setdefault(sha1, sample)
        if rows[other] != row:
            broken.setdefault("have another target row than an earlier sample of their image", []).append(
                f"samples {other} and {sample} hold the same image (sha1 {sha1[:12]}..) but have target rows "
                f"{rows[other]} and {row}")
    found.extend(f"index.parquet: {len(where)} sample(s) {rule} (first: {where[0]}); the map from samples to "
                 "target rows is wrong: precompute into a new --store" for rule, where in broken.items())
    return found


def _shard_records(store: TargetStore, index, report: VerifyReport):
    """shards.parquet (SHARDS_SCHEMA) if it is there and agrees with `index`, else None, with a problem or note."""
    try:
        records = store.read_shard_records()
    except UsageError as exc:
        report.problems.append(str(exc))
        return None
    if records is None:
        report.notes.append("the store records no shard identities (shards.parquet is missing): precompute "
                            "reruns re-read every shard until a run with work records them")
        return None
    previous = PreviousIndex(index, records)
    damaged = previous.problem()
    if damaged:
        report.problems.append(f"shards.parquet does not match index.parquet ({damaged}); edited or damaged? delete "
                               "it (precompute reruns then re-read every shard) or restore it")
        return None
    return previous.shards


def _stray_file_problem(store: TargetStore, path: str) -> str:
    if is_partial_write(path):
        return (f"{store.path}/{path} is the unfinished file of a write that was killed; rerun `pipeline precompute` "
                "to remove it")
    return f"{store.path}/{path} is not part of the store's format; move it out of the store"


def _compare_shard_records(records, current, report: VerifyReport) -> None:
    """The store's shards.parquet against a fresh read of the same samples: the damage found must agree; a moved
    identity (a touched or copied shard, same samples) is a note, since reruns then re-read that shard."""
    stored = {r["shard"]: r for r in records.to_pylist()}
    moved = []
    for new in current.to_pylist():
        old = stored.pop(new["shard"], None)
        if old is None:
            moved.append(new["shard"])  # a shard without samples (the indexes are equal) the store never saw
        elif any(old[c] != new[c] for c in ("row_start", "row_stop", "error", "error_key", "sample_errors")):
            report.problems.append(
                f"shards.parquet records {old['shard']} as rows {old['row_start']}..{old['row_stop']} with error "
                f"{old['error']!r} but reading it gives rows {new['row_start']}..{new['row_stop']} with error "
                f"{new['error']!r}")
        elif any(old[c] != new[c] for c in ("size", "mtime_ns", "etag")):
            moved.append(old["shard"])
    moved += sorted(stored)  # recorded shards without samples that are gone
    if moved:
        report.notes.append(f"{len(moved)} shard(s) hold the samples the store was made from but are not the files "
                            f"it recorded (touched, copied, or holding no samples; first: {moved[0]}): precompute "
                            "reruns re-read them until a run with work records them")


def _check_block(store: TargetStore, name: str, block, record: BlockRecord, fingerprint: str,
                 in_use: np.ndarray | None) -> list[str]:
    """What is wrong with one teacher's block; `in_use`: the sorted target rows the index uses (None if the index
    cannot be read: every row of the block counts as used)."""
    found = []
    if record.fingerprint != fingerprint:
        found.append(fingerprint_mismatch(
            name, record.fingerprint, fingerprint, where="in the block's completion record",
            expected_by="its teacher group", remedy=f"delete the record (in {store.path}/_blocks/{name}/) and rerun "
            "`pipeline precompute` to compute the block again"))
    try:
        digest = store.read_block_digest(name, block)
        values, valid = store.read_rows(name, block.start, block.stop)
    except Exception as exc:  # noqa: BLE001 - a damaged shard can fail in the codec in many ways
        return found + [f"cannot be read ({type(exc).__name__}: {exc})"]
    if digest != record.digest:
        found.append("stored values on disk differ from those written (damaged or edited shard): their digest is "
                     f"{digest}, the record's {record.digest}")
    if int(valid.sum()) != record.written:
        found.append(f"{int(valid.sum())} valid rows but the record says {record.written}")
    good = valid.astype(bool)
    if not np.isfinite(values[good]).all():
        found.append("non-finite values in valid rows")
    if np.any(values[~good]):
        found.append("rows marked invalid hold non-zero values")
    used = (np.arange(block.start, block.stop) if in_use is None
            else in_use[np.searchsorted(in_use, block.start) : np.searchsorted(in_use, block.stop)])
    failed = {f["row"] for f in record.failures}
    unexplained = [row for row in used[~good[used - block.start]].tolist() if row not in failed]
    if unexplained:
        found.append(f"{len(unexplained)} row(s) in use are not valid and no failure is recorded for them (first: "
                     f"target row {unexplained[0]}); delete the block's record (in {store.path}/_blocks/{name}/) "
                     "and rerun `pipeline precompute` to compute the block again")
    return found


def _manifest_fingerprints(manifest: str) -> dict[str, str]:
    import teachers

    specs = teachers.load_manifest(manifest).teachers
    return {name: teachers.spec_fingerprint(spec) for name, spec in specs.items()}
