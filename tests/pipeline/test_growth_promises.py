"""A kill -9 of the driver at each phase of an append (a store grown by new shards) and of a `--reuse` run, then a
rerun, gives the store an uninterrupted run gives, byte for byte (issue 23). The first run's phases are
tests/pipeline/test_precompute_faults.py's.

The killed driver joins the session's local Ray (`--address`), as a driver of a cluster does: the same cluster
gives the killed run, its rerun and the uninterrupted reference the same workers, and no Ray is started per case.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.llava_shards import write_llava_shards
from pipeline.precompute import PrecomputeConfig, PrecomputeSummary, run_precompute
from pipeline.verify import verify_store
from tests.conftest import DEMO_TEACHERS, REPO
from tests.pipeline.llava_fixtures import caption_records, copy_path, photo_path
from tests.pipeline.test_store_promises import store_files

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Blocks of two rows: four new blocks are eight new images, so the first block, the halfway block and the last
# record are three different moments of the run. One worker: each run's cost is mostly a worker loading the
# teachers, and two would load them twice on two cores. The batch size is fixed (bytes depend on it).
BLOCKS = {"rows_per_block": 2, "rows_per_chunk": 2, "batch_size": 2, "workers": 1}
TEACHERS = 3  # the demo manifest's depth, seg and gen

# Where a growing run can die: with the next index named but not written, with it written but not yet the store's,
# after Ray started, after the first block, halfway, after the last record, and inside the finish.
GROWTH_PHASES = ["grow-pending", "grow-index-written", "ray-started", "first-block", "mid-run", "last-record",
                 "finish"]
# A run with --reuse into a new store: inside the store's creation, then as any run.
REUSE_PHASES = ["store-created", "ray-started", "first-block", "mid-run", "last-record", "finish"]


def _precompute(shards: str, store: Path, reuse: tuple[Path, ...] = ()) -> PrecomputeSummary:
    config = PrecomputeConfig(**BLOCKS, reuse=tuple(str(r) for r in reuse))
    return run_precompute(shards, str(DEMO_TEACHERS), str(store), config, progress=False)


def _killed_at(phase: str, shards: str, store: Path, ray, reuse: tuple[Path, ...] = ()) -> None:
    """`pipeline precompute` in its own process, SIGKILLed by its failpoint `phase`."""
    flags = [arg for key, value in BLOCKS.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    command = [sys.executable, "-m", "pipeline", "precompute", "--shards", shards, "--teachers", str(DEMO_TEACHERS),
               "--store", str(store), "--address", ray.get_runtime_context().gcs_address, "--quiet", *flags,
               *(arg for lender in reuse for arg in ("--reuse", str(lender)))]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PIPELINE_KILL_AT": phase})
    assert killed.returncode == -signal.SIGKILL, f"the run did not die at {phase}: {killed.stderr[-2000:]}"


def _assert_same_store(got: Path, want: Path) -> None:
    got_files, want_files = store_files(got), store_files(want)
    assert sorted(got_files) == sorted(want_files)
    assert [name for name in want_files if got_files[name] != want_files[name]] == []


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, demo_dir, ray_local) -> dict:
    """Shards A (4 distinct images), shards B that grow them (8 new images, repeats of A's by path and by copy),
    the store of A, the store of A + B grown without interruption, shards C sharing 3 images with A + B, and the
    store of C computed without interruption with `--reuse` of the grown store. C's store lends its first block
    whole, computes its last two, and its second block is half lent, half computed."""
    root = tmp_path_factory.mktemp("growth-promises")
    images = root / "images"
    first = caption_records(root, "first", [
        photo_path(images, 0), photo_path(images, 1), photo_path(images, 0), None, copy_path(images, 2, 0),
        photo_path(images, 3)])
    write_llava_shards(first.json_path, images, root / "a", num_shards=2, workers=1, progress=False)
    more = caption_records(root, "more", [
        *(photo_path(images, i) for i in range(4, 8)), photo_path(images, 1), copy_path(images, 3, 1),
        *(photo_path(images, i) for i in range(8, 12)), None, photo_path(images, 5)])
    write_llava_shards(more.json_path, images, root / "b", prefix="more", num_shards=2, workers=1, progress=False)
    other = caption_records(root, "other", [
        photo_path(images, 2), photo_path(images, 12), photo_path(images, 9), copy_path(images, 13, 2), None,
        photo_path(images, 6), *(photo_path(images, i) for i in range(14, 17)), photo_path(images, 12)])
    write_llava_shards(other.json_path, images, root / "c", num_shards=1, workers=1, progress=False)

    base = root / "base"
    _precompute(str(root / "a"), base)
    grown = root / "grown"
    shutil.copytree(base, grown)
    grown_shards = f"{root}/{{a,b}}"
    assert _precompute(grown_shards, grown).blocks_computed == TEACHERS * 4
    borrower = root / "borrower"
    lent = _precompute(str(root / "c"), borrower, reuse=(grown,))
    assert (lent.rows_reused, lent.rows_computed) == (TEACHERS * 3, TEACHERS * 5)
    return {"root": root, "base": base, "grown": grown, "grown_shards": grown_shards, "borrower": borrower,
            "reuse_shards": str(root / "c")}


@pytest.mark.parametrize("phase", GROWTH_PHASES)
def test_kill_9_of_a_growing_run_at_each_phase_then_rerun_gives_the_uninterrupted_growth(
        phase, datasets, ray_local, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(datasets["base"], store)
    _killed_at(phase, datasets["grown_shards"], store, ray_local)
    assert not _precompute(datasets["grown_shards"], store).nothing_to_do
    assert verify_store(str(store), shards=datasets["grown_shards"]).problems == []
    _assert_same_store(store, datasets["grown"])


@pytest.mark.parametrize("phase", REUSE_PHASES)
def test_kill_9_of_a_reuse_run_at_each_phase_then_rerun_gives_the_uninterrupted_run(
        phase, datasets, ray_local, tmp_path):
    store = tmp_path / "store"
    lender = (datasets["grown"],)
    _killed_at(phase, datasets["reuse_shards"], store, ray_local, reuse=lender)
    assert not _precompute(datasets["reuse_shards"], store, reuse=lender).nothing_to_do
    assert verify_store(str(store), shards=datasets["reuse_shards"]).problems == []
    _assert_same_store(store, datasets["borrower"])
