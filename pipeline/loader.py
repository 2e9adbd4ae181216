"""Training-time reading: stream shards, fetch each sample's targets from the store by row.

Shards are split across ranks, then across DataLoader workers (each worker streams whole shards,
so reads are sequential). Targets are fetched one inner Zarr chunk at a time: consecutive rows of a
shard are consecutive rows of the store, so one read serves `rows_per_chunk` samples. Each sample's
image bytes are checked against the sha1 in `index.parquet` before it is trained on. Every sample carries
its stream position, so a trainer can checkpoint the data position and resume it exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.errors import UsageError
from pipeline.images import ImageDecodeError, decode_rgb
from pipeline.index import duplicate_rows
from pipeline.shards import IMAGE_EXTENSIONS, list_shards, shard_name
from pipeline.store import TargetStore

log = logging.getLogger(__name__)


class TargetReader:
    """Row reads from one store with a one-chunk cache per teacher. Opens the store lazily (fork/spawn safe)."""

    def __init__(self, store_path: str, teachers: list[str]):
        self.store_path = store_path
        self.teachers = list(teachers)
        self._store: TargetStore | None = None
        self._chunk_rows: dict[str, int] = {}
        self._cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    def read(self, name: str, row: int) -> tuple[np.ndarray, bool]:
        """Decoded target float32 [T, C] and its valid flag for global `row`."""
        if self._store is None:
            self._store = TargetStore(self.store_path)
            self._chunk_rows = {n: int(self._store.teacher_attrs(n).get("rows_per_chunk", 1)) for n in self.teachers}
        chunk_rows = self._chunk_rows[name]
        chunk = row // chunk_rows
        cached = self._cache.get(name)
        if cached is None or cached[0] != chunk:
            start = chunk * chunk_rows
            stop = min(start + chunk_rows, self._store.num_rows)
            cached = (chunk, *self._store.read_rows(name, start, stop))
            self._cache[name] = cached
        offset = row - chunk * chunk_rows
        return cached[1][offset], bool(cached[2][offset])


@dataclass(frozen=True)
class StreamPosition:
    """Where a worker's stream stands: `index` records of its `epoch` stream have been consumed."""

    worker: int
    epoch: int
    index: int


def _keep_all(urls):
    """Ranks and workers are split by `TrainingSamples` itself, so webdataset must not split again."""
    return urls


class TrainingSamples(IterableDataset):
    """Yields `transform(sample)` for every usable sample of this rank's share of the shards, forever.

    `sample` is a dict: row (int; -1 without a store), key, image (RGB PIL), caption (str | None), conversations
    (list | None), targets {teacher: np.ndarray [T, C]}, valid {teacher: bool}, stream: the `StreamPosition`
    just after this sample, and skipped: {reason: count} of the samples this worker has left out so far (a
    DataLoader worker's counters live in its own process; this is how they reach the trainer).

    `teachers` are the groups whose targets are read; with `store_path` set and `teachers=[]`, samples are still
    aligned with (and hash-checked against) the store's index, but no target is read (online teachers).

    The order is a pure function of (seed, rank, worker, epoch), so a position is enough to resume exactly:
    `resume(positions, next_worker)` makes each worker skip the records it had already delivered, without decoding
    them. `store_path=None` streams shards without targets (next-token-only training).
    """

    def __init__(
        self,
        shards: str,
        store_path: str | None,
        teachers: list[str],
        transform: Callable[[dict], dict],
        *,
        rank: int = 0,
        world_size: int = 1,
        check_image_hash: bool = True,
        epochs: int | None = None,
        shuffle_shards: bool = False,
        seed: int = 0,
    ):
        self.urls = list_shards(shards)
        self.store_path = store_path
        self.teachers = list(teachers)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.check_image_hash = check_image_hash
        self.epochs = epochs
        self.shuffle_shards, self.seed = shuffle_shards, seed
        self.skipped: Counter = Counter()
        self._positions: dict[int, StreamPosition] = {}
        self._worker_offset = 0
        if len(self.urls) < world_size:
            raise UsageError(f"{len(self.urls)} shard(s) cannot feed {world_size} ranks; use more shards")
        if store_path is None:
            if self.teachers:
                raise UsageError(f"teachers {self.teachers} need targets, but no store was given")
            self._rows, self._reader = None, None
            return
        store = TargetStore(store_path)
        index = store.read_index()
        known = set(index.column("shard").to_pylist())
        unknown = [shard_name(u) for u in self.urls if shard_name(u) not in known]
        if unknown:
            raise UsageError(
                f"store {store_path} was not built for shard {unknown[0]}; run `pipeline precompute` on these shards"
            )
        # (shard, key) -> its rows in index order: the n-th time a key comes up in its shard is its n-th row.
        self._rows: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for s, k, r, h in zip(*(index.column(c).to_pylist() for c in ("shard", "key", "row", "image_sha1"))):
            self._rows.setdefault((s, k), []).append((r, h))
        self._duplicates = duplicate_rows(index)  # the rule precompute applies: later occurrences are not used
        self._reader = TargetReader(store_path, self.teachers)

    def rank_urls(self) -> list[str]:
        """The shards this rank streams (every epoch, split further across its workers)."""
        return self.urls[self.rank :: self.world_size]

    def _worker(self) -> tuple[int, int]:
        # A resumed DataLoader asks worker 0 first; renumbering the workers makes that the worker whose batch was
        # due next, so batches arrive in the uninterrupted order.
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self._worker_offset) % info.num_workers, info.num_workers

    def epoch_urls(self, worker: int, num_workers: int, epoch: int) -> list[str]:
        """The shards `worker` streams in `epoch`, in order."""
        urls = self.rank_urls()[worker::num_workers]
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.rank}:{worker}:{epoch}").shuffle(urls)
        return urls

    def resume(self, positions: dict[int, "StreamPosition"], next_worker: int) -> None:
        """Continue from `positions` (worker -> position after its last delivered sample). Call before iterating."""
        self._positions = dict(positions)
        self._worker_offset = next_worker

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        if not self.rank_urls()[worker::num_workers]:
            return
        start = self._positions.get(worker, StreamPosition(worker, 0, 0))
        epoch, skip = start.epoch, start.index
        while self.epochs is None or epoch < self.epochs:
            urls = self.epoch_urls(worker, num_workers, epoch)
            stream = wds.WebDataset(
                urls, shardshuffle=False, nodesplitter=_keep_all,
                workersplitter=_keep_all, empty_check=False, handler=wds.warn_and_continue,
            )
            delivered = seen = 0
            occurrences: Counter = Counter()
            for index, raw in enumerate(stream):
                location = (shard_name(raw["__url__"]), raw["__key__"])
                occurrence = occurrences[location]
                occurrences[location] += 1
                if index < skip:
                    continue
                seen += 1
                sample = self._prepare(raw, location, occurrence)
                if sample is not None:
                    delivered += 1
                    sample["stream"] = StreamPosition(worker, epoch, index + 1)
                    sample["skipped"] = dict(self.skipped)
                    yield self.transform(sample)
            if seen and not delivered and not skip:
                # Otherwise an endless stream would look for a usable sample forever (e.g. shards rewritten under
                # the same names, so that every image hash differs from the store's index).
                reasons = ", ".join(f"{n} x {r}" for r, n in self.skipped.most_common())
                raise UsageError(f"none of the {seen} samples of shard(s) {', '.join(map(shard_name, urls))} can be "
                                 f"trained on ({reasons}); were these shards rewritten after the store was built?")
            epoch, skip = epoch + 1, 0

    def _skip(self, reason: str, raw: dict) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            log.warning("skipping %s/%s: %s", shard_name(raw.get("__url__", "?")), raw.get("__key__"), reason)

    def _prepare(self, raw: dict, location: tuple[str, str], occurrence: int) -> dict | None:
        if self._rows is None:
            row, sha1 = -1, None
        elif occurrence >= len(self._rows.get(location, ())):
            self._skip("not in the store's index", raw)
            return None
        else:
            row, sha1 = self._rows[location][occurrence]
            if row in self._duplicates:
                self._skip("duplicate key in its shard (only the first occurrence is used)", raw)
                return None
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            self._skip("no image", raw)
            return None
        if sha1 is not None and self.check_image_hash and hashlib.sha1(data).hexdigest() != sha1:
            self._skip("image differs from the one the targets were computed on (sha1 mismatch)", raw)
            return None
        try:
            image = decode_rgb(data)
        except ImageDecodeError as exc:
            self._skip(str(exc), raw)
            return None
        caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else None
        conversations = None
        if "json" in raw:
            try:
                conversations = json.loads(raw["json"]).get("conversations")
            except (ValueError, AttributeError, RecursionError):  # deeply nested json raises RecursionError
                conversations = None
        if not caption and not conversations:
            self._skip("no caption or conversation", raw)
            return None
        targets, valid = {}, {}
        for name in self.teachers:
            targets[name], valid[name] = self._reader.read(name, row)
        return {"row": row, "key": raw["__key__"], "image": image, "caption": caption or None,
                "conversations": conversations, "targets": targets, "valid": valid}


def stack_targets(samples: list[dict], teachers: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Batch the per-sample targets: {teacher: [B, T, C] float32}, {teacher: [B] bool}."""
    targets = {n: torch.from_numpy(np.stack([s["targets"][n] for s in samples])) for n in teachers}
    valid = {n: torch.tensor([s["valid"][n] for s in samples], dtype=torch.bool) for n in teachers}
    return targets, valid
