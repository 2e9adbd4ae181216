"""`pipeline estimate`: predicted bytes against what precompute and the store really write."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.errors import UsageError
from pipeline.data.store import TargetStore
from pipeline.estimate import OPTIONS, _chunk_ratio, estimate, teacher_bytes
from pipeline.llava_shards import add_member, write_llava_shards
from tests.conftest import DEMO_TEACHERS, REPO, ROWS_PER_BLOCK, ROWS_PER_CHUNK
from tests.pipeline.llava_fixtures import pretrain_558k

pytestmark = [pytest.mark.timeout(300)]
OLAVLM = REPO / "manifests" / "teachers" / "olavlm.yaml"


@pytest.fixture(scope="module")
def demo_estimate(demo_dir):
    # Target rows counted in the shards, as precompute assigns them: one per distinct image.
    return estimate(str(DEMO_TEACHERS), None, rows_per_block=ROWS_PER_BLOCK, rows_per_chunk=ROWS_PER_CHUNK,
                    shards=str(demo_dir / "shards"))


@pytest.mark.slow
def test_default_storage_bytes_match_what_precompute_wrote(demo_estimate, demo_store):
    store = TargetStore(str(demo_store))
    for teacher in demo_estimate.teachers:
        assert teacher.shape_source == "model" and teacher.manifest_option == "float16"
        actual = store.nbytes(teacher.name)
        assert teacher.bytes["float16"] == pytest.approx(actual, rel=0.10), teacher.name
        assert teacher.flops_per_image and teacher.flops_per_image > 0
    total = sum(store.nbytes(name) for name in store.teacher_names())
    assert demo_estimate.totals["float16"] == pytest.approx(total, rel=0.10)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["int8", "pool2", "int8+pool2", "bfloat16"])
def test_compact_storage_bytes_match_a_store_written_that_way(option, demo_estimate, demo_store, tmp_path):
    # The same targets rewritten with each option through the store's own writer: checks the layout the estimate
    # assumes (int8 scale array, pooled token count, shard indexes, metadata).
    source = TargetStore(str(demo_store))
    store = TargetStore(str(tmp_path / "store"))
    store.create(source.read_index(), source.dataset_fingerprint, rows_per_block=ROWS_PER_BLOCK)
    storage = OPTIONS[option]
    for name in ("depth", "seg"):
        attrs = source.teacher_attrs(name)
        store.add_teacher(name, spec=attrs["spec"], fingerprint=attrs["teacher_fingerprint"],
                          target_shape=attrs["target_shape"], storage=storage, rows_per_chunk=ROWS_PER_CHUNK)
        for block in store.blocks():
            target, valid = source.read_rows(name, block.start, block.stop)
            store.write_block(name, block, target, valid)
        store.mark_complete(name, {"mean": attrs["mean"], "std": attrs["std"]})
        predicted = next(t for t in demo_estimate.teachers if t.name == name).bytes[option]
        assert predicted == pytest.approx(store.nbytes(name), rel=0.10), name


def test_offline_manifest_sizes_come_from_declared_shapes():
    result = estimate(str(OLAVLM), 558_128, load=False)
    shapes = {t.name: t.target_shape for t in result.teachers}
    assert shapes == {"depth": [576, 1024], "seg": [576, 1536], "gen": [1, 1024]}
    for teacher in result.teachers:
        t, c = teacher.target_shape
        assert teacher.shape_source == "declared" and teacher.flops_per_image is None
        # Uncompressed: an upper bound with small overheads. One row per chunk gives each 1-2 KiB gen row a zstd
        # frame and a shard-index entry (two with int8's scales): 1.5% (float16) to 5.5% (int8) of a 1 GB array.
        slack = 1.06 if t * c < 4096 else 1.01
        raw = 558_128 * t * c * 2
        assert raw < teacher.bytes["float16"] < raw * slack
        int8 = 558_128 * t * (c + 2)  # codes + a float16 scale per token
        assert int8 < teacher.bytes["int8"] < int8 * slack
    gen = next(t for t in result.teachers if t.name == "gen")
    assert gen.bytes["pool2"] is None  # one token has no grid to pool
    assert result.totals["pool2"] == sum(t.bytes["pool2"] or t.bytes["float16"] for t in result.teachers)


def test_bytes_grow_with_rows_and_shrink_with_compression():
    small = teacher_bytes((576, 32), OPTIONS["float16"], 1000, 64, 8)
    large = teacher_bytes((576, 32), OPTIONS["float16"], 2000, 64, 8)
    assert math.isclose(large / small, 2.0, rel_tol=0.01)
    assert teacher_bytes((576, 32), OPTIONS["float16"], 1000, 64, 8, ratio=0.5) < small * 0.51
    assert teacher_bytes((1, 32), OPTIONS["pool2"], 1000, 64, 8) is None
    assert np.isfinite(small)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_predicts_a_store_of_random_targets(option, tmp_path):
    # No teacher and no Ray: random targets written through the store's own writer, so the layout the estimate
    # assumes (arrays per storage, shard indexes, the group's attributes) is checked for every option in seconds.
    rows, rows_per_block, rows_per_chunk, shape = 96, 32, 4, (64, 24)
    targets = np.random.default_rng(0).standard_normal((rows, *shape)).astype(np.float32)
    spec = {"kind": "depth_anything_v2", "model": "tiny"}
    storage = OPTIONS[option]
    store = TargetStore(str(tmp_path / "store"))
    store.create(pa.table({"row": np.arange(rows), "target_row": np.arange(rows)}), "0" * 64,
                 rows_per_block=rows_per_block)
    store.add_teacher("t", spec=spec, fingerprint="f" * 64, target_shape=shape, storage=storage,
                      rows_per_chunk=rows_per_chunk)
    for block in store.blocks():
        store.write_block("t", block, targets[block.start : block.stop], np.ones(block.rows, dtype=np.uint8))
    stats = {k: [round(float(x), 6) for x in f(targets, axis=(0, 1))] for k, f in (("mean", np.mean), ("std", np.std))}
    store.mark_complete("t", stats)

    stored, scale = storage.encode(targets)
    predicted = teacher_bytes(shape, storage, rows, rows_per_block, rows_per_chunk,
                              ratio=_chunk_ratio(stored, rows_per_chunk), spec_json=spec,
                              scale_ratio=None if scale is None else _chunk_ratio(scale, rows_per_chunk))
    assert predicted == pytest.approx(store.nbytes("t"), rel=0.01)


@pytest.fixture(scope="module")
def repeating_shards(tmp_path_factory) -> tuple[Path, int, int]:
    """LLaVA-558K-style shards whose images repeat by path and as a copy under another name, plus a text-only
    record: (shards folder, image samples, distinct images, read from the files)."""
    root = tmp_path_factory.mktemp("repeating")
    llava = pretrain_558k(root)
    shutil.copy(llava.images / llava.records[0]["image"], llava.images / "copy.jpg")
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    records = [*llava.records, *llava.records[:3], {**llava.records[0], "image": "copy.jpg"}, text]
    (root / "repeating.json").write_text(json.dumps(records))
    write_llava_shards(root / "repeating.json", llava.images, root / "shards", samples_per_shard=8, workers=1,
                       progress=False)
    images = [r["image"] for r in records if "image" in r]
    distinct = {hashlib.sha1((llava.images / image).read_bytes()).hexdigest() for image in images}
    return root / "shards", len(images), len(distinct)


def test_without_rows_a_store_is_sized_by_the_distinct_images_of_its_shards(repeating_shards):
    shards, image_samples, distinct = repeating_shards
    counted = estimate(str(OLAVLM), None, shards=str(shards), load=False)
    assert counted.rows == counted.counted.images == distinct < image_samples
    assert (counted.counted.samples, counted.counted.duplicates, counted.counted.text_only) == (
        image_samples + 1, image_samples - distinct, 1)
    given = estimate(str(OLAVLM), distinct, load=False)
    assert counted.totals == given.totals and given.counted is None


def test_rows_of_a_duplicate_key_are_not_counted(tmp_path):
    def photo(colour) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    # A shard written by hand: key a again after b, with an image of its own, which no reader ever uses.
    with tarfile.open(tmp_path / "s-00000.tar", "w") as tar:
        for key, colour in (("a", "red"), ("b", "green"), ("a", "blue")):
            add_member(tar, f"{key}.png", photo(colour))
    result = estimate(str(OLAVLM), None, shards=str(tmp_path), load=False)
    assert (result.rows, result.counted.duplicates, result.counted.text_only) == (2, 0, 1)


def test_shards_without_an_image_have_no_target_row(tmp_path):
    with tarfile.open(tmp_path / "s-00000.tar", "w") as tar:
        add_member(tar, "a.json", json.dumps({"conversations": []}).encode())
    with pytest.raises(UsageError, match="hold no image"):
        estimate(str(OLAVLM), None, shards=str(tmp_path), load=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "estimate", "--teachers", str(OLAVLM), "--no-load",
                           *args], capture_output=True, text=True, cwd=REPO)


def test_cli_counts_the_distinct_images_of_the_shards(repeating_shards):
    shards, image_samples, distinct = repeating_shards
    result = _cli("--shards", str(shards), "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["rows"] == found["counted"]["images"] == distinct
    assert found["counted_in"] == str(shards)
    assert (found["counted"]["samples"], found["counted"]["duplicates"]) == (image_samples + 1,
                                                                             image_samples - distinct)
    table = _cli("--shards", str(shards))
    assert f"{distinct:,} target rows (one per distinct image)" in table.stdout
    assert (f"counted in {shards}: {image_samples + 1} samples, {distinct} distinct images, "
            f"{image_samples - distinct} duplicates (image samples repeating an earlier image), 1 without a target "
            "row") in table.stdout


def test_cli_without_rows_or_shards_is_one_line_and_exit_2():
    result = _cli()
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "give --rows (the number of distinct images) or --shards" in result.stderr
