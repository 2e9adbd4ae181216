"""WebDataset shards in img2dataset layout: listing them and reading their samples.

A shard is a tar file whose members are grouped into samples by key: `KEY.jpg` (or png, webp, ...),
`KEY.txt` (caption) and/or `KEY.json` (LLaVA conversation or img2dataset metadata). The key is the
member's base name up to its first dot, as webdataset defines it.

SHARDS, wherever the CLI takes it, may be a local directory (every `*.tar` in it, sorted), a brace
pattern (`shards/demo-{00000..00003}.tar`), a single tar, or any of those as an fsspec URL
(`s3://bucket/shards/{00000..00099}.tar`).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import fsspec
from braceexpand import UnbalancedBracesError, braceexpand
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.errors import UsageError
from pipeline.data.images import ImageDecodeError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSION = "txt"
CONVERSATION_EXTENSION = "json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as a listing describes it, without reading it: its URL and its identity.

    The identity is what changes when the file is rewritten: its size, plus its ETag on object stores (which
    change with every write) or else its modification time (`st_mtime_ns` for local files, the listing's
    last-modified time elsewhere). A store records it per shard so that a rerun re-reads only the shards whose
    identity changed (see pipeline/data/index.py).
    """

    url: str
    size: int  # -1 where the filesystem does not say
    mtime_ns: int | None
    etag: str | None

    @property
    def name(self) -> str:
        return shard_name(self.url)

    def same_file(self, size: int, mtime_ns: int | None, etag: str | None) -> bool:
        """Whether a shard recorded with this size, mtime and ETag is this file unchanged. The ETag decides where
        both sides have one, else the mtime; a shard whose identity is unknown is never the same."""
        if size != self.size:
            return False
        if etag is not None and self.etag is not None:
            return etag == self.etag
        return mtime_ns is not None and mtime_ns == self.mtime_ns


def list_shards(shards: str) -> list[str]:
    """Resolve SHARDS (directory, brace pattern, single file; local or fsspec URL) to an ordered list of tar URLs."""
    return [info.url for info in list_shard_infos(shards)]


def list_shard_infos(shards: str) -> list[ShardInfo]:
    """`list_shards` with each shard's identity, from the listing alone (one `ls` per directory, one `info` per
    named file): no shard is opened."""
    infos: list[ShardInfo] = []
    for pattern in expand_braces(shards):
        fs, path = fsspec.core.url_to_fs(pattern)
        if fs.isdir(path):
            entries = sorted((e for e in fs.ls(path, detail=True) if e["name"].endswith(".tar")),
                             key=lambda e: e["name"])
            if not entries:
                raise UsageError(f"no .tar shards in directory {pattern}")
            infos.extend(_shard_info(fs, _unstrip(pattern, e["name"]), e) for e in entries)
            continue
        try:
            entry = fs.info(path)
        except FileNotFoundError:
            entry = None
        if entry is None or entry.get("type") == "directory":
            raise UsageError(f"shard {pattern} does not exist; pass a directory, a brace pattern or a tar file")
        infos.append(_shard_info(fs, pattern, entry))
    names = [info.name for info in infos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two shards share the name {duplicates[0]}; shard names must be unique")
    return infos


def expand_braces(shards: str) -> list[str]:
    """The paths or URLs a SHARDS brace pattern stands for (`shard-{00000..00002}.tar` -> three names; a string
    without braces -> itself); UsageError naming the pattern if its braces do not pair up."""
    try:
        return list(braceexpand(shards))
    except UnbalancedBracesError:
        raise UsageError(f"shards {shards}: unbalanced braces; write a range with both braces, as in "
                         "shard-{00000..00009}.tar, or escape a literal brace as \\{") from None


_ETAG_KEYS = ("ETag", "etag", "e_tag")  # s3fs, gcsfs / adlfs, others
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified")


def _shard_info(fs, url: str, entry: dict) -> ShardInfo:
    if isinstance(fs, LocalFileSystem):
        # The exact nanoseconds (fsspec gives a float); a stat is metadata only, no byte of the file is read.
        stat = os.stat(entry["name"])
        return ShardInfo(url=url, size=stat.st_size, mtime_ns=stat.st_mtime_ns, etag=None)
    etag = next((str(entry[k]) for k in _ETAG_KEYS if entry.get(k)), None)
    mtime = next((_nanoseconds(entry[k]) for k in _MTIME_KEYS if entry.get(k) is not None), None)
    size = entry.get("size")
    return ShardInfo(url=url, size=int(size) if size is not None else -1, mtime_ns=mtime, etag=etag)


def _nanoseconds(value) -> int | None:
    """A listing's modification time (seconds since the epoch, a datetime or an ISO string) in ns, or None."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return (value - _EPOCH) // timedelta(microseconds=1) * 1000
    if isinstance(value, (int, float)):
        return int(round(value * 1e9))
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _unstrip(pattern: str, child: str) -> str:
    """Give a listed child the protocol prefix the user wrote: fsspec returns remote paths without it."""
    if "://" not in pattern:
        return child
    return f"{pattern.split('://', 1)[0]}://{child}"


def shard_name(url: str) -> str:
    """The shard's name as stored in `index.parquet`: its base name, so moving the data keeps the store valid."""
    return posixpath.basename(url.rstrip("/"))


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/000001.tar.jpg`-style names: key = base name up to the first dot, extension = the rest, lower-cased."""
    base = posixpath.basename(name)
    key, _, ext = base.partition(".")
    prefix = posixpath.dirname(name)
    return (f"{prefix}/{key}" if prefix else key), ext.lower()


@dataclass
class SampleMembers:
    """Where one sample's parts lie inside its tar (byte offsets of the member data)."""

    key: str
    # The sample's bytes in the tar: from its first member's header to the end of its last member's data (padded to
    # the tar block, as tarfile reads it). One read of this span gives every member (image, caption,
    # conversation), which is how training reads a sample.
    offset: int = -1
    end: int = -1
    image_member: str | None = None
    image_offset: int = -1
    image_size: int = -1
    image_sha1: str = ""
    caption: bytes | None = None
    conversation: bytes | None = None
    extra: list[str] = field(default_factory=list)


@dataclass
class ShardListing:
    """The samples of one shard in file order, and the reason reading stopped early, if it did."""

    url: str
    samples: list[SampleMembers]
    error: str | None = None
    broken_key: str | None = None  # the sample cut by the damage, if any


def scan_shard(url: str) -> ShardListing:
    """Read one tar front to back and group its members into samples (consecutive members sharing a key).

    Captions and conversations are small and kept; images are hashed and located (offset, size) so
    the precompute workers can read exactly the bytes they need later. A truncated or corrupt tar keeps
    the samples read before the damage and reports the damage in `ShardListing.error`; so does a tar that
    stops early without an error from `tarfile` (a cut or damaged member header, a missing end-of-archive
    marker), which `_check_end_of_archive` catches.
    """
    samples: list[SampleMembers] = []
    current: SampleMembers | None = None
    try:
        with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is None or current.key != key:
                    current = SampleMembers(key=key, offset=member.offset)
                    samples.append(current)
                current.end = member.offset_data + -(-member.size // _TAR_BLOCK) * _TAR_BLOCK  # data + its padding
                if ext in IMAGE_EXTENSIONS and current.image_member is None:
                    current.image_member = member.name
                    current.image_offset = member.offset_data
                    current.image_size = member.size
                    current.image_sha1 = hashlib.sha1(tar.extractfile(member).read()).hexdigest()
                elif ext == CAPTION_EXTENSION:
                    current.caption = tar.extractfile(member).read()
                elif ext == CONVERSATION_EXTENSION:
                    current.conversation = tar.extractfile(member).read()
                else:
                    current.extra.append(member.name)
            damage = _check_end_of_archive(raw, tar.offset)
    except (tarfile.TarError, EOFError, OSError) as exc:
        # The sample being read when the tar broke may be missing parts: drop it rather than index half of it.
        dropped = samples.pop().key if samples else None
        error = f"shard is truncated or corrupt after {len(samples)} whole samples ({exc})"
        if dropped:
            error += f"; sample {dropped} and any after it are skipped"
        return ShardListing(url=url, samples=samples, error=error, broken_key=dropped)
    if damage is not None:
        reason, broken_key = damage
        return ShardListing(url=url, samples=samples, broken_key=broken_key,
                            error=f"shard is truncated or corrupt after {len(samples)} whole samples ({reason})")
    return ShardListing(url=url, samples=samples)


_TAR_BLOCK = 512
_TAR_NAME_FIELD = 100  # bytes of a ustar header that hold the member name


def _check_end_of_archive(raw, offset: int) -> tuple[str, str | None] | None:
    """Why a tar that `tarfile` read to its end without an error did not end properly, or None if it did.

    `tarfile` stops silently at a member header that is cut or damaged, so the samples after it vanish: a whole
    tar ends with zero blocks where the next header would be. Returns (reason, key of the damaged member if its
    name is legible). Every member before `offset` was read whole, so those samples stay.
    """
    raw.seek(offset)
    head = raw.read(_TAR_BLOCK)
    if not head:
        return f"it ends at byte {offset} without the tar end-of-archive marker: cut short?", None
    if not head.strip(b"\0"):
        return None  # the end-of-archive marker; what follows is padding
    if len(head) == _TAR_BLOCK:
        return f"the member header at byte {offset} is damaged; the members from there on are lost", None
    # A cut header still names its member when the cut falls after the name field.
    name = head[:_TAR_NAME_FIELD].split(b"\0", 1)[0].decode("utf-8", errors="replace")
    key = split_member_name(name)[0] if name and len(head) >= _TAR_NAME_FIELD else None
    return f"the member header at byte {offset} is cut; the members from there on are lost", key


def read_indexed_image(file, offset: int, size: int, sha1: str) -> bytes:
    """An indexed sample's image bytes (see pipeline/data/index.py), checked against the sha1 the index recorded."""
    data = read_member_bytes(file, offset, size)
    if hashlib.sha1(data).hexdigest() != sha1:
        raise ImageDecodeError("image bytes changed since the shards were indexed (sha1 differs)")
    return data


def split_sample_span(data: bytes) -> dict[str, bytes]:
    """The members of one sample's byte span (`SampleMembers.offset` to `.end`) as {extension: bytes}."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    members.setdefault(split_member_name(member.name)[1], tar.extractfile(member).read())
    except (tarfile.TarError, EOFError) as exc:
        raise ImageDecodeError(f"the sample's tar members are damaged ({exc})") from None
    return members


def read_member_bytes(file, offset: int, size: int) -> bytes:
    """Read `size` bytes at `offset` from an open binary file (local or fsspec); short reads are errors."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes at offset {offset}, got {len(data)} (truncated shard?)")
    return data
