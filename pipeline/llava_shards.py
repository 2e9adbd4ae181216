"""LLaVA-format JSON plus its images folder -> WebDataset shards in img2dataset layout (`pipeline shards llava`).

Input: a JSON list of records `{"id", "image" (optional, relative to the images folder), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}`, as LLaVA-Pretrain's `blip_laion_cc_sbu_558k.json` and the
instruction mix `llava_v1_5_mix665k.json` are written. Output under DIR:

    PREFIX-00000.tar ...      per sample, in this order: KEY.<ext> (the image file's bytes, never re-encoded),
                              KEY.txt (its caption, if it has one), KEY.json (the record)
    PREFIX-00000_stats.json   the shard's completion record, written after the tar is in place: its counts, and
                              per image sample in shard order its `image` path and the sha1 of its bytes
    PREFIX_sharding.json      the input (size, sha256) and the arguments the PREFIX shards were cut with
    PREFIX_failures.parquet   every record of that input left out: record (its position in the JSON), id, image,
                              reason, detail

Every file of a run is named by its prefix, so one folder holds the shards of several JSONs: cutting a second
JSON into the same DIR with another `prefix` adds its shards beside the first ones (a dataset grows by a shard
set), and nothing of another prefix is read, rewritten or deleted. `pipeline precompute` on a store of the
earlier shards appends the new ones, whatever their names sort as.

Decisions:
- Order: the JSON's, or with `shuffle` a permutation seeded by `seed`; then cut into shards of
  `samples_per_shard` records (default 10000, img2dataset's: LLaVA-558K makes 56 shards of about 0.5 GB, each a
  unit of resume), or into exactly `num_shards` shards of near-equal size
  (earlier shards take the extra record). Training reads samples by their byte range in a random order over all
  shards, so the shard size does not limit how many ranks and loader workers read them.
- Keys come from position, never from the record's id (ids repeat in the 665K mix): `f"{shard:05d}{i:04d}"` for
  the i-th record of the shard, img2dataset's own scheme, so keys sort in dataset order and are unique. The
  suffix has more than 4 digits only when a shard holds more than 10000 records. The id is kept in KEY.json;
  records sharing an id are counted, never merged.
- An image is stored under the extension of its real format, read from its first bytes (JPEG, PNG, GIF, WebP,
  BMP, TIFF), because decoding in this project goes by content: an OCR-VQA `.jpg` that is a GIF becomes
  KEY.gif. Such lying extensions are counted.
- A record whose image is missing, empty, unreadable or in none of those formats is left out and listed in
  failures.parquet; it is not kept as text-only, since its conversation speaks of an `<image>` it would not have.
  So is a record that is not LLaVA-shaped (no id, no turns). Its key stays unused, so that which files were
  found never changes the other samples' keys.
- The JSON is untrusted input: only regular files inside the images folder are read, at most `max_image_bytes`
  (default 64 MiB) each. An absolute path or one with a NUL byte, a path that resolves (`..`, symlinks) outside
  the folder, a directory, device, FIFO or socket, and a larger file are left out like a missing image. No row of
  failures.parquet holds a byte of the file it describes, so a record naming a secret leaks nothing of it.
- A record without `image` (text-only; about 40K in the 665K mix) becomes a sample with KEY.json alone.
- Captions (KEY.txt): a record's own `caption` string if it has one (an extension of the format, which the demo
  uses); else a single-turn image record, a human turn holding `<image>` and a one-line instruction that is no
  question, then a gpt turn, has that gpt answer as caption, as LLaVA-558K's records are. Other records (VQA,
  multi-turn, text-only) have none; the training loader prefers KEY.json's conversation anyway.
- Resumable: a shard is written to `NAME.tar.tmp-PID`, renamed, and only then given its stats file; a rerun
  skips the shards that have one and rewrites the others. `PREFIX_sharding.json` makes a rerun of the same
  prefix with another input, another images folder or other arguments an error instead of a mix of two datasets
  (`overwrite=True` replaces that prefix's files, and only those). A `.tar` in DIR that no prefix's record
  claims is refused too (`overwrite=True` deletes it), since it would be read as part of the dataset.
- Repeated images: LLaVA's 665K mix has 624,610 image records but about 379K distinct files, and a target store
  holds one row per distinct image content. The summary counts, in shard order, the image samples whose bytes an
  earlier sample of the run already had: by the same `image` path (as the JSON writes it) or, byte-identical,
  under another path (sha1 of the bytes, as `index.parquet`'s `image_sha1`), and the distinct contents. The
  shards themselves hold every sample's own copy: repeats are counted, never merged.
- Worker processes die with the process that started them, even when it is SIGKILLed (Linux: the kernel's
  parent-death signal; elsewhere a thread watching the parent), instead of writing on as orphans.
- Deterministic: same JSON, arguments and image files, same bytes, whatever the number of worker processes
  (one task per shard; tar headers carry a fixed time and no user or group).

    from pipeline.llava_shards import write_llava_shards
    summary = write_llava_shards("blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images", "shards/558k")
    print(summary.report())
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import posixpath
import random
import re
import signal
import stat
import sys
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.data.atomic import TEMPORARY_INFIX, atomic_file, atomic_write
from pipeline.data.errors import JobError, UsageError
from pipeline.data.index import available_cpus

DEFAULT_SAMPLES_PER_SHARD = 10_000
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20  # LLaVA's largest images are a few MB; a file past this is no training photo
RUN_RECORD_SUFFIX = "_sharding.json"  # PREFIX_sharding.json
FAILURES_SUFFIX = "_failures.parquet"  # PREFIX_failures.parquet
FORMAT_VERSION = 2
IMAGE_PLACEHOLDER = "<image>"

FAILURES_SCHEMA = pa.schema(
    [
        ("record", pa.int64()),  # position in the JSON list
        ("id", pa.string()),  # the record's id as a string; null if it has none
        ("image", pa.string()),  # the record's image path; null if it has none
        # missing | empty | unreadable | not an image | bad record | bad path | outside images | not a file | too large
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Fixed tar metadata: any wall-clock time, user or group name in a member header would make two runs differ.
TAR_MTIME = 1_700_000_000

_KEY_DIGITS = 4
# (signature at offset 0, extension). WebP (RIFF....WEBP) and BMP are checked in `image_extension`.
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB header sizes Windows and OS/2 bitmaps use
_EXTENSION_ALIASES = {"jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "tif": "tiff"}
# The flag that sets each argument recorded in PREFIX_sharding.json, so that a refused resume names what to change.
_FLAGS = {"prefix": "--prefix", "samples_per_shard": "--samples-per-shard", "num_shards": "--shards",
          "shuffle_seed": "--shuffle/--seed", "max_image_bytes": "--max-image-bytes"}
# PREFIX-NNNNN.tar: the prefix is everything before the last hyphen, since the shard number holds none.
_SHARD_NAME = re.compile(r"(?P<prefix>.+)-\d{5,}\.tar")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: everything a worker process needs, and nothing it would have to share."""

    index: int
    path: str
    images: str  # resolved: no symlink in it, so a resolved image path inside it starts with it
    key_digits: int
    max_image_bytes: int
    records: list[tuple[int, object]]  # (position in the JSON, record) in shard order


@dataclass(frozen=True)
class ShardingSummary:
    """What a `write_llava_shards` run left in `out` under its prefix, counted over every shard of it (finished
    earlier or now)."""

    out: Path
    prefix: str
    shards: tuple[Path, ...]
    records: int
    samples: int
    images: int
    text_only: int
    captions: int
    failures: dict[str, int]  # reason -> records left out
    lying_extensions: int
    duplicate_ids: int  # records whose id an earlier record of the JSON already had
    distinct_images: int  # distinct image contents (sha1 of the bytes) among the image samples
    repeats_by_path: int  # image samples whose `image` path and bytes an earlier sample already had
    repeats_by_content: int  # image samples whose bytes an earlier sample had under another path
    shards_written: int
    shards_skipped: int

    def report(self) -> str:
        """A few lines for people: what was written, what was left out and where that is listed."""
        lines = [
            f"{self.records} records -> {self.samples} samples ({self.images} with an image, {self.text_only} "
            f"text-only, {self.captions} with a caption) in {len(self.shards)} shards under {self.out} "
            f"({self.shards_written} written now, {self.shards_skipped} finished earlier)"
        ]
        left_out = sum(self.failures.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.failures.items()))
        lines.append(f"left out: {left_out} record(s)" + (f" ({reasons}), listed in {self.failures_file}"
                                                            if left_out else ""))
        repeats = self.repeats_by_path + self.repeats_by_content
        lines.append(f"repeated images: {repeats} of {self.images} image sample(s) repeat an earlier one "
                     f"({self.repeats_by_path} by the same path, {self.repeats_by_content} byte-identical under "
                     f"another path): {self.distinct_images} distinct image(s), one target row each in a store")
        lines.append(f"lying extensions: {self.lying_extensions} image(s) stored under their real format")
        lines.append(f"duplicate ids: {self.duplicate_ids} record(s) share an id with an earlier one "
                     "(each is its own sample)")
        return "\n".join(lines)

    @property
    def failures_file(self) -> Path:
        return failures_path(self.out, self.prefix)


class _Failure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# --- the run -------------------------------------------------------------------------------------------------------
def write_llava_shards(
    json_path: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str | None = None,
    samples_per_shard: int | None = None,
    num_shards: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    max_image_bytes: int | None = None,
    progress: bool = True,
) -> ShardingSummary:
    """Write the records of the LLaVA JSON `json_path` as shards `PREFIX-00000.tar`... under `out` (see the
    module docstring for the layout and the rules), resuming an earlier run of the same arguments.

    `prefix` defaults to the JSON's file stem. `samples_per_shard` (default 10000) and `num_shards` exclude each
    other. `workers`: processes writing shards (default one per CPU, at most one per shard left to write; 1 writes
    in this process). `overwrite`: replace the files of `prefix` in `out` from another input or other arguments,
    and delete .tar files no run recorded, instead of refusing; another prefix's files are never touched.
    `max_image_bytes` (default 64 MiB): larger image files are left out unread. Raises UsageError for
    unusable input or arguments, JobError if a worker process dies.
    """
    records, source = _read_records(Path(json_path))
    prefix = Path(json_path).stem if prefix is None else prefix
    if not prefix or any(c in prefix for c in "/\\") or prefix.startswith("."):
        raise UsageError(f"prefix {prefix!r} cannot start a shard file name; give a plain name like 'llava'")
    if any(isinstance(r, dict) and "image" in r for r in records) and not Path(images).is_dir():
        raise UsageError(f"images folder {images} does not exist; pass the folder the records' `image` paths "
                         "are relative to")
    sizes = _shard_sizes(len(records), samples_per_shard, num_shards)
    max_image_bytes = DEFAULT_MAX_IMAGE_BYTES if max_image_bytes is None else max_image_bytes
    if max_image_bytes < 1:
        raise UsageError(f"max_image_bytes must be at least 1, got {max_image_bytes}")
    out = Path(out)
    root = str(Path(images).resolve())
    run = {
        "format": "llava-shards",
        "format_version": FORMAT_VERSION,
        "input": {"json": str(Path(json_path).resolve()), **source, "records": len(records)},
        "images": root,
        "arguments": {
            "prefix": prefix,
            "samples_per_shard": None if num_shards is not None else (samples_per_shard or DEFAULT_SAMPLES_PER_SHARD),
            "num_shards": num_shards,
            "shuffle_seed": seed if shuffle else None,
            "max_image_bytes": max_image_bytes,
        },
    }
    _claim(out, prefix, run, overwrite)

    order = list(range(len(records)))
    if shuffle:
        random.Random(seed).shuffle(order)
    key_digits = max(_KEY_DIGITS, len(str(max(sizes) - 1)))
    tasks, start = [], 0
    for index, size in enumerate(sizes):
        positions = order[start : start + size]
        tasks.append(ShardTask(index=index, path=str(out / f"{prefix}-{index:05d}.tar"), images=root,
                               key_digits=key_digits, max_image_bytes=max_image_bytes,
                               records=[(p, records[p]) for p in positions]))
        start += size

    for leftover in out.iterdir():  # what this prefix's writes killed before their rename left
        if TEMPORARY_INFIX in leftover.name and _owned_by(prefix, leftover.name):
            leftover.unlink()
    todo = [task for task in tasks if _finished(task) is None]
    left = sum(len(task.records) for task in todo)
    with tqdm(total=start, initial=start - left, desc="llava shards", unit="record", disable=not progress) as bar:
        for task in _write_all(todo, workers):
            bar.update(len(task.records))

    stats = [_finished(task) for task in tasks]
    missing = [Path(task.path).name for task, s in zip(tasks, stats) if s is None]
    if missing:
        raise JobError(f"shard {missing[0]} has no completion record after writing it; rerun to retry")
    _write_failures(failures_path(out, prefix), stats)
    return _summarise(out, tasks, stats, run, duplicate_ids=source["duplicate_ids"], written=len(todo))


def _read_records(path: Path) -> tuple[list, dict]:
    """The JSON's records and what identifies the file (bytes, sha256), plus its count of duplicate ids."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"LLaVA JSON {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read LLaVA JSON {path}: {exc.strerror or exc}") from None
    try:
        records = json.loads(data)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise UsageError(f"{path} holds a JSON {type(records).__name__}; a LLaVA file is a list of records")
    if not records:
        raise UsageError(f"{path} holds no records")
    ids = [r.get("id") for r in records if isinstance(r, dict) and isinstance(r.get("id"), (str, int))]
    return records, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                     "duplicate_ids": len(ids) - len(set(ids))}


def _shard_sizes(count: int, samples_per_shard: int | None, num_shards: int | None) -> list[int]:
    if samples_per_shard is not None and num_shards is not None:
        raise UsageError("give samples_per_shard or num_shards, not both")
    if num_shards is not None:
        if not 1 <= num_shards <= count:
            raise UsageError(f"num_shards must be between 1 and the number of records ({count}), got {num_shards}")
        base, extra = divmod(count, num_shards)
        return [base + (1 if shard < extra else 0) for shard in range(num_shards)]
    size = DEFAULT_SAMPLES_PER_SHARD if samples_per_shard is None else samples_per_shard
    if size < 1:
        raise UsageError(f"samples_per_shard must be at least 1, got {size}")
    full, rest = divmod(count, size)
    return [size] * full + ([rest] if rest else [])


# --- the output directory ------------------------------------------------------------------------------------------
def run_record_path(out: Path, prefix: str) -> Path:
    return out / f"{prefix}{RUN_RECORD_SUFFIX}"


def failures_path(out: Path, prefix: str) -> Path:
    return out / f"{prefix}{FAILURES_SUFFIX}"


def _owned_by(prefix: str, name: str) -> bool:
    """Whether the file `name` is one of `prefix`'s: a shard, its stats, the run record, the failures, or a
    write of one of them cut short. No name is two prefixes' (a shard number holds no hyphen)."""
    records = "|".join(re.escape(suffix) for suffix in (RUN_RECORD_SUFFIX, FAILURES_SUFFIX))
    own = rf"{re.escape(prefix)}(?:-\d{{5,}}(?:\.tar|_stats\.json)|{records})"
    return re.fullmatch(own, name.split(TEMPORARY_INFIX, 1)[0]) is not None


def _claim(out: Path, prefix: str, run: dict, overwrite: bool) -> None:
    """Make `prefix` in `out` this run's: resume a matching earlier run of it; refuse (or with `overwrite` clear)
    another run of it and .tar files no run recorded. Another prefix's files are left as they are."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {out} is a file; pass a directory for the shards")
    out.mkdir(parents=True, exist_ok=True)
    record = run_record_path(out, prefix)
    if record.exists():
        try:
            earlier = json.loads(record.read_text())
        except ValueError:
            earlier = {}
        difference = _run_difference(earlier, run)
        if difference is None:
            return
        if not overwrite:
            raise UsageError(f"{out} holds {prefix}-* shards of another run ({difference}); rerun with the same "
                             "input and arguments to resume, pass another --prefix to add these shards beside "
                             "them, choose another output directory, or pass --overwrite to replace them")
    unrecorded = _unrecorded_shards(out)
    if unrecorded and not overwrite:
        more = f" and {len(unrecorded) - 1} more .tar files" if len(unrecorded) > 1 else ""
        raise UsageError(f"{out} holds {unrecorded[0].name}{more} that no `pipeline shards llava` run recorded "
                         f"(no PREFIX{RUN_RECORD_SUFFIX} claims them); they would be read as part of this dataset: "
                         "move them away, choose another output directory, or pass --overwrite to delete them")
    for shard in unrecorded:
        shard.unlink()
        _stats_path(shard).unlink(missing_ok=True)
    # No record claims what is left of this prefix (stats, failures, cut writes): a fresh run starts without it.
    for path in out.iterdir():
        if _owned_by(prefix, path.name):
            path.unlink()
    atomic_write(record, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())


def _unrecorded_shards(out: Path) -> list[Path]:
    """The .tar files in `out` whose prefix has no run record: not cut by this tool, or their record is gone."""
    unrecorded = []
    for path in sorted(out.glob("*.tar")):
        match = _SHARD_NAME.fullmatch(path.name)
        if match is None or not run_record_path(out, match["prefix"]).exists():
            unrecorded.append(path)
    return unrecorded


def _run_difference(earlier: dict, run: dict) -> str | None:
    """How an earlier run's record differs from this run in what decides the shards' bytes, or None."""
    if earlier.get("format_version") != run["format_version"]:
        return (f"{run['arguments']['prefix']}{RUN_RECORD_SUFFIX} has format version "
                f"{earlier.get('format_version')}, this tool writes {FORMAT_VERSION}")
    old, new = earlier.get("input", {}), run["input"]
    if (old.get("sha256"), old.get("bytes")) != (new["sha256"], new["bytes"]):
        return (f"its JSON {old.get('json')} had sha256 {str(old.get('sha256'))[:12]}.. ({old.get('bytes')} bytes), "
                f"this one has {new['sha256'][:12]}.. ({new['bytes']} bytes)")
    if earlier.get("images") != run["images"]:
        return f"--images was {earlier.get('images')}, now {run['images']}"
    for name, value in run["arguments"].items():
        if earlier.get("arguments", {}).get(name) != value:
            return f"{_FLAGS[name]} was {earlier.get('arguments', {}).get(name)!r}, now {value!r}"
    return None


def _stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")


def _finished(task: ShardTask) -> dict | None:
    """The shard's stats if its tar is complete (a stats file describing the tar that is there), else None."""
    shard = Path(task.path)
    try:
        stats = json.loads(_stats_path(shard).read_text())
        return stats if stats.get("bytes") == shard.stat().st_size else None
    except (OSError, ValueError):
        return None


def _write_failures(path: Path, stats: list[dict]) -> None:
    rows = sorted((f for s in stats for f in s["failures"]), key=lambda f: f["record"])
    with atomic_file(path) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA), f)


def _summarise(out: Path, tasks: list[ShardTask], stats: list[dict], run: dict, *, duplicate_ids: int,
               written: int) -> ShardingSummary:
    total = Counter()
    for s in stats:
        total.update({k: s[k] for k in ("samples", "images", "text_only", "captions", "lying_extensions")})
    repeats = _repeats(stats)
    return ShardingSummary(
        out=out, prefix=run["arguments"]["prefix"], shards=tuple(Path(task.path) for task in tasks),
        records=run["input"]["records"], samples=total["samples"], images=total["images"],
        text_only=total["text_only"], captions=total["captions"],
        failures=dict(Counter(f["reason"] for s in stats for f in s["failures"])),
        lying_extensions=total["lying_extensions"], duplicate_ids=duplicate_ids,
        distinct_images=repeats["distinct"], repeats_by_path=repeats["path"], repeats_by_content=repeats["content"],
        shards_written=written, shards_skipped=len(tasks) - written,
    )


def _repeats(stats: list[dict]) -> Counter:
    """Over the image samples of `stats` (shards in order): "distinct" contents, and the samples repeating an
    earlier one's bytes by its "path" or, byte-identical, under another path ("content")."""
    paths: set[str] = set()
    contents: set[str] = set()
    counts = Counter(distinct=0, path=0, content=0)
    for s in stats:
        for path, sha1 in zip(s["image_paths"], s["image_sha1"], strict=True):
            if sha1 not in contents:
                counts["distinct"] += 1
            elif path in paths:
                counts["path"] += 1
            else:
                counts["content"] += 1
            paths.add(path)
            contents.add(sha1)
    return counts


# --- workers -------------------------------------------------------------------------------------------------------
def _write_all(tasks: list[ShardTask], workers: int | None):
    """Write every task's shard; yields each task when its shard is finished (completion order)."""
    count = available_cpus() if workers is None else workers
    count = max(1, min(count, len(tasks)))
    if count == 1:
        for task in tasks:
            write_shard(task)
            yield task
        return
    # spawn, not fork: the caller may hold threads (tqdm's monitor, Ray's) that a forked child inherits broken.
    # At most two tasks per worker are queued, so the pickled records of the whole JSON are never in flight at once.
    queue = iter(tasks)
    with ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(write_shard, task): task for task in itertools.islice(queue, 2 * count)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    yield pending.pop(future)
                    for task in itertools.islice(queue, 1):
                        pending[pool.submit(write_shard, task)] = task
        except BrokenProcessPool as exc:
            raise JobError(f"a process writing shards died ({exc}); out of memory? rerun (finished shards are "
                           "kept), or pass fewer workers") from None
        finally:
            for future in pending:
                future.cancel()


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this process as soon as `parent`, the process that started the pool, is gone.
    A SIGKILLed parent runs no cleanup, and its orphaned workers would wait on the pool's queue for ever. Linux
    sends the death signal when the spawning thread ends, not the process: the pool spawns its workers in the
    thread that submits to it, which runs `_write_all` until the pool is shut down."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    # The parent may have died before the death signal was set, and then nothing will ever send it.
    if os.getppid() != parent:
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)


def write_shard(task: ShardTask) -> dict:
    """Write one shard (tar, then its stats file) and return its stats. Runs in worker processes."""
    shard = Path(task.path)
    stats = {"shard": shard.name, "samples": 0, "images": 0, "text_only": 0, "captions": 0, "lying_extensions": 0,
             "failures": [], "image_paths": [], "image_sha1": []}
    # A reader never sees a half-written shard under its final name.
    with atomic_file(shard) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (position, record) in enumerate(task.records):
                try:
                    members, lied = _sample_members(record, task.images, task.max_image_bytes)
                except _Failure as failure:
                    stats["failures"].append(_failure_row(position, record, failure))
                    continue
                key = f"{task.index:05d}{i:0{task.key_digits}d}"
                for extension, payload in members:
                    add_member(tar, f"{key}.{extension}", payload)
                extensions = [extension for extension, _ in members]
                stats["samples"] += 1
                stats["images"] += len(extensions) > 1
                stats["text_only"] += len(extensions) == 1
                stats["captions"] += "txt" in extensions
                stats["lying_extensions"] += lied
                if "image" in record:  # then the image is the sample's first member
                    stats["image_paths"].append(record["image"])
                    stats["image_sha1"].append(hashlib.sha1(members[0][1]).hexdigest())
    stats["bytes"] = shard.stat().st_size
    atomic_write(_stats_path(shard), (json.dumps(stats, indent=1) + "\n").encode())
    return stats


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Add a file member whose header holds nothing of this machine or moment (fixed mtime, mode, no owner)."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _sample_members(record, images: str, max_bytes: int) -> tuple[list[tuple[str, bytes]], bool]:
    """The sample's members [(extension, bytes)] in tar order, and whether its image file's extension lied."""
    _check_record(record)
    members, lied = [], False
    if "image" in record:
        data, extension, lied = _read_image(images, record["image"], max_bytes)
        members.append((extension, data))
    payload = {"id": record["id"], **({"image": record["image"]} if "image" in record else {}),
               "conversations": record["conversations"], **record}
    caption = caption_of(record)
    try:
        if caption:
            members.append(("txt", caption.encode("utf-8")))
        members.append(("json", json.dumps(payload, ensure_ascii=False).encode("utf-8")))
    except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to lone surrogates, which UTF-8 cannot hold
        raise _Failure("bad record", f"holds a lone surrogate ({exc.object[exc.start]!r}), which is no Unicode "
                                     "text") from None
    return members, lied


def _check_record(record) -> None:
    if not isinstance(record, dict):
        raise _Failure("bad record", f"a JSON {type(record).__name__}, not an object")
    if not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
        raise _Failure("bad record", "no `id` (a string or an integer)")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Failure("bad record", "`conversations` is missing or not a non-empty list")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise _Failure("bad record", f"conversations[{i}] is not {{\"from\": str, \"value\": str}}")
    if "image" in record and not (isinstance(record["image"], str) and record["image"]):
        raise _Failure("bad record", "`image` is not a non-empty path")


def _read_image(images: str, relative: str, max_bytes: int) -> tuple[bytes, str, bool]:
    """(bytes, extension of their real format, whether the file's own extension names another format) of the
    regular file `relative` inside the resolved folder `images`, of at most `max_bytes`. A refusal never quotes
    the file's content: the JSON may name a file its author wants to read, and failures.parquet would show it."""
    path = os.path.join(images, relative)
    resolved = _resolve_inside(images, relative)
    try:
        found = os.stat(resolved)
    except FileNotFoundError:
        raise _Failure("missing", f"no file {path}") from None
    except OSError as exc:
        raise _Failure("unreadable", f"{path}: {type(exc).__name__}: {exc.strerror or exc}") from None
    _check_file(path, found, max_bytes)
    try:
        # O_NONBLOCK: a FIFO swapped in since the stat must not hang the open; the fstat below then refuses it.
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise _Failure("unreadable", f"{path}: {type(exc).__name__}: {exc.strerror or exc}") from None
    with os.fdopen(descriptor, "rb") as file:
        opened = os.fstat(descriptor)
        if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
            raise _Failure("unreadable", f"{path} was replaced by another file while it was opened")
        _check_file(path, opened, max_bytes)
        data = file.read(max_bytes + 1)  # a file growing (or lying about its size) is still read only this far
    if len(data) > max_bytes:
        raise _Failure("too large", f"{path} holds more than {max_bytes} bytes (--max-image-bytes)")
    if not data:
        raise _Failure("empty", f"{path} is 0 bytes")
    extension = image_extension(data)
    if extension is None:
        raise _Failure("not an image", f"{path} starts with none of the JPEG, PNG, GIF, WebP, BMP or TIFF "
                                       "signatures")
    named = posixpath.splitext(relative)[1].lstrip(".").lower()
    named = _EXTENSION_ALIASES.get(named, named)
    return data, extension, bool(named) and named != extension


def _resolve_inside(images: str, relative: str) -> str:
    """The path `relative` names, symlinks resolved, if it lies inside the resolved folder `images`."""
    if "\0" in relative:
        raise _Failure("bad path", f"image path {relative!r} holds a NUL byte")
    if os.path.isabs(relative):
        raise _Failure("bad path", f"image path {relative!r} is absolute; `image` paths are relative to the images "
                                   f"folder {images}")
    path = os.path.join(images, relative)
    try:
        resolved = os.path.realpath(path)
    except (OSError, ValueError) as exc:  # ValueError: a lone surrogate, which no file name can hold
        raise _Failure("bad path", f"image path {relative!r} names no possible file ({exc})") from None
    if os.path.commonpath([images, resolved]) != images:
        raise _Failure("outside images", f"{path} resolves to {resolved}, outside the images folder {images}")
    return resolved


def _check_file(path: str, found: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(found.st_mode):
        kind = "a directory" if stat.S_ISDIR(found.st_mode) else "a device, FIFO or socket"
        raise _Failure("not a file", f"{path} is {kind}, not a regular file")
    if found.st_size > max_bytes:
        raise _Failure("too large", f"{path} is {found.st_size} bytes, more than {max_bytes} (--max-image-bytes)")


def image_extension(data: bytes) -> str | None:
    """The extension of the image format `data` is in (jpg, png, gif, webp, bmp, tiff), from its first bytes;
    None for anything else. A file's name is not consulted: some datasets' names lie."""
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    return None


def caption_of(record: dict) -> str | None:
    """The record's caption (see the module docstring's rule), or None: its own `caption` string, else the gpt
    answer of a single-turn image record whose human turn is `<image>` plus a one-line instruction, no question."""
    if "image" not in record:
        return None
    own = record.get("caption")
    if isinstance(own, str):
        return own.strip() or None
    turns = record["conversations"]
    if [turn["from"] for turn in turns] != ["human", "gpt"] or IMAGE_PLACEHOLDER not in turns[0]["value"]:
        return None
    instruction = turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    if "\n" in instruction or instruction.endswith("?"):
        return None
    return turns[1]["value"].strip() or None


def _failure_row(position: int, record, failure: _Failure) -> dict:
    fields = record if isinstance(record, dict) else {}
    image = fields.get("image")
    return {"record": position, "id": None if fields.get("id") is None else _storable(str(fields["id"])),
            "image": _storable(image) if isinstance(image, str) else None, "reason": failure.reason,
            "detail": _storable(failure.detail)}


def _storable(text: str) -> str:
    """`text` with lone surrogates (from JSON escapes such as \\ud800) written as escapes, which Parquet can hold."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
