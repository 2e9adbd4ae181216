"""`pipeline precompute`: run frozen teachers over WebDataset shards into a target store, with Ray.

The driver indexes the shards, creates or checks the store, and hands out blocks of rows (one Zarr
shard each) to `BlockWorker` actors. A worker holds every teacher's weights once, decodes each
image of its block once, feeds it to every teacher that still needs the block, writes the block's
files and then its completion record. Re-running after any crash redoes only blocks without a record.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import JobError, UsageError
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from pipeline.index import ShardIndex, build_index, first_difference
from pipeline.shards import read_member_bytes, shard_name
from pipeline.store import BlockRange, TargetStore

DEFAULT_ROWS_PER_BLOCK = 64
DEFAULT_ROWS_PER_CHUNK = 8


@dataclass
class PrecomputeSummary:
    store: str
    num_rows: int
    teachers: dict[str, dict] = field(default_factory=dict)  # name -> target_shape, dtype, done blocks, failures
    blocks_computed: int = 0
    rows_computed: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.blocks_computed == 0


class BlockWorker:
    """Holds the teachers of one job and computes whole blocks. Wrapped with `ray.remote` by the driver."""

    def __init__(self, store_path: str, specs: dict, shard_urls: dict[str, str], *, max_pixels: int, threads: int):
        import torch

        import teachers

        torch.set_num_threads(max(1, threads))
        self.store = TargetStore(store_path)
        index = self.store.read_index()
        self.index = {name: index.column(name).to_pylist() for name in index.column_names}
        self.shard_urls = shard_urls
        self.max_pixels = max_pixels
        self.teachers = {name: teachers.create(spec, device=_default_device()) for name, spec in specs.items()}

    def describe(self) -> dict[str, dict]:
        return {
            name: {"target_shape": list(t.target_shape), "fingerprint": t.fingerprint}
            for name, t in self.teachers.items()
        }

    def process(self, block: BlockRange, names: list[str]) -> dict[str, dict]:
        """Compute `names` for the rows of `block`; return each teacher's completion record."""
        started = time.perf_counter()
        images, failures = self._load_images(block)
        decode_seconds = time.perf_counter() - started
        records = {}
        for name in names:
            teacher_started = time.perf_counter()
            target, valid, teacher_failures = self._run_teacher(name, block, images)
            self.store.write_block(name, block, target, valid)
            record = {
                "teacher": name,
                "fingerprint": self.teachers[name].fingerprint,
                "block": block.block,
                "start": block.start,
                "stop": block.stop,
                "rows": block.rows,
                "written": int(valid.sum()),
                "failures": sorted(failures + teacher_failures, key=lambda f: f["row"]),
                "seconds": round(time.perf_counter() - teacher_started + decode_seconds / len(names), 4),
            }
            self.store.write_record(name, block.block, record)
            records[name] = record
        return records

    def _load_images(self, block: BlockRange):
        """Read and decode each image of the block once: {row: RGB image} plus per-row failures."""
        import fsspec

        images, failures = {}, []
        rows = range(block.start, block.stop)
        by_shard: dict[str, list[int]] = {}
        for row in rows:
            by_shard.setdefault(self.index["shard"][row], []).append(row)
        for shard, shard_rows in by_shard.items():
            url = self.shard_urls[shard]
            with fsspec.open(url, "rb") as f:
                for row in shard_rows:
                    try:
                        images[row] = self._read_image(f, row)
                    except (ImageDecodeError, EOFError, OSError) as exc:
                        failures.append(self._failure(row, str(exc)))
        return images, failures

    def _read_image(self, f, row: int):
        if not self.index["image_member"][row]:
            raise ImageDecodeError("sample has no image file")
        data = read_member_bytes(f, self.index["image_offset"][row], self.index["image_size"][row])
        if hashlib.sha1(data).hexdigest() != self.index["image_sha1"][row]:
            raise ImageDecodeError("image bytes changed since the shards were indexed")
        return decode_rgb(data, max_pixels=self.max_pixels)

    def _failure(self, row: int, error: str, teacher: str = "") -> dict:
        return {"row": row, "shard": self.index["shard"][row], "key": self.index["key"][row], "teacher": teacher,
                "error": error}

    def _run_teacher(self, name: str, block: BlockRange, images: dict):
        import torch

        teacher = self.teachers[name]
        tokens, channels = teacher.target_shape
        dtype = np.dtype(teacher.spec.storage_dtype)
        target = np.zeros((block.rows, tokens, channels), dtype=dtype)
        valid = np.zeros((block.rows,), dtype=np.uint8)
        failures = []
        rows = sorted(images)
        batch_size = max(1, teacher.spec.batch_size)
        for start in range(0, len(rows), batch_size):
            batch_rows = rows[start : start + batch_size]
            try:
                outputs = self._forward(teacher, [images[r] for r in batch_rows])
            except Exception:
                # One bad image must not cost its whole batch: redo the batch one image at a time.
                outputs = []
                for row in batch_rows:
                    try:
                        outputs.append(self._forward(teacher, [images[row]])[0])
                    except Exception as exc:  # noqa: BLE001 - recorded per sample, the job goes on
                        failures.append(self._failure(row, f"{type(exc).__name__}: {exc}", name))
                        outputs.append(None)
            for row, out in zip(batch_rows, outputs):
                if out is None:
                    continue
                if not torch.isfinite(out).all():
                    failures.append(self._failure(row, "teacher output is not finite", name))
                    continue
                target[row - block.start] = out.numpy().astype(dtype)
                valid[row - block.start] = 1
        return target, valid, failures

    @staticmethod
    def _forward(teacher, images):
        return teacher(teacher.preprocess(images)).float().cpu()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_or_create_store(store_path: str, index: ShardIndex, rows_per_block: int) -> TargetStore:
    """Create a new store for these shards, or check that an existing one was built from exactly them."""
    store = TargetStore(store_path)
    if not store.exists() or store.half_created():
        store.create(index.table, index.fingerprint, rows_per_block=rows_per_block)
        return store
    if store.dataset_fingerprint != index.fingerprint:
        difference = first_difference(store.read_index(), index.table)
        raise UsageError(
            f"store {store_path} was built for other shards ({difference}); "
            "pass the original --shards or a new --store"
        )
    return store


def check_teacher(store: TargetStore, name: str, spec: dict, fingerprint: str) -> bool:
    """True if the store already has this teacher; refuse it if the stored one is a different teacher."""
    if name not in store.teacher_names():
        return False
    attrs = store.teacher_attrs(name)
    if "teacher_fingerprint" not in attrs:
        return False  # a crash between creating the group and writing its attributes: create it again
    if attrs.get("teacher_fingerprint") == fingerprint:
        return True
    from teachers.spec import SCHEDULING_FIELDS

    stored = attrs.get("spec", {})
    changed = sorted(k for k in (set(stored) | set(spec)) - SCHEDULING_FIELDS if stored.get(k) != spec.get(k))
    what = f"spec field(s) {', '.join(changed)} differ" if changed else "the weights differ"
    raise UsageError(
        f"store {store.path} holds teacher {name!r} with fingerprint {attrs.get('teacher_fingerprint', '?')[:12]}.. "
        f"but the manifest's has {fingerprint[:12]}.. ({what}); use a new --store or another teacher name"
    )


def run_precompute(
    shards: str,
    manifest_path: str,
    store_path: str,
    *,
    address: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    rows_per_block: int = DEFAULT_ROWS_PER_BLOCK,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> PrecomputeSummary:
    """Compute every missing (teacher, block) of the store. Returns what was done; raises PipelineError."""
    import teachers

    started = time.perf_counter()
    manifest = teachers.load_manifest(manifest_path)
    specs = dict(manifest.teachers)
    if batch_size is not None:
        specs = {name: spec.model_copy(update={"batch_size": batch_size}) for name, spec in specs.items()}
    index = build_index(shards, progress=progress)
    if index.table.num_rows == 0:
        raise UsageError(f"no samples found in {shards}")
    store = open_or_create_store(store_path, index, rows_per_block)

    fingerprints = {name: teachers.spec_fingerprint(spec) for name, spec in specs.items()}
    present = {name: check_teacher(store, name, _spec_json(spec), fingerprints[name]) for name, spec in specs.items()}
    blocks = store.blocks()
    todo = {
        name: [b for b in blocks if b.block not in (store.done_blocks(name) if present[name] else set())]
        for name in specs
    }
    summary = PrecomputeSummary(store=store.path, num_rows=store.num_rows)
    if any(todo.values()):
        _compute(store, index, specs, fingerprints, present, todo, summary, address=address, workers=workers,
                 rows_per_chunk=rows_per_chunk, max_pixels=max_pixels, progress=progress)
        _finish(store, index, list(specs))
    for name in specs:
        attrs = store.teacher_attrs(name)
        records = store.read_records(name)
        summary.teachers[name] = {
            "target_shape": attrs["target_shape"],
            "dtype": attrs["dtype"],
            "fingerprint": attrs["teacher_fingerprint"],
            "blocks_done": len(records),
            "blocks_total": len(blocks),
            "failures": sum(len(r["failures"]) for r in records),
        }
    summary.seconds = time.perf_counter() - started
    return summary


def _spec_json(spec) -> dict:
    return spec.model_dump(mode="json")


def _compute(store, index, specs, fingerprints, present, todo, summary, *, address, workers, rows_per_chunk,
             max_pixels, progress):
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        pending = {name: spec for name, spec in specs.items() if todo[name]}
        shard_urls = {shard_name(url): url for url in index.urls}
        cpus = int(ray.available_resources().get("CPU", 1))
        count = max(1, min(workers or cpus, len({b.block for bs in todo.values() for b in bs})))
        threads = max(1, cpus // count)
        actor_cls = ray.remote(BlockWorker).options(num_cpus=threads, max_restarts=2, max_task_retries=2)
        actors = [
            actor_cls.remote(store.path, pending, shard_urls, max_pixels=max_pixels, threads=threads)
            for _ in range(count)
        ]
        described = ray.get(actors[0].describe.remote())
        for name, info in described.items():
            if info["fingerprint"] != fingerprints[name]:
                raise JobError(f"teacher {name!r} loaded with fingerprint {info['fingerprint'][:12]}.. on the worker "
                               f"but {fingerprints[name][:12]}.. on the driver: are the weights the same on every node?")
            if not present[name]:
                store.add_teacher(name, spec=_spec_json(specs[name]), fingerprint=fingerprints[name],
                                  target_shape=tuple(info["target_shape"]), dtype=specs[name].storage_dtype,
                                  rows_per_chunk=rows_per_chunk)
        jobs: dict[int, list[str]] = {}
        for name, blocks in todo.items():
            for b in blocks:
                jobs.setdefault(b.block, []).append(name)
        block_ranges = {b.block: b for b in store.blocks()}
        work = [(block_ranges[b], names) for b, names in sorted(jobs.items())]
        total_rows = sum(block.rows * len(names) for block, names in work)
        bar = tqdm(total=total_rows, desc="precompute", unit="row", disable=not progress, smoothing=0.1)
        pool = ActorPool(actors)
        try:
            for records in pool.map_unordered(lambda actor, job: actor.process.remote(*job), work):
                for record in records.values():
                    summary.blocks_computed += 1
                    summary.rows_computed += record["rows"]
                    summary.failures += len(record["failures"])
                    bar.update(record["rows"])
                bar.set_postfix(failures=summary.failures)
        except ray.exceptions.RayError as exc:
            raise JobError(f"precompute workers failed: {exc}; rerun the same command to resume") from None
        finally:
            bar.close()
    finally:
        if started_ray:
            ray.shutdown()


def _finish(store: TargetStore, index: ShardIndex, names: list[str]) -> None:
    """After the data: errors.parquet from every record, then each complete teacher's `complete` flag."""
    errors = [{"row": -1, "teacher": "", **e} for e in index.shard_errors]
    for name in store.teacher_names():
        for record in store.read_records(name):
            errors.extend({**f, "teacher": f.get("teacher") or name} for f in record["failures"])
    store.write_errors(errors)
    total = len(store.blocks())
    for name in names:
        if len(store.done_blocks(name)) == total:
            store.mark_complete(name)
