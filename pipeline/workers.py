"""Ray scheduling of a precompute run: the `BlockWorker` actors that hold the teachers, how many a cluster takes
(`plan_workers`), and the `Feed` that moves blocks through the stages of pipeline/block_stages.py.

Two feeds (see `plan_workers`):

- tasks (the default with GPUs): prepare and write are Ray CPU tasks on every core of the cluster, and each
  device's worker only computes. At most `window` blocks are open at once (backpressure: Ray's object store
  holds the prepared inputs and computed targets of those blocks only), so the accelerators are fed while the
  CPUs work ahead of them.
- inline (the default without GPUs): each worker runs the three stages of its blocks in turn, one worker per
  group of cores, two blocks queued per worker.

Workers come and go. A worker takes blocks once its teachers have loaded and its fingerprints match the driver's.
A block whose worker, task process or node is lost goes back to the queue for the workers left; Ray restarts a
lost worker where the cluster still has room, and it takes blocks again once it answers. So a run never waits on
resources that died with a node: it ends with "rerun" only when no worker is left, no node left can hold one, or
one block keeps failing.
"""

from __future__ import annotations

import ctypes
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from pipeline import block_stages as stages
from pipeline.data.errors import JobError
from pipeline.data.store import BlockRecord, TargetStore

BLOCKS_IN_FLIGHT_PER_WORKER = 2
HEARTBEAT_SECONDS = 10.0
WARM_HOLD_SECONDS = 0.5
WORKER_RESTARTS = 3
# A block is lost with its worker or node at most this often before the run gives up on it.
MAX_BLOCK_ATTEMPTS = 4
# How long a lost worker is waited for between asking whether it is back; then it is given up.
PROBE_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)


class BlockWorker:
    """Holds the teachers of one job (a Ray actor, one per device). `compute` is the accelerator stage of
    pipeline/block_stages.py; `process` runs all three stages of a block in turn (the CPU-only feed)."""

    def __init__(self, store_path: str, specs: dict, shard_urls: dict[str, str], *, max_pixels: int, threads: int,
                 token: str | None = None):
        import ray
        import torch

        import teachers

        torch.set_num_threads(max(1, threads))
        _reuse_freed_block_memory()
        self.store = TargetStore(store_path)
        self.token = token  # the run's lock token: checked before every write (see pipeline/data/store_lock.py)
        self.shard_urls = shard_urls
        self.max_pixels = max_pixels
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.node = ray.get_runtime_context().get_node_id()
        self.teachers = {name: teachers.create(spec, device=device) for name, spec in specs.items()}
        self.storages = {name: t.spec.storage() for name, t in self.teachers.items()}
        # With the tasks feed this actor runs BLOCKS_IN_FLIGHT_PER_WORKER `compute` calls in threads: one block's
        # outputs are copied out while the next block's forwards run. Forwards take turns (TF32 flags are
        # process-wide, and a device runs one batch at a time anyway).
        self.device_lock = threading.Lock()

    def describe(self) -> dict[str, dict]:
        return {
            name: {"target_shape": list(t.target_shape), "fingerprint": t.fingerprint, "host": socket.gethostname(),
                   "node": self.node}
            for name, t in self.teachers.items()
        }

    def compute(self, prepared: stages.PreparedBlock) -> stages.ComputedBlock:
        return stages.compute(self.teachers, prepared, self.storages, self.device_lock)

    def process(self, rows: stages.BlockRows, names: list[str]) -> dict[str, BlockRecord]:
        """Prepare, compute and write `names` for one block here; return each teacher's completion record."""
        preprocessors = {n: (self.teachers[n].preprocess, self.teachers[n].spec.batch_size) for n in names}
        prepared = stages.prepare(rows, preprocessors, self.shard_urls, self.max_pixels)
        return stages.write(self.store, self.compute(prepared), token=self.token,
                            fingerprints={n: self.teachers[n].fingerprint for n in names},
                            batch_sizes={n: self.teachers[n].spec.batch_size for n in names})


def _reuse_freed_block_memory() -> None:
    """Let this process reuse a freed block's arrays for the next block (glibc). By default glibc maps every
    allocation over 32 MB afresh and unmaps it when freed, so each block's arrays (57 MB for seg's targets at the
    paper's shape) come as new pages that the kernel zeroes and faults in while the outputs are copied into them:
    ~0.3 ms of a core per row, about as much as the copy itself. The price: the process keeps its peak memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its allocator's own policy stands
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


# Built once per worker process and teacher (keyed by its fingerprint): Ray reuses task processes.
_PREPROCESSORS: dict[str, object] = {}


def _preprocessors(specs: dict[str, tuple]) -> dict[str, tuple]:
    """{name: (preprocessor, batch_size)} for {name: (spec, fingerprint)}: only the teachers' preprocessing, built
    from the model's config files (never the weights), once per process."""
    import teachers

    preprocessors = {}
    for name, (spec, fingerprint) in specs.items():
        if fingerprint not in _PREPROCESSORS:
            _PREPROCESSORS[fingerprint] = teachers.get_teacher_class(spec.kind).build_preprocessor(spec)
        preprocessors[name] = (_PREPROCESSORS[fingerprint], spec.batch_size)
    return preprocessors


def _prepare_task(rows: stages.BlockRows, specs: dict[str, tuple], shard_urls: dict[str, str],
                  max_pixels: int) -> stages.PreparedBlock:
    """The CPU stage as a Ray task."""
    return stages.prepare(rows, _preprocessors(specs), shard_urls, max_pixels)


def warm_task(specs: dict[str, tuple]) -> None:
    """Import what the stages use and build the preprocessors in one task process while the devices' workers load
    their teachers, so that the first blocks do not wait for it; held briefly so that each of the warm tasks
    submitted together gets a process of its own."""
    _preprocessors(specs)
    time.sleep(WARM_HOLD_SECONDS)


def _write_task(store_path: str, computed: stages.ComputedBlock, token: str, fingerprints: dict[str, str],
                batch_sizes: dict[str, int]) -> dict[str, BlockRecord]:
    """The write stage as a Ray task."""
    return stages.write(TargetStore(store_path), computed, token=token, fingerprints=fingerprints,
                        batch_sizes=batch_sizes)


@dataclass(frozen=True)
class WorkerPlan:
    """How a run uses the cluster: `count` BlockWorker actors with Ray `options`, torch `threads` each, and the feed:
    "inline" (each worker prepares, computes and writes its blocks) or "tasks" (CPU tasks on every core prepare
    and write; the workers, one per device, only compute)."""

    count: int
    options: dict
    threads: int
    feed: str


def alive_resources(ray) -> dict[str, float]:
    """The resources of the nodes alive now; a node lost a moment ago may still be listed by
    `ray.cluster_resources()`."""
    totals: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in node.get("Resources", {}).items():
                totals[name] = totals.get(name, 0.0) + amount
    return totals


def plan_workers(ray, pending: dict, workers: int | None, feed: str, num_blocks: int) -> WorkerPlan:
    """Size the run to the cluster alive now: `pending` {teacher: spec}, `workers` the user's count or None,
    `feed` "auto", "inline" or "tasks"."""
    resources = alive_resources(ray)
    cpus = int(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    per_worker_gpus = sum(spec.num_gpus for spec in pending.values()) if gpus else 0.0
    feed = feed if feed != "auto" else ("tasks" if per_worker_gpus else "inline")
    if per_worker_gpus:
        count = workers or max(1, int(gpus // per_worker_gpus))
        # With the tasks feed a device's worker only launches its forwards: every core is left to the CPU tasks.
        options, threads = {"num_cpus": 0 if feed == "tasks" else 1, "num_gpus": per_worker_gpus}, 1
    elif feed == "tasks":  # no device: one core per worker computes, the others prepare and write
        count, options, threads = workers or 1, {"num_cpus": 1}, 1
    else:
        count = workers or cpus
        threads = max(1, cpus // count)
        options = {"num_cpus": threads}
    return WorkerPlan(max(1, min(count, num_blocks)), options, threads, feed)


@dataclass
class BlockJob:
    """One block and the teachers it still needs; `attempts` counts the times it was lost with a worker or node."""

    rows: stages.BlockRows
    names: list[str]
    attempts: int = 0


def _lost_errors(ray) -> tuple[type[BaseException], ...]:
    """Ray's errors for work lost with a process or node, as opposed to an exception raised by the work itself."""
    errors = ray.exceptions
    return (errors.RayActorError, errors.WorkerCrashedError, errors.ObjectLostError, errors.NodeDiedError)


def ray_cause(exc: BaseException) -> str:
    """The user's exception inside a Ray error, in one line."""
    cause = getattr(exc, "cause", None) or exc
    return " ".join(f"{type(cause).__name__}: {cause}".split())[:500]


class Feed:
    """Moves blocks through the stages with Ray, a bounded number at a time (the backpressure), calling `finished`
    with each block's records; keeps the lock's heartbeat while it waits.

    `check_worker` gets each worker's `describe()` when it first answers and raises if its teachers are not the
    driver's. Only workers that answered take blocks; the others are asked again after each loss, with backoff."""

    def __init__(self, ray, actors: list, plan: WorkerPlan, lock, check_worker: Callable[[dict], None],
                 finished: Callable[[dict[str, BlockRecord]], None]):
        self.ray, self.plan, self.lock = ray, plan, lock
        self.check_worker, self.finished = check_worker, finished
        self.lost = _lost_errors(ray)
        self.actors = actors
        self.load: dict[int, int] = {}  # id(actor) -> blocks in flight, for the workers that take blocks now
        self.probes: dict = {actor.describe.remote(): (actor, 0) for actor in actors}
        self.retries: list[tuple[float, object, int]] = []  # (when, actor, probes so far) for lost workers
        self.nodes: set[str] = set()  # the nodes of the workers that answered
        self.described: dict[str, dict] = {}  # the last answer
        self.last_loss: BaseException | None = None
        self.last_beat = time.monotonic()

    def first_answer(self) -> dict[str, dict]:
        """Wait for the first worker whose teachers loaded, then as long again for the others (workers load in
        parallel, so the first blocks are shared instead of all going to the quickest); return its `describe()`.
        A worker that takes longer, or never answers (its node died), joins when it answers."""
        started = time.monotonic()
        while not self.load:
            self._check_left()
            self._wait([])
        deadline = time.monotonic() + (time.monotonic() - started)
        while self.probes and (left := deadline - time.monotonic()) > 0:
            self._wait([], limit=left)
        return self.described

    def stop(self) -> None:
        """End every worker now: they hold devices and memory, and a lost run's worker must not write on."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)

    # ---- workers ------------------------------------------------------------------------------------------------

    def _ready(self) -> list:
        return [actor for actor in self.actors if id(actor) in self.load]

    def _answered(self, ref) -> None:
        actor, probes = self.probes.pop(ref)
        try:
            described = self.ray.get(ref)
        except self.lost as exc:
            if getattr(exc, "actor_init_failed", False):
                raise JobError(f"teachers failed to load on a worker: {ray_cause(exc)}") from None
            self._lose(actor, exc, probes)
            return
        self.check_worker(described)
        self.described = described
        self.nodes.update(info["node"] for info in described.values())
        self.load[id(actor)] = 0

    def _lose(self, actor, exc: BaseException, probes: int = 0) -> None:
        """A worker's call failed because it, its process or its node is gone: it takes no block until it answers
        again, asked after a backoff, and is given up after the last one."""
        self.last_loss = exc
        self.load.pop(id(actor), None)
        asked = [a for a, _ in self.probes.values()] + [a for _, a, _ in self.retries]
        if probes < len(PROBE_BACKOFF_SECONDS) and not any(a is actor for a in asked):
            self.retries.append((time.monotonic() + PROBE_BACKOFF_SECONDS[probes], actor, probes + 1))

    def _check_left(self) -> None:
        """Fail instead of waiting for workers that cannot come back."""
        if not self.load and not self.probes and not self.retries:
            raise JobError(f"every worker was lost (the last: {ray_cause(self.last_loss)}); "
                           "rerun the same command to resume")
        if not self.load and not self._placeable():
            raise JobError(f"no node left alive can hold a worker ({self.plan.options}); rerun the same command "
                           "to resume once the cluster has one")

    def _placeable(self) -> bool:
        needs = {"CPU": self.plan.options.get("num_cpus", 0), "GPU": self.plan.options.get("num_gpus", 0)}
        return any(node.get("Alive") and all(node.get("Resources", {}).get(k, 0.0) >= v for k, v in needs.items())
                   for node in self.ray.nodes())

    def _wait(self, refs: list, limit: float = HEARTBEAT_SECONDS) -> list:
        """The work refs among `refs` that finished within `limit` seconds (at most HEARTBEAT_SECONDS); workers'
        answers are taken here."""
        now = time.monotonic()
        for when, actor, probes in [r for r in self.retries if r[0] <= now]:
            self.retries.remove((when, actor, probes))
            self.probes[actor.describe.remote()] = (actor, probes)
        timeout = min([limit, HEARTBEAT_SECONDS, *(max(0.0, when - now) for when, _, _ in self.retries)])
        waiting = [*refs, *self.probes]
        if waiting:
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=timeout)
        else:  # every worker lost and none asked yet: wait for the next one's turn
            done = []
            time.sleep(timeout)
        if time.monotonic() - self.last_beat > HEARTBEAT_SECONDS / 2:
            self.lock.heartbeat()
            self.last_beat = time.monotonic()
        work = []
        for ref in done:
            if ref in self.probes:
                self._answered(ref)
            else:
                work.append(ref)
        return work

    def _requeue(self, queue: deque, job: BlockJob, exc: BaseException) -> None:
        job.attempts += 1
        if job.attempts >= MAX_BLOCK_ATTEMPTS:
            raise JobError(f"block {job.rows.block.block} was lost {job.attempts} times (the last: {ray_cause(exc)}); "
                           "rerun the same command to resume")
        self.last_loss = exc
        queue.appendleft(job)

    # ---- feeds --------------------------------------------------------------------------------------------------

    def inline(self, queue: deque[BlockJob]) -> None:
        """Each worker prepares, computes and writes whole blocks, with BLOCKS_IN_FLIGHT_PER_WORKER queued."""
        in_flight: dict = {}  # ref -> (actor, job)
        while queue or in_flight:
            for actor in self._ready():
                while queue and self.load[id(actor)] < BLOCKS_IN_FLIGHT_PER_WORKER:
                    job = queue.popleft()
                    in_flight[actor.process.remote(job.rows, job.names)] = (actor, job)
                    self.load[id(actor)] += 1
            if not in_flight:
                self._check_left()
            for ref in self._wait(list(in_flight)):
                actor, job = in_flight.pop(ref)
                if id(actor) in self.load:
                    self.load[id(actor)] -= 1
                try:
                    records = self.ray.get(ref)
                except self.lost as exc:
                    self._lose(actor, exc)
                    self._requeue(queue, job, exc)
                    continue
                self.finished(records)

    def tasks(self, queue: deque[BlockJob], store_path: str, teachers: dict[str, tuple], shard_urls: dict[str, str],
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
        preparing: dict = {}  # ref -> job
        ready: deque = deque()  # (prepared ref, job)
        computing: dict = {}  # ref -> (actor, job)
        writing: dict = {}  # ref -> (actor that computed it, job)
        open_blocks = 0
        while queue or preparing or ready or computing or writing:
            while queue and open_blocks < window:
                job = queue.popleft()
                subset = {n: teachers[n] for n in job.names}
                ref = prepare.remote(job.rows, subset if len(subset) < len(teachers) else teachers_ref, urls_ref,
                                     max_pixels)
                preparing[ref] = job
                open_blocks += 1
            for actor in self._ready():
                while ready and self.load[id(actor)] < BLOCKS_IN_FLIGHT_PER_WORKER:
                    prepared, job = ready.popleft()
                    computing[actor.compute.remote(prepared)] = (actor, job)
                    self.load[id(actor)] += 1
            if not (preparing or computing or writing):
                self._check_left()
            for ref in self._wait([*preparing, *computing, *writing]):
                if ref in preparing:
                    ready.append((ref, preparing.pop(ref)))
                elif ref in computing:
                    # Not fetched here: the write task takes the computed block, or the error that replaced it.
                    actor, job = computing.pop(ref)
                    if id(actor) in self.load:
                        self.load[id(actor)] -= 1
                    batch_sizes = {n: teachers[n][0].batch_size for n in job.names}
                    writing[write.remote(store_path, ref, self.lock.token,
                                         {n: fingerprints[n] for n in job.names}, batch_sizes)] = (actor, job)
                else:
                    actor, job = writing.pop(ref)
                    try:
                        records = ray.get(ref)
                    except self.lost as exc:
                        if isinstance(exc, ray.exceptions.RayActorError):
                            self._lose(actor, exc)
                        open_blocks -= 1
                        self._requeue(queue, job, exc)
                        continue
                    open_blocks -= 1
                    self.finished(records)
