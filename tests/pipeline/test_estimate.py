"""`pipeline estimate`: predicted bytes against what precompute and the store really write."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.store import TargetStore
from pipeline.estimate import OPTIONS, _chunk_ratio, estimate, teacher_bytes
from tests.conftest import DEMO_SAMPLES, DEMO_TEACHERS, REPO, ROWS_PER_BLOCK, ROWS_PER_CHUNK

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def demo_estimate(demo_dir):
    return estimate(str(DEMO_TEACHERS), DEMO_SAMPLES, rows_per_block=ROWS_PER_BLOCK, rows_per_chunk=ROWS_PER_CHUNK,
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
    result = estimate(str(REPO / "manifests" / "teachers" / "olavlm.yaml"), 558_128, load=False)
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
    store.create(pa.table({"row": np.arange(rows)}), "0" * 64, rows_per_block=rows_per_block)
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
