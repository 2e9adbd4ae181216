"""`index.parquet`: one row per sample of the shards, in a stable global order, and the map from each sample to its
target row.

Columns (`row` is the sample's position here; the rest let workers read an image without scanning its tar again):

    row int64 | shard str | key str | image_sha1 str | target_row int64 | caption_present bool |
    has_conversation bool | image_member str | image_offset int64 | image_size int64 |
    sample_offset int64 | sample_size int64

`target_row` is the row of every teacher array that holds the targets of the sample's image: one row per distinct
image content (sha1 of the image bytes), shared by every sample showing that image, whatever its file name
(`assign_target_rows`). It is -1 for a sample without an image and for a later occurrence of a key in its shard.

(`sample_offset`, `sample_size`: the byte span of all the sample's members, so that training reads any sample,
text-only ones included, in one read and in any order.)

`image_sha1` is "" for a sample without an image member.

A sample whose text cannot be read (a `KEY.json` that is not JSON, or JSON nested too deep to parse) is
indexed without a conversation, and what went wrong is recorded for that sample: indexing never stops at one
sample, as decoding does not.

Beside it, a store keeps `shards.parquet`, one row per shard in shard order (SHARDS_SCHEMA): the shard's
identity when it was read (size, mtime or ETag: see `pipeline.data.shards.ShardInfo`), its rows in the index,
the damage reading it found (a truncated tar), which is in no row of the index, and its samples whose text
could not be read. Indexing the shards of an existing store (`build_index(..., previous=...)`) re-reads only
the shards whose identity changed or that are new, and takes the others' rows from the store; re-reading and
re-hashing every shard is `pipeline verify --shards`. Shards are read in parallel processes, one task per
shard, when there is enough to read; the result is the same as a serial scan's: shard order, then file order.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.data.errors import JobError
from pipeline.data.shards import SampleMembers, ShardInfo, list_shard_infos, scan_shard, shard_name

INDEX_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image_sha1", pa.string()),
        ("target_row", pa.int64()),  # -1: no target row (no image, or a duplicate key)
        ("caption_present", pa.bool_()),
        ("has_conversation", pa.bool_()),
        ("image_member", pa.string()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
        ("sample_offset", pa.int64()),  # the sample's byte span in its tar (all its members): training reads it
        ("sample_size", pa.int64()),
    ]
)

# One sample of a shard whose text (caption or conversation) could not be read: `row` counts from 0 within the shard.
SAMPLE_ERROR = pa.struct([("row", pa.int64()), ("key", pa.string()), ("error", pa.string())])

SHARDS_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # the name, as in index.parquet
        ("size", pa.int64()),  # bytes; -1 where the filesystem did not say
        ("mtime_ns", pa.int64()),  # null where the filesystem gave no modification time
        ("etag", pa.string()),  # null on local files
        ("row_start", pa.int64()),  # the shard's rows are row_start <= row < row_stop
        ("row_stop", pa.int64()),
        ("error", pa.string()),  # null, or why reading the shard stopped early (kept samples are in the index)
        ("error_key", pa.string()),  # the sample cut by that damage, "" if none or not legible
        ("sample_errors", pa.list_(SAMPLE_ERROR)),  # samples indexed without their text, and why
    ]
)

# Below this many bytes to read, this process reads them about as soon as worker processes would: starting
# spawned workers (each imports pyarrow, fsspec, PIL) costs 0.4-1 s, and one process indexes page-cached shards
# at about 250 MB/s (benchmarks/indexing.py). Measured on 2 shared cores, 2 workers were slower than 1 process
# even at 300 MB; with P cores they pay off from about 250 MB/s x 1 s x P / (P - 1) of work.
PARALLEL_MIN_BYTES = 2**30


@dataclass
class ShardIndex:
    """The index of a shard set plus what went wrong while reading it."""

    table: pa.Table
    urls: list[str]
    fingerprint: str
    # {"shard", "key", "error"} for truncated or unreadable shards, plus "row" for a sample indexed without its text
    shard_errors: list[dict]
    shards: pa.Table = field(default_factory=SHARDS_SCHEMA.empty_table)  # one row per shard (SHARDS_SCHEMA)
    scanned: list[str] = field(default_factory=list)  # names of the shards read this time (the others were reused)


@dataclass
class PreviousIndex:
    """What a store recorded about its shards (index.parquet and shards.parquet), for reuse by `build_index`."""

    index: pa.Table
    shards: pa.Table
    _by_name: dict | None = field(default=None, repr=False, compare=False)

    def problem(self) -> str | None:
        """Why the two files do not describe the same shards (an edited or damaged shards.parquet), or None."""
        if not self.shards.schema.remove_metadata().equals(SHARDS_SCHEMA):
            return f"shards.parquet has columns {self.shards.column_names}, not {SHARDS_SCHEMA.names}"
        if not self.index.schema.remove_metadata().equals(INDEX_SCHEMA):
            return f"index.parquet has columns {self.index.column_names}, not {INDEX_SCHEMA.names}"
        names = self.shards.column("shard").to_pylist()
        starts = self.shards.column("row_start").to_pylist()
        stops = self.shards.column("row_stop").to_pylist()
        if len(set(names)) != len(names):
            return "shards.parquet names a shard twice"
        end = stops[-1] if stops else 0
        if starts[:1] not in ([], [0]) or starts[1:] != stops[:-1] or end != self.index.num_rows:
            return f"the row ranges of shards.parquet do not tile the {self.index.num_rows} rows of index.parquet"
        if any(start > stop for start, stop in zip(starts, stops)):
            return "shards.parquet has a row range that ends before it starts"
        for name, start, stop, errors in zip(names, starts, stops, self.shards.column("sample_errors").to_pylist()):
            if errors is None or any(e is None or e["row"] is None or not 0 <= e["row"] < stop - start
                                     for e in errors):
                return f"shards.parquet records a sample error of {name} outside its rows"
        expected = pa.array(np.repeat(np.array(names, dtype=object), np.subtract(stops, starts)), pa.string())
        if not expected.equals(self.index.column("shard").combine_chunks()):
            return "the shard names of shards.parquet do not match the rows of index.parquet"
        return None

    def reusable(self, info: ShardInfo) -> dict | None:
        """The shard's record (with its index rows under "table") if `info` is the file recorded, else None."""
        if self._by_name is None:
            self._by_name = {} if self.problem() else {r["shard"]: r for r in self.shards.to_pylist()}
        record = self._by_name.get(info.name)
        if record is None or not info.same_file(record["size"], record["mtime_ns"], record["etag"]):
            return None
        table = self.index.slice(record["row_start"], record["row_stop"] - record["row_start"])
        return {**record, "table": table}


def _conversation_present(raw: bytes | None) -> bool:
    """Whether a sample's JSON member holds a LLaVA conversation; raises if it is not JSON (or too deep to parse)."""
    if not raw:
        return False
    record = json.loads(raw)
    turns = record.get("conversations") if isinstance(record, dict) else None  # img2dataset metadata has none
    return isinstance(turns, list) and len(turns) > 0


def _text_flags(sample: SampleMembers) -> tuple[bool, bool, str | None]:
    """(caption_present, has_conversation, why the sample's text could not be read or None)."""
    caption = bool(sample.caption.decode("utf-8", errors="replace").strip()) if sample.caption else False
    try:
        conversation = _conversation_present(sample.conversation)
    except Exception as exc:  # noqa: BLE001 - whatever one sample's bytes raise is that sample's failure
        # (a KEY.json nested 100000 deep raises RecursionError); the sample keeps its image and caption.
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return caption, False, (f"sample {sample.key}: its .json member cannot be read ({why}); indexed without a "
                                "conversation")
    return caption or conversation, conversation, None


def dataset_fingerprint(table: pa.Table) -> str:
    """sha256 over the ordered (shard name, key, image sha1) of every row."""
    digest = hashlib.sha256()
    for shard, key, sha1 in zip(*(table.column(c).to_pylist() for c in ("shard", "key", "image_sha1"))):
        digest.update(f"{shard}\t{key}\t{sha1}\n".encode())
    return digest.hexdigest()


def row_ranges(rows) -> list[list[int]]:
    """The distinct non-negative ints of `rows`, as sorted [start, stop) runs of consecutive rows."""
    values = np.asarray(rows, dtype=np.int64)
    used = np.unique(values[values >= 0])
    runs = np.split(used, np.flatnonzero(np.diff(used) != 1) + 1)
    return [[int(run[0]), int(run[-1]) + 1] for run in runs if len(run)]


def index_layout(index: pa.Table) -> dict:
    """The store attributes an index gives: `num_samples`, `row_ranges` (the target rows in use, as runs) and
    `num_rows` (the teacher arrays' length: the end of the last run)."""
    ranges = row_ranges(index.column("target_row").to_numpy())
    return {"num_samples": index.num_rows, "num_rows": ranges[-1][1] if ranges else 0, "row_ranges": ranges}


@dataclass(frozen=True)
class ImageCounts:
    """What a store's rows-by-content saves: `images` target rows serve `samples - text_only` image samples."""

    samples: int
    images: int  # distinct image contents (target rows)
    duplicates: int  # image samples whose content an earlier sample has, by the same path or a copy
    text_only: int  # samples without a target row: no image, or a duplicate key

    @classmethod
    def of(cls, table: pa.Table) -> ImageCounts:
        rows = table.column("target_row").to_numpy()
        used = rows[rows >= 0]
        images = len(np.unique(used))
        return cls(samples=table.num_rows, images=images, duplicates=len(used) - images,
                   text_only=table.num_rows - len(used))


def assign_target_rows(table: pa.Table, stored: pa.Table | None, rows_per_block: int,
                       first: Callable[[str], tuple] | None = None) -> pa.Table:
    """`table` with its `target_row` column set: one row per distinct image sha1.

    `stored` is the index the store holds (None for a new store); it must be `table`'s prefix
    (`growth_problem`), and its samples keep their rows. An image new to the store gets a new row: new rows are
    numbered from the first multiple of `rows_per_block` past the stored ones, so that they fill new blocks and
    no block already written changes; in order of first appearance, or by `first(sha1)` then first appearance
    (rows lent by other stores, ordered by where they lie there, so a block copies from few of their blocks).
    """
    known: dict[str, int] = {}
    rows = np.full(table.num_rows, -1, dtype=np.int64)
    done = 0
    if stored is not None:
        done = stored.num_rows
        rows[:done] = stored.column("target_row").to_numpy()
        for sha1, row in zip(stored.column("image_sha1").to_pylist(), rows[:done].tolist()):
            if row >= 0:
                known.setdefault(sha1, row)
    used = rows[:done]
    next_row = -(-(int(used.max()) + 1 if (used >= 0).any() else 0) // rows_per_block) * rows_per_block
    duplicates = duplicate_rows(table)
    new: dict[str, list[int]] = {}  # sha1 -> its samples, in order of first appearance
    for i, sha1 in enumerate(table.column("image_sha1").to_pylist()[done:], start=done):
        if not sha1 or i in duplicates:
            continue
        if sha1 in known:
            rows[i] = known[sha1]
        else:
            new.setdefault(sha1, []).append(i)
    order = list(new)
    if first is not None:
        order.sort(key=first)  # stable: first appearance breaks ties
    for row, sha1 in enumerate(order, start=next_row):
        rows[new[sha1]] = row
    return table.set_column(table.schema.get_field_index("target_row"), "target_row", pa.array(rows))


def growth_problem(stored: pa.Table, table: pa.Table) -> str | None:
    """Why `table` (the shards now) does not extend `stored` (a store's index) by appending samples, naming the
    first shard of the store that is missing or differs; None if it does."""
    names = table.column("shard").to_pylist()
    present = set(names)
    for name in dict.fromkeys(stored.column("shard").to_pylist()):
        if name not in present:
            return f"its shard {name} is not among the shards given"
    columns = [c for c in stored.column_names if c != "target_row"]
    prefix = table.slice(0, stored.num_rows).select(columns)
    if prefix.equals(stored.select(columns)):
        return None
    old = stored.select(columns)
    shard = old.column("shard")[_first_different_row(old.to_pylist(), prefix.to_pylist())].as_py()
    return f"its shard {shard} differs from what the store indexed ({first_difference(old, prefix)})"


def build_index(shards: str, *, previous: PreviousIndex | None = None, order: list[str] | None = None,
                workers: int | None = None, progress: bool = True) -> ShardIndex:
    """Index SHARDS in shard order, then file order.

    With `previous` (a store's record), a shard whose identity (name, size, mtime or ETag) is the recorded one
    is not read: its rows and damage come from the record. The others are read, in `workers` processes (one task
    per shard; default: one per CPU when there are at least PARALLEL_MIN_BYTES to read, else this process).
    Whichever way a shard was indexed, the result is the same table a serial scan of every shard gives. The
    shards named in `order` (default: those `previous` recorded) come first, in that order, then the others in
    listing order: a store's samples keep their rows when shards are added, whatever their names. `target_row`
    is -1: the store assigns it (`assign_target_rows`).
    """
    infos = list_shard_infos(shards)
    if order is None and previous is not None:
        order = previous.shards.column("shard").to_pylist()
    if order is not None:
        position = {name: i for i, name in enumerate(order)}
        infos = sorted(infos, key=lambda info: (0, position[info.name]) if info.name in position else (1, 0))
    parts: list[dict | None] = [previous.reusable(info) if previous is not None else None for info in infos]
    todo = [i for i, part in enumerate(parts) if part is None]
    with tqdm(total=len(infos), initial=len(infos) - len(todo), desc="index", unit="shard",
              disable=not progress) as bar:
        for i, part in _scan([infos[i] for i in todo], workers):
            parts[todo[i]] = part
            bar.update(1)
    tables, records, shard_errors, start = [], [], [], 0
    for info, part in zip(infos, parts):
        table = pa.Table.from_arrays(part["table"].columns, schema=INDEX_SCHEMA)
        tables.append(table)
        shard_errors.extend({"shard": info.name, "row": start + e["row"], "key": e["key"], "error": e["error"]}
                            for e in part["sample_errors"])
        if part["error"] is not None:
            shard_errors.append({"shard": info.name, "key": part["error_key"], "error": part["error"]})
        records.append({"shard": info.name, "size": info.size, "mtime_ns": info.mtime_ns, "etag": info.etag,
                        "row_start": start, "row_stop": start + table.num_rows, "error": part["error"],
                        "error_key": part["error_key"], "sample_errors": part["sample_errors"]})
        start += table.num_rows
    table = pa.concat_tables(tables).combine_chunks() if tables else INDEX_SCHEMA.empty_table()
    table = table.set_column(0, "row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    table = table.set_column(table.schema.get_field_index("target_row"), "target_row",
                             pa.array(np.full(table.num_rows, -1, dtype=np.int64)))
    return ShardIndex(table=table, urls=[info.url for info in infos], fingerprint=dataset_fingerprint(table),
                      shard_errors=shard_errors, shards=pa.Table.from_pylist(records, schema=SHARDS_SCHEMA),
                      scanned=[infos[i].name for i in todo])


def _scan(infos: list[ShardInfo], workers: int | None):
    """(position in `infos`, indexed shard) for every shard, in completion order."""
    if workers is None:
        worth_it = len(infos) >= 2 and sum(max(info.size, 0) for info in infos) >= PARALLEL_MIN_BYTES
        count = min(len(infos), available_cpus()) if worth_it else 1
    else:
        count = max(1, min(workers, len(infos)))
    if count <= 1:
        for i, info in enumerate(infos):
            yield i, index_shard(info.url)
        return
    # spawn, not fork: the caller may hold threads (Ray's, tqdm's monitor) that a forked child inherits broken.
    with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(index_shard, info.url): i for i, info in enumerate(infos)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool as exc:
            raise JobError(f"a process indexing the shards died ({exc}); out of memory? rerun, or pass fewer "
                           "workers") from None
        finally:
            for future in futures:
                future.cancel()  # after an error, do not read the shards nobody will use


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def index_shard(url: str) -> dict:
    """Read one shard: {"table": its index rows (INDEX_SCHEMA; `row` counts from 0 within the shard), "error":
    why reading stopped early or None, "error_key": the sample that damage cut, or "", "sample_errors": the
    samples whose text could not be read, as SAMPLE_ERROR dicts}. Runs in worker processes: it takes a URL and
    returns only picklable values."""
    listing = scan_shard(url)
    name = shard_name(url)
    columns: dict[str, list] = {column: [] for column in INDEX_SCHEMA.names}
    sample_errors = []
    for sample in listing.samples:
        caption_present, has_conversation, error = _text_flags(sample)
        if error is not None:
            sample_errors.append({"row": len(columns["row"]), "key": sample.key, "error": error})
        columns["row"].append(len(columns["row"]))
        columns["shard"].append(name)
        columns["key"].append(sample.key)
        columns["image_sha1"].append(sample.image_sha1)
        columns["target_row"].append(-1)  # assigned by the store (`assign_target_rows`)
        columns["caption_present"].append(caption_present)
        columns["has_conversation"].append(has_conversation)
        columns["image_member"].append(sample.image_member or "")
        columns["image_offset"].append(sample.image_offset)
        columns["image_size"].append(sample.image_size)
        columns["sample_offset"].append(sample.offset)
        columns["sample_size"].append(sample.end - sample.offset)
    return {"table": pa.table(columns, schema=INDEX_SCHEMA), "error": listing.error,
            "error_key": (listing.broken_key or "") if listing.error else "", "sample_errors": sample_errors}


def first_difference(expected: pa.Table, actual: pa.Table) -> str:
    """Describe the first row where two indexes disagree in any column, for refusal messages."""
    if expected.column_names != actual.column_names:
        return f"the index columns differ ({expected.column_names} vs {actual.column_names})"
    old, new = expected.to_pylist(), actual.to_pylist()
    row = _first_different_row(old, new)
    if row < min(len(old), len(new)):
        a, b = old[row], new[row]
        if (a["shard"], a["key"]) != (b["shard"], b["key"]):
            return f"row {row}: the store has {a['shard']}/{a['key']} but the shards give {b['shard']}/{b['key']}"
        if a["image_sha1"] != b["image_sha1"]:
            return f"row {row} ({a['shard']}/{a['key']}): the image bytes differ"
        column = next(c for c in expected.column_names if a[c] != b[c])
        return (f"row {row} ({a['shard']}/{a['key']}): {column} is {a[column]!r} in the store but "
                f"{b[column]!r} in the shards")
    if len(old) != len(new):
        return f"the store has {len(old)} rows but the shards give {len(new)}"
    return "no difference"


def _first_different_row(old: list[dict], new: list[dict]) -> int:
    """The first position where two lists of index rows differ; the shorter one's length if it is the other's
    start."""
    return next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))


def duplicate_rows(table: pa.Table) -> dict[int, str]:
    """Rows whose (shard, key) appeared earlier in the index, with the reason they are not used.

    The rule every reader shares: the first occurrence of a key in its shard is the sample; later ones are
    recorded failures of precompute and skipped by the training loader.
    """
    first: dict[tuple[str, str], int] = {}
    duplicates = {}
    for row, location in enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())):
        if location in first:
            duplicates[row] = f"duplicate key {location[1]} in shard {location[0]} (first at row {first[location]})"
        else:
            first[location] = row
    return duplicates
