"""Issue 11 item 3: no exception from one image's bytes escapes decoding, in precompute or in training.

Real photos (skimage.data), encoded as JPEG, PNG and WebP by Pillow (with and without EXIF), are mutated in
seeded ways; every case must decode to RGB or fail as `ImageDecodeError`, and through the real precompute every
row must end up either with targets or with a recorded failure.
"""

from __future__ import annotations

import io
import random
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from pipeline.data.images import ImageDecodeError, decode_rgb
from tests.conftest import DEMO_TEACHERS

TEACHERS = ("depth", "seg", "gen")
FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Mutations can make a header claim a larger image; this bound keeps every case fast without changing the paths.
FUZZ_MAX_PIXELS = 4_000_000
GARBAGE_EXIF = b"Exif\x00\x00garbage, not a TIFF header at all"


# ---- real images, encoded ---------------------------------------------------------------------------------


def _photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {}
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        image = Image.fromarray(getattr(data, name)())  # camera is greyscale: mode L
        image.thumbnail((256, 256))
        photos[name] = image
    return photos


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90, so the transpose path really runs
    exif[0x010F] = "fuzz camera"  # Make
    exif[0x0131] = "pipeline test"  # Software
    exif[0x011A] = exif[0x011B] = 72.0  # X/YResolution: rationals, which fuzzing turns into bad types
    exif[0x0128] = 2  # ResolutionUnit: inch
    return exif.tobytes()


def _encode(image: Image.Image, fmt: str, exif: bytes | None = None) -> bytes:
    out = io.BytesIO()
    options = {"exif": exif} if exif else {}
    if fmt == "JPEG":
        options["quality"] = 85
        if exif:
            # With a DPI in the JFIF header Pillow leaves the EXIF block unread until exif_transpose; without
            # one it parses (and quietly drops) a malformed block while opening the file.
            options["dpi"] = (72, 72)
    elif fmt == "WEBP":
        options["quality"] = 80
    image.save(out, fmt, **options)
    return out.getvalue()


def _base_files() -> list[tuple[str, str, bytes]]:
    """(name, format, bytes) of every photo in every format, with and without EXIF."""
    files = []
    for name, image in _photos().items():
        for fmt in FORMATS:
            files.append((f"{name}-{fmt}", fmt, _encode(image, fmt)))
            files.append((f"{name}-{fmt}-exif", fmt, _encode(image, fmt, _exif())))
    return files


# ---- file structure: chunks and segments ------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _segments(data: bytes, fmt: str) -> list[tuple[int, int, bytes]]:
    """(start, end, kind) of the PNG chunks, the JPEG marker segments up to SOS, or the WebP RIFF chunks."""
    out = []
    if fmt == "PNG":
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + struct.unpack(">I", data[pos : pos + 4])[0]
            out.append((pos, end, data[pos + 4 : pos + 8]))
            pos = end
    elif fmt == "JPEG":
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            out.append((pos, end, data[pos + 1 : pos + 2]))
            if data[pos + 1] == 0xDA:  # start of scan: entropy-coded data follows
                break
            pos = end
    else:
        pos = 12
        while pos + 8 <= len(data):
            size = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
            end = pos + 8 + size + (size & 1)
            out.append((pos, end, data[pos : pos + 4]))
            pos = end
    return [(s, min(e, len(data)), k) for s, e, k in out]


def _fix_riff_size(data: bytes) -> bytes:
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


def _with_malformed_exif(data: bytes, fmt: str) -> bytes:
    """The file with its EXIF block replaced (or joined) by one that is not TIFF data."""
    if fmt == "PNG":
        chunks = _segments(data, fmt)
        body = b"".join(data[s:e] for s, e, k in chunks if k not in (b"IHDR", b"eXIf"))
        ihdr = next(data[s:e] for s, e, k in chunks if k == b"IHDR")
        return data[:8] + ihdr + _png_chunk(b"eXIf", GARBAGE_EXIF[6:]) + body
    if fmt == "JPEG":
        kept = b"".join(data[s:e] for s, e, k in _segments(data, fmt) if not (k == b"\xe1" and
                                                                              data[s + 4 : s + 8] == b"Exif"))
        scan = data[_segments(data, fmt)[-1][1] :]
        app1 = b"\xff\xe1" + struct.pack(">H", len(GARBAGE_EXIF) + 2) + GARBAGE_EXIF
        return data[:2] + app1 + kept + scan
    # WebP: an extended file (VP8X) that says it carries EXIF, and an EXIF chunk that is garbage.
    width, height = Image.open(io.BytesIO(data)).size
    chunks = [data[s:e] for s, e, k in _segments(data, fmt) if k not in (b"VP8X", b"EXIF")]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0])
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    payload = GARBAGE_EXIF[6:] + b"\x00" * (len(GARBAGE_EXIF[6:]) & 1)
    exif = b"EXIF" + struct.pack("<I", len(GARBAGE_EXIF) - 6) + payload
    return _fix_riff_size(b"RIFF\x00\x00\x00\x00WEBP" + vp8x + b"".join(chunks) + exif)


# ---- mutations --------------------------------------------------------------------------------------------


def _bit_flips(rng: random.Random, data: bytes, fmt: str) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _header_flips(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Flips in the first bytes, where dimensions, modes and segment lengths live."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(min(len(out), 64))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(rng: random.Random, data: bytes, fmt: str) -> bytes:
    n = rng.randint(1, 64)
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(n) + data[at + n :]


def _truncate(rng: random.Random, data: bytes, fmt: str) -> bytes:
    return data[: rng.randint(1, max(1, len(data) - 1))]


def _duplicate_segment(rng: random.Random, data: bytes, fmt: str) -> bytes:
    segments = _segments(data, fmt) or [(0, len(data), b"")]  # a first mutation may have left none
    start, end, _ = rng.choice(segments)
    at = rng.choice([start, end, rng.randrange(len(data))])
    out = data[:at] + data[start:end] + data[at:]
    return _fix_riff_size(out) if fmt == "WEBP" and rng.random() < 0.5 else out


def _insert_random(rng: random.Random, data: bytes, fmt: str) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 256)) + data[at:]


def _zero_range(rng: random.Random, data: bytes, fmt: str) -> bytes:
    n = rng.randint(1, max(1, len(data) // 4))
    at = rng.randrange(len(data))
    return data[:at] + b"\x00" * min(n, len(data) - at) + data[at + n :]


def _exif_bytes(rng: random.Random, data: bytes, fmt: str) -> bytes:
    """Flips and overwrites inside a valid EXIF block (PNG CRC kept right), so the TIFF parser itself is fuzzed."""
    for start, end, kind in _segments(data, fmt):
        if fmt == "PNG" and kind == b"eXIf":
            span = (start + 8, end - 4)
        elif fmt == "JPEG" and kind == b"\xe1" and data[start + 4 : start + 10] == b"Exif\x00\x00":
            span = (start + 10, end)
        elif fmt == "WEBP" and kind == b"EXIF":
            span = (start + 8, end)
        else:
            continue
        if span[0] >= span[1]:
            break
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(*span)
            out[at] = out[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
        if fmt == "PNG":
            out[span[1] : span[1] + 4] = struct.pack(">I", zlib.crc32(bytes(out[start + 4 : span[1]])))
        return bytes(out)
    return _bit_flips(rng, data, fmt)  # no EXIF block to aim at


def _malformed_exif(rng: random.Random, data: bytes, fmt: str) -> bytes:
    return _with_malformed_exif(data, fmt)


MUTATIONS = (_bit_flips, _header_flips, _overwrite, _truncate, _duplicate_segment, _insert_random, _zero_range,
             _exif_bytes, _malformed_exif)  # _malformed_exif last: it is never a second mutation


def _fuzz_cases(seed: int, rounds: int, formats=FORMATS) -> list[tuple[str, str, bytes]]:
    """(case id, format, bytes): every base file x every mutation, `rounds` times; some get a second mutation."""
    rng = random.Random(seed)
    cases = []
    for name, fmt, data in _base_files():
        if fmt not in formats:
            continue
        for round_ in range(rounds):
            for mutation in MUTATIONS:
                mutated = mutation(rng, data, fmt)
                label = mutation.__name__.lstrip("_")
                if rng.random() < 0.25:
                    second = rng.choice(MUTATIONS[:-1])
                    mutated = second(rng, mutated, fmt)
                    label += "+" + second.__name__.lstrip("_")
                cases.append((f"{name}/{round_}/{label}", fmt, mutated))
    return cases


def _exif_cases(seed: int, count: int, formats=FORMATS) -> list[tuple[str, str, bytes]]:
    """`count` EXIF-block mutations per format: the parser behind exif_transpose raises the most varied types."""
    rng = random.Random(seed)
    bases = [(name, fmt, data) for name, fmt, data in _base_files() if fmt in formats and name.endswith("-exif")]
    cases = []
    for i in range(count * len(formats)):
        name, fmt, data = bases[i % len(bases)]
        cases.append((f"{name}/{i}/exif_bytes", fmt, _exif_bytes(rng, data, fmt)))
    return cases


def _decode_outcome(data: bytes, max_pixels: int = FUZZ_MAX_PIXELS) -> str:
    """'ok' or 'error: <reason>'; any other exception escapes to the caller."""
    try:
        image = decode_rgb(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        assert str(exc), "an ImageDecodeError must say why"
        return f"error: {exc}"
    assert image.mode == "RGB"
    assert np.asarray(image).dtype == np.uint8
    return "ok"


# ---- decode_rgb -------------------------------------------------------------------------------------------


def test_png_with_malformed_exif_is_a_decode_error():
    png = _encode(_photos()["chelsea"], "PNG")
    bad = _with_malformed_exif(png, "PNG")
    assert b"eXIf" in bad and Image.open(io.BytesIO(bad)).info["exif"] == GARBAGE_EXIF  # the chunk is read
    with pytest.raises(ImageDecodeError, match=r"cannot decode image: SyntaxError: not a TIFF file"):
        decode_rgb(bad)
    decode_rgb(png)  # the same image without the bad chunk is fine


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns "Corrupt EXIF data" before it gives up
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.timeout(120)  # a mutated header must not make the decoder hang (a few seconds is normal)
def test_fuzzed_real_images_decode_to_rgb_or_raise_image_decode_error(fmt):
    cases = _fuzz_cases(seed=113, rounds=3, formats=(fmt,)) + _exif_cases(seed=113, count=150, formats=(fmt,))
    escaped, outcomes = [], Counter()
    for case, _, data in cases:
        try:
            outcomes[_decode_outcome(data).split(":")[0]] += 1
        except Exception as exc:  # noqa: BLE001 - this is what the test is looking for
            escaped.append(f"{case}: {type(exc).__name__}: {exc}")
    assert not escaped, f"{len(escaped)} of {len(cases)} cases raised past decode_rgb:\n" + "\n".join(escaped[:20])
    assert len(cases) == 4 * 2 * 3 * len(MUTATIONS) + 150  # photos x (EXIF or not) x rounds x mutations + EXIF
    # The mutations must exercise both outcomes, or the fuzzing proves nothing.
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes


def test_malformed_exif_fails_readably_in_every_format():
    for name, fmt, data in _base_files():
        if name.startswith("coffee") and name.endswith("-exif"):
            outcome = _decode_outcome(_with_malformed_exif(data, fmt))
            assert outcome.startswith("error: cannot decode image: SyntaxError"), (name, outcome)


# ---- through the real precompute and the training loader ----------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_fuzz_shard(demo_dir: Path, out: Path) -> dict[str, tuple[str, bytes]]:
    """One shard of 8 good demo samples and 24 mutated ones (the malformed-EXIF PNG among them), interleaved.

    Returns {key: (extension, image bytes)}.
    """
    out.mkdir()
    with tarfile.open(sorted((demo_dir / "shards").glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    good = [members[n] for n in sorted(members) if n.endswith(".jpg")][:8]
    rng = random.Random(1103)
    samples = {f"good-{i:02d}": ("jpg", data) for i, data in enumerate(good)}
    photo = Image.open(io.BytesIO(good[0])).convert("RGB")
    samples["bad-exif-png"] = ("png", _with_malformed_exif(_encode(photo, "PNG"), "PNG"))
    for i in range(23):
        fmt = FORMATS[i % 3]
        base = _encode(Image.open(io.BytesIO(good[i % 8])).convert("RGB"), fmt, _exif() if i % 2 else None)
        mutation = MUTATIONS[i % len(MUTATIONS)]
        samples[f"bad-{i:02d}"] = (EXTENSIONS[fmt], mutation(rng, base, fmt))
    keys = sorted(samples)
    rng.shuffle(keys)
    with tarfile.open(out / "fuzz-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            ext, data = samples[key]
            _add(tar, f"{key}.{ext}", data)
            _add(tar, f"{key}.txt", f"caption of {key}".encode())
    return samples


@pytest.fixture(scope="module")
def fuzz_shards(demo_dir, tmp_path_factory):
    """(shards directory, samples, the keys decode_rgb accepts)."""
    shards = tmp_path_factory.mktemp("fuzz") / "shards"
    samples = write_fuzz_shard(demo_dir, shards)
    decodable = set()
    for key, (_, data) in samples.items():
        try:
            decode_rgb(data)
            decodable.add(key)
        except Exception:  # noqa: BLE001 - which samples decode is all this needs; the tests judge the rest
            pass
    assert "bad-exif-png" not in decodable and {f"good-{i:02d}" for i in range(8)} <= decodable
    assert len(decodable) < len(samples) - 8, "the mutations should break most samples"
    return shards, samples, decodable


@pytest.fixture(scope="module")
def fuzz_store(fuzz_shards, ray_local):
    from pipeline.precompute import PrecomputeConfig, run_precompute

    shards, samples, decodable = fuzz_shards
    store = shards.parent / "store"
    run_precompute(str(shards), str(DEMO_TEACHERS), str(store),
                   PrecomputeConfig(rows_per_block=8, rows_per_chunk=4, workers=1), progress=False)
    return shards, store, samples, decodable


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_precompute_records_every_undecodable_sample_and_keeps_the_rest(fuzz_store):
    _, store, samples, _ = fuzz_store
    index = pq.read_table(store / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(samples)
    errors = pq.read_table(store / "errors.parquet").to_pylist()
    rows = {r["key"]: r["row"] for r in index}
    for name in TEACHERS:
        valid = zarr.open_array(str(store / name / "valid"))[:]
        failed = {e["row"]: e["error"] for e in errors if e["teacher"] == name}
        for key, row in rows.items():
            assert (valid[row] == 1) != (row in failed), (name, key, valid[row], failed.get(row))
            if key.startswith("good-"):
                assert valid[row] == 1, (name, key)
        assert "SyntaxError" in failed[rows["bad-exif-png"]], failed[rows["bad-exif-png"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_loader_skips_undecodable_samples_without_raising(fuzz_store):
    from pipeline.data.loader import TrainingSamples

    shards, store, samples, decodable = fuzz_store
    dataset = TrainingSamples(str(shards), str(store), ["depth"], transform=lambda s: s)
    seen = list(dataset)
    assert {s.key for s in seen} == decodable and len(seen) == len(decodable)
    assert all(s.image.mode == "RGB" for s in seen)
    assert sum(dataset.skipped.values()) == len(samples) - len(decodable), dataset.skipped


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_loader_without_a_store_skips_undecodable_samples_without_raising(fuzz_shards):
    """The same without a store (next-token-only training), so it does not depend on the precompute above."""
    from pipeline.data.loader import TrainingSamples

    shards, samples, decodable = fuzz_shards
    dataset = TrainingSamples(str(shards), None, [], transform=lambda s: s)
    assert {s.key for s in dataset} == decodable
    assert sum(dataset.skipped.values()) == len(samples) - len(decodable), dataset.skipped
    assert any(reason.startswith("cannot decode image: SyntaxError") for reason in dataset.skipped), dataset.skipped
