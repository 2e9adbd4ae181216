"""The target store (format version 1): the one file that knows how targets lie on disk.

    STORE/                      Zarr v3 group; attributes: format, format_version, dataset_fingerprint,
                                num_rows, rows_per_block, created_by
    STORE/index.parquet         one row per sample (see pipeline/index.py); row i here = row i below
    STORE/<teacher>/            Zarr group; attributes: spec, teacher_fingerprint, target_shape, dtype,
                                rows_per_chunk, complete (set last, when every block has a record)
    STORE/<teacher>/target      [num_rows, T, C] float16, sharded: one shard = one block of rows_per_block
                                rows, inner chunks of rows_per_chunk rows, zstd
    STORE/<teacher>/valid       [num_rows] uint8, one chunk per block: 1 = target written, 0 = not
    STORE/errors.parquet        row, shard, key, teacher, error: every sample that could not be processed
    STORE/_blocks/<teacher>/<block>.json   completion record, written after the block's files are durable

Any Zarr v3 reader opens the arrays without this package. A block is the unit of work and of
writing: two workers never write the same file, and a block without a record is simply redone.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import UsageError

FORMAT = "teacher-targets"
FORMAT_VERSION = 1
INDEX_FILE = "index.parquet"
ERRORS_FILE = "errors.parquet"
BLOCKS_DIR = "_blocks"
ZSTD_LEVEL = 3

ERRORS_SCHEMA = pa.schema(
    [("row", pa.int64()), ("shard", pa.string()), ("key", pa.string()), ("teacher", pa.string()), ("error", pa.string())]
)


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


class TargetStore:
    """Read and write one target store at a local path or fsspec URL."""

    def __init__(self, path: str):
        self.path = str(path).rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.path)
        self._group: zarr.Group | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.fs.exists(self._join("zarr.json"))

    def half_created(self) -> bool:
        """A crash inside `create`: the group is there but neither its attributes nor any teacher are."""
        group = zarr.open_group(self.path, mode="r", zarr_format=3)
        return "format" not in group.attrs and not _child_groups(group)

    def create(self, index: pa.Table, dataset_fingerprint: str, *, rows_per_block: int) -> None:
        """Create the group, write index.parquet, then the group's attributes (which mark the store as made)."""
        if rows_per_block < 1:
            raise UsageError(f"rows_per_block must be >= 1, got {rows_per_block}")
        group = zarr.open_group(self.path, mode="w", zarr_format=3)  # "w" empties the directory first
        self._write_parquet(INDEX_FILE, index)
        group.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dataset_fingerprint": dataset_fingerprint,
                "num_rows": index.num_rows,
                "rows_per_block": rows_per_block,
                "created_by": f"teacher-targets-pipeline {package_version()}",
            }
        )
        self._group = group

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            if not self.exists():
                raise UsageError(f"{self.path} is not a target store (no zarr.json); run `pipeline precompute` first")
            group = zarr.open_group(self.path, mode="r+" if self._writable() else "r", zarr_format=3)
            fmt, ver = group.attrs.get("format"), group.attrs.get("format_version")
            if fmt != FORMAT:
                raise UsageError(f"{self.path} is a Zarr group but not a target store (format={fmt!r})")
            if ver != FORMAT_VERSION:
                raise UsageError(
                    f"{self.path} has store format_version {ver}; this package reads version {FORMAT_VERSION}"
                )
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
        return int(self.group.attrs["num_rows"])

    @property
    def rows_per_block(self) -> int:
        return int(self.group.attrs["rows_per_block"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.group.attrs["dataset_fingerprint"])

    def blocks(self) -> list[BlockRange]:
        n, size = self.num_rows, self.rows_per_block
        return [BlockRange(b, start, min(start + size, n)) for b, start in enumerate(range(0, n, size))]

    def read_index(self) -> pa.Table:
        with self.fs.open(self._join(INDEX_FILE), "rb") as f:
            return pq.read_table(f)

    def read_errors(self) -> pa.Table:
        path = self._join(ERRORS_FILE)
        if not self.fs.exists(path):
            return ERRORS_SCHEMA.empty_table()
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f)

    def write_errors(self, rows: list[dict]) -> None:
        rows = sorted(rows, key=lambda r: (r["row"], r["teacher"], r["shard"], r["key"]))
        self._write_parquet(ERRORS_FILE, pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA))

    # ---- teachers ----------------------------------------------------------------------------

    def teacher_names(self) -> list[str]:
        return _child_groups(self.group)

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
        dtype: str = "float16",
        rows_per_chunk: int = 8,
    ) -> None:
        """Create the teacher's group and arrays (fill value 0, valid = 0 everywhere), forgetting old records."""
        tokens, channels = (int(x) for x in target_shape)
        rows_per_chunk = max(1, min(rows_per_chunk, self.rows_per_block))
        if self.rows_per_block % rows_per_chunk:
            raise UsageError(f"rows_per_chunk {rows_per_chunk} must divide rows_per_block {self.rows_per_block}")
        records = self._join(BLOCKS_DIR, name)
        if self.fs.exists(records):
            self.fs.rm(records, recursive=True)
        group = self.group.create_group(name, overwrite=True)
        group.create_array(
            "target",
            shape=(self.num_rows, tokens, channels),
            shards=(self.rows_per_block, tokens, channels),
            chunks=(rows_per_chunk, tokens, channels),
            dtype=dtype,
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            fill_value=0,
        )
        group.create_array(
            "valid", shape=(self.num_rows,), chunks=(self.rows_per_block,), dtype="uint8", fill_value=0,
            compressors=ZstdCodec(level=ZSTD_LEVEL),
        )
        group.attrs.update(
            {
                "spec": spec,
                "teacher_fingerprint": fingerprint,
                "target_shape": [tokens, channels],
                "dtype": dtype,
                "rows_per_chunk": rows_per_chunk,
                "complete": False,
            }
        )

    def mark_complete(self, name: str, extra: dict | None = None) -> None:
        self.group[name].attrs.update({"complete": True, **(extra or {})})

    def nbytes(self, name: str) -> int:
        """Bytes the teacher's group takes on disk (all its array files)."""
        return int(self.fs.du(self._join(name)))

    def target_array(self, name: str) -> zarr.Array:
        return self.group[name]["target"]

    def valid_array(self, name: str) -> zarr.Array:
        return self.group[name]["valid"]

    # ---- blocks ------------------------------------------------------------------------------

    def write_block(self, name: str, block: BlockRange, target: np.ndarray, valid: np.ndarray) -> None:
        """Write one block's rows of `target` [rows, T, C] and `valid` [rows], then make them durable."""
        self.target_array(name)[block.start : block.stop] = target
        self.valid_array(name)[block.start : block.stop] = valid
        self._fsync_local(posixpath.join(name, "target", "c", str(block.block)))
        self._fsync_local(posixpath.join(name, "valid", "c", str(block.block)))

    def write_record(self, name: str, block: int, record: dict) -> None:
        """The block's completion record: written only after `write_block` returned."""
        self._atomic_write(self._record_path(name, block), json.dumps(record, sort_keys=True, indent=1).encode())

    def done_blocks(self, name: str) -> set[int]:
        folder = self._join(BLOCKS_DIR, name)
        if not self.fs.exists(folder):
            return set()
        names = (posixpath.basename(p) for p in self.fs.ls(folder, detail=False))
        return {int(n[: -len(".json")]) for n in names if n.endswith(".json") and n[: -len(".json")].isdigit()}

    def read_records(self, name: str) -> list[dict]:
        records = []
        for block in sorted(self.done_blocks(name)):
            with self.fs.open(self._record_path(name, block), "rb") as f:
                records.append(json.load(f))
        return records

    # ---- file helpers ------------------------------------------------------------------------

    def _join(self, *parts: str) -> str:
        return posixpath.join(self._root, *parts)

    def _record_path(self, name: str, block: int) -> str:
        return self._join(BLOCKS_DIR, name, f"{block:06d}.json")

    def _is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _write_parquet(self, filename: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self._atomic_write(self._join(filename), buffer.getvalue())

    def _atomic_write(self, path: str, data: bytes) -> None:
        """Local: write a temporary file, fsync, rename (readers never see half a file). Object stores: one PUT."""
        if not self._is_local():
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def _fsync_local(self, relative: str) -> None:
        if not self._is_local():
            return  # an object store PUT is durable when it returns
        path = self._join(relative)
        targets = [path] if os.path.isfile(path) else [
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files
        ]
        for file in targets:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _child_groups(group: zarr.Group) -> list[str]:
    with warnings.catch_warnings():
        # index.parquet, errors.parquet and _blocks/ live beside the Zarr nodes on purpose.
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")
        return sorted(name for name, _ in group.groups())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
