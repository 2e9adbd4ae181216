"""The device's process finishes outputs where they lie and the write stage writes each block file in one go, and
neither changes a stored byte: the codes, scales and valid flags are those of the host path they replace (float32
copies checked, summed and encoded with numpy), and the files are those zarr-python writes."""

from __future__ import annotations

import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.block_stages import TeacherOutputs, run_inputs, run_teacher
from pipeline.data.finishing import FinishedBatch, finish
from pipeline.data.store import BlockRange, Storage, TargetStore
from tests.conftest import DEMO_TEACHERS

STORAGES = {
    "float16": Storage(),
    "bfloat16": Storage(dtype="bfloat16"),
    "int8": Storage(quantize="int8"),
    "pool 2": Storage(pool=2),
    "pool 3, bfloat16": Storage(dtype="bfloat16", pool=3),
    "int8, pool 2": Storage(quantize="int8", pool=2),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


# ---- the host path that finishing on the device replaced, kept here as the reference ----------------------------


def numpy_encode(storage: Storage, target: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """`Storage.encode` as it was: numpy on float32 [n, T, C]."""
    if storage.pool > 1:
        n, tokens, channels = target.shape
        grid, p = int(round(tokens ** 0.5)), storage.pool
        target = target.reshape(n, grid // p, p, grid // p, p, channels).mean(axis=(2, 4)).reshape(n, -1, channels)
    if storage.quantize == "int8":
        with np.errstate(over="ignore"):
            scale = (np.abs(target).max(axis=-1) / 127.0).astype(np.float16)
        safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
        return np.clip(np.rint(target / safe), -127, 127).astype(np.int8), scale
    with np.errstate(over="ignore"):
        return target.astype(ml_dtypes.bfloat16 if storage.dtype == "bfloat16" else np.float16), None


def numpy_run_inputs(outputs: list[tuple[list[int], np.ndarray]], slots: list[int], size: int,
                     storage: Storage, shape: tuple[int, int]) -> TeacherOutputs:
    """`run_inputs` as it was, after the forwards: each batch's float32 outputs on the host, checked with
    `np.isfinite`, summed in float64 and encoded with `numpy_encode`."""
    tokens, channels = shape
    stored_tokens, _ = storage.stored_shape(tokens, channels)
    stored = np.zeros((size, stored_tokens, channels), dtype=storage.array_dtype)
    scale = np.zeros((size, stored_tokens), dtype=np.float16) if storage.quantize == "int8" else None
    valid = np.zeros((size,), dtype=np.uint8)
    sums, squares, count, errors = np.zeros(channels), np.zeros(channels), 0, []
    for done, values in outputs:
        finite = np.isfinite(values.reshape(len(done), -1)).all(axis=1)
        errors.extend((p, "teacher output is not finite") for p, ok in zip(done, finite) if not ok)
        good = values[finite]
        rows = [slots[p] for p, ok in zip(done, finite) if ok]
        if not rows:
            continue
        flat = good.reshape(-1, channels)
        sums += flat.sum(axis=0, dtype=np.float64)
        squares += np.einsum("ij,ij->j", flat, flat, dtype=np.float64)
        count += flat.shape[0]
        codes, scales = numpy_encode(storage, good)
        stored[rows] = codes
        if scale is not None:
            scale[rows] = scales
        valid[rows] = 1
    return TeacherOutputs(stored, scale, valid, {"count": count, "sum": sums.tolist(), "sumsq": squares.tolist()},
                          sorted(errors))


class GivenOutputs:
    """A teacher whose outputs are its inputs, moved to `device`: the test chooses every value it returns."""

    def __init__(self, shape: tuple[int, int], device: str):
        self.target_shape = shape
        self.device = device

    def device_forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device)

    def finish(self, values: torch.Tensor, storage: Storage) -> FinishedBatch:
        return finish(values, storage)


def awkward_outputs(rows: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """float32 outputs [rows >= 10, T, C] over twelve orders of magnitude (int8 scales that round, float16
    overflows, subnormals, halves that round to even) with rows of zeros, of negative zeros, and with NaN and
    infinities."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, *shape)) * 10.0 ** rng.integers(-6, 6, (rows, *shape))
    values[0, :, : shape[1] // 2] = np.round(values[0, :, : shape[1] // 2]) + 0.5  # ties, for rounding to even
    values[1] = 0.0
    values[2] = -0.0
    values[3, 5, 7] = np.nan
    values[4, 0, 0] = np.inf
    values[5, 1, 1], values[5, 2, 2] = np.inf, -np.inf  # their sum is NaN: still not finite
    values[6] = 1e30  # finite in float32, infinite as float16 or as an int8 scale
    values[8, 3, 3], values[9, 0, 1] = -np.inf, np.nan
    return values.astype(np.float32)


def assert_same_outputs(new: TeacherOutputs, old: TeacherOutputs, magnitudes: np.ndarray) -> None:
    assert new.stored.dtype == old.stored.dtype and new.stored.tobytes() == old.stored.tobytes()
    assert (new.scale is None) == (old.scale is None)
    if old.scale is not None:
        assert new.scale.tobytes() == old.scale.tobytes()
    assert new.valid.tobytes() == old.valid.tobytes()
    assert new.errors == old.errors
    assert new.stats["count"] == old.stats["count"]
    for key, scale in (("sum", magnitudes[0]), ("sumsq", magnitudes[1])):
        # Another summation order: the sums agree to float64 rounding of the sum of magnitudes.
        assert np.all(np.abs(np.subtract(new.stats[key], old.stats[key])) <= 1e-12 * scale), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", STORAGES.values(), ids=STORAGES.keys())
def test_finishing_on_the_device_stores_the_bytes_of_the_host_path(storage, device):
    shape = (36, 24)  # a 6 x 6 grid, so pools of 2 and 3 both fit
    values = awkward_outputs(12, shape, seed=0)
    positions = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11]]  # [8, 9]: a batch without a finite row
    slots = [0, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]  # rows 1 and 8 of the block failed to decode: they stay zero
    batches = [(p, values[p]) for p in positions]
    preprocessing_errors = [(12, "ValueError: could not preprocess")]

    new = run_inputs(GivenOutputs(shape, device), batches, slots, 14, storage, preprocessing_errors)
    old = numpy_run_inputs(batches, slots, 14, storage, shape)

    old.errors = sorted(old.errors + preprocessing_errors)
    finite = values[np.isfinite(values).all(axis=(1, 2))].astype(np.float64)
    assert_same_outputs(new, old, (np.abs(finite).sum(axis=(0, 1)), np.square(finite).sum(axis=(0, 1))))
    assert new.valid.sum() == 7  # all but the NaN and infinite rows (1e30 is finite in float32)
    assert [p for p, _ in new.errors] == [3, 4, 5, 8, 9, 12]


def test_the_demo_teachers_store_the_bytes_of_the_host_path(demo_dir):
    """The teachers' own outputs, through `run_teacher` (precompute's rules), against their `forward` copied to
    the host and finished there."""
    from skimage import data
    from PIL import Image

    import teachers

    images = [Image.fromarray(a).convert("RGB") for a in (data.astronaut(), data.coffee(), data.chelsea(),
                                                          data.rocket(), data.astronaut()[::2, ::3])]
    manifest = teachers.load_manifest(DEMO_TEACHERS, environ={"DEMO_DIR": str(demo_dir)})
    for name, spec in manifest.teachers.items():
        teacher = teachers.create(spec)
        storage = spec.storage()
        size = teacher.spec.batch_size
        outputs = [(list(range(i, min(i + size, len(images)))),
                    teacher(teacher.preprocess(images[i : i + size])).numpy()) for i in range(0, len(images), size)]
        old = numpy_run_inputs(outputs, list(range(len(images))), len(images), storage, teacher.target_shape)
        values = np.concatenate([v for _, v in outputs]).astype(np.float64)
        magnitudes = np.abs(values).sum(axis=(0, 1)), np.square(values).sum(axis=(0, 1))
        assert_same_outputs(run_teacher(teacher, images, storage), old, magnitudes)


def test_bfloat16_outputs_cross_processes_without_a_copy():
    """Ray pickles with protocol 5 and hands out-of-band buffers to other processes without copying them."""
    stored = np.arange(4 * 9 * 8, dtype=np.float32).reshape(4, 9, 8).astype(ml_dtypes.bfloat16)
    outputs = TeacherOutputs(stored, None, np.ones(4, np.uint8), {"count": 36}, [])
    buffers = []
    payload = pickle.dumps(outputs, protocol=5, buffer_callback=buffers.append)
    assert len(payload) < stored.nbytes and sum(memoryview(b).nbytes for b in buffers) >= stored.nbytes
    back = pickle.loads(payload, buffers=buffers)
    assert back.stored.dtype == stored.dtype and back.stored.tobytes() == stored.tobytes()
    assert back.valid.tolist() == [1, 1, 1, 1] and back.stats == {"count": 36}


# ---- the write stage: each block's file in one go, the bytes zarr writes ------------------------------------------


def twin_stores(tmp_path: Path, rows: int, rows_per_block: int, rows_per_chunk: int, storage: Storage,
                shape: tuple[int, int]) -> tuple[TargetStore, TargetStore]:
    """Two empty stores made alike, each with a teacher "t": one written through zarr, one by `write_encoded`."""
    made = []
    for name in ("zarr", "ours"):
        store = TargetStore(str(tmp_path / name))
        rows_column = pa.array(range(rows), pa.int64())
        store.create(pa.table({"row": rows_column, "target_row": rows_column}), "dataset",
                     rows_per_block=rows_per_block)
        store.add_teacher("t", spec={}, fingerprint="f", target_shape=shape, storage=storage,
                          rows_per_chunk=rows_per_chunk)
        made.append(store)
    return made[0], made[1]


def block_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "c" in p.relative_to(root).parts}


@pytest.mark.parametrize(("rows", "rows_per_block", "rows_per_chunk"), [(40, 8, 1), (37, 8, 2), (10, 4, 4)],
                         ids=["one row a chunk", "last block and chunk cut short", "one chunk a shard"])
@pytest.mark.parametrize("storage", STORAGES.values(), ids=STORAGES.keys())
def test_block_files_are_those_zarr_writes(tmp_path, storage, rows, rows_per_block, rows_per_chunk):
    shape = (36, 24)
    through_zarr, ours = twin_stores(tmp_path, rows, rows_per_block, rows_per_chunk, storage, shape)
    rng = np.random.default_rng(1)
    for block in ours.blocks():
        valid = (rng.random(block.rows) < 0.7).astype(np.uint8)
        if block.block == 1:
            valid[:] = 0  # every row failed: zarr writes no file for the block
        values = np.where(valid[:, None, None], rng.standard_normal((block.rows, *shape)), 0.0).astype(np.float32)
        stored, scale = storage.encode(values)
        group = through_zarr.group["t"]
        group["target"][block.start : block.stop] = stored
        if scale is not None:
            group["scale"][block.start : block.stop] = scale
        group["valid"][block.start : block.stop] = valid
        digest = ours.write_encoded("t", block, stored, scale, valid)
        assert ours.read_block_digest("t", block) == digest
    expected = block_files(tmp_path / "zarr" / "t")
    assert any("valid" in f for f in expected) and block_files(tmp_path / "ours" / "t") == expected


def test_a_bfloat16_row_of_negative_zeros_is_stored_as_written(tmp_path):
    """zarr left out a bfloat16 chunk of -0.0 as if it were the fill value +0.0, so such a row read back with
    other bits than its record's digest covered, and `pipeline verify` called the block damaged."""
    storage = Storage(dtype="bfloat16")
    _, store = twin_stores(tmp_path, 4, 4, 1, storage, (4, 8))
    block = BlockRange(0, 0, 4)
    stored, scale = storage.encode(np.full((4, 4, 8), -0.0, dtype=np.float32))
    digest = store.write_encoded("t", block, stored, scale, np.ones(4, np.uint8))
    values, valid = store.read_rows("t", 0, 4)
    assert valid.all() and np.signbit(values).all()
    assert store.read_block_digest("t", block) == digest


def test_a_block_record_keeps_the_digest_of_its_stored_values(store_copy):
    from pipeline.data.store import DIGEST_ALGORITHM

    store = TargetStore(str(store_copy))
    blocks = store.blocks()
    for name in store.teacher_names():
        for record in store.read_records(name):
            assert "sha256" not in (store_copy / "_blocks" / name / f"{record.block:06d}.json").read_text()
            assert record.digest.startswith(f"{DIGEST_ALGORITHM}:")
            assert store.read_block_digest(name, blocks[record.block]) == record.digest
