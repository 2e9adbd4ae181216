"""Session fixtures shared by the suite: one demo set, one precomputed store and one trained student for the whole
run (`build_once`: the xdist test processes share them), and one local Ray per test process.

Everything is real: tiny random-initialised checkpoints saved with save_pretrained, real tar shards,
a real local Ray cluster, real Zarr stores on disk. Ray starts once per process (it costs ~3 s of CPU and
~1-2 GB), and every test that uses it has a timeout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads libgomp, for this process, its subprocesses and its Ray workers: the test processes and their
# workers share 2 cores, and OpenMP threads that spin while they wait take the core another process needs (two
# processes of small torch ops side by side: 61 s spinning, 11.5 s passive; alone, 6.2 against 6.8 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHERS = REPO / "manifests" / "teachers" / "demo.yaml"
DEMO_EXPERIMENT = REPO / "manifests" / "experiments" / "demo.yaml"
# Small enough to keep the suite fast, large enough for several blocks per teacher and one shard per rank.
DEMO_SAMPLES = 40
DEMO_SHARDS = 4
ROWS_PER_BLOCK = 16
ROWS_PER_CHUNK = 4
# One Ray worker per run (the default is one per core): on 2 cores a second worker's start (torch, transformers and
# three teachers: ~5 s of CPU) costs more than its half of the blocks saves, and two test processes share the cores.
DEMO_BLOCKS = {"rows_per_block": ROWS_PER_BLOCK, "rows_per_chunk": ROWS_PER_CHUNK, "workers": 1}
# Many small blocks, so that a crash, a signal or a lost node lands mid-run.
SMALL_BLOCKS = {"rows_per_block": 4, "rows_per_chunk": 2, "batch_size": 2, "workers": 1}


def run_folder(tmp_path_factory) -> Path:
    """This test run's temporary folder, shared by its xdist processes (each has its own folder below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[], object]) -> None:
    """Run `build` once for the whole test run: the xdist processes share what it makes (the first to ask builds it
    while the others wait). What it builds is read-only to tests: those that change it copy it first."""
    from filelock import FileLock

    root = run_folder(tmp_path_factory)
    with FileLock(str(root / f"{name}.lock")):
        built = root / f"{name}.built"
        if not built.exists():
            build()
            built.touch()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A demo set (shards + tiny checkpoints) that every manifest's ${DEMO_DIR} points at."""
    from pipeline.demo import build_demo_assets

    root = run_folder(tmp_path_factory) / "demo"
    build_once(tmp_path_factory, "demo", lambda: build_demo_assets(root, num_samples=DEMO_SAMPLES,
                                                                   num_shards=DEMO_SHARDS, seed=0))
    os.environ["DEMO_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # "local": a Ray of this process's own, never the cluster another test process (an xdist worker, the two-node
    # cluster test) recorded in /tmp/ray, which a plain ray.init() would join.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def precompute(shards, store, manifest=DEMO_TEACHERS, **settings):
    """`run_precompute` as the tests call it: DEMO_BLOCKS where `settings` say nothing else, no progress bar."""
    from pipeline.precompute import PrecomputeConfig, run_precompute

    config = PrecomputeConfig(**{**DEMO_BLOCKS, **settings})
    return run_precompute(str(shards), str(manifest), str(store), config, progress=False)


@pytest.fixture(scope="session")
def demo_store(demo_dir, ray_local, tmp_path_factory) -> Path:
    """The demo store, precomputed once for the run; tests that change a store copy it first."""
    store = demo_dir / "store"
    build_once(tmp_path_factory, "demo-store", lambda: precompute(demo_dir / "shards", store))
    return store


@pytest.fixture(scope="session")
def small_block_store(demo_dir, ray_local, tmp_path_factory) -> Path:
    """An uninterrupted run with SMALL_BLOCKS: the yardstick of the crash, signal and cluster tests."""
    store = run_folder(tmp_path_factory) / "small-blocks" / "store"
    build_once(tmp_path_factory, "small-blocks", lambda: precompute(demo_dir / "shards", store, **SMALL_BLOCKS))
    return store


def small_block_flags(*, one_worker: bool = True) -> list[str]:
    """SMALL_BLOCKS as `pipeline precompute` flags; without `one_worker`, a worker per core (or per cluster CPU)."""
    settings = SMALL_BLOCKS if one_worker else {k: v for k, v in SMALL_BLOCKS.items() if k != "workers"}
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(demo_store, copy)
    return copy


MORE_SHARD = "0-more.tar"  # sorts before the demo's shards, so a store grown by it lists them in another order


def write_more_shard(path: Path, demo_shards: Path) -> None:
    """A shard of 4 samples: `again`, a byte-identical copy of the demo's first image under another key; `words`,
    text only; `mirrored`, an image the demo does not have; `again` once more, a duplicate key."""
    import io
    import tarfile

    from PIL import Image, ImageOps

    with tarfile.open(sorted(demo_shards.glob("*.tar"))[0]) as tar:
        photo = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".jpg"))).read()
    mirrored = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(photo))).save(mirrored, format="JPEG")
    members = [("again.jpg", photo), ("again.txt", b"the first photo again"), ("words.txt", b"no image here"),
               ("mirrored.jpg", mirrored.getvalue()), ("mirrored.txt", b"the first photo mirrored"),
               ("again.jpg", photo), ("again.txt", b"a key its shard has already")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def grown_dir(demo_dir, demo_store, ray_local, tmp_path_factory) -> Path:
    """`shards/` (the demo's plus MORE_SHARD) and `store/`: the demo store grown by MORE_SHARD, which gives one new
    image (its row starts a new block: the store's rows are 0..40 and 48..49), one duplicate and two samples without
    a target row. Tests that change it copy it first."""
    root = run_folder(tmp_path_factory) / "grown"

    def build():
        shutil.copytree(demo_dir / "shards", root / "shards")
        write_more_shard(root / "shards" / MORE_SHARD, demo_dir / "shards")
        shutil.copytree(demo_store, root / "store")
        precompute(root / "shards", root / "store")

    build_once(tmp_path_factory, "grown", build)
    return root


def train_from_config(path: str, overrides: list[str] | None = None, *, progress: bool = True):
    """What `pipeline train --config PATH --set ...` runs, for cached targets (online teachers come from the CLI)."""
    from student.config import load_experiment
    from student.trainer import train

    return train(load_experiment(path, overrides), progress=progress)


@pytest.fixture(scope="session")
def demo_checkpoint(demo_store, demo_dir, tmp_path_factory) -> Path:
    """A student trained 2 steps on the demo store (for probe and preview); tests must not write into it."""
    out = run_folder(tmp_path_factory) / "checkpoint" / "demo"
    build_once(tmp_path_factory, "checkpoint", lambda: train_from_config(
        str(DEMO_EXPERIMENT), [f"output_dir={out}", "train.max_steps=2", "data.num_workers=0", "data.batch_size=2",
                               "train.trackers=[]"], progress=False))
    return out


def kill_left_behind(processes) -> None:
    """The clean-up of a test that kills a command and checks its processes died: kill any that did not."""
    import psutil

    for process in processes:
        try:
            process.kill()  # psutil checks the create time, so a reused pid is left alone
        except psutil.Error:
            pass
