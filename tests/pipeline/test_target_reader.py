"""The store's one target reader: training reads a row as `read_rows` reads it in a range, and decodes each chunk
once however many of its rows it reads in a row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.errors import UsageError
from pipeline.data.store import Storage, TargetStore

ROWS, TOKENS, CHANNELS, ROWS_PER_CHUNK = 9, 4, 3, 2
FAILED_ROW = 5


def _store(path, storage: Storage) -> TargetStore:
    index = pa.table({"row": list(range(ROWS)), "shard": ["s-00000.tar"] * ROWS,
                      "key": [f"{i:03d}" for i in range(ROWS)], "image_sha1": [f"{i:040d}" for i in range(ROWS)],
                      "target_row": list(range(ROWS)), "caption_present": [True] * ROWS})
    store = TargetStore(str(path))
    store.create(index, "0" * 64, rows_per_block=4)
    store.add_teacher("depth", spec={"kind": "random"}, fingerprint="0" * 64, target_shape=(TOKENS, CHANNELS),
                      storage=storage, rows_per_chunk=ROWS_PER_CHUNK)
    rng = np.random.default_rng(0)
    for block in store.blocks():
        valid = np.ones(block.rows, dtype=np.uint8)
        if block.start <= FAILED_ROW < block.stop:
            valid[FAILED_ROW - block.start] = 0
        store.write_block("depth", block, rng.standard_normal((block.rows, TOKENS, CHANNELS), dtype=np.float32), valid)
    return TargetStore(str(path))


@pytest.mark.parametrize("storage", [Storage(), Storage(quantize="int8", pool=2)], ids=["float16", "int8-pool2"])
def test_a_row_read_alone_is_that_row_of_the_range_read(tmp_path, storage):
    store = _store(tmp_path / "store", storage)
    targets, valid = store.read_rows("depth", 0, ROWS)
    assert targets.shape == (ROWS, TOKENS, CHANNELS) and targets.dtype == np.float32
    reader = store.reader()
    for row in (3, 0, 8, FAILED_ROW, 4):  # out of order, as a random epoch reads
        target, flag, _ = reader.row("depth", row)
        np.testing.assert_array_equal(target, targets[row])
        assert flag == bool(valid[row]) == (row != FAILED_ROW)


def test_each_chunk_is_decoded_once_for_the_rows_read_after_one_another(tmp_path):
    reader = _store(tmp_path / "store", Storage()).reader()
    chunk_bytes = ROWS_PER_CHUNK * TOKENS * CHANNELS * np.dtype(np.float32).itemsize
    decoded = [reader.row("depth", row)[2] for row in (0, 1, 2, 3, 1, 8)]
    # Rows 0-1 and 2-3 share a chunk; row 1 again follows another chunk; row 8 is the last chunk's only row.
    assert decoded == [chunk_bytes, 0, chunk_bytes, 0, chunk_bytes, chunk_bytes // ROWS_PER_CHUNK]


def test_reading_a_teacher_the_store_lacks_names_the_ones_it_has(tmp_path):
    store = _store(tmp_path / "store", Storage())
    with pytest.raises(UsageError, match=r"no teacher 'seg'.*\['depth'\]"):
        store.read_rows("seg", 0, 1)
    with pytest.raises(UsageError, match=r"no teacher 'seg'"):
        store.reader().row("seg", 0)
