"""The target store (format version 2): the one file that knows how targets lie on disk.

    STORE/                      Zarr v3 group; attributes: format, format_version, dataset_fingerprint,
                                index_sha256, num_samples, num_rows, row_ranges, rows_per_block, created_by
    STORE/index.parquet         one row per sample (see pipeline/data/index.py); its `target_row` is the row
                                below that holds the sample's image's targets: one row per distinct image
    STORE/shards.parquet        one row per shard, in shard order: shard (name), size, mtime_ns, etag (the shard's
                                identity when indexed: a rerun re-reads only shards whose identity changed),
                                row_start, row_stop (its rows above), error, error_key (damage reading it found)
    STORE/<teacher>/            Zarr group; attributes: spec, teacher_fingerprint, target_shape, dtype,
                                rows_per_chunk, storage, complete and mean/std (both set last)
    STORE/<teacher>/target      [num_rows, T, C] float16 (bfloat16 by spec), sharded: one shard = one block
                                of rows_per_block rows, inner chunks of rows_per_chunk rows, zstd; only the
                                rows of `row_ranges` are in use (each growth of the store starts a range on a
                                block boundary, so no block is ever written twice)
    STORE/<teacher>/scale       only for int8 storage: [num_rows, T] float16, target = int8 code * scale
    STORE/<teacher>/valid       [num_rows] uint8, one chunk per block: 1 = target written, 0 = not
    STORE/errors.parquet        row (target row), sample, shard, key, teacher, error: what could not be processed
    STORE/_blocks/<teacher>/<block>.json   completion record, written after the block's files are durable
    STORE/_runs/<time>.json     one summary per precompute run that did work (rows, seconds, workers) with
                                its settings whole under `config` (pipeline.precompute.PrecomputeConfig)
    STORE/_lock                 held by the running precompute job (host, pid, heartbeat)

Any Zarr v3 reader opens the arrays without this package. A block is the unit of work and of
writing: two workers never write the same file, and a block without a record is simply redone.

A store grows (`grow`) when its shards gain new ones: index.parquet gets the new samples, the arrays get longer,
and the new images' rows start a new range. The root attributes commit it: they name the digest of the index
about to be written (`pending_index_sha256`) before it is written, and take it as theirs after, so a run killed
in between leaves a store that the next run (and only it) finishes growing.

Nothing else belongs in a store. A write killed half-way (kill -9) leaves its temporary file beside its
target: zarr's `<name>.<32 hex digits>.partial`, or `<name>.tmp-<pid>` of `_atomic_write`. The next run that
holds the lock deletes them (`remove_partial_writes`); `pipeline verify` names them and any other stray file.
A damaged file is named where it is read: a block record that does not parse or lacks a field counts as
missing (its block is computed again), and a damaged `zarr.json` or parquet file is a one-line error.

Compact storage (opt-in per teacher, recorded in the `storage` attribute): `pool: p` averages
p x p windows of a square token grid (stored T' = T / p^2; readers upsample back by repeating each
token, so pooling loses detail), `quantize: int8` stores int8 codes with a float16 scale per row and
token (code = round(x / scale), scale = max|x| / 127 over channels).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import fsspec
import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import zarr
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, Endian, ShardingCodec, ShardingCodecIndexLocation, ZstdCodec

from pipeline.data import zarr_bfloat16
from pipeline.data.atomic import TEMPORARY_INFIX, atomic_write
from pipeline.data.errors import UsageError
from pipeline.data.failpoints import failpoint
from pipeline.data.index import PreviousIndex, index_layout
from pipeline.data.store_lock import LOCK_FILE, StoreLock, check_fence

zarr_bfloat16.register()

FORMAT = "teacher-targets"
FORMAT_VERSION = 2
INDEX_FILE = "index.parquet"
SHARDS_FILE = "shards.parquet"
ERRORS_FILE = "errors.parquet"
BLOCKS_DIR = "_blocks"
RUNS_DIR = "_runs"
ZSTD_LEVEL = 3
SCALE_DTYPE = np.dtype(np.float16)  # the per-token scales of int8 storage
DIGEST_ALGORITHM = "xxh3_128"  # of a block's stored values, kept in its record (`block_digest`)
# The temporary files of writes that were never renamed into place: zarr-python's LocalStore writes
# `path.with_suffix(f".{uuid4().hex}.partial")`, `_atomic_write` writes f"{path}{TEMPORARY_INFIX}{pid}".
_PARTIAL_WRITE = re.compile(r"(\.[0-9a-f]{32}\.partial|" + re.escape(TEMPORARY_INFIX) + r"\d+)$")
# What the store keeps beside its teacher groups. A teacher of one of these names would overwrite or delete them,
# so they are refused, as is any name starting with "_" or "." (kept for the store's own future entries).
RESERVED_NAMES = frozenset({INDEX_FILE, SHARDS_FILE, ERRORS_FILE, BLOCKS_DIR, RUNS_DIR, LOCK_FILE, "zarr.json"})

ERRORS_SCHEMA = pa.schema(
    [("row", pa.int64()),  # the target row, -1 where the failure is not a target's
     ("sample", pa.int64()),  # the sample's row in index.parquet, -1 for damage tied to no sample (a cut shard)
     ("shard", pa.string()), ("key", pa.string()), ("teacher", pa.string()), ("error", pa.string())]
)


# One row per compressed chunk: training reads rows in random order, and a chunk is decoded whole, so bigger
# chunks would decode rows nobody asked for (8 rows per chunk = 8x the bytes per sample).
DEFAULT_ROWS_PER_CHUNK = 1

def package_version() -> str:
    try:
        return version("teacher-targets-pipeline")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class BlockRange:
    block: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BlockStats:
    """Per-channel sums (float64) over the valid rows' float32 values of one teacher's block: `count` values per
    channel; a run merges the blocks' sums into the teacher's mean/std."""

    count: int
    sum: tuple[float, ...]  # [C]
    sumsq: tuple[float, ...]  # [C]

    @classmethod
    def from_dict(cls, stats: dict) -> BlockStats:
        """From {count, sum, sumsq} (lists), as the compute stage makes them and a record's JSON holds them."""
        return cls(stats["count"], tuple(stats["sum"]), tuple(stats["sumsq"]))


@dataclass(frozen=True)
class BlockRecord:
    """One teacher's block is done: `STORE/_blocks/<teacher>/<block>.json`, written by the write stage only after
    the block's files are durable. Other tools read these files: `to_json` writes the fields below and `rows` as
    JSON keys, and `from_json` is the one way to read a record back (it refuses anything `to_json` did not write)."""

    teacher: str
    fingerprint: str  # the teacher's, at the time the block was computed
    block: int
    start: int  # global rows start..stop
    stop: int
    written: int  # rows whose valid flag is 1
    failures: tuple[dict, ...]  # rows of errors.parquet (row, sample, shard, key, teacher, error), sorted by row
    digest: str  # `block_digest` of the stored values
    stats: BlockStats
    batch_size: int  # batch composition changes the last float bits: byte identity needs equal batch sizes
    seconds: float  # the block's stages for this teacher, its share of the block's reading and preprocessing
    reused: int = 0  # rows copied from other stores (`--reuse`), not computed

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "rows": self.rows}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, teacher: str, block: BlockRange, channels: int | None) -> BlockRecord:
        """The record in a completion record file of `teacher`'s `block` (targets of `channels` channels);
        DamagedRecord saying why if the file is not a record that `to_json` wrote for them."""
        try:
            fields = json.loads(data)
        except (ValueError, RecursionError):
            raise DamagedRecord("not valid JSON") from None
        problem = _record_problem(fields, teacher, block, channels)
        if problem:
            raise DamagedRecord(problem)
        return cls(teacher=teacher, fingerprint=fields["fingerprint"], block=block.block, start=block.start,
                   stop=block.stop, written=fields["written"], failures=tuple(fields["failures"]),
                   digest=fields["digest"], stats=BlockStats.from_dict(fields["stats"]),
                   batch_size=fields["batch_size"], seconds=fields["seconds"], reused=fields["reused"])


class DamagedRecord(ValueError):
    """A completion record file that is not one `BlockRecord.to_json` wrote; its block counts as not done."""


@dataclass(frozen=True)
class Storage:
    """How a teacher's targets are stored: dtype and the opt-in compact options (see the module docstring)."""

    dtype: str = "float16"
    quantize: str = "none"  # "none" | "int8"
    pool: int = 1

    def stored_shape(self, tokens: int, channels: int) -> tuple[int, int]:
        if self.pool == 1:
            return tokens, channels
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens or grid % self.pool:
            raise UsageError(f"pool {self.pool} needs a square token grid divisible by it; targets have {tokens} tokens")
        return (grid // self.pool) ** 2, channels

    def row_layout(self, tokens: int, channels: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per array holding the targets, the shape and dtype of one row of targets [T, C]: `target` [T', C] in the
        array dtype and, for int8, `scale` [T'] float16. `add_teacher` makes the arrays from it; UsageError if the
        pool does not fit the shape."""
        stored_tokens, _ = self.stored_shape(tokens, channels)
        layout = {"target": ((stored_tokens, channels), self.array_dtype)}
        if self.quantize == "int8":
            layout["scale"] = ((stored_tokens,), SCALE_DTYPE)
        return layout

    def array_row_nbytes(self, tokens: int, channels: int) -> dict[str, int]:
        """Uncompressed bytes one row of targets [T, C] takes in each array of `row_layout`."""
        return {array: math.prod(shape) * dtype.itemsize
                for array, (shape, dtype) in self.row_layout(tokens, channels).items()}

    def row_nbytes(self, tokens: int, channels: int) -> int:
        """Uncompressed bytes one row of targets [T, C] takes in the store: its codes and int8 scales (the row's
        1-byte `valid` flag is not counted). UsageError if the pool does not fit the shape."""
        return sum(self.array_row_nbytes(tokens, channels).values())

    def encode(self, target) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 [n, T, C], a numpy array or a torch tensor on any device -> (stored [n, T', C] in the array dtype,
        scale [n, T'] float16 or None), numpy arrays on the host: `encode_tensor`'s results brought to the host."""
        codes, scale = self.encode_tensor(target)
        return _host_array(codes), None if scale is None else _host_array(scale)

    def encode_tensor(self, target):
        """`encode` left where the tensor is: (codes [n, T', C] in the array dtype, scale [n, T'] float16 or None),
        torch tensors on the target's device.

        The arithmetic runs where the tensor is, so from a teacher's device only the stored bytes cross to the
        host, and it gives the same bits on every device: casts and divisions round to nearest even (IEEE),
        `torch.round` rounds halves to even as `np.rint` did, and pooling adds in numpy's order (`_pool_mean`).
        """
        import torch

        values = _float32_tensor(target)
        if self.pool > 1:
            values = _pool_mean(values, self.pool)
        if self.quantize == "int8":
            scale = (values.abs().amax(dim=-1) / 127.0).to(torch.float16)
            safe = torch.where(scale > 0, scale.to(torch.float32), 1.0).unsqueeze(-1)
            return torch.round(values / safe).clamp_(-127, 127).to(torch.int8), scale
        return values.to(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16), None

    def decode(self, stored: np.ndarray, scale: np.ndarray | None, tokens: int) -> np.ndarray:
        """Undo `encode` as far as it can be undone: [n, T', C] -> float32 [n, T, C]."""
        out = stored.astype(np.float32)
        if scale is not None:
            out = out * scale.astype(np.float32)[..., None]
        if self.pool > 1:
            n, _, channels = out.shape
            grid, p = int(round(tokens ** 0.5)), self.pool
            out = out.reshape(n, grid // p, 1, grid // p, 1, channels)
            out = np.broadcast_to(out, (n, grid // p, p, grid // p, p, channels)).reshape(n, tokens, channels)
        return out

    @property
    def array_dtype(self) -> np.dtype:
        if self.quantize == "int8":
            return np.dtype(np.int8)
        return zarr_bfloat16.BFLOAT16 if self.dtype == "bfloat16" else np.dtype(self.dtype)


def _float32_tensor(target):
    """`target` as a float32 torch tensor where it is; a numpy array is shared, not copied (read-only ones too:
    `encode` never writes to its input)."""
    import torch

    if isinstance(target, torch.Tensor):
        return target.to(torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))


def _pool_mean(values, p: int):
    """Means of p x p windows of a square token grid: float32 [n, g*g, C] -> [n, (g/p)^2, C], bit for bit what
    numpy's `values.reshape(n, g/p, p, g/p, p, C).mean(axis=(2, 4))` gives when C > 1 (every teacher's case):
    numpy adds a window's values to +0.0 one at a time, row by row, in float32, then divides by p*p in float64.
    (For C == 1 numpy sums each window row apart first, so the last bit of a mean may differ from its.)"""
    import torch

    n, tokens, channels = values.shape
    side = int(round(tokens ** 0.5)) // p
    windows = values.reshape(n, side, p, side, p, channels)
    total = torch.zeros((n, side, side, channels), dtype=torch.float32, device=values.device)
    for row in range(p):
        for column in range(p):
            total += windows[:, :, row, :, column]
    return (total.to(torch.float64) / (p * p)).to(torch.float32).reshape(n, side * side, channels)


def _host_array(tensor) -> np.ndarray:
    """A torch tensor's values as a numpy array on the host (numpy has no bfloat16: its bits, as ml_dtypes')."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).cpu().numpy().view(zarr_bfloat16.BFLOAT16)
    return tensor.cpu().numpy()


def new_teacher_attrs(spec: dict, fingerprint: str, target_shape: tuple[int, int], storage: Storage,
                      rows_per_chunk: int) -> dict:
    """A teacher group's attributes as `add_teacher` writes them; `mark_complete` later sets `complete` and adds
    the per-channel `mean` and `std`."""
    tokens, channels = (int(x) for x in target_shape)
    stored_tokens, _ = storage.stored_shape(tokens, channels)
    return {
        "spec": spec,
        "teacher_fingerprint": fingerprint,
        "target_shape": [tokens, channels],
        "dtype": storage.dtype,
        "storage": {**asdict(storage), "stored_shape": [stored_tokens, channels]},
        "rows_per_chunk": rows_per_chunk,
        "complete": False,
    }


def check_teacher_name(name: str) -> None:
    """Raise UsageError if `name` cannot be a teacher group of a store (it collides with the store's own entries)."""
    if name in RESERVED_NAMES or name.startswith(("_", ".")):
        raise UsageError(f"teacher name {name!r} is reserved for the store's own files (names starting with '_' or "
                         f"'.', and {', '.join(sorted(n for n in RESERVED_NAMES if n[0] not in '_.'))}); "
                         "choose another name")


class TargetStore:
    """Read and write one target store at a local path or fsspec URL."""

    def __init__(self, path: str):
        text = str(path)
        if not fsspec.core.split_protocol(text)[1].strip("/"):  # "", "/", "file:///", "s3://"
            raise UsageError(_no_location(text))
        self.path = text.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.path)
        if self._is_local() and posixpath.normpath(self._root) == "/":  # "/tmp/..", "//"
            raise UsageError(_no_location(text))
        self._group: zarr.Group | None = None
        self._records: dict[str, tuple[tuple, BlockRecord | str]] = {}  # path -> (its identity, record or why not)

    # ---- lifecycle -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.fs.exists(self._join("zarr.json"))

    def check_location(self) -> None:
        """Refuse to make a store where one cannot be: on a file, or in a directory holding other things."""
        if self.exists():
            return
        if self.fs.isfile(self._root):
            raise UsageError(f"--store {self.path} is a file; pass a directory (new, empty, or a target store)")
        if self.fs.isdir(self._root):
            # A first run killed while writing the group's zarr.json leaves only its lock and partial files.
            entries = [p for p in self.fs.ls(self._root, detail=False)
                       if posixpath.basename(p) != LOCK_FILE and not is_partial_write(p)]
            if entries:
                raise UsageError(f"--store {self.path} is a directory that is not a target store (it holds "
                                 f"{posixpath.basename(entries[0])}, ...); pass a new or empty directory, or a store")

    def half_created(self) -> bool:
        """A crash inside `create`: the group is there but neither its attributes nor any teacher are."""
        return "format" not in self._root_metadata().get("attributes", {}) and not self._teacher_folders()

    def create(self, index: pa.Table, dataset_fingerprint: str, *, rows_per_block: int,
               shards: pa.Table | None = None) -> None:
        """Create the group, write index.parquet (its `target_row` assigned: `pipeline.data.index.assign_target_rows`)
        and shards.parquet (`shards`: pipeline.data.index.SHARDS_SCHEMA, the shards' identities), then the group's
        attributes (which mark the store as made)."""
        if rows_per_block < 1:
            raise UsageError(f"rows_per_block must be >= 1, got {rows_per_block}")
        if self.exists():  # a half-created store (see `half_created`): start its group again
            self.fs.rm(self._join("zarr.json"))
        self.remove_partial_writes()  # what the killed creation was writing
        group = zarr.open_group(self.path, mode="a", zarr_format=3)  # unlike "w", keeps the job's lock file
        index_bytes = _parquet_bytes(index)
        self._atomic_write(self._join(INDEX_FILE), index_bytes)
        if shards is not None:
            self._write_parquet(SHARDS_FILE, shards)
        elif self.fs.exists(self._join(SHARDS_FILE)):  # left by an interrupted creation for other shards
            self.fs.rm(self._join(SHARDS_FILE))
        failpoint("store-created")  # the group exists without its attributes: a rerun creates it again
        group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "rows_per_block": rows_per_block,
                            "created_by": f"teacher-targets-pipeline {package_version()}",
                            **_index_attrs(index, index_bytes, dataset_fingerprint)})
        self._group = group

    def grow(self, index: pa.Table, dataset_fingerprint: str, shards: pa.Table) -> bool:
        """Make `index` (the stored one plus new samples, rows assigned) the store's index; True if the arrays grew.

        In this order, each step safe to repeat: the digest of the index to come is named (`pending_index_sha256`),
        the teachers' arrays get longer and lose their completion flag where new rows came, shards.parquet and then
        index.parquet are written, and the root attributes take the new index as theirs. Block files and records
        are not touched: new rows lie in new blocks. Only under the lock.
        """
        index_bytes = _parquet_bytes(index)
        attrs = _index_attrs(index, index_bytes, dataset_fingerprint)
        self.group.attrs.update({"pending_index_sha256": attrs["index_sha256"]})
        failpoint("grow-pending")
        grew = attrs["num_rows"] > self.num_rows
        for name in self.teacher_names():
            group = self.group[name]
            for array in _TEACHER_ARRAYS:
                if array in group and group[array].shape[0] != attrs["num_rows"]:
                    group[array].resize((attrs["num_rows"], *group[array].shape[1:]))
            if grew and group.attrs.get("complete"):
                kept = {k: v for k, v in group.attrs.asdict().items() if k not in _COMPLETION_STATISTICS}
                group.attrs.put({**kept, "complete": False})
        self._write_parquet(SHARDS_FILE, shards)  # first: an index found written has its shards' record beside it
        self._atomic_write(self._join(INDEX_FILE), index_bytes)
        failpoint("grow-index-written")
        self._settle_growth(attrs)
        return grew

    def finish_growing(self) -> bool:
        """Commit a growth that a killed run left half done (its index written, the attributes not yet); True if
        there was one. Only under the lock."""
        pending = self.group.attrs.get("pending_index_sha256")
        if pending is None:
            return False
        data = self._read_index_bytes()
        if hashlib.sha256(data).hexdigest() == pending:
            index = self._parse_parquet(INDEX_FILE, data, "rerun `pipeline precompute`")
            from pipeline.data.index import dataset_fingerprint

            shards = self.read_shard_records()  # written before the index: the new one
            self.grow(index, dataset_fingerprint(index), _no_shards() if shards is None else shards)
        else:  # killed before the index was written: the store is as it was; the run grows it again
            self._settle_growth({})
        return True

    def _settle_growth(self, attrs: dict) -> None:
        """The root attributes with `attrs` set and no growth pending, in one write of zarr.json."""
        root = {k: v for k, v in self.group.attrs.asdict().items() if k != "pending_index_sha256"}
        self.group.attrs.put({**root, **attrs})

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            if not self.exists():
                raise UsageError(f"{self.path} is not a target store (no zarr.json); run `pipeline precompute` first")
            if self.half_created():  # also refuses a damaged zarr.json, naming it
                raise UsageError(f"{self.path} is a target store whose creation was interrupted; rerun "
                                 "`pipeline precompute` to make it")
            group = zarr.open_group(self.path, mode="r+" if self._writable() else "r", zarr_format=3)
            fmt, ver = group.attrs.get("format"), group.attrs.get("format_version")
            if fmt != FORMAT:
                raise UsageError(f"{self.path} is a Zarr group but not a target store (format={fmt!r})")
            if ver != FORMAT_VERSION:
                raise UsageError(_version_message(self.path, ver))
            self._group = group
        return self._group

    def _writable(self) -> bool:
        return os.access(self._root, os.W_OK) if self.fs.protocol in ("file", ("file", "local")) else True

    # ---- store-level facts -------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def num_rows(self) -> int:
        """The length of the teacher arrays: the target rows in use (`row_ranges`) and the gaps between ranges."""
        return int(self.group.attrs["num_rows"])

    @property
    def num_samples(self) -> int:
        return int(self.group.attrs["num_samples"])

    @property
    def row_ranges(self) -> list[tuple[int, int]]:
        """The target rows in use, as [start, stop) ranges: one per growth of the store, each starting a block."""
        return [(int(a), int(b)) for a, b in self.group.attrs["row_ranges"]]

    @property
    def rows_per_block(self) -> int:
        return int(self.group.attrs["rows_per_block"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.group.attrs["dataset_fingerprint"])

    def blocks(self) -> list[BlockRange]:
        """The blocks holding rows in use; block b is row b * rows_per_block onwards (the Zarr shard it fills)."""
        size = self.rows_per_block
        return [BlockRange(start // size, start, min(start + size, stop))
                for range_start, stop in self.row_ranges for start in range(range_start, stop, size)]

    def read_index(self) -> pa.Table:
        """index.parquet, checked against the digest the store recorded when it was made.

        Every column counts (workers seek by `image_offset`, the loader maps keys to rows), so an edited or
        damaged index is refused here rather than trusted.
        """
        data = self._read_index_bytes()
        expected = self.group.attrs.get("index_sha256")
        if expected is None:
            raise UsageError(f"{self.path}/zarr.json records no index_sha256, which every store this package makes "
                             "records (edited or damaged); rebuild the store with `pipeline precompute` into a new "
                             "--store")
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            if digest == self.group.attrs.get("pending_index_sha256"):
                raise UsageError(f"store {self.path} is being grown by a precompute run, or was when that run was "
                                 "killed; rerun `pipeline precompute` to finish it")
            raise UsageError(f"{self.path}/{INDEX_FILE} differs from the index this store was made with (edited or "
                             "damaged); restore it, or rebuild the store with `pipeline precompute` into a new --store")
        return self._parse_parquet(INDEX_FILE, data, "restore it, or rebuild the store with `pipeline precompute` "
                                                     "into a new --store")

    def _read_index_bytes(self) -> bytes:
        with self.fs.open(self._join(INDEX_FILE), "rb") as f:
            return f.read()

    def read_shard_records(self) -> pa.Table | None:
        """shards.parquet (see pipeline/data/index.py, SHARDS_SCHEMA), or None where it is missing (deleted: it is
        only what lets reruns skip unchanged shards). UsageError if it is not a parquet file."""
        path = self._join(SHARDS_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return self._parse_parquet(SHARDS_FILE, f.read(), "delete it: a precompute rerun that has work writes "
                                                              "it again (until then reruns re-read every shard)")

    def _parse_parquet(self, filename: str, data: bytes, remedy: str) -> pa.Table:
        try:
            return pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, ValueError, OSError) as exc:
            why = " ".join(str(exc).split())[:200]
            raise UsageError(f"store {self.path}: {self.path}/{filename} is not a readable parquet file (damaged: "
                             f"{why}); {remedy}") from None

    def record_shards(self, shards: pa.Table) -> bool:
        """Write shards.parquet unless it already holds exactly `shards`; True if it wrote. Only under the lock."""
        data = _parquet_bytes(shards)
        path = self._join(SHARDS_FILE)
        if self.fs.exists(path):
            with self.fs.open(path, "rb") as f:
                if f.read() == data:
                    return False
        self._atomic_write(path, data)
        return True

    def previous_index(self, index: pa.Table | None = None) -> PreviousIndex | None:
        """This store's record of its shards for `pipeline.data.index.build_index(previous=...)`: a rerun then re-reads
        only shards that changed. None for a store made before shards.parquet existed (every shard is read). `index`:
        the store's index.parquet when the caller has read it already."""
        try:
            shards = self.read_shard_records()
        except UsageError:
            return None  # damaged: every shard is read again, and a run with work writes the record anew
        return None if shards is None else PreviousIndex(index=self.read_index() if index is None else index,
                                                         shards=shards)

    def read_errors(self) -> pa.Table:
        """errors.parquet (ERRORS_SCHEMA; empty before a run finished); UsageError naming it if it is damaged."""
        path = self._join(ERRORS_FILE)
        if not self.fs.exists(path):
            return ERRORS_SCHEMA.empty_table()
        remedy = "a precompute rerun writes it again"
        with self.fs.open(path, "rb") as f:
            table = self._parse_parquet(ERRORS_FILE, f.read(), remedy)
        if not table.schema.remove_metadata().equals(ERRORS_SCHEMA):
            raise UsageError(f"store {self.path}: {self.path}/{ERRORS_FILE} has columns {table.column_names}, not "
                             f"{ERRORS_SCHEMA.names} (damaged or edited); {remedy}")
        return table

    def write_errors(self, rows: list[dict]) -> None:
        rows = sorted(rows, key=lambda r: (r["row"], r["teacher"], r["shard"], r["key"]))
        self._write_parquet(ERRORS_FILE, pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA))

    # ---- teachers ----------------------------------------------------------------------------

    def teacher_names(self) -> list[str]:
        self.group  # noqa: B018 - refuse what is not a store (or not made yet) before reading its folders
        return self._teacher_folders()

    def _teacher_folders(self) -> list[str]:
        """The Zarr groups beside the store's own entries: its teachers. UsageError naming a damaged zarr.json."""
        folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in self.fs.ls(self._root, detail=True)
                         if e["type"] == "directory")
        teachers = []
        for folder in folders:
            if folder.startswith(("_", ".")):  # the store's own (`check_teacher_name`)
                continue
            metadata = self._node_metadata(folder)
            if metadata is not None and metadata["node_type"] == "group":
                teachers.append(folder)
        return teachers

    def _root_metadata(self) -> dict:
        metadata = self._node_metadata("")
        if metadata is None:
            raise UsageError(f"{self.path} is not a target store (no zarr.json); run `pipeline precompute` first")
        return metadata

    def _node_metadata(self, folder: str) -> dict | None:
        """`folder`/zarr.json, parsed (None if absent); UsageError naming it, and what to do, if it is damaged."""
        try:
            with self.fs.open(self._join(folder, "zarr.json"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            metadata = json.loads(data)
        except (ValueError, RecursionError):
            why = "not valid JSON"
        else:
            why = _metadata_problem(metadata)
        if why is None:
            return metadata
        teacher = folder.split("/")[0]
        remedy = (f"delete the teacher's folder {posixpath.join(self.path, teacher)} and rerun `pipeline precompute` "
                  f"to compute teacher {teacher} again") if teacher else "restore it, or precompute into a new --store"
        raise UsageError(f"store {self.path}: {posixpath.join(self.path, folder, 'zarr.json')} is {why} (damaged); "
                         f"{remedy}")

    def teacher_attrs(self, name: str) -> dict:
        if name not in self.teacher_names():
            raise UsageError(f"store {self.path} has no teacher {name!r}; it has {self.teacher_names()}")
        return dict(self.group[name].attrs)

    def add_teacher(
        self,
        name: str,
        *,
        spec: dict,
        fingerprint: str,
        target_shape: tuple[int, int],
        storage: Storage = Storage(),
        rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    ) -> None:
        """Create the teacher's group and arrays (fill value 0, valid = 0 everywhere), forgetting old records."""
        check_teacher_name(name)
        layout = storage.row_layout(*(int(x) for x in target_shape))
        rows_per_chunk = self.chunk_rows(rows_per_chunk)
        records = self._join(BLOCKS_DIR, name)
        if self.fs.exists(records):
            self.fs.rm(records, recursive=True)
        group = self.group.create_group(name, overwrite=True)
        rows, block = self.num_rows, self.rows_per_block
        for array, (row_shape, dtype) in layout.items():
            group.create_array(
                array, shape=(rows, *row_shape), shards=(block, *row_shape), chunks=(rows_per_chunk, *row_shape),
                dtype=dtype, compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
            )
        group.create_array("valid", shape=(rows,), chunks=(block,), dtype="uint8", fill_value=0,
                           compressors=ZstdCodec(level=ZSTD_LEVEL))
        group.attrs.update(new_teacher_attrs(spec, fingerprint, target_shape, storage, rows_per_chunk))

    def chunk_rows(self, rows_per_chunk: int) -> int:
        """The rows per chunk a new teacher group gets: `rows_per_chunk`, at most a block, and dividing it."""
        rows_per_chunk = max(1, min(rows_per_chunk, self.rows_per_block))
        if self.rows_per_block % rows_per_chunk:
            raise UsageError(f"--rows-per-chunk {rows_per_chunk} must divide the store's rows_per_block "
                             f"{self.rows_per_block}")
        return rows_per_chunk

    def storage(self, name: str) -> Storage:
        attrs = self.teacher_attrs(name)
        options = attrs["storage"]
        return Storage(dtype=attrs["dtype"], quantize=options["quantize"], pool=int(options["pool"]))

    def mark_complete(self, name: str, extra: dict | None = None) -> None:
        self.group[name].attrs.update({"complete": True, **(extra or {})})

    def nbytes(self, name: str) -> int:
        """Bytes the teacher's group takes on disk (all its array files)."""
        return int(self.fs.du(self._join(name)))

    # ---- blocks ------------------------------------------------------------------------------

    def write_block(self, name: str, block: BlockRange, target: np.ndarray, valid: np.ndarray) -> str:
        """Encode and write one block (`target` float32 [rows, T, C], `valid` [rows]), make it durable.

        Returns the `block_digest` of the stored values (codes, scales, valid flags), which the block's record
        keeps so `pipeline verify` can tell a tampered or damaged block from a good one.
        """
        return self.write_encoded(name, block, *self.storage(name).encode(target), valid)

    def write_encoded(self, name: str, block: BlockRange, stored: np.ndarray, scale: np.ndarray | None,
                      valid: np.ndarray) -> str:
        """`write_block` for targets already encoded by the teacher's `Storage` (see `Storage.encode`).

        Each array's file of the block (its shard; for `valid`, its chunk) is encoded here and written in one go,
        as zarr-python would write it byte for byte (`_block_file`): through zarr's own write path the same
        bytes cost about 3x the time of compressing them.
        """
        group = self.group[name]
        for array, values in (("target", stored), ("scale", scale), ("valid", valid)):
            if values is not None:
                metadata = group[array].metadata
                key = metadata.encode_chunk_key((block.block,) + (0,) * (len(metadata.shape) - 1))
                self._write_file(self._join(name, array, key), _block_file(metadata, values, f"{name}/{array}"))
        return block_digest(stored, scale, valid)

    def _write_file(self, path: str, data: Iterable[bytes] | None) -> None:
        """Write `path` durably (`_atomic_write`), or delete it where `data` is None (zarr keeps no file that
        holds only fill values)."""
        if data is not None:
            self._atomic_write(path, data)
        elif self.fs.exists(path):
            self.fs.rm(path)

    def read_block_digest(self, name: str, block: BlockRange) -> str:
        """The digest `write_block` returned, recomputed from what is on disk now."""
        group = self.group[name]
        scale = group["scale"][block.start : block.stop] if "scale" in group else None
        return block_digest(group["target"][block.start : block.stop], scale, group["valid"][block.start : block.stop])

    def read_rows(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded targets float32 [n, T, C] and valid flags uint8 [n] for rows start..stop."""
        return self.reader().rows(name, start, stop)

    def reader(self) -> TargetReader:
        """A reader of this store's targets that keeps each teacher's arrays open (see `TargetReader`)."""
        return TargetReader(self)

    def write_record(self, record: BlockRecord) -> None:
        """The block's completion record: written only after `write_block` returned."""
        self._atomic_write(self._record_path(record.teacher, record.block), record.to_json())

    def done_blocks(self, name: str) -> set[int]:
        """The blocks of teacher `name` with a sound completion record; a damaged record counts as missing."""
        return set(self._scan_records(name)[0])

    def read_records(self, name: str) -> list[BlockRecord]:
        """The sound completion records of teacher `name`, in block order (see `damaged_records`)."""
        records = self._scan_records(name)[0]
        return [records[block] for block in sorted(records)]

    def damaged_records(self, name: str) -> list[str]:
        """One line per record file of teacher `name` that does not parse or lacks a field, naming it."""
        return self._scan_records(name)[1]

    def _scan_records(self, name: str) -> tuple[dict[int, BlockRecord], list[str]]:
        """({block: sound record}, [one line per damaged record]) of teacher `name`. A record file is parsed once
        per identity (a rewrite is a new file): a run reads its records several times, and they are many."""
        folder = self._join(BLOCKS_DIR, name)
        if not self.fs.exists(folder):
            return {}, []
        ranges = {b.block: b for b in self.blocks()}
        channels = self.teacher_attrs(name).get("target_shape", [None, None])[1]
        files = {}  # the files named as `write_record` names them (anything else is a stray file: `stray_files`)
        for entry in self.fs.ls(folder, detail=True):
            block = _record_block(posixpath.basename(entry["name"]))
            if block in ranges:
                files[block] = (entry["name"], tuple(entry.get(key) for key in _FILE_IDENTITY))
        unread = [path for path, identity in files.values() if self._records.get(path, (None,))[0] != identity]
        # One call for all: object stores fetch them concurrently.
        contents = self.fs.cat(unread, on_error="return") if unread else {}
        records, damaged = {}, []
        for block, (path, identity) in sorted(files.items()):
            if path in contents:
                if isinstance(contents[path], FileNotFoundError):
                    continue  # removed since the listing
                if isinstance(contents[path], Exception):
                    raise contents[path]
                self._records[path] = (identity, _parse_record(contents[path], name, ranges[block], channels))
            record = self._records[path][1]
            if isinstance(record, BlockRecord):
                records[block] = record
            else:
                damaged.append(f"{self.path}/{BLOCKS_DIR}/{name}/{posixpath.basename(path)} is not a sound "
                               f"completion record ({record}); a precompute rerun computes block {block} again")
        return records, damaged

    # ---- runs and the job lock -----------------------------------------------------------------

    def write_run(self, record: dict) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(record.get("finished", time.time())))
        self._atomic_write(self._join(RUNS_DIR, f"{stamp}-{os.getpid()}.json"), json.dumps(record, indent=1).encode())

    def last_run(self) -> dict | None:
        folder = self._join(RUNS_DIR)
        if not self.fs.exists(folder):
            return None
        paths = sorted(p for p in self.fs.ls(folder, detail=False) if p.endswith(".json"))
        if not paths:
            return None
        with self.fs.open(paths[-1], "rb") as f:
            data = f.read()
        try:
            run = json.loads(data)
        except (ValueError, RecursionError):
            run = None
        if not isinstance(run, dict):
            raise UsageError(f"store {self.path}: {self.path}/{RUNS_DIR}/{posixpath.basename(paths[-1])} is not a "
                             "run summary (damaged); delete it (it only describes a past run)")
        return run

    def lock(self) -> StoreLock:
        """The store's job lock (see pipeline/data/store_lock.py); its `token` fences the run's workers."""
        return StoreLock(self.fs, self._root, display=self.path)

    def check_fence(self, token: str | None) -> None:
        """Raise FencedOut unless the run named `token` holds the store (no check when `token` is None)."""
        if token is not None:
            check_fence(self.fs, self._root, token)

    # ---- file helpers ------------------------------------------------------------------------

    def _join(self, *parts: str) -> str:
        return posixpath.join(self._root, *parts)

    def _record_path(self, name: str, block: int) -> str:
        return self._join(BLOCKS_DIR, name, f"{block:06d}.json")

    def _is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _write_parquet(self, filename: str, table: pa.Table) -> None:
        self._atomic_write(self._join(filename), _parquet_bytes(table))

    def _atomic_write(self, path: str, data: bytes | Iterable[bytes]) -> None:
        """Local: pipeline/data/atomic.py (readers never see half a file). Object stores: one PUT. `data` may come
        in parts, written in turn (joining a shard's parts would copy it all once more)."""
        if not self._is_local():
            self.fs.pipe_file(path, data if isinstance(data, bytes) else b"".join(data))
            return
        atomic_write(path, data)

    def partial_writes(self) -> list[str]:
        """The temporary files of writes that a killed process never renamed into place (`is_partial_write`),
        anywhere in the store: ours beside the groups and under _blocks/ and _runs/, zarr's beside any zarr.json
        and chunk file."""
        if not self._is_local():
            return []  # object-store writes are single PUTs: nothing partial is left behind
        return sorted(os.path.join(folder, name) for folder, _, files in os.walk(self._root) for name in files
                      if is_partial_write(name))

    def remove_partial_writes(self) -> list[str]:
        """Delete `partial_writes`; returns them.

        Only the holder of the store's lock may call this: a dead run's workers are fenced out by then (see
        pipeline/data/store_lock.py), so no live writer owns such a file.
        """
        found = self.partial_writes()
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return found

    def needs_repair(self) -> list[str]:
        """What a finished store holds that only a rerun holding the lock repairs, one line each: partial files of
        killed writes (removed by `remove_partial_writes`) and a damaged errors.parquet (written by the finish)."""
        found = [f"{path} is left by a write that was killed" for path in self.partial_writes()]
        try:
            self.read_errors()
        except UsageError as exc:
            found.append(str(exc))
        return found

    def stray_files(self) -> list[str]:
        """Paths, relative to the store, of what does not belong to its format (see the module docstring): partial
        files of killed writes and anything else. A folder that has no place in the format is one entry, "name/"."""
        layout = self._layout()
        found = []
        for path in sorted(self.fs.find(self._root)):
            parts = posixpath.relpath(path, self._root).split("/")
            entry = "/".join(parts) if is_partial_write(parts[-1]) else _outside(layout, parts)
            if entry is not None and entry not in found:
                found.append(entry)
        return found

    def _layout(self) -> dict:
        """The files the format allows, as a tree for `_outside`: {name: subtree} for a folder, True for a file, and
        for a folder of many files a test of their paths relative to it."""
        teachers = self.teacher_names()
        records = {f"{b.block:06d}.json" for b in self.blocks()}  # as `_record_path` names them
        layout: dict = {name: True for name in _STORE_FILES}
        layout[BLOCKS_DIR] = {name: records.__contains__ for name in teachers}
        layout[RUNS_DIR] = lambda relative: "/" not in relative and relative.endswith(".json")
        for name in teachers:
            layout[name] = {"zarr.json": True}
            for array in _TEACHER_ARRAYS:
                metadata = self._node_metadata(posixpath.join(name, array))
                if metadata is not None and metadata["node_type"] == "array":
                    layout[name][array] = {"zarr.json", *_chunk_keys(metadata)}.__contains__
        return layout


@dataclass
class _TeacherRows:
    """One teacher's arrays, opened once, and the last chunk `row` decoded (its index and float32 rows)."""

    target: zarr.Array
    scale: zarr.Array | None
    valid: zarr.Array
    storage: Storage
    tokens: int
    chunk_rows: int
    _chunk: tuple[int, np.ndarray] | None = None
    _flags: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._decode(start, stop), self.valid[start:stop]

    def row(self, row: int) -> tuple[np.ndarray, bool, int]:
        chunk, decoded = row // self.chunk_rows, 0
        start = chunk * self.chunk_rows
        if self._chunk is None or self._chunk[0] != chunk:
            # Zarr decodes a whole inner chunk to give one row: kept, the next rows of that chunk cost nothing.
            self._chunk = (chunk, self._decode(start, min(start + self.chunk_rows, self.target.shape[0])))
            decoded = self._chunk[1].nbytes
        if self._flags is None:
            self._flags = self.valid[:].astype(bool)  # a byte per row; read row by row, each would decode a chunk
        return self._chunk[1][row - start], bool(self._flags[row]), decoded

    def _decode(self, start: int, stop: int) -> np.ndarray:
        scale = self.scale[start:stop] if self.scale is not None else None
        return self.storage.decode(self.target[start:stop], scale, self.tokens)


class TargetReader:
    """Decoded targets of one store, by row range (`rows`) or by row (`row`), for any of its teachers.

    Opening a Zarr array reads its metadata, which costs more than decoding a row: each teacher's arrays and
    attributes are opened once, at the reader's first read of that teacher, in the process that reads, so a reader
    made before DataLoader workers fork or are spawned opens nothing until a worker reads. `row` keeps each
    teacher's last decoded chunk and reports the bytes it decoded.
    """

    def __init__(self, store: TargetStore):
        self.store = store
        self._teachers: dict[str, _TeacherRows] = {}

    def rows(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded targets float32 [n, T, C] and valid flags uint8 [n] of teacher `name` for rows start..stop."""
        return self._open(name).rows(start, stop)

    def row(self, name: str, row: int) -> tuple[np.ndarray, bool, int]:
        """Decoded target float32 [T, C] of one row, its valid flag, and the bytes decoded to give it (0 when its
        chunk was the last one this reader decoded for `name`)."""
        return self._open(name).row(row)

    def _open(self, name: str) -> _TeacherRows:
        teacher = self._teachers.get(name)
        if teacher is None:
            storage = self.store.storage(name)  # UsageError naming the store's teachers for an unknown one
            group = self.store.group[name]
            attrs = dict(group.attrs)
            teacher = self._teachers[name] = _TeacherRows(
                target=group["target"], scale=group["scale"] if "scale" in group else None, valid=group["valid"],
                storage=storage, tokens=int(attrs["target_shape"][0]), chunk_rows=int(attrs["rows_per_chunk"]))
        return teacher


def _index_attrs(index: pa.Table, index_bytes: bytes, dataset_fingerprint: str) -> dict:
    """The root attributes that describe the store's index and the target rows it uses."""
    return {"dataset_fingerprint": dataset_fingerprint, "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
            **index_layout(index)}


def _no_shards() -> pa.Table:
    from pipeline.data.index import SHARDS_SCHEMA

    return SHARDS_SCHEMA.empty_table()


def _version_message(path: str, version) -> str:
    if version == 1:
        return (f"store {path} is format version 1 (a target row per sample); this package reads version "
                f"{FORMAT_VERSION} (a target row per distinct image, stores that grow): recompute it with "
                "`pipeline precompute` into a new --store, then delete it")
    return f"{path} has store format_version {version}; this package reads version {FORMAT_VERSION}"


def is_partial_write(path: str) -> bool:
    """Whether `path` names the temporary file of a write that was never renamed into place (`_PARTIAL_WRITE`)."""
    return _PARTIAL_WRITE.search(posixpath.basename(path)) is not None


# The store's own files at its top (its folders are _blocks/, _runs/ and one per teacher), and a teacher's arrays.
_STORE_FILES = frozenset({"zarr.json", INDEX_FILE, SHARDS_FILE, ERRORS_FILE, LOCK_FILE})
_TEACHER_ARRAYS = ("target", "scale", "valid")
_COMPLETION_STATISTICS = frozenset({"mean", "std", "stats_count"})  # what `mark_complete` adds


def _outside(layout: dict, parts: list[str]) -> str | None:
    """None if the file at `parts` (a path split at "/") has a place in `layout` (see `TargetStore._layout`), else
    what to name: the file, or the first folder on its path that has no place."""
    node = layout
    for depth, part in enumerate(parts):
        if callable(node):
            return None if node("/".join(parts[depth:])) else "/".join(parts)
        if not isinstance(node, dict) or part not in node:
            return "/".join(parts[: depth + 1]) + ("/" if depth + 1 < len(parts) else "")
        node = node[part]
    return None if node is True else "/".join(parts)


def _no_location(text: str) -> str:
    """Why `text` cannot be a store's location: it is the filesystem root, or names no directory at all."""
    if fsspec.core.split_protocol(text)[1].startswith("/"):
        return f"refusing to use {text} as a store: it is the filesystem root /; pass a directory below it"
    return f"store path {text!r} names no directory; pass the store's directory (or URL)"


def _metadata_problem(metadata) -> str | None:
    """Why parsed zarr.json content is not the Zarr v3 metadata of a group or array, or None."""
    if not isinstance(metadata, dict) or metadata.get("zarr_format") != 3 \
            or metadata.get("node_type") not in ("group", "array"):
        return "not Zarr v3 metadata (no zarr_format 3 and node_type)"
    if not isinstance(metadata.get("attributes", {}), dict):
        return "not Zarr v3 metadata (its attributes are not an object)"
    return None


def _chunk_keys(metadata: dict) -> set[str]:
    """The paths of every chunk file (a shard file, for a sharded array) of a regular-grid Zarr v3 array, relative
    to its folder; none if the metadata does not say (damaged: reading the array reports it)."""
    try:
        shape = [int(n) for n in metadata["shape"]]
        chunk = [int(n) for n in metadata["chunk_grid"]["configuration"]["chunk_shape"]]
        encoding = metadata.get("chunk_key_encoding", {"name": "default"})
        default = encoding["name"] == "default"
        separator = encoding.get("configuration", {}).get("separator", "/" if default else ".")
    except (KeyError, TypeError, ValueError, AttributeError):
        return set()
    keys = [["c"] if default else []]
    for size, step in zip(shape, chunk):
        keys = [key + [str(i)] for key in keys for i in range(-(-size // max(step, 1)))]
    return {separator.join(key) for key in keys}


def _record_block(filename: str) -> int | None:
    """The block a completion record file is named after (`_record_path`), or None if it is not named so."""
    stem, ext = posixpath.splitext(filename)
    if ext != ".json" or not stem.isdigit() or f"{int(stem):06d}" != stem:
        return None
    return int(stem)


# What tells a rewritten file from the one read before: fsspec's listing of a local file or an object.
_FILE_IDENTITY = ("size", "mtime", "ino", "ETag", "LastModified")


def _parse_record(data: bytes, name: str, block: BlockRange, channels: int | None) -> BlockRecord | str:
    """A completion record file's content: the record, or why it is not a sound one."""
    try:
        return BlockRecord.from_json(data, name, block, channels)
    except DamagedRecord as exc:
        return str(exc)


def _record_problem(record, name: str, block: BlockRange, channels: int | None) -> str | None:
    """Why a parsed completion record of teacher `name`'s `block` is not one that `BlockRecord.to_json` wrote, or
    None: every field must be there, with its type."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, value in {"block": block.block, "rows": block.rows, "teacher": name, "start": block.start,
                       "stop": block.stop}.items():
        if record.get(key) != value:
            return f"{key} is {record.get(key)!r}, not {value!r}"
    if not (_is_int(record.get("written")) and 0 <= record["written"] <= block.rows):
        return f"written is {record.get('written')!r}, not a row count of the block"
    for key in ("digest", "fingerprint"):
        if not isinstance(record.get(key), str):
            return f"{key} is {record.get(key)!r}, not a string"
    if not _is_number(record.get("seconds")):
        return f"seconds is {record.get('seconds')!r}, not a number"
    if not _is_int(record.get("batch_size")):
        return f"batch_size is {record.get('batch_size')!r}, not an integer"
    if not (_is_int(record.get("reused")) and 0 <= record["reused"] <= block.rows):
        return f"reused is {record.get('reused')!r}, not a row count of the block"
    failures = record.get("failures")
    if not isinstance(failures, list) or not all(_is_failure(f) for f in failures):
        return "failures is not a list of {row, sample, shard, key, error}"
    stats = record.get("stats")
    if not (isinstance(stats, dict) and _is_int(stats.get("count")) and stats["count"] >= 0
            and all(_is_sums(stats.get(key), channels) for key in ("sum", "sumsq"))):
        return f"stats is not {{count, sum, sumsq}} over {channels} channels"
    return None


_JSON_NUMBERS = frozenset({int, float})  # what json.loads gives for a number (bool is not one)


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in _JSON_NUMBERS


def _is_failure(failure) -> bool:
    return isinstance(failure, dict) and _is_int(failure.get("row")) and _is_int(failure.get("sample")) and all(
        isinstance(failure.get(key), str) for key in ("shard", "key", "error"))


def _is_sums(values, channels: int | None) -> bool:
    return isinstance(values, list) and (channels is None or len(values) == channels) and set(
        map(type, values)) <= _JSON_NUMBERS


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def block_digest(stored: np.ndarray, scale: np.ndarray | None, valid: np.ndarray) -> str:
    """"xxh3_128:<32 hex digits>" over a block's stored values: codes, int8 scales (if any), valid flags (uint8).

    What it must give is integrity that `pipeline verify` can check (a damaged or edited shard file), not a
    cryptographic promise: whoever could forge a digest can rewrite the record beside it. xxh3 reads about
    13 GB/s on one core where sha256 read 1.3 (on a copy made to hash it); the arrays are hashed in place.
    """
    digest = xxhash.xxh3_128()
    for values in (stored, scale, np.asarray(valid, dtype=np.uint8)):
        if values is not None:
            digest.update(_bytes_of(values))
    return f"{DIGEST_ALGORITHM}:{digest.hexdigest()}"


def _bytes_of(values: np.ndarray) -> np.ndarray:
    """The C-order bytes of `values` as a uint8 view (a copy only if `values` is not contiguous)."""
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _block_file(metadata, values: np.ndarray, array: str) -> Iterator[bytes] | None:
    """The file, as parts made one by one, that zarr-python writes for one block of an array made by `add_teacher`:
    the block's shard (`target`, `scale`) or its one chunk (`valid`), holding `values`, the block's rows (those past
    the array's end left out); None where zarr writes no file because every chunk holds only the fill value.

    A shard (the Zarr v3 sharding codec) is its non-empty inner chunks, each zstd-compressed, in row order (which
    is the codec's Morton order for a grid of chunks along the rows only), then their offsets and lengths
    (little-endian uint64; 2^64-1 twice for an empty chunk) and the crc32c of those. As zarr does, a chunk cut by
    the array's end is padded with the fill value, a chunk wholly past it is empty, and a chunk that is all fill
    value (0, bit for bit: a -0.0 is data) is left out.
    """
    sharded = isinstance(metadata.codecs[0], ShardingCodec)
    chunk_codecs = metadata.codecs[0].codecs if sharded else metadata.codecs
    compressor = _chunk_compressor(metadata, chunk_codecs, array)
    file_rows = metadata.chunk_grid.chunk_shape[0]
    if not sharded:
        chunk = _bytes_of(_padded(values, file_rows))
        return None if _all_fill(chunk) else iter([compressor.encode(chunk)])
    chunk_rows = metadata.codecs[0].chunk_shape[0]
    chunks = [_bytes_of(_padded(values[start : start + chunk_rows], chunk_rows))
              for start in range(0, len(values), chunk_rows)]
    chunks = [None if _all_fill(chunk) else chunk for chunk in chunks]
    if all(chunk is None for chunk in chunks):
        return None
    return _shard_parts(chunks, compressor, file_rows // chunk_rows)


def _shard_parts(chunks: list[np.ndarray | None], compressor: Zstd, slots: int) -> Iterator[bytes]:
    """A shard's parts (see `_block_file`; None for a chunk of fill values only, which is not stored), each chunk
    compressed only when the one before has been taken."""
    index = np.full((slots, 2), _EMPTY_CHUNK, dtype="<u8")
    offset = 0
    for i, chunk in enumerate(chunks):
        if chunk is None:
            continue
        data = compressor.encode(chunk)
        index[i] = offset, len(data)
        offset += len(data)
        yield data
    index_bytes = index.tobytes()
    yield index_bytes
    yield google_crc32c.value(index_bytes).to_bytes(4, "little")


_EMPTY_CHUNK = 2**64 - 1  # the sharding codec's offset and length of a chunk that is not stored
_FIRST_BYTES = 4096


def _all_fill(chunk: np.ndarray) -> bool:
    """Whether a chunk's bytes are all 0, the fill value. A chunk of data has a non-zero byte among its first few
    nearly always: looking there first spares reading the whole chunk once more only to learn that."""
    return not (chunk[:_FIRST_BYTES].any() or chunk.any())


def _chunk_compressor(metadata, chunk_codecs, array: str) -> Zstd:
    """numcodecs' Zstd as zarr's ZstdCodec configures it, after checking that the array is laid out as
    `add_teacher` makes it (what `_block_file` writes); UsageError naming the array otherwise."""
    sharding = metadata.codecs[0] if isinstance(metadata.codecs[0], ShardingCodec) else None
    known = (len(chunk_codecs) == 2 and isinstance(chunk_codecs[0], BytesCodec)
             and chunk_codecs[0].endian in (None, Endian.little) and isinstance(chunk_codecs[1], ZstdCodec)
             and metadata.fill_value == 0 and sys.byteorder == "little"
             and (sharding is None or (len(metadata.codecs) == 1 and sharding.index_location == ShardingCodecIndexLocation.end
                                       and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
                                       and sharding.index_codecs[0].endian == Endian.little)))
    if not known:
        raise UsageError(f"array {array} has codecs {metadata.codecs} and fill value {metadata.fill_value}, not the "
                         "layout this version writes (zstd chunks, sharded by block, fill value 0); precompute into "
                         "a new --store")
    return Zstd(level=chunk_codecs[1].level, checksum=chunk_codecs[1].checksum)


def _padded(values: np.ndarray, rows: int) -> np.ndarray:
    """`values` with zero rows appended up to `rows` (as zarr pads a chunk cut by the array's end)."""
    if len(values) == rows:
        return values
    padded = np.zeros((rows, *values.shape[1:]), dtype=values.dtype)
    padded[: len(values)] = values
    return padded
