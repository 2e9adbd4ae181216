"""`pipeline verify`: prove a store is complete, intact and aligned, or say what is wrong with it.

Checks, per teacher: every block has a completion record made by the same teacher fingerprint; the
stored values on disk hash to the digest the record kept (so a damaged or edited shard file is caught); the
valid flags agree with the record; valid rows hold finite numbers and invalid rows hold zeros. Store
wide: index.parquet is, byte for byte, the index the store was made with (every column: the offsets and
sizes that workers seek by as much as the keys), it matches the dataset fingerprint, shards.parquet agrees with
it, and, when given, the shards and a teacher manifest. Every parquet file is read (a damaged one is a problem
naming it), and every file that is not part of the store's format is named: the partial files a killed write
leaves (a precompute rerun removes them) and anything else. `--shards` is the deep check: every shard is read and
every image re-hashed, whatever identities (size, mtime, ETag) the store recorded; precompute reruns trust those
identities and re-read only the shards whose identity changed.

Besides problems, verify reports notes that do not make a store wrong: blocks computed with different batch
sizes hold the same values to float16 rounding, but not the same bytes as a run with one batch size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.errors import UsageError
from pipeline.data.fingerprints import fingerprint_mismatch
from pipeline.data.index import PreviousIndex, build_index, dataset_fingerprint, first_difference
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
        if index.num_rows != store.num_samples or index.column("row").to_pylist() != list(range(index.num_rows)):
            problems.append(f"index.parquet has {index.num_rows} rows out of order or count; the store says "
                            f"{store.num_samples}")
        if dataset_fingerprint(index) != store.dataset_fingerprint:
            problems.append("index.parquet does not hash to the store's dataset_fingerprint (edited index?)")
        records = _shard_records(store, index, report)
        if shards is not None:
            current = build_index(shards, progress=progress)  # every shard read and re-hashed: no reuse here
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
                                                                                      fingerprint))
    return report


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


def _check_block(store: TargetStore, name: str, block, record: BlockRecord, fingerprint: str) -> list[str]:
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
    return found


def _manifest_fingerprints(manifest: str) -> dict[str, str]:
    import teachers

    specs = teachers.load_manifest(manifest).teachers
    return {name: teachers.spec_fingerprint(spec) for name, spec in specs.items()}
