"""`pipeline precompute`: run frozen teachers over WebDataset shards into a target store, with Ray.

The driver indexes the shards, creates or checks the store, takes the store's lock and hands out
blocks of rows (one Zarr shard each) to `BlockWorker` actors, keeping two blocks queued per worker
so none waits for the driver. A worker holds every pending teacher's weights once (its GPU request
is the sum of their `num_gpus`, so small teachers share a GPU), decodes each image of its block
once, feeds it to every teacher that still needs the block, writes the block's files and then its
completion record. Re-running after any crash redoes exactly the blocks without a record.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config_io import describe_validation_error
from pipeline.errors import JobError, UsageError
from pipeline.failpoints import failpoint
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from pipeline.index import ShardIndex, build_index, duplicate_rows, first_difference
from pipeline.local_ray import ray_session
from pipeline.shards import read_indexed_image, shard_name
from pipeline.store import BlockRange, Storage, TargetStore

DEFAULT_ROWS_PER_BLOCK = 64
DEFAULT_ROWS_PER_CHUNK = 8
BLOCKS_IN_FLIGHT_PER_WORKER = 2
HEARTBEAT_SECONDS = 10.0


class PrecomputeConfig(BaseModel):
    """A run's own settings (the teachers' come from the manifest), checked before anything is written and
    recorded in the run's summary under `STORE/_runs/`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    workers: int | None = Field(default=None, ge=1)
    rows_per_block: int = Field(default=DEFAULT_ROWS_PER_BLOCK, ge=1)
    rows_per_chunk: int = Field(default=DEFAULT_ROWS_PER_CHUNK, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)

    @model_validator(mode="after")
    def _chunks_tile_blocks(self) -> PrecomputeConfig:
        if self.rows_per_chunk < self.rows_per_block and self.rows_per_block % self.rows_per_chunk:
            raise ValueError(f"rows_per_chunk: {self.rows_per_chunk} does not divide --rows-per-block "
                             f"{self.rows_per_block} (a chunk never spans two blocks)")
        return self

    @classmethod
    def checked(cls, **options) -> PrecomputeConfig:
        """Validate; a bad value is a UsageError naming its command-line flag."""
        try:
            return cls(**options)
        except ValidationError as exc:
            text = describe_validation_error(exc)
            for name in cls.model_fields:
                text = text.replace(f"{name}:", f"--{name.replace('_', '-')}:")
            raise UsageError(text) from None


@dataclass
class PrecomputeSummary:
    store: str
    num_rows: int
    teachers: dict[str, dict] = field(default_factory=dict)  # name -> target_shape, dtype, blocks, failures
    blocks_computed: int = 0
    rows_computed: int = 0
    failures: int = 0
    workers: int = 0
    seconds: float = 0.0  # the whole command: indexing, workers starting, teachers loading, computing
    compute_seconds: float = 0.0  # from every worker holding its teachers to the last block written
    finished_earlier_run: bool = False  # computed nothing, but wrote what a killed run left unfinished

    @property
    def nothing_to_do(self) -> bool:
        return self.blocks_computed == 0 and not self.finished_earlier_run


class BlockWorker:
    """Holds the teachers of one job and computes whole blocks. Wrapped with `ray.remote` by the driver."""

    def __init__(self, store_path: str, specs: dict, shard_urls: dict[str, str], *, max_pixels: int, threads: int,
                 token: str | None = None):
        import ray
        import torch

        import teachers

        torch.set_num_threads(max(1, threads))
        self.store = TargetStore(store_path)
        self.token = token  # the run's lock token: checked before every write (see pipeline/store_lock.py)
        index = self.store.read_index()
        self.index = {name: index.column(name).to_pylist() for name in index.column_names}
        self.duplicates = duplicate_rows(index)
        self.shard_urls = shard_urls
        self.max_pixels = max_pixels
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.teachers = {name: teachers.create(spec, device=device) for name, spec in specs.items()}

    def describe(self) -> dict[str, dict]:
        return {
            name: {"target_shape": list(t.target_shape), "fingerprint": t.fingerprint, "host": socket.gethostname()}
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
            self.store.check_fence(self.token)
            digest = self.store.write_block(name, block, target, valid)
            record = {
                "teacher": name,
                "fingerprint": self.teachers[name].fingerprint,
                "block": block.block,
                "start": block.start,
                "stop": block.stop,
                "rows": block.rows,
                "written": int(valid.sum()),
                "failures": sorted(failures + teacher_failures, key=lambda f: f["row"]),
                "sha256": digest,
                "stats": _channel_stats(target, valid),
                # Batch composition changes the last float bits: byte identity between runs needs equal batch sizes.
                "batch_size": self.teachers[name].spec.batch_size,
                "seconds": round(time.perf_counter() - teacher_started + decode_seconds / len(names), 4),
            }
            self.store.check_fence(self.token)
            self.store.write_record(name, block.block, record)
            records[name] = record
        return records

    def _load_images(self, block: BlockRange):
        """Read and decode each image of the block once: {row: RGB image} plus per-row failures."""
        import fsspec

        images, failures = {}, []
        by_shard: dict[str, list[int]] = {}
        for row in range(block.start, block.stop):
            if row in self.duplicates:
                failures.append(self._failure(row, self.duplicates[row]))
                continue
            by_shard.setdefault(self.index["shard"][row], []).append(row)
        for shard, rows in by_shard.items():
            try:
                with fsspec.open(self.shard_urls[shard], "rb") as f:
                    for row in rows:
                        try:
                            images[row] = self._read_image(f, row)
                        except Exception as exc:
                            # Any exception from one row (not only the expected ones) is that row's failure: an
                            # uncaught one would fail the block on every rerun and so stop the whole job.
                            reason = str(exc) if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
                            failures.append(self._failure(row, reason))
            except OSError as exc:
                failures.extend(self._failure(r, f"cannot read shard: {exc}") for r in rows if r not in images)
        return images, failures

    def _read_image(self, f, row: int):
        if not self.index["image_member"][row]:
            raise ImageDecodeError("sample has no image file")
        data = read_indexed_image(f, self.index["image_offset"][row], self.index["image_size"][row],
                                  self.index["image_sha1"][row])
        return decode_rgb(data, max_pixels=self.max_pixels)

    def _failure(self, row: int, error: str, teacher: str = "") -> dict:
        return {"row": row, "shard": self.index["shard"][row], "key": self.index["key"][row], "teacher": teacher,
                "error": error}

    def _run_teacher(self, name: str, block: BlockRange, images: dict):
        teacher = self.teachers[name]
        rows = sorted(images)
        outputs, ok, errors = run_teacher(teacher, [images[r] for r in rows])
        target = np.zeros((block.rows, *teacher.target_shape), dtype=np.float32)
        valid = np.zeros((block.rows,), dtype=np.uint8)
        offsets = [r - block.start for r in rows]
        target[offsets] = outputs
        valid[offsets] = ok
        return target, valid, [self._failure(rows[i], reason, name) for i, reason in errors]


def run_teacher(teacher, images: list) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Targets float32 [n, T, C], valid uint8 [n] and (index, reason) per failed image, batched by `batch_size`.

    A batch that raises is redone one image at a time, so one image a teacher cannot take does not cost the
    others their targets; a non-finite output is a failure. Failed rows stay zero.
    """
    import torch

    target = np.zeros((len(images), *teacher.target_shape), dtype=np.float32)
    valid = np.zeros((len(images),), dtype=np.uint8)
    errors = []

    def forward(batch):
        return teacher(teacher.preprocess(batch)).float().cpu()

    step = max(1, teacher.spec.batch_size)
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        try:
            outputs = list(forward(chunk))
        except Exception:
            outputs = []
            for i, image in enumerate(chunk, start):
                try:
                    outputs.append(forward([image])[0])
                except Exception as exc:  # noqa: BLE001 - recorded per sample, the job goes on
                    errors.append((i, f"{type(exc).__name__}: {exc}"))
                    outputs.append(None)
        for i, out in enumerate(outputs, start):
            if out is None:
                continue
            if not torch.isfinite(out).all():
                errors.append((i, "teacher output is not finite"))
                continue
            target[i] = out.numpy()
            valid[i] = 1
    return target, valid, sorted(errors)


def _channel_stats(target: np.ndarray, valid: np.ndarray) -> dict:
    """Per-channel count/sum/sum of squares over the valid rows' tokens (float64), merged into mean/std later."""
    rows = target[valid.astype(bool)].astype(np.float64).reshape(-1, target.shape[-1])
    return {"count": int(rows.shape[0]), "sum": rows.sum(axis=0).tolist(), "sumsq": (rows**2).sum(axis=0).tolist()}


def open_or_create_store(store_path: str, index: ShardIndex, rows_per_block: int) -> TargetStore:
    """Create a new store for these shards, or check that an existing one was built from exactly them."""
    store = TargetStore(store_path)
    if not store.exists() or store.half_created():
        store.create(index.table, index.fingerprint, rows_per_block=rows_per_block)
        return store
    stored = store.read_index()  # refused if it is not the index the store was made with
    # Every column, not only the fingerprint's: workers seek by the stored offsets and sizes.
    if store.dataset_fingerprint != index.fingerprint or not stored.equals(index.table):
        raise UsageError(
            f"store {store_path} was built for other shards ({first_difference(stored, index.table)}); "
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
    # A local checkpoint is identified by its files' contents, not its path: a moved copy is the same teacher.
    moved = "model" in changed and os.path.isdir(str(spec.get("model")))
    changed = [k for k in changed if not (moved and k == "model")]
    what = f"spec field(s) {', '.join(changed)} differ" if changed else "the weights differ"
    if moved:
        what += f"; model {stored.get('model')} -> {spec.get('model')}"
    raise UsageError(
        f"store {store.path} holds teacher {name!r} with fingerprint {attrs.get('teacher_fingerprint', '?')[:12]}.. "
        f"but the manifest's has {fingerprint[:12]}.. ({what}); use a new --store or another teacher name"
    )


def _storage(spec) -> Storage:
    return Storage(dtype=spec.storage_dtype, quantize=spec.quantize, pool=spec.pool)


def _pending_blocks(store: TargetStore, specs: dict, fingerprints: dict) -> tuple[dict, dict]:
    """({teacher: present in store}, {teacher: [blocks without a record]})."""
    present = {name: check_teacher(store, name, spec.model_dump(mode="json"), fingerprints[name])
               for name, spec in specs.items()}
    todo = {}
    for name in specs:
        done = store.done_blocks(name) if present[name] else set()
        todo[name] = [b for b in store.blocks() if b.block not in done]
    return present, todo


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
    """Compute every missing (teacher, block) of the store and finish it. Returns what was done; raises
    PipelineError. Bad input (settings, manifest, store location, shards) is refused before anything is written."""
    import teachers

    started = time.perf_counter()
    config = PrecomputeConfig.checked(address=address, batch_size=batch_size, workers=workers,
                                      rows_per_block=rows_per_block, rows_per_chunk=rows_per_chunk,
                                      max_pixels=max_pixels)
    manifest = teachers.load_manifest(manifest_path)
    specs = dict(manifest.teachers)
    if config.batch_size is not None:
        specs = {name: spec.model_copy(update={"batch_size": config.batch_size}) for name, spec in specs.items()}
    fingerprints = {name: _fingerprint(manifest_path, name, spec) for name, spec in specs.items()}
    store = TargetStore(store_path)
    store.check_location()
    index = build_index(shards, progress=progress)
    if index.table.num_rows == 0:
        raise UsageError(f"no samples found in {shards}")
    summary = PrecomputeSummary(store=store_path, num_rows=index.table.num_rows)

    if store.exists() and not store.half_created():
        store = open_or_create_store(store_path, index, config.rows_per_block)
        present, todo = _pending_blocks(store, specs, fingerprints)
        if _finished(store, present, todo):  # touch nothing, not even the lock
            return _summarise(store, specs, summary, started)
    with store.lock() as lock:
        store = open_or_create_store(store_path, index, config.rows_per_block)
        present, todo = _pending_blocks(store, specs, fingerprints)
        if not all(present.values()):
            store.chunk_rows(config.rows_per_chunk)  # before any worker starts: the store's blocks may be others
        if any(todo.values()):
            _compute(store, index, specs, fingerprints, present, todo, summary, lock, config, progress=progress)
        else:
            summary.finished_earlier_run = True  # killed after its last record: only the finish is left
        failpoint("last-record")
        _finish(store, index, list(specs))
        summary.seconds = time.perf_counter() - started
        store.write_run({"finished": time.time(), "seconds": round(summary.seconds, 3), "workers": summary.workers,
                         "blocks_computed": summary.blocks_computed, "rows_computed": summary.rows_computed,
                         "failures": summary.failures, "teachers": sorted(specs),
                         "batch_sizes": {name: spec.batch_size for name, spec in specs.items()},
                         "config": config.model_dump(mode="json"),
                         "rows_per_second": round(summary.rows_computed / max(summary.seconds, 1e-9), 3)})
    return _summarise(store, specs, summary, started)


def _fingerprint(manifest_path: str, name: str, spec) -> str:
    """The teacher's fingerprint; weights that cannot be found are bad input naming the manifest field."""
    import teachers

    try:
        return teachers.spec_fingerprint(spec)
    except (OSError, ValueError) as exc:
        reason = str(exc).removeprefix("spec.")
        raise UsageError(f"{manifest_path}: teachers.{name}.{reason}" if reason != str(exc)
                         else f"{manifest_path}: teachers.{name}: {reason}") from None


def _finished(store: TargetStore, present: dict, todo: dict) -> bool:
    """Every teacher present, recorded and marked complete. `_finish` marks teachers complete last, so a run
    killed before or during its finish leaves a store that is not finished, and the next run finishes it."""
    return all(present.values()) and not any(todo.values()) and all(
        store.teacher_attrs(name).get("complete") for name in present)


def _summarise(store: TargetStore, specs: dict, summary: PrecomputeSummary, started: float) -> PrecomputeSummary:
    for name in specs:
        attrs = store.teacher_attrs(name)
        records = store.read_records(name)
        summary.teachers[name] = {
            "target_shape": attrs["target_shape"],
            "dtype": attrs["dtype"],
            "storage": attrs.get("storage", {}),
            "fingerprint": attrs["teacher_fingerprint"],
            "blocks_done": len(records),
            "blocks_total": len(store.blocks()),
            "failures": sum(len(r["failures"]) for r in records),
        }
    summary.seconds = time.perf_counter() - started
    return summary


def _worker_resources(ray, pending: dict, workers: int | None, num_blocks: int) -> tuple[int, dict, int]:
    """(number of workers, Ray options of one worker, torch threads per worker)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_worker_gpus = sum(spec.num_gpus for spec in pending.values()) if gpus else 0.0
    if per_worker_gpus:
        count = workers or max(1, int(gpus // per_worker_gpus))
        options, threads = {"num_cpus": 1, "num_gpus": per_worker_gpus}, 1
    else:
        count = workers or cpus
        threads = max(1, cpus // count)
        options = {"num_cpus": threads}
    return max(1, min(count, num_blocks)), options, threads


def _compute(store, index, specs, fingerprints, present, todo, summary, lock, config: PrecomputeConfig, *, progress):
    from tqdm.auto import tqdm

    with ray_session(config.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False) as ray:
        pending = {name: spec for name, spec in specs.items() if todo[name]}
        jobs: dict[int, list[str]] = {}
        for name, blocks in todo.items():
            for b in blocks:
                jobs.setdefault(b.block, []).append(name)
        failpoint("ray-started")
        count, options, threads = _worker_resources(ray, pending, config.workers, len(jobs))
        summary.workers = count
        actor_cls = ray.remote(BlockWorker).options(**options, max_restarts=3, max_task_retries=3)
        shard_urls = {shard_name(url): url for url in index.urls}
        actors = [actor_cls.remote(store.path, pending, shard_urls, max_pixels=config.max_pixels, threads=threads,
                                   token=lock.token)
                  for _ in range(count)]
        try:
            described = ray.get(actors[0].describe.remote())
            ray.get([actor.describe.remote() for actor in actors[1:]])
        except ray.exceptions.RayError as exc:
            raise JobError(f"teachers failed to load on a worker: {_ray_cause(exc)}") from None
        for name, info in described.items():
            if info["fingerprint"] != fingerprints[name]:
                raise JobError(
                    f"teacher {name!r} has fingerprint {info['fingerprint'][:12]}.. on worker {info['host']} but "
                    f"{fingerprints[name][:12]}.. on the driver: are the weights the same on every node?")
            if not present[name]:
                store.add_teacher(name, spec=specs[name].model_dump(mode="json"), fingerprint=fingerprints[name],
                                  target_shape=tuple(info["target_shape"]), storage=_storage(specs[name]),
                                  rows_per_chunk=config.rows_per_chunk)
        ranges = {b.block: b for b in store.blocks()}
        queue = deque((ranges[b], names) for b, names in sorted(jobs.items()))
        bar = tqdm(total=sum(job[0].rows * len(job[1]) for job in queue), desc="precompute", unit="row",
                   disable=not progress, smoothing=0.1)
        in_flight: dict = {}

        def submit(actor) -> None:
            if queue:
                job = queue.popleft()
                in_flight[actor.process.remote(*job)] = actor

        for actor in actors:
            for _ in range(BLOCKS_IN_FLIGHT_PER_WORKER):
                submit(actor)
        jobs_done, halfway = 0, max(1, len(jobs) // 2)
        last_beat = compute_started = time.monotonic()
        try:
            while in_flight:
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=HEARTBEAT_SECONDS)
                if time.monotonic() - last_beat > HEARTBEAT_SECONDS / 2:
                    lock.heartbeat()
                    last_beat = time.monotonic()
                for ref in done:
                    actor = in_flight.pop(ref)
                    for record in ray.get(ref).values():
                        summary.blocks_computed += 1
                        summary.rows_computed += record["rows"]
                        summary.failures += len(record["failures"])
                        bar.update(record["rows"])
                    bar.set_postfix(failures=summary.failures)
                    jobs_done += 1
                    if jobs_done == 1:
                        failpoint("first-block")
                    if jobs_done == halfway:
                        failpoint("mid-run")
                    submit(actor)
            summary.compute_seconds = time.monotonic() - compute_started
        except ray.exceptions.RayError as exc:
            raise JobError(f"precompute workers failed: {_ray_cause(exc)}; rerun the same command to resume") from None
        finally:
            bar.close()


def _ray_cause(exc: Exception) -> str:
    """The user's exception inside a Ray error, in one line."""
    cause = getattr(exc, "cause", None) or exc
    return " ".join(f"{type(cause).__name__}: {cause}".split())[:500]


def _finish(store: TargetStore, index: ShardIndex, names: list[str]) -> None:
    """After the data: errors.parquet from every record, then each complete teacher's mean/std and flag."""
    errors = [{"row": -1, "teacher": "", **e} for e in index.shard_errors]
    for name in store.teacher_names():
        for record in store.read_records(name):
            errors.extend({**f, "teacher": f.get("teacher") or name} for f in record["failures"])
    store.write_errors(errors)
    total = len(store.blocks())
    for name in names:
        records = store.read_records(name)
        if len(records) == total:
            store.mark_complete(name, _mean_std(records))
            failpoint("finish")  # errors.parquet written, some teachers complete and some not yet


def _mean_std(records: list[dict]) -> dict:
    """Merge the blocks' per-channel sums (in block order, so the result is the same on every run)."""
    count = sum(r["stats"]["count"] for r in records)
    if not count:
        return {}
    total = np.sum([r["stats"]["sum"] for r in records], axis=0)
    squares = np.sum([r["stats"]["sumsq"] for r in records], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return {"mean": [round(float(x), 6) for x in mean], "std": [round(float(x), 6) for x in std],
            "stats_count": count}
