"""Rows by image content, stores that grow, rows lent between stores: a LLaVA-format dataset whose records repeat
images by path and by byte-identical copies, precomputed, grown by a shard that `pipeline shards llava` cut, and a
second dataset computed with `--reuse` of the first store."""

from __future__ import annotations

import hashlib
import shutil
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.store import TargetStore
from pipeline.llava_shards import write_llava_shards
from pipeline.precompute import PrecomputeConfig, run_precompute
from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, REPO
from tests.pipeline.llava_fixtures import caption_records, copy_path, photo_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEACHERS = 3  # the demo manifest's depth, seg and gen
BLOCK = {"rows_per_block": 4, "rows_per_chunk": 2, "batch_size": 2, "workers": 1}


def _precompute(shards: str, store: Path, *reuse: Path) -> dict:
    run_precompute(shards, str(DEMO_TEACHERS), str(store),
                   PrecomputeConfig(**BLOCK, reuse=tuple(str(r) for r in reuse)), progress=False)
    return TargetStore(str(store)).last_run()


def _written(store: Path) -> dict[str, str]:
    """sha256 of every block file and completion record of a store."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*")
            if p.is_file() and {"c", "_blocks"} & set(p.relative_to(store).parts)}


@pytest.fixture(scope="module")
def grown(tmp_path_factory, demo_dir, ray_local):
    """A dataset of 12 records (6 distinct images, a text-only record) precomputed, then grown by a shard of 6
    records (2 new images); the runs' summaries and the block files before and after."""
    root = tmp_path_factory.mktemp("growth")
    images = root / "images"
    first = caption_records(root, "first", [
        photo_path(images, 0), photo_path(images, 1), photo_path(images, 2), photo_path(images, 0),
        photo_path(images, 3), copy_path(images, 1, 0), photo_path(images, 4), None, photo_path(images, 2),
        copy_path(images, 4, 1), photo_path(images, 5), photo_path(images, 0)])
    write_llava_shards(first.json_path, images, root / "shards", num_shards=2, workers=1, progress=False)
    store = root / "store"
    runs = [_precompute(str(root / "shards"), store)]
    before = _written(store)
    more = caption_records(root, "more", [
        photo_path(images, 6), photo_path(images, 1), copy_path(images, 6, 2), photo_path(images, 7),
        photo_path(images, 0), None])
    write_llava_shards(more.json_path, images, root / "more-shards", prefix="more", num_shards=1, workers=1,
                       progress=False)
    shards = f"{root}/{{shards,more-shards}}"
    runs.append(_precompute(shards, store))
    return {"root": root, "images": images, "store": store, "shards": shards, "runs": runs, "before": before}


def test_each_distinct_image_is_computed_once_and_growth_computes_only_new_images(grown):
    first, second = grown["runs"]
    assert first["rows_computed"] == TEACHERS * 6 and first["rows_reused"] == 0
    assert second["rows_computed"] == TEACHERS * 2
    store = TargetStore(str(grown["store"]))
    assert store.num_samples == 18 and store.row_ranges == [(0, 6), (8, 10)]  # new rows start a new block
    index = store.read_index()
    sha1s = index.column("image_sha1").to_pylist()
    rows = index.column("target_row").to_pylist()
    assert {sha1: row for sha1, row in zip(sha1s, rows) if row >= 0} == dict(
        (sha1, row) for sha1, row in zip(sha1s, rows) if row >= 0)  # one row per content, whatever the path
    assert len({r for r in rows if r >= 0}) == len({s for s in sha1s if s}) == 8
    assert rows.count(-1) == 2  # the text-only records


def test_growing_a_store_leaves_every_earlier_block_file_and_record_unchanged(grown):
    after = _written(grown["store"])
    assert grown["before"] and all(after.get(path) == digest for path, digest in grown["before"].items())
    assert set(after) > set(grown["before"])
    assert verify_store(str(grown["store"])).problems == []


def test_a_second_dataset_reuses_the_rows_of_the_first_store_and_computes_the_rest(grown, tmp_path):
    images = grown["images"]
    other = caption_records(tmp_path, "other", [
        photo_path(images, 1), photo_path(images, 8), copy_path(images, 7, 3), photo_path(images, 9),
        photo_path(images, 3), photo_path(images, 8)])
    write_llava_shards(other.json_path, images, tmp_path / "shards", num_shards=1, workers=1, progress=False)
    store = tmp_path / "store"
    run = _precompute(str(tmp_path / "shards"), store, grown["store"])
    assert run["rows_computed"] == TEACHERS * 2 and run["rows_reused"] == TEACHERS * 3
    assert verify_store(str(store)).problems == []
    lender, borrower = TargetStore(str(grown["store"])), TargetStore(str(store))
    rows_there = _rows_by_sha1(lender)
    reader_here, reader_there = borrower.reader(), lender.reader()
    for sha1, row in _rows_by_sha1(borrower).items():
        if sha1 in rows_there:
            for name in ("depth", "seg", "gen"):
                here, there = reader_here.row(name, row)[0], reader_there.row(name, rows_there[sha1])[0]
                assert np.array_equal(here, there)


def _rows_by_sha1(store: TargetStore) -> dict[str, int]:
    index = store.read_index()
    return {s: r for s, r in zip(index.column("image_sha1").to_pylist(), index.column("target_row").to_pylist())
            if r >= 0}


def test_pretraining_on_a_grown_store_gives_each_sample_its_own_images_targets(grown, tmp_path):
    from pipeline.data.loader import TrainingSamples
    from tests.conftest import train_from_config

    store = TargetStore(str(grown["store"]))
    index = store.read_index()
    first_row = {}
    for sha1, row in zip(index.column("image_sha1").to_pylist(), index.column("target_row").to_pylist()):
        first_row.setdefault(sha1, row)
    samples = list(TrainingSamples(grown["shards"], str(grown["store"]), ["depth"], lambda s: s))
    assert len(samples) == 16  # every image sample, repeats included
    reader = store.reader()
    for sample in samples:
        sha1 = index.column("image_sha1")[sample.row].as_py()
        assert np.array_equal(sample.targets["depth"], reader.row("depth", first_row[sha1])[0])
    distinct = {index.column("image_sha1")[s.row].as_py(): s.targets["depth"].tobytes() for s in samples}
    assert len(set(distinct.values())) == len(distinct) == 8  # other images, other targets

    out = tmp_path / "pt"
    train_from_config(str(REPO / "manifests" / "experiments" / "demo_pt.yaml"), [
        f"output_dir={out}", f"data.shards={grown['shards']}", f"data.store={grown['store']}", "train.max_steps=2",
        "train.grad_accum=1", "data.batch_size=4", "data.num_workers=0", "train.trackers=[]",
        "train.save_every=0"], progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] > 0 for m in metrics)


def test_a_lending_block_that_does_not_match_its_record_is_refused_naming_the_store(grown, tmp_path):
    from pipeline.data.errors import PipelineError

    lender = tmp_path / "lender"
    shutil.copytree(grown["store"], lender)
    store = TargetStore(str(lender))
    block = store.blocks()[0]
    targets, valid = store.read_rows("depth", block.start, block.stop)
    store.write_block("depth", block, targets + 1.0, valid)  # its record still holds the old digest
    with pytest.raises(PipelineError, match=rf"--reuse {lender}: block 0 of teacher depth does not hold what its "
                                            "record says"):
        _precompute(str(grown["root"] / "shards"), tmp_path / "store", lender)


def test_a_store_whose_shard_is_missing_is_refused_naming_it(grown, tmp_path):
    from pipeline.data.errors import UsageError

    with pytest.raises(UsageError, match=r"built for other shards: its shard first-00001.tar is not among the "
                                         "shards given"):
        _precompute(str(grown["root"] / "shards" / "first-00000.tar"), grown["store"])
