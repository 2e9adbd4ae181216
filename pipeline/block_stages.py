"""The work on one block of rows, in three stages that may run in three different processes.

    prepare (CPU)          read each image's bytes by offset, check their sha1, decode them once, and run every
                           pending teacher's CPU preprocessing on them (the PIL resizes that decide the pixels):
                           compact inputs (uint8 pixels), already cut into the teacher's batches
    compute (accelerator)  the teachers' forwards; their linear steps (rescale, normalise, dtype) run on the device,
                           and so do the finiteness check, the statistics and the storage encoding (float16,
                           bfloat16, int8, pooling) of the outputs: only the stored bytes (half those of float32
                           for float16) and the per-channel sums cross to the host
    write (CPU)            copy the rows lent by other stores (`--reuse`, pipeline/lending.py), compress and
                           write the block's files, then its completion record, each only while this run still
                           holds the store (the fence)

A block's rows are target rows, one per distinct image: each is read from the first sample showing its image.

On a CPU-only cluster one `BlockWorker` runs the three in turn for each block, as one Ray actor call. With
accelerators, `prepare` and `write` are Ray CPU tasks spread over every core while the worker holding a device
only computes (pipeline/precompute.py schedules them). Both paths call the same functions, so they write the same
bytes for the same batch sizes.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import lending
from pipeline.data.images import ImageDecodeError, decode_rgb
from pipeline.data.shards import read_indexed_image
from pipeline.data.store import BlockRange, BlockRecord, BlockStats, Storage, TargetStore

_INDEX_COLUMNS = ("row", "shard", "key", "image_member", "image_offset", "image_size", "image_sha1")


def first_samples(index: pa.Table) -> pa.Table:
    """One row per target row, in target row order: the columns of the first sample showing its image (the one
    a block reads the image from), with `target_row`."""
    rows = index.column("target_row").to_numpy()
    samples = np.flatnonzero(rows >= 0)
    _, first = np.unique(rows[samples], return_index=True)  # sorted by target row; the first sample of each
    return index.take(samples[first]).select([*_INDEX_COLUMNS, "target_row"])


@dataclass(frozen=True)
class BlockRows:
    """What a block's work needs from index.parquet: where each of its rows' image lies and its hash, and the rows
    other stores lend it (per teacher)."""

    block: BlockRange
    columns: dict[str, list]  # _INDEX_COLUMNS of each row's first sample, a list for rows block.start .. block.stop
    lent: dict[str, dict[int, lending.LentRow]] = field(default_factory=dict)  # teacher -> {row: where to copy it}

    def get(self, column: str, row: int):
        return self.columns[column][row - self.block.start]

    def computed(self, name: str) -> list[int]:
        """The block's rows that teacher `name` computes (the others are lent)."""
        lent = self.lent.get(name, {})
        return [r for r in range(self.block.start, self.block.stop) if r not in lent]

    def failure(self, row: int, error: str, teacher: str = "") -> dict:
        return {"row": row, "sample": self.get("row", row), "shard": self.get("shard", row),
                "key": self.get("key", row), "teacher": teacher, "error": error}


def block_rows(firsts: pa.Table, blocks: list[BlockRange],
               lent: dict[int, dict[str, dict[int, lending.LentRow]]] | None = None) -> list[BlockRows]:
    """The BlockRows of each of `blocks`. `firsts`: `first_samples` of the store's index; `lent`: what
    `pipeline.lending.lent_rows` gives, by block."""
    starts = np.searchsorted(firsts.column("target_row").to_numpy(), [block.start for block in blocks])
    columns = firsts.select(list(_INDEX_COLUMNS))
    return [BlockRows(block, columns.slice(int(start), block.rows).to_pydict(), (lent or {}).get(block.block, {}))
            for block, start in zip(blocks, starts)]


@dataclass
class PreparedBlock:
    """A block's decoded and preprocessed inputs: for each teacher, (positions in `decoded[teacher]`, CPU batch)
    pairs."""

    rows: BlockRows
    decoded: dict[str, list[int]]  # per teacher: the rows it computes whose image decoded, in order
    inputs: dict[str, list[tuple[list[int], Any]]]
    failures: list[dict]  # rows that could not be read or decoded (for every teacher that computes them)
    input_errors: dict[str, list[tuple[int, str]]]  # per teacher: (position in `decoded`, why preprocessing failed)
    seconds: float


@dataclass
class TeacherOutputs:
    """One teacher's outputs for `size` rows, as stored: `Storage.encode` codes [size, T', C] (failed rows zero),
    scales [size, T'] or None, valid uint8 [size], the per-channel statistics of the float32 values of the valid
    rows (count, sum, sumsq in float64), and (position, why) of every failure, sorted."""

    stored: np.ndarray
    scale: np.ndarray | None
    valid: np.ndarray
    stats: dict
    errors: list[tuple[int, str]]

    def __reduce__(self):
        # Ray hands numpy arrays to another process without copying them, but ml_dtypes' bfloat16 arrays pickle
        # in-band (copied twice: 4x the time to put and 100x to get a block); their uint16 view goes zero-copy.
        plain = self.stored.view(f"u{self.stored.dtype.itemsize}")
        return _teacher_outputs, (plain, self.stored.dtype, self.scale, self.valid, self.stats, self.errors)


def _teacher_outputs(plain: np.ndarray, dtype: np.dtype, *fields) -> TeacherOutputs:
    return TeacherOutputs(plain.view(dtype), *fields)


@dataclass
class ComputedTargets:
    """One teacher's block: its encoded outputs, the block's failure records for it (read and decode failures
    included), and the seconds its stages took."""

    outputs: TeacherOutputs
    failures: list[dict]
    seconds: float


@dataclass
class ComputedBlock:
    rows: BlockRows
    teachers: dict[str, ComputedTargets] = field(default_factory=dict)


# ---- prepare -----------------------------------------------------------------------------------------------------


def read_images(rows: BlockRows, wanted: list[int], shard_urls: dict[str, str],
                max_pixels: int) -> tuple[dict, list[dict]]:
    """Read and decode the image of each `wanted` row once: {row: RGB image} plus per-row failures."""
    import fsspec

    images, failures = {}, []
    by_shard: dict[str, list[int]] = {}
    for row in wanted:
        by_shard.setdefault(rows.get("shard", row), []).append(row)
    for shard, shard_rows in by_shard.items():
        try:
            with fsspec.open(shard_urls[shard], "rb") as f:
                for row in shard_rows:
                    try:
                        images[row] = _read_image(f, rows, row, max_pixels)
                    except Exception as exc:
                        # Any exception from one row (not only the expected ones) is that row's failure: an
                        # uncaught one would fail the block on every rerun and so stop the whole job.
                        reason = str(exc) if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
                        failures.append(rows.failure(row, reason))
        except OSError as exc:
            failures.extend(rows.failure(r, f"cannot read shard: {exc}") for r in shard_rows if r not in images)
    return images, failures


def _read_image(f, rows: BlockRows, row: int, max_pixels: int):
    if not rows.get("image_member", row):
        raise ImageDecodeError("sample has no image file")
    data = read_indexed_image(f, rows.get("image_offset", row), rows.get("image_size", row),
                              rows.get("image_sha1", row))
    return decode_rgb(data, max_pixels=max_pixels)


def prepare_inputs(preprocess, images: list, batch_size: int) -> tuple[list[tuple[list[int], Any]], list]:
    """Cut `images` into batches of `batch_size` and preprocess each: ([(positions, batch)], [(position, why)]).

    A batch whose preprocessing raises is redone one image at a time, so one image a teacher cannot take does not
    cost the others their targets.
    """
    batches, errors = [], []
    step = max(1, batch_size)
    for start in range(0, len(images), step):
        positions = list(range(start, min(start + step, len(images))))
        try:
            batches.append((positions, _as_numpy(preprocess(images[start : positions[-1] + 1]))))
        except Exception:
            for i in positions:
                try:
                    batches.append(([i], _as_numpy(preprocess([images[i]]))))
                except Exception as exc:  # noqa: BLE001 - recorded per sample, the job goes on
                    errors.append((i, f"{type(exc).__name__}: {exc}"))
    return batches, errors


def _as_numpy(batch):
    """A batch as numpy arrays, which Ray's object store hands to another process without copying (a torch
    tensor is pickled: 2 s to put and 0.4 s to get 30 MB of uint8 pixels, against 0.1 s and 2 ms)."""
    if isinstance(batch, dict):
        return {k: _as_numpy(v) for k, v in batch.items()}
    return batch.numpy() if hasattr(batch, "numpy") else batch


def _as_torch(batch):
    import torch

    if isinstance(batch, dict):
        return {k: _as_torch(v) for k, v in batch.items()}
    if not isinstance(batch, np.ndarray):
        return batch
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; the teacher never writes to its inputs.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(batch)


def prepare(rows: BlockRows, preprocessors: dict[str, tuple[Any, int]], shard_urls: dict[str, str],
            max_pixels: int) -> PreparedBlock:
    """The CPU stage: decode the block's images once and preprocess them for every teacher in `preprocessors`
    ({name: (preprocess callable, batch_size)})."""
    started = time.perf_counter()
    computed = {name: rows.computed(name) for name in preprocessors}
    wanted = sorted(set().union(*computed.values()))  # an image every teacher borrows is not read at all
    images, failures = read_images(rows, wanted, shard_urls, max_pixels)
    decoded, inputs, input_errors = {}, {}, {}
    for name, (preprocess, batch_size) in preprocessors.items():
        decoded[name] = [r for r in computed[name] if r in images]
        inputs[name], input_errors[name] = prepare_inputs(preprocess, [images[r] for r in decoded[name]], batch_size)
    return PreparedBlock(rows, decoded, inputs, failures, input_errors, time.perf_counter() - started)


# ---- compute -----------------------------------------------------------------------------------------------------


def _slice(batch, i: int):
    """Image `i` of a batch (a tensor, or a dict of tensors), still a batch of one."""
    if isinstance(batch, dict):
        return {k: v[i : i + 1] for k, v in batch.items()}
    return batch[i : i + 1]


def _place(host: np.ndarray, rows: list[int], values) -> None:
    """Copy `values` (a torch tensor on any device, `host`'s dtype) into `host[rows]`, in one copy: from a device
    straight into place for the usual run of consecutive rows; on the host by numpy, whose copy is memcpy (torch's
    copy kernel took about twice as long for 16-bit values on one thread)."""
    import torch

    bits = host.view(f"i{host.dtype.itemsize}")  # numpy's bfloat16 is not torch's: move the bits
    values = values.view(getattr(torch, f"int{8 * host.dtype.itemsize}"))
    consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
    index = slice(rows[0], rows[0] + len(rows)) if consecutive else rows
    if values.device.type != "cpu" and consecutive:
        torch.from_numpy(bits[index]).copy_(values)
    else:
        bits[index] = values.cpu().numpy()


def run_inputs(teacher, batches: list[tuple[list[int], Any]], slots: list[int], size: int, storage: Storage,
               errors: list[tuple[int, str]] = (), device_lock=None) -> TeacherOutputs:
    """Forward prepared batches; input position p becomes row `slots[p]` of the result. `errors` are the
    preprocessing failures, carried into the result.

    A batch whose forward raises is redone one image at a time; a non-finite output is a failure. Each batch's
    outputs are finished where the teacher computed them (`Teacher.finish`: `finish` on its device), so
    only stored bytes come to the host, and no float32 copy of the block is ever made. `device_lock`, when given,
    is held around each forward only: threads computing other blocks finish their outputs meanwhile, but one
    forward runs at a time.
    """
    device_lock = device_lock or contextlib.nullcontext()

    def forward(batch):
        with device_lock:
            return teacher.device_forward(_as_torch(batch))

    tokens, channels = teacher.target_shape
    stored_tokens, _ = storage.stored_shape(tokens, channels)
    # Left unset where the outputs are placed, zeroed only where none are (see the end): a block's arrays are
    # written once, not twice.
    stored = np.empty((size, stored_tokens, channels), dtype=storage.array_dtype)
    scale = np.empty((size, stored_tokens), dtype=np.float16) if storage.quantize == "int8" else None
    valid = np.zeros((size,), dtype=np.uint8)
    sums, squares, count = np.zeros(channels), np.zeros(channels), 0
    errors = list(errors)
    for positions, batch in batches:
        try:
            results = [(positions, forward(batch))]
        except Exception:
            results = []
            for j, position in enumerate(positions):
                try:
                    results.append(([position], forward(_slice(batch, j))))
                except Exception as exc:  # noqa: BLE001 - recorded per sample, the job goes on
                    errors.append((position, f"{type(exc).__name__}: {exc}"))
        for done, out in results:
            finished = teacher.finish(out, storage)
            errors.extend((p, "teacher output is not finite") for p, ok in zip(done, finished.finite) if not ok)
            rows = [slots[p] for p, ok in zip(done, finished.finite) if ok]
            if not rows:
                continue
            sums += finished.sums
            squares += finished.squares
            count += finished.tokens
            _place(stored, rows, finished.codes)
            if scale is not None:
                _place(scale, rows, finished.scales)
            valid[rows] = 1
    unset = valid == 0  # failed rows and rows without an image hold zeros, the arrays' fill value
    stored[unset] = 0
    if scale is not None:
        scale[unset] = 0
    stats = {"count": count, "sum": sums.tolist(), "sumsq": squares.tolist()}
    return TeacherOutputs(stored, scale, valid, stats, sorted(errors))


def run_teacher(teacher, images: list, storage: Storage) -> TeacherOutputs:
    """`run_inputs` for decoded `images`, preprocessed in batches of the teacher's `batch_size`, with the failure
    rules of the two stages; row i of the result is image i."""
    batches, errors = prepare_inputs(teacher.preprocess, images, teacher.spec.batch_size)
    return run_inputs(teacher, batches, list(range(len(images))), len(images), storage, errors)


def compute(teachers: dict, prepared: PreparedBlock, storages: dict[str, Storage],
            device_lock=None) -> ComputedBlock:
    """The accelerator stage: every prepared teacher's forwards into the block's rows, encoded by its storage
    (see `run_inputs` for `device_lock`)."""
    rows = prepared.rows
    result = ComputedBlock(rows)
    for name, batches in prepared.inputs.items():
        started = time.perf_counter()
        decoded = prepared.decoded[name]
        out = run_inputs(teachers[name], batches, [r - rows.block.start for r in decoded], rows.block.rows,
                         storages[name], prepared.input_errors[name], device_lock)
        lent = rows.lent.get(name, {})
        failures = sorted([f for f in prepared.failures if f["row"] not in lent]
                          + [rows.failure(decoded[i], why, name) for i, why in out.errors], key=lambda f: f["row"])
        result.teachers[name] = ComputedTargets(out, failures,
                                                time.perf_counter() - started + prepared.seconds / len(prepared.inputs))
    return result


# ---- write -------------------------------------------------------------------------------------------------------


def write(store: TargetStore, computed: ComputedBlock, *, token: str | None, fingerprints: dict[str, str],
          batch_sizes: dict[str, int]) -> dict[str, BlockRecord]:
    """The last stage: each teacher's block files, then its completion record; returns the records.

    Both writes happen only while the run named `token` holds the store (see pipeline/data/store_lock.py).
    """
    block = computed.rows.block
    records = {}
    for name, done in computed.teachers.items():
        started = time.perf_counter()
        lent = computed.rows.lent.get(name, {})
        out = lending.copy_lent_rows(done.outputs, block, lent) if lent else done.outputs
        store.check_fence(token)
        digest = store.write_encoded(name, block, out.stored, out.scale, out.valid)
        record = BlockRecord(teacher=name, fingerprint=fingerprints[name], block=block.block, start=block.start,
                             stop=block.stop, written=int(out.valid.sum()), failures=tuple(done.failures),
                             digest=digest, stats=BlockStats.from_dict(out.stats), batch_size=batch_sizes[name],
                             seconds=round(done.seconds + time.perf_counter() - started, 4), reused=len(lent))
        store.check_fence(token)
        store.write_record(record)
        records[name] = record
    return records
