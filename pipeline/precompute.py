"""`pipeline precompute`: run frozen teachers over WebDataset shards into a target store, with Ray.

The driver indexes the shards, joins the Ray cluster (or starts a local Ray), creates or checks the store, takes
the store's lock and moves blocks of rows (one Zarr shard each) through the three stages of
pipeline/block_stages.py: prepare (read, decode, the teachers' CPU preprocessing), compute (the forwards) and
write (files, then the completion record). A `BlockWorker` actor holds every pending teacher's weights once; its
GPU request is the sum of their `num_gpus`, so small teachers share a GPU. How blocks reach the workers, and how a
run survives losing them, is pipeline/workers.py.

A store has one target row per distinct image (pipeline/data/index.py `assign_target_rows`). Run on the store's
shards plus new ones, it grows: the new samples are appended and only images new to the store are computed, in new
blocks. `--reuse OTHER_STORE` copies the rows other stores hold instead of computing them (pipeline/lending.py).
Re-running after any crash redoes exactly the blocks without a record.
"""

from __future__ import annotations

import os
import time
import typing
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.data.config import describe_validation_error
from pipeline import block_stages as stages
from pipeline.data.errors import JobError, UsageError
from pipeline.data.failpoints import failpoint
from pipeline.data.fingerprints import check_fingerprint, fingerprint_mismatch
from pipeline.data.images import DEFAULT_MAX_PIXELS
from pipeline import lending
from pipeline.data.index import ShardIndex, assign_target_rows, build_index, duplicate_rows, growth_problem
from pipeline.local_ray import ray_session
from pipeline.data.shards import shard_name
from pipeline.data.store import DEFAULT_ROWS_PER_CHUNK, BlockRecord, TargetStore
from pipeline.data.store_lock import StoreLock
from pipeline.workers import (BLOCKS_IN_FLIGHT_PER_WORKER, WORKER_RESTARTS, BlockJob, BlockWorker, Feed,
                              alive_resources, plan_workers, ray_cause, warm_task)

DEFAULT_ROWS_PER_BLOCK = 64


class PrecomputeConfig(BaseModel):
    """A run's own settings (the teachers' come from the manifest): built by the CLI from its flags, checked
    before anything is written, and recorded whole in the run's summary, `STORE/_runs/<time>.json` `config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        default=None, description="Ray cluster to join: HEAD:PORT of `ray start --head`, ray://HOST:PORT, or auto "
                                  "(the cluster `ray start` last started on this machine); unset: $RAY_ADDRESS if "
                                  "set, else a fresh local Ray that ends with the job. A cluster that cannot be "
                                  "reached or refuses this driver's authentication is exit 2 before the store is "
                                  "touched")
    batch_size: int | None = Field(
        default=None, ge=1, description="every teacher's batch size instead of its manifest's (unset: the manifest's)")
    workers: int | None = Field(
        default=None, ge=1, description="worker actors holding the teachers (unset: as many as the GPUs hold; "
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
    reuse: tuple[str, ...] = Field(
        default=(), description="a target store to copy rows from instead of computing them, where it holds the same "
                                "image (sha1 of its bytes) for a teacher of the same fingerprint; each copied block is "
                                "checked against its record. Repeatable: the first store that has a row lends it")
    feed: Literal["auto", "inline", "tasks"] = Field(
        default="auto", description="how blocks reach the workers: tasks, Ray CPU tasks on every core read, decode, "
                                    "preprocess and write while each device's worker only computes; inline, each "
                                    "worker does all of it for its blocks; auto, tasks when the teachers use GPUs, "
                                    "else inline")

    @model_validator(mode="after")
    def _chunks_tile_blocks(self) -> PrecomputeConfig:
        if self.rows_per_chunk < self.rows_per_block and self.rows_per_block % self.rows_per_chunk:
            raise ValueError(f"rows_per_chunk: {self.rows_per_chunk} does not divide --rows-per-block "
                             f"{self.rows_per_block} (a chunk never spans two blocks)")
        return self

    @classmethod
    def add_flags(cls, parser) -> None:
        """One `--flag` per field, with the field's type, default and description: the CLI states none of them."""
        for name, info in cls.model_fields.items():
            if typing.get_origin(info.annotation) is tuple:
                parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="append", default=None,
                                    metavar="STORE", help=info.description)
                continue
            literal = typing.get_origin(info.annotation) is Literal
            choices = typing.get_args(info.annotation) if literal else None
            kinds = [t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None)]
            default = "" if info.default is None else f" (default {info.default})"
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=info.default, choices=choices,
                                type=None if choices else kinds[0], help=f"{info.description}{default}")

    @classmethod
    def from_args(cls, args) -> PrecomputeConfig:
        """The config of parsed `add_flags` arguments (see `from_flags`)."""
        flags = {name: getattr(args, name) for name in cls.model_fields}
        return cls.from_flags(**{name: value for name, value in flags.items() if value is not None or
                                 typing.get_origin(cls.model_fields[name].annotation) is not tuple})

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
    rows_computed: int = 0  # teacher-rows computed: a row lent by another store is not one
    rows_reused: int = 0  # teacher-rows copied from --reuse stores
    failures: int = 0
    workers: int = 0
    nodes: int = 0  # the Ray nodes whose workers answered
    feed: str = ""  # how blocks reached the workers: "inline" or "tasks" (see WorkerPlan)
    seconds: float = 0.0  # the whole command: indexing, workers starting, teachers loading, computing
    compute_seconds: float = 0.0  # from every worker holding its teachers to the last block written
    finished_earlier_run: bool = False  # computed nothing, but wrote what a killed run left unfinished

    @property
    def nothing_to_do(self) -> bool:
        return self.blocks_computed == 0 and not self.finished_earlier_run


@dataclass
class ComputeJob:
    """What the compute step of a run needs, read under the store's lock: the teachers' specs and fingerprints,
    which of them the store holds already (`present`) and each one's blocks without a record (`todo`)."""

    store: TargetStore
    index: ShardIndex  # its table is the store's, target rows assigned
    lenders: list[lending.Lender]
    specs: dict
    fingerprints: dict[str, str]
    present: dict[str, bool]
    todo: dict[str, list]
    config: PrecomputeConfig
    summary: PrecomputeSummary
    lock: StoreLock
    progress: bool


def open_or_create_store(store_path: str, index: ShardIndex, rows_per_block: int, *, locked: bool = True,
                         order=None) -> tuple[TargetStore, ShardIndex, bool]:
    """Create a new store for these shards, or check that an existing one was built from them or from their first
    shards (then these shards grow it). Returns the store, `index` with the store's target rows, and whether the
    store still has to grow (only without the lock).

    Writes only when `locked` (the caller holds the store's lock): the new store, the growth, or the identities
    of shards that were re-read and found unchanged (touched or copied, so their mtime moved), so that the next run
    need not read them again. Without the lock the store must exist; it is only checked. `order`: the order in
    which new images get rows (pipeline.lending.lending_order).
    """
    store = TargetStore(store_path)
    if not store.exists() or store.half_created():
        if not locked:
            raise RuntimeError(f"creating store {store_path} needs its lock")
        table = assign_target_rows(index.table, None, rows_per_block, order)
        store.create(table, index.fingerprint, rows_per_block=rows_per_block, shards=index.shards)
        return store, replace(index, table=table), False
    if locked:
        store.remove_partial_writes()  # a run killed in the middle of a record's write leaves its temporary file
        store.finish_growing()  # a run killed while it grew the store
    stored = store.read_index()  # refused if it is not the index the store was made with
    problem = growth_problem(stored, index.table)
    if problem:
        raise UsageError(f"store {store_path} was built for other shards: {problem}; pass its shards (new shards may "
                         "be added: they grow the store) or a new --store")
    grows = index.table.num_rows > stored.num_rows
    if grows and locked:
        table = assign_target_rows(index.table, stored, store.rows_per_block, order)
        store.grow(table, index.fingerprint, index.shards)
        return store, replace(index, table=table), False
    if locked:
        store.record_shards(index.shards)  # also writes it again where it was deleted or damaged
    return store, replace(index, table=stored), grows


def check_teacher(store: TargetStore, name: str, spec: dict, fingerprint: str) -> bool:
    """True if the store already has this teacher; refuse it if the stored one is a different teacher."""
    if name not in store.teacher_names():
        return False
    attrs = store.teacher_attrs(name)
    if "teacher_fingerprint" not in attrs:
        return False  # a crash between creating the group and writing its attributes: create it again
    if attrs.get("teacher_fingerprint") == fingerprint:
        return True
    from teachers.spec import NON_OUTPUT_FIELDS

    stored = attrs.get("spec", {})
    changed = sorted(k for k in (set(stored) | set(spec)) - NON_OUTPUT_FIELDS if stored.get(k) != spec.get(k))
    # A local checkpoint is identified by its files' contents, not its path: a moved copy is the same teacher.
    moved = "model" in changed and os.path.isdir(str(spec.get("model")))
    changed = [k for k in changed if not (moved and k == "model")]
    what = f"spec field(s) {', '.join(changed)} differ" if changed else "the weights differ"
    if moved:
        what += f"; model {stored.get('model')} -> {spec.get('model')}"
    raise UsageError(fingerprint_mismatch(name, attrs["teacher_fingerprint"], fingerprint,
                                          where=f"in store {store.path}", expected_by="the manifest",
                                          remedy=f"{what}; use a new --store or another teacher name"))


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
    lenders = lending.open_lenders(config.reuse, fingerprints, store_path)
    order = lending.lending_order(lenders) if lenders else None
    store = TargetStore(store_path)
    store.check_location()
    # A growth that a killed run left with its index written but not yet the store's is looked at only under the
    # lock, where it is finished first: until then the store refuses to read that index.
    existing = store.exists() and not store.half_created() and "pending_index_sha256" not in store.attrs
    # On a rerun only the shards whose identity (size, mtime or ETag) changed since the store recorded them are
    # read again; the full re-read and re-hash is `pipeline verify --shards`.
    index = build_index(shards, previous=store.previous_index() if existing else None, progress=progress)
    if index.table.num_rows == 0:
        raise UsageError(f"no samples found in {shards}")
    summary = PrecomputeSummary(store=store_path, num_rows=index.table.num_rows)

    needs_ray = True
    if existing:
        store, _, grows = open_or_create_store(store_path, index, config.rows_per_block, locked=False)
        present, todo = _pending_blocks(store, specs, fingerprints)
        if not grows and _already_complete(store, present, todo) and not store.needs_repair():
            return _summarise(store, specs, summary, started)  # touch nothing, not even the lock
        needs_ray = grows or any(todo.values())  # else only the finish is left
    with ExitStack() as stack:
        # Ray first: a cluster that cannot be joined is refused before the store is created or locked.
        ray = stack.enter_context(_ray(config)) if needs_ray else None
        lock = stack.enter_context(store.lock())
        store, index, _ = open_or_create_store(store_path, index, config.rows_per_block, order=order)
        present, todo = _pending_blocks(store, specs, fingerprints)
        if not all(present.values()):
            store.chunk_rows(config.rows_per_chunk)  # before any worker starts: the store's blocks may be others
        if any(todo.values()):
            ray = ray or stack.enter_context(_ray(config))  # another run left work between our look and the lock
            _compute(ray, ComputeJob(store, index, lenders, specs, fingerprints, present, todo, config, summary,
                                     lock, progress))
        else:
            summary.finished_earlier_run = True  # killed after its last record: only the finish is left
        store.remove_partial_writes()  # of this run's workers that were killed in a write and replaced
        failpoint("last-record")
        _write_finish(store, index, list(specs))
        summary.seconds = time.perf_counter() - started
        store.write_run({"finished": time.time(), "seconds": round(summary.seconds, 3), "workers": summary.workers,
                         "nodes": summary.nodes,
                         "blocks_computed": summary.blocks_computed, "rows_computed": summary.rows_computed,
                         "rows_reused": summary.rows_reused,
                         "failures": summary.failures, "teachers": sorted(specs),
                         "batch_sizes": {name: spec.batch_size for name, spec in specs.items()},
                         "config": config.model_dump(mode="json"),
                         "rows_per_second": round(summary.rows_computed / max(summary.seconds, 1e-9), 3)})
    return _summarise(store, specs, summary, started)


def _ray(config: PrecomputeConfig):
    return ray_session(config.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def _fingerprint(manifest_path: str, name: str, spec) -> str:
    """The teacher's fingerprint; weights that cannot be found are bad input naming the manifest field."""
    import teachers

    try:
        return teachers.spec_fingerprint(spec)
    except (OSError, ValueError) as exc:
        reason = str(exc).removeprefix("spec.")
        raise UsageError(f"{manifest_path}: teachers.{name}.{reason}" if reason != str(exc)
                         else f"{manifest_path}: teachers.{name}: {reason}") from None


def _already_complete(store: TargetStore, present: dict, todo: dict) -> bool:
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
            "storage": attrs["storage"],
            "fingerprint": attrs["teacher_fingerprint"],
            "blocks_done": len(records),
            "blocks_total": len(store.blocks()),
            "failures": sum(len(r.failures) for r in records),
        }
    summary.seconds = time.perf_counter() - started
    return summary


def _compute(ray, job: ComputeJob) -> None:
    """Run the job's pending (teacher, block) pairs on Ray workers, adding teachers new to the store first."""
    from tqdm.auto import tqdm

    store, index, specs, fingerprints, config, summary = (job.store, job.index, job.specs, job.fingerprints,
                                                          job.config, job.summary)

    failpoint("ray-started")
    pending = {name: spec for name, spec in specs.items() if job.todo[name]}
    names_by_block: dict[int, list[str]] = {}
    for name, blocks in job.todo.items():
        for b in blocks:
            names_by_block.setdefault(b.block, []).append(name)
    plan = plan_workers(ray, pending, config.workers, config.feed, len(names_by_block))
    summary.workers, summary.feed = plan.count, plan.feed
    concurrency = BLOCKS_IN_FLIGHT_PER_WORKER if plan.feed == "tasks" else 1
    # Ray restarts a lost worker where there is room; its calls are not retried there, because the feed gives a
    # lost worker's blocks to the workers left instead of waiting for resources that may have died with a node.
    actor_cls = ray.remote(BlockWorker).options(**plan.options, max_restarts=WORKER_RESTARTS, max_task_retries=0,
                                                max_concurrency=concurrency)
    shard_urls = {shard_name(url): url for url in index.urls}
    actors = [actor_cls.remote(store.path, pending, shard_urls, max_pixels=config.max_pixels,
                               threads=plan.threads, token=job.lock.token)
              for _ in range(plan.count)]
    preprocess_specs = {n: (s, fingerprints[n]) for n, s in pending.items()}
    cpus = int(alive_resources(ray).get("CPU", 1))
    warm = ray.remote(warm_task).options(num_cpus=1)
    warming = [warm.remote(preprocess_specs) for _ in range(cpus)] if plan.feed == "tasks" else []

    def check_worker(described: dict[str, dict]) -> None:
        for name, info in described.items():
            check_fingerprint(name, info["fingerprint"], fingerprints[name], where=f"on worker {info['host']}",
                              expected_by="the driver", error=JobError,
                              remedy="give every node the driver's weights and teacher code")

    ranges = {b.block: b for b in store.blocks()}
    firsts = stages.first_samples(index.table)
    lent = lending.lent_rows(job.lenders, firsts, job.todo, fingerprints)
    queue = deque(BlockJob(rows, names_by_block[rows.block.block])
                  for rows in stages.block_rows(firsts, [ranges[b] for b in sorted(names_by_block)], lent))
    blocks_done, halfway = 0, max(1, len(names_by_block) // 2)
    bar = tqdm(total=sum(q.rows.block.rows * len(q.names) for q in queue), desc="precompute", unit="row",
               disable=not job.progress, smoothing=0.1)

    def block_written(records: dict[str, BlockRecord]) -> None:
        nonlocal blocks_done
        for record in records.values():
            summary.blocks_computed += 1
            summary.rows_computed += record.rows - record.reused
            summary.rows_reused += record.reused
            summary.failures += len(record.failures)
            bar.update(record.rows)
        bar.set_postfix(failures=summary.failures)
        blocks_done += 1
        if blocks_done == 1:
            failpoint("first-block")
        if blocks_done == halfway:
            failpoint("mid-run")

    feed = Feed(ray, actors, plan, job.lock, check_worker, block_written)
    try:
        described = feed.first_answer()
        for name, info in described.items():
            if not job.present[name]:
                store.add_teacher(name, spec=specs[name].model_dump(mode="json"), fingerprint=fingerprints[name],
                                  target_shape=tuple(info["target_shape"]), storage=specs[name].storage(),
                                  rows_per_chunk=config.rows_per_chunk)
        ray.get(warming)
        compute_started = time.monotonic()
        if plan.feed == "inline":
            feed.inline(queue)
        else:
            feed.tasks(queue, store.path, preprocess_specs, shard_urls, config.max_pixels, cpus)
        summary.compute_seconds = time.monotonic() - compute_started
        summary.nodes = len(feed.nodes)
    except ray.exceptions.RayError as exc:
        raise JobError(f"precompute workers failed: {ray_cause(exc)}; rerun the same command to resume") from None
    finally:
        bar.close()
        feed.stop()


def _write_finish(store: TargetStore, index: ShardIndex, names: list[str]) -> None:
    """After the data: errors.parquet from every record, then each complete teacher's mean/std and flag."""
    # Found before any teacher ran, so no target row's: a cut shard (no sample), a sample whose text could not be
    # read, a later occurrence of a key.
    errors = [{"teacher": "", **e, "sample": e.get("row", -1), "row": -1} for e in index.shard_errors]
    keys = index.table.select(["shard", "key"])
    errors += [{"row": -1, "sample": sample, "shard": keys["shard"][sample].as_py(), "key": keys["key"][sample].as_py(),
                "teacher": "", "error": why} for sample, why in duplicate_rows(index.table).items()]
    for name in store.teacher_names():
        for record in store.read_records(name):
            errors.extend({**f, "teacher": f.get("teacher") or name} for f in record.failures)
    store.write_errors(errors)
    total = len(store.blocks())
    for name in names:
        records = store.read_records(name)
        if len(records) == total:
            store.mark_complete(name, _mean_std(records))
            failpoint("finish")  # errors.parquet written, some teachers complete and some not yet


def _mean_std(records: list[BlockRecord]) -> dict:
    """Merge the blocks' per-channel sums (in block order, so the result is the same on every run)."""
    count = sum(r.stats.count for r in records)
    if not count:
        return {}
    total = np.sum([r.stats.sum for r in records], axis=0)
    squares = np.sum([r.stats.sumsq for r in records], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return {"mean": [round(float(x), 6) for x in mean], "std": [round(float(x), 6) for x in std],
            "stats_count": count}
