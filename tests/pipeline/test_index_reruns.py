"""Indexing that scales with the work left (issue 12, item 5), with every shard read counted.

Reads are counted by a real fsspec filesystem: the local one, registered under its own protocol
(`countfile://`), whose open files count the bytes they return. Everything that reads a shard resolves its URL
through fsspec, so a read it does not count would be a read of a URL that does not exist. Nothing is mocked.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from pipeline.data.errors import UsageError
from pipeline.data.index import PreviousIndex, build_index
from pipeline.precompute import open_or_create_store
from pipeline.data.store import TargetStore
from pipeline.verify import verify_store
from tests.conftest import ROWS_PER_BLOCK, precompute
from tests.pipeline.test_store_promises import store_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHARD = "demo-00001.tar"  # the shard the tests change


class CountingOpener(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = super().read(*args, **kwargs)
        CountingFileSystem.bytes_read[self.path] = CountingFileSystem.bytes_read.get(self.path, 0) + len(data)
        return data

    def readinto(self, buffer):
        count = self.f.readinto(buffer)
        CountingFileSystem.bytes_read[self.path] = CountingFileSystem.bytes_read.get(self.path, 0) + (count or 0)
        return count


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under `countfile://`, counting what is opened and read, per path."""

    protocol = "countfile"
    opened: list[str] = []
    bytes_read: dict[str, int] = {}

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        CountingFileSystem.opened.append(path)
        return CountingOpener(path, mode, fs=self, **kwargs)


@pytest.fixture
def counted():
    """Reset the counters and make `countfile://` known to fsspec in this process."""
    fsspec.register_implementation("countfile", CountingFileSystem, clobber=True)
    CountingFileSystem.opened.clear()
    CountingFileSystem.bytes_read.clear()
    return CountingFileSystem


def counting(path: Path) -> str:
    return f"countfile://{path}"


def copy_shards(demo_dir: Path, tmp_path: Path) -> Path:
    """The demo shards, copied with their mtimes (copy2): the same files as far as the store's records go."""
    shards = tmp_path / "shards"
    shutil.copytree(demo_dir / "shards", shards)
    return shards


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))


def reorder_samples(path: Path) -> None:
    """The same members, the first two samples swapped: the same size, other rows."""
    members = tar_members(path)
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))
    first = [x for x in members if x[0].name.startswith(keys[0] + ".")]
    second = [x for x in members if x[0].name.startswith(keys[1] + ".")]
    write_tar(path, second + first + members[len(first) + len(second):])


def replace_image_bytes(path: Path) -> None:
    """One byte of the first image flipped in place: the same size and layout, another image sha1."""
    with tarfile.open(path) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(path, "r+b") as f:
        f.seek(jpg.offset_data + jpg.size // 2)
        byte = f.read(1)
        f.seek(jpg.offset_data + jpg.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


# ---- (1) a rerun on a finished store reads no shard --------------------------------------------------------------


def test_a_rerun_on_a_finished_store_reads_no_shard_bytes(demo_dir, store_copy, counted):
    # The counter counts: indexing the same shards from scratch reads every image.
    fresh = build_index(counting(demo_dir / "shards"), workers=1, progress=False)
    assert sorted(Path(p).name for p in counted.opened) == sorted(p.name for p in (demo_dir / "shards").glob("*.tar"))
    assert sum(counted.bytes_read.values()) >= sum(fresh.table.column("image_size").to_pylist())
    counted.opened.clear()
    counted.bytes_read.clear()

    before = store_files(store_copy)
    summary = precompute(counting(demo_dir / "shards"), store_copy)
    assert summary.nothing_to_do and summary.rows_computed == 0
    assert counted.opened == [] and sum(counted.bytes_read.values()) == 0
    assert store_files(store_copy) == before


# ---- (2) changed shards are re-read: refused when their samples changed, accepted when only touched --------------


@pytest.mark.parametrize("change, message", [(reorder_samples, "the store has demo-00001.tar/"),
                                             (replace_image_bytes, r"\(demo-00001.tar/\d+\): the image bytes differ")])
def test_a_shard_rewritten_after_indexing_is_reread_and_the_store_refused_naming_it(
        change, message, demo_dir, store_copy, tmp_path, counted):
    shards = copy_shards(demo_dir, tmp_path)
    size = (shards / SHARD).stat().st_size
    change(shards / SHARD)
    assert (shards / SHARD).stat().st_size == size  # only the mtime tells that it changed
    before = store_files(store_copy)
    with pytest.raises(UsageError, match=r"built for other shards: its shard demo-00001.tar differs .*" + message):
        precompute(counting(shards), store_copy)
    assert counted.opened == [str(shards / SHARD)]  # that shard alone was read again
    assert store_files(store_copy) == before


def test_a_touched_shard_is_reread_and_accepted_with_nothing_recomputed(demo_dir, store_copy, tmp_path, counted):
    shards = copy_shards(demo_dir, tmp_path)
    stat = (shards / SHARD).stat()
    os.utime(shards / SHARD, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))  # same bytes, newer mtime
    before = store_files(store_copy)
    summary = precompute(counting(shards), store_copy)
    assert summary.nothing_to_do and summary.rows_computed == 0
    assert counted.opened == [str(shards / SHARD)]
    # A finished store is not written, not even to record the new mtime: the next rerun reads that shard again.
    assert store_files(store_copy) == before
    counted.opened.clear()
    assert precompute(counting(shards), store_copy).nothing_to_do
    assert counted.opened == [str(shards / SHARD)]

    # A run that has work holds the lock anyway and records the shard's new identity; then no shard is read.
    (store_copy / "_blocks" / "gen" / "000001.json").unlink()
    summary = precompute(shards, store_copy)
    assert summary.blocks_computed == 1
    records = pq.read_table(store_copy / "shards.parquet")
    assert records.equals(build_index(str(shards), progress=False).shards)
    counted.opened.clear()
    assert precompute(counting(shards), store_copy).nothing_to_do
    assert counted.opened == []
    assert store_files(store_copy)["index.parquet"] == before["index.parquet"]


def test_a_store_without_shard_records_reads_every_shard_and_is_not_written(demo_dir, store_copy, counted):
    """A store whose shards.parquet was deleted: reruns read every shard and verify notes it."""
    (store_copy / "shards.parquet").unlink()
    before = store_files(store_copy)
    assert precompute(counting(demo_dir / "shards"), store_copy).nothing_to_do
    assert len(counted.opened) == len(list((demo_dir / "shards").glob("*.tar")))
    assert store_files(store_copy) == before
    report = verify_store(str(store_copy))
    assert report.problems == [] and any("no shard identities" in note for note in report.notes)


def test_verify_shards_rereads_everything_even_what_reruns_trust(demo_dir, store_copy, tmp_path, counted):
    """A rewrite that keeps size and mtime (`touch -r`) is what reruns cannot see; the deep check sees it."""
    shards = copy_shards(demo_dir, tmp_path)
    stat = (shards / SHARD).stat()
    replace_image_bytes(shards / SHARD)
    os.utime(shards / SHARD, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert precompute(counting(shards), store_copy).nothing_to_do
    assert counted.opened == []  # trusted: the identity is the recorded one

    report = verify_store(str(store_copy), shards=counting(shards))
    assert len(counted.opened) == len(list(shards.glob("*.tar")))  # every shard read and re-hashed
    assert any("the shards differ" in p and SHARD in p and "image bytes differ" in p for p in report.problems)

    # Touched only: the samples are the store's, so no problem, and a note says reruns will re-read it.
    shutil.copy2(demo_dir / "shards" / SHARD, shards / SHARD)
    os.utime(shards / SHARD)
    report = verify_store(str(store_copy), shards=str(shards))
    assert report.problems == []
    assert any("1 shard(s)" in note and SHARD in note for note in report.notes)


def test_a_damaged_shard_record_is_ignored_by_reruns_and_reported_by_verify(demo_dir, store_copy, counted):
    table = pq.read_table(store_copy / "shards.parquet")
    stops = table.column("row_stop").to_pylist()
    stops[0] += 1  # now the ranges overlap
    table = table.set_column(table.column_names.index("row_stop"), "row_stop", pa.array(stops, pa.int64()))
    pq.write_table(table, store_copy / "shards.parquet")
    assert precompute(counting(demo_dir / "shards"), store_copy).nothing_to_do  # every shard read: none trusted
    assert len(counted.opened) == len(list((demo_dir / "shards").glob("*.tar")))
    problems = verify_store(str(store_copy)).problems
    assert len(problems) == 1 and "shards.parquet does not match index.parquet" in problems[0]


# ---- (3) parallel indexing = serial indexing ---------------------------------------------------------------------


def test_parallel_indexing_gives_the_serial_index_and_the_same_store_bytes(demo_dir, tmp_path):
    shards = copy_shards(demo_dir, tmp_path)
    data = (shards / "demo-00002.tar").read_bytes()
    (shards / "demo-00002.tar").write_bytes(data[: len(data) // 2])  # damage, recorded in shards.parquet
    serial = build_index(str(shards), workers=1, progress=False)
    parallel = build_index(str(shards), workers=2, progress=False)  # spawned processes, one task per shard
    assert serial.shard_errors and serial.shard_errors == parallel.shard_errors
    assert parallel.table.equals(serial.table) and parallel.shards.equals(serial.shards)
    assert (parallel.fingerprint, parallel.urls) == (serial.fingerprint, serial.urls)
    assert parallel.scanned == serial.scanned == [p.name for p in sorted(shards.glob("*.tar"))]

    stores = {}
    for name, index in (("serial", serial), ("parallel", parallel)):
        open_or_create_store(str(tmp_path / name), index, ROWS_PER_BLOCK)
        stores[name] = {str(p.relative_to(tmp_path / name)): p.read_bytes()
                        for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}
    assert set(stores["serial"]) == {"zarr.json", "index.parquet", "shards.parquet"}
    assert stores["serial"] == stores["parallel"]

    # Reusing the store's record gives the same index again, whichever shards are re-read.
    store = TargetStore(str(tmp_path / "serial"))
    previous = store.previous_index()
    assert isinstance(previous, PreviousIndex) and previous.problem() is None
    stat = (shards / "demo-00003.tar").stat()
    os.utime(shards / "demo-00003.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reused = build_index(str(shards), previous=previous, progress=False)
    assert reused.scanned == ["demo-00003.tar"]
    assert reused.table.equals(serial.table) and reused.shard_errors == serial.shard_errors
    assert reused.fingerprint == serial.fingerprint
    assert reused.shards.column("mtime_ns").to_pylist()[3] == stat.st_mtime_ns + 10**9
