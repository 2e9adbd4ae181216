"""Host budget per row, the feed-cost ratio R and the device process's ceiling P10 (issue 22), on a machine
without a device.

The three paper teachers are simulated accelerators (benchmarks/simulated_teacher.py, set up as in feed.py):
their real CPU preprocessing at the paper's sizes, a forward that sleeps without holding the GIL, and float16
targets of the paper's shapes (depth [576, 1024], seg [576, 1536], gen [1, 1024]), written and compressed as real
ones are. Shards hold LLaVA-like 300-640 px JPEGs cut from the photos bundled with scikit-image.
Every figure is in ms of ONE core per row (a row: one image through all three teachers).

1. The budget: each stage of a block timed in this process, pinned to one core, torch on one thread, by calling
   the project's own functions (pipeline/block_stages.py, pipeline/data/store.py) on real blocks, so that the
   harness goes on measuring the same stages after they change. Where several stages live in one function it
   calls the pieces that function calls, and checks their sum against the whole (the report's "check" table):
       read, sha1, decode     `read_images`: per shard one fsspec open, per row `read_member_bytes`, the sha1 of
                              `read_indexed_image`, `decode_rgb`
       preprocess <teacher>   `prepare_inputs` with the teacher's `preprocess` and batch size
       device process         `compute` with a near-instant device, less its sleep: everything the process that
                              drives a device does outside the device's own work. Split into the forwards
                              (`device_forward`: queuing the device's work) and the rest of `run_inputs` (the
                              stored bytes reaching the host, placing the rows). The device's work after the
                              forward, `finish` (the check, the float64 sums and `Storage.encode`), is the
                              simulated device's: it runs once per batch size and its result is reused, as a device
                              that finishes in no time (benchmarks/simulated_teacher.py). The table shows what
                              `finish` costs when this CPU runs it, for scale, outside every sum
       compress               the array's zstd codec (numcodecs, as zarr calls it) on every inner chunk
       digest                 `block_digest` of the stored arrays
       fsync                  every `os.fsync` inside `write_encoded` (the block's files and their folders)
       write                  `write_encoded` less compress, digest and fsync (which it includes): building and
                              writing the block's files
       record                 `TargetStore.write_record` of the block's real record (an atomic write with fsync)
       Ray transfer           `ray.put` of a prepared and of a computed block here, `ray.get` in a Ray task:
                              what the tasks feed moves between processes (the inline job below moves neither)
       Ray's own overhead     the inline job's all-in figure less the sum of the in-process stages above; split
                              by the job's own block records (their `seconds`) into the stages running slower in
                              the job's workers, and the time outside the stages (Ray's calls, waits, the tail)
2. R = all-in host ms per row / (decode + preprocessing ms per row). All-in is a real `run_precompute` job with
   `--feed inline`, one worker per core, the device near-instant (0.01 ms per image): compute_seconds x cores /
   rows (compute_seconds runs from every worker holding its teachers to the last record). The denominator is the
   same round's budget, on the same images. Goal <= 1.3.
3. P10 = rows/s through one device worker fed blocks prepared in advance / 1000 rows/s. A `BlockWorker` holding
   the three teachers with the simulated device at 1 ms per image (0.2 depth, 0.6 seg, 0.2 gen) is built in this
   process and computes the prepared blocks in BLOCKS_IN_FLIGHT_PER_WORKER threads on one core (a node's other
   cores prepare and write), as its Ray actor does in the tasks feed: one block's host work overlaps the other's
   forwards. The write runs in CPU tasks elsewhere and is not its work. Device time without a device: the
   simulated forward queues 1 ms per image on a simulated stream, a thread sleeping without the GIL, and returns,
   as a CUDA forward returns once its kernels are queued; the host waits for the stream when it needs the outputs.
   So 1 ms per image is the device's time and everything else this process spends is host work; at 1000 rows/s
   the device would be busy all the time. `finish` is the device's work too (see "device process" above). Goal >= 0.8.

The three measurements are variants of interleaved rounds (benchmarks/measure.py); each figure is the median
over rounds with the min-max.

    python benchmarks/host_budget.py [--rows 256] [--rows-per-block 32] [--rounds 5] [--out runs/bench-host]
                                     [--quiet SECONDS]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import os
import platform
import shutil
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.simulated_teacher` must import here and in Ray's workers

from benchmarks.feed import CPU_ONLY_MS, build_assets, write_llava_like_shards, write_manifest  # noqa: E402
from benchmarks.measure import Spread, interleave, ratio  # noqa: E402
from benchmarks.simulated_teacher import wait_for_stream  # noqa: E402

DEVICE_MS = 1.0  # P10's simulated device: ms per image for the three teachers together
R_GOAL, P10_GOAL = 1.3, 0.8
TEACHERS = ("depth", "seg", "gen")


class Clock:
    """Seconds of wall and CPU time (all threads of this process) per stage, summed over calls."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def time(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[stage] += time.perf_counter() - wall
        self.cpu[stage] += time.process_time() - cpu

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] += wall
        self.cpu[stage] += cpu


@dataclass
class Setup:
    """What every round shares: the shards and their index, the teachers loaded once, the blocks prepared once
    (P10's input), P10's worker and the manifests."""

    shards: Path
    index: object  # pipeline.data.index.ShardIndex
    rows_per_block: int
    teachers: dict  # name -> near-instant simulated teacher
    blocks: list = field(default_factory=list)  # BlockRows of every block
    prepared: list = field(default_factory=list)  # PreparedBlock of every block
    p10_worker: object = None  # BlockWorker with the 1 ms device
    cpu_manifest: Path | None = None
    work: Path | None = None


# ---- the budget ----------------------------------------------------------------------------------------------------


def new_store(setup: Setup, path: Path):
    """An empty store for the shards with a group per teacher, as a precompute run makes it."""
    from pipeline.data.store import DEFAULT_ROWS_PER_CHUNK, TargetStore

    shutil.rmtree(path, ignore_errors=True)
    store = TargetStore(str(path))
    store.create(setup.index.table, setup.index.fingerprint, rows_per_block=setup.rows_per_block,
                 shards=setup.index.shards)
    for name, teacher in setup.teachers.items():
        store.add_teacher(name, spec=teacher.spec.model_dump(mode="json"), fingerprint=teacher.fingerprint,
                          target_shape=teacher.target_shape, storage=teacher.spec.storage(),
                          rows_per_chunk=DEFAULT_ROWS_PER_CHUNK)
    return store


def time_read(clock: Clock, rows, shard_urls: dict[str, str]) -> list:
    """The pieces of `block_stages.read_images` for a block of good rows: its decoded images, in row order."""
    import fsspec

    from pipeline.data.images import DEFAULT_MAX_PIXELS, decode_rgb
    from pipeline.data.shards import read_member_bytes

    by_shard: dict[str, list[int]] = {}
    for row in range(rows.block.start, rows.block.stop):
        by_shard.setdefault(rows.get("shard", row), []).append(row)
    images = []
    for shard, shard_rows in by_shard.items():
        with clock.time("read"):
            f = fsspec.open(shard_urls[shard], "rb").open()
        try:
            for row in shard_rows:
                with clock.time("read"):
                    data = read_member_bytes(f, rows.get("image_offset", row), rows.get("image_size", row))
                with clock.time("sha1"):
                    if hashlib.sha1(data).hexdigest() != rows.get("image_sha1", row):
                        raise RuntimeError(f"row {row}: sha1 differs from the index")
                with clock.time("decode"):
                    images.append(decode_rgb(data, max_pixels=DEFAULT_MAX_PIXELS))
        finally:
            with clock.time("read"):
                f.close()
    return images


def time_compute(clock: Clock, setup: Setup, prepared):
    """`compute` whole with the near-instant device, less the device's sleep, and its pieces called apart on the
    same batches: the forwards (`device_forward`, which queue the device's work and return), and the rest.
    `finish`, which the simulated device does on its side, is timed apart as this CPU runs it, for scale. Returns
    the computed block."""
    import torch

    from pipeline import block_stages as stages
    from pipeline.data.finishing import finish

    storages = {name: t.spec.storage() for name, t in setup.teachers.items()}
    sleep = sum(t.spec.ms_per_image * len(prepared.decoded[n]) for n, t in setup.teachers.items()) / 1000.0
    wall, cpu = time.perf_counter(), time.process_time()
    computed = stages.compute(setup.teachers, prepared, storages)
    whole_wall, whole_cpu = time.perf_counter() - wall - sleep, time.process_time() - cpu
    pieces = Clock()
    for name, batches in prepared.inputs.items():
        teacher = setup.teachers[name]
        for positions, batch in batches:
            with pieces.time(FORWARD):
                out = teacher.device_forward(stages._as_torch(batch))
            wait_for_stream()  # the device's time, which is not the host's
            with pieces.time(FINISH):
                finish(out, storages[name])
            with torch.inference_mode(), clock.time(ENCODE):
                storages[name].encode(out.to(torch.float32))
    for stage in (FORWARD, FINISH):
        clock.add(stage, pieces.wall[stage], pieces.cpu[stage])
    clock.add(REST, whole_wall - pieces.wall[FORWARD], whole_cpu - pieces.cpu[FORWARD])
    return computed


def inner_chunks(array, stored):
    """`stored` cut into the inner chunks of the sharded zarr `array`, as C-order bytes, and the zstd codec that
    compresses them (numcodecs, configured as the array's own `ZstdCodec`)."""
    from numcodecs import Zstd
    from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec

    codecs = array.metadata.codecs
    inner = codecs[0].codecs if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else codecs
    kinds = [type(c) for c in inner]
    if kinds != [BytesCodec, ZstdCodec]:
        raise RuntimeError(f"{array.path} has codecs {kinds}; teach `inner_chunks` the new chunk encoding")
    zstd = Zstd(level=inner[1].level, checksum=inner[1].checksum)
    step = (codecs[0].chunk_shape if isinstance(codecs[0], ShardingCodec) else array.chunks)[0]
    return [stored[i : i + step].tobytes() for i in range(0, len(stored), step)], zstd


@contextlib.contextmanager
def fsyncs_timed(clock: Clock, stage: str):
    """Every `os.fsync` meanwhile, wherever the store calls it, timed into `stage`: the store makes its files
    durable inside `write_encoded`, so this is how its fsyncs are told from its writes."""
    real = os.fsync

    def timed(fd: int) -> None:
        with clock.time(stage):
            real(fd)

    os.fsync = timed
    try:
        yield
    finally:
        os.fsync = real


def time_write(clock: Clock, setup: Setup, store, whole_store, computed) -> None:
    """`block_stages.write` whole into `whole_store`; then, into `store`, the two calls it makes for each teacher:
    `write_encoded` (the block's files, durable, and `block_digest`) and `write_record`. Compression and the digest
    happen inside `write_encoded`: they are timed apart on the same arrays and taken out of its time with its
    fsyncs, so that the stages add up to the whole. (`check_fence` is no work without a run's token.)"""
    from pipeline import block_stages as stages
    from pipeline.data.store import block_digest

    names = list(computed.teachers)
    fingerprints = {n: setup.teachers[n].fingerprint for n in names}
    batch_sizes = {n: setup.teachers[n].spec.batch_size for n in names}
    with clock.time("whole: write"):
        records = stages.write(whole_store, computed, token=None, fingerprints=fingerprints, batch_sizes=batch_sizes)
    block = computed.rows.block
    for name, done in computed.teachers.items():
        out = done.outputs
        group = store.group[name]
        arrays = {"target": out.stored, "valid": out.valid, **({"scale": out.scale} if out.scale is not None else {})}
        for array, values in arrays.items():
            chunks, zstd = inner_chunks(group[array], values)
            with clock.time("compress"):
                for chunk in chunks:
                    zstd.encode(chunk)
        with clock.time("digest (block_digest)"):
            block_digest(out.stored, out.scale, out.valid)
        with fsyncs_timed(clock, "fsync"), clock.time(WRITE_WHOLE):
            store.write_encoded(name, block, out.stored, out.scale, out.valid)
        with clock.time("record"):
            store.write_record(records[name])


def _timed_get(boxed: list) -> tuple[float, float]:
    """A Ray task: seconds of wall and CPU time to get (and deserialise) the object of `boxed[0]` here."""
    import ray

    wall, cpu = time.perf_counter(), time.process_time()
    ray.get(boxed[0])
    return time.perf_counter() - wall, time.process_time() - cpu


def time_transfer(clock: Clock, getter, stage: str, value) -> None:
    import ray

    with clock.time(stage):
        ref = ray.put(value)
    wall, cpu = ray.get(getter.remote([ref]))
    clock.add(stage, wall, cpu)
    del ref


FORWARD = "device process: forward calls (device_forward, queuing the device's work)"
FINISH = "device work, not summed: finish (check, sums, encode) as this CPU runs it"
ENCODE = "of which encode (Storage.encode)"
REST = "device process: rest of run_inputs (the stored bytes reaching the host, placing the rows)"
WRITE_WHOLE = "write_encoded, whole"
WRITE = "write (files, less compress, fsync and digest)"
STAGES = ("read", "sha1", "decode", *(f"preprocess {n}" for n in TEACHERS), FORWARD, REST, "compress", WRITE,
          "fsync", "digest (block_digest)", "record")
# Finishing is the device's work (encoding part of it): shown after the device process's host work, never summed.
DISPLAYED = tuple(x for s in STAGES for x in ((s, FINISH, ENCODE) if s == REST else (s,)))
PREPROCESS = ("decode", *(f"preprocess {n}" for n in TEACHERS))
TRANSFERS = ("Ray transfer: prepared block (put + get)", "Ray transfer: computed block (put + get)")


def run_budget(setup: Setup, getter, round_: int) -> Clock:
    """One pass over every block, each stage timed; returns seconds per stage for all blocks."""
    from pipeline import block_stages as stages
    from pipeline.data.images import DEFAULT_MAX_PIXELS

    clock = Clock()
    shard_urls = {Path(u).name: u for u in setup.index.urls}
    store = new_store(setup, setup.work / f"budget-{round_}")
    whole_store = new_store(setup, setup.work / f"budget-whole-{round_}")
    for rows in setup.blocks:
        images = time_read(clock, rows, shard_urls)
        for name, teacher in setup.teachers.items():
            with clock.time(f"preprocess {name}"):
                stages.prepare_inputs(teacher.preprocess, images, teacher.spec.batch_size)
        preprocessors = {n: (t.preprocess, t.spec.batch_size) for n, t in setup.teachers.items()}
        with clock.time("whole: prepare"):
            prepared = stages.prepare(rows, preprocessors, shard_urls, DEFAULT_MAX_PIXELS)
        computed = time_compute(clock, setup, prepared)
        time_write(clock, setup, store, whole_store, computed)
        time_transfer(clock, getter, TRANSFERS[0], prepared)
        time_transfer(clock, getter, TRANSFERS[1], computed)
    for kind in (clock.wall, clock.cpu):
        kind[WRITE] = kind.pop(WRITE_WHOLE) - kind["compress"] - kind["fsync"] - kind["digest (block_digest)"]
    shutil.rmtree(store.path)
    shutil.rmtree(whole_store.path)
    return clock


# ---- the job (R) and the device worker (P10) -----------------------------------------------------------------------


def run_job(setup: Setup, cores: int, round_: int) -> tuple[float, float]:
    """Host ms per row of an inline job with one worker per core and a near-instant device: all-in, and inside
    the workers' stages (the `seconds` of the blocks' records: each teacher's compute and write, and its share of
    the block's prepare)."""
    from pipeline.data.store import TargetStore
    from pipeline.precompute import PrecomputeConfig, run_precompute

    store = setup.work / f"job-{round_}"
    config = PrecomputeConfig(feed="inline", workers=cores, rows_per_block=setup.rows_per_block)
    summary = run_precompute(str(setup.shards), str(setup.cpu_manifest), str(store), config, progress=False)
    written = TargetStore(str(store))
    staged = sum(r.seconds for name in written.teacher_names() for r in written.read_records(name))
    shutil.rmtree(store)
    return summary.compute_seconds * cores / summary.num_rows * 1000.0, staged / summary.num_rows * 1000.0


def run_p10(setup: Setup) -> float:
    """Rows/s of one device worker computing the prepared blocks, as its actor does in the tasks feed."""
    from pipeline.workers import BLOCKS_IN_FLIGHT_PER_WORKER

    rows = sum(p.rows.block.rows for p in setup.prepared)
    started = time.perf_counter()
    with ThreadPoolExecutor(BLOCKS_IN_FLIGHT_PER_WORKER) as pool:
        list(pool.map(setup.p10_worker.compute, setup.prepared))
    return rows / (time.perf_counter() - started)


def build_setup(out: Path, rows: int, rows_per_block: int) -> Setup:
    import teachers
    from pipeline import block_stages as stages
    from pipeline.data.images import DEFAULT_MAX_PIXELS
    from pipeline.data.index import ImageCounts, assign_target_rows, build_index
    from pipeline.workers import BlockWorker

    shards = write_llava_like_shards(out / "shards", rows)
    imitated = build_assets(out / "assets")
    cpu_manifest = write_manifest(out / "cpu-only.yaml", imitated, CPU_ONLY_MS, gpu=False)
    device_manifest = write_manifest(out / f"sim-{DEVICE_MS:g}ms.yaml", imitated, DEVICE_MS, gpu=False)
    index = build_index(str(shards), progress=False)
    index = replace(index, table=assign_target_rows(index.table, None, rows_per_block))
    specs = dict(teachers.load_manifest(cpu_manifest).teachers)
    setup = Setup(shards, index, rows_per_block, {n: teachers.create(s) for n, s in specs.items()},
                  cpu_manifest=cpu_manifest, work=out / "work")
    setup.work.mkdir(parents=True)
    counts = ImageCounts.of(index.table)
    if counts.images != counts.samples:
        raise RuntimeError(f"the benchmark's shards hold {counts.samples} samples but {counts.images} distinct "
                           "images: every sample must be an image of its own to compute")
    store = new_store(setup, setup.work / "blocks")
    setup.blocks = stages.block_rows(stages.first_samples(index.table), store.blocks())
    shard_urls = {Path(u).name: u for u in index.urls}
    preprocessors = {n: (t.preprocess, t.spec.batch_size) for n, t in setup.teachers.items()}
    setup.prepared = [stages.prepare(b, preprocessors, shard_urls, DEFAULT_MAX_PIXELS) for b in setup.blocks]
    device_specs = dict(teachers.load_manifest(device_manifest).teachers)
    setup.p10_worker = BlockWorker(str(setup.work / "blocks"), device_specs, shard_urls, max_pixels=DEFAULT_MAX_PIXELS,
                                   threads=1)
    return setup


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (Linux /proc/stat, less idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class OurCpu(threading.Thread):
    """CPU seconds that this process and its descendants use while it runs, polled every `every` seconds: a
    process that ends meanwhile (a Ray worker killed at the end of a job) counts as last seen, since its time
    need not reach any parent that is ours."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.stopped = every, threading.Event()
        self.first: dict[tuple, float] = {}
        self.last: dict[tuple, float] = {}
        self.baseline = True

    def poll(self) -> None:
        import psutil

        me = psutil.Process()
        for process in (me, *me.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                key = (process.pid, process.create_time())
                times = process.cpu_times()
                self.last[key] = times.user + times.system
                # The processes of the first poll count from then on; those that start later count whole.
                self.first.setdefault(key, self.last[key] if self.baseline else 0.0)
        self.baseline = False

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.poll()

    def seconds(self) -> float:
        self.stopped.set()
        self.join()
        self.poll()
        return sum(self.last[key] - self.first.get(key, 0.0) for key in self.last)


class Quiet:
    """On a machine shared with other work: wait (at most `limit` seconds) until nothing else has run for a
    second before each variant, and measure a variant again (at most `tries` times) when other processes used
    more than `share` of a core while it ran. A variant measured while others run measures them too."""

    def __init__(self, limit: float, tries: int = 4, share: float = 0.1):
        self.limit, self.tries, self.share = limit, tries, share

    @staticmethod
    def foreign(run, *args):
        """(run(*args), cores that other processes used meanwhile)."""
        ours = OurCpu()
        ours.poll()
        ours.start()
        machine, started = machine_busy(), time.perf_counter()
        value = run(*args)
        machine, elapsed = machine_busy() - machine, time.perf_counter() - started
        return value, (machine - ours.seconds()) / elapsed

    def measure(self, run, *args):
        started = time.perf_counter()
        while time.perf_counter() - started < self.limit and self.foreign(time.sleep, 1.0)[1] > self.share:
            pass
        for _ in range(self.tries):
            value, others = self.foreign(run, *args)
            if others <= self.share:
                break
            print(f"  (other processes used {others:.2f} cores meanwhile: measured again)", flush=True)
        return value


# ---- report ------------------------------------------------------------------------------------------------------


def per_row(rounds: list[Clock], stage: str, rows: int, kind: str = "wall") -> Spread:
    return Spread.of([getattr(c, kind)[stage] * 1000.0 / rows for c in rounds])


def report(rounds: list[Clock], job_ms: list[float], staged_ms: list[float], p10_rates: list[float], rows: int, args,
           load: tuple[float, float], seconds: float) -> str:
    import torch

    def row_sum(clock: Clock, stages: tuple[str, ...], kind: str = "wall") -> float:
        return sum(getattr(clock, kind)[s] for s in stages) * 1000.0 / rows

    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}; load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f}; "
             f"{seconds:.0f} s in all",
             f"{rows} rows of 300-640 px JPEGs, blocks of {args.rows_per_block}, {args.rounds} interleaved rounds"
             f"{f', --quiet {args.quiet:g}' if args.quiet else ''}; median [min-max] over rounds", "",
             "| stage | ms of one core per row (wall) | CPU ms per row (all threads) |", "|---|---|---|"]
    for stage in DISPLAYED:
        lines.append(f"| {stage} | {per_row(rounds, stage, rows):.2f} | {per_row(rounds, stage, rows, 'cpu'):.2f} |")
    stages_sum = [row_sum(c, STAGES) for c in rounds]
    overhead = [j - s for j, s in zip(job_ms, stages_sum)]
    lines += [f"| Ray's own overhead (inline job less the stages above) | {Spread.of(overhead):.2f} | |",
              f"| of which the stages ran slower in the job's workers (their records' seconds less the stages above) "
              f"| {Spread.of([j - s for j, s in zip(staged_ms, stages_sum)]):.2f} | |",
              f"| of which outside the workers' stages (Ray calls, waits, the last block's tail) "
              f"| {Spread.of([j - s for j, s in zip(job_ms, staged_ms)]):.2f} | |",
              f"| **all-in, inline job (compute_seconds x {args.cores} cores / rows)** | **{Spread.of(job_ms):.2f}** "
              "| |", ""]
    device_host = (FORWARD, REST)
    sums = {"decode + preprocessing": PREPROCESS, "host work in the device's process (compute less the sleep)":
            device_host, "beyond decode + preprocessing, in-process stages": tuple(s for s in STAGES
                                                                                   if s not in PREPROCESS)}
    lines += ["| sum | ms per row (wall) |", "|---|---|"]
    lines += [f"| {label} | {Spread.of([row_sum(c, parts) for c in rounds]):.2f} |" for label, parts in sums.items()]
    beyond = [j - row_sum(c, PREPROCESS) for j, c in zip(job_ms, rounds)]
    lines += [f"| beyond decode + preprocessing, all-in | {Spread.of(beyond):.2f} |", "",
              "| not in the inline job: the tasks feed's transfers | ms per row (wall, put here + get in a task) |",
              "|---|---|"]
    lines += [f"| {stage} | {per_row(rounds, stage, rows):.2f} |" for stage in TRANSFERS]
    lines += ["", "| check: a whole function against the sum of its pieces | whole | pieces |", "|---|---|---|"]
    checks = {"whole: prepare": ("read", "sha1", "decode", *PREPROCESS[1:]),
              "whole: write": ("compress", WRITE, "fsync", "digest (block_digest)", "record")}
    lines += [f"| {whole.removeprefix('whole: ')} | {per_row(rounds, whole, rows):.2f} | "
              f"{Spread.of([row_sum(c, parts) for c in rounds]):.2f} |" for whole, parts in checks.items()]
    r = ratio(job_ms, [row_sum(c, PREPROCESS) for c in rounds])
    p10 = Spread.of([rate / (1000.0 / DEVICE_MS) for rate in p10_rates])
    lines += ["", f"R = all-in / (decode + preprocessing) = **{r:.2f}** (goal <= {R_GOAL}; "
              f"{sum(j / row_sum(c, PREPROCESS) <= R_GOAL for j, c in zip(job_ms, rounds))}/{len(rounds)} rounds "
              "meet it)",
              f"P10 = one device worker's rows/s ({Spread.of(p10_rates):.1f}) / {1000.0 / DEVICE_MS:.0f} = "
              f"**{p10:.3f}** (goal >= {P10_GOAL}; {sum(v / (1000.0 / DEVICE_MS) >= P10_GOAL for v in p10_rates)}/"
              f"{len(p10_rates)} rounds meet it); ms per row through that worker: "
              f"{Spread.of([1000.0 / v for v in p10_rates]):.2f}, of which {DEVICE_MS:g} on the device"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="images per round (default 256)")
    parser.add_argument("--rows-per-block", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores Ray may use; the job's workers")
    parser.add_argument("--out", default="runs/bench-host", help="scratch directory")
    parser.add_argument("--quiet", type=float, default=0.0, metavar="SECONDS",
                        help="for a machine shared with other work: before each variant wait up to SECONDS until "
                             "nothing else runs, and measure a variant again (up to 4 times) when other processes "
                             "used over a tenth of a core meanwhile (default 0: neither)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    from pipeline.workers import BLOCKS_IN_FLIGHT_PER_WORKER

    # The inline feed hands each worker up to BLOCKS_IN_FLIGHT_PER_WORKER blocks at once: fewer blocks, or a number
    # the workers cannot share evenly, would leave a core idle and count its idle time as overhead.
    blocks = -(-args.rows // args.rows_per_block)
    if blocks % args.cores or blocks < args.cores * BLOCKS_IN_FLIGHT_PER_WORKER:
        parser.error(f"--rows {args.rows} makes {blocks} blocks of {args.rows_per_block}; the job's {args.cores} "
                     f"workers need a multiple of {args.cores}, at least {args.cores * BLOCKS_IN_FLIGHT_PER_WORKER}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray lowers its workers' priority (nice 15): on a machine shared with other work the job would get less than
    # its cores while the in-process stages got their fair share, and R would measure the other users.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray's workers inherit the environment of the process that starts Ray: they must import the plugin too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import ray
    import torch

    from pipeline.local_ray import ray_session

    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    # A fresh local Ray that dies with this process, never a cluster someone else started on the machine.
    with ray_session(None, num_cpus=args.cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False):
        # This process, and every thread it starts from now on (zarr's codec pool, P10's compute threads), runs on
        # one core, so wall time here is time of one core; Ray's processes, started above, keep every core.
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        setup = build_setup(out, args.rows, args.rows_per_block)
        getter = ray.remote(_timed_get).options(num_cpus=1)
        ray.get(getter.remote([ray.put(0)]))  # the task process starts outside every round
        run_budget(setup, getter, -1)  # first-call allocations and imports, outside every round
        run_p10(setup)
        print(f"host budget: {args.rows} rows, blocks of {args.rows_per_block}, {args.cores} cores, {args.rounds} "
              "interleaved rounds of budget / job / p10", flush=True)
        stores = itertools.count()
        details: dict[str, list] = defaultdict(list)  # budget: Clock; job: ms per row inside its workers' stages

        def run_once(variant: str) -> tuple[float, object]:
            if variant == "budget":
                clock = run_budget(setup, getter, next(stores))
                return sum(clock.wall[s] for s in STAGES) * 1000.0 / args.rows, clock
            if variant == "job":
                return run_job(setup, args.cores, next(stores))
            return run_p10(setup), None

        def run(variant: str) -> float:
            value, detail = Quiet(args.quiet).measure(run_once, variant) if args.quiet else run_once(variant)
            details[variant].append(detail)
            return value

        results = interleave(("budget", "job", "p10"), run, args.rounds,
                             report=lambda line: print(f"{line}  (load {os.getloadavg()[0]:.2f})", flush=True))
    print()
    print(report(details["budget"], results["job"], details["job"], results["p10"], args.rows, args,
                 (load_start, os.getloadavg()[0]), time.perf_counter() - started))


if __name__ == "__main__":
    main()
