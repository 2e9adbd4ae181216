"""Training-time reading: stream shards, fetch each sample's targets from the store by row.

Shards are split across ranks, then across DataLoader workers (each worker streams whole shards,
so reads are sequential). Targets are fetched one inner Zarr chunk at a time: consecutive rows of a
shard are consecutive rows of the store, so one read serves `rows_per_chunk` samples. Each sample's
image bytes are checked against the sha1 in `index.parquet` before it is trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.errors import UsageError
from pipeline.images import ImageDecodeError, decode_rgb
from pipeline.shards import IMAGE_EXTENSIONS, list_shards, shard_name
from pipeline.store import TargetStore

log = logging.getLogger(__name__)


class TargetReader:
    """Row reads from one store with a one-chunk cache per teacher. Opens the arrays lazily (fork/spawn safe)."""

    def __init__(self, store_path: str, teachers: list[str]):
        self.store_path = store_path
        self.teachers = list(teachers)
        self._arrays = None
        self._cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    def _open(self):
        store = TargetStore(self.store_path)
        self._arrays = {}
        for name in self.teachers:
            chunk_rows = int(store.teacher_attrs(name).get("rows_per_chunk", 1))
            self._arrays[name] = (store.target_array(name), store.valid_array(name), chunk_rows)

    def read(self, name: str, row: int) -> tuple[np.ndarray, bool]:
        """Target [T, C] (store dtype) and its valid flag for global `row`."""
        if self._arrays is None:
            self._open()
        target, valid, chunk_rows = self._arrays[name]
        chunk = row // chunk_rows
        cached = self._cache.get(name)
        if cached is None or cached[0] != chunk:
            start = chunk * chunk_rows
            stop = min(start + chunk_rows, target.shape[0])
            cached = (chunk, target[start:stop], valid[start:stop])
            self._cache[name] = cached
        offset = row - chunk * chunk_rows
        return cached[1][offset], bool(cached[2][offset])


def _keep_all(urls):
    """Ranks and workers are split by `TrainingSamples` itself, so webdataset must not split again."""
    return urls


class TrainingSamples(IterableDataset):
    """Yields `transform(sample)` for every usable sample of this rank's share of the shards, forever.

    `sample` is a dict: row (int), key, image (RGB PIL), caption (str | None), conversations (list | None),
    targets {teacher: np.ndarray [T, C]}, valid {teacher: bool}.
    """

    def __init__(
        self,
        shards: str,
        store_path: str,
        teachers: list[str],
        transform: Callable[[dict], dict],
        *,
        rank: int = 0,
        world_size: int = 1,
        check_image_hash: bool = True,
        epochs: int | None = None,
    ):
        self.urls = list_shards(shards)
        self.store_path = store_path
        self.teachers = list(teachers)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.check_image_hash = check_image_hash
        self.epochs = epochs
        self.skipped: Counter = Counter()
        store = TargetStore(store_path)
        index = store.read_index()
        known = set(index.column("shard").to_pylist())
        unknown = [shard_name(u) for u in self.urls if shard_name(u) not in known]
        if unknown:
            raise UsageError(
                f"store {store_path} was not built for shard {unknown[0]}; run `pipeline precompute` on these shards"
            )
        if len(self.urls) < world_size:
            raise UsageError(f"{len(self.urls)} shard(s) cannot feed {world_size} ranks; use more shards")
        self._rows = {
            (s, k): (r, h)
            for s, k, r, h in zip(*(index.column(c).to_pylist() for c in ("shard", "key", "row", "image_sha1")))
        }
        self._reader = TargetReader(store_path, self.teachers)

    def my_urls(self) -> list[str]:
        info = get_worker_info()
        urls = self.urls[self.rank :: self.world_size]
        if info is not None:
            urls = urls[info.id :: info.num_workers]
        return urls

    def __iter__(self) -> Iterator[dict]:
        urls = self.my_urls()
        if not urls:
            return
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            stream = wds.WebDataset(
                urls, shardshuffle=False, nodesplitter=_keep_all, workersplitter=_keep_all, empty_check=False,
                handler=wds.warn_and_continue,
            )
            for raw in stream:
                sample = self._prepare(raw)
                if sample is not None:
                    yield self.transform(sample)
            epoch += 1

    def _skip(self, reason: str, raw: dict) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 3:
            log.warning("skipping %s/%s: %s", shard_name(raw.get("__url__", "?")), raw.get("__key__"), reason)

    def _prepare(self, raw: dict) -> dict | None:
        location = (shard_name(raw["__url__"]), raw["__key__"])
        if location not in self._rows:
            self._skip("not in the store's index", raw)
            return None
        row, sha1 = self._rows[location]
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            self._skip("no image", raw)
            return None
        if self.check_image_hash and hashlib.sha1(data).hexdigest() != sha1:
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
            except (ValueError, AttributeError):
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
    """Batch the per-sample targets: {teacher: [B, T, C] store dtype}, {teacher: [B] bool}."""
    targets = {n: torch.from_numpy(np.stack([s["targets"][n] for s in samples])) for n in teachers}
    valid = {n: torch.tensor([s["valid"][n] for s in samples], dtype=torch.bool) for n in teachers}
    return targets, valid
