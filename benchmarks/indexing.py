"""Indexing benchmark: reruns cost the work left, not the dataset (`make bench`; ratios measured side by side).

I1 = indexing on a rerun of an existing store / the first indexing of a new store   (goal: a small fraction)
I2 = parallel indexing (one spawned process per CPU, one task per shard) / serial indexing of the same shards

The first indexing is what `pipeline precompute` does on a new store before any teacher runs: list the shards,
read and hash every one (`build_index`), create the store (index.parquet, shards.parquet, zarr.json). The rerun
is what it does on an existing store: read the store's record (index.parquet checked against its digest,
shards.parquet), list the shards, reuse the rows of every shard whose identity (size, mtime) is the recorded
one, and compare the assembled index with the stored one (`open_or_create_store` without the lock). Whether the
store's teachers are finished does not change that work. The shards are demo-style (`write_demo_shards`: real
photographs, JPEG, captions, conversations), page-cached after writing, so reading costs no disk time here.

Every measure runs `--repeats` times, interleaved (first, rerun, serial, parallel, ...); medians with min-max.

    python benchmarks/indexing.py [--shards 40] [--samples-per-shard 60] [--repeats 5] [--out runs/bench-indexing]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

ROWS_PER_BLOCK = 64


def first_indexing(shards: str, store: Path) -> float:
    from pipeline.data.index import build_index
    from pipeline.precompute import open_or_create_store

    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    index = build_index(shards, progress=False)
    open_or_create_store(str(store), index, ROWS_PER_BLOCK)  # creates: index.parquet, shards.parquet, zarr.json
    return time.perf_counter() - started


def rerun_indexing(shards: str, store: Path) -> float:
    from pipeline.data.index import build_index
    from pipeline.precompute import open_or_create_store
    from pipeline.data.store import TargetStore

    started = time.perf_counter()
    index = build_index(shards, previous=TargetStore(str(store)).previous_index(), progress=False)
    open_or_create_store(str(store), index, ROWS_PER_BLOCK, locked=False)  # checks, writes nothing
    seconds = time.perf_counter() - started
    assert index.scanned == [], f"the rerun read shards {index.scanned[:3]}: their identity changed?"
    return seconds


def scan(shards: str, workers: int) -> float:
    from pipeline.data.index import build_index

    started = time.perf_counter()
    build_index(shards, workers=workers, progress=False)
    return time.perf_counter() - started


def describe(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} s ({min(values):.4f}-{max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--samples-per-shard", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for the parallel scan (default: this process's CPUs)")
    parser.add_argument("--out", default="runs/bench-indexing")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer say little on a shared machine)")

    from pipeline.demo.llava import write_demo_shards
    from pipeline.data.index import PARALLEL_MIN_BYTES

    out = Path(args.out)
    shards_dir = out / f"shards-{args.shards}x{args.samples_per_shard}"
    paths = [shards_dir / f"demo-{i:05d}.tar" for i in range(args.shards)]
    if not all(p.exists() for p in paths):  # same arguments, same bytes: written once per --out
        paths = write_demo_shards(shards_dir, num_samples=args.shards * args.samples_per_shard,
                                  num_shards=args.shards, seed=0, progress=False)
    total = sum(p.stat().st_size for p in paths)
    shards, store = str(shards_dir), out / "store"
    print(f"{len(paths)} shards, {args.shards * args.samples_per_shard} samples, {total / 2**20:.1f} MiB "
          f"({total / len(paths) / 2**20:.2f} MiB per shard); {len(os.sched_getaffinity(0))} CPUs; first indexing "
          f"{'in processes' if total >= PARALLEL_MIN_BYTES else 'in this process'} (auto: processes from "
          f"{PARALLEL_MIN_BYTES / 2**20:.0f} MiB)")

    first_indexing(shards, store)  # warm-up: imports, page cache
    times: dict[str, list[float]] = {"first": [], "rerun": [], "serial": [], "parallel": []}
    for _ in range(args.repeats):
        times["first"].append(first_indexing(shards, store))
        times["rerun"].append(rerun_indexing(shards, store))
        times["serial"].append(scan(shards, 1))
        times["parallel"].append(scan(shards, args.workers))

    first, rerun = statistics.median(times["first"]), statistics.median(times["rerun"])
    serial, parallel = statistics.median(times["serial"]), statistics.median(times["parallel"])
    print(f"first indexing of a new store      {describe(times['first'])}")
    print(f"indexing on a rerun of the store   {describe(times['rerun'])}")
    print(f"serial scan (1 process)            {describe(times['serial'])}")
    print(f"parallel scan ({args.workers} processes)         {describe(times['parallel'])}")
    print(f"I1 = rerun / first                 {rerun / first:.4f}")
    print(f"I2 = parallel / serial             {parallel / serial:.3f}")


if __name__ == "__main__":
    main()
