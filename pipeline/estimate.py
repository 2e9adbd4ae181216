"""`pipeline estimate`: how big a store will be and how much teacher compute it takes, before any run.

    pipeline estimate --teachers manifests/teachers/olavlm.yaml --rows 558128
    pipeline estimate --teachers manifests/teachers/olavlm.yaml --shards data/llava_665k/shards --no-load
    pipeline estimate --teachers manifests/teachers/demo.yaml --rows 200 --shards runs/demo/shards --json

Per teacher, and in total, the bytes the teacher's store group takes on disk at each storage option (float16,
bfloat16, int8, pool 2, int8 + pool 2), and the teacher's forward FLOPs per image.

- Rows: a store holds one target row per distinct image content (the sha1 of the image bytes), not one per
  sample: repeated images and text-only samples cost no row. `rows` is that number when it is known (LLaVA's
  665K mix: 624,610 image records, about 379K distinct images). Without it the shards are indexed and given
  target rows as precompute gives them (`pipeline.data.index.assign_target_rows`: one per distinct non-empty
  `image_sha1`, none for the rows of a duplicate key); the estimate then reports the samples, distinct images,
  duplicates and samples without a target row that it found (`pipeline.data.index.ImageCounts`).
- Shapes: from the loaded model when its weights are on this machine (never downloaded), else the `target_shape`
  the manifest declares; with neither the teacher is reported as unknown.
- Compression: when the model loads, it runs on `sample_images` images (the first ones of `shards`, else
  scikit-image's bundled photographs), its targets are encoded for each option and compressed chunk by chunk with
  the store's own codec (zstd level `pipeline.data.store.ZSTD_LEVEL`, `rows_per_chunk` rows per chunk): the measured
  ratio. Without the model nothing is assumed: sizes are uncompressed (plus zstd's few bytes of framing per
  chunk), an upper bound. Random tiny demo weights compress differently from real ones (float16 demo targets:
  0.77 to 1.0), so measure on the real model where it matters.
- On-disk layout, as `pipeline.data.store` writes it: per array one shard file per block of `rows_per_block` rows with a
  16-byte index entry per chunk plus a 4-byte checksum, the int8 `scale` array ([rows, T'] float16), the `valid`
  flags and the JSON metadata (the group's attributes hold the per-channel mean and std). `index.parquet` and
  `errors.parquet` are not counted (about 100 bytes per sample).
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward of one image (matrix products, convolutions
  and attention; element-wise work is not counted); unknown without the weights.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.data.errors import UsageError
from pipeline.data.index import ImageCounts, assign_target_rows, build_index
from pipeline.data.store import ZSTD_LEVEL, Storage, new_teacher_attrs

OPTIONS: dict[str, Storage] = {
    "float16": Storage(),
    "bfloat16": Storage(dtype="bfloat16"),
    "int8": Storage(quantize="int8"),
    "pool2": Storage(pool=2),
    "int8+pool2": Storage(quantize="int8", pool=2),
}
# Sizes of zarr.json files as zarr-python 3 writes them for a store's arrays (measured on the demo store).
TARGET_METADATA_BYTES = 1180  # the target array's, and about the int8 scale array's
VALID_METADATA_BYTES = 560
VALID_BYTES_PER_BLOCK = 20  # one zstd frame of a block's valid flags, which are nearly all 1
SHARD_INDEX_ENTRY_BYTES = 16  # offset + length (uint64 each) per inner chunk
SHARD_INDEX_CHECKSUM_BYTES = 4  # crc32c of the shard index
ZSTD_FRAME_BYTES = 12  # what zstd adds to a chunk it cannot shrink (frame and block headers)
DEFAULT_SAMPLE_IMAGES = 16


@dataclass
class TeacherEstimate:
    """One teacher: `bytes[option]` on disk (None where an option does not apply, e.g. pooling one token)."""

    name: str
    kind: str
    target_shape: list[int] | None
    shape_source: str  # "model" | "declared" | "unknown"
    manifest_option: str  # the option the manifest's own storage fields choose
    bytes: dict[str, int | None] = field(default_factory=dict)
    compression: dict[str, float] = field(default_factory=dict)  # stored bytes / raw bytes, target array
    compression_source: str = "not measured (weights not local): sizes are uncompressed, an upper bound"
    flops_per_image: int | None = None
    flops_note: str = "unknown (weights not local)"


@dataclass
class Estimate:
    manifest: str
    rows: int  # target rows: distinct images
    rows_per_block: int
    rows_per_chunk: int
    teachers: list[TeacherEstimate]
    totals: dict[str, int | None]
    images_measured: str | None = None
    counted_in: str | None = None  # the shards `rows` was counted in, if it was
    counted: ImageCounts | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def manifest_option(spec) -> str:
    """The OPTIONS key matching a spec's storage fields (pool > 2 is named after its factor)."""
    storage = spec.storage()
    if storage == OPTIONS["bfloat16"]:
        return "bfloat16"
    name = "+".join(([] if storage.quantize == "none" else ["int8"])
                    + ([] if storage.pool == 1 else [f"pool{storage.pool}"]))
    return name or "float16"


def _group_metadata_bytes(spec_json: dict, shape: tuple[int, int], storage: Storage, rows_per_chunk: int) -> int:
    """The teacher group's zarr.json as precompute leaves it: the store's own attributes, completed with mean/std."""
    typical = -0.123456  # the stats are rounded to 6 decimals
    channels = shape[1]
    attrs = {**new_teacher_attrs(spec_json, "0" * 64, shape, storage, rows_per_chunk),
             "complete": True, "mean": [typical] * channels, "std": [typical] * channels}
    return len(json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"}, indent=2))


def _chunk_ratio(arrays: np.ndarray, rows_per_chunk: int) -> float:
    """Compressed / raw bytes of `arrays` [n, ...] cut into chunks of `rows_per_chunk` rows, as the store does."""
    from numcodecs import Zstd

    codec = Zstd(level=ZSTD_LEVEL)
    raw = compressed = 0
    for start in range(0, arrays.shape[0], rows_per_chunk):
        chunk = np.ascontiguousarray(arrays[start : start + rows_per_chunk]).tobytes()
        raw += len(chunk)
        compressed += len(codec.encode(chunk))
    return compressed / raw if raw else 1.0


def teacher_bytes(shape: tuple[int, int], storage: Storage, rows: int, rows_per_block: int, rows_per_chunk: int,
                  *, ratio: float | None = None, scale_ratio: float | None = None,
                  spec_json: dict | None = None) -> int | None:
    """Bytes on disk of one teacher group holding `rows` targets of `shape` [T, C] stored as `storage`;
    None when the option does not apply to the shape (pooling a token vector).

    `ratio` / `scale_ratio`: measured compressed / raw bytes of the target / scale chunks; None = no compression
    (each chunk then costs its raw bytes plus a zstd frame: an upper bound).
    """
    try:
        row_bytes = storage.array_row_nbytes(*shape)
    except UsageError:
        return None
    blocks = math.ceil(rows / rows_per_block)
    chunks_per_block = math.ceil(rows_per_block / rows_per_chunk)
    shard_index = blocks * (chunks_per_block * SHARD_INDEX_ENTRY_BYTES + SHARD_INDEX_CHECKSUM_BYTES)
    frames = math.ceil(rows / rows_per_chunk) * ZSTD_FRAME_BYTES
    measured = {"target": ratio, "scale": scale_ratio}

    total = 0.0
    for array, nbytes in row_bytes.items():
        raw = rows * nbytes
        total += raw + frames if measured[array] is None else raw * measured[array]
        total += shard_index + TARGET_METADATA_BYTES
    total += blocks * VALID_BYTES_PER_BLOCK + VALID_METADATA_BYTES
    total += _group_metadata_bytes(spec_json or {}, shape, storage, rows_per_chunk)
    return int(round(total))


def sample_images(shards: str | None, count: int) -> tuple[list, str]:
    """Up to `count` RGB images: the first decodable ones of `shards`, else scikit-image's bundled photographs."""
    from PIL import Image

    from pipeline.data.images import ImageDecodeError, decode_rgb

    if shards:
        import fsspec

        from pipeline.data.shards import IMAGE_EXTENSIONS, list_shards, split_member_name

        images = []
        for url in list_shards(shards):
            with fsspec.open(url, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and split_member_name(member.name)[1] in IMAGE_EXTENSIONS:
                        try:
                            images.append(decode_rgb(tar.extractfile(member).read()))
                        except ImageDecodeError:
                            continue
                        if len(images) == count:
                            return images, f"{count} images of {shards}"
        if not images:
            raise UsageError(f"no decodable image in {shards} to measure compression on")
        return images, f"{len(images)} images of {shards}"
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.retina(), data.stereo_motorcycle()[0]]
    images = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        # Other crops of the same photographs, so the sample is not eight images repeated.
        if i >= len(photos):
            w, h = photo.size
            shift = (i // len(photos)) / 8
            photo = photo.crop((int(w * shift), int(h * shift), w, h))
        images.append(photo.convert("RGB"))
    return images, f"{count} scikit-image sample photographs"


def count_images(shards: str) -> ImageCounts:
    """Index `shards` and count their samples and the target rows a store of them has (see the module doc)."""
    table = build_index(shards, progress=False).table
    return ImageCounts.of(assign_target_rows(table, None, rows_per_block=1))


def _measure(teacher, images: list, rows_per_chunk: int) -> tuple[dict[str, float], dict[str, float], int]:
    """Per option: (target compression ratio, scale compression ratio), and FLOPs of one image's forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = max(1, teacher.spec.batch_size)
    targets = torch.cat([teacher(teacher.preprocess(images[i : i + batch])) for i in range(0, len(images), batch)])
    targets = targets.numpy()
    ratios, scale_ratios = {}, {}
    tokens, channels = targets.shape[1:]
    for name, storage in OPTIONS.items():
        try:
            storage.stored_shape(tokens, channels)
        except UsageError:
            continue
        stored, scale = storage.encode(targets)
        ratios[name] = _chunk_ratio(stored, rows_per_chunk)
        if scale is not None:
            scale_ratios[name] = _chunk_ratio(scale, rows_per_chunk)
    counter = FlopCounterMode(display=False)
    with counter:
        teacher(teacher.preprocess(images[:1]))
    return ratios, scale_ratios, int(counter.get_total_flops())


def estimate(manifest_path: str, rows: int | None, *, rows_per_block: int = 64, rows_per_chunk: int = 1,
             shards: str | None = None, sample_count: int = DEFAULT_SAMPLE_IMAGES, load: bool = True) -> Estimate:
    """Bytes per teacher and option for a store of `rows` target rows (distinct images) built from
    `manifest_path` (see the module doc). `rows=None` counts them in `shards`, which then must be given.

    `load=False` never loads a model (declared shapes only, nothing measured).
    """
    import gc

    import teachers

    if rows is None and shards is None:
        raise UsageError("give --rows (the number of distinct images) or --shards to count them in")
    if rows is not None and rows < 1:
        raise UsageError(f"--rows must be >= 1, got {rows}")
    if rows_per_block < 1 or rows_per_chunk < 1 or rows_per_block % min(rows_per_chunk, rows_per_block):
        raise UsageError(f"rows_per_chunk {rows_per_chunk} must divide rows_per_block {rows_per_block}")
    rows_per_chunk = min(rows_per_chunk, rows_per_block)
    manifest = teachers.load_manifest(manifest_path)
    counted = None
    if rows is None:
        counted = count_images(shards)
        if counted.images == 0:
            raise UsageError(f"shards {shards} hold no image ({counted.samples} samples, all text-only): a store "
                             "of them has no target row")
        rows = counted.images
    images, images_note = None, None
    results = []
    for name, spec in manifest.teachers.items():
        report = TeacherEstimate(name=name, kind=spec.kind, target_shape=None, shape_source="unknown",
                                 manifest_option=manifest_option(spec))
        ratios: dict[str, float] = {}
        scale_ratios: dict[str, float] = {}
        teacher = _load_if_local(spec) if load else None
        if teacher is not None:
            if images is None:
                images, images_note = sample_images(shards, sample_count)
            report.target_shape, report.shape_source = list(teacher.target_shape), "model"
            ratios, scale_ratios, report.flops_per_image = _measure(teacher, images, rows_per_chunk)
            report.compression_source = f"measured on {images_note}"
            report.flops_note = "FlopCounterMode, one image"
            del teacher
            gc.collect()
        elif spec.target_shape is not None:
            report.target_shape, report.shape_source = list(spec.target_shape), "declared"
        if report.target_shape is not None:
            spec_json = spec.model_dump(mode="json")
            for option, storage in OPTIONS.items():
                report.bytes[option] = teacher_bytes(
                    tuple(report.target_shape), storage, rows, rows_per_block, rows_per_chunk,
                    ratio=ratios.get(option), scale_ratio=scale_ratios.get(option), spec_json=spec_json)
            report.compression = {k: round(v, 4) for k, v in ratios.items()}
        results.append(report)
    totals = {}
    for option in OPTIONS:
        if any(r.target_shape is None for r in results):
            totals[option] = None
        else:
            # An option that does not apply to a teacher (pooling a single token) leaves it as float16.
            totals[option] = sum(r.bytes[option] if r.bytes[option] is not None else r.bytes["float16"]
                                 for r in results)
    return Estimate(manifest=str(manifest_path), rows=rows, rows_per_block=rows_per_block,
                    rows_per_chunk=rows_per_chunk, teachers=results, totals=totals, images_measured=images_note,
                    counted_in=None if counted is None else shards, counted=counted)


def _load_if_local(spec):
    """The teacher on CPU when its files are on this machine (nothing is downloaded), else None."""
    import teachers

    try:
        teachers.get_teacher_class(spec.kind).locate(spec, download=False)
    except (OSError, ValueError):
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return teachers.create(spec, device="cpu")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_flops(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} FLOP"


def format_estimate(result: Estimate) -> str:
    """The table `pipeline estimate` prints."""
    options = list(OPTIONS)
    header = ["teacher", "target [T, C]", *options, "FLOPs/image"]
    lines = [[r.name, (f"{r.target_shape} ({r.shape_source})" if r.target_shape else "unknown"),
              *[(human_bytes(r.bytes.get(o)) + ("*" if o == r.manifest_option else "")) if r.target_shape
                else "unknown" for o in options],
              human_flops(r.flops_per_image)] for r in result.teachers]
    lines.append(["total", "", *[human_bytes(result.totals[o]) if result.totals[o] is not None else "unknown"
                                 for o in options], ""])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [f"{result.manifest}: {result.rows:,} target rows (one per distinct image), {result.rows_per_block} "
           f"rows per block, {result.rows_per_chunk} per chunk"]
    if result.counted is not None:
        c = result.counted
        out.append(f"counted in {result.counted_in}: {c.samples:,} samples, {c.images:,} distinct images, "
                   f"{c.duplicates:,} duplicates (image samples repeating an earlier image), {c.text_only:,} "
                   "without a target row (text-only or a duplicate key)")
    out += [fmt(header), *(fmt(row) for row in lines), ""]
    out.append("* = the storage the manifest asks for. pool2 applies to square token grids only (a teacher it "
               "does not fit stays float16 in the total).")
    for r in result.teachers:
        notes = [f"compression {r.compression_source}"]
        if r.compression:
            notes.append("ratios " + ", ".join(f"{k} {v:.3f}" for k, v in r.compression.items()))
        if r.flops_per_image is None:
            notes.append(f"FLOPs {r.flops_note}")
        if r.target_shape is None:
            notes.append("no shape: declare target_shape: [T, C] in the manifest or make the weights available")
        out.append(f"{r.name}: " + "; ".join(notes))
    out.append("Not counted: index.parquet and errors.parquet (about 100 bytes per sample).")
    return "\n".join(out)
