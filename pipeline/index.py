"""`index.parquet`: one row per sample of the shards, in a stable global order.

Row `i` of every target array is the sample in row `i` here. Columns (the first five are the store
contract of DESIGN.md; the rest let workers read an image without scanning its tar again):

    row int64 | shard str | key str | image_sha1 str | caption_present bool |
    has_conversation bool | image_member str | image_offset int64 | image_size int64

`image_sha1` is "" for a sample without an image member; such rows get `valid = 0` downstream.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.shards import SampleMembers, list_shards, scan_shard, shard_name

INDEX_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image_sha1", pa.string()),
        ("caption_present", pa.bool_()),
        ("has_conversation", pa.bool_()),
        ("image_member", pa.string()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
    ]
)


@dataclass
class ShardIndex:
    """The index of a shard set plus what went wrong while reading it."""

    table: pa.Table
    urls: list[str]
    fingerprint: str
    shard_errors: list[dict]  # {"shard", "key", "error"} for truncated or unreadable shards


def _conversation_present(raw: bytes | None) -> bool:
    if not raw:
        return False
    try:
        turns = json.loads(raw).get("conversations")
    except (ValueError, AttributeError):
        return False
    return isinstance(turns, list) and len(turns) > 0


def _caption_present(sample: SampleMembers) -> bool:
    text = sample.caption.decode("utf-8", errors="replace").strip() if sample.caption else ""
    return bool(text) or _conversation_present(sample.conversation)


def dataset_fingerprint(table: pa.Table) -> str:
    """sha256 over the ordered (shard name, key, image sha1) of every row."""
    digest = hashlib.sha256()
    for shard, key, sha1 in zip(*(table.column(c).to_pylist() for c in ("shard", "key", "image_sha1"))):
        digest.update(f"{shard}\t{key}\t{sha1}\n".encode())
    return digest.hexdigest()


def build_index(shards: str, *, threads: int = 8, progress: bool = True) -> ShardIndex:
    """Scan every shard (in parallel threads) and return the index in shard order, then file order."""
    urls = list_shards(shards)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        listings = list(
            tqdm(pool.map(scan_shard, urls), total=len(urls), desc="index", unit="shard", disable=not progress)
        )
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    shard_errors = []
    for listing in listings:
        name = shard_name(listing.url)
        if listing.error:
            shard_errors.append({"shard": name, "key": listing.broken_key or "", "error": listing.error})
        for sample in listing.samples:
            columns["row"].append(len(columns["row"]))
            columns["shard"].append(name)
            columns["key"].append(sample.key)
            columns["image_sha1"].append(sample.image_sha1)
            columns["caption_present"].append(_caption_present(sample))
            columns["has_conversation"].append(_conversation_present(sample.conversation))
            columns["image_member"].append(sample.image_member or "")
            columns["image_offset"].append(sample.image_offset)
            columns["image_size"].append(sample.image_size)
    table = pa.table(columns, schema=INDEX_SCHEMA)
    return ShardIndex(table=table, urls=urls, fingerprint=dataset_fingerprint(table), shard_errors=shard_errors)


def first_difference(expected: pa.Table, actual: pa.Table) -> str:
    """Describe the first row where two indexes disagree in any column, for refusal messages."""
    if expected.column_names != actual.column_names:
        return f"the index columns differ ({expected.column_names} vs {actual.column_names})"
    old, new = expected.to_pylist(), actual.to_pylist()
    for row, (a, b) in enumerate(zip(old, new)):
        if a == b:
            continue
        if (a["shard"], a["key"]) != (b["shard"], b["key"]):
            return f"row {row}: the store has {a['shard']}/{a['key']} but the shards give {b['shard']}/{b['key']}"
        if a["image_sha1"] != b["image_sha1"]:
            return f"row {row} ({a['shard']}/{a['key']}): the image bytes differ"
        column = next(c for c in expected.column_names if a[c] != b[c])
        return (f"row {row} ({a['shard']}/{a['key']}): {column} is {a[column]!r} in the store but "
                f"{b[column]!r} in the shards")
    if len(old) != len(new):
        return f"the store has {len(old)} rows but the shards give {len(new)}"
    return "no difference"


def duplicate_rows(table: pa.Table) -> dict[int, str]:
    """Rows whose (shard, key) appeared earlier in the index, with the reason they are not used.

    The rule every reader shares: the first occurrence of a key in its shard is the sample; later ones are
    recorded failures of precompute and skipped by the training loader.
    """
    first: dict[tuple[str, str], int] = {}
    duplicates = {}
    for row, location in enumerate(zip(table.column("shard").to_pylist(), table.column("key").to_pylist())):
        if location in first:
            duplicates[row] = f"duplicate key {location[1]} in shard {location[0]} (first at row {first[location]})"
        else:
            first[location] = row
    return duplicates
