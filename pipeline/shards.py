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
import posixpath
import tarfile
from dataclasses import dataclass, field

import fsspec
from braceexpand import braceexpand

from pipeline.errors import UsageError
from pipeline.images import ImageDecodeError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSION = "txt"
CONVERSATION_EXTENSION = "json"


def list_shards(shards: str) -> list[str]:
    """Resolve SHARDS (directory, brace pattern, single file; local or fsspec URL) to an ordered list of tar URLs."""
    urls: list[str] = []
    for pattern in braceexpand(shards):
        fs, path = fsspec.core.url_to_fs(pattern)
        if fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
            if not found:
                raise UsageError(f"no .tar shards in directory {pattern}")
            urls.extend(_unstrip(pattern, p) for p in found)
        elif fs.exists(path):
            urls.append(pattern)
        else:
            raise UsageError(f"shard {pattern} does not exist; pass a directory, a brace pattern or a tar file")
    names = [shard_name(u) for u in urls]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"two shards share the name {duplicates[0]}; shard names must be unique")
    return urls


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
                    current = SampleMembers(key=key)
                    samples.append(current)
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
    """An indexed sample's image bytes (see pipeline/index.py), checked against the sha1 the index recorded."""
    data = read_member_bytes(file, offset, size)
    if hashlib.sha1(data).hexdigest() != sha1:
        raise ImageDecodeError("image bytes changed since the shards were indexed (sha1 differs)")
    return data


def read_member_bytes(file, offset: int, size: int) -> bytes:
    """Read `size` bytes at `offset` from an open binary file (local or fsspec); short reads are errors."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes at offset {offset}, got {len(data)} (truncated shard?)")
    return data
