"""`pipeline precompute`: run frozen teachers over WebDataset shards into a target store, with Ray.

The driver indexes the shards, creates or checks the store, takes the store's lock and moves blocks of rows
(one Zarr shard each) through the three stages of pipeline/block_stages.py: prepare (read, decode, the teachers'
CPU preprocessing), compute (the forwards) and write (files, then the completion record). A `BlockWorker`
actor holds every pending teacher's weights once; its GPU request is the sum of their `num_gpus`, so small
teachers share a GPU. Two feeds (see `plan_workers`):

- tasks (the default with GPUs): prepare and write are Ray CPU tasks on every core of the cluster, and each
  device's worker only computes. At most `window` blocks are open at once (backpressure: Ray's object store
  holds the prepared inputs and computed targets of those blocks only), so the accelerators are fed while the
  CPUs work ahead of them.
- inline (the default without GPUs): each worker runs the three stages of its blocks in turn, one worker per
  group of cores, two blocks queued per worker.

Re-running after any crash redoes exactly the blocks without a record.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data.config import describe_validation_error
from pipeline import block_stages as stages
from pipeline.data.errors import JobError, UsageError
from pipeline.data.failpoints import failpoint
from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline.data.index import ShardIndex, build_index, duplicate_rows, first_difference
from pipeline.local_ray import ray_session
from pipeline.data.shards import shard_name
from pipeline.data.store import DEFAULT_ROWS_PER_CHUNK, TargetStore

DEFAULT_ROWS_PER_BLOCK = 64
BLOCKS_IN_FLIGHT_PER_WORKER = 2
HEARTBEAT_SECONDS = 10.0
WARM_HOLD_SECONDS = 0.5


class PrecomputeConfig(BaseModel):
    """A run's own settings (the teachers' come from the manifest): built by the CLI from its flags, checked
    before anything is written, and recorded whole in the run's summary, `STORE/_runs/<time>.json` `config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        default=None, description="Ray cluster to join; None: $RAY_ADDRESS if set, else a local Ray on this machine")
    batch_size: int | None = Field(
        default=None, ge=1, description="every teacher's batch size instead of its manifest's (None: the manifest's)")
    workers: int | None = Field(
        default=None, ge=1, description="worker actors holding the teachers (None: as many as the GPUs hold; "
                                        "without GPUs one per CPU with the inline feed, one with the tasks feed)")
    rows_per_block: int = Field(
        default=DEFAULT_ROWS_PER_BLOCK, ge=1,
        description="rows per unit of work = per Zarr shard file (new stores only; an existing store keeps its own)")
    rows_per_chunk: int = Field(
        default=DEFAULT_ROWS_PER_CHUNK, ge=1,
        description="rows per compressed chunk inside a shard, the unit of decoding; training reads rows in random "
                    "order, so more than 1 decodes rows it does not use")
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="larger images are recorded as errors, not decoded")
    feed: Literal["auto", "inline", "tasks"] = Field(
        default="auto", description="how blocks reach the workers (see `plan_workers`); auto: tasks with GPUs")

    @model_validator(mode="after")
    def _chunks_tile_blocks(self) -> PrecomputeConfig:
        if self.rows_per_chunk < self.rows_per_block and self.rows_per_block % self.rows_per_chunk:
            raise ValueError(f"rows_per_chunk: {self.rows_per_chunk} does not divide --rows-per-block "
                             f"{self.rows_per_block} (a chunk never spans two blocks)")
        return self

    @classmethod
    def from_flags(cls, **options) -> PrecomputeConfig:
        """Validate command-line values; a bad one is a UsageError naming its flag (`--rows-per-chunk: ...`)."""
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
    feed: str = ""  # how blocks reached the workers: "inline" or "tasks" (see WorkerPlan)
    seconds: float = 0.0  # the whole command: indexing, workers starting, teachers loading, computing
    compute_seconds: float = 0.0  # from every worker holding its teachers to the last block written
    finished_earlier_run: bool = False  # computed nothing, but wrote what a killed run left unfinished

    @property
    def nothing_to_do(self) -> bool:
        return self.blocks_computed == 0 and not self.finished_earlier_run


class BlockWorker:
    """Holds the teachers of one job (a Ray actor, one per device). `compute` is the accelerator stage of
    pipeline/block_stages.py; `process` runs all three stages of a block in turn (the CPU-only feed)."""

    def __init__(self, store_path: str, specs: dict, shard_urls: dict[str, str], *, max_pixels: int, threads: int,
                 token: str | None = None):
        import ray
        import torch

        import teachers

        torch.set_num_threads(max(1, threads))
        self.store = TargetStore(store_path)
        self.token = token  # the run's lock token: checked before every write (see pipeline/data/store_lock.py)
        self.shard_urls = shard_urls
        self.max_pixels = max_pixels
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.teachers = {name: teachers.create(spec, device=device) for name, spec in specs.items()}
        self.storages = {name: t.spec.storage() for name, t in self.teachers.items()}
        # With the tasks feed this actor runs BLOCKS_IN_FLIGHT_PER_WORKER `compute` calls in threads: one block's
        # outputs are copied out while the next block's forwards run. Forwards take turns (TF32 flags are
        # process-wide, and a device runs one batch at a time anyway).
        self.device_lock = threading.Lock()

    def describe(self) -> dict[str, dict]:
        return {
            name: {"target_shape": list(t.target_shape), "fingerprint": t.fingerprint, "host": socket.gethostname()}
            for name, t in self.teachers.items()
        }

    def compute(self, prepared: stages.PreparedBlock) -> stages.ComputedBlock:
        return stages.compute(self.teachers, prepared, self.storages, self.device_lock)

    def process(self, rows: stages.BlockRows, names: list[str]) -> dict[str, dict]:
        """Prepare, compute and write `names` for one block here; return each teacher's completion record."""
        preprocessors = {n: (self.teachers[n].preprocess, self.teachers[n].spec.batch_size) for n in names}
        prepared = stages.prepare(rows, preprocessors, self.shard_urls, self.max_pixels)
        return stages.write(self.store, self.compute(prepared), token=self.token,
                            fingerprints={n: self.teachers[n].fingerprint for n in names},
                            batch_sizes={n: self.teachers[n].spec.batch_size for n in names})


# Built once per worker process and teacher (keyed by its fingerprint): Ray reuses task processes.
_PREPROCESSORS: dict[str, object] = {}


def _preprocessors(teachers_: dict[str, tuple]) -> dict[str, tuple]:
    """{name: (preprocessor, batch_size)} for {name: (spec, fingerprint)}: only the teachers' preprocessing, built
    from the model's config files (never the weights), once per process."""
    import teachers

    preprocessors = {}
    for name, (spec, fingerprint) in teachers_.items():
        if fingerprint not in _PREPROCESSORS:
            _PREPROCESSORS[fingerprint] = teachers.get_teacher_class(spec.kind).build_preprocessor(spec)
        preprocessors[name] = (_PREPROCESSORS[fingerprint], spec.batch_size)
    return preprocessors


def _prepare_task(rows: stages.BlockRows, teachers_: dict[str, tuple], shard_urls: dict[str, str],
                  max_pixels: int) -> stages.PreparedBlock:
    """The CPU stage as a Ray task."""
    return stages.prepare(rows, _preprocessors(teachers_), shard_urls, max_pixels)


def _warm_task(teachers_: dict[str, tuple]) -> None:
    """Import what the stages use and build the preprocessors in one task process while the devices' workers load
    their teachers, so that the first blocks do not wait for it; held briefly so that each of the warm tasks
    submitted together gets a process of its own."""
    _preprocessors(teachers_)
    time.sleep(WARM_HOLD_SECONDS)


def _write_task(store_path: str, computed: stages.ComputedBlock, token: str, fingerprints: dict[str, str],
                batch_sizes: dict[str, int]) -> dict[str, dict]:
    """The write stage as a Ray task."""
    return stages.write(TargetStore(store_path), computed, token=token, fingerprints=fingerprints,
                        batch_sizes=batch_sizes)


def open_or_create_store(store_path: str, index: ShardIndex, rows_per_block: int, *,
                         locked: bool = True) -> TargetStore:
    """Create a new store for these shards, or check that an existing one was built from exactly them.

    Writes only when `locked` (the caller holds the store's lock): the new store, or the identities of shards
    that were re-read and found unchanged (touched or copied, so their mtime moved), so that the next run
    need not read them again. Without the lock the store must exist; it is only checked.
    """
    store = TargetStore(store_path)
    if not store.exists() or store.half_created():
        if not locked:
            raise RuntimeError(f"creating store {store_path} needs its lock")
        store.create(index.table, index.fingerprint, rows_per_block=rows_per_block, shards=index.shards)
        return store
    stored = store.read_index()  # refused if it is not the index the store was made with
    missing = [c for c in index.table.column_names if c not in stored.column_names]
    if missing:
        raise UsageError(f"store {store_path} was made by an older version: its index.parquet has no {missing} "
                         "column(s), which training needs to read samples in random order; precompute into a new "
                         "--store")
    # Every column, not only the fingerprint's: workers seek by the stored offsets and sizes.
    if store.dataset_fingerprint != index.fingerprint or not stored.equals(index.table):
        raise UsageError(
            f"store {store_path} was built for other shards ({first_difference(stored, index.table)}); "
            "pass the original --shards or a new --store"
        )
    if locked:
        store.remove_partial_writes()  # a run killed in the middle of a record's write leaves its temporary file
        store.record_shards(index.shards)  # also gives a store made before shards.parquet existed its record
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


def _pending_blocks(store: TargetStore, specs: dict, fingerprints: dict) -> tuple[dict, dict]:
    """({teacher: present in store}, {teacher: [blocks without a record]})."""
    present = {name: check_teacher(store, name, spec.model_dump(mode="json"), fingerprints[name])
               for name, spec in specs.items()}
    todo = {}
    for name in specs:
        done = store.done_blocks(name) if present[name] else set()
        todo[name] = [b for b in store.blocks() if b.block not in done]
    return present, todo


def run_precompute(shards: str, manifest_path: str, store_path: str, config: PrecomputeConfig | None = None, *,
                   progress: bool = True) -> PrecomputeSummary:
    """Compute every missing (teacher, block) of the store with `config`'s settings (default: the defaults) and
    finish it. Returns what was done; raises PipelineError. Bad input (manifest, store location, shards) is refused
    before anything is written."""
    import teachers

    started = time.perf_counter()
    config = config or PrecomputeConfig()
    manifest = teachers.load_manifest(manifest_path)
    specs = dict(manifest.teachers)
    if config.batch_size is not None:
        specs = {name: spec.model_copy(update={"batch_size": config.batch_size}) for name, spec in specs.items()}
    fingerprints = {name: _fingerprint(manifest_path, name, spec) for name, spec in specs.items()}
    store = TargetStore(store_path)
    store.check_location()
    existing = store.exists() and not store.half_created()
    # On a rerun only the shards whose identity (size, mtime or ETag) changed since the store recorded them are
    # read again; the full re-read and re-hash is `pipeline verify --shards`.
    index = build_index(shards, previous=store.previous_index() if existing else None, progress=progress)
    if index.table.num_rows == 0:
        raise UsageError(f"no samples found in {shards}")
    summary = PrecomputeSummary(store=store_path, num_rows=index.table.num_rows)

    if existing:
        store = open_or_create_store(store_path, index, config.rows_per_block, locked=False)
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


@dataclass(frozen=True)
class WorkerPlan:
    """How a run uses the cluster: `count` BlockWorker actors with Ray `options`, torch `threads` each, and the feed:
    "inline" (each worker prepares, computes and writes its blocks) or "tasks" (CPU tasks on every core prepare
    and write; the workers, one per device, only compute)."""

    count: int
    options: dict
    threads: int
    feed: str


def plan_workers(ray, pending: dict, config: PrecomputeConfig, num_blocks: int) -> WorkerPlan:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_worker_gpus = sum(spec.num_gpus for spec in pending.values()) if gpus else 0.0
    feed = config.feed if config.feed != "auto" else ("tasks" if per_worker_gpus else "inline")
    if per_worker_gpus:
        count = config.workers or max(1, int(gpus // per_worker_gpus))
        # With the tasks feed a device's worker only launches its forwards: every core is left to the CPU tasks.
        options, threads = {"num_cpus": 0 if feed == "tasks" else 1, "num_gpus": per_worker_gpus}, 1
    elif feed == "tasks":  # no device: one core per worker computes, the others prepare and write
        count, options, threads = config.workers or 1, {"num_cpus": 1}, 1
    else:
        count = config.workers or cpus
        threads = max(1, cpus // count)
        options = {"num_cpus": threads}
    return WorkerPlan(max(1, min(count, num_blocks)), options, threads, feed)


def _compute(store, index, specs, fingerprints, present, todo, summary, lock, config: PrecomputeConfig, *, progress):
    from tqdm.auto import tqdm

    with ray_session(config.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False) as ray:
        pending = {name: spec for name, spec in specs.items() if todo[name]}
        jobs: dict[int, list[str]] = {}
        for name, blocks in todo.items():
            for b in blocks:
                jobs.setdefault(b.block, []).append(name)
        failpoint("ray-started")
        plan = plan_workers(ray, pending, config, len(jobs))
        summary.workers, summary.feed = plan.count, plan.feed
        concurrency = BLOCKS_IN_FLIGHT_PER_WORKER if plan.feed == "tasks" else 1
        actor_cls = ray.remote(BlockWorker).options(**plan.options, max_restarts=3, max_task_retries=3,
                                                    max_concurrency=concurrency)
        shard_urls = {shard_name(url): url for url in index.urls}
        actors = [actor_cls.remote(store.path, pending, shard_urls, max_pixels=config.max_pixels,
                                   threads=plan.threads, token=lock.token)
                  for _ in range(plan.count)]
        teachers_ = {n: (s, fingerprints[n]) for n, s in pending.items()}
        cpus = int(ray.cluster_resources().get("CPU", 1))
        warm = ray.remote(_warm_task).options(num_cpus=1)
        warming = [warm.remote(teachers_) for _ in range(cpus)] if plan.feed == "tasks" else []
        try:
            described = ray.get(actors[0].describe.remote())
            ray.get([actor.describe.remote() for actor in actors[1:]] + warming)
        except ray.exceptions.RayError as exc:
            raise JobError(f"teachers failed to load on a worker: {_ray_cause(exc)}") from None
        for name, info in described.items():
            if info["fingerprint"] != fingerprints[name]:
                raise JobError(
                    f"teacher {name!r} has fingerprint {info['fingerprint'][:12]}.. on worker {info['host']} but "
                    f"{fingerprints[name][:12]}.. on the driver: are the weights the same on every node?")
            if not present[name]:
                store.add_teacher(name, spec=specs[name].model_dump(mode="json"), fingerprint=fingerprints[name],
                                  target_shape=tuple(info["target_shape"]), storage=specs[name].storage(),
                                  rows_per_chunk=config.rows_per_chunk)
        ranges = {b.block: b for b in store.blocks()}
        duplicates = duplicate_rows(index.table)
        queue = deque((stages.BlockRows.from_index(index.table, ranges[b], duplicates), names)
                      for b, names in sorted(jobs.items()))
        bar = tqdm(total=sum(rows.block.rows * len(names) for rows, names in queue), desc="precompute", unit="row",
                   disable=not progress, smoothing=0.1)
        blocks_done, halfway = 0, max(1, len(jobs) // 2)

        def finished(records: dict[str, dict]) -> None:
            nonlocal blocks_done
            for record in records.values():
                summary.blocks_computed += 1
                summary.rows_computed += record["rows"]
                summary.failures += len(record["failures"])
                bar.update(record["rows"])
            bar.set_postfix(failures=summary.failures)
            blocks_done += 1
            if blocks_done == 1:
                failpoint("first-block")
            if blocks_done == halfway:
                failpoint("mid-run")

        feed = _Feed(ray, actors, lock, finished)
        compute_started = time.monotonic()
        try:
            if plan.feed == "inline":
                feed.inline(queue)
            else:
                feed.tasks(queue, store.path, teachers_, shard_urls, config.max_pixels, cpus)
            summary.compute_seconds = time.monotonic() - compute_started
        except ray.exceptions.RayError as exc:
            raise JobError(f"precompute workers failed: {_ray_cause(exc)}; rerun the same command to resume") from None
        finally:
            bar.close()


class _Feed:
    """Moves blocks through the stages with Ray, a bounded number at a time (the backpressure), calling `finished`
    with each block's records; keeps the lock's heartbeat while it waits."""

    def __init__(self, ray, actors: list, lock, finished):
        self.ray, self.actors, self.lock, self.finished = ray, actors, lock, finished
        self.last_beat = time.monotonic()

    def _wait(self, refs: list) -> list:
        done, _ = self.ray.wait(refs, num_returns=1, timeout=HEARTBEAT_SECONDS)
        if time.monotonic() - self.last_beat > HEARTBEAT_SECONDS / 2:
            self.lock.heartbeat()
            self.last_beat = time.monotonic()
        return done

    def inline(self, queue: deque) -> None:
        """Each worker prepares, computes and writes whole blocks, with BLOCKS_IN_FLIGHT_PER_WORKER queued."""
        in_flight: dict = {}

        def submit(actor) -> None:
            if queue:
                in_flight[actor.process.remote(*queue.popleft())] = actor

        for actor in self.actors:
            for _ in range(BLOCKS_IN_FLIGHT_PER_WORKER):
                submit(actor)
        while in_flight:
            for ref in self._wait(list(in_flight)):
                actor = in_flight.pop(ref)
                self.finished(self.ray.get(ref))
                submit(actor)

    def tasks(self, queue: deque, store_path: str, teachers: dict[str, tuple], shard_urls: dict[str, str],
              max_pixels: int, cpus: int) -> None:
        """Prepare and write tasks on every core, each worker computing; at most `window` blocks open at once."""
        ray = self.ray
        prepare = ray.remote(_prepare_task).options(num_cpus=1, max_retries=3)
        write = ray.remote(_write_task).options(num_cpus=1, max_retries=3)
        teachers_ref, urls_ref = ray.put(teachers), ray.put(shard_urls)
        fingerprints = {name: fingerprint for name, (_, fingerprint) in teachers.items()}
        # Enough blocks open to keep every core and every device's queue busy, few enough to bound the memory
        # that prepared inputs and computed targets hold in Ray's object store.
        window = cpus + len(self.actors) * (BLOCKS_IN_FLIGHT_PER_WORKER + 1)
        preparing, computing, writing = {}, {}, set()
        ready: deque = deque()
        load = {id(actor): 0 for actor in self.actors}
        open_blocks = 0
        while queue or preparing or ready or computing or writing:
            while queue and open_blocks < window:
                rows, names = queue.popleft()
                subset = {n: teachers[n] for n in names}
                ref = prepare.remote(rows, subset if len(subset) < len(teachers) else teachers_ref, urls_ref,
                                     max_pixels)
                preparing[ref] = {n: teachers[n][0].batch_size for n in names}
                open_blocks += 1
            for actor in self.actors:
                while ready and load[id(actor)] < BLOCKS_IN_FLIGHT_PER_WORKER:
                    prepared, batch_sizes = ready.popleft()
                    computing[actor.compute.remote(prepared)] = (actor, batch_sizes)
                    load[id(actor)] += 1
            for ref in self._wait([*preparing, *computing, *writing]):
                if ref in preparing:
                    ready.append((ref, preparing.pop(ref)))
                elif ref in computing:
                    actor, batch_sizes = computing.pop(ref)
                    load[id(actor)] -= 1
                    names = list(batch_sizes)
                    writing.add(write.remote(store_path, ref, self.lock.token,
                                             {n: fingerprints[n] for n in names}, batch_sizes))
                else:
                    writing.discard(ref)
                    open_blocks -= 1
                    self.finished(ray.get(ref))


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
