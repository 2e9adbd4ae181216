"""Training-time reading: any sample of the shards, in any order, with its targets from the store.

`index.parquet` knows every sample's byte span in its tar (`sample_offset`, `sample_size`), so one read gives a
sample's image, caption and conversation wherever it lies: `TrainingSamples` is a map-style dataset over the rows
of the index, and `EpochOrder` visits them in a seeded random order over all of this rank's data, a new order
every epoch, as LLaVA samples its data (uniformly, without replacement). The order is a pure function of (seed,
epoch, rank, world size), so "how many samples this rank has drawn" is the whole data position: a resumed run
continues the exact order, whatever the number of DataLoader workers.

Targets are read by row through the store's `TargetReader`. The store decodes a whole inner chunk
(`rows_per_chunk` rows) to give one row, so a random order decodes `rows_per_chunk` rows per sample; stores are
made with one row per chunk by default for that reason (`pipeline precompute --rows-per-chunk`), and every sample
reports the bytes decoded to deliver it.

What a read delivers is a `Sample`; the dataset's `transform` (the student's `SampleEncoder`) turns it into what
the collator stacks.

Which samples a stage trains on is decided from the index before any read (`TrainingSamples._select`): duplicate
keys (only the first occurrence counts, as in precompute), samples with no text, and samples without an image
when the stage reads targets (PT) are left out of the order and counted. What only reading can tell (an image whose bytes
changed, one that does not decode, a broken conversation) becomes a `Skipped` record in its batch: counted, logged,
never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pipeline.data.atomic import atomic_file
from pipeline.data.errors import UsageError
from pipeline.data.images import ImageDecodeError, decode_rgb
from pipeline.data.index import PreviousIndex, build_index, duplicate_rows
from pipeline.data.shards import IMAGE_EXTENSIONS, list_shards, read_member_bytes, shard_name, split_sample_span
from pipeline.data.store import TargetReader, TargetStore

log = logging.getLogger(__name__)

# Why a sample is not trained on; the counts reach the metrics and the run's summary under these names.
DUPLICATE = "duplicate key in its shard (only the first occurrence is used)"
NO_TEXT = "no caption or conversation"
NO_IMAGE = "no image"
NO_IMAGE_FOR_TARGETS = "no image (this stage trains on targets, which need one)"
IMAGE_CHANGED = "image differs from the one the targets were computed on (sha1 mismatch)"
NOT_IN_STORE = "not in the store's index"


@dataclass(frozen=True)
class Skipped:
    """What a sample that cannot be trained on becomes in its batch: its row and why."""

    row: int
    reason: str


@dataclass(frozen=True)
class Sample:
    """One sample as read from its shard, with its targets from the store: what `TrainingSamples` transforms."""

    row: int  # the sample's row in the store's index.parquet (in the shards' index when there is no store)
    key: str
    image: Image.Image | None  # RGB; None for a text-only sample
    caption: str | None
    conversations: list | None  # LLaVA turns [{"from": ..., "value": ...}, ...]
    targets: dict[str, np.ndarray]  # teacher -> float32 [T, C]
    valid: dict[str, bool]  # teacher -> whether its target was computed (False: mask its loss)
    decoded_bytes: int  # image span bytes read plus target bytes decoded to deliver this sample


Item = TypeVar("Item")  # what the transform makes of a Sample


def training_index(shards: str, cache_dir: str | None, *, previous: PreviousIndex | None = None,
                   progress: bool = True) -> pa.Table:
    """The index of SHARDS as they are now, kept in `cache_dir` (index.parquet + shards.parquet) so that the next
    run, or a resumed one, re-reads only the shards that changed. Without a cache, `previous` (a store's record of
    its shards) spares the shards it recorded unchanged; with neither, every shard is read."""
    if cache_dir is not None and os.path.exists(os.path.join(cache_dir, "shards.parquet")):
        previous = PreviousIndex(index=pq.read_table(os.path.join(cache_dir, "index.parquet")),
                                 shards=pq.read_table(os.path.join(cache_dir, "shards.parquet")))
    index = build_index(shards, previous=previous, progress=progress)
    if cache_dir is not None and (previous is None or index.scanned):
        os.makedirs(cache_dir, exist_ok=True)
        for name, table in (("index.parquet", index.table), ("shards.parquet", index.shards)):
            with atomic_file(os.path.join(cache_dir, name)) as f:
                pq.write_table(table, f)
    return index.table


class TrainingSamples(Dataset[Item]):
    """Map-style dataset: `dataset[row]` is `transform(sample)` for that row of the index (`sample` a `Sample`), or
    a `Skipped`.

    Samples are numbered by their row in `index`, the shards as they are now (see `training_index`; default: the
    store's own index.parquet, or indexing SHARDS now when there is no store). With `store_path` set, each sample
    is matched to its store row by (shard, key, occurrence) and its image hash compared with the store's, so a
    shard rewritten since precompute loses only the samples that changed; `teachers` are the groups whose targets
    are read (with `teachers=[]` samples are still matched and hash-checked, but no target is read: online
    teachers, or a stage without embedding losses). `stored_index` is the store's index.parquet when the caller has
    read it already. `rows` are the samples this stage may train on, in index order; `excluded` counts the others by
    reason. Iterating the dataset yields the usable samples in index order (tools, tests); `skipped` then counts
    what reading left out.
    """

    def __init__(
        self,
        shards: str,
        store_path: str | None,
        teachers: list[str],
        transform: Callable[[Sample], Item],
        *,
        index: pa.Table | None = None,
        stored_index: pa.Table | None = None,
        check_image_hash: bool = True,
        text_only: bool | None = None,
    ):
        self.store_path = store_path
        self.teachers = list(teachers)
        self.transform = transform
        self.check_image_hash = check_image_hash
        # Text-only samples train where no target is needed; a stage that reads targets leaves them out.
        self.text_only = not self.teachers if text_only is None else text_only
        self.skipped: Counter = Counter()
        self.urls = {shard_name(u): u for u in list_shards(shards)}
        self._reader: TargetReader | None = None
        if store_path is None:
            if self.teachers:
                raise UsageError(f"teachers {self.teachers} need targets, but no store was given")
            index = index if index is not None else training_index(shards, None, progress=False)
            stored = index
        else:
            store = TargetStore(store_path)
            stored = store.read_index() if stored_index is None else stored_index
            index = stored if index is None else index
            self._reader = store.reader()
        unknown = sorted(set(self.urls) - set(stored.column("shard").to_pylist()))
        if unknown:
            raise UsageError(f"store {store_path} was not built for shard {unknown[0]}; run `pipeline precompute` "
                             "on these shards")
        self._columns = {c: index.column(c).to_pylist() for c in (
            "shard", "key", "image_sha1", "caption_present", "has_conversation", "sample_offset", "sample_size")}
        self._stored_rows, self._expected_sha1 = _match(index, stored)
        self._target_rows = stored.column("target_row").to_numpy()  # of each stored sample: where its targets lie
        self.rows, self.excluded = self._select(stored)
        self._files: dict[str, object] = {}
        self._files_pid = os.getpid()

    def _select(self, stored: pa.Table) -> tuple[np.ndarray, Counter]:
        """This stage's samples (of the given shards, in index order) and the count of the others by reason."""
        c = self._columns
        duplicates = duplicate_rows(stored)  # precompute's rule, on the store's rows
        rows, excluded = [], Counter()
        for i, shard in enumerate(c["shard"]):
            if shard not in self.urls:
                continue
            has_image = bool(c["image_sha1"][i])
            stored_row = self._stored_rows[i]
            reason = None
            if stored_row < 0:
                reason = NOT_IN_STORE
            elif stored_row in duplicates:
                reason = DUPLICATE
            elif c["image_sha1"][i] != self._expected_sha1[i]:
                reason = IMAGE_CHANGED
            elif not c["caption_present"][i]:
                reason = NO_TEXT
            elif not has_image and not self.text_only:
                reason = NO_IMAGE_FOR_TARGETS
            elif not has_image and not c["has_conversation"][i]:
                reason = NO_IMAGE  # a bare caption without its image describes nothing
            if reason is None:
                rows.append(i)
                continue
            excluded[reason] += 1
            if reason in (NOT_IN_STORE, IMAGE_CHANGED) and excluded[reason] <= 3:
                log.warning("skipping %s/%s: %s", shard, c["key"][i], reason)
        return np.asarray(rows, dtype=np.int64), excluded

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> Item | Skipped:
        try:
            sample = self._read(int(row))
        except (ImageDecodeError, OSError, EOFError, ValueError) as exc:
            return Skipped(int(row), str(exc) if isinstance(exc, ImageDecodeError) else f"unreadable sample: {exc}")
        if isinstance(sample, Skipped):
            return sample
        try:
            return self.transform(sample)
        except Exception as exc:  # noqa: BLE001 - whatever one sample's text raises is that sample's failure
            # (roles that do not alternate, two <image> placeholders, turns that are not dicts...); a bug that
            # fails every sample still stops training: the trainer refuses a whole epoch of skips.
            return Skipped(int(row), f"bad conversation: {type(exc).__name__}: {exc}")

    def __iter__(self) -> Iterator[Item]:
        for row in self.rows:
            item = self[row]
            if isinstance(item, Skipped):
                self.note_skipped(item)
            else:
                yield item

    def note_skipped(self, item: Skipped) -> None:
        self.skipped[item.reason] += 1
        if self.skipped[item.reason] <= 3:
            c = self._columns
            log.warning("skipping %s/%s: %s", c["shard"][item.row], c["key"][item.row], item.reason)

    def _file(self, shard: str):
        # One open file per shard and worker process: a random order touches every shard again and again. A forked
        # worker must not share its parent's file offsets, so a new process opens its own.
        if self._files_pid != os.getpid():
            self._files, self._files_pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = fsspec.open(self.urls[shard], "rb").open()
        return f

    def _read(self, row: int) -> Sample | Skipped:
        c = self._columns
        span = read_member_bytes(self._file(c["shard"][row]), c["sample_offset"][row], c["sample_size"][row])
        members = split_sample_span(span)
        data = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        sha1 = self._expected_sha1[row]
        if sha1 and data is None:
            return Skipped(row, NO_IMAGE)
        image = None
        if data is not None:
            if self.check_image_hash and hashlib.sha1(data).hexdigest() != sha1:
                return Skipped(row, IMAGE_CHANGED)
            image = decode_rgb(data)
        caption = members["txt"].decode("utf-8", errors="replace").strip() if "txt" in members else None
        conversations = _conversations(members.get("json"))
        if not caption and not conversations:
            return Skipped(row, NO_TEXT)
        if image is None and not conversations:
            return Skipped(row, NO_IMAGE)
        targets, valid, decoded = {}, {}, len(span)
        stored_row = self._stored_rows[row]
        target_row = int(self._target_rows[stored_row])
        for name in self.teachers:
            targets[name], valid[name], n = self._reader.row(name, target_row)
            decoded += n
        return Sample(row=stored_row, key=c["key"][row], image=image, caption=caption or None,
                      conversations=conversations, targets=targets, valid=valid, decoded_bytes=decoded)


def _match(index: pa.Table, stored: pa.Table) -> tuple[list[int], list[str]]:
    """For each row of `index`: its row in `stored` (-1 if none) and the image sha1 recorded there. A key met for
    the n-th time in its shard is that key's n-th row of the shard in both. (The targets are at the stored row's
    `target_row`.)"""
    if index is stored:
        return index.column("row").to_pylist(), index.column("image_sha1").to_pylist()
    rows: dict[tuple[str, str, int], tuple[int, str]] = {}
    seen: Counter = Counter()
    for shard, key, row, sha1 in zip(*(stored.column(c).to_pylist() for c in ("shard", "key", "row", "image_sha1"))):
        rows[(shard, key, seen[(shard, key)])] = (row, sha1)
        seen[(shard, key)] += 1
    seen.clear()
    target_rows, sha1s = [], []
    for shard, key in zip(index.column("shard").to_pylist(), index.column("key").to_pylist()):
        row, sha1 = rows.get((shard, key, seen[(shard, key)]), (-1, ""))
        seen[(shard, key)] += 1
        target_rows.append(row)
        sha1s.append(sha1)
    return target_rows, sha1s


def _conversations(raw: bytes | None) -> list | None:
    if raw is None:
        return None
    try:
        turns = json.loads(raw).get("conversations")
    except (ValueError, AttributeError, RecursionError):  # deeply nested json raises RecursionError
        return None
    return turns if isinstance(turns, list) and turns else None


class EpochOrder(Sampler[int]):
    """The rows one rank trains on, epoch after epoch, each epoch in a new seeded random order.

    Every epoch shuffles all the stage's rows with the generator seeded by (seed, epoch) and deals them out to
    the ranks (rank r takes every world_size-th); each rank gets the same count, the remainder sits the epoch out
    (a different remainder every epoch). `start` samples are skipped first: a resumed run's position.
    `shuffle=False` deals the rows out in index order instead (A/B comparisons, tests).
    """

    def __init__(self, rows: np.ndarray, *, seed: int, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, start: int = 0, shuffle: bool = True):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.seed, self.rank, self.world_size, self.epochs = seed, rank, world_size, epochs
        self.shuffle = shuffle
        self.per_rank = len(self.rows) // world_size
        self.start = start
        if self.per_rank == 0:
            raise UsageError(f"{len(self.rows)} trainable sample(s) cannot feed {world_size} rank(s)")

    def epoch_rows(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        else:
            order = np.arange(len(self.rows))
        return self.rows[order[self.rank :: self.world_size][: self.per_rank]]

    def position(self, drawn: int) -> tuple[int, int]:
        """(epoch, index in it) after `drawn` samples."""
        return divmod(drawn, self.per_rank)

    def __iter__(self) -> Iterator[int]:
        epoch, index = self.position(self.start)
        while self.epochs is None or epoch < self.epochs:
            yield from self.epoch_rows(epoch)[index:].tolist()
            epoch, index = epoch + 1, 0

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless EpochOrder has no length")
        return max(self.per_rank * self.epochs - self.start, 0)
